"""Plain-PyTorch time embedding (A10): the oracle of the tests and the `reference` backend.

    c = c_noise(t) = t                                   (A2, identity)
    omega_k = exp(-ln(max_period) * k / half)            positional, k = 0 .. half-1
    omega_k = 2 pi f_k                                   Fourier, given frequencies f_k
    theta_bk = (s * c_b) * omega_k                       s = time_scale
    emb_b = [cos(theta_b) | sin(theta_b) | 0 if dim is odd]

Every step runs in `compute_dtype` (float32 for users, float64 for the oracle). The operations and
their order are the ones the kernels use (s * c first, then times omega), so that an fp32 kernel and
this function round alike. Only elementwise ops are used (no matmul/outer), so torch.autocast does
not lower the precision. Plain PyTorch differentiates this function (backward, torch.func.jvp,
forward_ad) by itself.
"""

from __future__ import annotations

import math

import torch


def omega(dim: int, *, kind: str = "positional", max_period: float = 10000.0, freqs: torch.Tensor | None = None,
          compute_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The (half,) angular frequencies omega_k of (A10)."""
    half = dim // 2
    if kind == "fourier":
        return (2.0 * math.pi) * freqs.to(compute_dtype)
    k = torch.arange(half, dtype=compute_dtype, device=device)
    return torch.exp(-math.log(max_period) * k / half)


def time_embedding(t, dim: int, *, kind: str = "positional", max_period: float = 10000.0,
                   time_scale: float = 1.0, freqs: torch.Tensor | None = None,
                   compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, dim) embedding of times t (a (B,) or 1-element tensor, or a number) in compute_dtype (A10)."""
    if isinstance(t, torch.Tensor):
        c = t.reshape(-1).to(compute_dtype)
    else:
        device = freqs.device if freqs is not None else None
        c = torch.tensor([float(t)], dtype=compute_dtype, device=device)
    w = omega(dim, kind=kind, max_period=max_period, freqs=freqs, compute_dtype=compute_dtype, device=c.device)
    theta = (time_scale * c)[:, None] * w[None, :]
    emb = torch.cat([torch.cos(theta), torch.sin(theta)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
