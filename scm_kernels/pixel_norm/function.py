"""autograd.Function of the pixel norm (A11) over the kernel backends, the launcher tables and the
fake (meta) implementations of the torch.ops.scm schemas.

Kernels see a as a 3-D (O, C, I) view reduced over C: O = product of the dims before `dim`,
I = product of the dims after it, either contiguous (stride(2) == 1) or "rows" (I == 1, each row of
C contiguous: a channels-last tensor normalized over its channels, or an (N, C) embedding).
`ocl_view` builds that view without a copy for contiguous tensors and tensors whose reduced dim is
the innermost in memory (channels_last); other layouts are copied once. Outputs come back in that
layout.

    r = (mean_c a^2 + eps)^(-1/2),  y = a r                         (A11)
    y_dot = r (a_dot - a r^2 mean_c(a a_dot)) = r (a_dot - y mean_c(y a_dot))
    da    = r (dy - a r^2 mean_c(a dy))          (the Jacobian is symmetric)
The forward returns r (O, I) float32 as a non-differentiable output, saved for backward and jvp.
A backward that is itself differentiated (double backward, torch.func.grad of grad, jvp over grad)
runs the da formula in differentiable PyTorch (reference_backward) instead of the kernel.
"""

from __future__ import annotations

import math

import torch

from scm_kernels import backend as _backend
from scm_kernels._autograd import backward_is_differentiated
from scm_kernels._launch import KernelTable


