"""autograd.Function of the fused GroupNorm (A28-A30) over the kernel backends, the launcher
tables and the fake (meta) implementations of the torch.ops.scm schemas.

Kernels see x as a 3-D (N, C, S) view (S = product of the spatial dims) in one of two layouts:
channels-first (NCHW: stride(2) == 1, each channel a contiguous row of S elements) or channels-last
(NHWC: stride(1) == 1, each spatial position a contiguous row of C channels); the batch stride is
free (batch slices). `ncs_view` builds that view without a copy for contiguous, channels_last and
batch-sliced tensors; other layouts are copied once. Outputs come back in x's layout.

Inputs of `GroupNormFunction.apply`: x (N, C, *spatial) with samples dense in memory; weight, bias
(C,) float32 or None; scale, shift (N, C) float32 or None (the public function converts them with
differentiable .to() calls, so gradients and tangents flow back to the callers' dtypes);
num_groups, eps, silu (bool), backend name. Outputs: y (x's shape, dtype and layout) and the
per-group statistics mean, rstd (N, G) float32, non-differentiable (saved for backward and jvp).

Derivatives (per sample n, group g of M elements; A_c = gamma_c s_{n,c}):
    backward (A30)  kernel: dx, and P1_{n,c} = sum_spatial da * x^, P2_{n,c} = sum_spatial da
                    here:   dgamma_c = sum_n s_{n,c} P1_{n,c},  dbeta_c = sum_n s_{n,c} P2_{n,c},
                            dscale_{n,c} = gamma_c P1 + beta_c P2,  dshift_{n,c} = P2
    jvp (A29)       kernel: y_dot from the tangents of x, gamma, beta, scale, shift (any may be None)
"""

from __future__ import annotations

import math

import torch

from scm_kernels import backend as _backend
from scm_kernels._autograd import backward_is_differentiated
from scm_kernels._launch import KernelTable


# ---------------------------------------------------------------------------------------------
# (N, C, S) views
# ---------------------------------------------------------------------------------------------
def _contig_strides(sizes) -> list[int]:
    st, acc = [], 1
    for s in reversed(sizes):
        st.append(acc)
        acc *= s
    return st[::-1]


def nd_strides(shape, channels_last: bool) -> list[int]:
    """Strides of a packed tensor of `shape` (N, C, *spatial) in the given layout."""
    C, sp = shape[1], list(shape[2:])
    S = math.prod(sp)
    if channels_last:
        return [C * S, 1] + [C * s for s in _contig_strides(sp)]
    return [C * S, S] + _contig_strides(sp)


def layout_of(x: torch.Tensor) -> bool | None:
    """False for channels-first, True for channels-last, None for any other inner layout.

    Only dims of size > 1 constrain the layout; a tensor that is both (C == 1 or S == 1) counts
    as channels-first."""
    if x.is_contiguous():  # the common case, without building strides (nd_strides(shape, False))
        return False
    shape, strides = x.shape, x.stride()
    for cl in (False, True):
        want = nd_strides(shape, cl)
        if all(shape[d] == 1 or strides[d] == want[d] for d in range(1, x.dim())):
            return cl
    return None


def dense(x: torch.Tensor) -> torch.Tensor:
    """x itself when it has a kernel layout (any batch stride), else a contiguous copy."""
    return x if layout_of(x) is not None else x.contiguous()


def ncs_view(x: torch.Tensor) -> torch.Tensor:
    """The (N, C, S) view of a tensor with a kernel layout (see layout_of), without a copy."""
    cl = layout_of(x)
    N, C = x.shape[0], x.shape[1]
    S = math.prod(x.shape[2:])
    sn = x.stride(0) if N > 1 else C * S
    return x.as_strided((N, C, S), (sn, 1, C) if cl else (sn, S, 1))


def nd_view(y3: torch.Tensor, shape) -> torch.Tensor:
    """A packed (N, C, S) kernel output viewed with the N-d `shape` in its own layout."""
    cl = y3.shape[1] > 1 and y3.stride(1) == 1 and y3.shape[2] > 1
    return y3.as_strided(shape, nd_strides(shape, cl))


