"""Triton kernels of the time embedding (A10): forward, JVP and backward.

Math (labels from shared/docs/algorithm.md), for row b (time c_b = t_b) and frequency k < half:
    omega_k   = exp(-ln(max_period) * k / half)   or   2 pi f_k (Fourier)            (A10)
    theta_bk  = (s * c_b) * omega_k
    emb_b     = [cos theta_b | sin theta_b | 0 (odd dim)]
JVP for tangents c_dot (B,) and f_dot (half,) (d emb/dc of A10, plus the frequency part):
    theta_dot_bk = s * omega_k * c_dot_b + s * c_b * 2 pi f_dot_k
    emb_dot_b    = [-sin theta_b * theta_dot_b | cos theta_b * theta_dot_b | 0]
Backward for the upstream gradient g = [g_cos | g_sin | g_pad]:
    gtheta_bk = -g_cos_bk * sin theta_bk + g_sin_bk * cos theta_bk
    dc_b      = s * sum_k omega_k * gtheta_bk
    df_k      = 2 pi s * sum_b c_b * gtheta_bk
Each program owns a (BLOCK_B rows) x (BLOCK_K frequencies) tile of a 2-D grid. The backward writes
one partial sum per tile (dc over its frequencies, df over its rows) and the launcher adds the
partials in a fixed order: deterministic, no atomics.

Precision on the GPU: tl.exp lowers to ex2.approx and `/` to div.full (both approximate); the
positional frequencies therefore use div_rn and libdevice.exp (PRECISE_EXP, off under the
interpreter, which has no libdevice: there exp runs in float64, rounded to fp32, as numpy's fp32 exp
is off by an ulp at times, which a large time_scale turns into visible sin/cos errors). sin and cos
come from _sincos (float64 reduction + fp32 polynomials): accurate for any argument, and unlike
libdevice's sinf/cosf it needs no local memory (no stack in the cubin).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from scm_kernels._spec import spec
from scm_kernels.backend import triton_interpret

try:  # libdevice is only needed (and only importable as a real module) for GPU builds
    from triton.language.extra import libdevice
except Exception:  # pragma: no cover
    libdevice = None

TWO_PI = 6.283185307179586


@triton.jit
def _sincos(theta):
    """(sin theta, cos theta) for fp32 theta, without libdevice's large-argument slow path (whose
    local array shows up as stack in the cubin): the reduction r = theta - j pi/2 runs in float64
    (exact enough for any |theta| < 2^40), then the Cephes sinf/cosf minimax polynomials on
    |r| <= pi/4 (error ~1 ulp), and the quadrant j mod 4 picks and signs them."""
    x = theta.to(tl.float64)
    j = tl.floor(x * 0.6366197723675814 + 0.5)
    r = ((x - j * 1.5707963267948966) - j * 6.123233995736766e-17).to(tl.float32)
    n = j.to(tl.int64)
    z = r * r
    ps = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * r + r
    pc = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z - 0.5 * z + 1.0
    swap = (n & 1) != 0
    sv = tl.where(swap, pc, ps)
    cv = tl.where(swap, ps, pc)
    return tl.where((n & 2) != 0, -sv, sv), tl.where(((n + 1) & 2) != 0, -cv, cv)


@triton.jit
def _omega(FREQS, cols, cmask, half, stride_f, log_max_period,
           FOURIER: tl.constexpr, PRECISE_EXP: tl.constexpr):
    """omega_k of (A10) for the frequency indices `cols` (fp32; 0 where masked)."""
    if FOURIER:
        f = tl.load(FREQS + cols.to(tl.int64) * stride_f, mask=cmask, other=0.0)
        w = 6.283185307179586 * f
    else:
        x = tl.math.div_rn(-log_max_period * cols.to(tl.float32), tl.cast(half, tl.float32))
        if PRECISE_EXP:
            w = libdevice.exp(x)
        else:  # the interpreter: numpy's fp32 exp is not correctly rounded; its fp64 exp, rounded, is
            w = tl.exp(x.to(tl.float64)).to(tl.float32)
        w = tl.where(cmask, w, 0.0)
    return w


@triton.jit
def _time_embedding_fwd(
    T,  # (B,) fp32 times c_b, element stride stride_t
    FREQS,  # (half,) fp32 Fourier frequencies f_k, element stride stride_f (unused unless FOURIER)
    OUT,  # (B, dim) fp32 embedding, row stride stride_ob, inner stride 1
    B, half, dim,  # runtime sizes
    stride_t, stride_f, stride_ob,
    log_max_period, time_scale,  # fp32 scalars ln(max_period) and s
    FOURIER: tl.constexpr, PRECISE_EXP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < B
    cmask = cols < half
    rows64 = rows.to(tl.int64)
    c = tl.load(T + rows64 * stride_t, mask=rmask, other=0.0)
    w = _omega(FREQS, cols, cmask, half, stride_f, log_max_period, FOURIER, PRECISE_EXP)
    theta = (time_scale * c)[:, None] * w[None, :]
    sin_t, cos_t = _sincos(theta)
    out = OUT + rows64[:, None] * stride_ob + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    tl.store(out, cos_t, mask=mask)
    tl.store(out + half, sin_t, mask=mask)
    if pid_k == 0:
        if 2 * half < dim:  # the zero column of an odd dim
            tl.store(OUT + rows64 * stride_ob + 2 * half, tl.zeros([BLOCK_B], tl.float32), mask=rmask)


@triton.jit
def _time_embedding_jvp(
    T,  # (B,) fp32 times c_b, element stride stride_t
    TDOT,  # (B,) fp32 tangent c_dot_b, element stride stride_td (unused unless HAS_TDOT)
    FREQS,  # (half,) fp32 frequencies f_k, stride stride_f (unused unless FOURIER)
    FDOT,  # (half,) fp32 tangent f_dot_k, stride stride_fd (unused unless HAS_FDOT)
    OUT,  # (B, dim) fp32 tangent of the embedding, row stride stride_ob, inner stride 1
    B, half, dim,
    stride_t, stride_td, stride_f, stride_fd, stride_ob,
    log_max_period, time_scale,
    FOURIER: tl.constexpr, HAS_TDOT: tl.constexpr, HAS_FDOT: tl.constexpr, PRECISE_EXP: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < B
    cmask = cols < half
    rows64 = rows.to(tl.int64)
    c = tl.load(T + rows64 * stride_t, mask=rmask, other=0.0)
    w = _omega(FREQS, cols, cmask, half, stride_f, log_max_period, FOURIER, PRECISE_EXP)
    sc = time_scale * c
    theta = sc[:, None] * w[None, :]
    theta_dot = tl.zeros([BLOCK_B, BLOCK_K], tl.float32)
    if HAS_TDOT:
        c_dot = tl.load(TDOT + rows64 * stride_td, mask=rmask, other=0.0)
        theta_dot += (time_scale * c_dot)[:, None] * w[None, :]
    if HAS_FDOT:
        f_dot = tl.load(FDOT + cols.to(tl.int64) * stride_fd, mask=cmask, other=0.0)
        theta_dot += sc[:, None] * (6.283185307179586 * f_dot)[None, :]
    out = OUT + rows64[:, None] * stride_ob + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    sin_t, cos_t = _sincos(theta)
    tl.store(out, -sin_t * theta_dot, mask=mask)
    tl.store(out + half, cos_t * theta_dot, mask=mask)
    if pid_k == 0:
        if 2 * half < dim:  # the zero column of an odd dim
            tl.store(OUT + rows64 * stride_ob + 2 * half, tl.zeros([BLOCK_B], tl.float32), mask=rmask)


@triton.jit
def _time_embedding_bwd(
    G,  # (B, dim) fp32 upstream gradient, row stride stride_gb, inner stride 1
    T,  # (B,) fp32 times c_b, element stride stride_t
    FREQS,  # (half,) fp32 frequencies f_k, stride stride_f (unused unless FOURIER)
    DT_PART,  # (n_kblocks, B) fp32 partial dc: row pid_k holds s * sum_{k in tile} omega_k gtheta_bk
    DF_PART,  # (n_bblocks, half) fp32 partial df: row pid_b holds 2 pi s sum_{b in tile} c_b gtheta_bk
    B, half,
    stride_gb, stride_t, stride_f,
    log_max_period, time_scale,
    FOURIER: tl.constexpr, NEED_DF: tl.constexpr, PRECISE_EXP: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < B
    cmask = cols < half
    rows64 = rows.to(tl.int64)
    mask = rmask[:, None] & cmask[None, :]
    c = tl.load(T + rows64 * stride_t, mask=rmask, other=0.0)
    w = _omega(FREQS, cols, cmask, half, stride_f, log_max_period, FOURIER, PRECISE_EXP)
    theta = (time_scale * c)[:, None] * w[None, :]
    g = G + rows64[:, None] * stride_gb + cols[None, :]
    g_cos = tl.load(g, mask=mask, other=0.0)
    g_sin = tl.load(g + half, mask=mask, other=0.0)
    sin_t, cos_t = _sincos(theta)
    gtheta = g_sin * cos_t - g_cos * sin_t
    dc = time_scale * tl.sum(gtheta * w[None, :], axis=1)
    tl.store(DT_PART + pid_k.to(tl.int64) * B + rows64, dc, mask=rmask)
    if NEED_DF:
        df = (6.283185307179586 * time_scale) * tl.sum(gtheta * c[:, None], axis=0)
        tl.store(DF_PART + pid_b.to(tl.int64) * half + cols, df, mask=cmask)


# ---------------------------------------------------------------------------------------------
# Launchers: the schemas of csrc/ops.cpp, registered as torch.library custom ops
# (torch.ops.scm_triton.*) so that torch.compile traces them and torch.func transforms dispatch
# through them (the Function's backward/jvp may see functorch-wrapped tensors, which only the
# dispatcher unwraps). t, t_dot: fp32 (B,); freqs, freqs_dot: fp32 (half,); grad: fp32 (B, dim)
# with inner stride 1. Other strides are free.
# ---------------------------------------------------------------------------------------------
_CONFIGS = {16: 128, 32: 64, 64: 32, 128: 16}  # BLOCK_K -> BLOCK_B (2048-element tiles)
NUM_WARPS = 4


def _config(half: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_K) for `half` frequencies, from the fixed set _CONFIGS."""
    block_k = min(128, max(16, triton.next_power_of_2(half)))
    return _CONFIGS[block_k], block_k


