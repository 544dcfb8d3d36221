"""Triton backward kernels of attention: the primal backward (A26) and the backward of the tangent
output (A27), both FlashAttention-2 style (P recomputed from the forward's LSE, O(N) memory,
deterministic: no atomics, every sum in a fixed order).

Notation (shared/docs/algorithm.md, section 5), per query row i and key j of one head, λ = scale:
    s_ij = λ q_i·k_j (+ additive mask, −∞ where masked),  P_ij = exp(s_ij − lse_i)
    ṡ_ij = λ (q̇_i·k_j + q_i·k̇_j),  mu_i = Σ_j P_ij ṡ_ij  (saved by the JVP forward)
(A26) upstream dO:
    Δ_i = dO_i·O_i;  dv_j = Σ_i P_ij dO_i;  ds_ij = P_ij (dO_i·v_j − Δ_i)
    dq_i = λ Σ_j ds_ij k_j;  dk_j = λ Σ_i ds_ij q_i
(A27) upstream dO and g (the gradient of the tangent output Ȯ):
    ν_i = g_i·O_i,  Δ'_i = dO_i·O_i + g_i·Ȯ_i
    dṡ_ij = P_ij (g_i·v_j − ν_i)
    ds_ij = P_ij (dO_i·v_j + g_i·v̇_j − Δ'_i) + dṡ_ij (ṡ_ij − mu_i)
    dv_j = Σ_i P_ij dO_i + Σ_i P_ij (ṡ_ij − mu_i) g_i,   dv̇_j = Σ_i P_ij g_i
    dq_i = λ Σ_j (ds_ij k_j + dṡ_ij k̇_j),   dq̇_i = λ Σ_j dṡ_ij k_j
    dk_j = λ Σ_i (ds_ij q_i + dṡ_ij q̇_i),   dk̇_j = λ Σ_i dṡ_ij q_i
With g = 0, (A27) is (A26). The tangent gradients are J^T g, i.e. (A26) with dO := g and Δ := ν:
dv̇ = Σ_i P_ij g_i, dq̇ = λ Σ_j dṡ_ij k_j, dk̇ = λ Σ_i dṡ_ij q_i. They run on the (A26) kernels, and the
(A27) kernels only accumulate dq, dk, dv, which keeps every program at one or two accumulators
(what lets head dims up to 256 compile without register spills).

Kernels (all deterministic: no atomics, every sum in a fixed order):
  _attn_bwd_dq_kernel    one program per (query block, b·Hq): first the row statistic of its rows,
                         Δ = dO·O (Δ' = dO·O + g·Ȯ), stored; then loops over the key blocks, dq.
  _attn_bwd_dkdv_kernel  one program per (key block, b·Hkv): loops over the G query heads of the
                         group and their query blocks (P recomputed, transposed tiles (BLOCK_N,
                         BLOCK_M)) and accumulates dk and/or dv in fp32 registers: GQA sums inside
                         one program. COMPUTE_DK / COMPUTE_DV split it in two where registers are
                         short. Launched after the dq kernel, whose Δ it reads.
ν = g·O of (A27) is the Δ of the (A26) launch with dO := g, which runs first (see _run). There is
no separate preprocessing kernel: every kernel here is matmul work on the tensor cores.
HAS_G selects (A26) or (A27); in (A27) the constexpr switches HAS_DO/HAS_TQ/HAS_TK/HAS_TV compile
in the terms of dO, q̇, k̇, v̇. A compiled-in operand that is absent at run time (bit of `flags`)
is read as zeros (loads predicated off); see JVP_PRESENCE for which patterns are compiled.

Logits are kept in the log2 domain: P = exp2(q·k (λ log2 e) − lse·log2 e (+ mask·log2 e)), one
FMA per element, all in fp32 (fp16 logits of 1e4 cannot overflow). P, ds and dṡ are rounded to the
input dtype before their tensor-core matmuls (as FlashAttention does); every accumulator is fp32.

Masks (a run-time kind in `flags`, so no extra compilations): 0 none, 1 bool (a uint8 view of it;
nonzero = attend), 2 additive fp32, read through the four strides of the expanded view (0 allowed).
Causal (top-left, key j visible to query i iff j <= i) is the run-time argument `causal_shift`:
key j is visible iff j < i + shift, shift = 1 when causal and Nk (everything) otherwise; blocks
wholly above the diagonal are skipped, and the per-element test only runs on the blocks that
straddle the diagonal or the key bound. Rows padded
past Nq read lse = +inf (so P = 0); fully masked rows have lse = +inf from the forward and so
contribute nothing (exp2(−inf) = 0, never NaN). Head dims are padded to the power-of-two BLOCK_D
with masked loads (D and Dv may differ). Offsets of batch, head and block starts are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from scm_kernels._spec import spec
from scm_kernels.attention.blockwise import Blocks

LOG2E = 1.4426950408889634
PRECISIONS = ("ieee", "tf32")
# tl.dot input_precision of each fp32 `precision`: "ieee" is fp32-accurate through tl.dot's 3xTF32
# split on the tensor cores (as in the forward, triton_fwd.DOT_INPUT_PRECISION), not FMA-unit dots.
DOT_PREC = {"ieee": "tf32x3", "tf32": "tf32"}
STAT_DC = tl.constexpr(32)  # column-slice width of the dq kernel's row-statistic loop


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST (only under the interpreter, whose bf16 tl.dot
    is broken) multiplies fp32 copies of the operands instead."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _load_tile(ptr, r0, stride_r, n_r, n_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows r0 .. r0 + BLOCK_R of a row-major (n_r, n_c) matrix at ptr with row stride stride_r and
    inner stride 1, zero-padded to (BLOCK_R, BLOCK_C). r0 * stride_r is formed in int64."""
    ar = tl.arange(0, BLOCK_R)
    ac = tl.arange(0, BLOCK_C)
    mask = ((r0 + ar)[:, None] < n_r) & (ac[None, :] < n_c)
    base = ptr + tl.cast(r0, tl.int64) * stride_r
    return tl.load(base + ar[:, None] * stride_r + ac[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, x, r0, stride_r, n_r, n_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Store the fp32 tile x (BLOCK_R, BLOCK_C) into rows r0.. of ptr (as _load_tile), cast to ptr's dtype."""
    ar = tl.arange(0, BLOCK_R)
    ac = tl.arange(0, BLOCK_C)
    mask = ((r0 + ar)[:, None] < n_r) & (ac[None, :] < n_c)
    base = ptr + tl.cast(r0, tl.int64) * stride_r
    tl.store(base + ar[:, None] * stride_r + ac[None, :], x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mask_logits(s, mb_ptr, mf_ptr, mask_kind, a0, b0, stride_a, stride_b, n_a, n_b,
                 BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """Apply the user mask to the log2-domain tile s (logits minus lse), whose rows are mask index
    a0 + i (stride_a) and columns b0 + j (stride_b). mask_kind (runtime): 0 none, 1 bool (mb_ptr,
    uint8: 0 -> −inf, also out of bounds), 2 additive float32 (mf_ptr: + m·log2 e)."""
    if mask_kind != 0:
        aa = tl.arange(0, BLOCK_A)
        ab = tl.arange(0, BLOCK_B)
        off = tl.cast(a0, tl.int64) * stride_a + tl.cast(b0, tl.int64) * stride_b
        loc = aa[:, None] * stride_a + ab[None, :] * stride_b
        inb = ((a0 + aa)[:, None] < n_a) & ((b0 + ab)[None, :] < n_b)
        if mask_kind == 1:
            keep = tl.load(mb_ptr + off + loc, mask=inb, other=0)
            s = tl.where(keep != 0, s, float("-inf"))
        else:
            s = s + tl.load(mf_ptr + off + loc, mask=inb, other=0.0) * 1.4426950408889634
    return s


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["flags", "causal_shift"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, TQ, TK, TV,  # inputs q (B,Hq,Nq,D), k (B,Hkv,Nk,D), v (B,Hkv,Nk,Dv) and their tangents
    DO, GT,  # (B, Hq, Nq, Dv) grad_out, grad_out_tangent
    LSE, DELTA, MU, NU,  # (B*Hq*Nq,) f32 row statistics: lse, Δ (Δ' with HAS_G), mu, ν
    MASKB, MASKF,  # (B, Hq, Nq, Nk) user mask, bool as uint8 or additive f32 (see flags), any strides
    DK, DV,  # outputs like k, v
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,  # (b, h, n) strides of the inputs
    s_tqb, s_tqh, s_tqn, s_tkb, s_tkh, s_tkn, s_tvb, s_tvh, s_tvn,
    s_dob, s_doh, s_don, s_gb, s_gh, s_gn,
    s_mb, s_mh, s_mq, s_mk,  # mask strides (b, h, query, key)
    s_dkb, s_dkh, s_dkn, s_dvb, s_dvh, s_dvn,  # (b, h, n) strides of the outputs
    Hq, Hkv, Nq, Nk, D, Dv, n_nblocks,
    flags,  # bits 0-3: dO, q̇, k̇, v̇ given (one compiled in but absent reads as zeros); bits 4-5: mask kind
    causal_shift,  # key j visible to query i iff j < i + causal_shift (1: causal, Nk: not)
    scale, qk_scale2,  # λ and λ log2(e)
    HAS_G: tl.constexpr,  # False: (A26); True: the dk, dv of (A27) with the HAS_DO/TQ/TK/TV terms compiled in
    HAS_DO: tl.constexpr, HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr,
    COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr,  # which outputs this program computes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    bhk = (pid // n_nblocks).to(tl.int64)
    n0 = (pid % n_nblocks) * BLOCK_N
    b = bhk // Hkv
    hk = bhk % Hkv
    group = Hq // Hkv
    dt = Q.dtype.element_ty
    mask_kind = (flags >> 4) & 3
    # Rows of an operand absent at run time are predicated off (never read, zeros).
    nq_do = tl.where((flags & 1) != 0, Nq, 0)
    nq_tq = tl.where((flags & 2) != 0, Nq, 0)
    nk_tk = tl.where((flags & 4) != 0, Nk, 0)
    nk_tv = tl.where((flags & 8) != 0, Nk, 0)
    DO_ON: tl.constexpr = HAS_DO or not HAS_G
    offs_n = n0 + tl.arange(0, BLOCK_N)
    arange_m = tl.arange(0, BLOCK_M)
    # The key-block tiles: loaded once, reused for every query block.
    k = _load_tile(K + b * s_kb + hk * s_kh, n0, s_kn, Nk, D, BLOCK_N, BLOCK_D)
    if HAS_G and HAS_TK:
        tk = _load_tile(TK + b * s_tkb + hk * s_tkh, n0, s_tkn, nk_tk, D, BLOCK_N, BLOCK_D)
    if COMPUTE_DK:
        v = _load_tile(V + b * s_vb + hk * s_vh, n0, s_vn, Nk, Dv, BLOCK_N, BLOCK_DV)
        if HAS_G and HAS_TV:
            tv = _load_tile(TV + b * s_tvb + hk * s_tvh, n0, s_tvn, nk_tv, Dv, BLOCK_N, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # Query rows that see a key of the block: i >= n0 - shift + 1 (every row when not causal).
    m_lo = (tl.maximum(n0 - causal_shift + 1, 0) // BLOCK_M) * BLOCK_M
    n_mb = tl.maximum(tl.cdiv(Nq - m_lo, BLOCK_M), 0)
    # One flat loop over (query head of the group, query block): a fixed summation order.
    for it in range(0, group * n_mb):
        gi = it // n_mb
        m0 = m_lo + (it - gi * n_mb) * BLOCK_M
        h = hk * group + gi
        offs_m = m0 + arange_m
        rows = (b * Hq + h) * Nq + offs_m
        row_ok = offs_m < Nq
        q = _load_tile(Q + b * s_qb + h * s_qh, m0, s_qn, Nq, D, BLOCK_M, BLOCK_D)
        lse2 = tl.load(LSE + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
        # (s_ij − lse_i) log2(e) on the transposed tile (keys x queries), one FMA per element
        sT = tl.fma(_dot(k, tl.trans(q), None, PREC, UPCAST), qk_scale2, -lse2[None, :])
        sT = _mask_logits(sT, MASKB + b * s_mb + h * s_mh, MASKF + b * s_mb + h * s_mh, mask_kind, n0, m0,
                          s_mk, s_mq, Nk, Nq, BLOCK_N, BLOCK_M)
        if n0 + BLOCK_N > m0 + causal_shift:  # the block straddles the causal diagonal
            lim = tl.minimum(offs_m + causal_shift, Nk)
            sT = tl.where(offs_n[:, None] < lim[None, :], sT, float("-inf"))
        pT = tl.math.exp2(sT)  # P transposed
        if DO_ON:
            do = _load_tile(DO + b * s_dob + h * s_doh, m0, s_don, nq_do, Dv, BLOCK_M, BLOCK_DV)
        if HAS_G:
            g = _load_tile(GT + b * s_gb + h * s_gh, m0, s_gn, Nq, Dv, BLOCK_M, BLOCK_DV)
            mu = tl.load(MU + rows, mask=row_ok, other=0.0)
            sdT = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # (ṡ − mu) transposed
            if HAS_TQ:
                tq = _load_tile(TQ + b * s_tqb + h * s_tqh, m0, s_tqn, nq_tq, D, BLOCK_M, BLOCK_D)
                sdT = _dot(k, tl.trans(tq), sdT, PREC, UPCAST)
            if HAS_TK:
                sdT = _dot(tk, tl.trans(q), sdT, PREC, UPCAST)
            sdT = sdT * scale - mu[None, :]
        if COMPUTE_DV:
            if DO_ON:
                dv = _dot(pT.to(dt), do, dv, PREC, UPCAST)  # Σ_i P_ij dO_i
            if HAS_G:
                dv = _dot((pT * sdT).to(dt), g, dv, PREC, UPCAST)  # + Σ_i P_ij (ṡ_ij − mu_i) g_i
        if COMPUTE_DK:
            delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
            dpT = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # dO_i·v_j + g_i·v̇_j
            if DO_ON:
                dpT = _dot(v, tl.trans(do), dpT, PREC, UPCAST)
            if HAS_G:
                if HAS_TV:
                    dpT = _dot(tv, tl.trans(g), dpT, PREC, UPCAST)
                nu = tl.load(NU + rows, mask=row_ok, other=0.0)
                dsdT = pT * (_dot(v, tl.trans(g), None, PREC, UPCAST) - nu[None, :])  # dṡ transposed
                dsT = pT * (dpT - delta[None, :]) + dsdT * sdT
                if HAS_TQ:
                    dk = _dot(dsdT.to(dt), tq, dk, PREC, UPCAST)  # Σ_i dṡ_ij q̇_i
            else:
                dsT = pT * (dpT - delta[None, :])
            dk = _dot(dsT.to(dt), q, dk, PREC, UPCAST)  # Σ_i ds_ij q_i
    if COMPUTE_DK:
        _store_tile(DK + b * s_dkb + hk * s_dkh, dk * scale, n0, s_dkn, Nk, D, BLOCK_N, BLOCK_D)
    if COMPUTE_DV:
        _store_tile(DV + b * s_dvb + hk * s_dvh, dv, n0, s_dvn, Nk, Dv, BLOCK_N, BLOCK_DV)


@triton.jit(do_not_specialize=["flags", "causal_shift"])
def _attn_bwd_dq_kernel(
    Q, K, V, TQ, TK, TV,  # as in _attn_bwd_dkdv_kernel
    DO, GT,
    LSE, DELTA, MU, NU,
    MASKB, MASKF,
    O, OT,  # (B, Hq, Nq, Dv) out and out_tangent, for the row statistic Δ (Δ') this kernel writes
    DQ,  # output like q
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    s_tqb, s_tqh, s_tqn, s_tkb, s_tkh, s_tkn, s_tvb, s_tvh, s_tvn,
    s_dob, s_doh, s_don, s_gb, s_gh, s_gn,
    s_mb, s_mh, s_mq, s_mk,
    s_ob, s_oh, s_on, s_otb, s_oth, s_otn,
    s_dqb, s_dqh, s_dqn,
    Hq, Hkv, Nq, Nk, D, Dv, n_mblocks,
    flags, causal_shift, scale, qk_scale2,
    HAS_G: tl.constexpr,
    HAS_DO: tl.constexpr, HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = (pid // n_mblocks).to(tl.int64)
    # the last query blocks (the longest under a causal mask) start first
    m0 = (n_mblocks - 1 - pid % n_mblocks) * BLOCK_M
    b = bh // Hq
    h = bh % Hq
    hk = h // (Hq // Hkv)
    dt = Q.dtype.element_ty
    mask_kind = (flags >> 4) & 3
    nq_do = tl.where((flags & 1) != 0, Nq, 0)
    nq_tq = tl.where((flags & 2) != 0, Nq, 0)
    nk_tk = tl.where((flags & 4) != 0, Nk, 0)
    nk_tv = tl.where((flags & 8) != 0, Nk, 0)
    DO_ON: tl.constexpr = HAS_DO or not HAS_G
    offs_m = m0 + tl.arange(0, BLOCK_M)
    arange_n = tl.arange(0, BLOCK_N)
    rows = bh * Nq + offs_m
    row_ok = offs_m < Nq
    # The row statistic of the block (FlashAttention-2's preprocessing pass, folded in here): Δ = dO·O,
    # with HAS_G Δ' = dO·O + g·Ȯ, fp32 sums of the input-dtype products, read in STAT_DC-wide
    # column slices before the resident tiles (so it adds no registers to the main loop). Stored for
    # the dk/dv kernel, which the launcher runs after this one.
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, Dv, STAT_DC):
        if DO_ON:
            do_c = _load_tile(DO + b * s_dob + h * s_doh + c0, m0, s_don, nq_do, Dv - c0, BLOCK_M, STAT_DC)
            o_c = _load_tile(O + b * s_ob + h * s_oh + c0, m0, s_on, nq_do, Dv - c0, BLOCK_M, STAT_DC)
            delta += tl.sum(do_c.to(tl.float32) * o_c.to(tl.float32), axis=1)
        if HAS_G:
            g_c = _load_tile(GT + b * s_gb + h * s_gh + c0, m0, s_gn, Nq, Dv - c0, BLOCK_M, STAT_DC)
            ot_c = _load_tile(OT + b * s_otb + h * s_oth + c0, m0, s_otn, Nq, Dv - c0, BLOCK_M, STAT_DC)
            delta += tl.sum(g_c.to(tl.float32) * ot_c.to(tl.float32), axis=1)
    tl.store(DELTA + rows, delta, mask=row_ok)
    # The query-block tiles: loaded once, reused for every key block.
    q = _load_tile(Q + b * s_qb + h * s_qh, m0, s_qn, Nq, D, BLOCK_M, BLOCK_D)
    if DO_ON:
        do = _load_tile(DO + b * s_dob + h * s_doh, m0, s_don, nq_do, Dv, BLOCK_M, BLOCK_DV)
    lse2 = tl.load(LSE + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
    if HAS_G:
        g = _load_tile(GT + b * s_gb + h * s_gh, m0, s_gn, Nq, Dv, BLOCK_M, BLOCK_DV)
        mu = tl.load(MU + rows, mask=row_ok, other=0.0)
        nu = tl.load(NU + rows, mask=row_ok, other=0.0)
        if HAS_TQ:
            tq = _load_tile(TQ + b * s_tqb + h * s_tqh, m0, s_tqn, nq_tq, D, BLOCK_M, BLOCK_D)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    tk_base = TK + b * s_tkb + hk * s_tkh
    tv_base = TV + b * s_tvb + hk * s_tvh
    mb_base = MASKB + b * s_mb + h * s_mh
    mf_base = MASKF + b * s_mb + h * s_mh
    # keys some row of the block sees: j < m0 + BLOCK_M - 1 + shift; every row sees j < m0 + shift
    n_hi = tl.minimum(m0 + BLOCK_M - 1 + causal_shift, Nk)
    n_full = tl.minimum(m0 + causal_shift, Nk)
    lim = tl.minimum(offs_m + causal_shift, Nk)
    for n0 in range(0, n_hi, BLOCK_N):
        offs_n = n0 + arange_n
        k = _load_tile(k_base, n0, s_kn, Nk, D, BLOCK_N, BLOCK_D)
        v = _load_tile(v_base, n0, s_vn, Nk, Dv, BLOCK_N, BLOCK_DV)
        s = tl.fma(_dot(q, tl.trans(k), None, PREC, UPCAST), qk_scale2, -lse2[:, None])  # (s − lse) log2 e
        s = _mask_logits(s, mb_base, mf_base, mask_kind, m0, n0, s_mq, s_mk, Nq, Nk, BLOCK_M, BLOCK_N)
        if n0 + BLOCK_N > n_full:  # the block straddles the causal diagonal or the key bound
            s = tl.where(offs_n[None, :] < lim[:, None], s, float("-inf"))
        p = tl.math.exp2(s)
        dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # dO_i·v_j + g_i·v̇_j
        if DO_ON:
            dp = _dot(do, tl.trans(v), dp, PREC, UPCAST)
        if HAS_G:
            if HAS_TV:
                tv = _load_tile(tv_base, n0, s_tvn, nk_tv, Dv, BLOCK_N, BLOCK_DV)
                dp = _dot(g, tl.trans(tv), dp, PREC, UPCAST)
            sd = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # ṡ − mu
            if HAS_TQ:
                sd = _dot(tq, tl.trans(k), sd, PREC, UPCAST)
            if HAS_TK:
                tk = _load_tile(tk_base, n0, s_tkn, nk_tk, D, BLOCK_N, BLOCK_D)
                sd = _dot(q, tl.trans(tk), sd, PREC, UPCAST)
            sd = sd * scale - mu[:, None]
            dsd = p * (_dot(g, tl.trans(v), None, PREC, UPCAST) - nu[:, None])  # dṡ
            ds = p * (dp - delta[:, None]) + dsd * sd
            if HAS_TK:
                dq = _dot(dsd.to(dt), tk, dq, PREC, UPCAST)  # Σ_j dṡ_ij k̇_j
        else:
            ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(dt), k, dq, PREC, UPCAST)  # Σ_j ds_ij k_j
    _store_tile(DQ + b * s_dqb + h * s_dqh, dq * scale, m0, s_dqn, Nq, D, BLOCK_M, BLOCK_D)


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------
HEAD_BUCKETS = (64, 128, 256)  # BLOCK_D = BLOCK_DV = the bucket of max(D, Dv)


def _block_d(d: int) -> int:
    """The head-dim bucket (power-of-two tile width, zero-padded by masked loads) of head dim d."""
    return max(HEAD_BUCKETS[0], triton.next_power_of_2(d))


# Tiles of one launch family: ((BLOCK_M, BLOCK_N, num_warps, num_stages) of the dk/dv kernel, the
# same of the dq kernel, SPLIT: dk and dv computed by two programs instead of one), keyed by
# (head-dim bucket, (A27) kernels?, fp32 "ieee"?, fp32 "tf32"?) - 16-bit inputs are (.., False,
# False). The same tiles serve sm_80 and sm_90: each was found by compiling a grid of candidate
# tiles (BLOCK_M, BLOCK_N in 16..128, 4 or 8 warps, 1 or 2 stages) for both and keeping a large
# one without register spills (the compile report of python -m scm_kernels.aot). Timed on an H100
# (benchmarks.tune_attention --kernels bwd,jvp_bwd, bf16, B=2, H=16, N=4096, d=64, one tile swapped
# at a time, 2026-11-23): the whole (A26) backward takes 2.20 ms with the shipped tiles; dk/dv
# (64, 128, 8, 2) 1.95 and dq (128, 128, 8, 2) 1.80 or (128, 64, 8, 2) 1.95 are faster but spill
# (8-136 B on sm_80/sm_90). (A27): 7.99 ms shipped; dk/dv (64, 128) or (32, 128) 6.8-6.9 and dq
# (128, 64) or (128, 32) 6.7-7.2, all spilling. Every spill-free tile of the grid was slower than
# the shipped ones. What limits them:
# Triton converts a transposed operand (k^T, v^T, ...) into a register layout holding all of
# BLOCK_D x BLOCK_N per warp, and a tile of fewer than 16 x num_warps rows spreads its warps over
# the columns, so that every warp holds the whole row operand; fp32 "ieee" dots (3xTF32, DOT_PREC)
# need about twice the registers of TF32 ones. None: no candidate compiled without spills; those
# calls run `_blockwise` (PyTorch matmuls over query blocks) instead of kernels.
_T16, _TF32, _IEEE = (False, False), (False, True), (True, False)
GPU_CONFIGS = {
    # (A26) and the tangent gradients of (A27)
    (64, False, *_T16): ((32, 128, 8, 2), (128, 32, 8, 2), False),
    (128, False, *_T16): ((16, 16, 4, 2), (32, 32, 8, 2), False),
    (256, False, *_T16): ((16, 16, 4, 1), (16, 32, 4, 1), False),
    (64, False, *_TF32): ((16, 128, 8, 2), (128, 32, 8, 2), False),
    (128, False, *_TF32): ((16, 16, 4, 2), (16, 32, 4, 2), False),
    (256, False, *_TF32): ((16, 16, 4, 1), (16, 16, 4, 1), False),
    (64, False, *_IEEE): ((16, 32, 8, 1), (16, 64, 8, 1), False),
    (128, False, *_IEEE): ((16, 16, 8, 2), (16, 32, 8, 1), True),
    (256, False, *_IEEE): None,
    # dq, dk, dv of (A27)
    (64, True, *_T16): ((16, 128, 8, 2), (128, 16, 8, 2), False),
    (128, True, *_T16): None,
    (256, True, *_T16): None,
    (64, True, *_TF32): ((16, 16, 4, 2), (128, 16, 8, 2), False),
    (128, True, *_TF32): None,
    (256, True, *_TF32): None,
    (64, True, *_IEEE): None,
    (128, True, *_IEEE): None,
    (256, True, *_IEEE): None,
}


def _gpu_config(bd: int, jvp: bool, dtype: torch.dtype, prec: str):
    f32 = dtype == torch.float32
    return GPU_CONFIGS[(bd, jvp, f32 and prec == "ieee", f32 and prec == "tf32")]


# The presence patterns (HAS_DO, HAS_TQ, HAS_TK, HAS_TV) compiled for the tangent backward on a GPU.
# A call uses the first pattern that covers its operands; an absent operand of a covering pattern is
# read as zeros (its loads are predicated off, no memory traffic, but its matmuls run). Each extra
# pattern here costs one more set of compiled kernels (AOT_SPECS) and skips its matmuls.
JVP_PRESENCE = ((True, True, True, True),)

# Under the interpreter: small tiles and exact presence switches (the tests can change both).
INTERPRETER_CONFIG = [(16, 32, 1, 1), (32, 16, 1, 1), False]
INTERPRETER_EXACT_PRESENCE = True


def _interpret() -> bool:
    from scm_kernels.backend import triton_interpret

    return triton_interpret()


def _presence(has_do, has_tq, has_tk, has_tv, interp: bool):
    want = (has_do, has_tq, has_tk, has_tv)
    if interp and INTERPRETER_EXACT_PRESENCE:
        return want
    for pat in JVP_PRESENCE:
        if all(p or not w for p, w in zip(pat, want)):
            return pat
    return (True, True, True, True)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _s3(x):
    """(b, h, n) strides of a 4-D tensor, zeros for an absent one."""
    return (0, 0, 0) if x is None else tuple(x.stride()[:3])


def _inner1(x):
    """x with inner stride 1 (the Python layer guarantees it; this is only a safety net)."""
    if x is None or x.stride(-1) == 1 or x.shape[-1] == 1:
        return x
    return x.contiguous()


def _mask_args(mask, lse):
    """(mask kind, uint8 pointer, float32 pointer, 4 strides) for the kernels; the pointer of the
    other kind (never read) is lse's storage, so nothing is allocated."""
    lse_u8 = lse.view(torch.uint8)
    if mask is None:
        return 0, lse_u8, lse, (0, 0, 0, 0)
    if mask.dtype == torch.bool:
        return 1, mask.view(torch.uint8), lse, mask.stride()
    if mask.dtype == torch.float32:
        return 2, lse_u8, mask, mask.stride()
    raise TypeError(f"mask must be bool or float32, got {mask.dtype}")


def _launch(do, g, q, k, v, tq, tk, tv, out, out_t, lse, delta, mu, nu, mask, is_causal, scale, dq, dk, dv,
            presence, cfg, prec, upcast):
    """The dq kernel, which also writes the row statistic `delta` (Δ = dO·O, or Δ' = dO·O + g·Ȯ
    with g; PyTorch computes it where dq is not asked for), then the dk/dv kernel for the outputs
    that are not None. g None: (A26) with upstream do; else the (dq, dk, dv) of (A27), `presence`
    (HAS_DO, HAS_TQ, HAS_TK, HAS_TV) compiled in."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    has_g = g is not None
    mask_kind, mb, mf, m_strides = _mask_args(mask, lse)
    flags = sum(int(x is not None) << i for i, x in enumerate((do, tq, tk, tv))) | mask_kind << 4
    ins = (q, k, v, q if tq is None else tq, k if tk is None else tk, v if tv is None else tv,
           g if do is None else do, do if g is None else g, lse, delta, lse if mu is None else mu,
           delta if nu is None else nu, mb, mf)
    in_strides = (*_s3(q), *_s3(k), *_s3(v), *_s3(tq), *_s3(tk), *_s3(tv), *_s3(do), *_s3(g), *m_strides)
    sw = dict(HAS_G=has_g, HAS_DO=presence[0], HAS_TQ=presence[1], HAS_TK=presence[2], HAS_TV=presence[3],
              BLOCK_D=_block_d(max(D, Dv)), BLOCK_DV=_block_d(max(D, Dv)), PREC=DOT_PREC[prec], UPCAST=upcast)
    tail = (Hq, Hkv, Nq, Nk, D, Dv)
    shift = 1 if is_causal else Nk
    (bm1, bn1, w1, st1), (bm2, bn2, w2, st2), split = cfg
    if dq is None:  # (only the tangent launch without q̇) Δ without the dq kernel
        delta.copy_(_row_statistic(do, g, out, out_t))
    else:
        n_mb = triton.cdiv(Nq, bm2)
        ot = out_t if has_g else out
        _attn_bwd_dq_kernel[(B * Hq * n_mb,)](
            *ins, out, ot, dq, *in_strides, *_s3(out), *_s3(ot), *_s3(dq), *tail, n_mb, flags, shift, scale,
            scale * LOG2E, BLOCK_M=bm2, BLOCK_N=bn2, **sw, num_warps=w2, num_stages=st2,
        )
    if dk is not None or dv is not None:
        n_nb = triton.cdiv(Nk, bn1)
        if split:
            parts = [(True, False)] * (dk is not None) + [(False, True)] * (dv is not None)
        else:
            parts = [(True, True)]
            dk = torch.empty_like(k) if dk is None else dk  # scratch for the output not asked for
            dv = torch.empty_like(v) if dv is None else dv
        for comp_dk, comp_dv in parts:
            _attn_bwd_dkdv_kernel[(B * Hkv * n_nb,)](
                *ins, k if dk is None else dk, v if dv is None else dv,
                *in_strides, *_s3(dk), *_s3(dv),
                *tail, n_nb, flags, shift, scale, scale * LOG2E,
                COMPUTE_DK=comp_dk, COMPUTE_DV=comp_dv, BLOCK_M=bm1, BLOCK_N=bn1, **sw,
                num_warps=w1, num_stages=st1,
            )


def _row_statistic(do, g, out, out_t):
    """Δ = dO·O (+ g·Ȯ with g) in fp32 over (B, Hq, Nq), as the dq kernel computes it (products of
    the input-dtype values, summed in fp32): the blockwise fallback's preprocessing."""
    f = torch.float32
    delta = torch.zeros(out.shape[:3], dtype=f, device=out.device)
    if do is not None:
        delta += (do.to(f) * out.to(f)).sum(-1)
    if g is not None:
        delta += (g.to(f) * out_t.to(f)).sum(-1)
    return delta


FORCE_BLOCKWISE = False  # tests: run the blockwise fallback instead of the kernels


def _blockwise(do, g, q, k, v, tq, tk, tv, lse, delta, mu, nu, mask, is_causal, scale, dq, dk, dv):
    """The dk/dv and dq kernels' results ((A26), or the dq, dk, dv of (A27) when g is given), computed
    with PyTorch matmuls in fp32 over blocks of query rows (scm_kernels.attention.blockwise): O(block x
    Nk) memory, a fixed order of summation (deterministic). The launchers use it where no kernel
    configuration compiles without register spills (see GPU_CONFIGS). Writes the outputs that are not
    None."""
    D, Hkv, Nk = q.shape[-1], k.shape[1], k.shape[2]
    f = torch.float32
    bl = Blocks(q, k, mask, is_causal, scale)
    qs = bl.rows

    def st(x, i0, i1):  # row statistics (B, Hkv, G, m, 1)
        return None if x is None else x[:, :, i0:i1].reshape(bl.B, Hkv, bl.G, i1 - i0, 1)

    k32, v32, tk32, tv32 = bl.kv(k), bl.kv(v), bl.kv(tk), bl.kv(tv)
    acc_dk = torch.zeros(bl.B, Hkv, Nk, D, dtype=f, device=q.device) if dk is not None else None
    acc_dv = torch.zeros(bl.B, Hkv, Nk, v.shape[-1], dtype=f, device=q.device) if dv is not None else None
    for i0, i1 in bl.ranges():
        qb, dob, gb, tqb = qs(q, i0, i1), qs(do, i0, i1), qs(g, i0, i1), qs(tq, i0, i1)
        s = bl.scores(qb, k32, i0, i1)
        p = torch.exp(s - st(lse, i0, i1))
        dp = dob @ v32.transpose(-1, -2) if dob is not None else torch.zeros_like(p)
        if gb is not None:
            if tv32 is not None:
                dp = dp + gb @ tv32.transpose(-1, -2)
            sd = torch.zeros_like(p)
            if tqb is not None:
                sd = sd + tqb @ k32.transpose(-1, -2)
            if tk32 is not None:
                sd = sd + qb @ tk32.transpose(-1, -2)
            sd = scale * sd - st(mu, i0, i1)
            dsd = p * (gb @ v32.transpose(-1, -2) - st(nu, i0, i1))
            ds = p * (dp - st(delta, i0, i1)) + dsd * sd
        else:
            ds = p * (dp - st(delta, i0, i1))
        if dq is not None:
            r = ds @ k32
            if gb is not None and tk32 is not None:
                r = r + dsd @ tk32
            dq[:, :, i0:i1] = bl.ungroup(scale * r).to(dq.dtype)
        if acc_dk is not None:
            r = ds.transpose(-1, -2) @ qb
            if gb is not None and tqb is not None:
                r = r + dsd.transpose(-1, -2) @ tqb
            acc_dk += scale * r.sum(2)
        if acc_dv is not None:
            r = p.transpose(-1, -2) @ dob if dob is not None else 0.0
            if gb is not None:
                r = r + (p * sd).transpose(-1, -2) @ gb
            acc_dv += r.sum(2)
    if dk is not None:
        dk.copy_(acc_dk)
    if dv is not None:
        dv.copy_(acc_dv)


def _run(grad_out, g, q, k, v, tq, tk, tv, out, out_t, lse, mu, mask, is_causal, scale, precision):
    """Both backward ops: returns (dq, dk, dv, dtq, dtk, dtv), the tangent gradients None unless g
    and that tangent are given. Requires grad_out or g.

    With g, the tangent gradients are J^T g: (A27) gives dv̇ = Σ_i P_ij g_i, dq̇ = λ Σ_j dṡ_ij k_j,
    dk̇ = λ Σ_i dṡ_ij q_i with dṡ = P (g·v − ν), ν = g·O, which is (A26) with dO := g (and Δ := ν).
    So they run on the (A26) kernels, and the (A27) kernels only accumulate dq, dk, dv: at most two
    accumulators per program, which is what keeps large head dims free of register spills."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    B, Hq, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    has_do, has_g = grad_out is not None, g is not None
    if not has_g:
        tq = tk = tv = None
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dtq, dtk, dtv = (None if t is None else torch.empty_like(t) for t in (tq, tk, tv))
    if B * Hq == 0 or Nk == 0 or Nq == 0:
        for t in (dq, dk, dv, dtq, dtk, dtv):
            if t is not None:
                t.zero_()
        return dq, dk, dv, dtq, dtk, dtv
    grad_out, g, q, k, v, tq, tk, tv, out, out_t = (
        _inner1(x) for x in (grad_out, g, q, k, v, tq, tk, tv, out, out_t))
    lse = lse.contiguous()
    dev = q.device
    interp = _interpret()
    prec = precision if q.dtype == torch.float32 else "tf32"  # (ignored by 16-bit dots)
    upcast = interp and q.dtype == torch.bfloat16
    bd = _block_d(max(D, Dv))

    def cfg(jvp):
        if FORCE_BLOCKWISE:
            return None
        return tuple(INTERPRETER_CONFIG) if interp else _gpu_config(bd, jvp, q.dtype, prec)

    def launch(do, g, tq, tk, tv, delta, mu, nu, dq, dk, dv, presence, cfg):
        """One launch family; writes `delta` (its row statistic) and the outputs not None."""
        args = (q, k, v, tq, tk, tv)
        if cfg is None:  # no spill-free kernel configuration for this case
            delta.copy_(_row_statistic(do, g, out, out_t))
            _blockwise(do, g, *args, lse, delta, mu, nu, mask, is_causal, scale, dq, dk, dv)
        else:
            _launch(do, g, *args, out, out_t, lse, delta, mu, nu, mask, is_causal, scale, dq, dk, dv, presence,
                    cfg, prec, upcast)

    # Row statistics, each written by the launch that needs it: Δ = dO·O, or Δ' = dO·O + g·Ȯ and ν = g·O
    delta = torch.empty((B, Hq, Nq), dtype=torch.float32, device=dev)
    primal = (True, False, False, False)
    if not has_g:
        launch(grad_out, None, None, None, None, delta, None, None, dq, dk, dv, primal, cfg=cfg(False))
        return dq, dk, dv, None, None, None
    # tangent gradients: (A26) with upstream g, whose Δ is ν
    nu = torch.empty((B, Hq, Nq), dtype=torch.float32, device=dev)
    launch(g, None, None, None, None, nu, None, None, dtq, dtk, dtv, primal, cfg=cfg(False))
    # dq, dk, dv of (A27)
    mu = mu.contiguous()
    presence = _presence(has_do, tq is not None, tk is not None, tv is not None, interp)
    launch(grad_out, g, tq, tk, tv, delta, mu, nu, dq, dk, dv, presence, cfg=cfg(True))
    return dq, dk, dv, dtq, dtk, dtv


def attention_bwd(grad_out, q, k, v, out, lse, mask, is_causal, scale, *, precision="ieee"):
    """(A26) FlashAttention-2 backward of attention_fwd: (dq, dk, dv) like q, k, v.

    grad_out, out: (B, Hq, Nq, Dv); q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv);
    lse: (B, Hq, Nq) float32 from the forward (+inf on fully masked rows); mask None or an
    expanded (B, Hq, Nq, Nk) bool/float32 view; `precision` of fp32 tl.dot, "ieee" or "tf32".
    Deterministic: no atomics, dk/dv of a kv head summed over its G query heads in one program."""
    dq, dk, dv, *_ = _run(grad_out, None, q, k, v, None, None, None, out, None, lse, None, mask, is_causal,
                          scale, precision)
    return dq, dk, dv


def attention_jvp_bwd(grad_out, grad_out_tangent, q, k, v, tq, tk, tv, out, out_tangent, lse, mu, mask,
                      is_causal, scale, *, precision="ieee"):
    """(A27) Backward through attention_jvp's (out, out_tangent) for upstream gradients grad_out (dO)
    and grad_out_tangent (g), either None (zero): (dq, dk, dv, dtq, dtk, dtv), the tangent
    gradients None where the tangent is None. lse, mu: (B, Hq, Nq) float32 from attention_jvp.
    Without g this is attention_bwd (the tangent gradients are then zeros); without both, zeros."""
    if grad_out is None and grad_out_tangent is None:
        return tuple(None if x is None else torch.zeros_like(x) for x in (q, k, v, tq, tk, tv))
    dq, dk, dv, dtq, dtk, dtv = _run(grad_out, grad_out_tangent, q, k, v, tq, tk, tv, out, out_tangent, lse,
                                     mu, mask, is_causal, scale, precision)
    if grad_out_tangent is None:
        dtq, dtk, dtv = (None if t is None else torch.zeros_like(t) for t in (tq, tk, tv))
    return dq, dk, dv, dtq, dtk, dtv


# ---------------------------------------------------------------------------------------------
# Ahead-of-time specs: every (kernel, dtypes, switches, tiles) the launchers can run on a GPU
# ---------------------------------------------------------------------------------------------
_TT = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
_IN_PTRS = ("Q", "K", "V", "TQ", "TK", "TV", "DO", "GT")
_STAT_PTRS = ("LSE", "DELTA", "MU", "NU")
_IN_STRIDES = ("s_qb", "s_qh", "s_qn", "s_kb", "s_kh", "s_kn", "s_vb", "s_vh", "s_vn",
               "s_tqb", "s_tqh", "s_tqn", "s_tkb", "s_tkh", "s_tkn", "s_tvb", "s_tvh", "s_tvn",
               "s_dob", "s_doh", "s_don", "s_gb", "s_gh", "s_gn", "s_mb", "s_mh", "s_mq", "s_mk")
_CX = ("HAS_G", "HAS_DO", "HAS_TQ", "HAS_TK", "HAS_TV", "BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV",
       "PREC", "UPCAST")


def _main_signature(kind: str, dtype) -> dict:
    t = _TT[dtype]
    sig = {p: t for p in _IN_PTRS}
    sig.update({p: "*fp32" for p in _STAT_PTRS})
    sig.update({"MASKB": "*u8", "MASKF": "*fp32"})
    if kind == "dkdv":
        sig.update({p: t for p in ("DK", "DV")})
        out_strides = ("s_dkb", "s_dkh", "s_dkn", "s_dvb", "s_dvh", "s_dvn")
    else:
        sig.update({p: t for p in ("O", "OT", "DQ")})
        out_strides = ("s_ob", "s_oh", "s_on", "s_otb", "s_oth", "s_otn", "s_dqb", "s_dqh", "s_dqn")
    sig.update({s: "i32" for s in _IN_STRIDES + out_strides})
    sig.update({s: "i32" for s in ("Hq", "Hkv", "Nq", "Nk", "D", "Dv",
                                   "n_nblocks" if kind == "dkdv" else "n_mblocks", "flags", "causal_shift")})
    sig.update({"scale": "fp32", "qk_scale2": "fp32"})
    sig.update({c: "constexpr" for c in _CX})
    if kind == "dkdv":
        sig.update({"COMPUTE_DK": "constexpr", "COMPUTE_DV": "constexpr"})
    return sig


def main_specs(dtype, prec: str, bd: int, presence, tiles) -> list:
    """The dk/dv and dq specs of one launch family: dtype, fp32 precision, head-dim bucket,
    presence = None for (A26) or (HAS_DO, HAS_TQ, HAS_TK, HAS_TV) for (A27), and its tiles."""
    (bm1, bn1, w1, st1), (bm2, bn2, w2, st2), split = tiles
    pres = (True, False, False, False) if presence is None else presence
    base = dict(HAS_G=presence is not None, HAS_DO=pres[0], HAS_TQ=pres[1], HAS_TK=pres[2], HAS_TV=pres[3],
                BLOCK_D=bd, BLOCK_DV=bd, PREC=DOT_PREC[prec], UPCAST=False)
    out = []
    for comp_dk, comp_dv in (((True, False), (False, True)) if split else ((True, True),)):
        out.append(spec("attention", _attn_bwd_dkdv_kernel, _main_signature("dkdv", dtype),
                        {**base, "BLOCK_M": bm1, "BLOCK_N": bn1, "COMPUTE_DK": comp_dk,
                         "COMPUTE_DV": comp_dv}, num_warps=w1, num_stages=st1, expects_mma=True))
    out.append(spec("attention", _attn_bwd_dq_kernel, _main_signature("dq", dtype),
                    {**base, "BLOCK_M": bm2, "BLOCK_N": bn2}, num_warps=w2, num_stages=st2,
                    expects_mma=True))
    return out


def _aot_specs() -> list:
    """Every configuration the launchers can run on a GPU: per dtype, fp32 precision and head-dim
    bucket the (A26) family and the (A27) family of each JVP_PRESENCE pattern (families without a
    configuration run `_blockwise`, no kernel)."""
    out = []
    for dtype in _TT:
        for prec in (PRECISIONS if dtype == torch.float32 else ("tf32",)):
            for bd in HEAD_BUCKETS:
                cfg = _gpu_config(bd, False, dtype, prec)
                if cfg is not None:
                    out += main_specs(dtype, prec, bd, None, cfg)
                cfg = _gpu_config(bd, True, dtype, prec)
                if cfg is not None:
                    for pres in JVP_PRESENCE:
                        out += main_specs(dtype, prec, bd, pres, cfg)
    return out


AOT_SPECS = _aot_specs()
