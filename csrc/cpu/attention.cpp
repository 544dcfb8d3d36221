// CPU kernels of flash attention with its forward-mode derivative (A24-A27):
// torch.ops.scm.attention_fwd / attention_bwd / attention_jvp / attention_jvp_bwd.
//
// Shapes: q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv); query head h reads kv head
// h / G with G = Hq / Hkv (GQA/MQA). Every operand has inner stride 1; the other strides are free
// and are read as such (no copies of whole inputs). Row-wise, for query i and key j:
//   s_ij = lambda q_i.k_j (+ additive mask), -inf where a boolean mask or causality (j > i) hides j
//   P = softmax_j(s),  O_i = sum_j P_ij v_j,  lse_i = m_i + log l_i  (+inf for a fully hidden row)
//   (A24) s'_ij = lambda (q'_i.k_j + q_i.k'_j),  mu_i = sum_j P_ij s'_ij,
//         O'_i = sum_j P_ij (s'_ij - mu_i) v_j + sum_j P_ij v'_j
//   (A25) online over key blocks with running max m: l = sum e^{s-m}, acc_O = sum e^{s-m} v,
//         acc_A = sum e^{s-m} v', acc_B = sum (e^{s-m} s') v, rho = sum e^{s-m} s'; every accumulator
//         is rescaled by e^{m_old - m_new}; O = acc_O / l, mu = rho / l, O' = (acc_A + acc_B) / l - mu O.
//   (A26) Delta_i = dO_i.O_i; P = exp(s - lse); dv = P^T dO; ds = P (dO v^T - Delta);
//         dq = lambda ds k; dk = lambda ds^T q.
//   (A27) with g = dL/dO' (SPEC of the ops): nu_i = g_i.O_i, Delta'_i = dO_i.O_i + g_i.O'_i,
//         ds'_ij = P_ij (g_i.v_j - nu_i), ds_ij = P_ij (dO_i.v_j + g_i.v'_j - Delta'_i) + ds'_ij (s'_ij - mu_i);
//         dv = P^T dO + (P (s' - mu))^T g, dv' = P^T g, dq = lambda (ds k + ds' k'), dq' = lambda ds' k,
//         dk = lambda (ds^T q + ds'^T q'), dk' = lambda ds'^T q.
//         With g = 0 this is (A26): attention_bwd is the same kernel with g = None.
//
// Tiling: a task owns a block of query rows (forward, JVP, dq) or a block of keys of one kv head
// (dk, dv and their tangents, summed over the G query heads of the kv head inside the task), so
// memory is O(N * block) and no (Nq, Nk) matrix is ever formed. The block products run on a
// register-tiled AVX-512 GEMM (rt::gemm) where the CPU has it and the tiles are fp32; for fp64, or
// without AVX-512, they go through the BLAS torch links (MKL sgemm/dgemm). Tiles are fp32 (fp64 for
// fp64 inputs): fp16/bf16 tiles are converted into buffers, fp32/fp64 operands are read in place
// (key tiles are also transposed where a product needs k^T or v^T). Elementwise row loops are
// branch-free and vectorized (AVX-512/AVX2 clones), with a polynomial exp (one per logit).
//
// Determinism: no atomics; every sum runs in a fixed order that depends only on the shapes, so
// repeated calls are bitwise equal. The backward has two schedules (bwd_fused_pays picks one from
// the thread count); both run the same block products on 64-byte aligned buffers in the same order
// per output (dq over key blocks ascending, dk/dv over query heads, then query blocks ascending),
// so the thread count does not change the result either.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common.h"

// Fortran BLAS of the BLAS torch is linked with (MKL in the official wheels exports these). Weak, so
// that a torch without them still loads: the kernels then fall back to torch's addmm.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace scm::cpu {
namespace {

using i64 = int64_t;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SCM_ATTN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SCM_ATTN_CLONES
#endif
#define SCM_ATTN_INLINE inline __attribute__((always_inline))

// Tile sizes (rows of queries x keys). Forward/JVP: large query blocks amortize the key tiles;
// backward: smaller blocks keep the five (nine for A27) (q block x key block) buffers in cache.
inline i64 q_block_fwd(i64 Nq) { return Nq >= 768 ? 256 : Nq >= 192 ? 64 : 32; }
constexpr i64 kKvBlockFwd = 512;
inline i64 q_block_bwd(i64 Nq) { return Nq >= 192 ? 128 : 32; }
constexpr i64 kKvBlockBwd = 128;
// Largest per-task dq accumulator (bytes) of the fused backward schedule.
constexpr i64 kFusedDqBytes = i64(64) << 20;

// ---------------------------------------------------------------------------------------------
// BLAS
// ---------------------------------------------------------------------------------------------

// Column-major C (m x n) = alpha op(A) op(B) + beta C, through torch's BLAS.
template <class T>
void blas_gemm(bool ta, bool tb, i64 m, i64 n, i64 k, T alpha, const T* a, i64 lda, const T* b, i64 ldb, T beta,
               T* c, i64 ldc) {
  constexpr bool f32 = std::is_same_v<T, float>;
  const bool have = f32 ? (sgemm_ != nullptr) : (dgemm_ != nullptr);
  if (have && m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX && ldc <= INT_MAX) {
    const char cta = ta ? 'T' : 'N', ctb = tb ? 'T' : 'N';
    const int im = int(m), in = int(n), ik = int(k), ilda = int(lda), ildb = int(ldb), ildc = int(ldc);
    if constexpr (f32) {
      sgemm_(&cta, &ctb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
    } else {
      dgemm_(&cta, &ctb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
    }
    return;
  }
  // No Fortran BLAS exported: torch's addmm on views of the same memory (row-major view of the
  // column-major operands: C^T = op(B)^T op(A)^T).
  const auto opts = at::TensorOptions().dtype(f32 ? at::kFloat : at::kDouble);
  auto view = [&](const T* p, i64 rows, i64 cols, i64 ld, bool trans) {
    // column-major rows x cols with leading dimension ld, as a (rows, cols) tensor; op() applied
    at::Tensor x = at::from_blob(const_cast<T*>(p), {rows, cols}, {1, ld}, opts);
    return trans ? x.t() : x;
  };
  at::Tensor A = view(a, ta ? k : m, ta ? m : k, lda, ta);
  at::Tensor Bm = view(b, tb ? n : k, tb ? k : n, ldb, tb);
  at::Tensor C = at::from_blob(c, {m, n}, {1, ldc}, opts);
  C.addmm_(A, Bm, beta, alpha);
}

// Row-major C (M x N, row stride ldc) = alpha op(A) op(B) + beta C with op(A) M x K, op(B) K x N;
// lda/ldb are the row strides of A and B as stored (>= their stored column counts).
template <class T>
SCM_ATTN_INLINE void mm(bool ta, bool tb, i64 M, i64 N, i64 K, T alpha, const T* A, i64 lda, const T* B, i64 ldb,
                        T beta, T* C, i64 ldc) {
  blas_gemm<T>(tb, ta, N, M, K, alpha, B, ldb, A, lda, beta, C, ldc);
}

// ---------------------------------------------------------------------------------------------
// Register-tiled fp32 GEMM on row-major operands (AVX-512), for the forward/JVP block products
// ---------------------------------------------------------------------------------------------
// C (M x N, row stride ldc) = alpha A B (+ C when acc), A (M x K) and B (K x N) row-major with row
// strides lda, ldb. Tiles of 6 rows x 64 columns live in 24 zmm accumulators; every k step loads
// one 64-wide row of B and broadcasts 6 elements of A. Nothing is packed: the forward's operands
// already have this layout (the logits and probabilities S / P row-major, v row-major, k
// transposed once per call, or per key block in the backward), where the BLAS would repack a block of
// P (r x 512 floats) and the key tiles for every product. Each output element is one fp32 sum over
// k = 0 .. K-1 in order, then scaled, then added to C: deterministic, independent of threads.
// Measured on the 2-core Zen 4 VM, one thread: P v (252 x 512 x 64) 108-111 GFLOP/s, q k^T
// (252 x 64 x 512) 92-96, against 96-103 for MKL's sgemm on the same shapes (its packing included).
namespace rt {
#if defined(__GNUC__) && defined(__x86_64__)
#define SCM_RT_GEMM 1
#define SCM_RT_TARGET __attribute__((target("avx512f")))

template <int R, int NV>
SCM_RT_TARGET void tile(i64 K, const float* __restrict A, i64 sai, i64 sak, const float* __restrict B, i64 ldb,
                        float* C, i64 ldc, __mmask16 last, float alpha, bool acc) {
  // Every loop over the tile is unrolled so that c stays in registers (a loop left rolled makes GCC
  // keep the array in memory and store it back on every k step).
  __m512 c[R][NV];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[i][v] = _mm512_setzero_ps();
  for (i64 k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v + 1 < NV; ++v) bv[v] = _mm512_loadu_ps(b + 16 * v);
    bv[NV - 1] = _mm512_maskz_loadu_ps(last, b + 16 * (NV - 1));
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m512 a = _mm512_set1_ps(A[i * sai + k * sak]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[i][v] = _mm512_fmadd_ps(a, bv[v], c[i][v]);
    }
  }
  const __m512 al = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    float* ci = C + i * ldc;
#pragma GCC unroll 4
    for (int v = 0; v + 1 < NV; ++v) {
      __m512 x = _mm512_mul_ps(c[i][v], al);
      if (acc) x = _mm512_add_ps(x, _mm512_loadu_ps(ci + 16 * v));
      _mm512_storeu_ps(ci + 16 * v, x);
    }
    __m512 x = _mm512_mul_ps(c[i][NV - 1], al);
    if (acc) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(last, ci + 16 * (NV - 1)));
    _mm512_mask_storeu_ps(ci + 16 * (NV - 1), last, x);
  }
}

template <int R>
SCM_RT_TARGET void row_panel(int nv, i64 K, const float* A, i64 sai, i64 sak, const float* B, i64 ldb, float* C,
                             i64 ldc, __mmask16 last, float alpha, bool acc) {
  switch (nv) {
    case 1: tile<R, 1>(K, A, sai, sak, B, ldb, C, ldc, last, alpha, acc); break;
    case 2: tile<R, 2>(K, A, sai, sak, B, ldb, C, ldc, last, alpha, acc); break;
    case 3: tile<R, 3>(K, A, sai, sak, B, ldb, C, ldc, last, alpha, acc); break;
    default: tile<R, 4>(K, A, sai, sak, B, ldb, C, ldc, last, alpha, acc); break;
  }
}

// A's element (i, k) is A[i sai + k sak]: (lda, 1) for a row-major A, (1, lda) for the transpose of
// a row-major (K x M) matrix (its 6 broadcasts per k step then read 6 adjacent floats).
SCM_RT_TARGET void gemm(i64 M, i64 N, i64 K, float alpha, const float* A, i64 sai, i64 sak, const float* B,
                        i64 ldb, bool acc, float* C, i64 ldc) {
  constexpr i64 kRows = 6, kCols = 64;
  for (i64 j = 0; j < N; j += kCols) {  // a 64-column panel of B stays in L1 over the row panels
    const i64 w = std::min(kCols, N - j);
    const int nv = int((w + 15) / 16);
    const int rem = int(w - 16 * (nv - 1));
    const __mmask16 last = __mmask16(rem == 16 ? 0xFFFF : (1u << rem) - 1);
    i64 i = 0;
    for (; i + kRows <= M; i += kRows)
      row_panel<6>(nv, K, A + i * sai, sai, sak, B + j, ldb, C + i * ldc + j, ldc, last, alpha, acc);
    const float* a = A + i * sai;
    float* c = C + i * ldc + j;
    switch (M - i) {
      case 5: row_panel<5>(nv, K, a, sai, sak, B + j, ldb, c, ldc, last, alpha, acc); break;
      case 4: row_panel<4>(nv, K, a, sai, sak, B + j, ldb, c, ldc, last, alpha, acc); break;
      case 3: row_panel<3>(nv, K, a, sai, sak, B + j, ldb, c, ldc, last, alpha, acc); break;
      case 2: row_panel<2>(nv, K, a, sai, sak, B + j, ldb, c, ldc, last, alpha, acc); break;
      case 1: row_panel<1>(nv, K, a, sai, sak, B + j, ldb, c, ldc, last, alpha, acc); break;
      default: break;
    }
  }
}

inline bool available() {
  static const bool ok = __builtin_cpu_supports("avx512f") && std::getenv("SCM_KERNELS_CPU_BLAS") == nullptr;
  return ok;
}
#else
inline bool available() { return false; }
inline void gemm(i64, i64, i64, float, const float*, i64, i64, const float*, i64, bool, float*, i64) {}
#endif
}  // namespace rt