def _precise_exp() -> bool:
    return not triton_interpret()


@torch.library.custom_op("scm_triton::time_embedding", mutates_args=())
def time_embedding(t: Tensor, dim: int, max_period: float, time_scale: float, freqs: Optional[Tensor]) -> Tensor:
    B, half = t.shape[0], dim // 2
    out = torch.empty((B, dim), dtype=torch.float32, device=t.device)
    block_b, block_k = _config(half)
    grid = (triton.cdiv(B, block_b), triton.cdiv(half, block_k))
    f = freqs if freqs is not None else t
    _time_embedding_fwd[grid](
        t, f, out, B, half, dim, t.stride(0), f.stride(0), out.stride(0), math.log(max_period), float(time_scale),
        FOURIER=freqs is not None, PRECISE_EXP=_precise_exp(), BLOCK_B=block_b, BLOCK_K=block_k,
        num_warps=NUM_WARPS,
    )
    return out


@time_embedding.register_fake
def _(t, dim, max_period, time_scale, freqs):
    return t.new_empty((t.shape[0], dim), dtype=torch.float32)


@torch.library.custom_op("scm_triton::time_embedding_jvp", mutates_args=())
def time_embedding_jvp(t: Tensor, t_dot: Optional[Tensor], dim: int, max_period: float, time_scale: float,
                       freqs: Optional[Tensor], freqs_dot: Optional[Tensor]) -> Tensor:
    B, half = t.shape[0], dim // 2
    out = torch.empty((B, dim), dtype=torch.float32, device=t.device)
    block_b, block_k = _config(half)
    grid = (triton.cdiv(B, block_b), triton.cdiv(half, block_k))
    has_fdot = freqs is not None and freqs_dot is not None
    td = t_dot if t_dot is not None else t
    f = freqs if freqs is not None else t
    fd = freqs_dot if has_fdot else f
    _time_embedding_jvp[grid](
        t, td, f, fd, out, B, half, dim, t.stride(0), td.stride(0), f.stride(0), fd.stride(0), out.stride(0),
        math.log(max_period), float(time_scale),
        FOURIER=freqs is not None, HAS_TDOT=t_dot is not None, HAS_FDOT=has_fdot, PRECISE_EXP=_precise_exp(),
        BLOCK_B=block_b, BLOCK_K=block_k, num_warps=NUM_WARPS,
    )
    return out


