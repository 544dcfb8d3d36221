"""Time embedding of continuous-time consistency models (A10; c_noise(t) = t, A2).

    half = dim // 2,  k = 0 .. half-1,  s = time_scale
    omega_k = exp(-ln(max_period) * k / half)      kind="positional"
    omega_k = 2 pi f_k                              kind="fourier", f = freqs (half,)
    emb = [cos(s t omega_k) | sin(s t omega_k)]     (B, dim) float32, cos half first;
                                                    the last column is 0 when dim is odd.

Differentiable in t and freqs: backward (loss.backward()), torch.func.jvp and forward-mode dual
tensors (torch.autograd.forward_ad), also inside a larger model that is JVP'ed as a whole
(d emb/dc of A10: [-s omega sin | s omega cos]). The embedding is always computed and returned in
float32, whatever the dtype of t and freqs and under torch.autocast; gradients flow back to t and
freqs in their own dtypes.
"""

from __future__ import annotations

import math
import numbers

import torch

from scm_kernels import _checks
from scm_kernels import backend as _backend
from scm_kernels.time_embedding import reference
from scm_kernels.time_embedding.function import TimeEmbeddingFunction, kernels
from scm_kernels import _autograd

_TimeEmbeddingTraceable = _autograd.traceable(TimeEmbeddingFunction)  # the Function as torch.compile traces it

OP = "scm_kernels.time_embedding"
KINDS = ("positional", "fourier")

__all__ = ["time_embedding", "reference"]


def _times(t, device: torch.device) -> torch.Tensor:
    """t as a 1-D tensor of its own dtype (B,), B = 1 for numbers, 0-d and 1-element tensors."""
    if isinstance(t, torch.Tensor):
        _checks.tensor(t, "t", OP)
        if t.dim() == 1:
            return t
        if t.numel() == 1:
            return t.reshape(1)
        raise ValueError(f"{OP}: t must have shape (B,), or be a 0-d / 1-element tensor or a number; "
                         f"got shape {tuple(t.shape)}")
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise TypeError(f"{OP}: t must be a torch.Tensor or a real number, got {type(t).__name__}")
    return torch.tensor([_checks.number(t, "t", OP)], dtype=torch.float32, device=device)


def _check_finite(t: torch.Tensor) -> None:
    """_checks.finite, behind a cheaper test for the common case: a float sum is finite only if
    every element is (inf and NaN propagate), so one reduction clears a good t; a non-finite sum
    (a bad value, or an overflow of large finite ones) runs the exact check and its message."""
    if _checks._must_check_values(t) and not math.isfinite(t.detach().sum().item()):
        _checks.finite(t, "t", OP)


def _needs_autograd(t: torch.Tensor, freqs: torch.Tensor | None) -> bool:
    """True when the call must go through the autograd.Function: something requires grad, a
    forward-AD level is open (dual tensors may carry tangents), or a functorch transform is active."""
    if torch.is_grad_enabled() and (t.requires_grad or (freqs is not None and freqs.requires_grad)):
        return True
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    return torch._C._are_functorch_transforms_active()


def time_embedding(t, dim: int, *, kind: str = "positional", max_period: float = 10000.0,
                   time_scale: float = 1.0, freqs: torch.Tensor | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) float32 of times t (A10).

    Args:
        t: (B,) floating tensor (float32/float16/bfloat16/float64), a 0-d or 1-element tensor, or a
            Python number (B = 1). Values must be finite.
        dim: embedding width, an int >= 2.
        kind: "positional" (frequencies from max_period) or "fourier" (frequencies from freqs).
        max_period: > 0; positional frequencies omega_k = max_period^(-k/half).
        time_scale: s, multiplies t (finite real).
        freqs: (dim // 2,) floating tensor of Fourier frequencies f_k (omega_k = 2 pi f_k), on t's
            device; required iff kind == "fourier"; may require grad.
        backend: None (automatic), "triton", "cuda", "cpu" or "reference" (see scm_kernels.backend).
    """
    dim = _checks.integer(dim, "dim", OP, min_value=2)
    kind = _checks.choice(kind, "kind", OP, KINDS)
    max_period = _checks.number(max_period, "max_period", OP, positive=True)
    time_scale = _checks.number(time_scale, "time_scale", OP)
    half = dim // 2
    if kind == "fourier":
        if freqs is None:
            raise ValueError(f"{OP}: kind='fourier' needs freqs, a ({half},) tensor of frequencies; got None")
        _checks.tensor(freqs, "freqs", OP)
        if freqs.shape != (half,):
            raise ValueError(f"{OP}: freqs must have shape (dim // 2,) = ({half},), got {tuple(freqs.shape)}")
    elif freqs is not None:
        raise ValueError(f"{OP}: freqs must be None when kind='positional' (got a tensor); "
                         "pass kind='fourier' to use given frequencies")
    device = freqs.device if freqs is not None and not isinstance(t, torch.Tensor) else None
    t = _times(t, device if device is not None else torch.device("cpu"))
    _checks.same_device(OP, "t", t, freqs=freqs)
    _check_finite(t)

    name = _backend.select(t.device, backend, op=OP)
    if name == "reference":
        return reference.time_embedding(t, dim, kind=kind, max_period=max_period, time_scale=time_scale,
                                        freqs=freqs, compute_dtype=torch.float32)
    t32 = t if t.dtype == torch.float32 else t.to(torch.float32)
    f32 = freqs if freqs is None or freqs.dtype == torch.float32 else freqs.to(torch.float32)
    if not _needs_autograd(t, freqs):
        return kernels(name)[0](t32, dim, max_period, time_scale, f32)
    return _autograd.apply(TimeEmbeddingFunction, _TimeEmbeddingTraceable, t32, f32, dim, max_period, time_scale, name)
