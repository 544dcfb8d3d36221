"""Triton forward kernels of attention: the FlashAttention-2 forward and the one-pass JVP (A24-A25).

Per query row i (scale λ, logits in fp32 whatever the input dtype):

    s_ij = λ q_i·k_j (+ additive mask; -inf where causality or the length hides key j)
    m = max_j s_ij,  ℓ = Σ_j e^{s_ij - m},  O_i = Σ_j e^{s_ij - m} v_j / ℓ,  lse_i = m + log ℓ

computed online over key blocks (every running sum is rescaled by α = e^{m_old - m_new} when the
running max grows). The fused JVP kernel (A25) carries, in the same pass,

    ṡ_ij  = λ (q̇_i·k_j + q_i·k̇_j)
    acc_O = Σ_j e^{s-m} v_j,   acc_A = Σ_j e^{s-m} v̇_j,   acc_B = Σ_j e^{s-m} ṡ_ij v_j,
    ρ     = Σ_j e^{s-m} ṡ_ij
    O = acc_O / ℓ,   Ȯ = (acc_A + acc_B - ρ·O) / ℓ,   mu = ρ / ℓ  (= Σ_j P_ij ṡ_ij)

acc_A and acc_B are rescaled by the same α and only ever summed, so they share one accumulator
acc_T: six matmuls per key block, two fp32 accumulators of (BLOCK_M, BLOCK_DV). acc_B − ρ·O is
formed without cancellation: the kernel keeps mu = ρ/ℓ as a running mean (updated per block, in
fp32) and accumulates acc_T = acc_A + Σ_j e^{s-m} (ṡ_ij − mu) v_j; when mu moves by δ,
acc_T −= δ·acc_O (fp32). The matmul operand e^{s-m} (ṡ − mu) (rounded to fp16/bf16 for the tensor
cores) is then of the size of the tangent itself, not of ṡ: a large common part of ṡ across keys
(e.g. keys with a large mean, or logits ~1e4) costs no accuracy. Finish: Ȯ = acc_T / ℓ, mu as kept.
Missing tangents (HAS_TQ/HAS_TK/HAS_TV False) cost neither loads nor matmuls; JVP_TANGENT_SETS
lists the sets with their own kernel, others run the all-tangents kernel with broadcast zeros.

Units: without a mask the scores are kept in log2 units, c = λ·log2(e): the running max is taken
over the raw q·k and scaled (max(q·k)·c, valid for c > 0), and p = exp2(q·k·c - m) costs one FMA
per score (measured on an H100: +5-7% forward throughput over a separate scaling multiply). A zero,
negative or NaN scale runs the masked kernel with a zero mask instead. With a mask (always additive fp32 in the kernel: a bool mask is converted to
0 / -inf over its stored, non-broadcast extent) they stay in natural units, s = λ q·k + mask, and the
exponent is (s - m)·log2(e): a mask value such as finfo(float32).min then behaves as in PyTorch
(a row masked that way everywhere is uniform, not empty), because s·log2(e) never has to exist.

Fully masked rows (every score -inf): the running max stays -inf; the exponent uses 0 in its place
("safe max"), so p = 0, ℓ = 0, and the finish writes O = 0, Ȯ = 0, lse = +inf, mu = 0 — no NaN.

Grid: one program per (query block, b·Hq), flattened on axis 0 with the query block fastest (the
programs of one head run together and share K/V in L2) and the last query blocks first (under
causality they have the most keys: the long programs start early). Query head h reads kv head
h // G (GQA/MQA). Key blocks that causality hides entirely are skipped; the bounds/causal mask is
applied only in the boundary blocks (a uniform branch), not in the interior ones.

Strides and alignment: every tensor has inner stride 1, all other strides are runtime arguments
(any layout, e.g. (B, N, H, D) memory viewed as (B, H, N, D); mask strides may be 0); batch/head
bases and query-row offsets are int64, in-block key offsets int32 on an int64 block base. The
kernels assume (tl.multiple_of) head dims and (b, h, n) strides that are multiples of 8 elements and
16-byte aligned data, so that every load and store is a vector access: true without a copy for the
usual layouts (d = 64, 72, 80, 128 ... in (B, H, N, D) or (B, N, H, D) memory); an operand that
breaks it (d = 111, odd strides or offsets) is copied into a zero-padded aligned buffer first.

Constexprs: tile sizes, HAS_MASK, the tangent switches, D_CHUNK (q re-read in slices per key block
where a register-resident q would spill: fp32 at d = 256), the dot precision and the interpreter's
bf16 upcast. Lengths, head dims, strides, scale and causality are runtime arguments. Head dims are
padded to a power of two (BLOCK_D = BLOCK_DV, the bucket of max(D, Dv), at least 32) with masked
loads. `_config` picks (BLOCK_M, BLOCK_N, num_warps, num_stages, D_CHUNK) from a fixed table per
kernel, class (fp16/bf16, fp32 TF32, fp32 3xTF32) and head-dim bucket; AOT_SPECS lists every
combination the launchers can run, all compiled by the static tier for sm_80 and sm_90 without
spills and with tensor-core instructions.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from scm_kernels._spec import spec
from scm_kernels.attention.blockwise import Blocks
from scm_kernels.backend import triton_interpret

PRECISIONS = ("ieee", "tf32")
HEAD_DIM_BUCKETS = (32, 64, 128, 256)
MAX_HEAD_DIM = HEAD_DIM_BUCKETS[-1]


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in fp32. UPCAST (interpreter only): bf16 operands go through fp32, because the
    interpreter's bf16 tl.dot is wrong; GPU builds keep the bf16 tensor-core dot."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _head_base(P, b, h, stride_b, stride_h):
    """P + b·stride_b + h·stride_h (b, h int64), 16-byte aligned (the launchers' alignment promise)."""
    return tl.multiple_of(P + b * stride_b + h * stride_h, 16)


@triton.jit
def _block_base(P, row0, stride_n):
    """P + row0·stride_n (row0 int64): the first row of a block, 16-byte aligned."""
    return tl.multiple_of(P + row0 * stride_n, 16)


@triton.jit
def _row_offsets(rows, stride):
    """(R, 1) element offsets rows·stride (int64 rows give int64), multiples of 8 (stride % 8 == 0).

    Triton's divisibility hint is per dimension (of the first element of each contiguous run along
    it): a row offset is a multiple of 8 along both. Telling it [8, 1] made every load of a tile
    whose columns run from such an offset look unaligned: no 16-byte vectors, so no cp.async, and
    the forward ran at half speed on an H100 (213 vs 415+ TFLOP/s, bf16 d=64)."""
    return tl.multiple_of(rows[:, None] * stride, [8, 8])


@triton.jit
def _chunked_scores(Q_blk, TQ_blk, K_blk, TK_blk, stride_qn, stride_tqn, stride_kn, stride_tkn, q_shift,
                    m_ok, k_ok, D_lim,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, D_CHUNK: tl.constexpr,
                    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """(q kᵀ, q̇ kᵀ + q k̇ᵀ) of one key block from D_CHUNK-wide slices of q, q̇, k, k̇ read from
    memory (L2) for this block: no operand tile is held in registers across blocks (the register
    budget of fp32 at large head dims on sm_80, where an operand row slab costs D/2 registers)."""
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    Q_blk = tl.multiple_of(Q_blk + q_shift, 16)
    TQ_blk = tl.multiple_of(TQ_blk + q_shift, 16)
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    sd = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for c in tl.static_range(BLOCK_D // D_CHUNK):
        offs_c = c * D_CHUNK + tl.arange(0, D_CHUNK)
        c_ok = offs_c < D_lim
        q = tl.load(Q_blk + _row_offsets(rm, stride_qn) + offs_c[None, :],
                    mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        k = tl.load(K_blk + _row_offsets(rn, stride_kn) + offs_c[None, :], mask=k_ok[:, None] & c_ok[None, :],
                    other=0.0)
        s = _dot(q, tl.trans(k), s, DOT_PREC, UPCAST)
        if HAS_TQ:
            tq = tl.load(TQ_blk + _row_offsets(rm, stride_tqn) + offs_c[None, :],
                         mask=m_ok[:, None] & c_ok[None, :], other=0.0)
            sd = _dot(tq, tl.trans(k), sd, DOT_PREC, UPCAST)
        if HAS_TK:
            tk = tl.load(TK_blk + _row_offsets(rn, stride_tkn) + offs_c[None, :],
                         mask=k_ok[:, None] & c_ok[None, :], other=0.0)
            sd = _dot(q, tl.trans(tk), sd, DOT_PREC, UPCAST)
    return s, sd


@triton.jit
def _key_loop(
    acc_o, acc_t, m_i, l_i, mu_i,  # running state (module docstring)
    q, tq,  # (BLOCK_M, BLOCK_D) query tile and its tangent (tq unused unless HAS_TQ; both unused if D_CHUNK)
    Q_blk, TQ_blk, stride_qn, stride_tqn, m_ok, q_step,  # D_CHUNK: q, q̇ bases, row strides, an opaque 0
    K_base, TK_base, V_base, TV_base,  # this (batch, kv head)'s k, k̇, v, v̇
    MASK, m_rows,  # additive fp32 mask, (BLOCK_M, 1) int64 row offsets into it
    stride_kn, stride_tkn, stride_vn, stride_tvn, stride_mk,  # key-row strides (elements)
    d_ok, dv_ok, D_lim,  # head-dim lanes < D, < Dv; D
    row_last,  # (BLOCK_M,) last visible key of each row (Nk - 1, or the row under causality)
    hi, full_end, Nk,  # keys [0, hi) are visited; blocks below full_end need no bounds/causal mask
    qk_scale, scale,  # score scale (λ·log2(e) without a mask, λ with one), λ
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr,
    D_CHUNK: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Online softmax (A25 tangent sums with it) over the key blocks of [0, hi)."""
    HAS_TS: tl.constexpr = HAS_TQ or HAS_TK
    arange_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # int32 element offsets inside a key block (loop invariant; the launcher keeps BLOCK_N·stride
    # < 2^31) on top of an int64 per-block base: no per-element 64-bit state lives across blocks.
    k_off = _row_offsets(arange_n, stride_kn) + offs_d[None, :]
    v_off = _row_offsets(arange_n, stride_vn) + offs_dv[None, :]
    if HAS_TK:
        tk_off = _row_offsets(arange_n, stride_tkn) + offs_d[None, :]
    if HAS_TV:
        tv_off = _row_offsets(arange_n, stride_tvn) + offs_dv[None, :]
    for start_n in range(0, hi, BLOCK_N):
        kn = start_n + arange_n
        k_ok = kn < hi
        row0 = tl.cast(start_n, tl.int64)
        kd_ok = k_ok[:, None] & d_ok[None, :]
        kdv_ok = k_ok[:, None] & dv_ok[None, :]
        if D_CHUNK == 0:
            k = tl.load(_block_base(K_base, row0, stride_kn) + k_off, mask=kd_ok, other=0.0)
            s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PREC, UPCAST)
        else:
            s, sd_c = _chunked_scores(Q_blk, TQ_blk, _block_base(K_base, row0, stride_kn),
                                      _block_base(TK_base, row0, stride_tkn), stride_qn, stride_tqn,
                                      stride_kn, stride_tkn, row0 * q_step, m_ok, k_ok, D_lim,
                                      BLOCK_M, BLOCK_N, BLOCK_D, HAS_TQ, HAS_TK, D_CHUNK, DOT_PREC, UPCAST)
        if HAS_MASK:  # natural units: s = λ q·k + mask (qk_scale = λ)
            s = s * qk_scale
            m_ptrs = MASK + (m_rows + kn[None, :].to(tl.int64) * stride_mk)
            s += tl.load(m_ptrs, mask=(kn < Nk)[None, :], other=0.0)
        if start_n + BLOCK_N > full_end:  # boundary block: keys past Nk or hidden by causality
            s = tl.where(kn[None, :] <= row_last[:, None], s, float("-inf"))
        if HAS_MASK:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        else:  # s is the raw q·k; qk_scale = λ log2(e) > 0 (launcher): max(s·c) = max(s)·c
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # safe max: a fully masked row so far
        if HAS_MASK:
            p = tl.math.exp2((s - m_use[:, None]) * 1.4426950408889634)
            alpha = tl.math.exp2((m_i - m_use) * 1.4426950408889634)
        else:  # log2 units, the scale folded into one FMA per score: s·c - m
            p = tl.math.exp2(s * qk_scale - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
        l_old = l_i * alpha
        l_i = l_old + tl.sum(p, 1)
        m_i = m_new
        v = tl.load(_block_base(V_base, row0, stride_vn) + v_off, mask=kdv_ok, other=0.0)
        if HAS_TS:
            # ṡ = λ (q̇ kᵀ + q k̇ᵀ) (A24); mu re-based to the running mean (module docstring)
            if D_CHUNK == 0:
                sd = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                if HAS_TQ:
                    sd = _dot(tq, tl.trans(k), sd, DOT_PREC, UPCAST)
                if HAS_TK:
                    tk = tl.load(_block_base(TK_base, row0, stride_tkn) + tk_off, mask=kd_ok, other=0.0)
                    sd = _dot(q, tl.trans(tk), sd, DOT_PREC, UPCAST)
            else:
                sd = sd_c
            pd = p * (sd * scale)
            mu_new = tl.where(l_i > 0.0, (mu_i * l_old + tl.sum(pd, 1)) / tl.where(l_i > 0.0, l_i, 1.0), mu_i)
            acc_t = (acc_t - (mu_new - mu_i)[:, None] * acc_o) * alpha[:, None]
            mu_i = mu_new
            ps = pd - p * mu_i[:, None]  # e^{s-m} (ṡ - mu)
        elif HAS_TV:
            acc_t = acc_t * alpha[:, None]
        acc_o = _dot(p.to(v.dtype), v, acc_o * alpha[:, None], DOT_PREC, UPCAST)
        if HAS_TV:
            tv = tl.load(_block_base(TV_base, row0, stride_tvn) + tv_off, mask=kdv_ok, other=0.0)
            acc_t = _dot(p.to(tv.dtype), tv, acc_t, DOT_PREC, UPCAST)  # acc_A
        if HAS_TS:
            acc_t = _dot(ps.to(v.dtype), v, acc_t, DOT_PREC, UPCAST)  # acc_B - mu acc_O
    return acc_o, acc_t, m_i, l_i, mu_i


@triton.jit
def _attn_program(
    Q, K, V, TQ, TK, TV, MASK, OUT, TOUT, LSE, MU,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_tqb, stride_tqh, stride_tqn, stride_tkb, stride_tkh, stride_tkn,
    stride_tvb, stride_tvh, stride_tvn,
    stride_mb, stride_mh, stride_mq, stride_mk,
    stride_ob, stride_oh, stride_on, stride_tob, stride_toh, stride_ton,
    Hq, G, Nq, Nk, D, DV, n_m_blocks, scale, is_causal, q_step,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    JVP: tl.constexpr, HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr,
    D_CHUNK: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """One (query block, b·Hq) program of the forward (JVP False) or the fused JVP (A25)."""
    pid = tl.program_id(0)
    bh = pid // n_m_blocks
    pid_m = n_m_blocks - 1 - pid % n_m_blocks  # the longest (causal) query blocks first
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    hk = (h // G).to(tl.int64)
    h = h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_m = offs_m.to(tl.int64)
    m_ok = offs_m < Nq
    # D, DV are multiples of 8 (launcher): whole 8-lane groups are in or out (vector loads)
    d_ok = offs_d < (D // 8) * 8
    dv_ok = offs_dv < (DV // 8) * 8

    qd_ok = m_ok[:, None] & d_ok[None, :]
    Q_blk = _block_base(_head_base(Q, b, h, stride_qb, stride_qh), start_m.to(tl.int64), stride_qn)
    TQ_blk = _block_base(_head_base(TQ, b, h, stride_tqb, stride_tqh), start_m.to(tl.int64), stride_tqn)
    q = tl.zeros([BLOCK_M, BLOCK_D], dtype=Q.dtype.element_ty)
    if D_CHUNK == 0:
        q = tl.load(_head_base(Q, b, h, stride_qb, stride_qh) + _row_offsets(rows_m, stride_qn)
                    + offs_d[None, :], mask=qd_ok, other=0.0)
    tq = q
    if HAS_TQ and D_CHUNK == 0:
        tq = tl.load(_head_base(TQ, b, h, stride_tqb, stride_tqh) + _row_offsets(rows_m, stride_tqn)
                     + offs_d[None, :], mask=qd_ok, other=0.0)
    # mask rows clamped to Nq - 1: padding rows read valid memory and are never stored
    m_rows = b * stride_mb + h * stride_mh + tl.minimum(rows_m, Nq - 1)[:, None] * stride_mq

    if is_causal:
        hi = tl.minimum(Nk, start_m + BLOCK_M)  # key blocks past the tile's last row are skipped
        full_end = (tl.minimum(Nk, start_m + 1) // BLOCK_N) * BLOCK_N
        row_last = tl.minimum(offs_m, Nk - 1)
    else:
        hi = Nk
        full_end = (Nk // BLOCK_N) * BLOCK_N
        row_last = tl.zeros([BLOCK_M], dtype=tl.int32) + (Nk - 1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    mu_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc_o, acc_t, m_i, l_i, mu_i = _key_loop(
        acc_o, acc_t, m_i, l_i, mu_i, q, tq, Q_blk, TQ_blk, stride_qn, stride_tqn, m_ok, q_step,
        _head_base(K, b, hk, stride_kb, stride_kh), _head_base(TK, b, hk, stride_tkb, stride_tkh),
        _head_base(V, b, hk, stride_vb, stride_vh), _head_base(TV, b, hk, stride_tvb, stride_tvh),
        MASK, m_rows, stride_kn, stride_tkn, stride_vn, stride_tvn, stride_mk,
        d_ok, dv_ok, (D // 8) * 8, row_last, hi, full_end, Nk,
        scale if HAS_MASK else scale * 1.4426950408889634, scale,
        HAS_MASK, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, HAS_TQ, HAS_TK, HAS_TV, D_CHUNK, DOT_PREC, UPCAST)

    # Finish (A25). ℓ = 0 only for fully masked rows: O = Ȯ = 0, lse = +inf, mu = 0.
    empty = l_i == 0.0
    inv_l = 1.0 / tl.where(empty, 1.0, l_i)
    if HAS_MASK:
        lse = m_i + tl.log(tl.where(empty, 1.0, l_i))
    else:
        lse = (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453
    lse = tl.where(empty, float("inf"), lse)
    od_ok = m_ok[:, None] & dv_ok[None, :]
    tl.store(_head_base(OUT, b, h, stride_ob, stride_oh) + _row_offsets(rows_m, stride_on)
             + offs_dv[None, :], (acc_o * inv_l[:, None]).to(OUT.dtype.element_ty), mask=od_ok)
    lse_off = bh.to(tl.int64) * Nq + offs_m
    tl.store(LSE + lse_off, lse, mask=m_ok)
    if JVP:
        tl.store(_head_base(TOUT, b, h, stride_tob, stride_toh) + _row_offsets(rows_m, stride_ton)
                 + offs_dv[None, :], (acc_t * inv_l[:, None]).to(TOUT.dtype.element_ty), mask=od_ok)
        tl.store(MU + lse_off, mu_i, mask=m_ok)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V,  # (B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv): inputs, inner stride 1
    MASK,  # (B, Hq, Nq, Nk) fp32 additive mask view (a bool mask arrives as 0 / -inf); read if HAS_MASK
    OUT,  # (B, Hq, Nq, Dv) out, q's dtype
    LSE,  # (B, Hq, Nq) fp32 out, contiguous
    stride_qb, stride_qh, stride_qn,  # q strides (elements)
    stride_kb, stride_kh, stride_kn,  # k strides
    stride_vb, stride_vh, stride_vn,  # v strides
    stride_mb, stride_mh, stride_mq, stride_mk,  # mask strides (any may be 0)
    stride_ob, stride_oh, stride_on,  # out strides
    Hq, G, Nq, Nk, D, DV,  # query heads, group size Hq / Hkv, lengths, head dims
    n_m_blocks,  # cdiv(Nq, BLOCK_M)
    scale,  # λ
    is_causal,  # 0 / 1: key j visible to query i iff j <= i
    q_step,  # 0 (an argument, so that the compiler cannot hoist the D_CHUNK loads of q out of the key loop)
    HAS_MASK: tl.constexpr,  # a mask is given
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    D_CHUNK: tl.constexpr,  # 0: the q tile is held in registers; else re-read per key block in D_CHUNK slices
    DOT_PREC: tl.constexpr,  # tl.dot input_precision for fp32 operands ("ieee" / "tf32")
    UPCAST: tl.constexpr,  # interpreter only: bf16 dots through fp32
):
    """Forward: out and lse (FlashAttention-2 online softmax)."""
    _attn_program(
        Q, K, V, Q, K, V, MASK, OUT, OUT, LSE, LSE,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_mb, stride_mh, stride_mq, stride_mk,
        stride_ob, stride_oh, stride_on, stride_ob, stride_oh, stride_on,
        Hq, G, Nq, Nk, D, DV, n_m_blocks, scale, is_causal, q_step,
        HAS_MASK, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, False, False, False, False, D_CHUNK, DOT_PREC, UPCAST)


@triton.jit
def _attn_jvp_kernel(
    Q, K, V,  # (B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv): primals, inner stride 1
    TQ, TK, TV,  # their tangents (same shapes and dtype); unused unless HAS_TQ / HAS_TK / HAS_TV
    MASK,  # as in _attn_fwd_kernel
    OUT, TOUT,  # (B, Hq, Nq, Dv) out: O and Ȯ, q's dtype
    LSE, MU,  # (B, Hq, Nq) fp32 out, contiguous: lse and mu = ρ/ℓ
    stride_qb, stride_qh, stride_qn,  # q strides (elements)
    stride_kb, stride_kh, stride_kn,  # k strides
    stride_vb, stride_vh, stride_vn,  # v strides
    stride_tqb, stride_tqh, stride_tqn,  # q̇ strides
    stride_tkb, stride_tkh, stride_tkn,  # k̇ strides
    stride_tvb, stride_tvh, stride_tvn,  # v̇ strides
    stride_mb, stride_mh, stride_mq, stride_mk,  # mask strides (any may be 0)
    stride_ob, stride_oh, stride_on,  # out strides
    stride_tob, stride_toh, stride_ton,  # out_tangent strides
    Hq, G, Nq, Nk, D, DV, n_m_blocks, scale, is_causal,  # as in _attn_fwd_kernel
    q_step,  # 0 (an argument: the compiler cannot hoist the D_CHUNK loads of q, q̇ out of the key loop)
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr,  # which tangents are given
    D_CHUNK: tl.constexpr,  # 0: q, q̇ held in registers; else re-read per key block in D_CHUNK-wide slices
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,  # as in _attn_fwd_kernel
):
    """Fused JVP (A25): out, out_tangent, lse, mu in one pass over the keys."""
    _attn_program(
        Q, K, V, TQ, TK, TV, MASK, OUT, TOUT, LSE, MU,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_tqb, stride_tqh, stride_tqn, stride_tkb, stride_tkh, stride_tkn,
        stride_tvb, stride_tvh, stride_tvn,
        stride_mb, stride_mh, stride_mq, stride_mk,
        stride_ob, stride_oh, stride_on, stride_tob, stride_toh, stride_ton,
        Hq, G, Nq, Nk, D, DV, n_m_blocks, scale, is_causal, q_step,
        HAS_MASK, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, True, HAS_TQ, HAS_TK, HAS_TV, D_CHUNK, DOT_PREC,
        UPCAST)


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
# Kernel classes by dtype and fp32 precision: "lowp" (fp16/bf16 tensor-core dots), "tf32" (fp32
# inputs, TF32 dots) and "ieee" (fp32 inputs with fp32-accurate products: tl.dot's 3xTF32 split,
# input_precision "tf32x3" -- exact fp32 FMA dots would spill and leave the tensor cores idle).
# tl.dot input_precision per class ("ieee" for fp16/bf16 is ignored by tl.dot)
DOT_INPUT_PRECISION = {"lowp": "ieee", "tf32": "tf32", "ieee": "tf32x3"}
CLASSES = (("lowp", torch.float16), ("lowp", torch.bfloat16), ("tf32", torch.float32),
           ("ieee", torch.float32))

# (BLOCK_M, BLOCK_N, num_warps, num_stages, D_CHUNK) per (kernel, class, masked) and head-dim bucket.
# One table for sm_80 and sm_90: the static tier compiles every entry for both, without spills.
# Register budget (sm_80 mma.sync): a warp owns 16 query rows; the q and q̇ operand slabs cost
# D·itemsize/8 registers per thread each, the fp32 accumulators acc_O and acc_T 2·Dv/warps_along_Dv.
# Hence 8 warps (4 along the keys / Dv) for the JVP at large head dims, and D_CHUNK (q re-read in
# slices per key block) for fp32 at d=256.
_CFG = {
    ("fwd", "lowp"): {32: (128, 64, 8, 3, 0), 64: (128, 64, 4, 3, 0), 128: (128, 64, 8, 3, 0),
                      256: (64, 64, 8, 2, 0)},
    ("fwd", "tf32"): {32: (64, 64, 8, 2, 0), 64: (64, 64, 8, 2, 0), 128: (64, 32, 8, 2, 0),
                      256: (32, 32, 8, 2, 0)},
    ("fwd", "ieee"): {32: (32, 32, 4, 2, 0), 64: (32, 32, 4, 2, 0), 128: (16, 32, 4, 2, 0),
                      256: (16, 16, 8, 2, 64)},
    ("jvp", "lowp"): {32: (128, 32, 8, 2, 0), 64: (128, 32, 8, 2, 0), 128: (64, 32, 8, 2, 0),
                      256: (32, 32, 8, 2, 0)},
    ("jvp", "tf32"): {32: (32, 32, 8, 2, 0), 64: (32, 32, 8, 2, 0), 128: (16, 32, 8, 2, 0),
                      256: (16, 16, 8, 2, 64)},
    # no fp32-accurate (3xTF32) JVP kernel at d > 128: every tile tried spills; attention_jvp runs
    # _jvp_blockwise (PyTorch fp32 matmuls over query blocks) there
    ("jvp", "ieee"): {32: (16, 32, 4, 2, 0), 64: (16, 32, 4, 2, 0), 128: (16, 16, 8, 2, 0)},
}
# Hopper (sm_90) entries where a larger tile runs faster than the shared table's and does not spill there
# (it does on sm_80). Measured on an H100 with benchmarks.tune_attention (bf16, B=2, H=16, N=4096,
# after the alignment fix of _row_offsets): JVP d=64 (128, 64, 8, 3) 0.944 ms, level with the
# shared (128, 32, 8, 2) (0.945); JVP d=128 (128, 32, 8, 3) 1.91 ms = 359 TFLOP/s (10 flops per
# query, key, dim) vs (64, 32, 8, 2) 6.64 ms = 104.
_CFG_SM90 = {
    ("jvp", "lowp"): {64: (128, 64, 8, 3, 0), 128: (128, 32, 8, 3, 0)},
}
# Masked kernels (the mask tile is pipelined through shared memory too) where the entry above does not fit.
_CFG_MASKED = {
    ("fwd", "lowp"): {128: (128, 64, 8, 2, 0)},
    ("jvp", "lowp"): {128: (64, 16, 8, 2, 0)},
}
# Under the interpreter: small tiles (BLOCK_M != BLOCK_N exercises the causal boundary logic), the
# GPU table's D_CHUNK (so that the interpreter runs the same code paths).
_INTERP_TILE = (32, 16, 4, 1)

_TT = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
# Tangent sets (HAS_TQ, HAS_TK, HAS_TV) with their own JVP kernel: self-attention (all three) and, for
# fp16/bf16, cross-attention to a constant context (q̇ only). Any other set runs the all-three kernel
# with broadcast zeros (one row of memory) for the missing tangents.
JVP_TANGENT_SETS = {"lowp": ((True, True, True), (True, False, False)), "tf32": ((True, True, True),),
                    "ieee": ((True, True, True),)}


def _cls(dtype: torch.dtype, precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"attention: precision must be one of {PRECISIONS}, got {precision!r}")
    if dtype not in _TT:
        raise TypeError(f"attention: Triton kernels take float16, bfloat16 or float32, got {dtype}")
    return precision if dtype == torch.float32 else "lowp"


def head_dim_bucket(D: int, Dv: int) -> int:
    """BLOCK_D = BLOCK_DV: the smallest bucket >= max(D, Dv)."""
    need = max(D, Dv)
    for b_ in HEAD_DIM_BUCKETS:
        if need <= b_:
            return b_
    raise ValueError(f"attention: head dims up to {MAX_HEAD_DIM} are supported, got D={D}, Dv={Dv}")


def _table_config(kernel: str, cls: str, block_d: int, masked: bool, arch: int) -> tuple[int, int, int, int, int]:
    """The GPU tables' entry for sm_`arch` (KeyError where the tables have none): a masked kernel's
    own entry first, then Hopper's, then the shared one."""
    masked_cfg = _CFG_MASKED.get((kernel, cls), {}).get(block_d) if masked else None
    if masked_cfg is not None:
        return masked_cfg
    own = _CFG_SM90.get((kernel, cls), {}) if arch >= 90 else {}
    if block_d in own:
        return own[block_d]
    return _CFG[(kernel, cls)][block_d]


def _config(kernel: str, cls: str, block_d: int, masked: bool, arch: int = 80) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, D_CHUNK) of one launch on sm_`arch`."""
    if block_d not in _CFG[(kernel, cls)]:
        if not triton_interpret():
            raise NotImplementedError(
                f"attention_jvp: float32 with precision='ieee' (3xTF32 dots) supports head dims up to "
                f"{max(_CFG[(kernel, cls)])} on the GPU, got {block_d}-wide heads; use precision='tf32', or "
                "float16/bfloat16")
        cls = "tf32"  # the interpreter is exact whatever the precision
    if triton_interpret():
        return (*_INTERP_TILE, min(_table_config(kernel, cls, block_d, masked, 80)[4], 16))
    return _table_config(kernel, cls, block_d, masked, arch)


_ARCH: dict = {}


def _arch(device: torch.device) -> int:
    """10 * major + minor compute capability of a CUDA device (cached); 80 elsewhere."""
    if device.type != "cuda":
        return 80
    a = _ARCH.get(device.index)
    if a is None:
        major, minor = torch.cuda.get_device_capability(device)
        a = _ARCH[device.index] = 10 * major + minor
    return a


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
_MAX_ROW_STRIDE = 2**31 // 256  # in-block key offsets are int32: BLOCK_N (<= 128) · stride < 2^31


def _round8(d: int) -> int:
    return -(-d // 8) * 8


def _aligned(x: Tensor, width: int) -> bool:
    """The kernels' promise for one (B, H, N, D) operand: head dim `width` (a multiple of 8), every
    (b, h, n) stride a multiple of 8 elements, 16-byte aligned data (vector loads of whole 8-lane
    groups), and a key-row stride small enough for int32 in-block offsets."""
    return (x.shape[-1] == width and x.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in x.stride()[:3])
            and abs(x.stride(2)) <= _MAX_ROW_STRIDE)


def _operand(x: Tensor, width: int) -> Tensor:
    """x itself when aligned (no copy: the usual case, e.g. d = 64, 72, 80, 128 in (B, H, N, D) or
    (B, N, H, D) memory); else a contiguous copy zero-padded to `width` columns (odd head dims such as
    111, or odd strides / offsets): zero columns add nothing to q·k, and padded v columns only reach
    padded output columns that are never returned."""
    if _aligned(x, width):
        return x
    y = x.new_zeros((*x.shape[:-1], width))
    y[..., :x.shape[-1]] = x
    return y


def _additive_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    """The SPEC's mask as the fp32 additive mask the kernels read. A bool mask (True = attend) becomes
    0 / -inf over its stored extent only (dims of stride 0 stay broadcast): a (B, 1, 1, Nk) key mask
    costs Nk floats per batch, a fully materialized one 4 bytes per entry."""
    if mask is None or mask.dtype == torch.float32:
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"attention: mask must be bool or float32, got {mask.dtype}")
    stored = mask[tuple(slice(0, 1) if st == 0 else slice(None) for st in mask.stride())]
    add = torch.zeros(stored.shape, dtype=torch.float32, device=mask.device).masked_fill_(~stored, -math.inf)
    return add.expand(mask.shape)


def _out_like(q: Tensor, B: int, Hq: int, Nq: int, Dv: int) -> Tensor:
    """(B, Hq, Nq, Dv) in (B, Nq, Hq, Dv) memory, the layout of torch's flash attention output."""
    return torch.empty((B, Nq, Hq, Dv), dtype=q.dtype, device=q.device).transpose(1, 2)


def _shapes(q: Tensor, k: Tensor, v: Tensor):
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    assert k.shape == (B, Hkv, Nk, D) and v.shape == (B, Hkv, Nk, Dv) and Hq % Hkv == 0, \
        (tuple(q.shape), tuple(k.shape), tuple(v.shape))
    return B, Hq, Hkv, Nq, Nk, D, Dv


def _run(kernel: str, q: Tensor, k: Tensor, v: Tensor, tangents, mask, is_causal: bool, scale: float,
         precision: str, has) -> tuple:
    """Shared launcher: operands prepared (_operand), outputs allocated, one kernel launch.
    Returns (out, out_tangent or None, lse, mu or None)."""
    B, Hq, Hkv, Nq, Nk, D, Dv = _shapes(q, k, v)
    cls = _cls(q.dtype, precision)
    D8, Dv8 = _round8(D), _round8(Dv)
    block_d = head_dim_bucket(D8, Dv8)
    out = _out_like(q, B, Hq, Nq, Dv)
    tout = _out_like(q, B, Hq, Nq, Dv) if kernel == "jvp" else None
    lse = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device)
    mu = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device) if kernel == "jvp" else None
    if B * Hq * Nq == 0:
        return out, tout, lse, mu
    if Nk == 0:  # no keys: every row is fully masked
        return (out.zero_(), None if tout is None else tout.zero_(), lse.fill_(math.inf),
                None if mu is None else mu.zero_())
    q_, k_ = _operand(q, D8), _operand(k, D8)
    v_ = _operand(v, Dv8)
    outs = [out] + ([tout] if tout is not None else [])
    outs_ = [o if Dv8 == Dv else _out_like(q, B, Hq, Nq, Dv8) for o in outs]
    mask = _additive_mask(mask)
    if mask is None and not scale > 0:
        # The unmasked kernels fold a positive scale into the exponent (max(s·c) = max(s)·c needs
        # c > 0). Zero, negative or NaN scales run the masked kernels with a zero mask of stride 0
        # (one float of memory), which scale the scores first.
        mask = torch.zeros((), dtype=torch.float32, device=q.device).expand(B, Hq, Nq, Nk)
    mask_arg = mask if mask is not None else lse
    ms = tuple(mask.stride()) if mask is not None else (0, 0, 0, 0)
    BLOCK_M, BLOCK_N, warps, stages, chunk = _config(kernel, cls, block_d, mask is not None, _arch(q.device))
    n_m = triton.cdiv(Nq, BLOCK_M)
    common = dict(HAS_MASK=mask is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d,
                  BLOCK_DV=block_d, D_CHUNK=chunk, DOT_PREC=DOT_INPUT_PRECISION[cls],
                  UPCAST=bool(triton_interpret() and q.dtype == torch.bfloat16),
                  num_warps=warps, num_stages=stages)
    tail = (Hq, Hq // Hkv, Nq, Nk, D8, Dv8, n_m, float(scale), int(bool(is_causal)), 0)
    if kernel == "fwd":
        _attn_fwd_kernel[(B * Hq * n_m,)](
            q_, k_, v_, mask_arg, outs_[0], lse,
            *q_.stride()[:3], *k_.stride()[:3], *v_.stride()[:3], *ms, *outs_[0].stride()[:3], *tail,
            **common)
    else:
        def zeros(p, w):  # a zero tangent: one row of memory, broadcast over (B, H, N)
            return torch.zeros(w, dtype=p.dtype, device=p.device).expand(*p.shape[:-1], w)

        tq_, tk_, tv_ = (p if not h else (zeros(p, w) if t is None else _operand(t, w))
                         for t, p, w, h in ((tangents[0], q_, D8, has[0]), (tangents[1], k_, D8, has[1]),
                                            (tangents[2], v_, Dv8, has[2])))
        _attn_jvp_kernel[(B * Hq * n_m,)](
            q_, k_, v_, tq_, tk_, tv_, mask_arg, outs_[0], outs_[1], lse, mu,
            *q_.stride()[:3], *k_.stride()[:3], *v_.stride()[:3], *tq_.stride()[:3], *tk_.stride()[:3],
            *tv_.stride()[:3], *ms, *outs_[0].stride()[:3], *outs_[1].stride()[:3], *tail,
            HAS_TQ=has[0], HAS_TK=has[1], HAS_TV=has[2], **common)
    for o, o_ in zip(outs, outs_):
        if o_ is not o:
            o.copy_(o_[..., :Dv])
    return out, tout, lse, mu


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool, scale: float,
                  *, precision: str = "ieee") -> tuple[Tensor, Tensor]:
    """Forward (SPEC op 1): (out (B, Hq, Nq, Dv) in (B, Nq, Hq, Dv) memory, lse (B, Hq, Nq) fp32)."""
    out, _, lse, _ = _run("fwd", q, k, v, None, mask, is_causal, scale, precision, None)
    return out, lse


def attention_jvp(q: Tensor, k: Tensor, v: Tensor, tq: Optional[Tensor], tk: Optional[Tensor],
                  tv: Optional[Tensor], mask: Optional[Tensor], is_causal: bool, scale: float,
                  *, precision: str = "ieee") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused JVP (SPEC op 3, A25): (out, out_tangent, lse, mu). A None tangent is a zero tangent: its
    loads and matmuls are skipped where JVP_TANGENT_SETS has a kernel for the given set. out and
    out_tangent as attention_fwd's out, lse and mu (B, Hq, Nq) fp32."""
    given = (tq is not None, tk is not None, tv is not None)
    if not any(given):
        out, lse = attention_fwd(q, k, v, mask, is_causal, scale, precision=precision)
        return out, torch.zeros_like(out), lse, torch.zeros_like(lse)
    for name, t, p in (("tq", tq, q), ("tk", tk, k), ("tv", tv, v)):
        assert t is None or (t.shape == p.shape and t.dtype == p.dtype), (name, tuple(t.shape), t.dtype)
    cls = _cls(q.dtype, precision)
    block_d = head_dim_bucket(_round8(q.shape[-1]), _round8(v.shape[-1]))
    if block_d not in _CFG[("jvp", cls)] and (not triton_interpret() or INTERPRETER_JVP_BLOCKWISE):
        return _jvp_blockwise(q, k, v, tq, tk, tv, mask, is_causal, scale)
    has = given if given in JVP_TANGENT_SETS[cls] else (True, True, True)
    out, tout, lse, mu = _run("jvp", q, k, v, (tq, tk, tv), mask, is_causal, scale, precision, has)
    return out, tout, lse, mu


INTERPRETER_JVP_BLOCKWISE = False  # the tests make the interpreter take _jvp_blockwise too


def _jvp_blockwise(q: Tensor, k: Tensor, v: Tensor, tq: Optional[Tensor], tk: Optional[Tensor],
                   tv: Optional[Tensor], mask: Optional[Tensor], is_causal: bool, scale: float) -> tuple:
    """(out, out_tangent, lse, mu) of the JVP kernel (A24-A25), computed with PyTorch matmuls in fp32
    over blocks of query rows (scm_kernels.attention.blockwise): O(block x Nk) memory, exact fp32
    products (the "ieee" precision). For the JVP families that have no kernel tile (fp32 "ieee" at
    heads wider than 128: every tile tried spills, see _CFG); fully masked rows give out = 0,
    out_tangent = 0 and lse = +inf, as the kernel."""
    B, Hq, _, Nq, _, _, Dv = _shapes(q, k, v)
    out, tout = _out_like(q, B, Hq, Nq, Dv), _out_like(q, B, Hq, Nq, Dv)
    lse = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device)
    mu = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device)
    bl = Blocks(q, k, mask, is_causal, scale)
    k32, v32, tk32, tv32 = bl.kv(k), bl.kv(v), bl.kv(tk), bl.kv(tv)
    for i0, i1 in bl.ranges():
        qb, tqb = bl.rows(q, i0, i1), bl.rows(tq, i0, i1)
        s = bl.scores(qb, k32, i0, i1)
        m = torch.logsumexp(s, dim=-1, keepdim=True)
        m = torch.where(torch.isneginf(m), torch.full_like(m, math.inf), m)  # fully masked rows
        p = torch.exp(s - m)
        sd = torch.zeros_like(s)
        if tqb is not None:
            sd = sd + tqb @ k32.transpose(-1, -2)
        if tk32 is not None:
            sd = sd + qb @ tk32.transpose(-1, -2)
        sd = scale * sd
        mub = (p * sd).sum(-1, keepdim=True)
        tob = (p * (sd - mub)) @ v32
        if tv32 is not None:
            tob = tob + p @ tv32
        out[:, :, i0:i1] = bl.ungroup(p @ v32).to(q.dtype)
        tout[:, :, i0:i1] = bl.ungroup(tob).to(q.dtype)
        lse[:, :, i0:i1] = bl.ungroup(m)[..., 0]
        mu[:, :, i0:i1] = bl.ungroup(mub)[..., 0]
    return out, tout, lse, mu