// Row-major C (M x N) = alpha op(A) B (+ C when acc) with B row-major and op(A) = A (ta false, A
// M x K) or A^T (ta true, A stored K x M), lda A's row stride: the register-tiled kernel for fp32
// where it runs (fast), else the BLAS (mm).
template <class T>
SCM_ATTN_INLINE void mm_rr(bool fast, bool ta, i64 M, i64 N, i64 K, T alpha, const T* A, i64 lda, const T* B,
                           i64 ldb, bool acc, T* C, i64 ldc) {
  if constexpr (std::is_same_v<T, float>) {
    if (fast) return rt::gemm(M, N, K, alpha, A, ta ? 1 : lda, ta ? lda : 1, B, ldb, acc, C, ldc);
  }
  mm<T>(ta, false, M, N, K, alpha, A, lda, B, ldb, acc ? T(1) : T(0), C, ldc);
}

// ---------------------------------------------------------------------------------------------
// Elementwise row kernels (vectorized; kLanes independent accumulators, two AVX-512 vectors, folded
// in a fixed order).
// ---------------------------------------------------------------------------------------------
constexpr int kLanes = 32;

// e^x in fp32 without a library call, so that the loops vectorize: Cody-Waite reduction
// x = n ln2 + r, the Cephes polynomial on |r| <= ln2/2 (about 1 ulp), scaled by 2^n through the
// exponent bits. x < -87 (masked logits: -inf) gives exactly 0, and the clamp keeps every lane in
// the normal range (a denormal result costs a microcode assist per vector); x is clamped at 88
// (the kernels take e^x for x <= 0 up to rounding). Not norm.h's sigmoid exponential, which
// evaluates -log2(e) 2^f on the reduced argument of -x log2(e) instead: a different reduction and
// coefficients.
SCM_ATTN_INLINE float exp_k(float x) {
  constexpr float lo = -87.f, hi = 88.f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  float n = xc * 1.44269504088896341f;
  n = (n + 12582912.f) - 12582912.f;  // round to nearest (|n| < 2^22)
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  const uint32_t bits = uint32_t(int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < lo ? 0.f : y * scale;
}
SCM_ATTN_INLINE double exp_k(double x) { return std::exp(x); }

template <class T>
SCM_ATTN_INLINE T fold_sum(T* acc) {
  return fold_pairwise<kLanes>(acc);
}

// max_j s_j (-inf when every entry is -inf).
template <class T>
SCM_ATTN_CLONES T row_max(const T* __restrict s, i64 n) {
  T acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = -std::numeric_limits<T>::infinity();
  i64 j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] = s[j + l] > acc[l] ? s[j + l] : acc[l];
  for (int l = 0; j < n; ++j, ++l) acc[l] = s[j] > acc[l] ? s[j] : acc[l];
  return fold_pairwise<kLanes>(acc, [](auto& a, const auto& b) { a = b > a ? b : a; });
}

// sum_j x_j.
template <class T>
SCM_ATTN_CLONES T row_sum(const T* __restrict x, i64 n) {
  T acc[kLanes] = {};
  i64 j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += x[j + l];
  for (int l = 0; j < n; ++j, ++l) acc[l] += x[j];
  return fold_sum(acc);
}

// s_j <- e^{s_j - m}; returns sum_j (A25: l).
template <class T>
SCM_ATTN_CLONES T row_exp_sum(T* __restrict s, i64 n, T m) {
  T acc[kLanes] = {};
  i64 j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const T e = exp_k(s[j + l] - m);
      s[j + l] = e;
      acc[l] += e;
    }
  for (int l = 0; j < n; ++j, ++l) {
    const T e = exp_k(s[j] - m);
    s[j] = e;
    acc[l] += e;
  }
  return fold_sum(acc);
}

// s_j <- e^{s_j - m}, sd_j <- s_j (sd_j - c); *l = sum s_j, *rho = sum sd_j (A25; the shift c is 0
// there, and the tangent-only kernel's per-row reference of s').
template <class T>
SCM_ATTN_CLONES void row_exp_sum2(T* __restrict s, T* __restrict sd, i64 n, T m, T c, T* l_out, T* rho_out) {
  T acc[kLanes] = {}, acc2[kLanes] = {};
  i64 j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const T e = exp_k(s[j + l] - m);
      const T p = e * (sd[j + l] - c);
      s[j + l] = e;
      sd[j + l] = p;
      acc[l] += e;
      acc2[l] += p;
    }
  for (int l = 0; j < n; ++j, ++l) {
    const T e = exp_k(s[j] - m);
    const T p = e * (sd[j] - c);
    s[j] = e;
    sd[j] = p;
    acc[l] += e;
    acc2[l] += p;
  }
  *l_out = fold_sum(acc);
  *rho_out = fold_sum(acc2);
}

// s_j <- e^{s_j - lse} (P recomputed from the stored LSE; lse = +inf gives 0).
template <class T>
SCM_ATTN_CLONES void row_exp(T* __restrict s, i64 n, T lse) {
  for (i64 j = 0; j < n; ++j) s[j] = exp_k(s[j] - lse);
}

// x_j <- x_j + a y_j.
template <class T>
SCM_ATTN_CLONES void row_axpy(T* __restrict x, const T* __restrict y, i64 n, T a) {
  for (i64 j = 0; j < n; ++j) x[j] += a * y[j];
}

template <class T>
SCM_ATTN_CLONES void row_scale(T* __restrict x, i64 n, T a) {
  for (i64 j = 0; j < n; ++j) x[j] *= a;
}

// (A26) x_j <- ds_j = p_j (x_j - delta).
template <class T>
SCM_ATTN_CLONES void row_ds(const T* __restrict p, T* __restrict x, i64 n, T delta) {
  for (i64 j = 0; j < n; ++j) x[j] = p[j] * (x[j] - delta);
}

// (A27) without a logit tangent: y_j <- ds'_j = p_j (y_j - nu), x_j <- ds_j = p_j (x_j - delta).
template <class T>
SCM_ATTN_CLONES void row_ds_g(const T* __restrict p, T* __restrict x, T* __restrict y, i64 n, T delta, T nu) {
  for (i64 j = 0; j < n; ++j) {
    y[j] = p[j] * (y[j] - nu);
    x[j] = p[j] * (x[j] - delta);
  }
}

// (A27) y_j <- ds'_j = p_j (y_j - nu); x_j <- ds_j = p_j (x_j - delta) + ds'_j (sd_j - mu);
// sd_j <- p_j (sd_j - mu).
template <class T>
SCM_ATTN_CLONES void row_ds_jvp(const T* __restrict p, T* __restrict x, T* __restrict y, T* __restrict sd, i64 n,
                                T delta, T nu, T mu) {
  for (i64 j = 0; j < n; ++j) {
    const T dsd = p[j] * (y[j] - nu);
    const T sdm = sd[j] - mu;
    y[j] = dsd;
    x[j] = p[j] * (x[j] - delta) + dsd * sdm;
    sd[j] = p[j] * sdm;
  }
}

// ---------------------------------------------------------------------------------------------
// Strided operands, tiles and scratch
// ---------------------------------------------------------------------------------------------

