// CPU kernels of the fused GroupNorm (A28-A30): torch.ops.scm.group_norm / group_norm_jvp /
// group_norm_backward, and of the pixel norm (A11): torch.ops.scm.pixel_norm / _jvp / _backward.
//
// GroupNorm. x is an (N, C, S) view (S = spatial size), channels-first (each channel a contiguous
// row of S elements) or channels-last (each position a contiguous row of C channels); every
// (N, C, S) operand has x's layout and its own batch stride; outputs are packed in that layout.
// Per sample n and group g (Cg = C / G channels, M = Cg S elements), with A = gamma s:
//   forward (A28)  mu, M2 by exact two-pass moments of blocks (the mean summed relative to the block's
//                  first value) merged with Chan's formula (scm::merge): blocks of <= kStatBlock elements
//                  of a channels-first group's contiguous run (across channels), else of one channel
//                  (<= kBlock positions) or of whole channels-last rows; r = (M2 / M + eps)^(-1/2);
//                  a = (x - mu) (r A) + (beta s + b);  y = a sigmoid(a) (SiLU) or a
//   jvp (A29)      m1 = mean(x_dot), m2 = mean(x^ x_dot) = r sum (x - mu) x_dot / M;
//                  x^_dot = r (x_dot - m1 - x^ m2);
//                  a_dot = x^_dot A + x^ (gamma_dot s + gamma s_dot) + (beta_dot s + beta s_dot + b_dot);
//                  y_dot = SiLU'(a) a_dot
//   backward (A30) da = dy SiLU'(a); P1_{n,c} = sum_sp da x^, P2_{n,c} = sum_sp da (returned: the
//                  caller forms dgamma, dbeta, dscale, dshift from them); m1 = sum_c A P2 / M,
//                  m2 = sum_c A P1 / M; dx = r (da A - m1 - x^ m2), with da of the first pass kept
//                  for groups of <= kDaCache elements (one sigmoid per element instead of two)
// Absent weight/bias/scale/shift (and tangents) are 1/0/1/0 (and 0).
//
// Parallelism: at::parallel_for over the tasks (n, g, k), where k splits the group's positions into
// nsplit ranges when N * G alone is too few tasks (batch 1). nsplit depends on the shape only
// (never on the thread count), every reduction has a fixed order (kLanes accumulators per block,
// blocks in order, splits in order): results are bitwise reproducible for any number of threads.
// With nsplit == 1 a task reads its group, then re-reads it from cache for the output pass.
// Channels-last with several groups takes other tasks (group_norm_cl_forward / _jvp / _backward):
// (n, chunk of whole positions), each a contiguous run of rows of all C channels, per-channel sums
// vectorized over the channels and folded into groups; the per-group path would gather Cg channels
// per position (5x slower forward at Cg = 8).
// Inner loops run on fp32 blocks (fp32 operands in place, others converted by common.h), have no
// calls and no data-dependent branches (scm::sigmoid from a polynomial exp), and come in AVX-512 (with
// FMA) and x86-64-v3 (AVX2 with FMA) clones. On AVX-512 CPUs (run-time check) the SiLU-bound loops
// and the JVP and dx loops run explicit AVX-512 kernels instead (*_avx512 below: the forward's SiLU,
// the JVP's sums and y_dot, the backward's sums (channels-first) and dx), and those read and write a
// contiguous bf16/fp16 block in place, converting in registers, with the same bits as fp32 inputs of
// the same values (the fp32 block buffers remain for gathered channels-last blocks and float64). On
// other x86-64 CPUs with AVX2, FMA and F16C the forward's SiLU runs an explicit AVX2 kernel
// (silu_fwd_avx2), which with the forward's statistics (block_moments_avx2) also reads and writes
// contiguous bf16/fp16 blocks in place; the rest runs the portable loops. There,
// tests/kernels/test_avx512_emulated.py tests the AVX-512 kernels, built on a software model of the
// intrinsics (SCM_AVX512_EMULATE).
//
// Pixel norm (A11): a is an (O, C, I) view reduced over C, with either I == 1 and contiguous rows
// of C (stride(1) == 1), or stride(2) == 1 (I contiguous positions per channel):
//   r = (mean_c a^2 + eps)^(-1/2),  y = a r,  y_dot = r (a_dot - y mean_c(y a_dot)),
//   da = r (dy - y mean_c(y dy)).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#if defined(SCM_AVX512_EMULATE)
#include "avx512_emulated.h"
#elif defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "scm/norm.h"

namespace scm::cpu {
namespace {

constexpr int64_t kBlock = 1024;  // elements per block (fits L1 with a few operands)
// Elements per block of a statistics pass read in place (for_stat_blocks): a whole group of 8 channels
// of 32x32 in one block (one stream from memory, then the second sweep from L1/L2).
constexpr int64_t kStatBlock = 8192;
constexpr int kLanes = 64;        // independent accumulators of a reduction (4 AVX-512 vectors: no add-latency chain)
constexpr int64_t kMinTasks = 64;          // split groups when N * G is smaller than this
constexpr int64_t kMinSplitElems = 16384;  // ... but keep at least this many elements per task
constexpr int64_t kDaCache = 1 << 16;      // backward: keep da of groups up to this size (256 KiB)

// Function multi-versioning: AVX-512 (16 lanes) and x86-64-v3 (AVX2 with FMA and F16C, 8 lanes)
// clones, chosen at load time, next to the baseline SSE2 version (the build has no -march). The
// sigmoid's polynomial makes the SiLU paths compute bound; the AVX-512 clone ran them 1.3x-2x faster
// than a plain AVX2 one on a Zen 4 (fwd 1.2 vs 1.6 ms for 8x256x32x32 on one thread). On a Zen 3 (no
// AVX-512) the x86-64-v3 clone, which contracts a * b + c into FMA as the AVX-512 one does, spends
// 17% (forward), 11% (JVP) and 23% (backward) fewer samples than the plain AVX2 clone did (fp32
// 1x256x16x16, L2-resident, one thread, 8000 calls, medians of 3 alternated pairs). Consequence:
// results are bitwise reproducible on one machine (any thread count), not across machines of
// different ISA levels (the AVX-512 kernels, the FMA-contracted clones and the SSE2 clone each
// round differently in the last bits).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SCM_GN_CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#else
#define SCM_GN_CLONES
#endif

// ---------------------------------------------------------------------------------------------
// Block kernels (fp32, contiguous). kVec: per-element coefficient arrays (channels-last blocks,
// where the channel changes along the block) instead of one scalar per block (channels-first).
// ---------------------------------------------------------------------------------------------
#define SCM_COEF(arr, scalar) (kVec ? arr[i] : scalar)

// The SiLU in explicit AVX-512 (the forward is the op whose time the SiLU dominates), built on
// exp2_tab_add16(t, tab, add) = s 2^t + add for a table tab[j] = s c0 2^(j/32) (s = 1, or
// s = -log2(e) for the forward):
//   t = k + f, k = t rounded down to a multiple of 1/32, f = t - k in [0, 1/32) (vreduceps, one op);
//   j = 32 (k - floor(k)) = the low 5 bits of t + 1.5 * 2^18 rounded down (ulp 1/32 there; embedded
//   rounding, one add) picks tab[j] (vpermt2ps); 2^f = c0 (1 + f (P1 + P2 f)) (relative-error fit on
//   [0, 1/32), c0 = 1 + 5.29e-8 folded into the table; table rounding included, max relative error
//   1.06e-7, the same as the previous form's 1.09e-7); vscalefps multiplies tab[j] by 2^floor(t)
//   directly (no rounded k needed) and saturates to +-inf or 0 for large |t| without selects; the
//   added constant rides in the last FMA: s 2^t + add = fma(scalef(tab[j], t), 1 + f q, add).
//   No clamp on t: t = -inf gives scalef 0 (a = +inf -> +inf), |t| >= 2^17 gives inf or 0, NaN
//   propagates. For t in [-150, -126] (a in [87, 104]) scalef returns a denormal, which costs
//   nothing on the project's Zen 4 (measured) and is then added to a constant of magnitude >= 1.
//   backward: 1 + e^-a = exp2_tab_add16(-a log2(e), kExp2Frac, 1), sig = 1 / that;
//   forward:  the block takes t = -a log2(e) directly from its affine step, t = (x - mu) (A c) + B c with
//             c = -log2(e), and y = a / (1 + e^-a) = t / (c + c 2^t) = t / exp2_tab_add16(t, c c0 2^(j/32), c).
// Throughput on the project's Zen 4 (measured, 512-bit ops, 12 independent chains, cycles per op):
// add/sub/max/fma/mul/vpermt2ps/vrndscaleps 1, vscalefps and vreduceps 2 (add side), vdivps 6 (own
// unit); mixes do not reach one FMA-side plus one add-side op per cycle (an add|fma mix runs at 1.24
// cycles per pair, add|fma|vpermt2ps at 1.95 per triple), so the loop is bound by its total op count
// more than by any one unit (removing the division alone did not speed it up). This form takes 10
// ops (12 issue slots) per 16 elements in the forward SiLU pass where the previous one (t rounded to
// nearest by adding and removing 1.5 * 2^18, a clamp at t >= -100, f = t - k, the constant added
// after vscalefps) took 13 (14): SiLU pass 9.8-11.4 -> 9.5-9.8 cycles per 16 elements in an
// L1-resident standalone loop (min of alternated runs; the VM is noisy).
#if defined(SCM_AVX512_EMULATE)
// Test builds (setup.py with SCM_AVX512_EMULATE=1): the same kernels on any x86-64 CPU, every
// intrinsic modelled in software by avx512_emulated.h (included above), and taken whatever the CPU.
#define SCM_GN_AVX512 1
#define SCM_AVX512_FN
#elif defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define SCM_GN_AVX512 1
// vreduceps needs AVX512DQ, the 16-bit masked loads and stores AVX512BW and VL, beside AVX512F (every
// AVX-512 CPU since Skylake-SP has all four).
#define SCM_AVX512_FN __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))
#endif
#ifdef SCM_GN_AVX512
// c0 2^(j/32), j = 0..31, c0 = 1 + 5.29e-8 (see above), correctly rounded to fp32.
alignas(64) constexpr float kExp2Frac[32] = {
    0x1.000000p+0f, 0x1.059b0ep+0f, 0x1.0b5588p+0f, 0x1.11301ep+0f, 0x1.172b84p+0f, 0x1.1d4874p+0f,
    0x1.2387a8p+0f, 0x1.29e9e0p+0f, 0x1.306fe2p+0f, 0x1.371a74p+0f, 0x1.3dea66p+0f, 0x1.44e088p+0f,
    0x1.4bfdaep+0f, 0x1.5342b6p+0f, 0x1.5ab080p+0f, 0x1.6247ecp+0f, 0x1.6a09e8p+0f, 0x1.71f760p+0f,
    0x1.7a1148p+0f, 0x1.82589ap+0f, 0x1.8ace56p+0f, 0x1.93737cp+0f, 0x1.9c491ap+0f, 0x1.a5503cp+0f,
    0x1.ae89fcp+0f, 0x1.b7f770p+0f, 0x1.c199c0p+0f, 0x1.cb7210p+0f, 0x1.d58190p+0f, 0x1.dfc974p+0f,
    0x1.ea4afcp+0f, 0x1.f50768p+0f};
// c c0 2^(j/32), j = 0..31 (c = kNegLog2e32 = -log2(e) in fp32, norm.h), correctly rounded to fp32.
alignas(64) constexpr float kNegLog2eExp2Frac[32] = {
    -0x1.715478p+0f, -0x1.796acep+0f, -0x1.81ae7cp+0f, -0x1.8a207cp+0f, -0x1.92c1d6p+0f, -0x1.9b938ep+0f,
    -0x1.a496b8p+0f, -0x1.adcc66p+0f, -0x1.b735b6p+0f, -0x1.c0d3c6p+0f, -0x1.caa7c0p+0f, -0x1.d4b2d2p+0f,
    -0x1.def630p+0f, -0x1.e97318p+0f, -0x1.f42ac8p+0f, -0x1.ff1e8ep+0f, -0x1.0527dcp+1f, -0x1.0adfd0p+1f,
    -0x1.10b7d2p+1f, -0x1.16b098p+1f, -0x1.1ccad6p+1f, -0x1.23074ap+1f, -0x1.2966b2p+1f, -0x1.2fe9d4p+1f,
    -0x1.369178p+1f, -0x1.3d5e68p+1f, -0x1.44517ap+1f, -0x1.4b6b7ep+1f, -0x1.52ad54p+1f, -0x1.5a17d6p+1f,
    -0x1.61abecp+1f, -0x1.696a7cp+1f};
// 2^f = c0 (1 + f (kExp2P1 + kExp2P2 f)) on [0, 1/32) (relative-error fit).
constexpr float kExp2P1 = 0x1.62e02cp-1f, kExp2P2 = 0x1.f1566ap-3f;
// GCC 12's avx512fintrin.h leaves the pass-through operand of vscalefps undefined on purpose and
// then warns about it (-Wmaybe-uninitialized): not ours to fix.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
SCM_AVX512_FN inline __m512 exp2_tab_add16(__m512 t, const float* tab, __m512 add) {
  const __m512 u = _mm512_add_round_ps(t, _mm512_set1_ps(393216.f), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_reduce_ps(t, (5 << 4) | _MM_FROUND_NO_EXC | _MM_FROUND_TO_NEG_INF);
  const __m512 T = _mm512_permutex2var_ps(_mm512_load_ps(tab), _mm512_castps_si512(u), _mm512_load_ps(tab + 16));
  const __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(kExp2P2), f, _mm512_set1_ps(kExp2P1));
  return _mm512_fmadd_ps(_mm512_scalef_ps(T, t), _mm512_fmadd_ps(f, q, _mm512_set1_ps(1.f)), add);
}
// 1 + e^-a (the backward's sigmoid is 1 / this).
SCM_AVX512_FN inline __m512 one_plus_exp_neg16(__m512 a) {
  return exp2_tab_add16(_mm512_mul_ps(a, _mm512_set1_ps(kNegLog2e32)), kExp2Frac, _mm512_set1_ps(1.f));
}
// silu(a) from t = -a log2(e): t / (c + c 2^t).
SCM_AVX512_FN inline __m512 silu_of_t16(__m512 t) {
  return _mm512_div_ps(t, exp2_tab_add16(t, kNegLog2eExp2Frac, _mm512_set1_ps(kNegLog2e32)));
}

// t = -a log2(e), a = (x - m) A + B: arrays A, B unscaled (kVec), scalars already scaled by c.
template <bool kVec>
SCM_AVX512_FN inline __m512 t_of16(__m512 x, __m512 m, __m512 A, __m512 B, __m512 c) {
  const __m512 v = _mm512_fmadd_ps(_mm512_sub_ps(x, m), A, B);
  return kVec ? _mm512_mul_ps(v, c) : v;
}

// 16 elements of x as fp32, and fp32 results stored in out's dtype: fp32, bf16 (as its bits; widening
// is a shift, narrowing rounds to nearest even with NaN -> 0x7FC0, bit for bit as c10::BFloat16 and
// common.h's f32_to_bf16) or fp16 (vcvtph2ps / vcvtps2ph, round to nearest even, as c10::Half). The
// masked forms read and write only the lanes of m.
SCM_AVX512_FN inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
SCM_AVX512_FN inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
SCM_AVX512_FN inline __m512 widen_bf16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
SCM_AVX512_FN inline __m512 load16(const uint16_t* p) { return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
SCM_AVX512_FN inline __m512 load16(const uint16_t* p, __mmask16 m) { return widen_bf16(_mm256_maskz_loadu_epi16(m, p)); }
SCM_AVX512_FN inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
SCM_AVX512_FN inline __m512 load16(const c10::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
SCM_AVX512_FN inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
SCM_AVX512_FN inline void store16(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
SCM_AVX512_FN inline __m256i narrow_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}
SCM_AVX512_FN inline void store16(uint16_t* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow_bf16(v)); }
SCM_AVX512_FN inline void store16(uint16_t* p, __mmask16 m, __m512 v) { _mm256_mask_storeu_epi16(p, m, narrow_bf16(v)); }
SCM_AVX512_FN inline __m256i narrow_f16(__m512 v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
SCM_AVX512_FN inline void store16(c10::Half* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow_f16(v)); }
SCM_AVX512_FN inline void store16(c10::Half* p, __mmask16 m, __m512 v) { _mm256_mask_storeu_epi16(p, m, narrow_f16(v)); }

// Mask of the first min(rem, 16) lanes (rem >= 1): a block's tail vector.
SCM_AVX512_FN inline __mmask16 lanes16(int64_t rem) {
  return rem >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << rem) - 1u);
}
// fold_pairwise of 64 lanes held in 4 vectors (lane 16 j + l in a[j]).
SCM_AVX512_FN inline float fold4x16(const __m512* a) {
  alignas(64) float t[kLanes];
  for (int j = 0; j < 4; ++j) _mm512_store_ps(t + 16 * j, a[j]);
  return fold_pairwise<kLanes>(t);
}

// out[i] = silu((x[i] - mu) A + B) with per-element coefficient arrays (kVec: Av[i], Bv[i], mu
// scalar or muv[i]) or scalars; the tail through masked loads and stores. t = -a log2(e) comes from
// the affine step with A c and B c (scalars: scaled once; arrays: t = a c per element). x and out
// are fp32, bf16 (uint16_t bits) or fp16: a half-precision block is converted in registers, not
// through fp32 buffers (bf16 8x256x32x32 forward: the two conversion passes around this one took as
// much time as the SiLU itself).
template <bool kVec, bool kVecMu, class T>
SCM_AVX512_FN void silu_fwd_avx512(const T* __restrict x, int64_t n, float mu, const float* __restrict muv,
                                   const float* __restrict Av, const float* __restrict Bv, float A0, float B0,
                                   T* __restrict out) {
  const __m512 mu0 = _mm512_set1_ps(mu), c = _mm512_set1_ps(kNegLog2e32);
  const __m512 a0 = _mm512_set1_ps(A0 * kNegLog2e32), b0 = _mm512_set1_ps(B0 * kNegLog2e32);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 m = kVecMu ? _mm512_loadu_ps(muv + i) : mu0;
    const __m512 A = kVec ? _mm512_loadu_ps(Av + i) : a0;
    const __m512 B = kVec ? _mm512_loadu_ps(Bv + i) : b0;
    store16(out + i, silu_of_t16(t_of16<kVec>(load16(x + i), m, A, B, c)));
  }
  if (i < n) {
    const __mmask16 t = lanes16(n - i);
    const __m512 m = kVecMu ? _mm512_maskz_loadu_ps(t, muv + i) : mu0;
    const __m512 A = kVec ? _mm512_maskz_loadu_ps(t, Av + i) : a0;
    const __m512 B = kVec ? _mm512_maskz_loadu_ps(t, Bv + i) : b0;
    store16(out + i, t, silu_of_t16(t_of16<kVec>(load16(x + i, t), m, A, B, c)));
  }
}