@time_embedding_jvp.register_fake
def _(t, t_dot, dim, max_period, time_scale, freqs, freqs_dot):
    return t.new_empty((t.shape[0], dim), dtype=torch.float32)


@torch.library.custom_op("scm_triton::time_embedding_backward", mutates_args=())
def time_embedding_backward(grad: Tensor, t: Tensor, dim: int, max_period: float, time_scale: float,
                            freqs: Optional[Tensor], need_dfreqs: bool) -> tuple[Tensor, Tensor]:
    B, half = t.shape[0], dim // 2
    block_b, block_k = _config(half)
    nb, nk = triton.cdiv(B, block_b), triton.cdiv(half, block_k)
    need_df = bool(need_dfreqs) and freqs is not None
    dt_part = torch.empty((nk, B), dtype=torch.float32, device=t.device)
    df_part = torch.empty((nb, half) if need_df else (0,), dtype=torch.float32, device=t.device)
    f = freqs if freqs is not None else t
    _time_embedding_bwd[(nb, nk)](
        grad, t, f, dt_part, df_part if need_df else dt_part, B, half, grad.stride(0), t.stride(0), f.stride(0),
        math.log(max_period), float(time_scale),
        FOURIER=freqs is not None, NEED_DF=need_df, PRECISE_EXP=_precise_exp(),
        BLOCK_B=block_b, BLOCK_K=block_k, num_warps=NUM_WARPS,
    )
    # Fixed-order sums of the per-tile partials (deterministic, no atomics).
    dt = dt_part.sum(0)
    dfreqs = df_part.sum(0) if need_df else torch.empty((0,), dtype=torch.float32, device=t.device)
    return dt, dfreqs


