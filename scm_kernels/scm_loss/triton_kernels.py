"""Triton kernels of the sCM loss (A14-A17): forward, backward w.r.t. F, and the JVP reduction.

Every operand is a (B, D) row view with inner stride 1 and a free row stride (0 for a tensor
broadcast over the batch); t and logvar are float32 (B,) vectors with a free stride. Per sample b,
with ct = cos t_b, st = sin t_b:

    (A14)  g_i = a_fm * Fm_i + a_dx * dx_i + a_x * x_i + a_j * J_i,
           a_fm = -ct^2 sigma_d,  a_dx = ct^2,  a_x = -r ct st,  a_j = -r sigma_d
    (A16)  gnorm = sqrt(sum_i g_i^2),  g^_i = g_i / (gnorm + c)
    (A17)  e_i = F_i - Fm_i - g^_i,  sqerr = sum_i e_i^2,  w = exp(-logvar_b) (1 without logvar),
           loss = w / D * sqerr + logvar_b

  forward  (_scm_loss_fwd_kernel): one program per sample, pass 1 over D for gnorm, pass 2 for sqerr.
  backward (_scm_loss_bwd_kernel): dL/dF_i = grad_b * 2 w / D * e_i, grid over (sample, D-block),
           g recomputed from the inputs with the saved gnorm; fully parallel, no atomics.
  jvp      (_scm_loss_jvp_kernel): dot_b = sum_i e_i * Fdot_i, one program per sample; the caller
           forms Ldot = 2 w / D * dot + (1 - w / D * sqerr) * logvar_dot.

Without F_minus (HAS_FM = False) F^- = F.detach() and e_i = -g^_i exactly (F - F = 0): the kernels
read F in F^-'s place and skip the subtraction.

Loads are upcast to fp32, all sums are fp32, row offsets are int64 (b * row_stride can pass 2^31);
B and D are runtime arguments, only the tile size and the HAS_* switches are constexpr.
Launchable dtypes (AOT_SPECS lists them all): the "net" operands F, jvp_out, F_minus (and F_dot)
share one dtype, the "data" operands x_t, dxt_dt share one dtype, each of fp32/fp16/bf16, plus the
all-fp64 case (tests); see `DTYPE_GROUPS`.
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch
from torch import Tensor
import triton
import triton.language as tl

from scm_kernels._spec import spec

# (net dtype, data dtype) pairs the Triton launchers accept.
_LOWP = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_GROUPS = tuple(itertools.product(_LOWP, _LOWP)) + ((torch.float64, torch.float64),)
_TT = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}

# Tile configuration (BLOCK, num_warps). The GPU always runs _GPU (a sample of an image model has
# thousands of elements); under the interpreter small samples take _INTERP, which is faster there.
_GPU, _INTERP = (1024, 4), (256, 2)


def _config(D: int) -> tuple[int, int]:
    return _INTERP if D <= _INTERP[0] and _interpret() else _GPU


def _interpret() -> bool:
    from scm_kernels.backend import triton_interpret

    return triton_interpret()


@triton.jit
def _g_block(F_ptr, J_ptr, X_ptr, DX_ptr, FM_ptr, b, stride_f, stride_j, stride_x, stride_dx, stride_fm,
             offs, mask, a_fm, a_dx, a_x, a_j, HAS_FM: tl.constexpr):
    """(A14) for one tile `offs` of sample b (int64); returns (g, F - F^- or 0) in fp32."""
    j = tl.load(J_ptr + b * stride_j + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X_ptr + b * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    dx = tl.load(DX_ptr + b * stride_dx + offs, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(F_ptr + b * stride_f + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_FM:
        fm = tl.load(FM_ptr + b * stride_fm + offs, mask=mask, other=0.0).to(tl.float32)
        diff = f - fm
    else:
        fm = f
        diff = tl.zeros_like(f)
    g = a_fm * fm + a_dx * dx + a_x * x + a_j * j
    return g, diff


@triton.jit
def _coefs(T_ptr, b, stride_t, sigma_d, r):
    """Per-sample coefficients of (A14)."""
    t = tl.load(T_ptr + b * stride_t)
    ct = tl.cos(t)
    st = tl.sin(t)
    return -ct * ct * sigma_d, ct * ct, -r * ct * st, -r * sigma_d


@triton.jit
def _scm_loss_fwd_kernel(
    F_ptr,  # (B, D) F, the network output carrying the gradient
    J_ptr,  # (B, D) J = jvp_out
    X_ptr,  # (B, D) x_t
    DX_ptr,  # (B, D) dx_t/dt
    FM_ptr,  # (B, D) F^- (ignored unless HAS_FM)
    T_ptr,  # (B,) f32 times t
    LV_ptr,  # (B,) f32 logvar (ignored unless HAS_LV)
    LOSS_ptr,  # (B,) f32 out: loss
    GNORM_ptr,  # (B,) f32 out: ||g||_2
    SQERR_ptr,  # (B,) f32 out: ||F - F^- - g^||^2
    D,  # elements per sample
    stride_f, stride_j, stride_x, stride_dx, stride_fm,  # row strides (elements) of the (B, D) views
    stride_t, stride_lv,  # strides of t and logvar
    sigma_d, r, c, inv_D,
    HAS_FM: tl.constexpr, HAS_LV: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    a_fm, a_dx, a_x, a_j = _coefs(T_ptr, b, stride_t, sigma_d, r)
    # pass 1: ||g||^2 (A14, A16)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, D, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < D
        g, diff = _g_block(F_ptr, J_ptr, X_ptr, DX_ptr, FM_ptr, b, stride_f, stride_j, stride_x, stride_dx,
                           stride_fm, offs, mask, a_fm, a_dx, a_x, a_j, HAS_FM)
        acc += g * g
    gnorm = tl.sqrt(tl.sum(acc, axis=0))
    inv = 1.0 / (gnorm + c)
    # pass 2: ||F - F^- - g^||^2 (A16, A17)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, D, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < D
        g, diff = _g_block(F_ptr, J_ptr, X_ptr, DX_ptr, FM_ptr, b, stride_f, stride_j, stride_x, stride_dx,
                           stride_fm, offs, mask, a_fm, a_dx, a_x, a_j, HAS_FM)
        e = diff - g * inv
        acc += e * e
    sqerr = tl.sum(acc, axis=0)
    if HAS_LV:
        lv = tl.load(LV_ptr + b * stride_lv)
        loss = tl.exp(-lv) * inv_D * sqerr + lv
    else:
        loss = sqerr * inv_D
    tl.store(LOSS_ptr + b, loss)
    tl.store(GNORM_ptr + b, gnorm)
    tl.store(SQERR_ptr + b, sqerr)


@triton.jit
def _scm_loss_bwd_kernel(
    DF_ptr,  # (B, D) out: dL/dF in F's dtype, contiguous
    GRAD_ptr,  # (B,) f32 upstream gradient of the loss
    F_ptr, J_ptr, X_ptr, DX_ptr, FM_ptr,  # (B, D) inputs as in the forward
    T_ptr, LV_ptr, GNORM_ptr,  # (B,) f32: t, logvar (unless HAS_LV is off), saved ||g||
    D, n_blocks,  # elements per sample, D-blocks per sample
    stride_f, stride_j, stride_x, stride_dx, stride_fm,
    stride_t, stride_lv, stride_grad,
    sigma_d, r, c, inv_D,
    HAS_FM: tl.constexpr, HAS_LV: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # flattened (sample, D-block) grid: no grid-dim limits
    b = pid // n_blocks
    blk = pid % n_blocks
    a_fm, a_dx, a_x, a_j = _coefs(T_ptr, b, stride_t, sigma_d, r)
    inv = 1.0 / (tl.load(GNORM_ptr + b) + c)
    scale = 2.0 * inv_D * tl.load(GRAD_ptr + b * stride_grad)
    if HAS_LV:
        scale = scale * tl.exp(-tl.load(LV_ptr + b * stride_lv))
    offs = (blk * BLOCK).to(tl.int32) + tl.arange(0, BLOCK)
    mask = offs < D
    g, diff = _g_block(F_ptr, J_ptr, X_ptr, DX_ptr, FM_ptr, b, stride_f, stride_j, stride_x, stride_dx, stride_fm,
                       offs, mask, a_fm, a_dx, a_x, a_j, HAS_FM)
    df = scale * (diff - g * inv)  # grad * 2 w / D * e  (A17)
    tl.store(DF_ptr + b * D + offs, df.to(DF_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scm_loss_jvp_kernel(
    DOT_ptr,  # (B,) f32 out: sum_i e_i * Fdot_i
    FD_ptr,  # (B, D) tangent F_dot
    F_ptr, J_ptr, X_ptr, DX_ptr, FM_ptr,  # (B, D) inputs as in the forward
    T_ptr, GNORM_ptr,  # (B,) f32: t, saved ||g||
    D,
    stride_fd, stride_f, stride_j, stride_x, stride_dx, stride_fm, stride_t,
    sigma_d, r, c,
    HAS_FM: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    a_fm, a_dx, a_x, a_j = _coefs(T_ptr, b, stride_t, sigma_d, r)
    inv = 1.0 / (tl.load(GNORM_ptr + b) + c)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, D, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < D
        g, diff = _g_block(F_ptr, J_ptr, X_ptr, DX_ptr, FM_ptr, b, stride_f, stride_j, stride_x, stride_dx,
                           stride_fm, offs, mask, a_fm, a_dx, a_x, a_j, HAS_FM)
        fd = tl.load(FD_ptr + b * stride_fd + offs, mask=mask, other=0.0).to(tl.float32)
        acc += (diff - g * inv) * fd
    tl.store(DOT_ptr + b, tl.sum(acc, axis=0))


# ---------------------------------------------------------------------------------------------
# Launchers: the schemas of csrc/ops.cpp, registered as torch.library custom ops (torch.ops.scm_triton.*)
# so that torch.compile traces them and torch.func transforms dispatch through them (the Function's
# backward/jvp run on functorch-wrapped tensors, which only the dispatcher unwraps).
# ---------------------------------------------------------------------------------------------
def _fm_args(F, F_minus):
    return (F_minus, F_minus.stride(0)) if F_minus is not None else (F, F.stride(0))


@torch.library.custom_op("scm_triton::scm_loss", mutates_args=())
def scm_loss_fwd(F: Tensor, J: Tensor, x_t: Tensor, dxt_dt: Tensor, t: Tensor, logvar: Optional[Tensor],
                 F_minus: Optional[Tensor], sigma_d: float, r: float, c: float) -> tuple[Tensor, Tensor, Tensor]:
    """Forward on (B, D) rows: (loss, gnorm, sqerr), each (B,) float32."""
    B, D = F.shape
    loss, gnorm, sqerr = (torch.empty(B, dtype=torch.float32, device=F.device) for _ in range(3))
    FM, s_fm = _fm_args(F, F_minus)
    LV = logvar if logvar is not None else t
    BLOCK, warps = _config(D)
    _scm_loss_fwd_kernel[(B,)](
        F, J, x_t, dxt_dt, FM, t, LV, loss, gnorm, sqerr, D,
        F.stride(0), J.stride(0), x_t.stride(0), dxt_dt.stride(0), s_fm, t.stride(0), LV.stride(0),
        sigma_d, r, c, 1.0 / D,
        HAS_FM=F_minus is not None, HAS_LV=logvar is not None, BLOCK=BLOCK, num_warps=warps,
    )
    return loss, gnorm, sqerr


@scm_loss_fwd.register_fake
def _(F, J, x_t, dxt_dt, t, logvar, F_minus, sigma_d, r, c):
    return tuple(F.new_empty((F.shape[0],), dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("scm_triton::scm_loss_backward", mutates_args=())
def scm_loss_bwd(grad_loss: Tensor, F: Tensor, J: Tensor, x_t: Tensor, dxt_dt: Tensor, t: Tensor,
                 logvar: Optional[Tensor], F_minus: Optional[Tensor], gnorm: Tensor, sigma_d: float, r: float,
                 c: float) -> Tensor:
    """dL/dF as a contiguous (B, D) tensor in F's dtype."""
    B, D = F.shape
    dF = torch.empty((B, D), dtype=F.dtype, device=F.device)
    FM, s_fm = _fm_args(F, F_minus)
    LV = logvar if logvar is not None else t
    BLOCK, warps = _config(D)
    n_blocks = triton.cdiv(D, BLOCK)
    _scm_loss_bwd_kernel[(B * n_blocks,)](
        dF, grad_loss, F, J, x_t, dxt_dt, FM, t, LV, gnorm, D, n_blocks,
        F.stride(0), J.stride(0), x_t.stride(0), dxt_dt.stride(0), s_fm, t.stride(0), LV.stride(0),
        grad_loss.stride(0), sigma_d, r, c, 1.0 / D,
        HAS_FM=F_minus is not None, HAS_LV=logvar is not None, BLOCK=BLOCK, num_warps=warps,
    )
    return dF