# ---------------------------------------------------------------------------------------------
# Ahead-of-time specs: every (kernel, dtype, precision, head-dim bucket, mask, tangent set)
# ---------------------------------------------------------------------------------------------
def _signature(kernel: str, ptr: str) -> dict:
    i32, f32, cx = "i32", "*fp32", "constexpr"
    sig = {"Q": ptr, "K": ptr, "V": ptr}
    strides = ["stride_qb", "stride_qh", "stride_qn", "stride_kb", "stride_kh", "stride_kn",
               "stride_vb", "stride_vh", "stride_vn"]
    if kernel == "jvp":
        sig.update(TQ=ptr, TK=ptr, TV=ptr, MASK=f32, OUT=ptr, TOUT=ptr, LSE=f32, MU=f32)
        strides += ["stride_tqb", "stride_tqh", "stride_tqn", "stride_tkb", "stride_tkh", "stride_tkn",
                    "stride_tvb", "stride_tvh", "stride_tvn"]
    else:
        sig.update(MASK=f32, OUT=ptr, LSE=f32)
    strides += ["stride_mb", "stride_mh", "stride_mq", "stride_mk", "stride_ob", "stride_oh", "stride_on"]
    if kernel == "jvp":
        strides += ["stride_tob", "stride_toh", "stride_ton"]
    sig.update({s: i32 for s in strides})
    sig.update({n: i32 for n in ("Hq", "G", "Nq", "Nk", "D", "DV", "n_m_blocks")})
    sig.update(scale="fp32", is_causal=i32, q_step=i32)
    names = ["HAS_MASK", "BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV"]
    names += ["HAS_TQ", "HAS_TK", "HAS_TV"] if kernel == "jvp" else []
    names += ["D_CHUNK"]
    sig.update({n: cx for n in names + ["DOT_PREC", "UPCAST"]})
    return sig


