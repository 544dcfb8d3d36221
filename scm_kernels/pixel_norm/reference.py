"""Plain-PyTorch pixel norm (A11): the oracle of the tests and the `reference` backend.

    pnorm(a) = a / sqrt(mean_c(a^2) + eps)        mean over dimension `dim` (the channels)

In the input's dtype (float64 inputs give the float64 oracle); plain PyTorch differentiates it.
"""

from __future__ import annotations

import torch


def pixel_norm(a: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """a / sqrt(mean(a^2, dim) + eps) (A11)."""
    return a * torch.rsqrt(a.square().mean(dim=dim, keepdim=True) + eps)