// One sweep of block_moments_avx512 over the block's 64 lanes: kSq false: acc += x - c; true:
// acc += (x - c)^2 (an FMA, as the compiler contracts the portable loop's). Returns the fold.
template <bool kSq, class T>
SCM_AVX512_FN float moments_sweep16(const T* __restrict x, int64_t n, __m512 c) {
  __m512 a[4];
  for (int j = 0; j < 4; ++j) a[j] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < 4; ++j) {
      const __m512 d = _mm512_sub_ps(load16(x + i + 16 * j), c);
      a[j] = kSq ? _mm512_fmadd_ps(d, d, a[j]) : _mm512_add_ps(a[j], d);
    }
  for (int j = 0; j < 4 && i + 16 * j < n; ++j) {
    const __mmask16 m = lanes16(n - i - 16 * j);
    const __m512 d = _mm512_sub_ps(load16(x + i + 16 * j, m), c);
    a[j] = kSq ? _mm512_mask3_fmadd_ps(d, d, a[j], m) : _mm512_mask_add_ps(a[j], m, a[j], d);
  }
  return fold4x16(a);
}
// One bf16 (its bits), fp16 or fp32 element as fp32.
inline float elem_f32(uint16_t bf16_bits) {
  const uint32_t u = static_cast<uint32_t>(bf16_bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline float elem_f32(c10::Half h) { return static_cast<float>(h); }
inline float elem_f32(float f) { return f; }
// block_moments (below) for an fp32, bf16 (uint16_t bits) or fp16 block read in place (half precision
// converted in registers): the same 64 lanes, tail lanes and fold order. Spares the forward's
// statistics pass of a half-precision input its conversion into an fp32 buffer; on AVX-512 CPUs fp32
// blocks take it too, so that fp32 and half inputs of the same values get the same statistics.
template <class T>
SCM_AVX512_FN Moments block_moments_avx512(const T* __restrict x, int64_t n) {
  const float pivot = elem_f32(x[0]);
  const float mean = pivot + moments_sweep16<false>(x, n, _mm512_set1_ps(pivot)) / static_cast<float>(n);
  return {static_cast<float>(n), mean, moments_sweep16<true>(x, n, _mm512_set1_ps(mean))};
}

// Full (kTail false) or masked (kTail true: lanes of m) 16-lane load and store.
template <bool kTail, class T>
SCM_AVX512_FN inline __m512 ld16(const T* p, __mmask16 m) {
  if constexpr (kTail) {
    return load16(p, m);
  } else {
    return load16(p);
  }
}
template <bool kTail, class T>
SCM_AVX512_FN inline void st16(T* p, __mmask16 m, __m512 v) {
  if constexpr (kTail) {
    store16(p, m, v);
  } else {
    store16(p, v);
  }
}

// (A28) SiLU'(a) = sig (1 + a (1 - sig)), sig = 1 / (1 + e^-a).
SCM_AVX512_FN inline __m512 silu_grad16(__m512 a) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 sig = _mm512_div_ps(one, one_plus_exp_neg16(a));
  return _mm512_mul_ps(sig, _mm512_fmadd_ps(a, _mm512_sub_ps(one, sig), one));
}

// (A29) Coefficients of a JVP block: per-block scalars, and per-element arrays that replace some of
// them (A, B, Ad, Bd for a channels-last block of one group; all eight for channels-last rows of all
// channels). A = gamma s, B = beta s + b, Ad = gamma_dot s + gamma s_dot, Bd = beta_dot s + beta s_dot + b_dot.
struct JvpScal {
  float mu, r, m1, m2, A, B, Ad, Bd;
};
struct JvpArr {
  const float *mu, *r, *m1, *m2, *A, *B, *Ad, *Bd;
};

// One 16-lane step of jvp_avx512 at element i. With d = x - mu, P = r A, Q = r (Ad - P m2):
//   a_dot = (x_dot - m1) P + d Q + Bd, which is jvp_block's x^_dot A + x^ Ad + Bd (x^ = r d,
//   x^_dot = r (x_dot - m1 - x^ m2)) with its terms regrouped (3 vector ops instead of 7); without
//   x_dot, a_dot = d (r Ad) + Bd; y_dot = SiLU'(a) a_dot, a = d P + B (kSilu), else a_dot.
// s: mu, r, m1, m2, P, Q, B, Bd broadcast (the scalars' values).
template <bool kTail, bool kVec, bool kVecStats, bool kXd, bool kSilu, class T>
SCM_AVX512_FN inline void jvp_step16(const T* __restrict x, const T* __restrict xd, int64_t i, __mmask16 m,
                                     const JvpArr& v, const __m512* s, T* __restrict out) {
  __m512 mu = s[0], r = s[1], m1 = s[2], m2 = s[3], P = s[4], Q = s[5], B = s[6], Bd = s[7];
  if constexpr (kVecStats) {
    mu = ld16<kTail>(v.mu + i, m);
    r = ld16<kTail>(v.r + i, m);
    m1 = ld16<kTail>(v.m1 + i, m);
    m2 = ld16<kTail>(v.m2 + i, m);
  }
  if constexpr (kVec) {
    P = _mm512_mul_ps(ld16<kTail>(v.A + i, m), r);
    const __m512 Ad = ld16<kTail>(v.Ad + i, m);
    Q = _mm512_mul_ps(kXd ? _mm512_fnmadd_ps(P, m2, Ad) : Ad, r);
    B = ld16<kTail>(v.B + i, m);
    Bd = ld16<kTail>(v.Bd + i, m);
  }
  const __m512 d = _mm512_sub_ps(ld16<kTail>(x + i, m), mu);
  __m512 ad = _mm512_fmadd_ps(d, Q, Bd);
  if constexpr (kXd) ad = _mm512_fmadd_ps(_mm512_sub_ps(ld16<kTail>(xd + i, m), m1), P, ad);
  if constexpr (kSilu) ad = _mm512_mul_ps(silu_grad16(_mm512_fmadd_ps(d, P, B)), ad);
  st16<kTail>(out + i, m, ad);
}

// (A29) y_dot of n contiguous elements in explicit AVX-512 (jvp_block's portable sigmoid is about
// twice the vector ops of one_plus_exp_neg16's, in 256-bit clones); kVec: v.A, B, Ad, Bd per element;
// kVecStats: also v.mu, r, m1, m2. x, x_dot (kXd) and y_dot are fp32, bf16 or fp16, converted in
// registers.
template <bool kVec, bool kVecStats, bool kXd, bool kSilu, class T>
SCM_AVX512_FN void jvp_avx512(const T* __restrict x, const T* __restrict xd, int64_t n, const JvpScal& k,
                              const JvpArr& v, T* __restrict out) {
  const float P = k.r * k.A, Q = k.r * (kXd ? k.Ad - P * k.m2 : k.Ad);
  const __m512 s[8] = {_mm512_set1_ps(k.mu), _mm512_set1_ps(k.r), _mm512_set1_ps(k.m1), _mm512_set1_ps(k.m2),
                       _mm512_set1_ps(P),    _mm512_set1_ps(Q),   _mm512_set1_ps(k.B),  _mm512_set1_ps(k.Bd)};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) jvp_step16<false, kVec, kVecStats, kXd, kSilu>(x, xd, i, 0xFFFF, v, s, out);
  if (i < n) jvp_step16<true, kVec, kVecStats, kXd, kSilu>(x, xd, i, lanes16(n - i), v, s, out);
}
// jvp_avx512 for a run-time x_dot (nullptr: none) and activation.
template <bool kVec, bool kVecStats, class T>
SCM_AVX512_FN void jvp_avx512_any(const T* __restrict x, const T* __restrict xd, int64_t n, const JvpScal& k,
                                  const JvpArr& v, bool silu, T* __restrict out) {
  if (xd != nullptr) {
    silu ? jvp_avx512<kVec, kVecStats, true, true>(x, xd, n, k, v, out)
         : jvp_avx512<kVec, kVecStats, true, false>(x, xd, n, k, v, out);
  } else {
    silu ? jvp_avx512<kVec, kVecStats, false, true>(x, xd, n, k, v, out)
         : jvp_avx512<kVec, kVecStats, false, false>(x, xd, n, k, v, out);
  }
}

// (A29) jvp_sums_block over a contiguous fp32, bf16 or fp16 block read in place: the same 64 lanes,
// masked tail lanes and fold order (a2 += (x - mu) x_dot as one FMA, as the compiler contracts it).
template <class T>
SCM_AVX512_FN void jvp_sums_avx512(const T* __restrict x, const T* __restrict xd, int64_t n, float mu, float& s_d,
                                   float& s_xd) {
  const __m512 vmu = _mm512_set1_ps(mu);
  __m512 a1[4], a2[4];
  for (int j = 0; j < 4; ++j) a1[j] = a2[j] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < 4; ++j) {
      const __m512 t = load16(xd + i + 16 * j);
      a1[j] = _mm512_add_ps(a1[j], t);
      a2[j] = _mm512_fmadd_ps(_mm512_sub_ps(load16(x + i + 16 * j), vmu), t, a2[j]);
    }
  for (int j = 0; j < 4 && i + 16 * j < n; ++j) {
    const __mmask16 m = lanes16(n - i - 16 * j);
    const __m512 t = load16(xd + i + 16 * j, m);
    a1[j] = _mm512_mask_add_ps(a1[j], m, a1[j], t);
    a2[j] = _mm512_mask3_fmadd_ps(_mm512_sub_ps(load16(x + i + 16 * j, m), vmu), t, a2[j], m);
  }
  s_d += fold4x16(a1);
  s_xd += fold4x16(a2);
}

// (A30) one 16-lane step of bwd_sums_avx512 over elements [off, off + 16) (mask m).
template <bool kSilu, class T>
SCM_AVX512_FN inline void bwd_sums_step16(const T* __restrict x, const T* __restrict dy, int64_t off, __mmask16 m,
                                          __m512 vmu, __m512 vr, __m512 vA, __m512 vB, __m512& a1, __m512& a2,
                                          float* __restrict da_out) {
  const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(load16(x + off, m), vmu), vr);
  __m512 da = load16(dy + off, m);
  if constexpr (kSilu) da = _mm512_mul_ps(da, silu_grad16(_mm512_fmadd_ps(xh, vA, vB)));
  _mm512_mask_storeu_ps(da_out + off, m, da);
  a1 = _mm512_fmadd_ps(da, xh, a1);
  a2 = _mm512_add_ps(a2, da);
}

// (A30) bwd_sums_block in explicit AVX-512 (the portable loop's sigmoid is about twice the vector ops
// of one_plus_exp_neg16's): da = dy SiLU'(a) (kSilu) or dy, a = x^ A0 + B0, written to da_out (fp32);
// p1 += sum da x^, p2 += sum da over the same 64 lane accumulators and fold order as the portable
// loop (masked tail lanes add zeros). x and dy fp32, bf16 or fp16, converted in registers. fp32
// 8x256x32x32 backward with SiLU on one thread, best of 15 runs per build alternated 5 times on the
// noisy 2-core VM: 2.01 -> 1.72 ms.
template <bool kSilu, class T>
SCM_AVX512_FN void bwd_sums_avx512(const T* __restrict x, const T* __restrict dy, int64_t n, float mu, float r,
                                   float A0, float B0, float& p1, float& p2, float* __restrict da_out) {
  const __m512 vmu = _mm512_set1_ps(mu), vr = _mm512_set1_ps(r), vA = _mm512_set1_ps(A0), vB = _mm512_set1_ps(B0);
  __m512 a1[4], a2[4];
  for (int j = 0; j < 4; ++j) a1[j] = a2[j] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < 4; ++j) bwd_sums_step16<kSilu>(x, dy, i + 16 * j, 0xFFFF, vmu, vr, vA, vB, a1[j], a2[j], da_out);
  for (int j = 0; j < 4 && i + 16 * j < n; ++j) {
    bwd_sums_step16<kSilu>(x, dy, i + 16 * j, lanes16(n - i - 16 * j), vmu, vr, vA, vB, a1[j], a2[j], da_out);
  }
  p1 += fold4x16(a1);
  p2 += fold4x16(a2);
}