def _aot_specs() -> list:
    specs = []
    for (cls, dtype), block_d, masked in itertools.product(CLASSES, HEAD_DIM_BUCKETS, (False, True)):
        for tangents in (None, *JVP_TANGENT_SETS[cls]):
            kernel = "fwd" if tangents is None else "jvp"
            if block_d not in _CFG[(kernel, cls)]:
                continue
            base = _table_config(kernel, cls, block_d, masked, 80)
            sm90 = {_table_config(kernel, cls, block_d, masked, 90)} - {base}
            # the shared entry (sm_80 only where Hopper has its own), then Hopper's own
            for cfg, archs in [(base, (80,) if sm90 else None),
                               *[(c, (90,)) for c in sm90]]:
                BLOCK_M, BLOCK_N, warps, stages, chunk = cfg
                const = dict(HAS_MASK=masked, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d, BLOCK_DV=block_d,
                             D_CHUNK=chunk, DOT_PREC=DOT_INPUT_PRECISION[cls], UPCAST=False)
                fn = _attn_fwd_kernel
                if tangents is not None:
                    const.update(HAS_TQ=tangents[0], HAS_TK=tangents[1], HAS_TV=tangents[2])
                    fn = _attn_jvp_kernel
                specs.append(spec("attention", fn, _signature(kernel, _TT[dtype]), const,
                                  num_warps=warps, num_stages=stages, expects_mma=True, archs=archs))
    return specs


AOT_SPECS = _aot_specs()

__all__ = ["attention_fwd", "attention_jvp", "AOT_SPECS", "head_dim_bucket", "HEAD_DIM_BUCKETS",
           "MAX_HEAD_DIM", "PRECISIONS", "JVP_TANGENT_SETS", "CLASSES", "DOT_INPUT_PRECISION"]
