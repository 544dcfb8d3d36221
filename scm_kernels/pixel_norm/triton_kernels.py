"""Triton kernels of the pixel norm (A11): forward, and the JVP / backward (one kernel: the
Jacobian r (I - y y^T / C) is symmetric).

a is an (O, C, I) view reduced over C with element (o, c, i) at o * stride_o + c * stride_c + i *
stride_i. Program (o, ib) handles positions [ib BI, (ib + 1) BI) of row o: pass 1 accumulates
sum_c a^2 (forward) or sum_c a t (t = tangent or upstream gradient) over channel tiles of BCH;
pass 2 writes
    forward:  r = (sum a^2 / C + eps)^(-1/2),  y = a r                 (r saved, (O, I) fp32)
    HAS_T:    k = r^2 sum(a t) / C,            out = r (t - a k)
Loads upcast to fp32, fp32 sums, row offsets int64. Two tiles: (BCH, BI) = (1024, 1) for rows
(I == 1, an (N, C) embedding or channels-last data) and (16, 128) for planes (I > 1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from scm_kernels._spec import spec

CONFIGS = {"rows": (1024, 1), "planes": (16, 128)}
NUM_WARPS = 4
_TT = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}


@triton.jit
def _pn_kernel(
    A,  # (O, C, I) input a
    T,  # (O, C, I) tangent / upstream gradient (unused unless HAS_T)
    OUT,  # (O, C, I) output
    RSTD,  # (O, I) fp32 r: written by the forward, read with HAS_T
    C, I,
    stride_ao, stride_ac, stride_ai,
    stride_to, stride_tc, stride_ti,
    stride_oo, stride_oc, stride_oi,
    eps,
    HAS_T: tl.constexpr, BCH: tl.constexpr, BI: tl.constexpr,
):
    o = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BI + tl.arange(0, BI)
    imask = i < I
    acc = tl.zeros([BI], dtype=tl.float32)
    for c0 in range(0, C, BCH):
        c = c0 + tl.arange(0, BCH)
        m = (c < C)[:, None] & imask[None, :]
        a = tl.load(A + o * stride_ao + c[:, None] * stride_ac + i[None, :] * stride_ai, mask=m, other=0.0)
        a = a.to(tl.float32)
        if HAS_T:
            t = tl.load(T + o * stride_to + c[:, None] * stride_tc + i[None, :] * stride_ti, mask=m, other=0.0)
            acc += tl.sum(a * t.to(tl.float32), axis=0)
        else:
            acc += tl.sum(a * a, axis=0)
    if HAS_T:
        r = tl.load(RSTD + o * I + i, mask=imask, other=0.0)
        k = r * r * acc / C
    else:
        r = tl.math.rsqrt(acc / C + eps)
        k = tl.zeros_like(r)
        tl.store(RSTD + o * I + i, r, mask=imask)
    for c0 in range(0, C, BCH):
        c = c0 + tl.arange(0, BCH)
        m = (c < C)[:, None] & imask[None, :]
        a = tl.load(A + o * stride_ao + c[:, None] * stride_ac + i[None, :] * stride_ai, mask=m, other=0.0)
        a = a.to(tl.float32)
        if HAS_T:
            t = tl.load(T + o * stride_to + c[:, None] * stride_tc + i[None, :] * stride_ti, mask=m, other=0.0)
            out = r[None, :] * (t.to(tl.float32) - a * k[None, :])
        else:
            out = a * r[None, :]
        tl.store(OUT + o * stride_oo + c[:, None] * stride_oc + i[None, :] * stride_oi,
                 out.to(OUT.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------
# Launchers (torch.ops.scm_triton.*, the schemas of csrc/ops.cpp)
# ---------------------------------------------------------------------------------------------
def _check(a: Tensor, name: str) -> bool:
    """True for the rows layout (I == 1, C contiguous); raises for a layout the kernels do not take."""
    if a.dim() != 3:
        raise ValueError(f"pixel_norm: {name} must be an (O, C, I) view, got shape {tuple(a.shape)}")
    O, C, I = a.shape
    rows = I == 1 and (C == 1 or a.stride(1) == 1)
    if not rows and I > 1 and a.stride(2) != 1:
        raise ValueError(f"pixel_norm: {name} must have stride(2) == 1, or I == 1 and stride(1) == 1")
    return rows


def _launch(a: Tensor, t: Tensor | None, rstd: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    from scm_kernels.pixel_norm.function import _empty_out

    rows = _check(a, "a")
    O, C, I = a.shape
    out = _empty_out(a)
    if rstd is None:
        rstd = torch.empty((O, I), dtype=torch.float32, device=a.device)
    bch, bi = CONFIGS["rows" if I == 1 else "planes"]
    T = t if t is not None else a
    _pn_kernel[(O, triton.cdiv(I, bi))](
        a, T, out, rstd, C, I, *a.stride(), *T.stride(), *out.stride(), float(eps),
        HAS_T=t is not None, BCH=bch, BI=bi, num_warps=NUM_WARPS)
    return out, rstd


@torch.library.custom_op("scm_triton::pixel_norm", mutates_args=())
def pixel_norm(a: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(y in the kernels' layout, r (O, I) float32) (A11)."""
    return _launch(a, None, None, eps)


@pixel_norm.register_fake
def _(a, eps):
    from scm_kernels.pixel_norm.function import fake_forward

    return fake_forward(a, eps)


def _grad(a: Tensor, t: Tensor, rstd: Tensor, name: str) -> Tensor:
    _check(t, name)
    if t.shape != a.shape or t.dtype != a.dtype or t.stride() != a.stride():
        raise ValueError(f"pixel_norm: {name} must have a's shape, dtype and strides")
    return _launch(a, t, rstd, 0.0)[0]


@torch.library.custom_op("scm_triton::pixel_norm_jvp", mutates_args=())
def pixel_norm_jvp(a: Tensor, a_dot: Tensor, rstd: Tensor) -> Tensor:
    """r (a_dot - a r^2 mean_c(a a_dot))."""
    return _grad(a, a_dot, rstd, "a_dot")


@pixel_norm_jvp.register_fake
def _(a, a_dot, rstd):
    from scm_kernels.pixel_norm.function import _empty_out

    return _empty_out(a)


@torch.library.custom_op("scm_triton::pixel_norm_backward", mutates_args=())
def pixel_norm_backward(grad: Tensor, a: Tensor, rstd: Tensor) -> Tensor:
    """r (grad - a r^2 mean_c(a grad))."""
    return _grad(a, grad, rstd, "grad")


@pixel_norm_backward.register_fake
def _(grad, a, rstd):
    from scm_kernels.pixel_norm.function import _empty_out

    return _empty_out(a)


def _aot_specs() -> list:
    specs = []
    i32 = "i32"
    for tt in _TT.values():
        for bch, bi in CONFIGS.values():
            for has_t in (False, True):
                sig = {"A": tt, "T": tt, "OUT": tt, "RSTD": "*fp32", "C": i32, "I": i32,
                       **{f"stride_{p}{d}": i32 for p in "ato" for d in "oci"}, "eps": "fp32",
                       "HAS_T": "constexpr", "BCH": "constexpr", "BI": "constexpr"}
                specs.append(spec("pixel_norm", _pn_kernel, sig, {"HAS_T": has_t, "BCH": bch, "BI": bi},
                                  num_warps=NUM_WARPS))
    return specs


AOT_SPECS = _aot_specs()
