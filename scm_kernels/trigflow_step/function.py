"""Autograd Function of trigflow_step (A23): forward, backward and forward-mode JVP.

For fixed times the step is linear in (x_t, F, eps):  out = cx x_t + cf F + ce eps  (scm::trig_coef)
  backward:  dx_t = cx g, dF = cf g (one fused kernel), d eps = ce g,
             dt = sum(g * dout/dt), ds = sum(g * dout/ds) per sample (plain torch, rarely needed);
  jvp:       out' = cx x_t' + cf F' + ce eps'   (the same kernel on the tangents; noise mode 3 when
             eps has no tangent or is Philox-drawn), plus t' dout/dt + s' dout/ds.
  no renoise: cx = cos t, cf = -sigma_d sin t           -> dcx/dt = -sin t, dcf/dt = -sigma_d cos t
  renoise:    cx = cos s cos t, cf = -sigma_d cos s sin t, ce = sigma_d sin s
              dcx/dt = -cos s sin t, dcf/dt = -sigma_d cos s cos t,
              dcx/ds = -sin s cos t, dcf/ds = sigma_d sin s sin t, dce/ds = sigma_d cos s.
The uint8 output is not differentiable.
"""

from __future__ import annotations

import math

import torch

from scm_kernels import _autograd, _layout, backend
from scm_kernels.trigflow_step import triton_kernels

# noise_mode of the schema op
DENOISE, NOISE, PHILOX, ZERO_NOISE = 0, 1, 2, 3


def _ext_forward(*args):
    return torch.ops.scm.trigflow_step(*args)


def _ext_backward(*args):
    return torch.ops.scm.trigflow_step_backward(*args)


LAUNCH = {"triton": triton_kernels.trigflow_step, "cpu": _ext_forward, "cuda": _ext_forward}
BACKWARD = {"triton": triton_kernels.trigflow_step_backward, "cpu": _ext_backward, "cuda": _ext_backward}


