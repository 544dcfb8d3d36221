"""Fused GroupNorm with time modulation and SiLU: forward, backward and forward-mode JVP (A28-A30).

Per sample n and group g of M = (C / G) * spatial elements (labels of shared/docs/algorithm.md):

    mu = mean(x),  sigma^2 = mean((x - mu)^2)        (fp32, two-pass / Chan merges; never E[x^2] - E[x]^2)
    r  = (sigma^2 + eps)^(-1/2),  x^ = (x - mu) r
    (A28)  a = (x^ gamma_c + beta_c) s_{n,c} + b_{n,c},   y = SiLU(a) = a sigmoid(a)  (or y = a)
    (A29)  x^_dot = r (x_dot - mean(x_dot) - x^ mean(x^ x_dot))
           a_dot  = (x^_dot gamma + x^ gamma_dot + beta_dot) s + (x^ gamma + beta) s_dot + b_dot,
           y_dot  = SiLU'(a) a_dot,  SiLU'(a) = sigmoid(a) (1 + a (1 - sigmoid(a)))
    (A30)  da = dy SiLU'(a),  dx^ = da s gamma,  dx = r (dx^ - mean(dx^) - x^ mean(dx^ x^)),
           dgamma_c = sum da s x^,  dbeta_c = sum da s,  ds_{n,c} = sum_sp da (x^ gamma + beta),
           db_{n,c} = sum_sp da

Classic AdaGN passes scale = 1 + s(emb), shift = b(emb); the paper's adaptive double normalization
passes scale = pixel_norm(s(emb)), shift = pixel_norm(b(emb)) (A11, see scm_kernels.nn.AdaptiveGroupNorm).

Derivatives: loss.backward(), torch.func.jvp and torch.autograd.forward_ad dual tensors, w.r.t. x,
weight, bias, scale and shift, also deep inside a model that is JVP'ed as a whole. Backward and
JVP are deterministic (fixed reduction orders, no atomics). Statistics and arithmetic are fp32;
y has x's dtype; gradients come back in each argument's own dtype. A backward that is itself
differentiated (create_graph=True double backward, torch.func.grad of grad, jvp over grad for
Hessian-vector products, e.g. a gradient penalty) runs (A30) in differentiable plain PyTorch
instead of the kernel (function.reference_backward): exact second derivatives.

Layouts: contiguous NCHW and channels_last (NHWC / NDHWC, or (N, L, C) memory for 1-D) inputs,
and batch slices of them, run without copies and give outputs in the same layout. Other strides
are copied once.
"""

from __future__ import annotations

import torch

from scm_kernels import _autograd, _checks
from scm_kernels import backend as _backend
from scm_kernels.group_norm import reference
from scm_kernels.group_norm.function import GroupNormFunction, dense, forward_kernel

_GroupNormTraceable = _autograd.traceable(GroupNormFunction)  # the Function as torch.compile traces it

OP = "scm_kernels.group_norm"
ACTIVATIONS = (None, "silu")

__all__ = ["group_norm", "GroupNormFunction", "reference"]


def _param(v, name: str, x: torch.Tensor, shape: tuple) -> torch.Tensor | None:
    """A per-channel (C,) or per-(sample, channel) (N, C) tensor: checked and returned as given.
    (Messages are formatted only on error: this runs four times per call, for calls of a few µs.)"""
    if v is None:
        return None
    _checks.tensor(v, name, OP)
    if v.dtype is not x.dtype and v.dtype is not torch.float32:
        raise TypeError(f"{OP}: {name} must have x's dtype ({x.dtype}) or torch.float32, got {v.dtype}")
    if v.device != x.device:
        raise ValueError(f"{OP}: {name} is on {v.device} but x is on {x.device}; all tensors must be on one device")
    ok = v.shape == shape
    if len(shape) == 2 and not ok:  # (N, C, 1, ..., 1) is accepted for the modulation
        ok = v.dim() == x.dim() and v.shape[:2] == shape and all(s == 1 for s in v.shape[2:])
    if not ok:
        N, C = shape[0], shape[-1]
        allowed = f"({C},)" if len(shape) == 1 else f"({N}, {C}) or ({N}, {C}, 1, ...)"
        raise ValueError(f"{OP}: {name} must have shape {allowed}, got {tuple(v.shape)}")
    return v