// (A30) one 16-lane step of dx_avx512: dx = r (da A - m1 - x^ m2), x^ = (x - mu) r, in the portable
// loops' order of operations; da = dy SiLU'(x^ A + B) (kDy, kSilu), dy (kDy), or the sums pass's da
// (!kDy). s: mu, r, m1, m2, A, B broadcast; kVec: A, B per element from Av, Bv.
template <bool kTail, bool kVec, bool kDy, bool kSilu, class T>
SCM_AVX512_FN inline void dx_step16(const T* __restrict x, const T* __restrict dy, const float* __restrict da,
                                    int64_t i, __mmask16 m, const float* __restrict Av, const float* __restrict Bv,
                                    const __m512* s, T* __restrict out) {
  const __m512 A = kVec ? ld16<kTail>(Av + i, m) : s[4];
  const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(ld16<kTail>(x + i, m), s[0]), s[1]);
  __m512 g;
  if constexpr (kDy) {
    g = ld16<kTail>(dy + i, m);
    if constexpr (kSilu) g = _mm512_mul_ps(g, silu_grad16(_mm512_fmadd_ps(xh, A, kVec ? ld16<kTail>(Bv + i, m) : s[5])));
  } else {
    g = ld16<kTail>(da + i, m);
  }
  st16<kTail>(out + i, m, _mm512_mul_ps(s[1], _mm512_fnmadd_ps(xh, s[3], _mm512_fmsub_ps(g, A, s[2]))));
}
// (A30) dx of n contiguous elements (dx_block / dx_cached_block in explicit AVX-512); x, dy and dx
// fp32, bf16 or fp16, converted in registers; da (!kDy) fp32.
template <bool kVec, bool kDy, bool kSilu, class T>
SCM_AVX512_FN void dx_avx512(const T* __restrict x, const T* __restrict dy, const float* __restrict da, int64_t n,
                             float mu, float r, float m1, float m2, const float* __restrict Av,
                             const float* __restrict Bv, float A0, float B0, T* __restrict out) {
  const __m512 s[6] = {_mm512_set1_ps(mu), _mm512_set1_ps(r), _mm512_set1_ps(m1),
                       _mm512_set1_ps(m2), _mm512_set1_ps(A0), _mm512_set1_ps(B0)};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) dx_step16<false, kVec, kDy, kSilu>(x, dy, da, i, 0xFFFF, Av, Bv, s, out);
  if (i < n) dx_step16<true, kVec, kDy, kSilu>(x, dy, da, i, lanes16(n - i), Av, Bv, s, out);
}
// dx_avx512 with da from the sums pass (da given) or from dy (da == nullptr), and a run-time activation.
template <bool kVec, class T>
SCM_AVX512_FN void dx_avx512_any(const T* __restrict x, const T* __restrict dy, const float* __restrict da,
                                 int64_t n, float mu, float r, float m1, float m2, const float* __restrict Av,
                                 const float* __restrict Bv, float A0, float B0, bool silu, T* __restrict out) {
  if (da != nullptr) return dx_avx512<kVec, false, false>(x, dy, da, n, mu, r, m1, m2, Av, Bv, A0, B0, out);
  silu ? dx_avx512<kVec, true, true>(x, dy, da, n, mu, r, m1, m2, Av, Bv, A0, B0, out)
       : dx_avx512<kVec, true, false>(x, dy, da, n, mu, r, m1, m2, Av, Bv, A0, B0, out);
}

#pragma GCC diagnostic pop

inline bool have_avx512() {
#ifdef SCM_AVX512_EMULATE
  return true;
#endif
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return yes;
}
#endif


// One sweep of block_moments over the block's 64 lanes (lane 8 j + l in a[j]): kSq false:
// sum (x - c), true: sum (x - c)^2; the tail vector is padded with c (adds +0). The accumulators are
// 32-byte GCC vectors held in registers (ymm in the x86-64-v3 and AVX-512 clones, xmm pairs in the
// SSE2 one) and folded in registers in fold_pairwise's order. Written as a float acc[64] array, as
// before, the compiler zeroed the array with rep stos, loaded it into registers (a failed store
// forward) and folded it through 16-byte copies on the stack (more failed forwards): ~60 ns of fixed
// cost per block on a Zen 3, 40% of the sweep time of a 1024-element block and nearly all of it for
// small blocks (1024 / 64 / 8 elements, L1-resident, x86-64-v3 clone: 160 / 97 / 93 ns per block
// before, 114 / 45 / 51 ns now).
typedef float F8 __attribute__((vector_size(32)));
// fold_pairwise<64> of 64 lanes held in 8 vectors a[j] (lane 8 j + l), in registers (a is clobbered).
inline __attribute__((always_inline)) float fold8x8(F8* a) {
  for (int j = 0; j < 4; ++j) a[j] += a[j + 4];
  for (int j = 0; j < 2; ++j) a[j] += a[j + 2];
  a[0] += a[1];
  return fold_detail::fold_vec<32, float>(a[0], fold_detail::Plus{});
}
// fold_pairwise<kLanes> of an array of 64 accumulators, through 32-byte vectors (fold8x8): the same
// bits; fold_pairwise's 64-byte vectors, split into 16-byte stack copies by the x86-64-v3 clone, cost
// failed store forwards.
inline __attribute__((always_inline)) float fold(const float* acc) {
  static_assert(kLanes == 64, "fold: 8 vectors of 8 lanes");
  F8 a[8];
  std::memcpy(a, acc, sizeof(a));
  return fold8x8(a);
}
template <bool kSq>
inline __attribute__((always_inline)) float moments_sweep(const float* __restrict x, int64_t n, float c) {
  F8 a[8] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < 8; ++j) {
      F8 v;
      std::memcpy(&v, x + i + 8 * j, sizeof(v));
      const F8 d = v - c;
      a[j] += kSq ? d * d : d;
    }
  for (int j = 0; j < 8 && i + 8 * j < n; ++j) {
    F8 t = {c, c, c, c, c, c, c, c};
    std::memcpy(&t, x + i + 8 * j, static_cast<size_t>(std::min<int64_t>(8, n - i - 8 * j)) * sizeof(float));
    const F8 d = t - c;
    a[j] += kSq ? d * d : d;
  }
  return fold8x8(a);
}

// The forward's SiLU in explicit AVX2 with FMA (x86-64-v3 CPUs without AVX-512), in norm.h's base-2
// form (scm::neg_log2e_one_plus_exp2, whose constants it shares): t = -a log2(e) from the affine step
// (as the AVX-512 kernel), y = t / d, d = P(f) 2^(k+1) + c; k = vroundps(clamped t), which rounds ties
// to even as the magic add does, so that k and the exponent bits of u agree. The portable loop with
// the previous scm::sigmoid (degree-6 e^-a and two selects) took 11.7 cycles per 8 elements on a
// Zen 3; this one takes 13 FP ops, one shift and one division (which costs ~1.5 cycles of the FP
// pipes' throughput on a Zen 3; rcp + Newton costs as much). The loop is a three-stage software
// pipeline (affine/clamp/round of vector v + 2, polynomial of v + 1, division and store of v in one
// iteration): in plain order each vector's ~50-cycle dependency chain filled the FP scheduler and
// the loop ran at 8.0 cycles per vector; pipelined 6.8, against a throughput bound of ~7 for the op
// mix (Zen 3, L1-resident 8192-element block, standalone loop, min of 9 runs).
#if !defined(SCM_AVX512_EMULATE) && defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define SCM_GN_AVX2 1
#define SCM_AVX2_FN __attribute__((target("avx2,fma,f16c")))
#define SCM_AVX2_INLINE SCM_AVX2_FN inline __attribute__((always_inline))
struct SiluT8 {
  __m256 t, f, u;  // t; f = tt - round(tt); u = tt + kExp2BiasMagic
};
// Stage 1: t = -a log2(e) of 8 elements, a = (x - m) A + B (kVec: A, B unscaled per element, t = a c;
// else A, B scaled by c once), then clamp and split.
template <bool kVec>
SCM_AVX2_INLINE SiluT8 silu_stage1(__m256 x, __m256 m, __m256 A, __m256 B) {
  __m256 t = _mm256_fmadd_ps(_mm256_sub_ps(x, m), A, B);
  if constexpr (kVec) t = _mm256_mul_ps(t, _mm256_set1_ps(kNegLog2e32));
  const __m256 tt = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(-128.f)), _mm256_set1_ps(127.f));
  const __m256 k = _mm256_round_ps(tt, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return {t, _mm256_sub_ps(tt, k), _mm256_add_ps(tt, _mm256_set1_ps(kExp2BiasMagic))};
}
// Stage 2: P(f).
SCM_AVX2_INLINE __m256 silu_stage2(__m256 f) {
  const float* P = kHalfNegLog2eExp2P;
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(P[5]), f, _mm256_set1_ps(P[4]));
  for (int j = 3; j >= 0; --j) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(P[j]));
  return p;
}
// Stage 3: y = t / fma(P(f), 2^(k+1), c).
SCM_AVX2_INLINE __m256 silu_stage3(const SiluT8& s, __m256 p) {
  const __m256 two_k1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(s.u), 23));
  return _mm256_div_ps(s.t, _mm256_fmadd_ps(p, two_k1, _mm256_set1_ps(kNegLog2e32)));
}
// 8 elements of x as fp32, and fp32 results stored in out's dtype, as load16/store16 (fp32; bf16 bits:
// widening is a shift, narrowing rounds to nearest even with NaN -> 0x7FC0, bit for bit as c10::BFloat16;
// fp16 by F16C, round to nearest even). The _tail forms move the first k < 8 elements through a stack
// copy (AVX2 has no 16-bit masked loads); the lanes past k read as 0.
SCM_AVX2_INLINE __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
SCM_AVX2_INLINE __m256 load8(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
SCM_AVX2_INLINE __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
SCM_AVX2_INLINE void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
SCM_AVX2_INLINE void store8(uint16_t* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  // every lane <= 0xFFFF: the unsigned saturating pack is exact
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
SCM_AVX2_INLINE void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
template <class T>
SCM_AVX2_INLINE __m256 load8_tail(const T* p, int64_t k) {
  T buf[8] = {};
  std::memcpy(buf, p, static_cast<size_t>(k) * sizeof(T));
  return load8(buf);
}
template <class T>
SCM_AVX2_INLINE void store8_tail(T* p, int64_t k, __m256 v) {
  T buf[8];
  store8(buf, v);
  std::memcpy(p, buf, static_cast<size_t>(k) * sizeof(T));
}

// Stage 1 of the 8 elements at i.
template <bool kVec, bool kVecMu, class T>
SCM_AVX2_INLINE SiluT8 silu_load8(const T* x, const float* muv, const float* Av, const float* Bv, int64_t i,
                                  __m256 mu0, __m256 a0, __m256 b0) {
  return silu_stage1<kVec>(load8(x + i), kVecMu ? _mm256_loadu_ps(muv + i) : mu0,
                           kVec ? _mm256_loadu_ps(Av + i) : a0, kVec ? _mm256_loadu_ps(Bv + i) : b0);
}

// out[i] = silu((x[i] - mu) A + B), as silu_fwd_avx512 (kVec: per-element Av, Bv; kVecMu: per-element
// muv); x and out fp32, bf16 (uint16_t bits) or fp16, converted in registers.
template <bool kVec, bool kVecMu, class T>
SCM_AVX2_FN void silu_fwd_avx2(const T* __restrict x, int64_t n, float mu, const float* __restrict muv,
                               const float* __restrict Av, const float* __restrict Bv, float A0, float B0,
                               T* __restrict out) {
  const __m256 mu0 = _mm256_set1_ps(mu);
  const __m256 a0 = _mm256_set1_ps(A0 * kNegLog2e32), b0 = _mm256_set1_ps(B0 * kNegLog2e32);
  const int64_t nv = n / 8;
  if (nv >= 2) {
    // vector v - 2 in s0/p0 (after stage 2), v - 1 in s1 (after stage 1)
    SiluT8 s0 = silu_load8<kVec, kVecMu>(x, muv, Av, Bv, 0, mu0, a0, b0);
    __m256 p0 = silu_stage2(s0.f);
    SiluT8 s1 = silu_load8<kVec, kVecMu>(x, muv, Av, Bv, 8, mu0, a0, b0);
    for (int64_t v = 2; v < nv; ++v) {
      const SiluT8 s2 = silu_load8<kVec, kVecMu>(x, muv, Av, Bv, 8 * v, mu0, a0, b0);
      const __m256 p1 = silu_stage2(s1.f);
      store8(out + 8 * (v - 2), silu_stage3(s0, p0));
      s0 = s1;
      p0 = p1;
      s1 = s2;
    }
    store8(out + 8 * (nv - 2), silu_stage3(s0, p0));
    store8(out + 8 * (nv - 1), silu_stage3(s1, silu_stage2(s1.f)));
  } else if (nv == 1) {
    const SiluT8 s = silu_load8<kVec, kVecMu>(x, muv, Av, Bv, 0, mu0, a0, b0);
    store8(out, silu_stage3(s, silu_stage2(s.f)));
  }
  const int64_t i = 8 * nv, k = n - i;
  if (k > 0) {
    const SiluT8 s = silu_stage1<kVec>(load8_tail(x + i, k), kVecMu ? load8_tail(muv + i, k) : mu0,
                                       kVec ? load8_tail(Av + i, k) : a0, kVec ? load8_tail(Bv + i, k) : b0);
    store8_tail(out + i, k, silu_stage3(s, silu_stage2(s.f)));
  }
}

// block_moments of a bf16 or fp16 block read in place (converted in registers): moments_sweep's 64
// lanes in 8 vectors, tail lanes padded with the pivot or mean, fold8x8's order.
template <bool kSq, class T>
SCM_AVX2_INLINE float moments_sweep8(const T* __restrict x, int64_t n, float c) {
  const __m256 cv = _mm256_set1_ps(c);
  F8 a[8] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < 8; ++j) {
      const F8 d = (F8)_mm256_sub_ps(load8(x + i + 8 * j), cv);
      a[j] += kSq ? d * d : d;
    }
  for (int j = 0; j < 8 && i + 8 * j < n; ++j) {
    const int64_t k = std::min<int64_t>(8, n - i - 8 * j);
    const __m256 lanes = _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(k)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    const F8 d = (F8)_mm256_sub_ps(_mm256_blendv_ps(cv, load8_tail(x + i + 8 * j, k), lanes), cv);
    a[j] += kSq ? d * d : d;
  }
  return fold8x8(a);
}
template <class T>
SCM_AVX2_FN Moments block_moments_avx2(const T* __restrict x, int64_t n) {
  const float pivot = elem_f32(x[0]);
  const float mean = pivot + moments_sweep8<false>(x, n, pivot) / static_cast<float>(n);
  return {static_cast<float>(n), mean, moments_sweep8<true>(x, n, mean)};
}

inline bool have_avx2() {
  static const bool yes =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return yes;
}
#endif

// Moments of one block: its mean (summed relative to the pivot x[0], so that a large common offset
// costs no precision), then sum (x - mean)^2.
SCM_GN_CLONES Moments block_moments(const float* __restrict x, int64_t n) {
  const float pivot = x[0];
  const float mean = pivot + moments_sweep<false>(x, n, pivot) / static_cast<float>(n);
  return {static_cast<float>(n), mean, moments_sweep<true>(x, n, mean)};
}

// (A28) out = act((x - mu) A + B), A = r gamma s, B = beta s + b.
template <bool kVec>
SCM_GN_CLONES void fwd_block(const float* __restrict x, int64_t n, float mu, const float* __restrict Av,
                             const float* __restrict Bv, float A0, float B0, bool silu, float* __restrict out) {
  const Exp2Clamp tclamp = exp2_clamp();  // before the loops (see norm.h)
#ifdef SCM_GN_AVX512
  if (silu && have_avx512()) return silu_fwd_avx512<kVec, false>(x, n, mu, nullptr, Av, Bv, A0, B0, out);
#endif
#ifdef SCM_GN_AVX2
  if (silu && have_avx2()) return silu_fwd_avx2<kVec, false>(x, n, mu, nullptr, Av, Bv, A0, B0, out);
#endif
  if (silu) {
    for (int64_t i = 0; i < n; ++i) {
      const float a = (x[i] - mu) * SCM_COEF(Av, A0) + SCM_COEF(Bv, B0);
      out[i] = a * sigmoid(a, tclamp);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - mu) * SCM_COEF(Av, A0) + SCM_COEF(Bv, B0);
  }
}

// Channels-last forward (A28) over whole rows of C channels (a chunk of positions of one sample):
// per-channel sums, vectorized over the channels, folded into groups by the caller.
// acc_c += x_{s,c} - p_c over the rows (p: the chunk's first row, so that a large common offset costs
// no precision).
SCM_GN_CLONES void cl_sum_rows(const float* __restrict x, int64_t rows, int64_t C, const float* __restrict p,
                               float* __restrict acc) {
  for (int64_t s = 0; s < rows; ++s)
    for (int64_t c = 0; c < C; ++c) acc[c] += x[s * C + c] - p[c];
}
// acc_c += (x_{s,c} - mu_c)^2 over the rows.
SCM_GN_CLONES void cl_sq_rows(const float* __restrict x, int64_t rows, int64_t C, const float* __restrict mu,
                              float* __restrict acc) {
  for (int64_t s = 0; s < rows; ++s)
    for (int64_t c = 0; c < C; ++c) {
      const float d = x[s * C + c] - mu[c];
      acc[c] += d * d;
    }
}
// out_{s,c} = act((x_{s,c} - mu_c) A_c + B_c) over the rows.
SCM_GN_CLONES void cl_fwd_rows(const float* __restrict x, int64_t rows, int64_t C, const float* __restrict mu,
                               const float* __restrict A, const float* __restrict B, bool silu,
                               float* __restrict out) {
  const Exp2Clamp tclamp = exp2_clamp();  // before the loops (see norm.h)
#ifdef SCM_GN_AVX512
  if (silu && have_avx512()) {
    for (int64_t s = 0; s < rows; ++s) silu_fwd_avx512<true, true>(x + s * C, C, 0.f, mu, A, B, 0.f, 0.f, out + s * C);
    return;
  }
#endif
#ifdef SCM_GN_AVX2
  if (silu && have_avx2()) {
    for (int64_t s = 0; s < rows; ++s) silu_fwd_avx2<true, true>(x + s * C, C, 0.f, mu, A, B, 0.f, 0.f, out + s * C);
    return;
  }
#endif
  for (int64_t s = 0; s < rows; ++s) {
    const float* xr = x + s * C;
    float* o = out + s * C;
    if (silu) {
      for (int64_t c = 0; c < C; ++c) {
        const float a = (xr[c] - mu[c]) * A[c] + B[c];
        o[c] = a * sigmoid(a, tclamp);
      }
    } else {
      for (int64_t c = 0; c < C; ++c) o[c] = (xr[c] - mu[c]) * A[c] + B[c];
    }
  }
}

// Channels-last JVP (A29) over whole rows: a1_c += x_dot_{s,c}, a2_c += (x_{s,c} - mu_c) x_dot_{s,c}.
SCM_GN_CLONES void cl_jvp_sums_rows(const float* __restrict x, const float* __restrict xd, int64_t rows, int64_t C,
                                    const float* __restrict mu, float* __restrict a1, float* __restrict a2) {
  for (int64_t s = 0; s < rows; ++s)
    for (int64_t c = 0; c < C; ++c) {
      a1[c] += xd[s * C + c];
      a2[c] += (x[s * C + c] - mu[c]) * xd[s * C + c];
    }
}
// Per-channel coefficients of the channels-last JVP rows (each (C,), of one sample).
struct ClJvpCoef {
  const float *mu, *r, *m1, *m2, *A, *B, *Ad, *Bd;
};
// y_dot rows (A29); xd == nullptr: no tangent of x.
SCM_GN_CLONES void cl_jvp_rows(const float* __restrict x, const float* __restrict xd, int64_t rows, int64_t C,
                               ClJvpCoef k, bool silu, float* __restrict out) {
  const Exp2Clamp tclamp = exp2_clamp();  // before the loops (see norm.h)
#ifdef SCM_GN_AVX512
  if (have_avx512()) {
    const JvpArr v{k.mu, k.r, k.m1, k.m2, k.A, k.B, k.Ad, k.Bd};
    for (int64_t s = 0; s < rows; ++s)
      jvp_avx512_any<true, true>(x + s * C, xd != nullptr ? xd + s * C : nullptr, C, JvpScal{}, v, silu, out + s * C);
    return;
  }
#endif
#define SCM_GN_CL_JVP(XHD, SILU)                                         \
  for (int64_t s = 0; s < rows; ++s)                                     \
    for (int64_t c = 0; c < C; ++c) {                                    \
      const int64_t i = s * C + c;                                       \
      const float xh = (x[i] - k.mu[c]) * k.r[c];                        \
      const float ad = (XHD) * k.A[c] + xh * k.Ad[c] + k.Bd[c];          \
      if (SILU) {                                                        \
        const float a = xh * k.A[c] + k.B[c];                            \
        out[i] = silu_grad_from_sig(a, sigmoid(a, tclamp)) * ad;                 \
      } else {                                                           \
        out[i] = ad;                                                     \
      }                                                                  \
    }
  if (xd != nullptr) {
    if (silu) {
      SCM_GN_CL_JVP(k.r[c] * (xd[i] - k.m1[c] - xh * k.m2[c]), true)
    } else {
      SCM_GN_CL_JVP(k.r[c] * (xd[i] - k.m1[c] - xh * k.m2[c]), false)
    }
  } else {
    if (silu) {
      SCM_GN_CL_JVP(0.f, true)
    } else {
      SCM_GN_CL_JVP(0.f, false)
    }
  }
#undef SCM_GN_CL_JVP
}

// (A29) sums of x_dot and of (x - mu) x_dot over one block, added to s_d, s_xd.
SCM_GN_CLONES void jvp_sums_block(const float* __restrict x, const float* __restrict xd, int64_t n, float mu,
                                  float& s_d, float& s_xd) {
#ifdef SCM_GN_AVX512
  if (have_avx512()) return jvp_sums_avx512(x, xd, n, mu, s_d, s_xd);
#endif
  // Register-held accumulators, as in moments_sweep (lane 8 j + l in a[j]); the tail pads x_dot with 0.
  F8 a1[8] = {}, a2[8] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < 8; ++j) {
      F8 v, vd;
      std::memcpy(&v, x + i + 8 * j, sizeof(v));
      std::memcpy(&vd, xd + i + 8 * j, sizeof(vd));
      a1[j] += vd;
      a2[j] += (v - mu) * vd;
    }
  for (int j = 0; j < 8 && i + 8 * j < n; ++j) {
    F8 v = {}, vd = {};
    const size_t bytes = static_cast<size_t>(std::min<int64_t>(8, n - i - 8 * j)) * sizeof(float);
    std::memcpy(&v, x + i + 8 * j, bytes);
    std::memcpy(&vd, xd + i + 8 * j, bytes);
    a1[j] += vd;
    a2[j] += (v - mu) * vd;
  }
  s_d += fold8x8(a1);
  s_xd += fold8x8(a2);
}