@time_embedding_backward.register_fake
def _(grad, t, dim, max_period, time_scale, freqs, need_dfreqs):
    n = dim // 2 if (need_dfreqs and freqs is not None) else 0
    return t.new_empty((t.shape[0],), dtype=torch.float32), t.new_empty((n,), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Every launchable GPU configuration (fp32 inputs: the public function converts t and freqs).
# ---------------------------------------------------------------------------------------------
def _aot_specs() -> list:
    specs = []
    for block_k, block_b in _CONFIGS.items():
        blocks = dict(BLOCK_B=block_b, BLOCK_K=block_k, PRECISE_EXP=True)
        for fourier in (False, True):
            specs.append(spec(
                "time_embedding", _time_embedding_fwd,
                {"T": "*fp32", "FREQS": "*fp32", "OUT": "*fp32", "B": "i32", "half": "i32", "dim": "i32",
                 "stride_t": "i32", "stride_f": "i32", "stride_ob": "i32", "log_max_period": "fp32",
                 "time_scale": "fp32", "FOURIER": "constexpr", "PRECISE_EXP": "constexpr",
                 "BLOCK_B": "constexpr", "BLOCK_K": "constexpr"},
                dict(blocks, FOURIER=fourier), num_warps=NUM_WARPS))
            for has_tdot in (False, True):
                for has_fdot in ((False, True) if fourier else (False,)):
                    specs.append(spec(
                        "time_embedding", _time_embedding_jvp,
                        {"T": "*fp32", "TDOT": "*fp32", "FREQS": "*fp32", "FDOT": "*fp32", "OUT": "*fp32",
                         "B": "i32", "half": "i32", "dim": "i32", "stride_t": "i32", "stride_td": "i32",
                         "stride_f": "i32", "stride_fd": "i32", "stride_ob": "i32", "log_max_period": "fp32",
                         "time_scale": "fp32", "FOURIER": "constexpr", "HAS_TDOT": "constexpr",
                         "HAS_FDOT": "constexpr", "PRECISE_EXP": "constexpr", "BLOCK_B": "constexpr",
                         "BLOCK_K": "constexpr"},
                        dict(blocks, FOURIER=fourier, HAS_TDOT=has_tdot, HAS_FDOT=has_fdot), num_warps=NUM_WARPS))
            for need_df in ((False, True) if fourier else (False,)):
                specs.append(spec(
                    "time_embedding", _time_embedding_bwd,
                    {"G": "*fp32", "T": "*fp32", "FREQS": "*fp32", "DT_PART": "*fp32", "DF_PART": "*fp32",
                     "B": "i32", "half": "i32", "stride_gb": "i32", "stride_t": "i32", "stride_f": "i32",
                     "log_max_period": "fp32", "time_scale": "fp32", "FOURIER": "constexpr",
                     "NEED_DF": "constexpr", "PRECISE_EXP": "constexpr", "BLOCK_B": "constexpr",
                     "BLOCK_K": "constexpr"},
                    dict(blocks, FOURIER=fourier, NEED_DF=need_df), num_warps=NUM_WARPS))
    return specs


AOT_SPECS = _aot_specs()