# ---------------------------------------------------------------------------------------------
# Layout helpers: the kernels see (B, D) rows; callers see x_t's shape with its inner layout
# ---------------------------------------------------------------------------------------------
def _rows(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else _layout.as_rows(x)


def _packed_strides(ref: torch.Tensor) -> tuple:
    return (_layout.sample_numel(ref),) + tuple(ref.stride()[1:])


def _unrows(out2d: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The packed (B, D) result seen with ref's shape and inner layout. A fresh tensor on the same
    storage (not an autograd view), so that callers may modify it in place."""
    if torch.compiler.is_compiling():  # functionalization handles views; set_ does not trace
        return out2d.as_strided(ref.shape, _packed_strides(ref))
    out = out2d.new_empty(0)
    return out.set_(out2d.untyped_storage(), out2d.storage_offset(), ref.shape, _packed_strides(ref))


def _nd_in(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """x (shape of ref) in ref's inner layout: itself, or the one copy if its layout differs."""
    if x.shape == ref.shape and _layout.inner_signature(x) == _layout.inner_signature(ref):
        return x
    packed = torch.empty_strided(ref.shape, _packed_strides(ref), dtype=x.dtype, device=x.device)
    packed.copy_(x)
    return packed


def _zeros_nd(ref: torch.Tensor, dtype) -> torch.Tensor:
    """Zeros shaped like ref in its inner layout with batch stride 0: one sample of storage."""
    z = torch.empty_strided((1,) + tuple(ref.shape[1:]), _packed_strides(ref), dtype=dtype, device=ref.device)
    return z.zero_().expand(ref.shape)


def _unrows_t(x2d: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A (B, D) packed tensor seen in ref's shape and inner layout (differentiable view)."""
    return x2d.as_strided(ref.shape, _packed_strides(ref))


def philox_rows(name: str, seed: int, ref: torch.Tensor) -> torch.Tensor:
    """The (B, D) float32 Philox normals of `seed` for samples shaped like ref, as the kernels draw
    them: a PHILOX step with x_t = F = 0, sigma_d = 1 and t_next = float32(pi/2) (its sine is 1
    exactly in fp32). Through the Function, so that it also runs under torch.func transforms."""
    B = ref.shape[0]
    zeros = _zeros_nd(ref, torch.float32)
    t = torch.zeros((1,), dtype=torch.float32, device=ref.device).expand(B)
    s = torch.full((1,), math.pi / 2, dtype=torch.float32, device=ref.device).expand(B)
    return _rows(TrigflowStepFunction.apply(zeros, zeros, t, s, None, 1.0, seed, PHILOX, False, name))


def _coef_derivs(t: torch.Tensor, s: torch.Tensor | None, sigma_d: float):
    """Per-sample (cx, cf, ce) and their derivatives w.r.t. t and s, as (B, 1) float32 columns."""
    ct, st = torch.cos(t)[:, None], torch.sin(t)[:, None]
    if s is None:
        zero = torch.zeros_like(ct)
        return dict(cx=ct, cf=-sigma_d * st, ce=zero, cx_t=-st, cf_t=-sigma_d * ct)
    cs, ss = torch.cos(s)[:, None], torch.sin(s)[:, None]
    return dict(cx=cs * ct, cf=-sigma_d * cs * st, ce=sigma_d * ss,
                cx_t=-cs * st, cf_t=-sigma_d * cs * ct,
                cx_s=-ss * ct, cf_s=sigma_d * ss * st, ce_s=sigma_d * cs)


def _acc_dtype(*xs) -> torch.dtype:
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


def _time_grads(g, a, b, e, c, need_t: bool, need_s: bool, acc):
    """Per-sample d/dt and d/ds of sum(g * (cx a + cf b + ce e)) (e may be None)."""
    ga = (g.to(acc) * _rows(a).to(acc)).sum(1)
    gb = (g.to(acc) * _rows(b).to(acc)).sum(1)
    dt = (c["cx_t"][:, 0] * ga + c["cf_t"][:, 0] * gb) if need_t else None
    ds = None
    if need_s:
        ds = c["cx_s"][:, 0] * ga + c["cf_s"][:, 0] * gb
        if e is not None:
            ds = ds + c["ce_s"][:, 0] * (g.to(acc) * e.to(acc)).sum(1)
    return dt, ds


def _time_tangent(a, b, e, c, t_dot, s_dot, acc):
    """(B, D) tangent t' (cx_t a + cf_t b) + s' (cx_s a + cf_s b + ce_s e) (e may be None)."""
    B = a.shape[0]
    a_a = torch.zeros((B, 1), dtype=torch.float32, device=a.device)
    a_b = torch.zeros_like(a_a)
    if t_dot is not None:
        a_a = a_a + c["cx_t"] * t_dot[:, None]
        a_b = a_b + c["cf_t"] * t_dot[:, None]
    if s_dot is not None and "cx_s" in c:
        a_a = a_a + c["cx_s"] * s_dot[:, None]
        a_b = a_b + c["cf_s"] * s_dot[:, None]
    out = a_a.to(acc) * _rows(a).to(acc) + a_b.to(acc) * _rows(b).to(acc)
    if e is not None and s_dot is not None and "ce_s" in c:
        out = out + (c["ce_s"] * s_dot[:, None]).to(acc) * e.to(acc)
    return out


class TrigflowStepFunction(torch.autograd.Function):
    """out = cx x_t + cf F + ce eps. Inputs: x_t, F, noise share one inner layout (x_t's dense base,
    see scm_kernels._layout); t, t_next are (B,) float32; mode is the schema's noise_mode."""

    @staticmethod
    def forward(x_t, F, t, t_next, noise, sigma_d, seed, mode, out_uint8, name):
        out = LAUNCH[name](_rows(x_t), _rows(F), t, t_next, _rows(noise), sigma_d, seed, mode, out_uint8)
        return _unrows(out, x_t)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x_t, F, t, t_next, noise, sigma_d, seed, mode, out_uint8, name = inputs
        ctx.sigma_d, ctx.seed, ctx.mode, ctx.out_uint8, ctx.name = sigma_d, seed, mode, out_uint8, name
        ctx.x_dtype, ctx.F_dtype = x_t.dtype, F.dtype
        ctx.layout = torch.empty_strided(x_t.shape, _packed_strides(x_t), dtype=torch.uint8, device="meta")
        if out_uint8:
            ctx.mark_non_differentiable(output)
            return
        needs_time = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        # x_t, F, noise only when a time gradient needs them: x_t / F / noise gradients need the times only
        ctx.save_for_backward(t, t_next, *((x_t, F, noise) if needs_time else (None, None, None)))
        ctx.save_for_forward(x_t, F, noise, t, t_next)

    @staticmethod
    def backward(ctx, grad):
        out = [None] * 10
        if ctx.out_uint8:
            return tuple(out)
        t, s, x_t, F, noise = ctx.saved_tensors
        need_x, need_F, need_t, need_s, need_n = ctx.needs_input_grad[:5]
        renoise = ctx.mode != DENOISE
        g = _nd_in(grad, ctx.layout)
        if need_x or need_F:
            out[0], out[1] = _autograd.apply(TrigflowStepBackwardFunction, TrigflowStepBackwardFunction,
                g, t, s if renoise else None, ctx.sigma_d, renoise, need_x, need_F, ctx.x_dtype, ctx.F_dtype,
                ctx.name)
        if need_n or need_t or need_s:
            c = _coef_derivs(t, s if renoise else None, ctx.sigma_d)
            if need_n:
                ce = c["ce"].reshape((g.shape[0],) + (1,) * (g.dim() - 1))
                out[4] = (g * ce).to(noise.dtype if noise is not None else g.dtype)
            if need_t or need_s:
                eps = None
                if need_s and ctx.mode == NOISE:
                    eps = _rows(noise)
                elif need_s and ctx.mode == PHILOX:
                    eps = philox_rows(ctx.name, ctx.seed, g)
                out[2], out[3] = _time_grads(_rows(g), x_t, F, eps, c, need_t, need_s, _acc_dtype(x_t, F))
        return tuple(out)

    @staticmethod
    def jvp(ctx, x_dot, F_dot, t_dot, s_dot, n_dot, *_):
        if ctx.out_uint8:
            return None
        x_t, F, noise, t, s = ctx.saved_tensors
        # The tangent of the linear part is the same op on the tangents, applied through the Function
        # so that functorch unwraps the tensors and higher-order derivatives compose.
        xd = _nd_in(x_dot, x_t) if x_dot is not None else _zeros_nd(x_t, x_t.dtype)
        fd = _nd_in(F_dot, x_t) if F_dot is not None else _zeros_nd(x_t, F.dtype)
        mode, nd = ctx.mode, None
        if mode != DENOISE:
            if mode == NOISE and n_dot is not None:
                nd = _nd_in(n_dot, x_t)
            else:
                mode = ZERO_NOISE
        out = TrigflowStepFunction.apply(xd, fd, t, s, nd, ctx.sigma_d, 0, mode, False, ctx.name)
        if t_dot is None and (s_dot is None or ctx.mode == DENOISE):
            return out
        renoise = ctx.mode != DENOISE
        c = _coef_derivs(t, s if renoise else None, ctx.sigma_d)
        eps = None
        if s_dot is not None and ctx.mode == NOISE:
            eps = _rows(noise)
        elif s_dot is not None and ctx.mode == PHILOX:
            eps = philox_rows(ctx.name, ctx.seed, x_t)
        extra = _time_tangent(x_t, F, eps, c, t_dot, s_dot, _acc_dtype(x_t, F))
        return (out + _unrows_t(extra, x_t)).to(out.dtype)


class TrigflowStepBackwardFunction(torch.autograd.Function):
    """(dx_t, dF) = (cx g, cf g): the fused backward kernel, itself differentiable (its transpose
    is the forward op on (ddx, ddF) with zero noise)."""

    @staticmethod
    def forward(g, t, s, sigma_d, renoise, need_x, need_F, x_dtype, F_dtype, name):
        dx, dF = BACKWARD[name](_rows(g), t, s, sigma_d, renoise, need_x, need_F, x_dtype, F_dtype)
        return (_unrows(dx, g) if need_x else None), (_unrows(dF, g) if need_F else None)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, t, s, sigma_d, renoise, need_x, need_F, x_dtype, F_dtype, name = inputs
        ctx.sigma_d, ctx.renoise, ctx.need_x, ctx.need_F, ctx.name = sigma_d, renoise, need_x, need_F, name
        ctx.x_dtype, ctx.F_dtype = x_dtype, F_dtype
        ctx.save_for_backward(g, t, s)
        ctx.save_for_forward(g, t, s)

    @staticmethod
    def backward(ctx, gdx, gdF):
        g, t, s = ctx.saved_tensors
        out = [None] * 10
        a = _nd_in(gdx, g) if (ctx.need_x and gdx is not None) else _zeros_nd(g, ctx.x_dtype)
        b = _nd_in(gdF, g) if (ctx.need_F and gdF is not None) else _zeros_nd(g, ctx.F_dtype)
        if ctx.needs_input_grad[0]:
            mode = ZERO_NOISE if ctx.renoise else DENOISE
            out[0] = TrigflowStepFunction.apply(a, b, t, s, None, ctx.sigma_d, 0, mode, False, ctx.name).to(g.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            c = _coef_derivs(t, s if ctx.renoise else None, ctx.sigma_d)
            out[1], out[2] = _time_grads(_rows(g), a, b, None, c, ctx.needs_input_grad[1],
                                         ctx.needs_input_grad[2], _acc_dtype(g, a, b))
        return tuple(out)

    @staticmethod
    def jvp(ctx, g_dot, t_dot, s_dot, *_):
        g, t, s = ctx.saved_tensors
        if g_dot is not None:
            dx, dF = TrigflowStepBackwardFunction.apply(_nd_in(g_dot, g), t, s, ctx.sigma_d, ctx.renoise,
                                                        ctx.need_x, ctx.need_F, ctx.x_dtype, ctx.F_dtype, ctx.name)
        else:
            dx = _zeros_nd(g, ctx.x_dtype) if ctx.need_x else None
            dF = _zeros_nd(g, ctx.F_dtype) if ctx.need_F else None
        if t_dot is not None or (s_dot is not None and ctx.renoise):
            c = _coef_derivs(t, s if ctx.renoise else None, ctx.sigma_d)
            B = g.shape[0]
            acc = _acc_dtype(g)
            gr = _rows(g).to(acc)
            zero = torch.zeros((B, 1), dtype=torch.float32, device=g.device)
            kx = (c["cx_t"] * t_dot[:, None] if t_dot is not None else zero)
            kf = (c["cf_t"] * t_dot[:, None] if t_dot is not None else zero)
            if s_dot is not None and ctx.renoise:
                kx = kx + c["cx_s"] * s_dot[:, None]
                kf = kf + c["cf_s"] * s_dot[:, None]
            if ctx.need_x:
                dx = (dx + _unrows_t(kx.to(acc) * gr, g)).to(ctx.x_dtype)
            if ctx.need_F:
                dF = (dF + _unrows_t(kf.to(acc) * gr, g)).to(ctx.F_dtype)
        return dx, dF


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations of the schema ops, for torch.compile
# ---------------------------------------------------------------------------------------------
if backend.extension_available():

    @torch.library.register_fake("scm::trigflow_step")
    def _trigflow_step_fake(x_t, F, t, t_next, noise, sigma_d, seed, noise_mode, out_uint8):
        return x_t.new_empty(x_t.shape, dtype=torch.uint8 if out_uint8 else x_t.dtype)

    @torch.library.register_fake("scm::trigflow_step_backward")
    def _trigflow_step_backward_fake(grad, t, t_next, sigma_d, renoise, need_x, need_F, x_dtype, F_dtype):
        dx = grad.new_empty(grad.shape, dtype=x_dtype) if need_x else None
        dF = grad.new_empty(grad.shape, dtype=F_dtype) if need_F else None
        return dx, dF
