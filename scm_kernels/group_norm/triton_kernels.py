"""Triton kernels of the fused GroupNorm (A28-A30): forward, JVP and backward, each fused with the
modulation and SiLU.

Data: x is an (N, C, S) view (S = spatial size) in one of two layouts, a constexpr switch CL:
  CL = False (NCHW): channel c of sample n is a contiguous row of S elements (row stride S);
  CL = True  (NHWC): spatial position s of sample n is a contiguous row of C channels (row stride C).
Every (N, C, S) operand (x, y, x_dot, y_dot, dy, dx) has that layout, each with its own batch
stride. Group g of sample n is the (C/G = Cg) x S block of channels [g Cg, (g+1) Cg). A tile is
BC channels x BS spatial positions, [BC, BS] (NCHW) or [BS, BC] (NHWC), contiguous along the
layout's inner axis. Per-channel operands gamma, beta, their tangents (C,) and the modulation s,
b, their tangents (N, C) are fp32 with free strides; an absent one is a one-element constant
(1 or 0) with stride 0, so that the kernels have no switches for them.

Parallelism: program (n, g, k) handles the spatial range k of its group; the launcher splits a
group over several programs (down to one tile each) when N*G programs alone cannot fill the GPU
(inference at batch 1). Modes (a runtime argument, one kernel per direction):
  0 fused   nsplit == 1: the program reduces its whole group, then writes its outputs (the second
            loop re-reads the group, from L1/L2 when it fits there);
  1 partial the program writes its partial reductions, nothing else;
  2 apply   the program combines the partials of its group in a fixed order, then writes;
  3 resident (forward only, see resident_tile) the program loads its whole group as one tile, once,
            and keeps it in registers from the statistics to the output.
Every reduction has a fixed order (tiles in order, splits in order): results are bitwise
reproducible, and no kernel uses atomics. The forward's mode is a constexpr (with a runtime mode,
ptxas keeps one value on the stack in some sm_80 builds); the JVP's and backward's are runtime.

Forward (A28): statistics by exact two-pass moments of every tile (its mean, summed relative to a
pivot value, then sum (x - mean)^2) merged with Chan's formula, across tiles and across splits:
never E[x^2] - E[x]^2.
    r = (M2 / M + eps)^(-1/2);  a = (x - mu) (r gamma s) + (beta s + b);  y = a sigmoid(a) or a.
JVP (A29): group sums sum x_dot and sum (x - mu) x_dot (mode 0/1), then
    x^_dot = r (x_dot - m1 - x^ m2),  m1 = mean(x_dot), m2 = mean(x^ x_dot),
    a_dot = x^_dot (gamma s) + x^ (gamma_dot s + gamma s_dot) + (beta_dot s + beta s_dot + b_dot),
    y_dot = SiLU'(a) a_dot,  SiLU'(a) = sigmoid(a) (1 + a (1 - sigmoid(a))).
Backward (A30): per-(n, c) sums over the program's spatial range (PART, (2, N, C, nsplit))
    P1 = sum da x^,  P2 = sum da,   da = dy SiLU'(a);
then with A = gamma s and the group means m1 = mean(dx^) = sum_c A P2 / M, m2 = mean(dx^ x^) =
sum_c A P1 / M (in the kernel in mode 0, by the launcher from the summed partials otherwise):
    dx = r (da A - m1 - x^ m2).
The launcher returns P1, P2 summed over the splits; dgamma, dbeta, dscale, dshift follow from them
(scm_kernels.group_norm.function).

Loads are upcast to fp32, all arithmetic is fp32, batch offsets are int64 (offsets inside one
sample are int32: C * S < 2^31). Sizes are runtime arguments; constexprs are the layout and the
tile. Under TRITON_INTERPRET=1 the kernels run on CPU tensors.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from scm_kernels._spec import spec

# Tiles (BC channels, BS spatial positions) of 2048 elements; the launcher picks the one that
# wastes the fewest lanes on the group's (Cg, S).
CONFIGS = ((2, 1024), (8, 256), (32, 64))
CL_CONFIGS = ((4, 512), (16, 128))  # channels_last adds these: BC = every power of two up to 32
NUM_WARPS = 8
_TT = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}

# Splitting (see _plan): on a GPU a group is split over programs until about TARGET_PROGRAMS
# programs run, each with at least MIN_PER_PROGRAM elements (and one tile). Under the
# interpreter nothing is split unless the tests ask for it (they set these).
TARGET_PROGRAMS = 512
MIN_PER_PROGRAM = 4096
INTERPRETER_TARGET_PROGRAMS = 1

# The forward's mode 3 (resident_tile): the group in one tile of `total` elements (BC = the next
# power of two of Cg, at most RESIDENT_MAX_BC; BS = total / BC) with its warps, when the padded
# group has RESIDENT_MIN elements or more. Measured on an H100 (benchmarks.tune_group_norm, bf16,
# device time against a copy of the same tensor): 32x512x32x32 75% of the copy's bandwidth against
# 61-63% for mode 0; at 8192-element groups (64x768x16x16) mode 3 was no faster than mode 0, and
# 32768-element tiles spill (sm_80/sm_90) at 16 or 32 warps and ran slower where they compiled.
RESIDENT_TILES = ((16384, 8),)
RESIDENT_MIN = 16384
RESIDENT_MAX_BC = 16  # wider tiles (32 and 64 channels of 512 and 256 positions) spill in NCHW
INTERPRETER_RESIDENT = False  # the tests turn mode 3 on under the interpreter


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _tile(c0, s0, Cg, s_hi, stride_r, CL: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr):
    """Offsets (inside the group, elements) and mask of the tile of channels c0.. and positions s0.."""
    cc = c0 + tl.arange(0, BC)
    ss = s0 + tl.arange(0, BS)
    if CL:
        off = ss[:, None] * stride_r + cc[None, :]
        mask = (ss[:, None] < s_hi) & (cc[None, :] < Cg)
    else:
        off = cc[:, None] * stride_r + ss[None, :]
        mask = (cc[:, None] < Cg) & (ss[None, :] < s_hi)
    return off, mask


@triton.jit
def _chan(v, CL: tl.constexpr):
    """A per-channel [BC] vector broadcast along the tile's channel axis."""
    if CL:
        out = v[None, :]
    else:
        out = v[:, None]
    return out


