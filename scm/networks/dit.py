"""DiT (diffusion transformer) for TrigFlow consistency models, on scm_kernels.nn.Attention.

    tokens = patchify(x) + pos           conv p x p, stride p; fixed 2-D sin-cos positions
    c      = SiLU(MLP(pos(t)) + E[label] (+ MLP_g(pos(guidance))))          (A10, float32 always)
    block  : (shift1, scale1, gate1, shift2, scale2, gate2) = Linear(c)       (adaLN-Zero)
             x = x + gate1 * Attention(LN(x) * (1 + scale1) + shift1)
             x = x + gate2 * MLP(LN(x) * (1 + scale2) + shift2)
    F      = unpatchify(Linear(LN(x) * (1 + scale) + shift))              (zero-initialised)

The model follows scm.losses' protocol: F = model(x, t, class_labels=..., guidance=...), and
``forward_jvp(x, t, x_dot, t_dot, **kw) -> (F, F_dot)`` is the per-layer JVP path (A13), attention
through scm_kernels.attention_jvp (A24-A25).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scm.losses import block_jvp, tangent_arithmetic
from scm.networks.layers import (ConditionEmbedding, Conv2d, Linear, attention_tokens_jvp, check_backend,
                                 set_backend, sincos_2d)
from scm_kernels.nn import Attention

__all__ = ["DiT", "DiTBlock"]

OP = "scm.networks.DiT"


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: the modulation starts at zero, so the block starts as identity."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 backend: str | None = None):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm, backend=backend)
        self.mlp = nn.Sequential(Linear(dim, hidden), nn.GELU(approximate="tanh"), Linear(hidden, dim))
        self.ada = Linear(dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def _mlp_part(self, x, c):
        _, _, _, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)
        return x + gate2[:, None] * self.mlp(_modulate(x, shift2, scale2))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1 = self.ada(c).chunk(6, dim=1)[:3]
        x = x + gate1[:, None] * self.attn(_modulate(x, shift1, scale1))
        return self._mlp_part(x, c)

    def forward_jvp(self, x, x_dot, c, c_dot):
        def pre(xx, cc):
            shift1, scale1, gate1 = self.ada(cc).chunk(6, dim=1)[:3]
            return _modulate(xx, shift1, scale1), gate1[:, None]

        (a, gate), (a_dot, gate_dot) = block_jvp(pre, (x, c), (x_dot, c_dot))
        y, y_dot = attention_tokens_jvp(self.attn, a, a_dot)
        with tangent_arithmetic():
            x_dot = x_dot + gate_dot * y + gate * y_dot
        x = x + gate * y
        return block_jvp(self._mlp_part, (x, c), (x_dot, c_dot))


class DiT(nn.Module):
    """Diffusion transformer F_theta(x, t) with adaLN-Zero blocks and class conditioning.

    Args:
        img_resolution: H = W of the input (a multiple of patch_size).
        in_channels, out_channels: channels (out default in).
        patch_size: p; tokens = (H / p)^2.
        dim, depth, num_heads: width, number of blocks, attention heads (must divide dim; dim % 4 == 0
            for the 2-D position embedding).
        mlp_ratio: MLP hidden width / dim. qk_norm: RMS-normalize q and k (large models).
        num_classes: 0 for unconditional; labels (B,) in [0, num_classes], num_classes = null label.
        guidance_input: extra guidance-scale input (sCD students of a CFG teacher).
        time_scale: s of the time embedding (A10). pos_dim: width of the sinusoidal embeddings.
        backend: None/"auto" or a backend for every fused op ("reference": plain PyTorch).
        channels_last: the patch embedding reads the image channels-last (weight and input; its
            tokens then come out contiguous), as UNet(channels_last=True) does for every layer.
    """

    # forward_jvp's F is differentiable exactly as forward's: SCMLoss may merge its passes (scm.losses)
    forward_jvp_differentiable = True

    def __init__(self, img_resolution: int = 32, in_channels: int = 4, out_channels: int | None = None, *,
                 patch_size: int = 2, dim: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, qk_norm: bool = False, num_classes: int = 0,
                 guidance_input: bool = False, time_scale: float = 1000.0, pos_dim: int = 256,
                 backend: str | None = None, channels_last: bool = False):
        super().__init__()
        backend = check_backend(backend, OP)
        if not isinstance(channels_last, bool):
            raise ValueError(f"{OP}: channels_last must be a bool, got {channels_last!r}")
        self.channels_last = channels_last
        for name, v, lo in (("img_resolution", img_resolution, 1), ("in_channels", in_channels, 1),
                            ("patch_size", patch_size, 1), ("dim", dim, 4), ("depth", depth, 1),
                            ("num_heads", num_heads, 1), ("num_classes", num_classes, 0),
                            ("pos_dim", pos_dim, 2)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{OP}: {name} must be an int >= {lo}, got {v!r}")
        out_channels = in_channels if out_channels is None else out_channels
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"{OP}: out_channels must be an int >= 1, got {out_channels!r}")
        if img_resolution % patch_size:
            raise ValueError(f"{OP}: patch_size ({patch_size}) must divide img_resolution ({img_resolution})")
        if dim % num_heads:
            raise ValueError(f"{OP}: num_heads ({num_heads}) must divide dim ({dim})")
        if dim % 4:
            raise ValueError(f"{OP}: dim must be a multiple of 4 (2-D sin-cos positions), got {dim}")
        if not mlp_ratio > 0:
            raise ValueError(f"{OP}: mlp_ratio must be > 0, got {mlp_ratio!r}")
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.patch_size, self.num_classes, self.guidance_input, self.backend = patch_size, num_classes, \
            guidance_input, backend
        self.grid = img_resolution // patch_size
        self.embed = ConditionEmbedding(dim, pos_dim=pos_dim, num_classes=num_classes,
                                        guidance_input=guidance_input, time_scale=time_scale, backend=backend)
        self.patch = Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.register_buffer("pos", sincos_2d(dim, self.grid, self.grid), persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(dim, num_heads, mlp_ratio, qk_norm, backend)
                                     for _ in range(depth)])
        self.final_ada = Linear(dim, 2 * dim)
        self.final = Linear(dim, patch_size * patch_size * out_channels)
        for lin in (self.final_ada, self.final):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        if channels_last:
            self.patch.to(memory_format=torch.channels_last)

    def set_backend(self, backend: str | None) -> DiT:
        """Route every fused op to `backend` (None/"auto": automatic; "reference": plain PyTorch)."""
        set_backend(self, backend)
        return self

    def embed_time(self, t: torch.Tensor) -> dict:
        """{"time_emb": ...}: the time conditioning computed once (ConsistencySamplerGraph's time_kwargs)."""
        return {"time_emb": self.embed.embed_time(t)}

    def _check_input(self, x, t):
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2:] != (self.img_resolution,) * 2:
            raise ValueError(f"{OP}: x must be (B, {self.in_channels}, {self.img_resolution}, "
                             f"{self.img_resolution}), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"{OP}: t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")

    def _patchify(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.patch(x).flatten(2).transpose(1, 2) + self.pos.to(self.patch.weight.dtype)

    def _head(self, h, c):
        shift, scale = self.final_ada(c).chunk(2, dim=1)
        y = self.final(_modulate(h, shift, scale))  # (B, g*g, p*p*C)
        B, g, p, C = y.shape[0], self.grid, self.patch_size, self.out_channels
        return y.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None, time_emb: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x, t)
        c = self.embed(t, class_labels, guidance, time_emb)
        h = self._patchify(x)
        for blk in self.blocks:
            h = blk(h, c)
        return self._head(h, c).to(x.dtype)

    def forward_jvp(self, x: torch.Tensor, t: torch.Tensor, x_dot: torch.Tensor, t_dot: torch.Tensor,
                    class_labels: torch.Tensor | None = None, guidance: torch.Tensor | None = None,
                    time_emb: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(F, dF/dx . x_dot + dF/dt . t_dot), block by block (A13). With time_emb given, t is fixed."""
        self._check_input(x, t)
        if time_emb is None:
            c, c_dot = block_jvp(lambda tt: self.embed(tt, class_labels, guidance), (t,), (t_dot,))
        else:
            c = self.embed(t, class_labels, guidance, time_emb)
            c_dot = torch.zeros_like(c)
        h, h_dot = block_jvp(self._patchify, (x,), (x_dot,))
        for blk in self.blocks:
            h, h_dot = blk.forward_jvp(h, h_dot, c, c_dot)
        out, out_dot = block_jvp(self._head, (h, c), (h_dot, c_dot))
        return out.to(x.dtype), out_dot.to(x.dtype)