// (A29) y_dot of one block; xd == nullptr: no tangent of x (x^_dot = 0).
struct JvpCoef {
  float A, B, Ad, Bd;  // A = gamma s, B = beta s + b, Ad = gamma_dot s + gamma s_dot, Bd = beta_dot s + beta s_dot + b_dot
};

template <bool kVec>
SCM_GN_CLONES void jvp_block(const float* __restrict x, const float* __restrict xd, int64_t n, float mu, float r,
                             float m1, float m2, const float* __restrict Av, const float* __restrict Bv,
                             const float* __restrict Adv, const float* __restrict Bdv, JvpCoef k, bool silu,
                             float* __restrict out) {
  const Exp2Clamp tclamp = exp2_clamp();  // before the loops (see norm.h)
#ifdef SCM_GN_AVX512
  if (have_avx512()) {
    return jvp_avx512_any<kVec, false>(x, xd, n, JvpScal{mu, r, m1, m2, k.A, k.B, k.Ad, k.Bd},
                                       JvpArr{nullptr, nullptr, nullptr, nullptr, Av, Bv, Adv, Bdv}, silu, out);
  }
#endif
#define SCM_GN_JVP_LOOP(XHD, SILU)                                                             \
  for (int64_t i = 0; i < n; ++i) {                                                            \
    const float xh = (x[i] - mu) * r;                                                          \
    const float xhd = XHD;                                                                     \
    const float A = SCM_COEF(Av, k.A);                                                         \
    const float ad = xhd * A + xh * SCM_COEF(Adv, k.Ad) + SCM_COEF(Bdv, k.Bd);                 \
    if (SILU) {                                                                                \
      const float a = xh * A + SCM_COEF(Bv, k.B);                                              \
      out[i] = silu_grad_from_sig(a, sigmoid(a, tclamp)) * ad;                                         \
    } else {                                                                                   \
      out[i] = ad;                                                                             \
    }                                                                                          \
  }
  if (xd != nullptr) {
    if (silu) {
      SCM_GN_JVP_LOOP(r * (xd[i] - m1 - xh * m2), true)
    } else {
      SCM_GN_JVP_LOOP(r * (xd[i] - m1 - xh * m2), false)
    }
  } else {
    if (silu) {
      SCM_GN_JVP_LOOP(0.f, true)
    } else {
      SCM_GN_JVP_LOOP(0.f, false)
    }
  }
#undef SCM_GN_JVP_LOOP
}

// (A30) x^ and da = dy SiLU'(a) (SILU true) or dy at element I, with a = x^ A + B. Every loop below
// is written twice (SiLU or not) so that no branch is left inside it.
#define SCM_GN_DA(SILU, I, A, B)                                      \
  const float xh = (x[I] - mu) * r;                                   \
  float da = dy[I];                                                   \
  if (SILU) {                                                         \
    const float a = xh * (A) + (B);                                   \
    da *= silu_grad_from_sig(a, sigmoid(a, tclamp));       \
  }

// (A30) channels-first block of one channel: P1 += sum da x^, P2 += sum da; da is also written to
// da_out (the dx pass reuses it instead of evaluating the sigmoid again).
SCM_GN_CLONES void bwd_sums_block(const float* __restrict x, const float* __restrict dy, int64_t n, float mu,
                                  float r, float A0, float B0, bool silu, float& p1, float& p2,
                                  float* __restrict da_out) {
  const Exp2Clamp tclamp = exp2_clamp();  // before the loops (see norm.h)
#ifdef SCM_GN_AVX512
  if (have_avx512()) {
    return silu ? bwd_sums_avx512<true>(x, dy, n, mu, r, A0, B0, p1, p2, da_out)
                : bwd_sums_avx512<false>(x, dy, n, mu, r, A0, B0, p1, p2, da_out);
  }
#endif
  // The accumulators zeroed by vector stores: = {0.f} compiles to rep stos, whose start-up cost (and
  // the failed store forwards of the loads after it) took 24% of this function's samples at 4x4
  // positions; an opaque zero keeps the compiler from turning the stores back into a memset.
  float zero = 0.f;
  __asm__("" : "+m"(zero));
  F8 v1[8], v2[8];
  for (int j = 0; j < 8; ++j) v1[j] = v2[j] = F8{} + zero;
  float* a1 = reinterpret_cast<float*>(v1);
  float* a2 = reinterpret_cast<float*>(v2);
  int64_t i = 0;
#define SCM_GN_SUMS(SILU)                                 \
  for (; i + kLanes <= n; i += kLanes) {                  \
    for (int l = 0; l < kLanes; ++l) {                    \
      SCM_GN_DA(SILU, i + l, A0, B0)                      \
      da_out[i + l] = da;                                 \
      a1[l] += da * xh;                                   \
      a2[l] += da;                                        \
    }                                                     \
  }                                                       \
  for (int l = 0; i < n; ++i, ++l) {                      \
    SCM_GN_DA(SILU, i, A0, B0)                            \
    da_out[i] = da;                                       \
    a1[l] += da * xh;                                     \
    a2[l] += da;                                          \
  }
  if (silu) {
    SCM_GN_SUMS(true)
  } else {
    SCM_GN_SUMS(false)
  }
#undef SCM_GN_SUMS
  p1 += fold8x8(v1);
  p2 += fold8x8(v2);
}

// (A30) channels-last block: per-element accumulators acc1 += da x^, acc2 += da (the caller
// folds them per channel, element i of a block is channel i % Cg).
SCM_GN_CLONES void bwd_acc_block(const float* __restrict x, const float* __restrict dy, int64_t n, float mu,
                                 float r, const float* __restrict Av, const float* __restrict Bv, bool silu,
                                 float* __restrict acc1, float* __restrict acc2, float* __restrict da_out) {
  const Exp2Clamp tclamp = exp2_clamp();  // before the loops (see norm.h)
#define SCM_GN_ACC(SILU)                          \
  for (int64_t i = 0; i < n; ++i) {               \
    SCM_GN_DA(SILU, i, Av[i], Bv[i])              \
    da_out[i] = da;                               \
    acc1[i] += da * xh;                           \
    acc2[i] += da;                                \
  }
  if (silu) {
    SCM_GN_ACC(true)
  } else {
    SCM_GN_ACC(false)
  }
#undef SCM_GN_ACC
}

// (A30) dx = r (da A - m1 - x^ m2).
template <bool kVec>
SCM_GN_CLONES void dx_block(const float* __restrict x, const float* __restrict dy, int64_t n, float mu, float r,
                            float m1, float m2, const float* __restrict Av, const float* __restrict Bv, float A0,
                            float B0, bool silu, float* __restrict out) {
  const Exp2Clamp tclamp = exp2_clamp();  // before the loops (see norm.h)
#ifdef SCM_GN_AVX512
  if (have_avx512()) return dx_avx512_any<kVec>(x, dy, nullptr, n, mu, r, m1, m2, Av, Bv, A0, B0, silu, out);
#endif
#define SCM_GN_DX(SILU)                                                  \
  for (int64_t i = 0; i < n; ++i) {                                      \
    SCM_GN_DA(SILU, i, SCM_COEF(Av, A0), SCM_COEF(Bv, B0))               \
    out[i] = r * (da * SCM_COEF(Av, A0) - m1 - xh * m2);                 \
  }
  if (silu) {
    SCM_GN_DX(true)
  } else {
    SCM_GN_DX(false)
  }
#undef SCM_GN_DX
}
// Channels-last backward (A30) over whole rows of C channels (a chunk of one sample), with
// per-channel vectors muv, rv, A, B: p1_c += da x^, p2_c += da.
SCM_GN_CLONES void cl_bwd_sums_rows(const float* __restrict x, const float* __restrict dy, int64_t rows, int64_t C,
                                    const float* __restrict muv, const float* __restrict rv,
                                    const float* __restrict A, const float* __restrict B, bool silu,
                                    float* __restrict p1, float* __restrict p2) {
  const Exp2Clamp tclamp = exp2_clamp();  // before the loops (see norm.h)
#define SCM_GN_CL_SUMS(SILU)                           \
  for (int64_t s = 0; s < rows; ++s)                   \
    for (int64_t c = 0; c < C; ++c) {                  \
      const float mu = muv[c], r = rv[c];              \
      SCM_GN_DA(SILU, s * C + c, A[c], B[c])           \
      p1[c] += da * xh;                                \
      p2[c] += da;                                     \
    }
  if (silu) {
    SCM_GN_CL_SUMS(true)
  } else {
    SCM_GN_CL_SUMS(false)
  }
#undef SCM_GN_CL_SUMS
}

// Channels-last dx = r (da A - m1 - x^ m2) over whole rows (m1, m2 per channel, of its group).
SCM_GN_CLONES void cl_dx_rows(const float* __restrict x, const float* __restrict dy, int64_t rows, int64_t C,
                              const float* __restrict muv, const float* __restrict rv, const float* __restrict A,
                              const float* __restrict B, const float* __restrict m1, const float* __restrict m2,
                              bool silu, float* __restrict out) {
  const Exp2Clamp tclamp = exp2_clamp();  // before the loops (see norm.h)
#define SCM_GN_CL_DX(SILU)                             \
  for (int64_t s = 0; s < rows; ++s)                   \
    for (int64_t c = 0; c < C; ++c) {                  \
      const float mu = muv[c], r = rv[c];              \
      SCM_GN_DA(SILU, s * C + c, A[c], B[c])           \
      out[s * C + c] = r * (da * A[c] - m1[c] - xh * m2[c]); \
    }
  if (silu) {
    SCM_GN_CL_DX(true)
  } else {
    SCM_GN_CL_DX(false)
  }
#undef SCM_GN_CL_DX
}
#undef SCM_GN_DA

// (A30) dx = r (da A - m1 - x^ m2) with da from the sums pass.
template <bool kVec>
SCM_GN_CLONES void dx_cached_block(const float* __restrict x, const float* __restrict da, int64_t n, float mu,
                                   float r, float m1, float m2, const float* __restrict Av, float A0,
                                   float* __restrict out) {
#ifdef SCM_GN_AVX512
  if (have_avx512()) return dx_avx512_any<kVec, float>(x, nullptr, da, n, mu, r, m1, m2, Av, nullptr, A0, 0.f, false, out);
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = r * (da[i] * SCM_COEF(Av, A0) - m1 - (x[i] - mu) * r * m2);
}

// ---------------------------------------------------------------------------------------------
// Geometry, operands, blocks
// ---------------------------------------------------------------------------------------------
struct Geo {
  int64_t N, C, S, G, Cg;
  bool cl;
  int64_t nsplit, s_split;  // positions of a group split into nsplit ranges of s_split
  int64_t rows;             // channels-last: positions per block
  int64_t cap;              // elements per block buffer

  int64_t tasks() const { return N * G * nsplit; }
  float M() const { return static_cast<float>(Cg * S); }
};

// An (N, C, S) operand: batch stride in elements, dtype.
struct Ncs {
  const char* base = nullptr;
  char* mbase = nullptr;
  int64_t sn = 0, es = 4;
  at::ScalarType dt = at::kFloat;
};

