"""Triton kernels of trigflow_step (A23) and their launchers.

Forward, one program per (block of BLOCK elements, sample), the per-sample coefficients of
scm::trig_coef computed once per program:
    no renoise:  cx = cos t,        cf = -sin t * sigma_d,        ce = 0
    renoise:     cx = cos s cos t,  cf = -cos s sin t * sigma_d,  ce = sin s * sigma_d
    out = cx * x_t + cf * F + ce * eps                                               (A5, A23)
MODE (constexpr): 0 denoise only, 1 eps = noise, 2 eps = Philox normals keyed by the seed,
3 renoise with eps = 0 (the tangent of a Philox step). OUT_U8: write round(clamp((out+1)*127.5))
as uint8 (scm::to_pixel, round half to even).

Philox (scm::philox_normal): element i = b*D + k, group g = i >> 2, lane i & 3;
(r0..r3) = Philox4x32-10((lo32 g, hi32 g, 0, 0), (lo32 seed, hi32 seed)); u = ((r >> 8) + 0.5) 2^-24;
lanes 0/1: sqrt(-2 ln u0) (cos, sin)(2 pi u1), lanes 2/3 the same with (u2, u3). Each element
evaluates the Philox rounds of its group and keeps its lane (integer work, cheap next to the loads).

Backward: dx_t = cx * grad, dF = cf * grad (one pass reading grad once).
Programs loop over samples beyond grid dim 1 (65535 on CUDA), so any batch size launches.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from scm_kernels._spec import spec

_KEY_A = tl.constexpr(0x9E3779B9)
_KEY_B = tl.constexpr(0xBB67AE85)
_ROUND_A = tl.constexpr(0xD2511F53)
_ROUND_B = tl.constexpr(0xCD9E8D57)

BLOCK = 1024  # elements per program (4 warps: 8 elements per thread)
NUM_WARPS = 4
MAX_GRID_Y = 65535  # CUDA limit of grid dim 1


@triton.jit
def _trig_coef(T, S, b, stride_t, stride_s, sigma_d, RENOISE: tl.constexpr):
    """(cx, cf, ce) of sample b (scm::trig_coef), in fp32."""
    t = tl.load(T + b * stride_t).to(tl.float32)
    ct = tl.cos(t)
    st = tl.sin(t)
    if RENOISE:
        s = tl.load(S + b * stride_s).to(tl.float32)
        cs = tl.cos(s)
        ss = tl.sin(s)
        cx = cs * ct
        cf = -cs * st * sigma_d
        ce = ss * sigma_d
    else:
        cx = ct
        cf = -st * sigma_d
        ce = 0.0 * st
    return cx, cf, ce


@triton.jit
def _philox_normal(i, k0, k1):
    """Normal number i (int64 tensor, >= 0) of the stream keyed by (k0, k1) (uint32 scalars)."""
    g = i >> 2
    lane = i & 3
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    for _ in tl.static_range(10):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(_c2, _ROUND_B) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, _ROUND_A) ^ c3 ^ k1
        c1 = _c2 * _ROUND_B
        c3 = _c0 * _ROUND_A
        k0 = k0 + _KEY_A
        k1 = k1 + _KEY_B
    first = lane < 2
    r_rad = tl.where(first, c0, c2)
    r_ang = tl.where(first, c1, c3)
    u_rad = ((r_rad >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2^-24
    u_ang = ((r_ang >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08
    rad = tl.sqrt(-2.0 * tl.log(u_rad))
    theta = 6.283185307179586 * u_ang
    return rad * tl.where((lane & 1) == 0, tl.cos(theta), tl.sin(theta))


@triton.jit
def _to_pixel(x):
    """round(clamp((x + 1) * 127.5, 0, 255)) with ties to even, as uint8 (scm::to_pixel)."""
    p = (x + 1.0) * 127.5
    p = tl.minimum(tl.maximum(p, 0.0), 255.0)
    q = tl.floor(p + 0.5)  # p + 0.5 and q - p are exact for p in [0, 255]
    odd = (q - 2.0 * tl.floor(q * 0.5)) == 1.0
    q = tl.where(((q - p) == 0.5) & odd, q - 1.0, q)
    return q.to(tl.uint8)


@triton.jit(do_not_specialize=["k0_bits", "k1_bits"])
def _trigflow_step_fwd(
    X,  # x_t (B, D): row b at X + b * stride_x, inner stride 1
    F,  # F (B, D): row b at F + b * stride_f
    N,  # noise (B, D) (MODE 1 only; else any pointer): row b at N + b * stride_n
    OUT,  # output (B, D), packed rows: row b at OUT + b * D; x_t's dtype or uint8
    T,  # t (B,) float32: T + b * stride_t
    S,  # t_next (B,) float32: S + b * stride_s (MODE > 0)
    stride_x, stride_f, stride_n, stride_t, stride_s,  # row strides in elements (0: broadcast)
    B, D,  # samples, elements per sample (runtime)
    sigma_d,  # fp32
    k0_bits, k1_bits,  # Philox key lo32/hi32 of the seed, as int32 bit patterns (MODE 2)
    BLOCK: tl.constexpr, MODE: tl.constexpr, OUT_U8: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    k0 = tl.cast(k0_bits, tl.uint32, bitcast=True)  # tl.cast: an int argument equal to 1 is a Python int
    k1 = tl.cast(k1_bits, tl.uint32, bitcast=True)
    for b in range(tl.program_id(1), B, tl.num_programs(1)):
        cx, cf, ce = _trig_coef(T, S, b, stride_t, stride_s, sigma_d, MODE != 0)
        b64 = tl.cast(b, tl.int64)
        x = tl.load(X + b64 * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        f = tl.load(F + b64 * stride_f + offs, mask=mask, other=0.0).to(tl.float32)
        out = cx * x + cf * f
        if MODE == 1:
            n = tl.load(N + b64 * stride_n + offs, mask=mask, other=0.0).to(tl.float32)
            out += ce * n
        if MODE == 2:
            out += ce * _philox_normal(b64 * D + offs, k0, k1)
        if OUT_U8:
            tl.store(OUT + b64 * D + offs, _to_pixel(out), mask=mask)
        else:
            tl.store(OUT + b64 * D + offs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _trigflow_step_bwd(
    G,  # upstream gradient (B, D): row b at G + b * stride_g, inner stride 1
    DX,  # dL/dx_t (B, D) packed, x_t's dtype (NEED_X; else any pointer)
    DF,  # dL/dF (B, D) packed, F's dtype (NEED_F; else any pointer)
    T, S,  # t, t_next (B,) float32
    stride_g, stride_t, stride_s,  # row strides in elements
    B, D, sigma_d,
    BLOCK: tl.constexpr, RENOISE: tl.constexpr, NEED_X: tl.constexpr, NEED_F: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    for b in range(tl.program_id(1), B, tl.num_programs(1)):
        cx, cf, ce = _trig_coef(T, S, b, stride_t, stride_s, sigma_d, RENOISE)
        b64 = tl.cast(b, tl.int64)
        g = tl.load(G + b64 * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
        if NEED_X:
            tl.store(DX + b64 * D + offs, (cx * g).to(DX.dtype.element_ty), mask=mask)
        if NEED_F:
            tl.store(DF + b64 * D + offs, (cf * g).to(DF.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers (same contract as the schema ops torch.ops.scm.trigflow_step[_backward])
# ---------------------------------------------------------------------------------------------
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _grid(B: int, D: int):
    return (triton.cdiv(D, BLOCK), min(B, MAX_GRID_Y))


def _seed_bits(seed: int) -> tuple[int, int]:
    """lo32 / hi32 of the seed as int32 bit patterns (so that the launcher always passes i32)."""
    lo, hi = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    return lo - (1 << 32) if lo >= 1 << 31 else lo, hi - (1 << 32) if hi >= 1 << 31 else hi


def trigflow_step(x_t, F, t, t_next, noise, sigma_d: float, seed: int, noise_mode: int,
                  out_uint8: bool) -> torch.Tensor:
    B, D = x_t.shape
    out = torch.empty((B, D), dtype=torch.uint8 if out_uint8 else x_t.dtype, device=x_t.device)
    s = t_next if noise_mode != 0 else t
    n = noise if noise_mode == 1 else x_t
    k0, k1 = _seed_bits(seed) if noise_mode == 2 else (0, 0)
    _trigflow_step_fwd[_grid(B, D)](
        x_t, F, n, out, t, s,
        x_t.stride(0), F.stride(0), n.stride(0), t.stride(0), s.stride(0),
        B, D, float(sigma_d), k0, k1,
        BLOCK=BLOCK, MODE=noise_mode, OUT_U8=bool(out_uint8), num_warps=NUM_WARPS,
    )
    return out


def trigflow_step_backward(grad, t, t_next, sigma_d: float, renoise: bool, need_x: bool, need_F: bool,
                           x_dtype: torch.dtype, F_dtype: torch.dtype):
    B, D = grad.shape
    dx = torch.empty((B, D), dtype=x_dtype, device=grad.device) if need_x else None
    dF = torch.empty((B, D), dtype=F_dtype, device=grad.device) if need_F else None
    if not (need_x or need_F):
        return dx, dF
    s = t_next if renoise else t
    _trigflow_step_bwd[_grid(B, D)](
        grad, dx if need_x else grad, dF if need_F else grad, t, s,
        grad.stride(0), t.stride(0), s.stride(0), B, D, float(sigma_d),
        BLOCK=BLOCK, RENOISE=bool(renoise), NEED_X=bool(need_x), NEED_F=bool(need_F), num_warps=NUM_WARPS,
    )
    return dx, dF


# ---------------------------------------------------------------------------------------------
# Every configuration the launchers can compile (static tier, scm_kernels.aot)
# ---------------------------------------------------------------------------------------------
_TY = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def _aot_specs() -> list:
    specs = []
    ints = {"stride_x": "i32", "stride_f": "i32", "stride_n": "i32", "stride_t": "i32", "stride_s": "i32",
            "B": "i32", "D": "i32", "sigma_d": "fp32", "k0_bits": "i32", "k1_bits": "i32"}
    for xd, fd in itertools.product(TRITON_DTYPES, TRITON_DTYPES):
        # (mode, noise dtype, out_u8): the noise pointer is x_t itself unless MODE == 1
        cases = [(0, xd, False), (0, xd, True), (2, xd, False), (3, xd, False)]
        cases += [(1, nd, False) for nd in TRITON_DTYPES]
        for mode, nd, u8 in cases:
            sig = {"X": _TY[xd], "F": _TY[fd], "N": _TY[nd], "OUT": "*u8" if u8 else _TY[xd],
                   "T": "*fp32", "S": "*fp32", **ints, "BLOCK": "constexpr", "MODE": "constexpr",
                   "OUT_U8": "constexpr"}
            specs.append(spec("trigflow_step", _trigflow_step_fwd, sig,
                                  {"BLOCK": BLOCK, "MODE": mode, "OUT_U8": u8}, num_warps=NUM_WARPS))
    for xd, fd in itertools.product(TRITON_DTYPES, TRITON_DTYPES):
        for renoise, need_x, need_f in itertools.product((False, True), (False, True), (False, True)):
            if not (need_x or need_f) or (not need_f and fd != torch.float32):
                continue  # nothing launched; without dF the F dtype does not matter (DF = grad)
            sig = {"G": _TY[xd], "DX": _TY[xd], "DF": _TY[fd] if need_f else _TY[xd],
                   "T": "*fp32", "S": "*fp32", "stride_g": "i32", "stride_t": "i32", "stride_s": "i32",
                   "B": "i32", "D": "i32", "sigma_d": "fp32", "BLOCK": "constexpr", "RENOISE": "constexpr",
                   "NEED_X": "constexpr", "NEED_F": "constexpr"}
            specs.append(spec("trigflow_step", _trigflow_step_bwd, sig,
                                  {"BLOCK": BLOCK, "RENOISE": renoise, "NEED_X": need_x, "NEED_F": need_f},
                                  num_warps=NUM_WARPS))
    return specs


AOT_SPECS = _aot_specs()

__all__ = ["trigflow_step", "trigflow_step_backward", "AOT_SPECS", "TRITON_DTYPES", "BLOCK"]
