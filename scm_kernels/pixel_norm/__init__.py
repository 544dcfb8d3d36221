"""Pixel norm (A11) with backward and forward-mode JVP:

    pnorm(a) = a / sqrt(mean_c(a^2) + eps)        the mean over dimension `dim` (the channels)

The sCM paper's adaptive double normalization (A11) normalizes the modulation with it:
y = norm(x) * pnorm(s(emb)) + pnorm(b(emb)) (scm_kernels.nn.AdaptiveGroupNorm, mode="double").

Derivatives: loss.backward(), torch.func.jvp and forward-AD dual tensors (the Jacobian r (I - y y^T / C)
is symmetric, so backward and JVP are the same kernel). Statistics in fp32, output in a's dtype.
Layouts: contiguous tensors and tensors whose normalized dim is innermost in memory (channels_last
with dim=1) run without copies; others are copied once.
"""

from __future__ import annotations

import torch

from scm_kernels import _autograd, _checks
from scm_kernels import backend as _backend
from scm_kernels.pixel_norm import reference
from scm_kernels.pixel_norm.function import PixelNormFunction, forward_kernel, view_for

_PixelNormTraceable = _autograd.traceable(PixelNormFunction)

OP = "scm_kernels.pixel_norm"

__all__ = ["pixel_norm", "PixelNormFunction", "reference"]


def _needs_autograd(a: torch.Tensor) -> bool:
    if torch.is_grad_enabled() and a.requires_grad:
        return True
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    return torch._C._are_functorch_transforms_active()


def pixel_norm(a: torch.Tensor, dim: int = 1, eps: float = 1e-8, *, backend: str | None = None) -> torch.Tensor:
    """a / sqrt(mean(a^2, dim) + eps) (A11), a's shape, dtype and layout.

    Args:
        a: a tensor with at least dim + 1 dims (e.g. (N, C) or (N, C, H, W)), float32/float16/
            bfloat16 (float64 for tests), no zero-size dim.
        dim: the normalized (channel) dimension; negative values count from the end.
        eps: > 0, added to the mean square.
        backend: None (automatic), "triton", "cuda", "cpu" or "reference" (see scm_kernels.backend).
    """
    _checks.tensor(a, "a", OP, min_ndim=1)
    dim = _checks.integer(dim, "dim", OP, min_value=-a.dim(), max_value=a.dim() - 1)
    dim = dim % a.dim()
    eps = _checks.number(eps, "eps", OP, positive=True)
    name = _backend.select(a.device, backend, op=OP)
    if name == "reference":
        return reference.pixel_norm(a, dim, eps)
    _, a = view_for(a, dim)
    if not _needs_autograd(a):
        return forward_kernel(a, dim, eps, name)[0]
    y, _ = _autograd.apply(PixelNormFunction, _PixelNormTraceable, a, dim, eps, name)
    return y