Ncs operand(const at::Tensor& t) {
  Ncs o;
  o.base = static_cast<const char*>(t.const_data_ptr());
  o.sn = t.size(0) > 1 ? t.stride(0) : 0;
  o.es = t.element_size();
  o.dt = t.scalar_type();
  return o;
}

Ncs output(at::Tensor& t) {
  Ncs o = operand(t);
  o.mbase = static_cast<char*>(t.mutable_data_ptr());
  return o;
}

// One block of a task: channels-first: channel c (absolute), positions [s0, s0 + len);
// channels-last: positions [s0, s0 + rows) of the group's channels, len = rows * Cg.
struct Blk {
  int64_t c, s0, len, rows;
};

template <class F>
void for_blocks(const Geo& g, int64_t grp, int64_t s_lo, int64_t s_hi, F&& f) {
  if (!g.cl) {
    for (int64_t c = grp * g.Cg; c < (grp + 1) * g.Cg; ++c)
      for (int64_t s0 = s_lo; s0 < s_hi; s0 += kBlock) f(Blk{c, s0, std::min(kBlock, s_hi - s0), 1});
  } else {
    for (int64_t s0 = s_lo; s0 < s_hi; s0 += g.rows) {
      const int64_t r = std::min(g.rows, s_hi - s0);
      f(Blk{grp * g.Cg, s0, r * g.Cg, r});
    }
  }
}

// True when the block is one contiguous run of memory (channels-first, or one group of all channels).
inline bool contiguous_block(const Geo& g) { return !g.cl || g.G == 1; }

// The statistics pass (moments, the JVP's sums) over a task: channels-first tasks holding whole
// channels (no split) are one contiguous run of Cg S elements, taken in blocks of up to max_len
// elements across channel boundaries (Blk{c0, s0 = offset from channel c0's first element, len}:
// elem_offset is unchanged). Blocks of one channel (for_blocks) cost a sweep's fixed overhead and a
// merge per channel: at small S (16x16 and lower U-Net levels) nearly all of the pass, and 8 short
// streams per group instead of one at S = 1024. Other tasks: for_blocks.
template <class F>
void for_stat_blocks(const Geo& g, int64_t grp, int64_t s_lo, int64_t s_hi, int64_t max_len, F&& f) {
  if (g.cl || s_lo != 0 || s_hi != g.S) return for_blocks(g, grp, s_lo, s_hi, f);
  const int64_t total = g.Cg * g.S;
  for (int64_t o = 0; o < total; o += max_len) f(Blk{grp * g.Cg, o, std::min(max_len, total - o), 1});
}

inline int64_t elem_offset(const Geo& g, const Ncs& o, int64_t n, const Blk& b) {
  return n * o.sn + (g.cl ? b.s0 * g.C + b.c : b.c * g.S + b.s0);
}

// fp32 values of a block: in place when possible, else converted/gathered into buf.
const float* load(const Geo& g, const Ncs& o, int64_t n, const Blk& b, float* buf) {
  const char* p = o.base + elem_offset(g, o, n, b) * o.es;
  if (contiguous_block(g)) {
    if (o.dt == at::kFloat) return reinterpret_cast<const float*>(p);
    load_f32(p, o.dt, b.len, buf);
    return buf;
  }
  for (int64_t j = 0; j < b.rows; ++j) load_f32(p + j * g.C * o.es, o.dt, g.Cg, buf + j * g.Cg);
  return buf;
}

// Where a block's fp32 results go: the output itself when possible, else buf (then store()).
float* out_ptr(const Geo& g, const Ncs& o, int64_t n, const Blk& b, float* buf) {
  if (contiguous_block(g) && o.dt == at::kFloat)
    return reinterpret_cast<float*>(o.mbase + elem_offset(g, o, n, b) * o.es);
  return buf;
}

void store(const Geo& g, const Ncs& o, int64_t n, const Blk& b, const float* vals) {
  char* p = o.mbase + elem_offset(g, o, n, b) * o.es;
  if (contiguous_block(g)) {
    if (o.dt != at::kFloat) store_f32(vals, b.len, o.dt, p);
    return;
  }
  for (int64_t j = 0; j < b.rows; ++j) store_f32(vals + j * g.Cg, g.Cg, o.dt, p + j * g.C * o.es);
}

#ifdef SCM_GN_AVX512
// True when the AVX-512 kernels read and write blocks of dtype dt in place, converting in registers:
// bf16 and fp16 operands of contiguous blocks (fp32 blocks are read in place by every path, others
// are converted into fp32 buffers by load() and store()).
inline bool half_in_place(const Geo& g, at::ScalarType dt) {
  return contiguous_block(g) && (dt == at::kBFloat16 || dt == at::kHalf) && have_avx512();
}
#ifdef SCM_GN_AVX2
// On AVX2 CPUs without AVX-512: the forward's statistics and SiLU passes read and write such blocks
// in place too (block_moments_avx2, silu_fwd_avx2); the other passes convert.
inline bool half_in_place_avx2(const Geo& g, at::ScalarType dt) {
  return contiguous_block(g) && (dt == at::kBFloat16 || dt == at::kHalf) && !have_avx512() && have_avx2();
}
#endif
// f(p) with p a null pointer of the element type of a half dtype: uint16_t (bf16 bits) or c10::Half.
template <class F>
void with_half(at::ScalarType dt, F&& f) {
  if (dt == at::kBFloat16) {
    f(static_cast<uint16_t*>(nullptr));
  } else {
    f(static_cast<c10::Half*>(nullptr));
  }
}
// Block b of operand o (or nullptr for none) as elements of type T.
template <class T>
const T* in_blk(const Geo& g, const Ncs* o, int64_t n, const Blk& b) {
  return o == nullptr ? nullptr : reinterpret_cast<const T*>(o->base + elem_offset(g, *o, n, b) * o->es);
}
template <class T>
T* out_blk(const Geo& g, const Ncs& o, int64_t n, const Blk& b) {
  return reinterpret_cast<T*>(o.mbase + elem_offset(g, o, n, b) * o.es);
}
#define SCM_ELEM_T(tag) std::remove_const_t<std::remove_pointer_t<decltype(tag)>>
#endif

// Per-channel fp32 operands: (C,) vectors and (N, C) matrices with free strides, or absent.
struct ChanVec {
  const float* p = nullptr;
  int64_t sn = 0, sc = 0;
  float dflt = 0.f;
  float at(int64_t n, int64_t c) const { return p != nullptr ? p[n * sn + c * sc] : dflt; }
};

ChanVec chan_vec(const std::optional<at::Tensor>& t, float dflt, bool per_sample) {
  ChanVec v;
  v.dflt = dflt;
  if (t.has_value()) {
    v.p = t->const_data_ptr<float>();
    if (per_sample) {
      v.sn = t->stride(0);
      v.sc = t->stride(1);
    } else {
      v.sc = t->stride(0);
    }
  }
  return v;
}

// Task t -> (sample, group, split) and the split's positions.
struct Task {
  int64_t n, grp, k, s_lo, s_hi;
};

inline Task task_of(const Geo& g, int64_t t) {
  Task k;
  k.k = t % g.nsplit;
  const int64_t ng = t / g.nsplit;
  k.n = ng / g.G;
  k.grp = ng % g.G;
  k.s_lo = k.k * g.s_split;
  k.s_hi = std::min(g.S, k.s_lo + g.s_split);
  return k;
}

const char* const kOp = "group_norm";

void check_float(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, kOp, ": ", name,
              " must be float32, float16, bfloat16 or float64, got ", dt);
}

// Checks x and returns the geometry of the call.
Geo make_geo(const at::Tensor& x, int64_t num_groups) {
  TORCH_CHECK(x.device().is_cpu(), kOp, ": x must be a CPU tensor");
  TORCH_CHECK(x.dim() == 3, kOp, ": x must be an (N, C, S) view, got shape ", x.sizes());
  check_float(x, "x");
  Geo g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.S = x.size(2);
  TORCH_CHECK(g.N > 0 && g.C > 0 && g.S > 0, kOp, ": x must not be empty, got shape ", x.sizes());
  TORCH_CHECK(num_groups >= 1 && g.C % num_groups == 0, kOp, ": num_groups must divide C = ", g.C, ", got ",
              num_groups);
  g.G = num_groups;
  g.Cg = g.C / g.G;
  const bool cf = (g.S == 1 || x.stride(2) == 1) && (g.C == 1 || x.stride(1) == g.S);
  g.cl = !cf && (g.C == 1 || x.stride(1) == 1) && (g.S == 1 || x.stride(2) == g.C);
  TORCH_CHECK(cf || g.cl, kOp, ": x must be channels-first or channels-last, got strides ", x.strides());
  g.nsplit = 1;
  const int64_t NG = g.N * g.G;
  if (NG < kMinTasks) {
    const int64_t want = (kMinTasks + NG - 1) / NG;
    const int64_t by_size = std::max<int64_t>(1, g.Cg * g.S / kMinSplitElems);
    g.nsplit = std::max<int64_t>(1, std::min({want, by_size, g.S}));
  }
  g.s_split = (g.S + g.nsplit - 1) / g.nsplit;
  g.nsplit = (g.S + g.s_split - 1) / g.s_split;
  g.rows = std::max<int64_t>(1, kBlock / g.Cg);
  g.cap = g.cl ? g.rows * g.Cg : kBlock;
  return g;
}

void check_like(const at::Tensor& t, const at::Tensor& x, const Geo& g, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), kOp, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type(), kOp, ": ", name,
              " must have x's shape and dtype");
  const bool same = g.cl ? (t.stride(1) == 1 && t.stride(2) == g.C) : (g.S == 1 || t.stride(2) == 1) &&
                                                                          (g.C == 1 || t.stride(1) == g.S);
  TORCH_CHECK(same, kOp, ": ", name, " must have x's layout, got strides ", t.strides());
}

void check_chan(const std::optional<at::Tensor>& t, const Geo& g, bool per_sample, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, kOp, ": ", name,
              " must be a float32 CPU tensor");
  if (per_sample) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == g.N && t->size(1) == g.C, kOp, ": ", name, " must have shape (",
                g.N, ", ", g.C, "), got ", t->sizes());
  } else {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == g.C, kOp, ": ", name, " must have shape (", g.C, "), got ",
                t->sizes());
  }
}

void check_stats(const at::Tensor& t, const Geo& g, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == g.N * g.G,
              kOp, ": ", name, " must be a contiguous float32 (N, G) CPU tensor");
}

at::Tensor empty_like_layout(const at::Tensor& x, const Geo& g) {
  const auto opts = x.options();
  if (g.cl) return at::empty_strided({g.N, g.C, g.S}, {g.C * g.S, 1, g.C}, opts);
  return at::empty_strided({g.N, g.C, g.S}, {g.C * g.S, g.S, 1}, opts);
}

// Per-task scratch: block buffers, expanded channels-last coefficients; stats(): the statistics passes'
// conversion buffers (two of kStatBlock floats, x and x_dot; blocks of those passes span up to
// kStatBlock elements whatever the dtype, so that fp16/bf16 inputs converted into fp32 get the fp32
// inputs' statistics bit for bit). Not zeroed: every element is written before it is read.
struct Scratch {
  std::unique_ptr<float[]> v;
  int64_t n;
  explicit Scratch(int64_t n_) : v(new float[n_ + 2 * kStatBlock]), n(n_) {}
  float* at(int64_t i, int64_t cap) { return v.get() + i * cap; }
  float* stats() { return v.get() + n; }
};

// v[j C + c] = v[c] for j in [1, R): v holds R C floats.
inline void replicate(float* v, int64_t C, int64_t R) {
  for (int64_t j = 1; j < R; ++j) std::copy(v, v + C, v + j * C);
}

// Channels-first tasks of whole short channels whose run fits one block (Cg S <= kBlock, Cg > 1): the
// output passes of the forward and the backward's dx take the run as one block with per-element
// coefficients (element i of channel i / S), as channels-last blocks do, instead of a call per
// channel, whose fixed cost (and scalar tail) at S = 16 (4x4 positions) exceeded the work on its
// elements (forward 8x256x4x4: 83 -> 67 us, 2x2: 101 -> 74, 1x1: 90 -> 65; 8x8: unchanged). Not the
// JVP: its per-element loop with four coefficient arrays was slower than a call per channel
// (8x256x8x8: 256 vs 179 us, 4x4: 133 vs 115).
inline bool short_run(const Geo& g, const Task& t) {
  return !g.cl && g.Cg > 1 && g.Cg * g.S <= g.cap && t.s_lo == 0 && t.s_hi == g.S;
}
// The blocks of a task's output pass: the short run as one block (run), else for_blocks.
template <class F>
void for_out_blocks(const Geo& g, const Task& t, bool run, F&& f) {
  if (run) return f(Blk{t.grp * g.Cg, 0, g.Cg * g.S, 1});
  for_blocks(g, t.grp, t.s_lo, t.s_hi, f);
}
// Per-element coefficients coef(c) of the group's channels c = 0 .. Cg-1: channels-last, expanded
// over a block's rows (element i: channel i % Cg); channels-first (a short run), element i: i / S.
template <class F>
void expand(const Geo& g, float* dst, F&& coef) {
  if (!g.cl) {
    for (int64_t c = 0; c < g.Cg; ++c) std::fill(dst + c * g.S, dst + (c + 1) * g.S, coef(c));
    return;
  }
  for (int64_t c = 0; c < g.Cg; ++c) dst[c] = coef(c);
  replicate(dst, g.Cg, g.rows);
}

// ---------------------------------------------------------------------------------------------
// Forward (A28)
// ---------------------------------------------------------------------------------------------
// buf: kStatBlock floats (Scratch::stats()).
Moments range_moments(const Geo& g, const Ncs& x, const Task& t, float* buf) {
  Moments m{0.f, 0.f, 0.f};
#ifdef SCM_GN_AVX512
  if (half_in_place(g, x.dt) || (contiguous_block(g) && x.dt == at::kFloat && have_avx512())) {
    auto sweep = [&](auto* tag) {
      using T = SCM_ELEM_T(tag);
      for_stat_blocks(g, t.grp, t.s_lo, t.s_hi, kStatBlock,
                      [&](const Blk& b) { m = merge(m, block_moments_avx512(in_blk<T>(g, &x, t.n, b), b.len)); });
    };
    if (x.dt == at::kFloat) {
      sweep(static_cast<float*>(nullptr));
    } else {
      with_half(x.dt, sweep);
    }
    return m;
  }
#endif
#ifdef SCM_GN_AVX2
  if (half_in_place_avx2(g, x.dt)) {
    with_half(x.dt, [&](auto* tag) {
      using T = SCM_ELEM_T(tag);
      for_stat_blocks(g, t.grp, t.s_lo, t.s_hi, kStatBlock,
                      [&](const Blk& b) { m = merge(m, block_moments_avx2(in_blk<T>(g, &x, t.n, b), b.len)); });
    });
    return m;
  }
#endif
  for_stat_blocks(g, t.grp, t.s_lo, t.s_hi, kStatBlock,
                  [&](const Blk& b) { m = merge(m, block_moments(load(g, x, t.n, b, buf), b.len)); });
  return m;
}

struct Affine {
  ChanVec w, b, s, sh;
  float A(int64_t n, int64_t c) const { return w.at(0, c) * s.at(n, c); }           // gamma s
  float B(int64_t n, int64_t c) const { return b.at(0, c) * s.at(n, c) + sh.at(n, c); }  // beta s + b
};

