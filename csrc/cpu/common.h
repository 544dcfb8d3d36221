// Helpers shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace scm::cpu {

// Sum of the L accumulators acc[0..L) (L a power of two) in a fixed pairwise order: the upper half is
// added onto the lower half lane by lane until one value is left. The adds of one level are
// independent (they vectorize), so the latency is log2(L) adds instead of the L - 1 of a serial sum
// (64 serial adds cost ~200 cycles, as much as reducing a 1024-element block); the order depends only
// on L, so results stay bitwise reproducible. fold_pairwise(acc, op) folds with another lanewise
// operation, op(lower, upper) setting lower <- lower (op) upper (e.g. a max), for T and for GCC
// vectors of T (in place: a function returning a vector would change the ABI of the baseline build).
// The levels run on 64-byte vector values (GCC vector extensions), not on acc in memory: written
// as a loop over acc, each level stored a vector and the next one loaded half of it, a failed
// store-to-load forward per level (~20 cycles each on the project's Zen 4), which made the folds of
// the GroupNorm statistics pass cost as much as its reads (block_moments 1.8x faster this way, the
// same bits: the pairing is unchanged).
namespace fold_detail {
template <int B, class T>
struct Vec {
  typedef T type __attribute__((vector_size(B)));
};
struct Plus {
  template <class V>
  void operator()(V& a, const V& b) const { a += b; }
};
template <int B, class T, class Op>
inline __attribute__((always_inline)) T fold_vec(const typename Vec<B, T>::type& v, Op op) {
  if constexpr (B == 2 * sizeof(T)) {
    T a = v[0];
    op(a, v[1]);
    return a;
  } else {
    typename Vec<B / 2, T>::type lo, hi;
    std::memcpy(&lo, &v, B / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + B / 2, B / 2);
    op(lo, hi);
    return fold_vec<B / 2, T>(lo, op);
  }
}
}  // namespace fold_detail

template <int L, class T, class Op = fold_detail::Plus>
inline __attribute__((always_inline)) T fold_pairwise(T* acc, Op op = {}) {
  static_assert(L > 0 && (L & (L - 1)) == 0, "fold_pairwise: L must be a power of two");
  constexpr int V = 64 / static_cast<int>(sizeof(T));  // lanes of a 64-byte vector
  if constexpr (L >= V && V >= 2 && (std::is_same_v<T, float> || std::is_same_v<T, double>)) {
    typename fold_detail::Vec<64, T>::type v[L / V];
    std::memcpy(v, acc, sizeof(v));
    for (int w = L / V / 2; w >= 1; w /= 2)
      for (int l = 0; l < w; ++l) op(v[l], v[l + w]);
    return fold_detail::fold_vec<64, T>(v[0], op);
  } else {
    for (int w = L / 2; w >= 1; w /= 2)
      for (int l = 0; l < w; ++l) op(acc[l], acc[l + w]);
    return acc[0];
  }
}

// Elements converted per chunk by load_f32: small enough to stay in L1 with a few operands.
constexpr int64_t kChunk = 512;

// The dtype conversions run in AVX-512 / AVX2 clones (the extension itself is built for the baseline
// ISA). bf16 goes through its bits: widening is a shift, narrowing rounds to nearest even exactly as
// c10::BFloat16 does (NaN -> 0x7FC0), without the branch that kept c10's conversion scalar (a bf16
// GroupNorm forward took 1.7x the time of the fp32 one).
#define SCM_CVT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

[[maybe_unused]] SCM_CVT_CLONES static void bf16_to_f32(const uint16_t* __restrict p, int64_t n,
                                                        float* __restrict out) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = uint32_t(p[i]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    out[i] = f;
  }
}

[[maybe_unused]] SCM_CVT_CLONES static void f32_to_bf16(const float* __restrict in, int64_t n,
                                                        uint16_t* __restrict p) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, in + i, sizeof u);
    const uint16_t rounded = uint16_t((u + UINT32_C(0x7FFF) + ((u >> 16) & 1u)) >> 16);
    p[i] = (u & UINT32_C(0x7FFFFFFF)) > UINT32_C(0x7F800000) ? uint16_t(0x7FC0) : rounded;
  }
}

[[maybe_unused]] SCM_CVT_CLONES static void f16_to_f32(const c10::Half* __restrict p, int64_t n,
                                                       float* __restrict out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]);
}

[[maybe_unused]] SCM_CVT_CLONES static void f32_to_f16(const float* __restrict in, int64_t n,
                                                       c10::Half* __restrict p) {
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<c10::Half>(in[i]);
}

// Convert n elements of a tensor of dtype `dt` starting at `ptr` into fp32 `out`. Called per
// chunk, so the dtype switch is outside the vectorized inner loops.
inline void load_f32(const void* ptr, at::ScalarType dt, int64_t n, float* out) {
  switch (dt) {
    case at::kFloat:
      std::memmove(out, ptr, n * sizeof(float));
      break;
    case at::kHalf:
      f16_to_f32(static_cast<const c10::Half*>(ptr), n, out);
      break;
    case at::kBFloat16:
      bf16_to_f32(static_cast<const uint16_t*>(ptr), n, out);
      break;
    case at::kDouble: {
      const double* p = static_cast<const double*>(ptr);
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]);
      break;
    }
    default:
      TORCH_CHECK(false, "scm_kernels: unsupported dtype ", dt);
  }
}

// Store n fp32 values into a tensor of dtype `dt` (round to nearest even for fp16/bf16).
inline void store_f32(const float* in, int64_t n, at::ScalarType dt, void* ptr) {
  switch (dt) {
    case at::kFloat:
      std::memmove(ptr, in, n * sizeof(float));
      break;
    case at::kHalf:
      f32_to_f16(in, n, static_cast<c10::Half*>(ptr));
      break;
    case at::kBFloat16:
      f32_to_bf16(in, n, static_cast<uint16_t*>(ptr));
      break;
    case at::kDouble: {
      double* p = static_cast<double*>(ptr);
      for (int64_t i = 0; i < n; ++i) p[i] = in[i];
      break;
    }
    default:
      TORCH_CHECK(false, "scm_kernels: unsupported dtype ", dt);
  }
}

// Byte pointer to row b of a (B, D) tensor with inner stride 1 (row stride may be 0).
inline const char* row_ptr(const at::Tensor& x, int64_t b) {
  return static_cast<const char*>(x.const_data_ptr()) + b * x.stride(0) * x.element_size();
}
inline char* row_ptr_mut(at::Tensor& x, int64_t b) {
  return static_cast<char*>(x.mutable_data_ptr()) + b * x.stride(0) * x.element_size();
}

// Checks that a tensor is a (B, D) view with inner stride 1 on the CPU.
inline void check_rows(const at::Tensor& x, const char* name, int64_t B, int64_t D) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == B && x.size(1) == D, name, " must have shape (", B, ", ", D,
              "), got ", x.sizes());
  TORCH_CHECK(D <= 1 || x.stride(1) == 1, name, " must have inner stride 1, got ", x.stride(1));
}

}  // namespace scm::cpu
