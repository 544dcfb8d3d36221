"""What the Triton launchers' PyTorch fallbacks share: the fused JVP's (triton_fwd._jvp_blockwise)
and the backward's (triton_bwd._blockwise), both fp32 matmuls over blocks of query rows, O(block x
Nk) memory, for the launch families where no kernel tile compiles without register spills.

Query heads are grouped as (B, Hkv, G, rows, .) so that the key/value operands (B, Hkv, 1, Nk, .)
broadcast over the G query heads of each kv head (GQA/MQA without copies of k and v)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

BLOCK_ELEMS = 1 << 24  # fp32 elements of one (query block x keys) temporary


class Blocks:
    """Blocks of query rows of one call: the fp32 grouped views, the scores of a block."""

    def __init__(self, q: Tensor, k: Tensor, mask: Optional[Tensor], is_causal: bool, scale: float):
        self.B, self.Hq, self.Nq = q.shape[:3]
        self.Hkv, self.Nk = k.shape[1], k.shape[2]
        self.G = self.Hq // self.Hkv
        self.mask, self.is_causal, self.scale = mask, is_causal, scale
        self.cols = torch.arange(self.Nk, device=q.device)
        self.step = max(16, min(self.Nq, BLOCK_ELEMS // max(1, self.B * self.Hq * self.Nk)))

    def ranges(self):
        """(i0, i1) of each block of query rows, in order (a fixed summation order)."""
        return ((i0, min(self.Nq, i0 + self.step)) for i0 in range(0, self.Nq, self.step))

    def kv(self, x: Optional[Tensor]) -> Optional[Tensor]:
        """A key-side operand as (B, Hkv, 1, Nk, .) fp32."""
        return None if x is None else x.to(torch.float32).unsqueeze(2)

    def rows(self, x: Optional[Tensor], i0: int, i1: int) -> Optional[Tensor]:
        """Rows i0:i1 of a query-side operand (B, Hq, Nq, .) as (B, Hkv, G, m, .) fp32."""
        return None if x is None else x[:, :, i0:i1].to(torch.float32).reshape(
            self.B, self.Hkv, self.G, i1 - i0, x.shape[-1])

    def ungroup(self, x: Tensor) -> Tensor:
        """(B, Hkv, G, m, .) back to (B, Hq, m, .)."""
        return x.reshape(self.B, self.Hq, x.shape[3], x.shape[4])

    def scores(self, qb: Tensor, k32: Tensor, i0: int, i1: int) -> Tensor:
        """s = scale q k^T of rows i0:i1, with the mask (bool: -inf where False; float: added) and
        causality applied: (B, Hkv, G, m, Nk) fp32."""
        s = self.scale * (qb @ k32.transpose(-1, -2))
        if self.mask is not None:
            mb = self.mask.expand(self.B, self.Hq, self.Nq, self.Nk)[:, :, i0:i1]
            mb = mb.reshape(self.B, self.Hkv, self.G, i1 - i0, self.Nk)
            s = s.masked_fill(~mb, float("-inf")) if mb.dtype == torch.bool else s + mb.to(s.dtype)
        if self.is_causal:
            rows = torch.arange(i0, i1, device=s.device)
            s = s.masked_fill(self.cols[None, :] > rows[:, None], float("-inf"))
        return s