@scm_loss_bwd.register_fake
def _(grad_loss, F, J, x_t, dxt_dt, t, logvar, F_minus, gnorm, sigma_d, r, c):
    return F.new_empty(F.shape, dtype=F.dtype)


@torch.library.custom_op("scm_triton::scm_loss_jvp", mutates_args=())
def scm_loss_jvp(F_dot: Tensor, F: Tensor, J: Tensor, x_t: Tensor, dxt_dt: Tensor, t: Tensor,
                 F_minus: Optional[Tensor], gnorm: Tensor, sigma_d: float, r: float, c: float) -> Tensor:
    """Per-sample sum((F - F^- - g^) * F_dot), (B,) float32."""
    B, D = F.shape
    dot = torch.empty(B, dtype=torch.float32, device=F.device)
    FM, s_fm = _fm_args(F, F_minus)
    BLOCK, warps = _config(D)
    _scm_loss_jvp_kernel[(B,)](
        dot, F_dot, F, J, x_t, dxt_dt, FM, t, gnorm, D,
        F_dot.stride(0), F.stride(0), J.stride(0), x_t.stride(0), dxt_dt.stride(0), s_fm, t.stride(0),
        sigma_d, r, c,
        HAS_FM=F_minus is not None, BLOCK=BLOCK, num_warps=warps,
    )
    return dot