void fwd_apply(const Geo& g, const Ncs& x, const Ncs& y, const Affine& af, const Task& t, float mu, float r,
               bool silu, Scratch& sc) {
  float* xb = sc.at(0, g.cap);
  float* yb = sc.at(1, g.cap);
  float* Av = sc.at(2, g.cap);
  float* Bv = sc.at(3, g.cap);
  const int64_t c0 = t.grp * g.Cg;
  const bool run = short_run(g, t), vec = g.cl || run;  // vec: per-element coefficients
  if (vec) {
    expand(g, Av, [&](int64_t c) { return af.A(t.n, c0 + c) * r; });
    expand(g, Bv, [&](int64_t c) { return af.B(t.n, c0 + c); });
  }
  for_out_blocks(g, t, run, [&](const Blk& b) {
#ifdef SCM_GN_AVX512
    if (silu && half_in_place(g, x.dt)) {
      return with_half(x.dt, [&](auto* tag) {
        using T = SCM_ELEM_T(tag);
        const T* xh = in_blk<T>(g, &x, t.n, b);
        T* yh = out_blk<T>(g, y, t.n, b);
        if (vec) return silu_fwd_avx512<true, false>(xh, b.len, mu, nullptr, Av, Bv, 0.f, 0.f, yh);
        silu_fwd_avx512<false, false>(xh, b.len, mu, nullptr, nullptr, nullptr, af.A(t.n, b.c) * r, af.B(t.n, b.c), yh);
      });
    }
#endif
#ifdef SCM_GN_AVX2
    if (silu && half_in_place_avx2(g, x.dt)) {
      return with_half(x.dt, [&](auto* tag) {
        using T = SCM_ELEM_T(tag);
        const T* xh = in_blk<T>(g, &x, t.n, b);
        T* yh = out_blk<T>(g, y, t.n, b);
        if (vec) return silu_fwd_avx2<true, false>(xh, b.len, mu, nullptr, Av, Bv, 0.f, 0.f, yh);
        silu_fwd_avx2<false, false>(xh, b.len, mu, nullptr, nullptr, nullptr, af.A(t.n, b.c) * r, af.B(t.n, b.c), yh);
      });
    }
#endif
    const float* xv = load(g, x, t.n, b, xb);
    float* out = out_ptr(g, y, t.n, b, yb);
    if (vec) {
      fwd_block<true>(xv, b.len, mu, Av, Bv, 0.f, 0.f, silu, out);
    } else {
      fwd_block<false>(xv, b.len, mu, nullptr, nullptr, af.A(t.n, b.c) * r, af.B(t.n, b.c), silu, out);
    }
    store(g, y, t.n, b, out);
  });
}

// Channels-last forward with several groups: tasks (sample, chunk of positions), each a contiguous
// run of whole rows of C channels, so that every load is a full row (the per-group block path would
// gather Cg channels per position). Stats: per chunk and group, exact two-pass moments (mean from
// per-channel sums relative to the chunk's first row, then sum (x - mean)^2), merged over the chunks
// in order with Chan's formula; output pass over the same chunks. The chunking depends on the shape
// only: results are bitwise reproducible for any number of threads.
constexpr int64_t kClChunk = 16384;  // elements per chunk (rounded to whole rows)

// The chunks of the channels-last paths: P whole positions (rows of C channels) per chunk, nch chunks
// per sample; task t = (sample t / nch, chunk t % nch).
struct ClChunks {
  int64_t C, S, P, nch;
  explicit ClChunks(const Geo& g)
      : C(g.C), S(g.S), P(std::max<int64_t>(1, std::min(g.S, kClChunk / g.C))), nch((g.S + P - 1) / P) {}
  int64_t n(int64_t t) const { return t / nch; }
  int64_t s0(int64_t t) const { return (t % nch) * P; }
  int64_t rows(int64_t t) const { return std::min(P, S - s0(t)); }
  int64_t offset(const Ncs& o, int64_t t) const { return (n(t) * o.sn + s0(t) * C) * o.es; }
  // fp32 rows of chunk t of operand o: in place when fp32, else converted into buf (P C floats)
  const float* load(const Ncs& o, int64_t t, std::vector<float>& buf) const {
    const char* raw = o.base + offset(o, t);
    if (o.dt == at::kFloat) return reinterpret_cast<const float*>(raw);
    buf.resize(P * C);
    load_f32(raw, o.dt, rows(t) * C, buf.data());
    return buf.data();
  }
  // where chunk t's fp32 results go: the output itself when fp32, else buf (then store())
  float* out(const Ncs& o, int64_t t, std::vector<float>& buf) const {
    if (o.dt == at::kFloat) return reinterpret_cast<float*>(o.mbase + offset(o, t));
    buf.resize(P * C);
    return buf.data();
  }
  void store(const Ncs& o, int64_t t, const float* vals) const {
    if (o.dt != at::kFloat) store_f32(vals, rows(t) * C, o.dt, o.mbase + offset(o, t));
  }
};

// Super-rows: the row kernels (cl_*_rows) loop over rows, and within a row over its C channels with
// per-channel coefficients and accumulators. With few channels (U-Net widths of 24-96) that inner loop
// is a vector or two plus a masked tail. So R consecutive rows are handed to them as one row of R C
// "channels", with every per-channel vector replicated R times (and accumulators folded back over
// the R copies afterwards): inner loops of about kClRowElems elements whatever C is. The grouping
// depends on the shape only (results stay bitwise reproducible for any number of threads).
// fp32 8x256x32x32 is unaffected (C = 256: R = 1); a (64, 24, 32, 32) channels-last forward with
// SiLU took 2.2 ms per call before (2 threads, profiled in a training step).
constexpr int64_t kClRowElems = 256;

inline int64_t cl_rep(int64_t C) { return std::max<int64_t>(1, kClRowElems / C); }

// v[c] = sum_j v[j C + c] (in j order): the R copies of an accumulator folded into the first.
inline void fold_copies(float* v, int64_t C, int64_t R) {
  for (int64_t j = 1; j < R; ++j)
    for (int64_t c = 0; c < C; ++c) v[c] += v[j * C + c];
}

// f(first row, rows, width) over the rows of a chunk: whole super-rows of R rows (width R C), then the
// remaining rows (width C, which reads the first copy of every replicated vector).
template <class F>
void cl_super_rows(int64_t rows, int64_t C, int64_t R, F&& f) {
  const int64_t full = rows / R;
  if (full > 0) f(int64_t{0}, full, R * C);
  if (rows % R != 0) f(full * R, rows % R, C);
}

void group_norm_cl_forward(const Geo& g, const Ncs& xo, const Ncs& yo, const Affine& af, float eps, bool silu,
                           float* mp, float* rp) {
  const int64_t C = g.C, G = g.G, Cg = g.Cg, R = cl_rep(C), RC = R * C;
  const ClChunks ch(g);
  std::vector<Moments> part(g.N * ch.nch * G);
  at::parallel_for(0, g.N * ch.nch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf, acc(RC), piv(RC), muc(RC);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t np = ch.rows(t);
      const float* x = ch.load(xo, t, buf);
      std::copy(x, x + C, piv.begin());
      replicate(piv.data(), C, R);
      std::fill(acc.begin(), acc.end(), 0.f);
      cl_super_rows(np, C, R, [&](int64_t s0, int64_t n, int64_t w) {
        cl_sum_rows(x + s0 * C, n, w, piv.data(), acc.data());
      });
      fold_copies(acc.data(), C, R);
      const float cnt = static_cast<float>(np * Cg);
      for (int64_t grp = 0; grp < G; ++grp) {
        // sum over the group of (x - q), q = the pivot of its first channel: np (p_c - q) + acc_c per
        // channel (p_c - q is exact for nearby values), then mean = q + sum / (np Cg): one rounding
        // of the large part, as in block_moments.
        const float q = piv[grp * Cg];
        float sum = 0.f;
        for (int64_t c = grp * Cg; c < (grp + 1) * Cg; ++c) sum += static_cast<float>(np) * (piv[c] - q) + acc[c];
        const float mean = q + sum / cnt;
        for (int64_t c = grp * Cg; c < (grp + 1) * Cg; ++c) muc[c] = mean;
        part[t * G + grp] = Moments{cnt, mean, 0.f};
      }
      replicate(muc.data(), C, R);
      std::fill(acc.begin(), acc.end(), 0.f);
      cl_super_rows(np, C, R, [&](int64_t s0, int64_t n, int64_t w) {
        cl_sq_rows(x + s0 * C, n, w, muc.data(), acc.data());
      });
      fold_copies(acc.data(), C, R);
      for (int64_t grp = 0; grp < G; ++grp) {
        float m2 = 0.f;
        for (int64_t c = grp * Cg; c < (grp + 1) * Cg; ++c) m2 += acc[c];
        part[t * G + grp].m2 = m2;
      }
    }
  });
  const float M = g.M();
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t grp = 0; grp < G; ++grp) {
      Moments m{0.f, 0.f, 0.f};
      for (int64_t k = 0; k < ch.nch; ++k) m = merge(m, part[(n * ch.nch + k) * G + grp]);
      mp[n * G + grp] = m.mean;
      rp[n * G + grp] = group_rstd(m, M, eps);
    }
  at::parallel_for(0, g.N * ch.nch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf, ob, muc(RC), Ac(RC), Bc(RC);
    int64_t coef_n = -1;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = ch.n(t);
      if (n != coef_n) {  // per-channel mu, A = r gamma s, B = beta s + b of sample n
        for (int64_t c = 0; c < C; ++c) {
          const int64_t ng = n * G + c / Cg;
          muc[c] = mp[ng];
          Ac[c] = af.A(n, c) * rp[ng];
          Bc[c] = af.B(n, c);
        }
        for (float* v : {muc.data(), Ac.data(), Bc.data()}) replicate(v, C, R);
        coef_n = n;
      }
      float* out = ch.out(yo, t, ob);
      const float* x = ch.load(xo, t, buf);
      cl_super_rows(ch.rows(t), C, R, [&](int64_t s0, int64_t n_rows, int64_t w) {
        cl_fwd_rows(x + s0 * C, n_rows, w, muc.data(), Ac.data(), Bc.data(), silu, out + s0 * C);
      });
      ch.store(yo, t, out);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t num_groups, double eps,
    bool silu) {
  const Geo g = make_geo(x, num_groups);
  check_chan(weight, g, false, "weight");
  check_chan(bias, g, false, "bias");
  check_chan(scale, g, true, "scale");
  check_chan(shift, g, true, "shift");
  at::Tensor y = empty_like_layout(x, g);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({g.N, g.G}, f32), rstd = at::empty({g.N, g.G}, f32);
  float* mp = mean.mutable_data_ptr<float>();
  float* rp = rstd.mutable_data_ptr<float>();
  const Ncs xo = operand(x), yo = output(y);
  const Affine af{chan_vec(weight, 1.f, false), chan_vec(bias, 0.f, false), chan_vec(scale, 1.f, true),
                  chan_vec(shift, 0.f, true)};
  const float M = g.M(), e = static_cast<float>(eps);
  if (g.cl && g.G > 1) {
    group_norm_cl_forward(g, xo, yo, af, e, silu, mp, rp);
    return {y, mean, rstd};
  }
  if (g.nsplit == 1) {
    at::parallel_for(0, g.tasks(), 1, [&](int64_t begin, int64_t end) {
      Scratch sc(4 * g.cap);
      for (int64_t i = begin; i < end; ++i) {
        const Task t = task_of(g, i);
        const Moments m = range_moments(g, xo, t, sc.stats());
        const float r = group_rstd(m, M, e);
        mp[i] = m.mean;
        rp[i] = r;
        fwd_apply(g, xo, yo, af, t, m.mean, r, silu, sc);
      }
    });
    return {y, mean, rstd};
  }
  // Split groups: partial moments per task, merged per group in split order, then the output pass.
  std::vector<Moments> part(g.tasks());
  at::parallel_for(0, g.tasks(), 1, [&](int64_t begin, int64_t end) {
    Scratch sc(0);
    for (int64_t i = begin; i < end; ++i) part[i] = range_moments(g, xo, task_of(g, i), sc.stats());
  });
  for (int64_t ng = 0; ng < g.N * g.G; ++ng) {
    Moments m{0.f, 0.f, 0.f};
    for (int64_t k = 0; k < g.nsplit; ++k) m = merge(m, part[ng * g.nsplit + k]);
    mp[ng] = m.mean;
    rp[ng] = group_rstd(m, M, e);
  }
  at::parallel_for(0, g.tasks(), 1, [&](int64_t begin, int64_t end) {
    Scratch sc(4 * g.cap);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t ng = i / g.nsplit;
      fwd_apply(g, xo, yo, af, task_of(g, i), mp[ng], rp[ng], silu, sc);
    }
  });
  return {y, mean, rstd};
}

// ---------------------------------------------------------------------------------------------
// JVP (A29)
// ---------------------------------------------------------------------------------------------
// (sum x_dot, sum (x - mu) x_dot) over a task's positions.
std::pair<float, float> jvp_sums(const Geo& g, const Ncs& x, const Ncs& xd, const Task& t, float mu, Scratch& sc) {
  float s_d = 0.f, s_xd = 0.f;
#ifdef SCM_GN_AVX512
  if (half_in_place(g, x.dt)) {
    with_half(x.dt, [&](auto* tag) {
      using T = SCM_ELEM_T(tag);
      for_stat_blocks(g, t.grp, t.s_lo, t.s_hi, kStatBlock, [&](const Blk& b) {
        jvp_sums_avx512(in_blk<T>(g, &x, t.n, b), in_blk<T>(g, &xd, t.n, b), b.len, mu, s_d, s_xd);
      });
    });
    return {s_d, s_xd};
  }
#endif
  for_stat_blocks(g, t.grp, t.s_lo, t.s_hi, kStatBlock, [&](const Blk& b) {
    jvp_sums_block(load(g, x, t.n, b, sc.stats()), load(g, xd, t.n, b, sc.stats() + kStatBlock), b.len, mu, s_d,
                   s_xd);
  });
  return {s_d, s_xd};
}

struct Tangents {
  ChanVec w, b, s, sh;
};

void jvp_apply(const Geo& g, const Ncs& x, const Ncs* xd, const Ncs& yd, const Affine& af, const Tangents& tg,
               const Task& t, float mu, float r, float m1, float m2, bool silu, Scratch& sc) {
  float* xb = sc.at(0, g.cap);
  float* xdb = sc.at(1, g.cap);
  float* yb = sc.at(2, g.cap);
  float* Av = sc.at(3, g.cap);
  float* Bv = sc.at(4, g.cap);
  float* Adv = sc.at(5, g.cap);
  float* Bdv = sc.at(6, g.cap);
  const int64_t c0 = t.grp * g.Cg, n = t.n;
  auto coef = [&](int64_t c) {
    const float gam = af.w.at(0, c), bet = af.b.at(0, c), s = af.s.at(n, c), sd = tg.s.at(n, c);
    return JvpCoef{gam * s, bet * s + af.sh.at(n, c), tg.w.at(0, c) * s + gam * sd,
                   tg.b.at(0, c) * s + bet * sd + tg.sh.at(n, c)};
  };
  if (g.cl) {
    expand(g, Av, [&](int64_t c) { return coef(c0 + c).A; });
    expand(g, Bv, [&](int64_t c) { return coef(c0 + c).B; });
    expand(g, Adv, [&](int64_t c) { return coef(c0 + c).Ad; });
    expand(g, Bdv, [&](int64_t c) { return coef(c0 + c).Bd; });
  }
  for_blocks(g, t.grp, t.s_lo, t.s_hi, [&](const Blk& b) {
#ifdef SCM_GN_AVX512
    if (half_in_place(g, x.dt)) {
      const JvpCoef kc = g.cl ? JvpCoef{} : coef(b.c);
      const JvpScal k{mu, r, m1, m2, kc.A, kc.B, kc.Ad, kc.Bd};
      const JvpArr v{nullptr, nullptr, nullptr, nullptr, Av, Bv, Adv, Bdv};
      return with_half(x.dt, [&](auto* tag) {
        using T = SCM_ELEM_T(tag);
        const T* xp = in_blk<T>(g, &x, n, b);
        const T* xdp = in_blk<T>(g, xd, n, b);
        T* out = out_blk<T>(g, yd, n, b);
        if (g.cl) return jvp_avx512_any<true, false>(xp, xdp, b.len, k, v, silu, out);
        jvp_avx512_any<false, false>(xp, xdp, b.len, k, v, silu, out);
      });
    }
#endif
    const float* xv = load(g, x, n, b, xb);
    const float* xdv = xd != nullptr ? load(g, *xd, n, b, xdb) : nullptr;
    float* out = out_ptr(g, yd, n, b, yb);
    if (g.cl) {
      jvp_block<true>(xv, xdv, b.len, mu, r, m1, m2, Av, Bv, Adv, Bdv, JvpCoef{}, silu, out);
    } else {
      jvp_block<false>(xv, xdv, b.len, mu, r, m1, m2, nullptr, nullptr, nullptr, nullptr, coef(b.c), silu, out);
    }
    store(g, yd, n, b, out);
  });
}

