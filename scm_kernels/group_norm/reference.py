"""Plain-PyTorch GroupNorm with time modulation and SiLU (A28): the oracle of the tests and the
`reference` backend.

    x^ = (x - mu_{n,g}) * r_{n,g},  r = (sigma^2 + eps)^(-1/2)      (F.group_norm, biased variance)
    a  = (x^ * gamma_c + beta_c) * s_{n,c} + b_{n,c}                  (A28)
    y  = SiLU(a) = a * sigmoid(a)   (activation="silu"),  y = a  (activation=None)

It is the composite a user would write (F.group_norm -> mul/add -> silu), run in x's dtype (float32
parameters with a bf16 x are used as F.group_norm uses them; scale and shift are cast to x's
dtype, so y always has x's dtype; float64 inputs give the float64 oracle); plain PyTorch differentiates it (backward,
torch.func.jvp, forward_ad). Non-contiguous inputs (channels_last) are normalized through a
contiguous copy: torch.func.jvp of F.group_norm fails on channels_last tensors in torch 2.13
("view size is not compatible ..."), and the values do not depend on the layout. Two more torch
2.13 limitations are worked around with the same math: a bias without a weight gets weight = 1
(the backward of F.group_norm(x, G, None, bias) fails with "tensor does not have a device"), and
a call with a single value per normalized group and batch (N * C/G * spatial == 1, which
F.group_norm refuses in training mode) is written out: x^ = (x - x) * (0 + eps)^(-1/2) = 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(N, C) (or (N, C, 1, ..., 1)) modulation as (N, C, 1, ..., 1) for an ndim-dim input."""
    return v.reshape(v.shape[0], v.shape[1], *([1] * (ndim - 2)))


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
               activation: str | None = None) -> torch.Tensor:
    """act((GN(x) * weight + bias) * scale + shift) (A28), in x's dtype; see the module docstring."""
    if not x.is_contiguous():
        x = x.contiguous()
    if bias is not None and weight is None:
        weight = torch.ones_like(bias)
    if x.shape[0] * (x.shape[1] // num_groups) * x[0, 0].numel() == 1:
        y = (x - x) * (eps ** -0.5)
        y = y * _per_channel(weight[None], x.dim()) if weight is not None else y
        y = y + _per_channel(bias[None], x.dim()) if bias is not None else y
    else:
        y = F.group_norm(x, num_groups, weight, bias, eps)
    if scale is not None:
        y = y * _per_channel(scale, x.dim()).to(y.dtype)
    if shift is not None:
        y = y + _per_channel(shift, x.dim()).to(y.dtype)
    if activation == "silu":
        y = F.silu(y)
    return y