@triton.jit
def _chan_sum(t, CL: tl.constexpr):
    """Sum of a tile over its spatial axis: a per-channel [BC] vector."""
    if CL:
        out = tl.sum(t, axis=0)
    else:
        out = tl.sum(t, axis=1)
    return out


@triton.jit
def _merge(n_a, m_a, q_a, n_b, m_b, q_b):
    """Chan et al.'s merge of (count, mean, M2) of two disjoint sets."""
    n = n_a + n_b
    d = m_b - m_a
    w = n_b / n
    return n, m_a + d * w, q_a + q_b + d * d * (n_a * w)


@triton.jit
def _vec(P, n, c, cmask, stride_n, stride_c):
    """fp32 per-channel operand: (C,) (stride_n unused) or (N, C); a stride-0 constant when absent."""
    return tl.load(P + n * stride_n + c * stride_c, mask=cmask, other=0.0)


@triton.jit
def _group_base(n, g, Cg, stride_n, stride_r, CL: tl.constexpr):
    """Offset (int64) of channel g Cg, position 0 of sample n."""
    if CL:
        base = n * stride_n + g * Cg
    else:
        base = n * stride_n + tl.cast(g * Cg, tl.int64) * stride_r
    return base


@triton.jit
def _rstd(m2, M, eps):
    """r = (M2 / M + eps)^(-1/2). rsqrt.approx (relative error ~2^-22): the IEEE sqrt_rn / div_rn
    pair calls a slow-path subroutine that gives some configurations a stack frame."""
    return tl.math.rsqrt(m2 / M + eps)


@triton.jit
def _range_stats(X, base, stride_r, Cg, s_lo, s_hi, CL: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr):
    """(count, mean, M2) of x over the group's channels and positions [s_lo, s_hi): exact two-pass
    moments of each tile, merged in tile order (Chan). Tile sums are taken relative to the range's
    first value (the pivot), so that a large common offset costs no precision."""
    if CL:
        pivot = tl.load(X + base + s_lo * stride_r).to(tl.float32)
    else:
        pivot = tl.load(X + base + s_lo).to(tl.float32)
    cnt = tl.zeros([], dtype=tl.float32)
    mean = tl.zeros([], dtype=tl.float32)
    m2 = tl.zeros([], dtype=tl.float32)
    for c0 in range(0, Cg, BC):
        for s0 in range(s_lo, s_hi, BS):
            off, mask = _tile(c0, s0, Cg, s_hi, stride_r, CL, BC, BS)
            x = tl.load(X + base + off, mask=mask, other=0.0).to(tl.float32)
            nb = tl.cast(tl.minimum(Cg - c0, BC) * tl.minimum(s_hi - s0, BS), tl.float32)
            mb = pivot + tl.sum(tl.where(mask, x - pivot, 0.0)) / nb
            d = tl.where(mask, x - mb, 0.0)
            cnt, mean, m2 = _merge(cnt, mean, m2, nb, mb, tl.sum(d * d))
    return cnt, mean, m2


@triton.jit
def _silu_grad(a):
    """(sigmoid(a), SiLU'(a) = sigmoid(a) (1 + a (1 - sigmoid(a))))."""
    sig = tl.sigmoid(a)
    return sig, sig * (1.0 + a * (1.0 - sig))