// Channels-last JVP with several groups: the chunks of group_norm_cl_forward. Pass 1 (when x has a
// tangent): per chunk and group, sum x_dot and sum (x - mu) x_dot, added over the chunks in order;
// pass 2: y_dot rows.
void group_norm_cl_jvp(const Geo& g, const Ncs& xo, const Ncs* xdp, const Ncs& ydo, const Affine& af,
                       const Tangents& tg, const float* mp, const float* rp, bool silu) {
  const int64_t C = g.C, G = g.G, Cg = g.Cg, R = cl_rep(C), RC = R * C;
  const ClChunks ch(g);
  const float M = g.M();
  std::vector<float> m1(g.N * G, 0.f), m2(g.N * G, 0.f);
  if (xdp != nullptr) {
    std::vector<float> part(g.N * ch.nch * G * 2);
    at::parallel_for(0, g.N * ch.nch, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> bx, bxd, muc(RC), a1(RC), a2(RC);
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t c = 0; c < C; ++c) muc[c] = mp[ch.n(t) * G + c / Cg];
        replicate(muc.data(), C, R);
        std::fill(a1.begin(), a1.end(), 0.f);
        std::fill(a2.begin(), a2.end(), 0.f);
        const float* x = ch.load(xo, t, bx);
        const float* xd = ch.load(*xdp, t, bxd);
        cl_super_rows(ch.rows(t), C, R, [&](int64_t s0, int64_t n, int64_t w) {
          cl_jvp_sums_rows(x + s0 * C, xd + s0 * C, n, w, muc.data(), a1.data(), a2.data());
        });
        fold_copies(a1.data(), C, R);
        fold_copies(a2.data(), C, R);
        for (int64_t grp = 0; grp < G; ++grp) {
          float s1 = 0.f, s2 = 0.f;
          for (int64_t c = grp * Cg; c < (grp + 1) * Cg; ++c) s1 += a1[c], s2 += a2[c];
          part[(t * G + grp) * 2] = s1;
          part[(t * G + grp) * 2 + 1] = s2;
        }
      }
    });
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t grp = 0; grp < G; ++grp) {
        float s1 = 0.f, s2 = 0.f;
        for (int64_t k = 0; k < ch.nch; ++k) {
          s1 += part[((n * ch.nch + k) * G + grp) * 2];
          s2 += part[((n * ch.nch + k) * G + grp) * 2 + 1];
        }
        m1[n * G + grp] = s1 / M;
        m2[n * G + grp] = rp[n * G + grp] * s2 / M;
      }
  }
  at::parallel_for(0, g.N * ch.nch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> bx, bxd, ob, coef(8 * RC);
    float* v = coef.data();
    const ClJvpCoef k{v, v + RC, v + 2 * RC, v + 3 * RC, v + 4 * RC, v + 5 * RC, v + 6 * RC, v + 7 * RC};
    int64_t coef_n = -1;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = ch.n(t);
      if (n != coef_n) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t ng = n * G + c / Cg;
          const float gam = af.w.at(0, c), bet = af.b.at(0, c), sc = af.s.at(n, c), sd = tg.s.at(n, c);
          v[c] = mp[ng];
          v[RC + c] = rp[ng];
          v[2 * RC + c] = m1[ng];
          v[3 * RC + c] = m2[ng];
          v[4 * RC + c] = gam * sc;
          v[5 * RC + c] = bet * sc + af.sh.at(n, c);
          v[6 * RC + c] = tg.w.at(0, c) * sc + gam * sd;
          v[7 * RC + c] = tg.b.at(0, c) * sc + bet * sd + tg.sh.at(n, c);
        }
        for (int j = 0; j < 8; ++j) replicate(v + j * RC, C, R);
        coef_n = n;
      }
      float* out = ch.out(ydo, t, ob);
      const float* x = ch.load(xo, t, bx);
      const float* xd = xdp != nullptr ? ch.load(*xdp, t, bxd) : nullptr;
      cl_super_rows(ch.rows(t), C, R, [&](int64_t s0, int64_t n_rows, int64_t w) {
        cl_jvp_rows(x + s0 * C, xd != nullptr ? xd + s0 * C : nullptr, n_rows, w, k, silu, out + s0 * C);
      });
      ch.store(ydo, t, out);
    }
  });
}

at::Tensor group_norm_jvp_cpu(const at::Tensor& x, const std::optional<at::Tensor>& x_dot,
                              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                              const std::optional<at::Tensor>& weight_dot, const std::optional<at::Tensor>& bias_dot,
                              const std::optional<at::Tensor>& scale_dot, const std::optional<at::Tensor>& shift_dot,
                              const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups, bool silu) {
  Geo g = make_geo(x, num_groups);
  if (x_dot.has_value()) check_like(*x_dot, x, g, "x_dot");
  check_chan(weight, g, false, "weight");
  check_chan(bias, g, false, "bias");
  check_chan(scale, g, true, "scale");
  check_chan(shift, g, true, "shift");
  check_chan(weight_dot, g, false, "weight_dot");
  check_chan(bias_dot, g, false, "bias_dot");
  check_chan(scale_dot, g, true, "scale_dot");
  check_chan(shift_dot, g, true, "shift_dot");
  check_stats(mean, g, "mean");
  check_stats(rstd, g, "rstd");
  if (!x_dot.has_value()) {  // nothing to reduce: one pass per group
    g.nsplit = 1;
    g.s_split = g.S;
  }
  at::Tensor yd = empty_like_layout(x, g);
  const Ncs xo = operand(x), ydo = output(yd);
  const Ncs xdo = x_dot.has_value() ? operand(*x_dot) : Ncs{};
  const Ncs* xdp = x_dot.has_value() ? &xdo : nullptr;
  const Affine af{chan_vec(weight, 1.f, false), chan_vec(bias, 0.f, false), chan_vec(scale, 1.f, true),
                  chan_vec(shift, 0.f, true)};
  const Tangents tg{chan_vec(weight_dot, 0.f, false), chan_vec(bias_dot, 0.f, false), chan_vec(scale_dot, 0.f, true),
                    chan_vec(shift_dot, 0.f, true)};
  const float* mp = mean.const_data_ptr<float>();
  const float* rp = rstd.const_data_ptr<float>();
  if (g.cl && g.G > 1) {
    group_norm_cl_jvp(g, xo, xdp, ydo, af, tg, mp, rp, silu);
    return yd;
  }
  const float M = g.M();
  std::vector<std::pair<float, float>> part;
  if (g.nsplit > 1) {
    part.resize(g.tasks());
    at::parallel_for(0, g.tasks(), 1, [&](int64_t begin, int64_t end) {
      Scratch sc(0);  // jvp_sums converts into sc.stats() only
      for (int64_t i = begin; i < end; ++i) part[i] = jvp_sums(g, xo, xdo, task_of(g, i), mp[i / g.nsplit], sc);
    });
  }
  at::parallel_for(0, g.tasks(), 1, [&](int64_t begin, int64_t end) {
    Scratch sc(7 * g.cap);
    for (int64_t i = begin; i < end; ++i) {
      const Task t = task_of(g, i);
      const int64_t ng = i / g.nsplit;
      const float mu = mp[ng], r = rp[ng];
      float s_d = 0.f, s_xd = 0.f;
      if (g.nsplit > 1) {
        for (int64_t k = 0; k < g.nsplit; ++k) {
          s_d += part[ng * g.nsplit + k].first;
          s_xd += part[ng * g.nsplit + k].second;
        }
      } else if (xdp != nullptr) {
        std::tie(s_d, s_xd) = jvp_sums(g, xo, xdo, t, mu, sc);
      }
      jvp_apply(g, xo, xdp, ydo, af, tg, t, mu, r, s_d / M, r * s_xd / M, silu, sc);
    }
  });
  return yd;
}

// ---------------------------------------------------------------------------------------------
// Backward (A30)
// ---------------------------------------------------------------------------------------------
// Per-channel sums P1 = sum da x^, P2 = sum da over a task's positions, written to p1[c * pstride],
// p2[c * pstride] for the group's channels c = 0 .. Cg-1.
// da of every element goes to cache (in block order) when given, else to a scratch block.
void bwd_sums(const Geo& g, const Ncs& x, const Ncs& dy, const Affine& af, const Task& t, float mu, float r,
              bool silu, float* p1, float* p2, int64_t pstride, Scratch& sc, float* cache) {
  float* xb = sc.at(0, g.cap);
  float* db = sc.at(1, g.cap);
  float* dab = sc.at(6, g.cap);
  const int64_t c0 = t.grp * g.Cg, n = t.n;
  int64_t pos = 0;  // offset of the block in the cache
  if (!g.cl) {
    for (int64_t c = 0; c < g.Cg; ++c) {
      p1[c * pstride] = 0.f;
      p2[c * pstride] = 0.f;
    }
#ifdef SCM_GN_AVX512
    if (half_in_place(g, x.dt)) {
      with_half(x.dt, [&](auto* tag) {
        using T = SCM_ELEM_T(tag);
        for_blocks(g, t.grp, t.s_lo, t.s_hi, [&](const Blk& b) {
          const int64_t cl = b.c - c0;
          const T* xp = in_blk<T>(g, &x, n, b);
          const T* dp = in_blk<T>(g, &dy, n, b);
          float* da = cache != nullptr ? cache + pos : dab;
          float &q1 = p1[cl * pstride], &q2 = p2[cl * pstride];
          const float A = af.A(n, b.c), B = af.B(n, b.c);
          silu ? bwd_sums_avx512<true>(xp, dp, b.len, mu, r, A, B, q1, q2, da)
               : bwd_sums_avx512<false>(xp, dp, b.len, mu, r, A, B, q1, q2, da);
          pos += b.len;
        });
      });
      return;
    }
#endif
    for_blocks(g, t.grp, t.s_lo, t.s_hi, [&](const Blk& b) {
      const int64_t cl = b.c - c0;
      bwd_sums_block(load(g, x, n, b, xb), load(g, dy, n, b, db), b.len, mu, r, af.A(n, b.c), af.B(n, b.c), silu,
                     p1[cl * pstride], p2[cl * pstride], cache != nullptr ? cache + pos : dab);
      pos += b.len;
    });
    return;
  }
  float* Av = sc.at(2, g.cap);
  float* Bv = sc.at(3, g.cap);
  float* acc1 = sc.at(4, g.cap);
  float* acc2 = sc.at(5, g.cap);
  expand(g, Av, [&](int64_t c) { return af.A(n, c0 + c); });
  expand(g, Bv, [&](int64_t c) { return af.B(n, c0 + c); });
  std::fill(acc1, acc1 + g.cap, 0.f);
  std::fill(acc2, acc2 + g.cap, 0.f);
  for_blocks(g, t.grp, t.s_lo, t.s_hi, [&](const Blk& b) {
    bwd_acc_block(load(g, x, n, b, xb), load(g, dy, n, b, db), b.len, mu, r, Av, Bv, silu, acc1, acc2,
                  cache != nullptr ? cache + pos : dab);
    pos += b.len;
  });
  for (int64_t c = 0; c < g.Cg; ++c) {
    float s1 = 0.f, s2 = 0.f;
    for (int64_t j = 0; j < g.rows; ++j) {
      s1 += acc1[j * g.Cg + c];
      s2 += acc2[j * g.Cg + c];
    }
    p1[c * pstride] = s1;
    p2[c * pstride] = s2;
  }
}

// dx of a task's positions; da from cache (filled by bwd_sums) when given, else recomputed from dy.
void dx_apply(const Geo& g, const Ncs& x, const Ncs& dy, const Ncs& dx, const Affine& af, const Task& t, float mu,
              float r, float m1, float m2, bool silu, Scratch& sc, const float* cache) {
  float* xb = sc.at(0, g.cap);
  float* db = sc.at(1, g.cap);
  float* ob = sc.at(2, g.cap);
  float* Av = sc.at(3, g.cap);
  float* Bv = sc.at(4, g.cap);
  const int64_t c0 = t.grp * g.Cg, n = t.n;
  const bool run = short_run(g, t), vec = g.cl || run;  // vec: per-element coefficients
  if (vec) {
    expand(g, Av, [&](int64_t c) { return af.A(n, c0 + c); });
    expand(g, Bv, [&](int64_t c) { return af.B(n, c0 + c); });
  }
  int64_t pos = 0;
  for_out_blocks(g, t, run, [&](const Blk& b) {
#ifdef SCM_GN_AVX512
    if (half_in_place(g, x.dt)) {
      with_half(x.dt, [&](auto* tag) {
        using T = SCM_ELEM_T(tag);
        const T* xp = in_blk<T>(g, &x, n, b);
        const T* dp = cache != nullptr ? nullptr : in_blk<T>(g, &dy, n, b);
        const float* da = cache != nullptr ? cache + pos : nullptr;
        T* out = out_blk<T>(g, dx, n, b);
        if (vec) return dx_avx512_any<true>(xp, dp, da, b.len, mu, r, m1, m2, Av, Bv, 0.f, 0.f, silu, out);
        dx_avx512_any<false>(xp, dp, da, b.len, mu, r, m1, m2, nullptr, nullptr, af.A(n, b.c), af.B(n, b.c), silu, out);
      });
      pos += b.len;
      return;
    }
#endif
    const float* xv = load(g, x, n, b, xb);
    float* out = out_ptr(g, dx, n, b, ob);
    if (cache != nullptr) {
      if (vec) {
        dx_cached_block<true>(xv, cache + pos, b.len, mu, r, m1, m2, Av, 0.f, out);
      } else {
        dx_cached_block<false>(xv, cache + pos, b.len, mu, r, m1, m2, nullptr, af.A(n, b.c), out);
      }
    } else {
      const float* dv = load(g, dy, n, b, db);
      if (vec) {
        dx_block<true>(xv, dv, b.len, mu, r, m1, m2, Av, Bv, 0.f, 0.f, silu, out);
      } else {
        dx_block<false>(xv, dv, b.len, mu, r, m1, m2, nullptr, nullptr, af.A(n, b.c), af.B(n, b.c), silu, out);
      }
    }
    store(g, dx, n, b, out);
    pos += b.len;
  });
}