// A (B, H, N, C) operand with inner stride 1: row (b, h, i) starts at p + b s0 + h s1 + i s2.
template <class S>
struct View4 {
  const S* p = nullptr;
  i64 s0 = 0, s1 = 0, s2 = 0;
  View4() = default;
  explicit View4(const at::Tensor& t)
      : p(t.const_data_ptr<S>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
  const S* row(i64 b, i64 h, i64 i) const { return p + b * s0 + h * s1 + i * s2; }
};

template <class S>
struct OutView4 {
  S* p = nullptr;
  i64 s0 = 0, s1 = 0, s2 = 0;
  OutView4() = default;
  explicit OutView4(at::Tensor& t)
      : p(t.mutable_data_ptr<S>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
  S* row(i64 b, i64 h, i64 i) const { return p + b * s0 + h * s1 + i * s2; }
};

template <class T, class S>
SCM_ATTN_INLINE void convert(const S* __restrict src, T* __restrict dst, i64 n) {
  for (i64 j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}

// Rows [i0, i0 + n) of (b, h), cols wide, converted into the contiguous tile dst (row stride cols).
template <class T, class S>
void pack_rows(const View4<S>& x, i64 b, i64 h, i64 i0, i64 n, i64 cols, T* dst) {
  for (i64 r = 0; r < n; ++r) convert(x.row(b, h, i0 + r), dst + r * cols, cols);
}

template <class T, class S>
void store_rows(const OutView4<S>& y, i64 b, i64 h, i64 i0, i64 n, i64 cols, const T* src, i64 ld) {
  for (i64 r = 0; r < n; ++r) convert(src + r * ld, y.row(b, h, i0 + r), cols);
}

// A row-major matrix operand of the BLAS: data and row stride.
template <class T>
struct Mat {
  const T* p = nullptr;
  i64 ld = 0;
};

// Rows [j0, j0 + n) of a key-side operand as a BLAS operand: in place when the dtype is the
// accumulation type and the row stride is a valid leading dimension, else converted into buf.
template <class T, class S>
Mat<T> kv_tile(const View4<S>& x, i64 b, i64 h, i64 j0, i64 n, i64 cols, T* buf) {
  if constexpr (std::is_same_v<T, S>) {
    if (n == 1) return {x.row(b, h, j0), cols};
    if (x.s2 >= cols && x.s2 <= INT_MAX) return {x.row(b, h, j0), x.s2};
  }
  pack_rows(x, b, h, j0, n, cols, buf);
  return {buf, cols};
}

// The transpose of the rows x cols matrix src (row stride lds, inner stride 1) into dst (cols x rows,
// row stride ld), converted to T. Blocks of 64 rows keep their rows in L1 while each of the cols
// output rows is written.
template <class T, class S>
void transpose_rows(const S* src, i64 lds, i64 rows, i64 cols, T* dst, i64 ld) {
  for (i64 j0 = 0; j0 < rows; j0 += 64) {
    const i64 n = std::min<i64>(64, rows - j0);
    for (i64 e = 0; e < cols; ++e) {
      T* o = dst + e * ld + j0;
      for (i64 j = 0; j < n; ++j) o[j] = static_cast<T>(src[(j0 + j) * lds + e]);
    }
  }
}

// Row stride of a transposed key operand: Nk rounded up to 16 floats, plus 16, so that the D rows
// of a 64-key panel (read together by every k step of rt::gemm) never sit a power of two apart and
// share L1 sets (a 4096-key row stride cost 13% in a standalone q k^T product).
inline i64 key_ld(i64 Nk) { return (Nk + 15) / 16 * 16 + 16; }

// All Nk rows of a key-side operand of kv head (b, kh), transposed into dst (D x ld, row-major): the
// B operand of the logit products of the register-tiled GEMM (rt::gemm).
template <class T, class S>
void transpose_keys(const View4<S>& x, i64 b, i64 kh, i64 Nk, i64 D, T* dst, i64 ld) {
  transpose_rows(x.row(b, kh, 0), x.s2, Nk, D, dst, ld);
}

// 64-byte aligned scratch of one task chunk (the same alignment on every call, so the BLAS takes
// the same code path and the results are reproducible).
template <class T>
class Scratch {
 public:
  T* take(i64 n) {
    if (n <= 0) return nullptr;
    const size_t bytes = (size_t(n) * sizeof(T) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, bytes);
    TORCH_CHECK(p != nullptr, "scm attention: out of memory allocating ", bytes, " bytes of scratch");
    bufs_.emplace_back(static_cast<T*>(p));
    return static_cast<T*>(p);
  }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::vector<std::unique_ptr<T, Free>> bufs_;
};

// ---------------------------------------------------------------------------------------------
// Masks
// ---------------------------------------------------------------------------------------------
struct MaskView {
  enum Kind { kNone, kBool, kAdd } kind = kNone;
  const void* p = nullptr;
  i64 s0 = 0, s1 = 0, s2 = 0, s3 = 0;  // element strides of the (B, Hq, Nq, Nk) view (0 where expanded)
};

template <class T>
SCM_ATTN_CLONES void row_mask_bool(T* __restrict s, const uint8_t* __restrict m, i64 n) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (i64 j = 0; j < n; ++j) s[j] = m[j] ? s[j] : ninf;
}

template <class T>
SCM_ATTN_CLONES void row_mask_add(T* __restrict s, const float* __restrict m, i64 n) {
  for (i64 j = 0; j < n; ++j) s[j] += static_cast<T>(m[j]);
}

// Applies the mask (rows i0.., keys j0..) and, when causal, hides keys j > i, on the logit tile s
// (rows x cols, row stride ld).
template <class T>
void apply_mask(T* s, i64 ld, i64 rows, i64 cols, const MaskView& mk, i64 b, i64 h, i64 i0, i64 j0, bool causal) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (i64 r = 0; r < rows; ++r) {
    T* sr = s + r * ld;
    const i64 off = b * mk.s0 + h * mk.s1 + (i0 + r) * mk.s2 + j0 * mk.s3;
    if (mk.kind == MaskView::kBool) {
      const uint8_t* m = static_cast<const uint8_t*>(mk.p) + off;
      if (mk.s3 == 1) {
        row_mask_bool(sr, m, cols);
      } else if (mk.s3 == 0) {
        if (!*m) std::fill(sr, sr + cols, ninf);
      } else {
        for (i64 j = 0; j < cols; ++j)
          if (!m[j * mk.s3]) sr[j] = ninf;
      }
    } else if (mk.kind == MaskView::kAdd) {
      const float* m = static_cast<const float*>(mk.p) + off;
      if (mk.s3 == 1) {
        row_mask_add(sr, m, cols);
      } else if (mk.s3 == 0) {
        const T a = static_cast<T>(*m);
        for (i64 j = 0; j < cols; ++j) sr[j] += a;
      } else {
        for (i64 j = 0; j < cols; ++j) sr[j] += static_cast<T>(m[j * mk.s3]);
      }
    }
    if (causal) {
      const i64 first_hidden = std::max<i64>(0, i0 + r - j0 + 1);
      if (first_hidden < cols) std::fill(sr + first_hidden, sr + cols, ninf);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Problem description
// ---------------------------------------------------------------------------------------------
struct Dims {
  i64 B = 0, Hq = 0, Hkv = 0, G = 1, Nq = 0, Nk = 0, D = 0, Dv = 0;
};

inline i64 ceil_div(i64 a, i64 b) { return (a + b - 1) / b; }

// Query block of task t (t < n blocks of one head) in the order 0, n-1, 1, n-2, ...: at::parallel_for
// gives each thread a contiguous range of tasks, and with causal masking neighbouring pairs then
// carry equal work.
inline i64 zigzag(i64 t, i64 n) { return (t & 1) ? n - 1 - t / 2 : t / 2; }

// k (or k') of every kv head transposed, (B * Hkv) x D x key_ld(Nk) in T, for the register-tiled
// logit products of the forward kernels: one pass over the keys before the tasks, shared by all
// threads (memory: one fp32 copy of the operand, whatever the thread count).
template <class T, class S>
at::Tensor transpose_all_keys(const View4<S>& x, const Dims& d) {
  const i64 ld = key_ld(d.Nk);
  at::Tensor t = at::empty({d.B * d.Hkv, d.D, ld}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* p = t.mutable_data_ptr<T>();
  at::parallel_for(0, d.B * d.Hkv, 1, [&](i64 begin, i64 end) {
    for (i64 i = begin; i < end; ++i) transpose_keys(x, i / d.Hkv, i % d.Hkv, d.Nk, d.D, p + i * d.D * ld, ld);
  });
  return t;
}

// Last key (exclusive) that rows [i0, i0 + r) can see.
inline i64 key_end(const Dims& d, bool causal, i64 i0, i64 r) { return causal ? std::min(d.Nk, i0 + r) : d.Nk; }

// ---------------------------------------------------------------------------------------------
// Forward and JVP (A25): one task per (b, h, query block).
// ---------------------------------------------------------------------------------------------
// What every kernel reads: the problem and the operands (tangents flagged when present).
template <class S, class T>
struct Inputs {
  Dims d;
  T scale = 1;
  bool causal = false;
  MaskView mask;
  View4<S> q, k, v, tq, tk, tv;
  bool has_tq = false, has_tk = false, has_tv = false;

  void set(const Dims& dims, double scale_, bool is_causal, const MaskView& mk, const at::Tensor& q_,
           const at::Tensor& k_, const at::Tensor& v_, const std::optional<at::Tensor>& tq_,
           const std::optional<at::Tensor>& tk_, const std::optional<at::Tensor>& tv_) {
    d = dims;
    scale = static_cast<T>(scale_);
    causal = is_causal;
    mask = mk;
    q = View4<S>(q_);
    k = View4<S>(k_);
    v = View4<S>(v_);
    if (tq_) tq = View4<S>(*tq_), has_tq = true;
    if (tk_) tk = View4<S>(*tk_), has_tk = true;
    if (tv_) tv = View4<S>(*tv_), has_tv = true;
  }
};

// The key side of the logit products of one forward task: on the register-tiled path k^T and
// k'^T of the task's kv head (the call's transposed copies, row stride ld), else buffers for the
// key tiles of the BLAS path.
template <class T>
struct KeySide {
  const T* kT = nullptr;
  const T* tkT = nullptr;
  i64 ld = 0;
  T* kbuf = nullptr;
  T* tkbuf = nullptr;
};

// The call's transposed key operands of the forward kernels (transpose_all_keys of k, and of k'
// when it is given) on the register-tiled path; nothing on the BLAS path.
template <class T>
struct KeysT {
  at::Tensor k, tk;
  i64 ld = 0;

  template <class S>
  KeysT(const Inputs<S, T>& a, bool fast, bool has_tk) : ld(key_ld(a.d.Nk)) {
    if (!fast) return;
    k = transpose_all_keys<T>(a.k, a.d);
    if (has_tk) tk = transpose_all_keys<T>(a.tk, a.d);
  }
  // The key side of a task on kv head (b, kh), given its BLAS-path tile buffers.
  KeySide<T> side(const Dims& d, i64 b, i64 kh, T* kbuf, T* tkbuf) const {
    const i64 off = (b * d.Hkv + kh) * d.D * ld;
    return {k.defined() ? k.const_data_ptr<T>() + off : nullptr,
            tk.defined() ? tk.const_data_ptr<T>() + off : nullptr, ld, kbuf, tkbuf};
  }
};

// Logits of key block j0 (c keys) for the task's rows: [S; q' k^T] = lambda [q; q'] k^T (r rows, or 2r
// with q'), then S' += lambda q k'^T; qt is [q; q'] (row stride D), s and sd = s + r ld_s the
// outputs (row stride ld_s).
template <class S, class T>
void logit_block(const Inputs<S, T>& a, const KeySide<T>& ks, bool has_tq, bool has_tk, i64 b, i64 kh, i64 j0,
                 i64 r, i64 c, const T* qt, T* s, T* sd, i64 ld_s) {
  const i64 D = a.d.D, rows = has_tq ? 2 * r : r;
  if (ks.kT != nullptr) {
    mm_rr<T>(true, false, rows, c, D, a.scale, qt, D, ks.kT + j0, ks.ld, false, s, ld_s);
    if (has_tk) mm_rr<T>(true, false, r, c, D, a.scale, qt, D, ks.tkT + j0, ks.ld, has_tq, sd, ld_s);
    return;
  }
  const Mat<T> kt = kv_tile(a.k, b, kh, j0, c, D, ks.kbuf);
  mm<T>(false, true, rows, c, D, a.scale, qt, D, kt.p, kt.ld, T(0), s, ld_s);
  if (has_tk) {
    const Mat<T> tkt = kv_tile(a.tk, b, kh, j0, c, D, ks.tkbuf);
    mm<T>(false, true, r, c, D, a.scale, qt, D, tkt.p, tkt.ld, has_tq ? T(1) : T(0), sd, ld_s);
  }
}

template <class S, class T>
struct FwdArgs : Inputs<S, T> {
  bool jvp = false;           // write out_tangent and mu
  OutView4<S> out, tout;      // (B, Hq, Nq, Dv) views
  T* lse = nullptr;           // (B, Hq, Nq) contiguous
  T* mu = nullptr;
};

template <class S, class T>
void fwd_kernel(const FwdArgs<S, T>& a) {
  const Dims& d = a.d;
  const i64 qB = q_block_fwd(d.Nq), kvB = kKvBlockFwd, nqb = ceil_div(d.Nq, qB);
  const bool has_sd = a.jvp && (a.has_tq || a.has_tk);  // logit tangent s' present
  const bool has_tq = a.jvp && a.has_tq, has_tk = a.jvp && a.has_tk, has_tv = a.jvp && a.has_tv;
  const i64 stack = has_sd ? 2 : 1;  // [S; S'] and [acc_O; acc_B] are stacked row blocks
  const T ninf = -std::numeric_limits<T>::infinity(), pinf = std::numeric_limits<T>::infinity();
  // fp32 tiles on AVX-512: the register-tiled GEMM, on k^T (and k'^T) transposed once per call
  const bool fast = std::is_same_v<T, float> && rt::available();
  const KeysT<T> keys(a, fast, has_tk);

  at::parallel_for(0, d.B * d.Hq * nqb, 1, [&](i64 begin, i64 end) {
    Scratch<T> ws;
    T* qq = ws.take(2 * qB * d.D);           // [q; q'] tile
    T* sb = ws.take(stack * qB * kvB);       // [S; S'] -> [P; P S'] (row stride kvB)
    T* acc = ws.take(stack * qB * d.Dv);     // [acc_O; acc_B]
    T* acc_a = has_tv ? ws.take(qB * d.Dv) : nullptr;
    T* kbuf = fast ? nullptr : ws.take(kvB * d.D);
    T* tkbuf = has_tk && !fast ? ws.take(kvB * d.D) : nullptr;
    T* vbuf = ws.take(kvB * d.Dv);
    T* tvbuf = has_tv ? ws.take(kvB * d.Dv) : nullptr;
    T* m = ws.take(qB);
    T* l = ws.take(qB);
    T* rho = ws.take(qB);
    T* orow = ws.take(2 * d.Dv);
    for (i64 t = begin; t < end; ++t) {
      const i64 bh = t / nqb, blk = zigzag(t % nqb, nqb);
      const i64 b = bh / d.Hq, h = bh % d.Hq, kh = h / d.G;
      const i64 i0 = blk * qB, r = std::min(qB, d.Nq - i0);
      T* qt = qq;
      T* tqt = qq + r * d.D;  // directly below q, so [q; q'] is one (2r x D) matrix
      pack_rows(a.q, b, h, i0, r, d.D, qt);
      if (has_tq) pack_rows(a.tq, b, h, i0, r, d.D, tqt);
      T* s = sb;
      T* sd = sb + r * kvB;
      T* acc_o = acc;
      T* acc_b = acc + r * d.Dv;
      std::fill(m, m + r, ninf);
      std::fill(l, l + r, T(0));
      std::fill(rho, rho + r, T(0));
      std::fill(acc, acc + stack * r * d.Dv, T(0));
      if (has_tv) std::fill(acc_a, acc_a + r * d.Dv, T(0));

      const KeySide<T> ks = keys.side(d, b, kh, kbuf, tkbuf);

      const i64 jend = key_end(d, a.causal, i0, r);
      for (i64 j0 = 0; j0 < jend; j0 += kvB) {
        const i64 c = std::min(kvB, jend - j0);
        const Mat<T> vt = kv_tile(a.v, b, kh, j0, c, d.Dv, vbuf);
        // [S; q' k^T] = lambda [q; q'] k^T, then S' += lambda q k'^T
        logit_block(a, ks, has_tq, has_tk, b, kh, j0, r, c, qt, s, sd, kvB);
        apply_mask(s, kvB, r, c, a.mask, b, h, i0, j0, a.causal && j0 + c - 1 > i0);
        // online softmax (A25): one exp per logit
        for (i64 rr = 0; rr < r; ++rr) {
          T* srow = s + rr * kvB;
          const T m_old = m[rr];
          const T m_new = std::max(m_old, row_max(srow, c));
          const T m_safe = m_new == ninf ? T(0) : m_new;  // a row hidden so far keeps p = 0
          const T alpha = exp_k(m_old - m_safe);
          T ls, ps = 0;
          if (has_sd) {
            row_exp_sum2(srow, sd + rr * kvB, c, m_safe, T(0), &ls, &ps);
          } else {
            ls = row_exp_sum(srow, c, m_safe);
          }
          m[rr] = m_new;
          if (m_old != ninf && alpha != T(1)) {
            l[rr] *= alpha;
            rho[rr] *= alpha;
            row_scale(acc_o + rr * d.Dv, d.Dv, alpha);
            if (has_sd) row_scale(acc_b + rr * d.Dv, d.Dv, alpha);
            if (has_tv) row_scale(acc_a + rr * d.Dv, d.Dv, alpha);
          }
          l[rr] += ls;
          rho[rr] += ps;
        }
        // [acc_O; acc_B] += [P; P S'] v,  acc_A += P v'
        mm_rr<T>(fast, false, stack * r, d.Dv, c, T(1), s, kvB, vt.p, vt.ld, true, acc, d.Dv);
        if (has_tv) {
          const Mat<T> tvt = kv_tile(a.tv, b, kh, j0, c, d.Dv, tvbuf);
          mm_rr<T>(fast, false, r, d.Dv, c, T(1), s, kvB, tvt.p, tvt.ld, true, acc_a, d.Dv);
        }
      }
      // finish (A25): O = acc_O / l, mu = rho / l, O' = (acc_A + acc_B) / l - mu O; lse = m + log l
      for (i64 rr = 0; rr < r; ++rr) {
        const i64 i = i0 + rr, row = bh * d.Nq + i;
        T* o = orow;
        T* ot = orow + d.Dv;
        if (l[rr] > T(0)) {
          const T inv = T(1) / l[rr];
          const T mu = rho[rr] * inv;
          for (i64 e = 0; e < d.Dv; ++e) o[e] = acc_o[rr * d.Dv + e] * inv;
          a.lse[row] = m[rr] + std::log(l[rr]);
          if (a.jvp) {
            for (i64 e = 0; e < d.Dv; ++e) {
              T num = 0;
              if (has_tv) num += acc_a[rr * d.Dv + e];
              if (has_sd) num += acc_b[rr * d.Dv + e];
              ot[e] = num * inv - mu * o[e];
            }
            a.mu[row] = mu;
          }
        } else {  // every key hidden: O = O' = 0, lse = +inf, mu = 0
          std::fill(o, o + 2 * d.Dv, T(0));
          a.lse[row] = pinf;
          if (a.jvp) a.mu[row] = T(0);
        }
        convert(o, a.out.row(b, h, i), d.Dv);
        if (a.jvp) convert(ot, a.tout.row(b, h, i), d.Dv);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Tangent from the saved forward (A24 with P known): one task per (b, h, query block).
// ---------------------------------------------------------------------------------------------
// With lse from the forward, P = e^{s - lse} is known exactly per block, so the tangent needs no
// online softmax and no P v product: per key block S = lambda q k^T, S' = lambda (q' k^T + q k'^T),
// acc_T += P v' + (P (S' - c)) v, L += rowsum(P), rho += rowsum(P (S' - c)); finish
//   O' = acc_T / L - (rho / L) O,  mu = c + rho / L   (O read from `out`)
// which is (A24) for L = 1; dividing by the recomputed L keeps the finish consistent with the P
// actually summed. c_i is a per-row reference of s', set on the first key block: the mean of s'_ij
// over its keys, then re-based to its P-weighted mean (= mu when one block holds every key). A
// large part of s' common to all keys (keys with a large common component, large logits) then
// never enters the accumulator nor the product rho/L O, which would cancel it in fp32, and the
// rounding of O (stored in q's dtype: fp16/bf16) is multiplied by mu - c only, not by mu.
template <class S, class T>
struct TanArgs : Inputs<S, T> {
  View4<S> out;          // (B, Hq, Nq, Dv) forward output
  const T* lse = nullptr;  // (B, Hq, Nq) contiguous
  OutView4<S> tout;      // out_tangent
  T* mu = nullptr;
};

template <class S, class T>
void tangent_kernel(const TanArgs<S, T>& a) {
  const Dims& d = a.d;
  const i64 qB = q_block_fwd(d.Nq), kvB = kKvBlockFwd, nqb = ceil_div(d.Nq, qB);
  const bool has_tq = a.has_tq, has_tk = a.has_tk, has_tv = a.has_tv, has_sd = has_tq || has_tk;
  const bool fast = std::is_same_v<T, float> && rt::available();
  const KeysT<T> keys(a, fast, has_tk);

  at::parallel_for(0, d.B * d.Hq * nqb, 1, [&](i64 begin, i64 end) {
    Scratch<T> ws;
    T* qq = ws.take(2 * qB * d.D);      // [q; q'] tile
    T* sb = ws.take(2 * qB * kvB);      // [S; S'] -> [P; P (S' - c)] (row stride kvB)
    T* acc = ws.take(qB * d.Dv);        // acc_T
    T* kbuf = fast ? nullptr : ws.take(kvB * d.D);
    T* tkbuf = has_tk && !fast ? ws.take(kvB * d.D) : nullptr;
    T* vbuf = has_sd ? ws.take(kvB * d.Dv) : nullptr;
    T* tvbuf = has_tv ? ws.take(kvB * d.Dv) : nullptr;
    T* cref = ws.take(qB);
    T* l = ws.take(qB);
    T* rho = ws.take(qB);
    T* orow = ws.take(2 * d.Dv);
    for (i64 t = begin; t < end; ++t) {
      const i64 bh = t / nqb, blk = zigzag(t % nqb, nqb);
      const i64 b = bh / d.Hq, h = bh % d.Hq, kh = h / d.G;
      const i64 i0 = blk * qB, r = std::min(qB, d.Nq - i0), row0 = bh * d.Nq + i0;
      T* qt = qq;
      T* tqt = qq + r * d.D;  // [q; q'] is one (2r x D) matrix
      pack_rows(a.q, b, h, i0, r, d.D, qt);
      if (has_tq) pack_rows(a.tq, b, h, i0, r, d.D, tqt);
      T* s = sb;
      T* sd = sb + r * kvB;
      std::fill(l, l + r, T(0));
      std::fill(rho, rho + r, T(0));
      std::fill(acc, acc + r * d.Dv, T(0));
      const KeySide<T> ks = keys.side(d, b, kh, kbuf, tkbuf);

      const i64 jend = key_end(d, a.causal, i0, r);
      for (i64 j0 = 0; j0 < jend; j0 += kvB) {
        const i64 c = std::min(kvB, jend - j0);
        // [S; q' k^T] = lambda [q; q'] k^T, then S' += lambda q k'^T
        logit_block(a, ks, has_tq, has_tk, b, kh, j0, r, c, qt, s, sd, kvB);
        apply_mask(s, kvB, r, c, a.mask, b, h, i0, j0, a.causal && j0 + c - 1 > i0);
        // P = e^{s - lse} (0 on a hidden row: lse = +inf); P (S' - c) and the row sums
        for (i64 rr = 0; rr < r; ++rr) {
          T* srow = s + rr * kvB;
          const T lse = a.lse[row0 + rr];
          if (has_sd) {
            T* sdrow = sd + rr * kvB;
            if (j0 == 0) cref[rr] = row_sum(sdrow, c) / T(c);
            T ls, ps;
            row_exp_sum2(srow, sdrow, c, lse, cref[rr], &ls, &ps);
            if (j0 == 0 && ls > T(0)) {  // re-base c to the P-weighted mean of this block
              const T delta = ps / ls;
              row_axpy(sdrow, srow, c, -delta);
              cref[rr] += delta;
              ps -= delta * ls;
            }
            l[rr] += ls;
            rho[rr] += ps;
          } else {
            l[rr] += row_exp_sum(srow, c, lse);
          }
        }
        // acc_T += P v' + (P (S' - c)) v
        if (has_tv) {
          const Mat<T> tvt = kv_tile(a.tv, b, kh, j0, c, d.Dv, tvbuf);
          mm_rr<T>(fast, false, r, d.Dv, c, T(1), s, kvB, tvt.p, tvt.ld, true, acc, d.Dv);
        }
        if (has_sd) {
          const Mat<T> vt = kv_tile(a.v, b, kh, j0, c, d.Dv, vbuf);
          mm_rr<T>(fast, false, r, d.Dv, c, T(1), sd, kvB, vt.p, vt.ld, true, acc, d.Dv);
        }
      }
      // finish: O' = acc_T / L - (rho / L) O, mu = c + rho / L (O' = 0, mu = 0 on a hidden row)
      for (i64 rr = 0; rr < r; ++rr) {
        const i64 i = i0 + rr;
        T* o = orow;
        T* ot = orow + d.Dv;
        T mu = 0;
        if (l[rr] > T(0)) {
          const T inv = T(1) / l[rr];
          const T dmu = has_sd ? rho[rr] * inv : T(0);
          convert(a.out.row(b, h, i), o, d.Dv);
          for (i64 e = 0; e < d.Dv; ++e) ot[e] = acc[rr * d.Dv + e] * inv - dmu * o[e];
          if (has_sd) mu = cref[rr] + dmu;
        } else {
          std::fill(ot, ot + d.Dv, T(0));
        }
        a.mu[row0 + rr] = mu;
        convert(ot, a.tout.row(b, h, i), d.Dv);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward (A26) and backward through the JVP (A27).
// ---------------------------------------------------------------------------------------------
template <class S, class T>
struct BwdArgs : Inputs<S, T> {
  View4<S> dout, g;  // upstream gradients of out and out_tangent
  bool has_do = false, has_g = false;
  const T* lse = nullptr;    // (B, Hq, Nq) rows
  const T* mu = nullptr;     // only read when the logit tangent enters (has_g and (tq or tk))
  const T* delta = nullptr;  // Delta' = dO.O + g.O'
  const T* nu = nullptr;     // g.O
  OutView4<S> dq, dk, dv, dtq, dtk, dtv;

  bool use_sd() const { return has_g && (this->has_tq || this->has_tk); }
};

// Query-side tiles of one (b, h, query block): contiguous, row stride D or Dv.
template <class T>
struct QTiles {
  T *q = nullptr, *tq = nullptr, *dout = nullptr, *g = nullptr;
};

// Key-side tiles of one (b, kv head, key block): row-major (c rows); with the register-tiled GEMM
// also transposed (kT: D x c, ...), the B operands of the products with a transposed key operand.
template <class T>
struct KTiles {
  Mat<T> k, tk, v, tv;
  Mat<T> kT, tkT, vT, tvT;
};

// Per-task scratch of the backward.
template <class S, class T>
struct BwdWork {
  QTiles<T> qt;
  T *kbuf = nullptr, *tkbuf = nullptr, *vbuf = nullptr, *tvbuf = nullptr;
  T *kTbuf = nullptr, *tkTbuf = nullptr, *vTbuf = nullptr, *tvTbuf = nullptr;  // transposed, row stride ldt
  T *p = nullptr, *x = nullptr, *y = nullptr, *sd = nullptr;  // (q block x key block), row stride kvB
  i64 kvB = 0, ldt = 0;
  bool fast = false;  // fp32 on AVX-512: the register-tiled GEMM (rt::gemm) for every product

  BwdWork(const BwdArgs<S, T>& a, i64 qB, i64 kvB_, Scratch<T>& ws) : kvB(kvB_) {
    const Dims& d = a.d;
    fast = std::is_same_v<T, float> && rt::available();
    if (fast) {
      ldt = key_ld(kvB);
      kTbuf = ws.take(d.D * ldt);
      vTbuf = ws.take(d.Dv * ldt);
      if (a.has_g && a.has_tk) tkTbuf = ws.take(d.D * ldt);
      if (a.has_g && a.has_tv) tvTbuf = ws.take(d.Dv * ldt);
    }
    qt.q = ws.take(qB * d.D);
    if (a.has_g && a.has_tq) qt.tq = ws.take(qB * d.D);
    if (a.has_do) qt.dout = ws.take(qB * d.Dv);
    if (a.has_g) qt.g = ws.take(qB * d.Dv);
    kbuf = ws.take(kvB * d.D);
    vbuf = ws.take(kvB * d.Dv);
    if (a.has_g && a.has_tk) tkbuf = ws.take(kvB * d.D);
    if (a.has_g && a.has_tv) tvbuf = ws.take(kvB * d.Dv);
    p = ws.take(qB * kvB);
    x = ws.take(qB * kvB);
    if (a.has_g) y = ws.take(qB * kvB);
    if (a.use_sd()) sd = ws.take(qB * kvB);
  }

  void load_q(const BwdArgs<S, T>& a, i64 b, i64 h, i64 i0, i64 r) {
    const Dims& d = a.d;
    pack_rows(a.q, b, h, i0, r, d.D, qt.q);
    if (qt.tq) pack_rows(a.tq, b, h, i0, r, d.D, qt.tq);
    if (qt.dout) pack_rows(a.dout, b, h, i0, r, d.Dv, qt.dout);
    if (qt.g) pack_rows(a.g, b, h, i0, r, d.Dv, qt.g);
  }

  KTiles<T> load_k(const BwdArgs<S, T>& a, i64 b, i64 kh, i64 j0, i64 c) {
    const Dims& d = a.d;
    KTiles<T> kt;
    kt.k = kv_tile(a.k, b, kh, j0, c, d.D, kbuf);
    kt.v = kv_tile(a.v, b, kh, j0, c, d.Dv, vbuf);
    if (tkbuf) kt.tk = kv_tile(a.tk, b, kh, j0, c, d.D, tkbuf);
    if (tvbuf) kt.tv = kv_tile(a.tv, b, kh, j0, c, d.Dv, tvbuf);
    if (fast) {
      auto tr = [&](const Mat<T>& m, i64 cols, T* buf) {
        transpose_rows(m.p, m.ld, c, cols, buf, ldt);
        return Mat<T>{buf, ldt};
      };
      kt.kT = tr(kt.k, d.D, kTbuf);
      kt.vT = tr(kt.v, d.Dv, vTbuf);
      if (tkbuf) kt.tkT = tr(kt.tk, d.D, tkTbuf);
      if (tvbuf) kt.tvT = tr(kt.tv, d.Dv, tvTbuf);
    }
    return kt;
  }
};

// Gradient accumulators of one block pair (nullptr: not accumulated by this task). dq/dtq: r x D;
// dk/dtk: c x D; dv/dtv: c x Dv; all row-major, contiguous.
template <class T>
struct Accs {
  T *dq = nullptr, *dtq = nullptr, *dk = nullptr, *dtk = nullptr, *dv = nullptr, *dtv = nullptr;
};

// One (query block, key block) pair: recompute P, form ds (and ds'), accumulate the products.
template <class S, class T>
void bwd_pair(const BwdArgs<S, T>& a, BwdWork<S, T>& w, const KTiles<T>& kt, i64 b, i64 h, i64 i0, i64 r, i64 j0,
              i64 c, const Accs<T>& acc) {
  const Dims& d = a.d;
  const i64 ld = w.kvB, row0 = (b * d.Hq + h) * d.Nq + i0;
  const QTiles<T>& qt = w.qt;
  const bool use_sd = a.use_sd();
  const bool g_tq = a.has_g && a.has_tq, g_tk = a.has_g && a.has_tk, g_tv = a.has_g && a.has_tv;
  T* p = w.p;
  T* x = w.x;
  T* y = w.y;
  T* sd = w.sd;
  const bool fast = w.fast;
  // C (r x c, row stride ld) = alpha A m^T (+ C): m (c x cols) a key-side tile, mT its transpose
  auto by_keys = [&](i64 cols, T alpha, const T* A, const Mat<T>& m, const Mat<T>& mT, bool acc_c, T* C) {
    if (fast) return mm_rr<T>(true, false, r, c, cols, alpha, A, cols, mT.p, mT.ld, acc_c, C, ld);
    mm<T>(false, true, r, c, cols, alpha, A, cols, m.p, m.ld, acc_c ? T(1) : T(0), C, ld);
  };
  // P = exp(lambda q k^T + mask - lse)
  by_keys(d.D, a.scale, qt.q, kt.k, kt.kT, false, p);
  apply_mask(p, ld, r, c, a.mask, b, h, i0, j0, a.causal && j0 + c - 1 > i0);
  for (i64 rr = 0; rr < r; ++rr) row_exp(p + rr * ld, c, a.lse[row0 + rr]);
  // x = dO v^T + g v'^T;  y = g v^T;  sd = lambda (q' k^T + q k'^T)
  if (a.has_do) by_keys(d.Dv, T(1), qt.dout, kt.v, kt.vT, false, x);
  if (g_tv) by_keys(d.Dv, T(1), qt.g, kt.tv, kt.tvT, a.has_do, x);
  if (!a.has_do && !g_tv)
    for (i64 rr = 0; rr < r; ++rr) std::fill(x + rr * ld, x + rr * ld + c, T(0));
  if (a.has_g) by_keys(d.Dv, T(1), qt.g, kt.v, kt.vT, false, y);
  if (use_sd) {
    if (g_tq) by_keys(d.D, a.scale, qt.tq, kt.k, kt.kT, false, sd);
    if (g_tk) by_keys(d.D, a.scale, qt.q, kt.tk, kt.tkT, g_tq, sd);
  }
  // x <- ds, y <- ds', sd <- P (s' - mu)
  for (i64 rr = 0; rr < r; ++rr) {
    const i64 row = row0 + rr, o = rr * ld;
    if (use_sd) {
      row_ds_jvp(p + o, x + o, y + o, sd + o, c, a.delta[row], a.nu[row], a.mu[row]);
    } else if (a.has_g) {
      row_ds_g(p + o, x + o, y + o, c, a.delta[row], a.nu[row]);
    } else {
      row_ds(p + o, x + o, c, a.delta[row]);
    }
  }
  // dq += lambda (ds k + ds' k'),  dq' += lambda ds' k
  if (acc.dq) {
    mm_rr<T>(fast, false, r, d.D, c, a.scale, x, ld, kt.k.p, kt.k.ld, true, acc.dq, d.D);
    if (g_tk) mm_rr<T>(fast, false, r, d.D, c, a.scale, y, ld, kt.tk.p, kt.tk.ld, true, acc.dq, d.D);
  }
  if (acc.dtq && g_tq) mm_rr<T>(fast, false, r, d.D, c, a.scale, y, ld, kt.k.p, kt.k.ld, true, acc.dtq, d.D);
  // dk += lambda (ds^T q + ds'^T q'),  dk' += lambda ds'^T q
  if (acc.dk) {
    mm_rr<T>(fast, true, c, d.D, r, a.scale, x, ld, qt.q, d.D, true, acc.dk, d.D);
    if (g_tq) mm_rr<T>(fast, true, c, d.D, r, a.scale, y, ld, qt.tq, d.D, true, acc.dk, d.D);
  }
  if (acc.dtk && g_tk) mm_rr<T>(fast, true, c, d.D, r, a.scale, y, ld, qt.q, d.D, true, acc.dtk, d.D);
  // dv += P^T dO + (P (s' - mu))^T g,  dv' += P^T g
  if (acc.dv) {
    if (a.has_do) mm_rr<T>(fast, true, c, d.Dv, r, T(1), p, ld, qt.dout, d.Dv, true, acc.dv, d.Dv);
    if (use_sd) mm_rr<T>(fast, true, c, d.Dv, r, T(1), sd, ld, qt.g, d.Dv, true, acc.dv, d.Dv);
  }
  if (acc.dtv && g_tv) mm_rr<T>(fast, true, c, d.Dv, r, T(1), p, ld, qt.g, d.Dv, true, acc.dtv, d.Dv);
}

// Per-row statistics of the backward: Delta' = dO.O + g.O', nu = g.O (A26, A27).
template <class S, class T>
void row_stats(const Dims& d, const View4<S>* dout, const View4<S>* g, const View4<S>& out, const View4<S>* tout,
               T* delta, T* nu) {
  at::parallel_for(0, d.B * d.Hq, 1, [&](i64 begin, i64 end) {
    Scratch<T> ws;
    T* ob = ws.take(d.Dv);
    T* xb = ws.take(d.Dv);
    for (i64 bh = begin; bh < end; ++bh) {
      const i64 b = bh / d.Hq, h = bh % d.Hq;
      for (i64 i = 0; i < d.Nq; ++i) {
        T dl = 0, n = 0;
        convert(out.row(b, h, i), ob, d.Dv);
        if (dout) {
          convert(dout->row(b, h, i), xb, d.Dv);
          for (i64 e = 0; e < d.Dv; ++e) dl += xb[e] * ob[e];
        }
        if (g) {
          convert(g->row(b, h, i), xb, d.Dv);
          for (i64 e = 0; e < d.Dv; ++e) n += xb[e] * ob[e];
          convert(tout->row(b, h, i), ob, d.Dv);
          for (i64 e = 0; e < d.Dv; ++e) dl += xb[e] * ob[e];
        }
        delta[bh * d.Nq + i] = dl;
        nu[bh * d.Nq + i] = n;
      }
    }
  });
}

// Whether the fused schedule (one task per (b, kv head) computing dq, dk and dv together: five
// block products per pair for A26) beats the split one (query-block tasks for dq and key-block
// tasks for dk/dv, which recompute P: seven products per pair) with T threads: the fused one
// has B*Hkv tasks only.
inline bool bwd_fused_pays(const Dims& d, i64 dq_bytes) {
  const i64 n = d.B * d.Hkv, T = std::max<i64>(1, at::get_num_threads());
  if (dq_bytes > kFusedDqBytes) return false;
  return 5 * ceil_div(n, T) * T <= 7 * n;
}

template <class S, class T>
void bwd_kernel(const BwdArgs<S, T>& a) {
  const Dims& d = a.d;
  const i64 qB = q_block_bwd(d.Nq), kvB = kKvBlockBwd;
  const i64 nqb = ceil_div(d.Nq, qB), nkb = ceil_div(d.Nk, kvB);
  const i64 dq_cols = d.D * (a.has_tq ? 2 : 1);
  const bool fused = bwd_fused_pays(d, d.G * d.Nq * dq_cols * i64(sizeof(T)));

  // key-side accumulators of key block j0 (c keys) of (b, kh) -> outputs
  auto store_k = [&](i64 b, i64 kh, i64 j0, i64 c, const Accs<T>& acc) {
    store_rows(a.dk, b, kh, j0, c, d.D, acc.dk, d.D);
    store_rows(a.dv, b, kh, j0, c, d.Dv, acc.dv, d.Dv);
    if (a.has_tk) store_rows(a.dtk, b, kh, j0, c, d.D, acc.dtk, d.D);
    if (a.has_tv) store_rows(a.dtv, b, kh, j0, c, d.Dv, acc.dtv, d.Dv);
  };
  auto take_k = [&](Scratch<T>& ws) {
    Accs<T> acc;
    acc.dk = ws.take(kvB * d.D);
    acc.dv = ws.take(kvB * d.Dv);
    if (a.has_tk) acc.dtk = ws.take(kvB * d.D);
    if (a.has_tv) acc.dtv = ws.take(kvB * d.Dv);
    return acc;
  };
  auto zero_k = [&](const Accs<T>& acc, i64 c) {
    std::fill(acc.dk, acc.dk + c * d.D, T(0));
    std::fill(acc.dv, acc.dv + c * d.Dv, T(0));
    if (acc.dtk) std::fill(acc.dtk, acc.dtk + c * d.D, T(0));
    if (acc.dtv) std::fill(acc.dtv, acc.dtv + c * d.Dv, T(0));
  };
  // first query block that sees key j0 (causal: rows i >= j0)
  auto first_qblock = [&](i64 j0) { return a.causal ? std::min(nqb, j0 / qB) : i64(0); };
  // Key block kb of (b, kh): dk, dv (and dk', dv') summed over the G query heads, then the query
  // blocks, in order; with dq != nullptr (fused schedule) also dq (and dq') of those query rows,
  // stored per head with stride hs.
  auto key_block = [&](BwdWork<S, T>& w, const Accs<T>& kacc, i64 b, i64 kh, i64 kb, T* dq, T* dtq, i64 hs) {
    const i64 j0 = kb * kvB, c = std::min(kvB, d.Nk - j0);
    const KTiles<T> kt = w.load_k(a, b, kh, j0, c);
    zero_k(kacc, c);
    for (i64 gi = 0; gi < d.G; ++gi) {
      const i64 h = kh * d.G + gi;
      for (i64 blk = first_qblock(j0); blk < nqb; ++blk) {
        const i64 i0 = blk * qB, r = std::min(qB, d.Nq - i0);
        w.load_q(a, b, h, i0, r);
        Accs<T> acc = kacc;
        acc.dq = dq ? dq + gi * hs + i0 * d.D : nullptr;
        acc.dtq = dtq ? dtq + gi * hs + i0 * d.D : nullptr;
        bwd_pair(a, w, kt, b, h, i0, r, j0, c, acc);
      }
    }
    store_k(b, kh, j0, c, kacc);
  };

  if (fused) {
    at::parallel_for(0, d.B * d.Hkv, 1, [&](i64 begin, i64 end) {
      Scratch<T> ws;
      BwdWork<S, T> w(a, qB, kvB, ws);
      Accs<T> kacc = take_k(ws);
      const i64 hs = ceil_div(d.Nq * d.D, 16) * 16;  // per-head stride: 64-byte aligned blocks
      T* dq = ws.take(d.G * hs);
      T* dtq = a.has_tq ? ws.take(d.G * hs) : nullptr;
      for (i64 t = begin; t < end; ++t) {
        const i64 b = t / d.Hkv, kh = t % d.Hkv;
        std::fill(dq, dq + d.G * hs, T(0));
        if (dtq) std::fill(dtq, dtq + d.G * hs, T(0));
        for (i64 kb = 0; kb < nkb; ++kb) key_block(w, kacc, b, kh, kb, dq, dtq, hs);
        for (i64 gi = 0; gi < d.G; ++gi) {
          const i64 h = kh * d.G + gi;
          store_rows(a.dq, b, h, 0, d.Nq, d.D, dq + gi * hs, d.D);
          if (dtq) store_rows(a.dtq, b, h, 0, d.Nq, d.D, dtq + gi * hs, d.D);
        }
      }
    });
    return;
  }

  // split schedule, pass 1: dq (and dq') per (b, h, query block)
  at::parallel_for(0, d.B * d.Hq * nqb, 1, [&](i64 begin, i64 end) {
    Scratch<T> ws;
    BwdWork<S, T> w(a, qB, kvB, ws);
    Accs<T> acc;
    acc.dq = ws.take(qB * d.D);
    if (a.has_tq) acc.dtq = ws.take(qB * d.D);
    for (i64 t = begin; t < end; ++t) {
      const i64 bh = t / nqb, blk = zigzag(t % nqb, nqb);
      const i64 b = bh / d.Hq, h = bh % d.Hq, kh = h / d.G;
      const i64 i0 = blk * qB, r = std::min(qB, d.Nq - i0);
      w.load_q(a, b, h, i0, r);
      std::fill(acc.dq, acc.dq + r * d.D, T(0));
      if (acc.dtq) std::fill(acc.dtq, acc.dtq + r * d.D, T(0));
      // whole key blocks (not clipped at the causal diagonal), as in the other passes: every
      // schedule then runs the same block products
      const i64 jend = key_end(d, a.causal, i0, r);
      for (i64 j0 = 0; j0 < jend; j0 += kvB) {
        const i64 c = std::min(kvB, d.Nk - j0);
        const KTiles<T> kt = w.load_k(a, b, kh, j0, c);
        bwd_pair(a, w, kt, b, h, i0, r, j0, c, acc);
      }
      store_rows(a.dq, b, h, i0, r, d.D, acc.dq, d.D);
      if (acc.dtq) store_rows(a.dtq, b, h, i0, r, d.D, acc.dtq, d.D);
    }
  });
  // pass 2: dk, dv (and dk', dv') per (b, kv head, key block), summed over the G query heads
  at::parallel_for(0, d.B * d.Hkv * nkb, 1, [&](i64 begin, i64 end) {
    Scratch<T> ws;
    BwdWork<S, T> w(a, qB, kvB, ws);
    Accs<T> kacc = take_k(ws);
    for (i64 t = begin; t < end; ++t) {
      const i64 bkh = t / nkb;
      key_block(w, kacc, bkh / d.Hkv, bkh % d.Hkv, t % nkb, nullptr, nullptr, 0);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Argument checks (the Python layer validates first; these are the last line)
// ---------------------------------------------------------------------------------------------
bool is_float_dtype(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble;
}

void check_operand(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": ", name, " must be 4-D (B, H, N, D), got shape ", x.sizes());
  TORCH_CHECK(x.size(3) <= 1 || x.stride(3) == 1, op, ": ", name, " must have stride(-1) == 1, got strides ",
              x.strides());
}

// Checks q, k, v and returns the dimensions.
Dims check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_operand(op, "q", q);
  check_operand(op, "k", k);
  check_operand(op, "v", v);
  TORCH_CHECK(is_float_dtype(q.scalar_type()), op, ": q must be float32, float16, bfloat16 or float64, got ",
              q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  Dims d;
  d.B = q.size(0);
  d.Hq = q.size(1);
  d.Nq = q.size(2);
  d.D = q.size(3);
  d.Hkv = k.size(1);
  d.Nk = k.size(2);
  d.Dv = v.size(3);
  TORCH_CHECK(k.size(0) == d.B && v.size(0) == d.B, op, ": batch sizes differ: q ", q.sizes(), ", k ", k.sizes(),
              ", v ", v.sizes());
  TORCH_CHECK(k.size(3) == d.D, op, ": head dims of q and k differ: q ", q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(v.size(1) == d.Hkv && v.size(2) == d.Nk, op, ": k and v must have the same heads and length, got k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(d.Hkv >= 1 && d.Hq % d.Hkv == 0, op, ": the query heads (", d.Hq,
              ") must be a multiple of the key/value heads (", d.Hkv, ")");
  TORCH_CHECK(d.D >= 1 && d.D <= 256 && d.Dv >= 1 && d.Dv <= 256, op,
              ": head dims must be in [1, 256], got D = ", d.D, ", Dv = ", d.Dv);
  d.G = d.Hq / d.Hkv;
  return d;
}

// A tensor that must match `like` in shape and dtype (tangents, grad_out, out).
void check_like(const char* op, const char* name, const at::Tensor& x, const at::Tensor& like, const char* like_name) {
  check_operand(op, name, x);
  TORCH_CHECK(x.sizes() == like.sizes(), op, ": ", name, " must have the shape of ", like_name, " ", like.sizes(),
              ", got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == like.scalar_type(), op, ": ", name, " must have the dtype of ", like_name, " (",
              like.scalar_type(), "), got ", x.scalar_type());
}

void check_out_shaped(const char* op, const char* name, const at::Tensor& x, const Dims& d, at::ScalarType dt) {
  check_operand(op, name, x);
  TORCH_CHECK(x.size(0) == d.B && x.size(1) == d.Hq && x.size(2) == d.Nq && x.size(3) == d.Dv, op, ": ", name,
              " must have shape (", d.B, ", ", d.Hq, ", ", d.Nq, ", ", d.Dv, "), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == dt, op, ": ", name, " must have dtype ", dt, ", got ", x.scalar_type());
}

MaskView check_mask(const char* op, const std::optional<at::Tensor>& mask, const Dims& d) {
  MaskView mk;
  if (!mask.has_value()) return mk;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.device().is_cpu(), op, ": mask must be a CPU tensor, got ", m.device());
  TORCH_CHECK(m.dim() == 4 && m.size(0) == d.B && m.size(1) == d.Hq && m.size(2) == d.Nq && m.size(3) == d.Nk, op,
              ": mask must have shape (B, Hq, Nq, Nk) = (", d.B, ", ", d.Hq, ", ", d.Nq, ", ", d.Nk,
              ") (an expanded view), got ", m.sizes());
  TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == at::kFloat, op,
              ": mask must be bool (True = attend) or float32 (additive), got ", m.scalar_type());
  mk.kind = m.scalar_type() == at::kBool ? MaskView::kBool : MaskView::kAdd;
  mk.p = m.const_data_ptr();
  mk.s0 = m.stride(0);
  mk.s1 = m.stride(1);
  mk.s2 = m.stride(2);
  mk.s3 = m.stride(3);
  return mk;
}

// Per-row statistic (lse, mu) as a contiguous (B, Hq, Nq) tensor of the accumulation dtype.
at::Tensor row_stat(const char* op, const char* name, const at::Tensor& x, const Dims& d, at::ScalarType acc_dt) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3 && x.size(0) == d.B && x.size(1) == d.Hq && x.size(2) == d.Nq, op, ": ", name,
              " must have shape (", d.B, ", ", d.Hq, ", ", d.Nq, "), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", x.scalar_type());
  return x.to(acc_dt).contiguous();
}

at::ScalarType acc_dtype(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

// out/out_tangent: (B, Hq, Nq, Dv) stored as (B, Nq, Hq, Dv), the layout torch's flash attention returns.
at::Tensor new_out(const at::Tensor& q, const Dims& d) {
  return at::empty({d.B, d.Nq, d.Hq, d.Dv}, q.options()).transpose(1, 2);
}

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_common(
    const char* op, bool jvp, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& tq, const std::optional<at::Tensor>& tk, const std::optional<at::Tensor>& tv,
    const std::optional<at::Tensor>& mask, bool is_causal, double scale) {
  const Dims d = check_qkv(op, q, k, v);
  if (tq) check_like(op, "tq", *tq, q, "q");
  if (tk) check_like(op, "tk", *tk, k, "k");
  if (tv) check_like(op, "tv", *tv, v, "v");
  const MaskView mk = check_mask(op, mask, d);
  const at::ScalarType acc_dt = acc_dtype(q.scalar_type());
  at::Tensor out = new_out(q, d);
  at::Tensor tout = jvp ? new_out(q, d) : at::Tensor();
  at::Tensor lse = at::empty({d.B, d.Hq, d.Nq}, q.options().dtype(acc_dt));
  at::Tensor mu = jvp ? at::empty({d.B, d.Hq, d.Nq}, q.options().dtype(acc_dt)) : at::Tensor();
  if (out.numel() == 0) return {out, tout, lse, mu};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "scm_attention_fwd", [&] {
    using S = scalar_t;
    using T = std::conditional_t<std::is_same_v<S, double>, double, float>;
    FwdArgs<S, T> a;
    a.set(d, scale, is_causal, mk, q, k, v, tq, tk, tv);
    a.jvp = jvp;
    a.out = OutView4<S>(out);
    if (jvp) a.tout = OutView4<S>(tout), a.mu = mu.mutable_data_ptr<T>();
    a.lse = lse.mutable_data_ptr<T>();
    fwd_kernel(a);
  });
  return {out, tout, lse, mu};
}

// (A25 without tangents) -> (out, lse)
std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& mask, bool is_causal,
                                                     double scale) {
  auto [out, tout, lse, mu] =
      fwd_common("attention_fwd", false, q, k, v, std::nullopt, std::nullopt, std::nullopt, mask, is_causal, scale);
  return {out, lse};
}

// (A25) -> (out, out_tangent, lse, mu)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_jvp_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& tq,
    const std::optional<at::Tensor>& tk, const std::optional<at::Tensor>& tv, const std::optional<at::Tensor>& mask,
    bool is_causal, double scale) {
  return fwd_common("attention_jvp", true, q, k, v, tq, tk, tv, mask, is_causal, scale);
}

// (A24 from the saved forward) -> (out_tangent, mu)
std::tuple<at::Tensor, at::Tensor> attention_jvp_tangent_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& tq,
    const std::optional<at::Tensor>& tk, const std::optional<at::Tensor>& tv, const at::Tensor& out,
    const at::Tensor& lse_in, const std::optional<at::Tensor>& mask, bool is_causal, double scale) {
  const char* op = "attention_jvp_tangent";
  const Dims d = check_qkv(op, q, k, v);
  if (tq) check_like(op, "tq", *tq, q, "q");
  if (tk) check_like(op, "tk", *tk, k, "k");
  if (tv) check_like(op, "tv", *tv, v, "v");
  check_out_shaped(op, "out", out, d, q.scalar_type());
  const MaskView mk = check_mask(op, mask, d);
  const at::ScalarType acc_dt = acc_dtype(q.scalar_type());
  const at::Tensor lse = row_stat(op, "lse", lse_in, d, acc_dt);
  at::Tensor tout = new_out(q, d);
  at::Tensor mu = at::empty({d.B, d.Hq, d.Nq}, q.options().dtype(acc_dt));
  if (mu.numel() == 0) return {tout, mu};
  if (!tq && !tk && !tv) {  // zero tangent
    tout.zero_(), mu.zero_();
    return {tout, mu};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "scm_attention_jvp_tangent", [&] {
    using S = scalar_t;
    using T = std::conditional_t<std::is_same_v<S, double>, double, float>;
    TanArgs<S, T> a;
    a.set(d, scale, is_causal, mk, q, k, v, tq, tk, tv);
    a.out = View4<S>(out);
    a.lse = lse.const_data_ptr<T>();
    a.tout = OutView4<S>(tout);
    a.mu = mu.mutable_data_ptr<T>();
    tangent_kernel(a);
  });
  return {tout, mu};
}

using Grads6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>,
                          std::optional<at::Tensor>>;

Grads6 bwd_common(const char* op, const std::optional<at::Tensor>& grad_out,
                  const std::optional<at::Tensor>& grad_out_tangent, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const std::optional<at::Tensor>& tq, const std::optional<at::Tensor>& tk,
                  const std::optional<at::Tensor>& tv, const at::Tensor& out,
                  const std::optional<at::Tensor>& out_tangent, const at::Tensor& lse_in,
                  const std::optional<at::Tensor>& mu_in, const std::optional<at::Tensor>& mask, bool is_causal,
                  double scale) {
  const Dims d = check_qkv(op, q, k, v);
  if (tq) check_like(op, "tq", *tq, q, "q");
  if (tk) check_like(op, "tk", *tk, k, "k");
  if (tv) check_like(op, "tv", *tv, v, "v");
  check_out_shaped(op, "out", out, d, q.scalar_type());
  if (grad_out) check_out_shaped(op, "grad_out", *grad_out, d, q.scalar_type());
  if (grad_out_tangent) {
    check_out_shaped(op, "grad_out_tangent", *grad_out_tangent, d, q.scalar_type());
    TORCH_CHECK(out_tangent.has_value(), op, ": out_tangent is required with grad_out_tangent");
    check_out_shaped(op, "out_tangent", *out_tangent, d, q.scalar_type());
  }
  const MaskView mk = check_mask(op, mask, d);
  const at::ScalarType acc_dt = acc_dtype(q.scalar_type());
  const at::Tensor lse = row_stat(op, "lse", lse_in, d, acc_dt);
  const bool has_g = grad_out_tangent.has_value();
  const bool use_sd = has_g && (tq.has_value() || tk.has_value());
  at::Tensor mu;
  if (use_sd) {
    TORCH_CHECK(mu_in.has_value(), op, ": mu is required");
    mu = row_stat(op, "mu", *mu_in, d, acc_dt);
  }

  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  std::optional<at::Tensor> dtq, dtk, dtv;
  if (tq) dtq = at::empty_like(*tq);
  if (tk) dtk = at::empty_like(*tk);
  if (tv) dtv = at::empty_like(*tv);
  // empty_like keeps a dense permuted layout; anything else comes out contiguous: both have stride(-1) == 1
  if (dq.numel() + dk.numel() + dv.numel() == 0) return {dq, dk, dv, dtq, dtk, dtv};
  const bool zero = !grad_out.has_value() && !has_g;
  if (zero || d.Nq == 0 || d.Nk == 0) {  // nothing flows: zero gradients
    dq.zero_(), dk.zero_(), dv.zero_();
    if (dtq) dtq->zero_();
    if (dtk) dtk->zero_();
    if (dtv) dtv->zero_();
    return {dq, dk, dv, dtq, dtk, dtv};
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "scm_attention_bwd", [&] {
    using S = scalar_t;
    using T = std::conditional_t<std::is_same_v<S, double>, double, float>;
    BwdArgs<S, T> a;
    a.set(d, scale, is_causal, mk, q, k, v, tq, tk, tv);
    if (grad_out) a.dout = View4<S>(*grad_out), a.has_do = true;
    if (has_g) a.g = View4<S>(*grad_out_tangent), a.has_g = true;
    a.lse = lse.const_data_ptr<T>();
    if (use_sd) a.mu = mu.const_data_ptr<T>();
    at::Tensor delta = at::empty({d.B * d.Hq * d.Nq}, q.options().dtype(acc_dt));
    at::Tensor nu = at::empty({d.B * d.Hq * d.Nq}, q.options().dtype(acc_dt));
    const View4<S> outv(out);
    View4<S> toutv;
    if (has_g) toutv = View4<S>(*out_tangent);
    row_stats<S, T>(d, a.has_do ? &a.dout : nullptr, has_g ? &a.g : nullptr, outv, has_g ? &toutv : nullptr,
                    delta.mutable_data_ptr<T>(), nu.mutable_data_ptr<T>());
    a.delta = delta.const_data_ptr<T>();
    a.nu = nu.const_data_ptr<T>();
    a.dq = OutView4<S>(dq);
    a.dk = OutView4<S>(dk);
    a.dv = OutView4<S>(dv);
    if (dtq) a.dtq = OutView4<S>(*dtq);
    if (dtk) a.dtk = OutView4<S>(*dtk);
    if (dtv) a.dtv = OutView4<S>(*dtv);
    bwd_kernel(a);
  });
  return {dq, dk, dv, dtq, dtk, dtv};
}

// (A26) -> (dq, dk, dv)
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                                                 const at::Tensor& k, const at::Tensor& v,
                                                                 const at::Tensor& out, const at::Tensor& lse,
                                                                 const std::optional<at::Tensor>& mask, bool is_causal,
                                                                 double scale) {
  auto [dq, dk, dv, dtq, dtk, dtv] = bwd_common("attention_bwd", grad_out, std::nullopt, q, k, v, std::nullopt,
                                                std::nullopt, std::nullopt, out, std::nullopt, lse, std::nullopt,
                                                mask, is_causal, scale);
  return {dq, dk, dv};
}

// (A27) -> (dq, dk, dv, dtq, dtk, dtv)
Grads6 attention_jvp_bwd_cpu(const std::optional<at::Tensor>& grad_out,
                             const std::optional<at::Tensor>& grad_out_tangent, const at::Tensor& q,
                             const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& tq,
                             const std::optional<at::Tensor>& tk, const std::optional<at::Tensor>& tv,
                             const at::Tensor& out, const at::Tensor& out_tangent, const at::Tensor& lse,
                             const at::Tensor& mu, const std::optional<at::Tensor>& mask, bool is_causal,
                             double scale) {
  return bwd_common("attention_jvp_bwd", grad_out, grad_out_tangent, q, k, v, tq, tk, tv, out, out_tangent, lse, mu,
                    mask, is_causal, scale);
}

}  // namespace
}  // namespace scm::cpu

TORCH_LIBRARY_IMPL(scm, CPU, m) {
  m.impl("attention_fwd", &scm::cpu::attention_fwd_cpu);
  m.impl("attention_bwd", &scm::cpu::attention_bwd_cpu);
  m.impl("attention_jvp", &scm::cpu::attention_jvp_cpu);
  m.impl("attention_jvp_tangent", &scm::cpu::attention_jvp_tangent_cpu);
  m.impl("attention_jvp_bwd", &scm::cpu::attention_jvp_bwd_cpu);
}