@scm_loss_jvp.register_fake
def _(F_dot, F, J, x_t, dxt_dt, t, F_minus, gnorm, sigma_d, r, c):
    return F.new_empty((F.shape[0],), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time specs: every (kernel, dtypes, switches, tile) the launchers above can run
# ---------------------------------------------------------------------------------------------
def _aot_specs() -> list:
    specs = []
    f32, i32, cx = "*fp32", "i32", "constexpr"
    block, warps = _GPU
    for (net, data), has_fm in itertools.product(DTYPE_GROUPS, (False, True)):
        n, d = _TT[net], _TT[data]
        rows = {"F_ptr": n, "J_ptr": n, "X_ptr": d, "DX_ptr": d, "FM_ptr": n}
        strides = {k: i32 for k in ("stride_f", "stride_j", "stride_x", "stride_dx", "stride_fm", "stride_t")}
        scalars = {"sigma_d": "fp32", "r": "fp32", "c": "fp32"}
        for has_lv in (False, True):
            fwd = {**rows, "T_ptr": f32, "LV_ptr": f32, "LOSS_ptr": f32, "GNORM_ptr": f32, "SQERR_ptr": f32,
                   "D": i32, **strides, "stride_lv": i32, **scalars, "inv_D": "fp32",
                   "HAS_FM": cx, "HAS_LV": cx, "BLOCK": cx}
            const = {"HAS_FM": has_fm, "HAS_LV": has_lv, "BLOCK": block}
            specs.append(spec("scm_loss", _scm_loss_fwd_kernel, fwd, const, num_warps=warps))
            bwd = {"DF_ptr": n, "GRAD_ptr": f32, **rows, "T_ptr": f32, "LV_ptr": f32, "GNORM_ptr": f32,
                   "D": i32, "n_blocks": i32, **strides, "stride_lv": i32, "stride_grad": i32, **scalars,
                   "inv_D": "fp32", "HAS_FM": cx, "HAS_LV": cx, "BLOCK": cx}
            specs.append(spec("scm_loss", _scm_loss_bwd_kernel, bwd, const, num_warps=warps))
        jvp = {"DOT_ptr": f32, "FD_ptr": n, **rows, "T_ptr": f32, "GNORM_ptr": f32, "D": i32,
               "stride_fd": i32, **strides, **scalars, "HAS_FM": cx, "BLOCK": cx}
        specs.append(spec("scm_loss", _scm_loss_jvp_kernel, jvp, {"HAS_FM": has_fm, "BLOCK": block},
                          num_warps=warps))
    return specs


AOT_SPECS = _aot_specs()
