"""autograd.Function of the sCM loss (A14-A17) over the kernel backends.

Inputs of `ScmLossFunction.apply`:
    F        (B, ...) the network output, samples dense in memory (scm_kernels._layout.dense_base);
             the only tensor input with a gradient besides logvar
    logvar   (B,) float32 or None (the caller's .reshape(B).to(float32) carries the gradient back to
             the user's dtype and shape)
    J, x_t, dxt_dt, F_minus   (B, D) row views in F's inner layout (F_minus None: F^- = F.detach());
             stop-gradient by definition (theta^- of Algorithm 1): no gradient, no tangent
    t        (B,) float32, stop-gradient
Outputs: loss (B,) f32, and the per-sample statistics gnorm = ||g||_2 (A16) and sqerr =
||F - F^- - g^||^2 (A17), non-differentiable, saved so that neither backward nor jvp redoes a
reduction over D for them.

Derivatives (w = exp(-logvar), 1 without logvar; e = F - F^- - g^; g^ does not depend on F because
F^- is stop-gradient):
    dL/dF       = grad * 2 w / D * e                       (kernel: scm_loss_backward)
    dL/dlogvar  = grad * (1 - w / D * sqerr)               (here, on (B,) tensors)
    Ldot        = 2 w / D * sum(e * Fdot) + (1 - w / D * sqerr) * logvar_dot   (kernel: scm_loss_jvp)
A backward that is itself differentiated (double backward, torch.func.grad of grad, jvp over grad)
computes dL/dF and dL/dlogvar in differentiable PyTorch instead (reference_backward).
"""

from __future__ import annotations

import torch

from scm_kernels import _layout, backend
from scm_kernels._autograd import backward_is_differentiated
from scm_kernels._launch import eager_fast
from scm_kernels.scm_loss import reference
from scm_kernels.scm_loss import triton_kernels  # noqa: F401  (registers torch.ops.scm_triton.*)


def _ops(name: str):
    return getattr(torch.ops.scm, name)


# backend name -> launcher; the C++/CUDA ops dispatch on the tensors' device.
_T_FWD = eager_fast(triton_kernels.scm_loss_fwd)
_T_BWD = eager_fast(triton_kernels.scm_loss_bwd)
_T_JVP = eager_fast(triton_kernels.scm_loss_jvp)
LAUNCH = {
    "triton": _T_FWD,
    "cpu": lambda *a: _ops("scm_loss")(*a),
    "cuda": lambda *a: _ops("scm_loss")(*a),
}
BACKWARD = {
    "triton": _T_BWD,
    "cpu": lambda *a: _ops("scm_loss_backward")(*a),
    "cuda": lambda *a: _ops("scm_loss_backward")(*a),
}
JVP = {
    "triton": _T_JVP,
    "cpu": lambda *a: _ops("scm_loss_jvp")(*a),
    "cuda": lambda *a: _ops("scm_loss_jvp")(*a),
}


