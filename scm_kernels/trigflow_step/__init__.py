"""trigflow_step: the fused TrigFlow sampler step (A23) in one kernel.

    x0  = cos t * x_t - sin t * sigma_d * F                    (A5; A7 with s = 0)
    out = cos s * x0  + sin s * sigma_d * eps   if t_next = s   (A22/A23, renoise)
    out = round(clamp((x0 + 1) * 127.5, 0, 255)) as uint8       (out_uint8, last step)

eps is `noise` when given, else drawn inside the kernel from the counter-based Philox4x32-10 +
Box-Muller stream of csrc/include/scm/math.h keyed by `seed` (element k of sample b, in the memory
order of x_t's sample, is stream element b*D + k): the same seed gives the same noise on every
backend, up to the float rounding of log/cos/sin.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _fwad

from scm_kernels import _checks, _layout
from scm_kernels import backend as _backend
from scm_kernels.trigflow_step import reference
from scm_kernels.trigflow_step.function import DENOISE, NOISE, PHILOX, TrigflowStepFunction
from scm_kernels.trigflow_step.triton_kernels import TRITON_DTYPES
from scm_kernels import _autograd

_TrigflowStepTraceable = _autograd.traceable(TrigflowStepFunction)  # the Function as torch.compile traces it

_OP = "scm_kernels.trigflow_step"
_SCHEMA_OP = torch.ops.scm.trigflow_step.default if _backend.extension_available() else None
SEED_LIMIT = 2**63


def trigflow_step(x_t: torch.Tensor, F: torch.Tensor, t, sigma_d: float = 0.5, *, t_next=None,
                  noise: torch.Tensor | None = None, seed: int | None = None, out_uint8: bool = False,
                  backend: str | None = None) -> torch.Tensor:
    """One sampler step of a TrigFlow consistency model (A23), fused.

    Args:
        x_t: (B, ...) noisy sample at time t, float dtype.
        F: network output F_theta(x_t / sigma_d, c_noise(t)), shape of x_t, any float dtype.
        t: time(s) of x_t: a number or per-sample values ((B,) or (B, 1, ..., 1) tensor).
        sigma_d: data standard deviation (> 0).
        t_next: next time s (number or per-sample): renoise the denoised x0 to time s (A22).
        noise: eps for the renoise (shape of x_t); default: Philox normals drawn in the kernel.
        seed: int in [0, 2^63) keying the Philox noise; default: drawn from torch's default
            generator (so torch.manual_seed makes sampling reproducible).
        out_uint8: return uint8 pixels of x0 (last step only: not with t_next).
        backend: "triton", "cuda", "cpu" or "reference" (default: automatic, scm_kernels.backend).

    Returns:
        Tensor of x_t's shape in x_t's dtype (uint8 with out_uint8), with x_t's memory layout.
        Differentiable (backward, torch.func.jvp, forward AD) w.r.t. x_t, F, noise, t and t_next,
        except the uint8 output. Inputs whose samples are dense blocks (contiguous, batch slices,
        channels_last, batch-broadcast) are read in place; F / noise are copied only when their
        inner layout differs from x_t's.
    """
    _checks.tensor(x_t, "x_t", _OP, min_ndim=1)
    _checks.tensor(F, "F", _OP, min_ndim=1)
    _checks.same_device(_OP, "x_t", x_t, F=F, noise=noise)
    _checks.same_shape(_OP, "x_t", x_t, F=F)
    sigma_d = _checks.number(sigma_d, "sigma_d", _OP, positive=True)
    if not isinstance(out_uint8, bool):
        raise TypeError(f"{_OP}: out_uint8 must be a bool, got {type(out_uint8).__name__}")
    if noise is not None:
        _checks.tensor(noise, "noise", _OP, min_ndim=1)
        _checks.same_shape(_OP, "x_t", x_t, noise=noise)
        if seed is not None:
            raise ValueError(f"{_OP}: give either noise or seed, not both (got noise of shape "
                             f"{tuple(noise.shape)} and seed={seed!r})")
        if t_next is None:
            raise ValueError(f"{_OP}: noise is only used to renoise: it needs t_next, got t_next=None")
    if seed is not None:
        seed = _checks.integer(seed, "seed", _OP, min_value=0, max_value=SEED_LIMIT - 1)
        if t_next is None:
            raise ValueError(f"{_OP}: seed keys the renoise: it needs t_next, got t_next=None")
    if out_uint8 and t_next is not None:
        raise ValueError(f"{_OP}: out_uint8=True writes the pixels of the last step and cannot renoise; "
                         f"got t_next={t_next!r} (pass t_next=None)")
    B = x_t.shape[0]
    t32 = _checks.per_sample(t, "t", _OP, B, x_t)
    s32 = _checks.per_sample(t_next, "t_next", _OP, B, x_t) if t_next is not None else None
    name = _backend.select(x_t.device, backend, op=_OP)
    if name == "triton":
        for arg, x in (("x_t", x_t), ("F", F), ("noise", noise)):
            if x is not None and x.dtype not in TRITON_DTYPES:
                raise TypeError(f"{_OP}: backend 'triton' needs {arg} in float32/float16/bfloat16, got {x.dtype} "
                                "(use backend='cpu' or 'reference' for float64)")
    if t_next is not None and noise is None and seed is None:
        seed = int(torch.randint(0, SEED_LIMIT - 1, ()))  # torch's default generator
    if name == "reference":
        return reference.trigflow_step(x_t, F, t, sigma_d, t_next, noise, seed, out_uint8)
    x_base = _layout.dense_base(x_t)
    F_m = _layout.matched(x_base, F)
    n_m = _layout.matched(x_base, noise) if noise is not None else None
    mode = DENOISE if t_next is None else (NOISE if noise is not None else PHILOX)
    args = (x_base, F_m, t32, s32, n_m, sigma_d, seed or 0, mode, out_uint8, name)
    if _needs_autograd(x_base, F_m, t32, s32, n_m):
        return _autograd.apply(TrigflowStepFunction, _TrigflowStepTraceable, *args)
    if name != "triton" and x_base.is_contiguous() and F_m.is_contiguous() and (n_m is None or n_m.is_contiguous()):
        # The sampler's common case: contiguous tensors, nothing to differentiate. The schema op takes
        # them as they are (rows of numel / B elements) and returns x_t's shape: no views to build.
        return _SCHEMA_OP(x_base, F_m, t32, s32, n_m, sigma_d, seed or 0, mode, out_uint8)
    return TrigflowStepFunction.forward(*args)  # no derivative can be asked for: skip the Function


def _needs_autograd(*xs) -> bool:
    """True when a gradient or tangent may flow: a torch.func transform, a forward-AD dual level, or
    an input requiring grad under grad mode. Otherwise the launch skips autograd.Function's overhead."""
    if torch._C._are_functorch_transforms_active() or _fwad._current_level >= 0:
        return True
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


__all__ = ["trigflow_step", "reference"]