# ---------------------------------------------------------------------------------------------
# Forward (A28)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _gn_fwd_resident(X, Y, W, Bi, SC, SH, MEAN, RSTD, C, S, Cg, G, stride_xn, stride_yn, stride_w, stride_b,
                     stride_scn, stride_scc, stride_shn, stride_shc, eps, act,
                     CL: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr):
    """Mode 3: the whole group in one [BC >= Cg, BS >= S] tile, read from memory once and kept in
    registers through the statistics and the output (modes 0-2 read it twice). Exact two-pass
    moments of the tile, relative to its first value as in _range_stats."""
    ng = tl.program_id(0)
    n = (ng // G).to(tl.int64)
    g = ng % G
    if CL:
        stride_r = C
    else:
        stride_r = S
    bx = _group_base(n, g, Cg, stride_xn, stride_r, CL)
    M = tl.cast(Cg * S, tl.float32)
    off, mask = _tile(0, 0, Cg, S, stride_r, CL, BC, BS)
    x = tl.load(X + bx + off, mask=mask, other=0.0).to(tl.float32)
    pivot = tl.load(X + bx).to(tl.float32)
    mean = pivot + tl.sum(tl.where(mask, x - pivot, 0.0)) / M
    d = tl.where(mask, x - mean, 0.0)
    rstd = _rstd(tl.sum(d * d), M, eps)
    tl.store(MEAN + ng, mean)
    tl.store(RSTD + ng, rstd)
    cl = tl.arange(0, BC)
    cmask = cl < Cg
    c = g * Cg + cl
    s = _vec(SC, n, c, cmask, stride_scn, stride_scc)
    A = _chan(_vec(W, 0, c, cmask, 0, stride_w) * s * rstd, CL)
    B = _chan(_vec(Bi, 0, c, cmask, 0, stride_b) * s + _vec(SH, n, c, cmask, stride_shn, stride_shc), CL)
    a = d * A + B
    y = tl.where(act != 0, a * tl.sigmoid(a), a)
    by = _group_base(n, g, Cg, stride_yn, stride_r, CL)
    tl.store(Y + by + off, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gn_fwd_kernel(
    X,  # (N, C, S) input, batch stride stride_xn
    Y,  # (N, C, S) output, batch stride stride_yn
    W, Bi,  # (C,) fp32 gamma, beta (strides stride_w, stride_b; 0 for the constants 1 / 0)
    SC, SH,  # (N, C) fp32 scale s, shift b (strides (stride_scn, stride_scc), (stride_shn, stride_shc))
    MEAN, RSTD,  # (N * G,) fp32 out: mu, r per (sample, group)
    PART,  # (N * G * nsplit, 3) fp32 partial (count, mean, M2) of each program (modes 1, 2)
    C, S, Cg, G, nsplit, s_split,  # sizes; each program covers s_split positions of its group
    stride_xn, stride_yn,
    stride_w, stride_b, stride_scn, stride_scc, stride_shn, stride_shc,
    eps,
    act,  # 1: SiLU, 0: none
    MODE: tl.constexpr,  # 0 fused, 1 partial statistics, 2 combine partials and write y, 3 resident
    CL: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr,
):
    pid = tl.program_id(0)
    if MODE == 3:
        _gn_fwd_resident(X, Y, W, Bi, SC, SH, MEAN, RSTD, C, S, Cg, G, stride_xn, stride_yn, stride_w, stride_b,
                         stride_scn, stride_scc, stride_shn, stride_shc, eps, act, CL, BC, BS)
        return
    ng = pid // nsplit
    sp = pid % nsplit
    n = (ng // G).to(tl.int64)
    g = ng % G
    s_lo = sp * s_split
    s_hi = tl.minimum(S, s_lo + s_split)
    if CL:
        stride_r = C
    else:
        stride_r = S
    bx = _group_base(n, g, Cg, stride_xn, stride_r, CL)
    M = tl.cast(Cg * S, tl.float32)  # tl.cast: Cg * S is a Python int when both are 1
    if MODE == 2:
        cnt = tl.zeros([], dtype=tl.float32)
        mean = tl.zeros([], dtype=tl.float32)
        m2 = tl.zeros([], dtype=tl.float32)
        for k in range(0, nsplit):
            q = PART + (ng * nsplit + k).to(tl.int64) * 3
            cnt, mean, m2 = _merge(cnt, mean, m2, tl.load(q), tl.load(q + 1), tl.load(q + 2))
    else:
        cnt, mean, m2 = _range_stats(X, bx, stride_r, Cg, s_lo, s_hi, CL, BC, BS)
    if MODE == 1:
        q = PART + pid.to(tl.int64) * 3
        tl.store(q, cnt)
        tl.store(q + 1, mean)
        tl.store(q + 2, m2)
    else:
        rstd = _rstd(m2, M, eps)
        if sp == 0:
            tl.store(MEAN + ng, mean)
            tl.store(RSTD + ng, rstd)
        by = _group_base(n, g, Cg, stride_yn, stride_r, CL)
        for c0 in range(0, Cg, BC):
            cl = c0 + tl.arange(0, BC)
            cmask = cl < Cg
            c = g * Cg + cl
            s = _vec(SC, n, c, cmask, stride_scn, stride_scc)
            A = _chan(_vec(W, 0, c, cmask, 0, stride_w) * s * rstd, CL)
            B = _chan(_vec(Bi, 0, c, cmask, 0, stride_b) * s + _vec(SH, n, c, cmask, stride_shn, stride_shc), CL)
            for s0 in range(s_lo, s_hi, BS):
                off, mask = _tile(c0, s0, Cg, s_hi, stride_r, CL, BC, BS)
                x = tl.load(X + bx + off, mask=mask, other=0.0).to(tl.float32)
                a = (x - mean) * A + B
                y = tl.where(act != 0, a * tl.sigmoid(a), a)
                tl.store(Y + by + off, y.to(Y.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# JVP (A29)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _gn_jvp_kernel(
    X,  # (N, C, S) primal x, batch stride stride_xn
    XD,  # (N, C, S) tangent x_dot (x's dtype), batch stride stride_xdn; unread when has_xd == 0
    YD,  # (N, C, S) out: tangent y_dot, batch stride stride_ydn
    W, Bi, SC, SH,  # primal gamma, beta (C,), s, b (N, C), fp32 (as in the forward)
    WD, BD, SCD, SHD,  # their tangents, fp32, same shapes; stride-0 zeros when absent
    MEAN, RSTD,  # (N * G,) fp32 statistics of the forward
    PART,  # (N * G * nsplit, 2) fp32 partial (sum x_dot, sum (x - mu) x_dot) (modes 1, 2)
    C, S, Cg, G, nsplit, s_split,
    stride_xn, stride_xdn, stride_ydn,
    stride_w, stride_b, stride_scn, stride_scc, stride_shn, stride_shc,
    stride_wd, stride_bd, stride_scdn, stride_scdc, stride_shdn, stride_shdc,
    mode,  # 0 fused, 1 partial sums, 2 combine partials and write y_dot
    act, has_xd,
    CL: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr,
):
    pid = tl.program_id(0)
    ng = pid // nsplit
    sp = pid % nsplit
    n = (ng // G).to(tl.int64)
    g = ng % G
    s_lo = sp * s_split
    s_hi = tl.minimum(S, s_lo + s_split)
    if CL:
        stride_r = C
    else:
        stride_r = S
    bx = _group_base(n, g, Cg, stride_xn, stride_r, CL)
    bxd = _group_base(n, g, Cg, stride_xdn, stride_r, CL)
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    M = tl.cast(Cg * S, tl.float32)  # tl.cast: Cg * S is a Python int when both are 1
    sum_d = tl.zeros([], dtype=tl.float32)  # sum x_dot
    sum_xd = tl.zeros([], dtype=tl.float32)  # sum (x - mu) x_dot
    if mode == 2:
        for k in range(0, nsplit):
            q = PART + (ng * nsplit + k).to(tl.int64) * 2
            sum_d += tl.load(q)
            sum_xd += tl.load(q + 1)
    elif has_xd != 0:
        for c0 in range(0, Cg, BC):
            for s0 in range(s_lo, s_hi, BS):
                off, mask = _tile(c0, s0, Cg, s_hi, stride_r, CL, BC, BS)
                x = tl.load(X + bx + off, mask=mask, other=0.0).to(tl.float32)
                xd = tl.load(XD + bxd + off, mask=mask, other=0.0).to(tl.float32)
                sum_d += tl.sum(xd)
                sum_xd += tl.sum((x - mean) * xd)
    if mode == 1:
        q = PART + pid.to(tl.int64) * 2
        tl.store(q, sum_d)
        tl.store(q + 1, sum_xd)
    else:
        m1 = sum_d / M  # mean(x_dot)
        m2 = rstd * sum_xd / M  # mean(x^ x_dot)
        byd = _group_base(n, g, Cg, stride_ydn, stride_r, CL)
        for c0 in range(0, Cg, BC):
            cl = c0 + tl.arange(0, BC)
            cmask = cl < Cg
            c = g * Cg + cl
            gam = _vec(W, 0, c, cmask, 0, stride_w)
            bet = _vec(Bi, 0, c, cmask, 0, stride_b)
            s = _vec(SC, n, c, cmask, stride_scn, stride_scc)
            sd = _vec(SCD, n, c, cmask, stride_scdn, stride_scdc)
            A = _chan(gam * s, CL)
            B = _chan(bet * s + _vec(SH, n, c, cmask, stride_shn, stride_shc), CL)
            Ad = _chan(_vec(WD, 0, c, cmask, 0, stride_wd) * s + gam * sd, CL)
            Bd = _chan(_vec(BD, 0, c, cmask, 0, stride_bd) * s + bet * sd
                       + _vec(SHD, n, c, cmask, stride_shdn, stride_shdc), CL)
            for s0 in range(s_lo, s_hi, BS):
                off, mask = _tile(c0, s0, Cg, s_hi, stride_r, CL, BC, BS)
                x = tl.load(X + bx + off, mask=mask, other=0.0).to(tl.float32)
                xh = (x - mean) * rstd
                if has_xd != 0:
                    xd = tl.load(XD + bxd + off, mask=mask, other=0.0).to(tl.float32)
                    xhd = rstd * (xd - m1 - xh * m2)
                else:
                    xhd = tl.zeros_like(xh)
                a = xh * A + B
                ad = xhd * A + xh * Ad + Bd
                sig, dsilu = _silu_grad(a)
                yd = tl.where(act != 0, dsilu * ad, ad)
                tl.store(YD + byd + off, yd.to(YD.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Backward (A30)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _gn_bwd_kernel(
    DY,  # (N, C, S) upstream gradient (x's dtype), batch stride stride_dyn
    X,  # (N, C, S) primal x, batch stride stride_xn
    DX,  # (N, C, S) out: dx, batch stride stride_dxn
    W, Bi, SC, SH,  # gamma, beta (C,), s, b (N, C), fp32 (as in the forward)
    MEAN, RSTD,  # (N * G,) fp32 statistics of the forward
    P1, P2,  # (N, C, nsplit) fp32 out: sum da x^ and sum da over each program's positions
    GSUM,  # (N * G, 2) fp32 group means (m1, m2) of dx^ and dx^ x^ (mode 2)
    C, S, Cg, G, nsplit, s_split,
    stride_dyn, stride_xn, stride_dxn,
    stride_w, stride_b, stride_scn, stride_scc, stride_shn, stride_shc,
    mode,  # 0 fused, 1 partial P1/P2, 2 dx from GSUM
    act,
    CL: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr,
):
    pid = tl.program_id(0)
    ng = pid // nsplit
    sp = pid % nsplit
    n = (ng // G).to(tl.int64)
    g = ng % G
    s_lo = sp * s_split
    s_hi = tl.minimum(S, s_lo + s_split)
    if CL:
        stride_r = C
    else:
        stride_r = S
    bx = _group_base(n, g, Cg, stride_xn, stride_r, CL)
    bdy = _group_base(n, g, Cg, stride_dyn, stride_r, CL)
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    M = tl.cast(Cg * S, tl.float32)  # tl.cast: Cg * S is a Python int when both are 1
    s1 = tl.zeros([], dtype=tl.float32)  # sum_c A P2 = sum dx^
    s2 = tl.zeros([], dtype=tl.float32)  # sum_c A P1 = sum dx^ x^
    if mode != 2:
        for c0 in range(0, Cg, BC):
            cl = c0 + tl.arange(0, BC)
            cmask = cl < Cg
            c = g * Cg + cl
            s = _vec(SC, n, c, cmask, stride_scn, stride_scc)
            Av = _vec(W, 0, c, cmask, 0, stride_w) * s
            A = _chan(Av, CL)
            B = _chan(_vec(Bi, 0, c, cmask, 0, stride_b) * s + _vec(SH, n, c, cmask, stride_shn, stride_shc), CL)
            p1 = tl.zeros([BC], dtype=tl.float32)
            p2 = tl.zeros([BC], dtype=tl.float32)
            for s0 in range(s_lo, s_hi, BS):
                off, mask = _tile(c0, s0, Cg, s_hi, stride_r, CL, BC, BS)
                x = tl.load(X + bx + off, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + bdy + off, mask=mask, other=0.0).to(tl.float32)
                xh = (x - mean) * rstd
                a = xh * A + B
                sig, dsilu = _silu_grad(a)
                da = tl.where(act != 0, dy * dsilu, dy)
                p1 += _chan_sum(da * xh, CL)
                p2 += _chan_sum(da, CL)
            q = (n * C + c) * nsplit + sp
            tl.store(P1 + q, p1, mask=cmask)
            tl.store(P2 + q, p2, mask=cmask)
            s1 += tl.sum(Av * p2)
            s2 += tl.sum(Av * p1)
    if mode != 1:
        if mode == 2:
            m1 = tl.load(GSUM + ng.to(tl.int64) * 2)
            m2 = tl.load(GSUM + ng.to(tl.int64) * 2 + 1)
        else:
            m1 = s1 / M
            m2 = s2 / M
        bdx = _group_base(n, g, Cg, stride_dxn, stride_r, CL)
        for c0 in range(0, Cg, BC):
            cl = c0 + tl.arange(0, BC)
            cmask = cl < Cg
            c = g * Cg + cl
            s = _vec(SC, n, c, cmask, stride_scn, stride_scc)
            A = _chan(_vec(W, 0, c, cmask, 0, stride_w) * s, CL)
            B = _chan(_vec(Bi, 0, c, cmask, 0, stride_b) * s + _vec(SH, n, c, cmask, stride_shn, stride_shc), CL)
            for s0 in range(s_lo, s_hi, BS):
                off, mask = _tile(c0, s0, Cg, s_hi, stride_r, CL, BC, BS)
                x = tl.load(X + bx + off, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + bdy + off, mask=mask, other=0.0).to(tl.float32)
                xh = (x - mean) * rstd
                a = xh * A + B
                sig, dsilu = _silu_grad(a)
                da = tl.where(act != 0, dy * dsilu, dy)
                dx = rstd * (da * A - m1 - xh * m2)
                tl.store(DX + bdx + off, dx.to(DX.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers: the schemas of csrc/ops.cpp, registered as torch.library custom ops
# (torch.ops.scm_triton.*) so that torch.compile traces them and torch.func transforms dispatch
# through them. x, x_dot, grad_y: (N, C, S) views in one layout (scm_kernels.group_norm.function
# builds them); weight, bias (C,), scale, shift (N, C) and the tangents: float32 or None.
# ---------------------------------------------------------------------------------------------
def _is_cl(x3: Tensor) -> bool:
    N, C, S = x3.shape
    return C > 1 and S > 1 and x3.stride(1) == 1


def _check_ncs(x3: Tensor, name: str, like: Tensor | None = None) -> None:
    if x3.dim() != 3:
        raise ValueError(f"group_norm: {name} must be an (N, C, S) view, got shape {tuple(x3.shape)}")
    N, C, S = x3.shape
    cf = (S == 1 or x3.stride(2) == 1) and (C == 1 or x3.stride(1) == S)
    cl = (C == 1 or x3.stride(1) == 1) and (S == 1 or x3.stride(2) == C)
    if not (cf or cl):
        raise ValueError(f"group_norm: {name} must be channels-first or channels-last, got strides {x3.stride()}")
    if C * S >= 2**31:
        raise ValueError(f"group_norm: backend 'triton' needs C * S < 2^31 per sample, got {C} * {S}")
    if like is not None and (x3.shape != like.shape or _is_cl(x3) != _is_cl(like) or x3.dtype != like.dtype):
        raise ValueError(f"group_norm: {name} must have x's shape, dtype and layout")


def configs(channels_last: bool) -> tuple:
    """The tiles of one layout: CONFIGS, and in channels_last CL_CONFIGS too."""
    return CONFIGS + CL_CONFIGS if channels_last else CONFIGS


def config(Cg: int, S: int, channels_last: bool = False) -> tuple[int, int]:
    """The tile (BC, BS) of a (Cg, S) group. NCHW: the tile of CONFIGS with the fewest masked lanes.
    channels_last: the narrowest tile whose BC covers the group's Cg channels (the widest when none
    does): a position's Cg channels are one contiguous run, so a narrower tile reads each memory
    sector once per BC channels (measured on an H100: 32 x 512 x 64 x 64 bf16 with (2, 1024) tiles
    took 3.9 ms, 26 times the NCHW time)."""
    if channels_last:
        tiles = sorted(configs(True), key=lambda t: t[0])
        return next((t for t in tiles if t[0] >= Cg), tiles[-1])

    def waste(cfg):
        bc, bs = cfg
        return (-(-Cg // bc) * bc) * (-(-S // bs) * bs)
    return min(CONFIGS, key=waste)


def resident_tile(N: int, C: int, S: int, G: int, device: torch.device,
                  dtype: torch.dtype = torch.float32) -> Optional[tuple[int, int, int]]:
    """(BC, BS, num_warps) of the forward's mode 3 (one read of x: the group stays in registers), or None.
    Taken on a GPU when the padded group (next powers of two of Cg and S) fits one of RESIDENT_TILES
    and N*G programs fill the GPU without splitting groups; not for float64 (its tile spills)."""
    Cg = C // G
    on_gpu = device.type == "cuda"
    if dtype == torch.float64:
        return None
    if not (on_gpu or INTERPRETER_RESIDENT) or N * G < (TARGET_PROGRAMS if on_gpu else INTERPRETER_TARGET_PROGRAMS):
        return None
    bc, bs = triton.next_power_of_2(Cg), triton.next_power_of_2(S)
    for total, warps in RESIDENT_TILES:
        if bc <= RESIDENT_MAX_BC and RESIDENT_MIN <= bc * bs <= total:
            return bc, total // bc, warps
    return None


def plan(N: int, C: int, S: int, G: int, device: torch.device,
         channels_last: bool = False) -> tuple[int, int, int, int]:
    """(BC, BS, nsplit, s_split): the tile, and the split of each group's S positions into nsplit
    ranges of s_split (a multiple of BS) positions, one program each."""
    Cg = C // G
    bc, bs = config(Cg, S, channels_last)
    target = TARGET_PROGRAMS if device.type == "cuda" else INTERPRETER_TARGET_PROGRAMS
    k = 1
    if N * G < target:
        k = min(-(-target // (N * G)), max(1, (Cg * S) // MIN_PER_PROGRAM), -(-S // bs))
    s_split = -(-(-(-S // max(k, 1))) // bs) * bs
    return bc, bs, -(-S // s_split), s_split


_CONSTS: dict = {}


def _const(value: float, device: torch.device) -> Tensor:
    """A one-element fp32 constant (read with stride 0 for an absent operand)."""
    key = (value, device)
    t = _CONSTS.get(key)
    if t is None:
        t = _CONSTS[key] = torch.full((1,), value, dtype=torch.float32, device=device)
    return t


def _chan_arg(v: Optional[Tensor], default: float, device) -> tuple[Tensor, int]:
    """(tensor, stride) of a (C,) operand; the constant `default` with stride 0 when absent."""
    if v is None:
        return _const(default, device), 0
    return v, v.stride(0)


def _nc_arg(v: Optional[Tensor], default: float, device) -> tuple[Tensor, int, int]:
    """(tensor, stride_n, stride_c) of an (N, C) operand; the constant `default` when absent."""
    if v is None:
        return _const(default, device), 0, 0
    return v, v.stride(0), v.stride(1)


def _empty_ncs(x3: Tensor) -> Tensor:
    from scm_kernels.group_norm.function import empty_ncs

    return empty_ncs(x3)


@torch.library.custom_op("scm_triton::group_norm", mutates_args=())
def group_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale: Optional[Tensor],
               shift: Optional[Tensor], num_groups: int, eps: float, silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Forward (A28): (y in x's layout, mean (N, G), rstd (N, G))."""
    _check_ncs(x, "x")
    N, C, S = x.shape
    G, dev = num_groups, x.device
    bc, bs, nsplit, s_split = plan(N, C, S, G, dev, _is_cl(x))
    y = _empty_ncs(x)
    mean = torch.empty((N, G), dtype=torch.float32, device=dev)
    rstd = torch.empty((N, G), dtype=torch.float32, device=dev)
    W, sw = _chan_arg(weight, 1.0, dev)
    Bi, sb = _chan_arg(bias, 0.0, dev)
    SC, scn, scc = _nc_arg(scale, 1.0, dev)
    SH, shn, shc = _nc_arg(shift, 0.0, dev)
    part = torch.empty((N * G * nsplit, 3) if nsplit > 1 else (1,), dtype=torch.float32, device=dev)
    warps = NUM_WARPS
    res = resident_tile(N, C, S, G, dev, x.dtype)
    if res is not None:
        bc, bs, warps = res

    def launch(mode):
        _gn_fwd_kernel[(N * G * nsplit,)](
            x, y, W, Bi, SC, SH, mean, rstd, part, C, S, C // G, G, nsplit, s_split,
            x.stride(0), y.stride(0), sw, sb, scn, scc, shn, shc, float(eps), int(silu),
            MODE=mode, CL=_is_cl(x), BC=bc, BS=bs, num_warps=warps)

    if res is not None:
        launch(3)
    elif nsplit == 1:
        launch(0)
    else:
        launch(1)
        launch(2)
    return y, mean, rstd


@group_norm.register_fake
def _(x, weight, bias, scale, shift, num_groups, eps, silu):
    from scm_kernels.group_norm.function import fake_forward

    return fake_forward(x, weight, bias, scale, shift, num_groups, eps, silu)


@torch.library.custom_op("scm_triton::group_norm_jvp", mutates_args=())
def group_norm_jvp(x: Tensor, x_dot: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                   scale: Optional[Tensor], shift: Optional[Tensor], weight_dot: Optional[Tensor],
                   bias_dot: Optional[Tensor], scale_dot: Optional[Tensor], shift_dot: Optional[Tensor],
                   mean: Tensor, rstd: Tensor, num_groups: int, silu: bool) -> Tensor:
    """Tangent y_dot (A29) in x's layout; absent tangents are zero."""
    _check_ncs(x, "x")
    if x_dot is not None:
        _check_ncs(x_dot, "x_dot", like=x)
    N, C, S = x.shape
    G, dev = num_groups, x.device
    bc, bs, nsplit, s_split = plan(N, C, S, G, dev, _is_cl(x))
    has_xd = x_dot is not None
    if not has_xd:
        nsplit, s_split = 1, S  # nothing to reduce: one apply pass
    yd = _empty_ncs(x)
    XD = x_dot if has_xd else x
    W, sw = _chan_arg(weight, 1.0, dev)
    Bi, sb = _chan_arg(bias, 0.0, dev)
    SC, scn, scc = _nc_arg(scale, 1.0, dev)
    SH, shn, shc = _nc_arg(shift, 0.0, dev)
    WD, swd = _chan_arg(weight_dot, 0.0, dev)
    BD, sbd = _chan_arg(bias_dot, 0.0, dev)
    SCD, scdn, scdc = _nc_arg(scale_dot, 0.0, dev)
    SHD, shdn, shdc = _nc_arg(shift_dot, 0.0, dev)
    part = torch.empty((N * G * nsplit, 2) if nsplit > 1 else (1,), dtype=torch.float32, device=dev)

    def launch(mode):
        _gn_jvp_kernel[(N * G * nsplit,)](
            x, XD, yd, W, Bi, SC, SH, WD, BD, SCD, SHD, mean, rstd, part, C, S, C // G, G, nsplit, s_split,
            x.stride(0), XD.stride(0), yd.stride(0), sw, sb, scn, scc, shn, shc, swd, sbd, scdn, scdc, shdn, shdc,
            mode, int(silu), int(has_xd), CL=_is_cl(x), BC=bc, BS=bs, num_warps=NUM_WARPS)

    if nsplit == 1:
        launch(0)
    else:
        launch(1)
        launch(2)
    return yd


@group_norm_jvp.register_fake
def _(x, x_dot, weight, bias, scale, shift, weight_dot, bias_dot, scale_dot, shift_dot, mean, rstd, num_groups,
      silu):
    return _empty_ncs(x)


@torch.library.custom_op("scm_triton::group_norm_backward", mutates_args=())
def group_norm_backward(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        scale: Optional[Tensor], shift: Optional[Tensor], mean: Tensor, rstd: Tensor,
                        num_groups: int, silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx in x's layout, P1 = sum_spatial da x^ (N, C), P2 = sum_spatial da (N, C)) (A30)."""
    _check_ncs(x, "x")
    _check_ncs(grad_y, "grad_y", like=x)
    N, C, S = x.shape
    G, dev = num_groups, x.device
    Cg = C // G
    bc, bs, nsplit, s_split = plan(N, C, S, G, dev, _is_cl(x))
    dx = _empty_ncs(x)
    W, sw = _chan_arg(weight, 1.0, dev)
    Bi, sb = _chan_arg(bias, 0.0, dev)
    SC, scn, scc = _nc_arg(scale, 1.0, dev)
    SH, shn, shc = _nc_arg(shift, 0.0, dev)
    p1 = torch.empty((N, C, nsplit), dtype=torch.float32, device=dev)
    p2 = torch.empty((N, C, nsplit), dtype=torch.float32, device=dev)
    gsum = torch.empty((N * G, 2) if nsplit > 1 else (1,), dtype=torch.float32, device=dev)

    def launch(mode):
        _gn_bwd_kernel[(N * G * nsplit,)](
            grad_y, x, dx, W, Bi, SC, SH, mean, rstd, p1, p2, gsum, C, S, Cg, G, nsplit, s_split,
            grad_y.stride(0), x.stride(0), dx.stride(0), sw, sb, scn, scc, shn, shc, mode, int(silu),
            CL=_is_cl(x), BC=bc, BS=bs, num_warps=NUM_WARPS)

    if nsplit == 1:
        launch(0)
        return dx, p1.view(N, C), p2.view(N, C)
    launch(1)
    p1, p2 = p1.sum(-1), p2.sum(-1)  # fixed-order sums over the splits
    A = (weight if weight is not None else 1.0) * (scale if scale is not None else torch.ones((N, C), device=dev))
    M = Cg * S
    gsum[:, 0] = (A * p2).reshape(N * G, Cg).sum(-1) / M  # m1 = mean(dx^)
    gsum[:, 1] = (A * p1).reshape(N * G, Cg).sum(-1) / M  # m2 = mean(dx^ x^)
    launch(2)
    return dx, p1, p2


@group_norm_backward.register_fake
def _(grad_y, x, weight, bias, scale, shift, mean, rstd, num_groups, silu):
    from scm_kernels.group_norm.function import fake_backward

    return fake_backward(grad_y, x, weight, bias, scale, shift, mean, rstd, num_groups, silu)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time specs: every (kernel, dtype, layout, tile) the launchers can run on a GPU
# ---------------------------------------------------------------------------------------------
def _aot_specs() -> list:
    specs = []
    f32, i32, cx = "*fp32", "i32", "constexpr"
    sizes = {"C": i32, "S": i32, "Cg": i32, "G": i32, "nsplit": i32, "s_split": i32}
    pstr = {k: i32 for k in ("stride_w", "stride_b", "stride_scn", "stride_scc", "stride_shn", "stride_shc")}
    for dtype, tt in _TT.items():
        for cl in (False, True):
            for bc, bs in configs(cl):
                const = {"CL": cl, "BC": bc, "BS": bs}
                tiles = {"CL": cx, "BC": cx, "BS": cx}
                fwd = {"X": tt, "Y": tt, "W": f32, "Bi": f32, "SC": f32, "SH": f32, "MEAN": f32, "RSTD": f32,
                       "PART": f32, **sizes, "stride_xn": i32, "stride_yn": i32, **pstr, "eps": "fp32",
                       "act": i32, "MODE": cx, **tiles}
                for mode in (0, 1, 2):
                    specs.append(spec("group_norm", _gn_fwd_kernel, fwd, {**const, "MODE": mode},
                                      num_warps=NUM_WARPS))
            for total, warps in RESIDENT_TILES if dtype != torch.float64 else ():
                for bc in (1 << i for i in range(RESIDENT_MAX_BC.bit_length())):  # powers of two up to it
                    specs.append(spec("group_norm", _gn_fwd_kernel, fwd,
                                      {"CL": cl, "BC": bc, "BS": total // bc, "MODE": 3}, num_warps=warps))
            for bc, bs in configs(cl):
                const = {"CL": cl, "BC": bc, "BS": bs}
                tiles = {"CL": cx, "BC": cx, "BS": cx}
                jvp = {"X": tt, "XD": tt, "YD": tt, "W": f32, "Bi": f32, "SC": f32, "SH": f32, "WD": f32,
                       "BD": f32, "SCD": f32, "SHD": f32, "MEAN": f32, "RSTD": f32, "PART": f32, **sizes,
                       "stride_xn": i32, "stride_xdn": i32, "stride_ydn": i32, **pstr,
                       **{k: i32 for k in ("stride_wd", "stride_bd", "stride_scdn", "stride_scdc", "stride_shdn",
                                           "stride_shdc")},
                       "mode": i32, "act": i32, "has_xd": i32, **tiles}
                specs.append(spec("group_norm", _gn_jvp_kernel, jvp, const, num_warps=NUM_WARPS))
                bwd = {"DY": tt, "X": tt, "DX": tt, "W": f32, "Bi": f32, "SC": f32, "SH": f32, "MEAN": f32,
                       "RSTD": f32, "P1": f32, "P2": f32, "GSUM": f32, **sizes, "stride_dyn": i32,
                       "stride_xn": i32, "stride_dxn": i32, **pstr, "mode": i32, "act": i32, **tiles}
                specs.append(spec("group_norm", _gn_bwd_kernel, bwd, const, num_warps=NUM_WARPS))
    return specs


AOT_SPECS = _aot_specs()