def matched(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t (x's shape) in x's layout and dtype: itself when it has them, else one copy."""
    if t.dtype == x.dtype and layout_of(t) is not None and layout_of(t) == layout_of(x):
        return t
    out = torch.empty_strided(x.shape, nd_strides(x.shape, bool(layout_of(x))), dtype=x.dtype, device=x.device)
    return out.copy_(t)


def empty_ncs(x3: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A packed (N, C, S) tensor in x3's layout."""
    N, C, S = x3.shape
    cl = C > 1 and S > 1 and x3.stride(1) == 1
    return torch.empty_strided((N, C, S), (C * S, 1, C) if cl else (C * S, S, 1), dtype=dtype or x3.dtype,
                               device=x3.device)


# ---------------------------------------------------------------------------------------------
# Launchers: backend name -> (forward, jvp, backward), resolved lazily (triton imported on first use)
# ---------------------------------------------------------------------------------------------
kernels = KernelTable("group_norm", "scm_kernels.group_norm.triton_kernels")
LAUNCH, JVP, BACKWARD = kernels.launch, kernels.jvp, kernels.backward


def _detached(tensors):
    """Saved tensors without their own tangents/graph: the kernels take plain values (under
    torch.func the tensors are wrapped at the transform's level; the dispatcher unwraps detached ones)."""
    return tuple(x.detach() if x is not None else None for x in tensors)


def forward_kernel(x, weight, bias, scale, shift, num_groups, eps, silu, name):
    """(y in x's shape and layout, mean, rstd) without autograd."""
    y3, mean, rstd = LAUNCH[name](ncs_view(x), weight, bias, scale, shift, num_groups, eps, silu)
    return nd_view(y3, x.shape), mean, rstd


def reference_backward(grad_y, x, weight, bias, scale, shift, num_groups, eps, silu):
    """(A30) in differentiable plain PyTorch: (dx, dgamma, dbeta, dscale, dshift), None for an absent
    operand, for a backward that is itself differentiated (double backward, forward-over-reverse):
    autograd and forward-mode AD see every operation. In fp32 (fp64 for fp64 inputs); dx comes back in
    x's dtype and shape (contiguous), the others in their operands' dtypes."""
    f = torch.promote_types(x.dtype, torch.float32)
    N, C, G = x.shape[0], x.shape[1], num_groups
    xg = x.to(f).reshape(N, G, -1)
    mu = xg.mean(-1, keepdim=True)
    r = (((xg - mu) ** 2).mean(-1, keepdim=True) + eps).rsqrt()
    xh = ((xg - mu) * r).reshape(N, C, -1)
    gam = weight.to(f)[None, :, None] if weight is not None else None
    bet = bias.to(f)[None, :, None] if bias is not None else None
    s = scale.to(f)[:, :, None] if scale is not None else None
    a = xh * gam if gam is not None else xh
    a = a + bet if bet is not None else a
    a = a * s if s is not None else a
    a = a + shift.to(f)[:, :, None] if shift is not None else a
    da = grad_y.to(f).reshape(N, C, -1)
    if silu:
        sig = torch.sigmoid(a)
        da = da * (sig * (1 + a * (1 - sig)))
    A = da
    A = A * gam if gam is not None else A
    A = A * s if s is not None else A  # dx^ = da gamma s
    dxh, xhg = A.reshape(N, G, -1), xh.reshape(N, G, -1)
    dx = r * (dxh - dxh.mean(-1, keepdim=True) - xhg * (dxh * xhg).mean(-1, keepdim=True))
    p1, p2 = (da * xh).sum(-1), da.sum(-1)  # (N, C): sum da x^, sum da
    sn = scale.to(f) if scale is not None else None
    dw = ((p1 * sn).sum(0) if sn is not None else p1.sum(0)) if weight is not None else None
    db = ((p2 * sn).sum(0) if sn is not None else p2.sum(0)) if bias is not None else None
    ds = None
    if scale is not None:
        ds = p1 * weight.to(f) if weight is not None else p1
        ds = ds + p2 * bias.to(f) if bias is not None else ds
    dsh = p2 if shift is not None else None
    out = [dx.reshape(x.shape).to(x.dtype)]
    for g, p in ((dw, weight), (db, bias), (ds, scale), (dsh, shift)):
        out.append(None if g is None else g.to(p.dtype))
    return tuple(out)


class GroupNormFunction(torch.autograd.Function):
    """y = act((GN(x) gamma + beta) s + b) (A28), backward (A30), jvp (A29); see the module docstring."""

    @staticmethod
    def forward(x, weight, bias, scale, shift, num_groups, eps, silu, name):
        return forward_kernel(x, weight, bias, scale, shift, num_groups, eps, silu, name)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, scale, shift, num_groups, eps, silu, name = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        saved = (x, weight, bias, scale, shift, mean, rstd)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        ctx.consts = (int(num_groups), bool(silu), name, float(eps))

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        G, silu, name, eps = ctx.consts
        need = ctx.needs_input_grad
        if backward_is_differentiated(ctx, grad_y):
            x, weight, bias, scale, shift, _, _ = ctx.saved_tensors
            grads = reference_backward(grad_y, x, weight, bias, scale, shift, G, eps, silu)
            return (*(g if n else None for g, n in zip(grads, need)), None, None, None, None)
        x, weight, bias, scale, shift, mean, rstd = _detached(ctx.saved_tensors)
        dy = matched(x, grad_y.detach())
        dx3, p1, p2 = BACKWARD[name](ncs_view(dy), ncs_view(x), weight, bias, scale, shift, mean, rstd, G, silu)
        dx = nd_view(dx3, x.shape) if need[0] else None
        if dx is not None and x.numel() == x.shape[0] * G:
            # One element per group: x^ = 0 whatever x is, so dx = 0 exactly, where the kernels' dx =
            # r (da A - m1 - x^ m2) leaves the rounding of da A - m1 scaled by r = eps^(-1/2).
            dx = torch.zeros_like(dx)
        dw = db = ds = dsh = None
        if need[1]:  # dgamma_c = sum_n s P1 (A30)
            dw = (p1 * scale).sum(0) if scale is not None else p1.sum(0)
        if need[2]:  # dbeta_c = sum_n s P2
            db = (p2 * scale).sum(0) if scale is not None else p2.sum(0)
        if need[3]:  # ds = sum_spatial da (x^ gamma + beta) = gamma P1 + beta P2
            ds = p1 * weight if weight is not None else p1
            if bias is not None:
                ds = ds + p2 * bias
        if need[4]:  # db = sum_spatial da
            dsh = p2
        return dx, dw, db, ds, dsh, None, None, None, None

    @staticmethod
    def jvp(ctx, x_dot, w_dot, b_dot, s_dot, sh_dot, *_):
        x, weight, bias, scale, shift, mean, rstd = _detached(ctx.saved_tensors)
        G, silu, name, _ = ctx.consts
        xd3 = ncs_view(matched(x, x_dot)) if x_dot is not None else None
        yd3 = JVP[name](ncs_view(x), xd3, weight, bias, scale, shift, w_dot, b_dot, s_dot, sh_dot, mean, rstd,
                        G, silu)
        return nd_view(yd3, x.shape), None, None


# ---------------------------------------------------------------------------------------------
# Fake implementations, so that torch.compile can trace the schema ops.
# ---------------------------------------------------------------------------------------------
def fake_forward(x, weight, bias, scale, shift, num_groups, eps, silu):
    N = x.shape[0]
    stats = x.new_empty((N, num_groups), dtype=torch.float32)
    return empty_ncs(x), stats, torch.empty_like(stats)


def fake_jvp(x, x_dot, weight, bias, scale, shift, weight_dot, bias_dot, scale_dot, shift_dot, mean, rstd,
             num_groups, silu):
    return empty_ncs(x)


def fake_backward(grad_y, x, weight, bias, scale, shift, mean, rstd, num_groups, silu):
    N, C = x.shape[0], x.shape[1]
    p = x.new_empty((N, C), dtype=torch.float32)
    return empty_ncs(x), p, torch.empty_like(p)


def _schema_registered(op: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(op, "")
        return True
    except RuntimeError:
        return False


if _backend.extension_available() and _schema_registered("scm::group_norm"):
    torch.library.register_fake("scm::group_norm")(fake_forward)
    torch.library.register_fake("scm::group_norm_jvp")(fake_jvp)
    torch.library.register_fake("scm::group_norm_backward")(fake_backward)