// Channels-last backward with several groups, on the chunks of group_norm_cl_forward: pass 1 per-
// channel sums P1, P2 per chunk, added over the chunks in order; group means m1, m2 from them (A30);
// pass 2 dx rows (da recomputed).
void group_norm_cl_backward(const Geo& g, const Ncs& xo, const Ncs& dyo, const Ncs& dxo, const Affine& af,
                            const float* mp, const float* rp, bool silu, float* p1p, float* p2p) {
  const int64_t C = g.C, G = g.G, Cg = g.Cg, R = cl_rep(C), RC = R * C;
  const ClChunks ch(g);
  const float M = g.M();
  // per-channel mu, r, A, B of sample n into v (4 vectors of R C floats, each replicated R times)
  auto coefs = [&](int64_t n, float* v) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t ng = n * G + c / Cg;
      v[c] = mp[ng];
      v[RC + c] = rp[ng];
      v[2 * RC + c] = af.A(n, c);
      v[3 * RC + c] = af.B(n, c);
    }
    for (int j = 0; j < 4; ++j) replicate(v + j * RC, C, R);
  };
  std::vector<float> q(g.N * ch.nch * C * 2);
  at::parallel_for(0, g.N * ch.nch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> bx, bdy, v(4 * RC), acc(2 * RC);
    int64_t coef_n = -1;
    for (int64_t t = begin; t < end; ++t) {
      if (ch.n(t) != coef_n) coefs(ch.n(t), v.data()), coef_n = ch.n(t);
      std::fill(acc.begin(), acc.end(), 0.f);
      const float* x = ch.load(xo, t, bx);
      const float* dy = ch.load(dyo, t, bdy);
      cl_super_rows(ch.rows(t), C, R, [&](int64_t s0, int64_t n, int64_t w) {
        cl_bwd_sums_rows(x + s0 * C, dy + s0 * C, n, w, v.data(), v.data() + RC, v.data() + 2 * RC,
                         v.data() + 3 * RC, silu, acc.data(), acc.data() + RC);
      });
      fold_copies(acc.data(), C, R);
      fold_copies(acc.data() + RC, C, R);
      float* q1 = q.data() + t * 2 * C;
      std::copy(acc.data(), acc.data() + C, q1);
      std::copy(acc.data() + RC, acc.data() + RC + C, q1 + C);
    }
  });
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      float s1 = 0.f, s2 = 0.f;
      for (int64_t k = 0; k < ch.nch; ++k) {
        s1 += q[(n * ch.nch + k) * 2 * C + c];
        s2 += q[(n * ch.nch + k) * 2 * C + C + c];
      }
      p1p[n * C + c] = s1;
      p2p[n * C + c] = s2;
    }
  // m1_g = sum_c A P2 / M, m2_g = sum_c A P1 / M over the group's channels, in order
  std::vector<float> m1(g.N * G), m2(g.N * G);
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t grp = 0; grp < G; ++grp) {
      float s1 = 0.f, s2 = 0.f;
      for (int64_t c = grp * Cg; c < (grp + 1) * Cg; ++c) {
        const float A = af.A(n, c);
        s1 += A * p2p[n * C + c];
        s2 += A * p1p[n * C + c];
      }
      m1[n * G + grp] = s1 / M;
      m2[n * G + grp] = s2 / M;
    }
  at::parallel_for(0, g.N * ch.nch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> bx, bdy, ob, v(6 * RC);
    int64_t coef_n = -1;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = ch.n(t);
      if (n != coef_n) {
        coefs(n, v.data());
        for (int64_t c = 0; c < C; ++c) v[4 * RC + c] = m1[n * G + c / Cg], v[5 * RC + c] = m2[n * G + c / Cg];
        replicate(v.data() + 4 * RC, C, R);
        replicate(v.data() + 5 * RC, C, R);
        coef_n = n;
      }
      float* out = ch.out(dxo, t, ob);
      const float* x = ch.load(xo, t, bx);
      const float* dy = ch.load(dyo, t, bdy);
      cl_super_rows(ch.rows(t), C, R, [&](int64_t s0, int64_t n_rows, int64_t w) {
        cl_dx_rows(x + s0 * C, dy + s0 * C, n_rows, w, v.data(), v.data() + RC, v.data() + 2 * RC, v.data() + 3 * RC,
                   v.data() + 4 * RC, v.data() + 5 * RC, silu, out + s0 * C);
      });
      ch.store(dxo, t, out);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    bool silu) {
  const Geo g = make_geo(x, num_groups);
  check_like(grad_y, x, g, "grad_y");
  check_chan(weight, g, false, "weight");
  check_chan(bias, g, false, "bias");
  check_chan(scale, g, true, "scale");
  check_chan(shift, g, true, "shift");
  check_stats(mean, g, "mean");
  check_stats(rstd, g, "rstd");
  at::Tensor dx = empty_like_layout(x, g);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor p1 = at::empty({g.N, g.C}, f32), p2 = at::empty({g.N, g.C}, f32);
  float* p1p = p1.mutable_data_ptr<float>();
  float* p2p = p2.mutable_data_ptr<float>();
  const Ncs xo = operand(x), dyo = operand(grad_y), dxo = output(dx);
  const Affine af{chan_vec(weight, 1.f, false), chan_vec(bias, 0.f, false), chan_vec(scale, 1.f, true),
                  chan_vec(shift, 0.f, true)};
  const float* mp = mean.const_data_ptr<float>();
  const float* rp = rstd.const_data_ptr<float>();
  if (g.cl && g.G > 1) {
    group_norm_cl_backward(g, xo, dyo, dxo, af, mp, rp, silu, p1p, p2p);
    return {dx, p1, p2};
  }
  const float M = g.M();
  // Group means of dx^ and dx^ x^ from the per-channel sums (A30), channels in order.
  auto group_means = [&](int64_t n, int64_t grp) {
    float s1 = 0.f, s2 = 0.f;
    for (int64_t c = grp * g.Cg; c < (grp + 1) * g.Cg; ++c) {
      const float A = af.A(n, c);
      s1 += A * p2p[n * g.C + c];
      s2 += A * p1p[n * g.C + c];
    }
    return std::make_pair(s1 / M, s2 / M);
  };
  if (g.nsplit == 1) {
    // da of a whole group is kept (<= kDaCache elements) for the dx pass
    const int64_t M_el = g.Cg * g.S;
    const bool cache = M_el <= kDaCache;
    at::parallel_for(0, g.tasks(), 1, [&](int64_t begin, int64_t end) {
      Scratch sc(7 * g.cap);
      std::vector<float> da(cache ? M_el : 0);
      for (int64_t i = begin; i < end; ++i) {
        const Task t = task_of(g, i);
        const int64_t off = t.n * g.C + t.grp * g.Cg;
        bwd_sums(g, xo, dyo, af, t, mp[i], rp[i], silu, p1p + off, p2p + off, 1, sc, cache ? da.data() : nullptr);
        const auto [m1, m2] = group_means(t.n, t.grp);
        dx_apply(g, xo, dyo, dxo, af, t, mp[i], rp[i], m1, m2, silu, sc, cache ? da.data() : nullptr);
      }
    });
    return {dx, p1, p2};
  }
  // Split groups: per-split channel sums (N, C, nsplit), added in split order.
  std::vector<float> q1(g.N * g.C * g.nsplit), q2(g.N * g.C * g.nsplit);
  at::parallel_for(0, g.tasks(), 1, [&](int64_t begin, int64_t end) {
    Scratch sc(7 * g.cap);
    for (int64_t i = begin; i < end; ++i) {
      const Task t = task_of(g, i);
      const int64_t off = (t.n * g.C + t.grp * g.Cg) * g.nsplit + t.k;
      const int64_t ng = i / g.nsplit;
      bwd_sums(g, xo, dyo, af, t, mp[ng], rp[ng], silu, q1.data() + off, q2.data() + off, g.nsplit, sc, nullptr);
    }
  });
  for (int64_t nc = 0; nc < g.N * g.C; ++nc) {
    float s1 = 0.f, s2 = 0.f;
    for (int64_t k = 0; k < g.nsplit; ++k) {
      s1 += q1[nc * g.nsplit + k];
      s2 += q2[nc * g.nsplit + k];
    }
    p1p[nc] = s1;
    p2p[nc] = s2;
  }
  std::vector<std::pair<float, float>> gm(g.N * g.G);
  for (int64_t ng = 0; ng < g.N * g.G; ++ng) gm[ng] = group_means(ng / g.G, ng % g.G);
  at::parallel_for(0, g.tasks(), 1, [&](int64_t begin, int64_t end) {
    Scratch sc(5 * g.cap);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t ng = i / g.nsplit;
      dx_apply(g, xo, dyo, dxo, af, task_of(g, i), mp[ng], rp[ng], gm[ng].first, gm[ng].second, silu, sc, nullptr);
    }
  });
  return {dx, p1, p2};
}

// ---------------------------------------------------------------------------------------------
// Pixel norm (A11)
// ---------------------------------------------------------------------------------------------
constexpr int64_t kPnChunk = 256;  // positions per task in the planes layout

// The (O, C, I) view: rows (I == 1, each row of C contiguous, row stride ro) or planes (stride(2) == 1:
// position i of channel c of row o at o * so + c * sc + i).
struct Pn {
  int64_t O, C, I;
  bool rows;
};

Pn pn_geo(const at::Tensor& a) {
  TORCH_CHECK(a.device().is_cpu(), "pixel_norm: a must be a CPU tensor");
  TORCH_CHECK(a.dim() == 3, "pixel_norm: a must be an (O, C, I) view, got shape ", a.sizes());
  check_float(a, "a");
  Pn p{a.size(0), a.size(1), a.size(2), false};
  TORCH_CHECK(p.O > 0 && p.C > 0 && p.I > 0, "pixel_norm: a must not be empty, got ", a.sizes());
  p.rows = p.I == 1 && (p.C == 1 || a.stride(1) == 1);
  TORCH_CHECK(p.rows || p.I == 1 || a.stride(2) == 1, "pixel_norm: a must have stride(2) == 1, or I == 1 and "
              "stride(1) == 1, got strides ", a.strides());
  if (!p.rows) TORCH_CHECK(p.I == 1 || a.stride(2) == 1, "pixel_norm: bad strides ", a.strides());
  return p;
}

void pn_check_like(const at::Tensor& t, const at::Tensor& a, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.sizes() == a.sizes() && t.scalar_type() == a.scalar_type() &&
                  t.strides() == a.strides(),
              "pixel_norm: ", name, " must have a's shape, dtype and strides");
}

at::Tensor pn_empty(const at::Tensor& a, const Pn& p) {
  if (p.rows) return at::empty_strided({p.O, p.C, 1}, {p.C, 1, 1}, a.options());
  return at::empty({p.O, p.C, p.I}, a.options());
}

SCM_GN_CLONES void pn_sumsq_acc(const float* __restrict a, int64_t n, float* __restrict acc) {
  for (int64_t i = 0; i < n; ++i) acc[i] += a[i] * a[i];
}
SCM_GN_CLONES void pn_dot_acc(const float* __restrict a, const float* __restrict b, int64_t n, float* __restrict acc) {
  for (int64_t i = 0; i < n; ++i) acc[i] += a[i] * b[i];
}
SCM_GN_CLONES float pn_sumsq(const float* __restrict a, int64_t n) {
  float acc[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l] * a[i + l];
  for (int l = 0; i < n; ++i, ++l) acc[l] += a[i] * a[i];
  return fold(acc);
}
SCM_GN_CLONES float pn_dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  for (int l = 0; i < n; ++i, ++l) acc[l] += a[i] * b[i];
  return fold(acc);
}
// out = a r (forward) or out = r (t - a k) with k = r^2 dot / C (jvp / backward); kVec: r, k per element.
template <bool kVec>
SCM_GN_CLONES void pn_out(const float* __restrict a, const float* __restrict t, int64_t n, const float* __restrict rv,
                          const float* __restrict kv, float r0, float k0, float* __restrict out) {
  if (t == nullptr) {
    for (int64_t i = 0; i < n; ++i) out[i] = a[i] * (kVec ? rv[i] : r0);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = (kVec ? rv[i] : r0) * (t[i] - a[i] * (kVec ? kv[i] : k0));
  }
}

// One pass structure for the three directions: t == nullptr: forward (writes rstd); else the
// jvp/backward of the tangent/gradient t with the saved rstd.
void pn_run(const at::Tensor& a, const at::Tensor* t, at::Tensor& out, float* rstd, const float* rstd_in, float eps) {
  const Pn p = pn_geo(a);
  const Ncs ao = operand(a), oo = output(out);
  const Ncs to = t != nullptr ? operand(*t) : Ncs{};
  const int64_t sc_a = a.stride(1), sc_t = t != nullptr ? t->stride(1) : 0, sc_o = out.stride(1);
  const float invC = 1.f / static_cast<float>(p.C);
  if (p.rows) {
    at::parallel_for(0, p.O, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(3 * p.C);
      for (int64_t o = begin; o < end; ++o) {
        const float* av = reinterpret_cast<const float*>(ao.base + o * a.stride(0) * ao.es);
        if (ao.dt != at::kFloat) {
          load_f32(ao.base + o * a.stride(0) * ao.es, ao.dt, p.C, buf.data());
          av = buf.data();
        }
        const float* tv = nullptr;
        float r, k = 0.f;
        if (t == nullptr) {
          r = 1.f / std::sqrt(pn_sumsq(av, p.C) * invC + eps);
          rstd[o] = r;
        } else {
          const char* tp = to.base + o * t->stride(0) * to.es;
          load_f32(tp, to.dt, p.C, buf.data() + p.C);
          tv = buf.data() + p.C;
          r = rstd_in[o];
          k = r * r * pn_dot(av, tv, p.C) * invC;
        }
        char* op = oo.mbase + o * out.stride(0) * oo.es;
        float* ov = oo.dt == at::kFloat ? reinterpret_cast<float*>(op) : buf.data() + 2 * p.C;
        pn_out<false>(av, tv, p.C, nullptr, nullptr, r, k, ov);
        if (oo.dt != at::kFloat) store_f32(ov, p.C, oo.dt, op);
      }
    });
    return;
  }
  const int64_t nchunk = (p.I + kPnChunk - 1) / kPnChunk;
  at::parallel_for(0, p.O * nchunk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(6 * kPnChunk);
    float *ab = buf.data(), *tb = ab + kPnChunk, *ob = tb + kPnChunk, *acc = ob + kPnChunk, *rv = acc + kPnChunk,
          *kv = rv + kPnChunk;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o = task / nchunk, i0 = (task % nchunk) * kPnChunk, n = std::min(kPnChunk, p.I - i0);
      auto row = [&](const Ncs& x, int64_t sn, int64_t sc, int64_t c, float* b) {
        const char* q = x.base + (o * sn + c * sc + i0) * x.es;
        if (x.dt == at::kFloat) return reinterpret_cast<const float*>(q);
        load_f32(q, x.dt, n, b);
        return static_cast<const float*>(b);
      };
      std::fill(acc, acc + n, 0.f);
      for (int64_t c = 0; c < p.C; ++c) {
        const float* av = row(ao, a.stride(0), sc_a, c, ab);
        if (t == nullptr) {
          pn_sumsq_acc(av, n, acc);
        } else {
          pn_dot_acc(av, row(to, t->stride(0), sc_t, c, tb), n, acc);
        }
      }
      for (int64_t i = 0; i < n; ++i) {
        if (t == nullptr) {
          rv[i] = 1.f / std::sqrt(acc[i] * invC + eps);
          rstd[o * p.I + i0 + i] = rv[i];
        } else {
          rv[i] = rstd_in[o * p.I + i0 + i];
          kv[i] = rv[i] * rv[i] * acc[i] * invC;
        }
      }
      for (int64_t c = 0; c < p.C; ++c) {
        const float* av = row(ao, a.stride(0), sc_a, c, ab);
        const float* tv = t != nullptr ? row(to, t->stride(0), sc_t, c, tb) : nullptr;
        char* op = oo.mbase + (o * out.stride(0) + c * sc_o + i0) * oo.es;
        float* ov = oo.dt == at::kFloat ? reinterpret_cast<float*>(op) : ob;
        pn_out<true>(av, tv, n, rv, kv, 0.f, 0.f, ov);
        if (oo.dt != at::kFloat) store_f32(ov, n, oo.dt, op);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> pixel_norm_cpu(const at::Tensor& a, double eps) {
  const Pn p = pn_geo(a);
  at::Tensor y = pn_empty(a, p);
  at::Tensor rstd = at::empty({p.O, p.I}, a.options().dtype(at::kFloat));
  pn_run(a, nullptr, y, rstd.mutable_data_ptr<float>(), nullptr, static_cast<float>(eps));
  return {y, rstd};
}

void pn_check_rstd(const at::Tensor& rstd, const Pn& p) {
  TORCH_CHECK(rstd.device().is_cpu() && rstd.scalar_type() == at::kFloat && rstd.is_contiguous() &&
                  rstd.numel() == p.O * p.I,
              "pixel_norm: rstd must be a contiguous float32 (O, I) CPU tensor");
}

at::Tensor pixel_norm_jvp_cpu(const at::Tensor& a, const at::Tensor& a_dot, const at::Tensor& rstd) {
  const Pn p = pn_geo(a);
  pn_check_like(a_dot, a, "a_dot");
  pn_check_rstd(rstd, p);
  at::Tensor out = pn_empty(a, p);
  pn_run(a, &a_dot, out, nullptr, rstd.const_data_ptr<float>(), 0.f);
  return out;
}

at::Tensor pixel_norm_backward_cpu(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& rstd) {
  const Pn p = pn_geo(a);
  pn_check_like(grad, a, "grad");
  pn_check_rstd(rstd, p);
  at::Tensor out = pn_empty(a, p);
  pn_run(a, &grad, out, nullptr, rstd.const_data_ptr<float>(), 0.f);
  return out;
}

}  // namespace
}  // namespace scm::cpu

TORCH_LIBRARY_IMPL(scm, CPU, m) {
  m.impl("group_norm", &scm::cpu::group_norm_cpu);
  m.impl("group_norm_jvp", &scm::cpu::group_norm_jvp_cpu);
  m.impl("group_norm_backward", &scm::cpu::group_norm_backward_cpu);
  m.impl("pixel_norm", &scm::cpu::pixel_norm_cpu);
  m.impl("pixel_norm_jvp", &scm::cpu::pixel_norm_jvp_cpu);
  m.impl("pixel_norm_backward", &scm::cpu::pixel_norm_backward_cpu);
}
