// Helpers shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace scm::cpu {

// Sum of the L accumulators acc[0..L) (L a power of two) in a fixed pairwise order: the upper half is
// added onto the lower half lane by lane until one value is left. The adds of one level are
// independent (they vectorize), so the latency is log2(L) adds instead of the L - 1 of a serial sum
// (64 serial adds cost ~200 cycles, as much as reducing a 1024-element block); the order depends only
// on L, so results stay bitwise reproducible. acc is overwritten.
template <int L, class T>
inline __attribute__((always_inline)) T fold_pairwise(T* acc) {
  static_assert(L > 0 && (L & (L - 1)) == 0, "fold_pairwise: L must be a power of two");
  for (int w = L / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// Elements converted per chunk by load_f32: small enough to stay in L1 with a few operands.
constexpr int64_t kChunk = 512;

// Convert n elements of a tensor of dtype `dt` starting at `ptr` into fp32 `out`. Called per
// chunk, so the dtype switch is outside the vectorized inner loops.
inline void load_f32(const void* ptr, at::ScalarType dt, int64_t n, float* out) {
  switch (dt) {
    case at::kFloat: {
      const float* p = static_cast<const float*>(ptr);
      for (int64_t i = 0; i < n; ++i) out[i] = p[i];
      break;
    }
    case at::kHalf: {
      const c10::Half* p = static_cast<const c10::Half*>(ptr);
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]);
      break;
    }
    case at::kBFloat16: {
      const c10::BFloat16* p = static_cast<const c10::BFloat16*>(ptr);
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]);
      break;
    }
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
    case at::kFloat: {
      float* p = static_cast<float*>(ptr);
      for (int64_t i = 0; i < n; ++i) p[i] = in[i];
      break;
    }
    case at::kHalf: {
      c10::Half* p = static_cast<c10::Half*>(ptr);
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<c10::Half>(in[i]);
      break;
    }
    case at::kBFloat16: {
      c10::BFloat16* p = static_cast<c10::BFloat16*>(ptr);
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<c10::BFloat16>(in[i]);
      break;
    }
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