def _rows_as(F: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A contiguous (B, D) result viewed with F's shape: sample b, inner element i of F's memory
    order sits at b * D + i, which is F's inner layout with the samples packed (no copy)."""
    strides = list(F.stride())
    strides[0] = rows.shape[1]
    return rows.as_strided(F.shape, strides)


def _detached(tensors):
    """Saved tensors without their own tangents/graph: the kernels take plain values (under torch.func
    the tensors are wrapped at the transform's level; the dispatcher unwraps detached ones)."""
    return tuple(x.detach() if x is not None else None for x in tensors)


def reference_backward(grad_loss, F, logvar, J, x_t, dxt_dt, t, F_minus, sigma_d, r, c):
    """(dL/dF, dL/dlogvar) of (A14)-(A17) in differentiable plain PyTorch, for a backward that is
    itself differentiated: autograd and forward-mode AD see every operation. The operands are the
    Function's (F dense, the others (B, D) rows in F's inner layout); computed in fp32 (fp64 for
    fp64 inputs), dF comes back in F's dtype, shape and layout, dlogvar in fp32 (None without
    logvar). g^ is built from stop-gradient operands only (F^- = F.detach() when F_minus is None)."""
    f = torch.promote_types(F.dtype, torch.float32)
    Fr = _layout.as_rows(F).to(f)
    Fm = (Fr if F_minus is None else F_minus.to(f)).detach()
    stop = (x.detach().to(f) for x in (J, x_t, dxt_dt))
    g_hat = reference.normalized_tangent(Fm, *stop, t.detach().to(f)[:, None], sigma_d, r, c)
    e = Fr - Fm - g_hat
    D = e.shape[1]
    w = torch.exp(-logvar.to(f)) if logvar is not None else torch.ones_like(e[:, 0])
    gl = grad_loss.to(f)
    dF = _rows_as(F, ((2.0 / D) * gl * w)[:, None] * e).to(F.dtype)
    dlv = None if logvar is None else (gl * (1.0 - w / D * (e * e).sum(1))).to(logvar.dtype)
    return dF, dlv


class ScmLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(F, logvar, J, x_t, dxt_dt, t, F_minus, sigma_d, r, c, name):
        return LAUNCH[name](_layout.as_rows(F), J, x_t, dxt_dt, t, logvar, F_minus, sigma_d, r, c)

    @staticmethod
    def setup_context(ctx, inputs, output):
        F, logvar, J, x_t, dxt_dt, t, F_minus, sigma_d, r, c, name = inputs
        _, gnorm, sqerr = output
        ctx.mark_non_differentiable(gnorm, sqerr)
        saved = (F, logvar, J, x_t, dxt_dt, t, F_minus, gnorm, sqerr)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        ctx.consts = (float(sigma_d), float(r), float(c), name)

    @staticmethod
    def backward(ctx, grad_loss, _grad_gnorm, _grad_sqerr):
        if backward_is_differentiated(ctx, grad_loss):
            F, logvar, J, x_t, dxt_dt, t, F_minus, _, _ = ctx.saved_tensors
            sigma_d, r, c, _ = ctx.consts
            dF, dlv = reference_backward(grad_loss, F, logvar, J, x_t, dxt_dt, t, F_minus, sigma_d, r, c)
            need = ctx.needs_input_grad
            return (dF if need[0] else None), (dlv if need[1] else None), *(None,) * 9
        F, logvar, J, x_t, dxt_dt, t, F_minus, gnorm, sqerr = _detached(ctx.saved_tensors)
        sigma_d, r, c, name = ctx.consts
        D = _layout.sample_numel(F)
        grad_loss = grad_loss.detach().to(torch.float32)
        dF = dlv = None
        if ctx.needs_input_grad[0]:
            rows = BACKWARD[name](grad_loss, _layout.as_rows(F), J, x_t, dxt_dt, t, logvar, F_minus, gnorm,
                                  sigma_d, r, c)
            dF = _rows_as(F, rows)
        if logvar is not None and ctx.needs_input_grad[1]:
            dlv = grad_loss * (1.0 - torch.exp(-logvar) * sqerr / D)
        return dF, dlv, None, None, None, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, F_dot, lv_dot, *_):
        F, logvar, J, x_t, dxt_dt, t, F_minus, gnorm, sqerr = _detached(ctx.saved_tensors)
        sigma_d, r, c, name = ctx.consts
        D = _layout.sample_numel(F)
        w = torch.exp(-logvar) if logvar is not None else torch.ones_like(sqerr)
        loss_dot = torch.zeros_like(sqerr)
        if F_dot is not None:
            Fd = _layout.as_rows(_layout.matched(F, F_dot))
            dot = JVP[name](Fd, _layout.as_rows(F), J, x_t, dxt_dt, t, F_minus, gnorm, sigma_d, r, c)
            loss_dot = loss_dot + 2.0 * w / D * dot
        if logvar is not None and lv_dot is not None:
            loss_dot = loss_dot + (1.0 - w / D * sqerr) * lv_dot
        return loss_dot, None, None


# Fake (meta) implementations so that torch.compile can trace the schema ops.
if backend.extension_available():

    @torch.library.register_fake("scm::scm_loss")
    def _scm_loss_fake(F, J, x_t, dxt_dt, t, logvar, F_minus, sigma_d, r, c):
        B = F.shape[0]
        return tuple(F.new_empty((B,), dtype=torch.float32) for _ in range(3))

    @torch.library.register_fake("scm::scm_loss_backward")
    def _scm_loss_backward_fake(grad_loss, F, J, x_t, dxt_dt, t, logvar, F_minus, gnorm, sigma_d, r, c):
        return F.new_empty(F.shape, dtype=F.dtype)

    @torch.library.register_fake("scm::scm_loss_jvp")
    def _scm_loss_jvp_fake(F_dot, F, J, x_t, dxt_dt, t, F_minus, gnorm, sigma_d, r, c):
        return F.new_empty((F.shape[0],), dtype=torch.float32)