class View:
    """How a tensor of `shape` maps to its (O, C, I) kernel view: rows (the reduced dim innermost in
    memory, moved last) or contiguous."""

    def __init__(self, shape, dim: int, rows: bool):
        self.shape, self.dim, self.rows = tuple(shape), dim, rows
        self.O = math.prod(self.shape[:dim])
        self.C = self.shape[dim]
        self.I = math.prod(self.shape[dim + 1:])

    def of(self, a: torch.Tensor) -> torch.Tensor:
        """The (O, C, I) view of a tensor with this layout (no copy)."""
        if self.rows:
            return a.movedim(self.dim, -1).reshape(-1, self.C, 1)
        return a.view(self.O, self.C, self.I)

    def back(self, y3: torch.Tensor) -> torch.Tensor:
        """A packed kernel output as a tensor of `shape` in this layout."""
        if self.rows:
            moved = self.shape[: self.dim] + self.shape[self.dim + 1:] + (self.C,)
            return y3.view(moved).movedim(-1, self.dim)
        return y3.view(self.shape)

    def has_layout(self, t: torch.Tensor) -> bool:
        if self.rows:
            return t.movedim(self.dim, -1).is_contiguous()
        return t.is_contiguous()

    def matched(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """t in this layout and dtype: itself when it has them, else one copy."""
        if t.dtype == dtype and self.has_layout(t):
            return t
        if self.rows:
            return t.movedim(self.dim, -1).to(dtype=dtype, memory_format=torch.contiguous_format).movedim(-1, self.dim)
        return t.to(dtype=dtype, memory_format=torch.contiguous_format)


def view_for(a: torch.Tensor, dim: int) -> tuple[View, torch.Tensor]:
    """(layout, a itself or its contiguous copy)."""
    if a.dim() > dim + 1 and a.movedim(dim, -1).is_contiguous() and not a.is_contiguous():
        return View(a.shape, dim, True), a
    a = a if a.is_contiguous() else a.contiguous()
    return View(a.shape, dim, a.dim() == dim + 1), a


# ---------------------------------------------------------------------------------------------
# Launchers: backend name -> (forward, jvp, backward), resolved lazily
# ---------------------------------------------------------------------------------------------
kernels = KernelTable("pixel_norm", "scm_kernels.pixel_norm.triton_kernels")
LAUNCH, JVP, BACKWARD = kernels.launch, kernels.jvp, kernels.backward


def forward_kernel(a, dim, eps, name):
    v, _ = view_for(a, dim)
    y3, rstd = LAUNCH[name](v.of(a), eps)
    return v.back(y3), rstd


def reference_backward(grad, a, dim, eps):
    """(A11)'s backward da = r (dy - a r^2 mean_c(a dy)) in differentiable plain PyTorch, for a
    backward that is itself differentiated: autograd and forward-mode AD see every operation. In fp32
    (fp64 for fp64 inputs); da comes back in a's dtype."""
    f = torch.promote_types(a.dtype, torch.float32)
    af, g = a.to(f), grad.to(f)
    r = torch.rsqrt(af.square().mean(dim, keepdim=True) + eps)
    return (r * (g - af * (r * r) * (af * g).mean(dim, keepdim=True))).to(a.dtype)


def _single_channel(t3, rstd, eps):
    """The jvp/backward r (t - a r^2 mean_c(a t)) over one channel (C = 1), as eps r^3 t: the same
    value (1 - a^2 r^2 = eps r^2), without the cancellation that costs the general form its
    precision when a^2 is near eps. t3 (O, 1, I), rstd (O, I)."""
    r = rstd[:, None, :]
    return (t3.to(torch.promote_types(t3.dtype, torch.float32)) * (eps * r * r * r)).to(t3.dtype)


class PixelNormFunction(torch.autograd.Function):
    """y = a / sqrt(mean_c(a^2) + eps) over dim (A11); a has a kernel layout (see view_for)."""

    @staticmethod
    def forward(a, dim, eps, name):
        return forward_kernel(a, dim, eps, name)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, dim, eps, name = inputs
        _, rstd = output
        ctx.mark_non_differentiable(rstd)
        ctx.save_for_backward(a, rstd)
        ctx.save_for_forward(a, rstd)
        ctx.consts = (int(dim), name, float(eps))

    @staticmethod
    def backward(ctx, grad, _grad_rstd):
        dim, name, eps = ctx.consts
        if backward_is_differentiated(ctx, grad):
            a, _ = ctx.saved_tensors
            return reference_backward(grad, a, dim, eps), None, None, None
        a, rstd = (t.detach() for t in ctx.saved_tensors)
        v, _ = view_for(a, dim)
        g3 = v.of(v.matched(grad.detach(), a.dtype))
        da3 = _single_channel(g3, rstd, eps) if v.C == 1 else BACKWARD[name](g3, v.of(a), rstd)
        return v.back(da3), None, None, None

    @staticmethod
    def jvp(ctx, a_dot, *_):
        a, rstd = (t.detach() for t in ctx.saved_tensors)
        dim, name, eps = ctx.consts
        v, _ = view_for(a, dim)
        t3 = v.of(v.matched(a_dot, a.dtype))
        yd3 = _single_channel(t3, rstd, eps) if v.C == 1 else JVP[name](v.of(a), t3, rstd)
        return v.back(yd3), None


# ---------------------------------------------------------------------------------------------
# Fake implementations, so that torch.compile can trace the schema ops.
# ---------------------------------------------------------------------------------------------
def _empty_out(a):
    O, C, I = a.shape
    if I == 1 and (C == 1 or a.stride(1) == 1):
        return a.new_empty_strided((O, C, 1), (C, 1, 1))
    return a.new_empty((O, C, I))


def fake_forward(a, eps):
    return _empty_out(a), a.new_empty((a.shape[0], a.shape[2]), dtype=torch.float32)


def fake_grad(a, t, rstd):
    return _empty_out(a)


def _schema_registered(op: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(op, "")
        return True
    except RuntimeError:
        return False


if _backend.extension_available() and _schema_registered("scm::pixel_norm"):
    torch.library.register_fake("scm::pixel_norm")(fake_forward)
    torch.library.register_fake("scm::pixel_norm_jvp")(fake_grad)
    torch.library.register_fake("scm::pixel_norm_backward")(lambda grad, a, rstd: _empty_out(a))