def _f32(v: torch.Tensor | None, shape2: tuple | None) -> torch.Tensor | None:
    """v as float32 (a differentiable cast; v itself when it already is), (N, C) modulation as 2-D."""
    if v is None:
        return None
    if shape2 is not None and v.dim() != 2:
        v = v.reshape(shape2)
    return v if v.dtype is torch.float32 else v.to(torch.float32)


def _needs_autograd(*tensors) -> bool:
    """True when the call must go through the autograd.Function: something requires grad, a
    forward-AD level is open (dual tensors may carry tangents), or a functorch transform is active."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return True
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    return torch._C._are_functorch_transforms_active()


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, *, scale: torch.Tensor | None = None,
               shift: torch.Tensor | None = None, activation: str | None = None,
               backend: str | None = None) -> torch.Tensor:
    """y = act((GroupNorm(x) * weight + bias) * scale + shift) (A28), x's shape, dtype and layout.

    Args:
        x: (N, C, *spatial) with 1 to 3 spatial dims, float32/float16/bfloat16 (float64 for tests).
        num_groups: G, an int >= 1 dividing C.
        weight, bias: (C,) affine parameters gamma, beta of the norm (None: 1 and 0); x's dtype or
            float32.
        eps: > 0, added to the variance.
        scale, shift: (N, C) (or (N, C, 1, ..., 1)) modulation s, b broadcast over the spatial dims
            (None: 1 and 0); x's dtype or float32. Classic AdaGN: scale = 1 + s(emb).
        activation: None or "silu".
        backend: None (automatic), "triton", "cuda", "cpu" or "reference" (see scm_kernels.backend).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{OP}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _checks.FLOAT_DTYPES_64:
        raise TypeError(f"{OP}: x must have dtype in (float32, float16, bfloat16, float64), got {x.dtype}")
    if not 3 <= x.dim() <= 5:
        raise ValueError(f"{OP}: x must have shape (N, C, *spatial) with 1 to 3 spatial dims, got shape "
                         f"{tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{OP}: x must not be empty (every dim >= 1), got shape {tuple(x.shape)}")
    N, C = x.shape[0], x.shape[1]
    G = _checks.integer(num_groups, "num_groups", OP, min_value=1)
    if C % G:
        raise ValueError(f"{OP}: num_groups must divide the channels C = {C}, got num_groups = {G}")
    eps = _checks.number(eps, "eps", OP, positive=True)
    activation = _checks.choice(activation, "activation", OP, ACTIVATIONS)
    weight = _param(weight, "weight", x, (C,))
    bias = _param(bias, "bias", x, (C,))
    scale = _param(scale, "scale", x, (N, C))
    shift = _param(shift, "shift", x, (N, C))

    name = _backend.select(x.device, backend, op=OP)
    if name == "reference":
        return reference.group_norm(x, G, weight, bias, eps, scale, shift, activation)
    if name == "triton" and x[0].numel() >= 2**31:
        raise ValueError(f"{OP}: backend 'triton' needs fewer than 2^31 elements per sample, got {x[0].numel()}")

    # Kernel backends: per-channel operands as float32 (differentiable casts; no-ops when already
    # float32), the modulation as (N, C).
    w32, b32, s32, sh32 = _f32(weight, None), _f32(bias, None), _f32(scale, (N, C)), _f32(shift, (N, C))
    xd = dense(x)
    silu = activation == "silu"
    if not _needs_autograd(xd, w32, b32, s32, sh32):
        return forward_kernel(xd, w32, b32, s32, sh32, G, eps, silu, name)[0]
    y, _, _ = _autograd.apply(GroupNormFunction, _GroupNormTraceable, xd, w32, b32, s32, sh32, G, eps, silu, name)
    return y
