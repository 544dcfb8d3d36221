"""autograd.Function of the time embedding (A10) over the kernel backends, and the fake (meta)
implementations of its three torch.ops.scm schemas.

Inputs of the Function are already fp32: t (B,) and freqs (half,) or None (the public function
converts them with differentiable .to() calls, so gradients and tangents flow back to the caller's
dtypes). Derivatives (see triton_kernels.py for the formulas):
  backward -> time_embedding_backward (dt, and dfreqs when freqs requires grad; fixed-order sums)
  jvp      -> time_embedding_jvp (tangents of t and freqs, either may be absent)
A backward that is itself differentiated (double backward, torch.func.grad of grad, jvp over grad)
runs in differentiable PyTorch instead (reference_backward).
"""

from __future__ import annotations

import math

import torch

from scm_kernels import backend as _backend
from scm_kernels._autograd import backward_is_differentiated
from scm_kernels._launch import KernelTable
from scm_kernels.time_embedding import reference


kernels = KernelTable("time_embedding", "scm_kernels.time_embedding.triton_kernels")


def _detached(*tensors):
    """Saved tensors without their own tangents/graph: the kernels take plain values (under torch.func
    the tensors are wrapped at the transform's level; the dispatcher unwraps detached ones)."""
    return tuple(x.detach() if x is not None else None for x in tensors)


def _rows_f32(grad: torch.Tensor) -> torch.Tensor:
    """The upstream gradient as fp32 (B, dim) with inner stride 1 (what the kernels read)."""
    if grad.dtype != torch.float32:
        grad = grad.float()
    if grad.stride(1) != 1 and grad.size(1) > 1:
        grad = grad.contiguous()
    return grad


def reference_backward(grad, t, freqs, dim, max_period, time_scale):
    """(dt, dfreqs) of (A10) in differentiable plain PyTorch (fp32), for a backward that is itself
    differentiated: with theta_bk = (s t_b) omega_k and emb = [cos theta | sin theta | 0],
    dtheta = g_sin cos(theta) - g_cos sin(theta), dt_b = s sum_k dtheta_bk omega_k and, with
    frequencies (omega = 2 pi f), df_k = 2 pi sum_b dtheta_bk s t_b; dfreqs None without them."""
    half = dim // 2
    w = reference.omega(dim, kind="fourier" if freqs is not None else "positional", max_period=max_period,
                        freqs=freqs, device=t.device)
    st = time_scale * t
    theta = st[:, None] * w[None, :]
    g = grad.to(torch.float32)
    dtheta = g[:, half:2 * half] * torch.cos(theta) - g[:, :half] * torch.sin(theta)
    dt = time_scale * (dtheta * w[None, :]).sum(1)
    dfreqs = None if freqs is None else (2.0 * math.pi) * (dtheta * st[:, None]).sum(0)
    return dt, dfreqs


class TimeEmbeddingFunction(torch.autograd.Function):
    """emb = time_embedding(t, freqs) for fp32 t (B,) and freqs (half,) or None (A10)."""

    @staticmethod
    def forward(t, freqs, dim, max_period, time_scale, name):
        return kernels(name)[0](t, dim, max_period, time_scale, freqs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        t, freqs, dim, max_period, time_scale, name = inputs
        ctx.args = (dim, max_period, time_scale, name)
        ctx.has_freqs = freqs is not None
        ctx.save_for_backward(t, freqs)
        ctx.save_for_forward(t, freqs)

    @staticmethod
    def backward(ctx, grad):
        dim, max_period, time_scale, name = ctx.args
        need_t, need_f = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and ctx.has_freqs
        if not (need_t or need_f):
            return None, None, None, None, None, None
        if backward_is_differentiated(ctx, grad):
            dt, dfreqs = reference_backward(grad, *ctx.saved_tensors, dim, max_period, time_scale)
            return (dt if need_t else None), (dfreqs if need_f else None), None, None, None, None
        t, freqs = _detached(*ctx.saved_tensors)
        dt, dfreqs = kernels(name)[2](_rows_f32(grad.detach()), t, dim, max_period, time_scale, freqs, need_f)
        return (dt if need_t else None), (dfreqs if need_f else None), None, None, None, None

    @staticmethod
    def jvp(ctx, t_dot, freqs_dot, *_):
        dim, max_period, time_scale, name = ctx.args
        t, freqs = _detached(*ctx.saved_tensors)
        if t_dot is not None and t_dot.dtype != torch.float32:
            t_dot = t_dot.float()
        if freqs_dot is not None and freqs_dot.dtype != torch.float32:
            freqs_dot = freqs_dot.float()
        return kernels(name)[1](t, t_dot, dim, max_period, time_scale, freqs, freqs_dot)


# ---------------------------------------------------------------------------------------------
# Fake implementations, so that torch.compile can trace the ops.
# ---------------------------------------------------------------------------------------------
if _backend.extension_available():

    @torch.library.register_fake("scm::time_embedding")
    def _fake_time_embedding(t, dim, max_period, time_scale, freqs):
        return t.new_empty((t.shape[0], dim), dtype=torch.float32)

    @torch.library.register_fake("scm::time_embedding_jvp")
    def _fake_time_embedding_jvp(t, t_dot, dim, max_period, time_scale, freqs, freqs_dot):
        return t.new_empty((t.shape[0], dim), dtype=torch.float32)

    @torch.library.register_fake("scm::time_embedding_backward")
    def _fake_time_embedding_backward(grad, t, dim, max_period, time_scale, freqs, need_dfreqs):
        n = dim // 2 if (need_dfreqs and freqs is not None) else 0
        return t.new_empty((t.shape[0],), dtype=torch.float32), t.new_empty((n,), dtype=torch.float32)
