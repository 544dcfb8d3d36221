// trigflow_step (A23) on the CPU: at::parallel_for over (row, chunk), fp32 arithmetic.
//
//   out = cx * x_t + cf * F + ce * eps          (scm::trig_coef; x0 = cos t x_t - sin t sigma_d F,
//                                                 out = cos s x0 + sin s sigma_d eps when renoising)
//   noise_mode 0: denoise only; 1: eps = noise; 2: eps = Philox normals of `seed` (scm::philox_normal4,
//   element i = b * D + k); 3: renoise with eps = 0. out_uint8: scm::to_pixel of the result.
// Backward: dx_t = cx * grad, dF = cf * grad in one pass over grad.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "common.h"
#include "scm/math.h"

namespace scm::cpu {
namespace {

// Elements of one row handled by one parallel work item (a multiple of kChunk).
constexpr int64_t kGrain = 8 * kChunk;

std::vector<TrigCoef> row_coefs(const at::Tensor& t, const std::optional<at::Tensor>& s, bool renoise,
                                double sigma_d, int64_t B) {
  std::vector<TrigCoef> c(B);
  const float* tp = t.const_data_ptr<float>();
  const float* sp = renoise ? s->const_data_ptr<float>() : nullptr;
  const int64_t st = t.stride(0), ss = renoise ? s->stride(0) : 0;
  for (int64_t b = 0; b < B; ++b) {
    c[b] = trig_coef(tp[b * st], renoise ? sp[b * ss] : 0.f, renoise, static_cast<float>(sigma_d));
  }
  return c;
}

// x_t, F, noise: a (B, D) view with inner stride 1 and a free row stride, or a contiguous tensor of
// x_t's shape (B, ...) whose samples are rows of D = numel / B elements. The output has x_t's shape.
void check_samples(const at::Tensor& x, const at::Tensor& ref, const char* name) {
  if (x.dim() == 2 && ref.dim() == 2) {
    check_rows(x, name, ref.size(0), ref.size(1));
    return;
  }
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.sizes() == ref.sizes(), name, " must have shape ", ref.sizes(), ", got ", x.sizes());
  TORCH_CHECK(x.is_contiguous() && ref.is_contiguous(), name, ": tensors other than (B, D) views must be contiguous");
}

void check_times(const at::Tensor& t, const char* name, int64_t B) {
  TORCH_CHECK(t.device().is_cpu(), "trigflow_step: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, "trigflow_step: ", name, " must have shape (", B, "), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "trigflow_step: ", name, " must be float32, got ", t.scalar_type());
}

// Function multi-versioning: an AVX2 clone (8 lanes), chosen at load time on CPUs that have it,
// next to the baseline SSE2 version.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SCM_TF_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SCM_TF_CLONES
#endif

// out = cx * x + cf * f (+ ce * e when e is given): the fp32 fast path of the step.
SCM_TF_CLONES void mix_f32(const float* __restrict x, const float* __restrict f, const float* __restrict e,
                           float cx, float cf, float ce, int64_t n, float* __restrict out) {
  if (e != nullptr) {
    for (int64_t i = 0; i < n; ++i) out[i] = cx * x[i] + cf * f[i] + ce * e[i];
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = cx * x[i] + cf * f[i];
  }
}

// The same mix written as uint8 pixels (scm::to_pixel), for the last step.
SCM_TF_CLONES void mix_pixels(const float* __restrict x, const float* __restrict f, const float* __restrict e,
                              float cx, float cf, float ce, int64_t n, uint8_t* __restrict out) {
  if (e != nullptr) {
    for (int64_t i = 0; i < n; ++i) out[i] = to_pixel(cx * x[i] + cf * f[i] + ce * e[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = to_pixel(cx * x[i] + cf * f[i]);
  }
}

// The normals of groups g0 .. g0 + ng - 1 (4 per group) into out. One group per iteration with no
// branches or calls (Philox rounds unrolled, log/sincos polynomials of scm/math.h), so the compiler
// vectorizes across groups.
SCM_TF_CLONES void philox_groups(uint64_t seed, uint64_t g0, int64_t ng, float* __restrict out) {
  const uint32_t lo = static_cast<uint32_t>(g0), hi = static_cast<uint32_t>(g0 >> 32);
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t q = 0; q < ng; ++q) {
    const uint32_t c0 = lo + static_cast<uint32_t>(q);
    const uint32_t c1 = hi + (c0 < lo ? 1u : 0u);  // carry into the high word of the counter
    const U32x4 r = philox4x32_10(c0, c1, 0u, 0u, k0, k1);
    float n0, n1, n2, n3;
    box_muller(uint_to_unit(r.v[0]), uint_to_unit(r.v[1]), n0, n1);
    box_muller(uint_to_unit(r.v[2]), uint_to_unit(r.v[3]), n2, n3);
    out[4 * q] = n0;
    out[4 * q + 1] = n1;
    out[4 * q + 2] = n2;
    out[4 * q + 3] = n3;
  }
}

// n Philox normals of stream elements i0 .. i0 + n - 1 (scm::philox_normal: group i / 4, lane i % 4).
inline void philox_fill(uint64_t seed, uint64_t i0, int64_t n, float* out) {
  int64_t j = 0;
  uint64_t i = i0;
  float g4[4];
  if (i & 3) {  // head: the rest of a group started in the previous chunk / row
    philox_normal4(seed, i >> 2, g4);
    for (; j < n && (i & 3); ++j, ++i) out[j] = g4[i & 3];
  }
  const int64_t ng = (n - j) / 4;
  philox_groups(seed, i >> 2, ng, out + j);
  j += 4 * ng;
  i += 4 * ng;
  if (j < n) {  // tail
    philox_normal4(seed, i >> 2, g4);
    for (int l = 0; j < n; ++j, ++l) out[j] = g4[l];
  }
}

at::Tensor trigflow_step_cpu(const at::Tensor& x_t, const at::Tensor& F, const at::Tensor& t,
                             const std::optional<at::Tensor>& t_next, const std::optional<at::Tensor>& noise,
                             double sigma_d, int64_t seed, int64_t noise_mode, bool out_uint8) {
  TORCH_CHECK(x_t.dim() >= 1, "trigflow_step: x_t must have a batch dim, got ", x_t.sizes());
  const int64_t B = x_t.size(0), D = B > 0 ? x_t.numel() / B : 0;
  check_samples(x_t, x_t, "trigflow_step: x_t");
  check_samples(F, x_t, "trigflow_step: F");
  check_times(t, "t", B);
  TORCH_CHECK(noise_mode >= 0 && noise_mode <= 3, "trigflow_step: noise_mode must be 0..3, got ", noise_mode);
  const bool renoise = noise_mode != 0;
  if (renoise) {
    TORCH_CHECK(t_next.has_value(), "trigflow_step: noise_mode ", noise_mode, " needs t_next");
    check_times(*t_next, "t_next", B);
  }
  if (noise_mode == 1) {
    TORCH_CHECK(noise.has_value(), "trigflow_step: noise_mode 1 needs noise");
    check_samples(*noise, x_t, "trigflow_step: noise");
  }
  TORCH_CHECK(!out_uint8 || noise_mode == 0, "trigflow_step: out_uint8 is for the last step (noise_mode 0)");
  TORCH_CHECK(seed >= 0, "trigflow_step: seed must be >= 0, got ", seed);

  at::Tensor out = at::empty(x_t.sizes(), x_t.options().dtype(out_uint8 ? at::kByte : x_t.scalar_type()));
  if (B == 0 || D == 0) return out;
  const std::vector<TrigCoef> coef = row_coefs(t, t_next, renoise, sigma_d, B);
  const at::ScalarType xd = x_t.scalar_type(), fd = F.scalar_type();
  const at::ScalarType nd = noise_mode == 1 ? noise->scalar_type() : at::kFloat;
  const bool f32_in = xd == at::kFloat && fd == at::kFloat && nd == at::kFloat;  // no conversion buffers
  const bool all_f32 = f32_in && !out_uint8;
  const int64_t nchunk = (D + kGrain - 1) / kGrain;
  const uint64_t useed = static_cast<uint64_t>(seed);

  at::parallel_for(0, B * nchunk, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float xb[kChunk], fb[kChunk], nb[kChunk], ob[kChunk];
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / nchunk;
      const int64_t k_end = std::min(D, (w % nchunk + 1) * kGrain);
      const float cx = coef[b].cx, cf = coef[b].cf, ce = coef[b].ce;
      const char* xr = row_ptr(x_t, b);
      const char* fr = row_ptr(F, b);
      const char* nr = noise_mode == 1 ? row_ptr(*noise, b) : nullptr;
      char* orow = static_cast<char*>(out.mutable_data_ptr()) + b * D * out.element_size();
      const int64_t k_begin = (w % nchunk) * kGrain;
      if (all_f32 && noise_mode != 2) {  // fp32, no generated noise: one pass over the whole task
        const float* ep = noise_mode == 1 ? reinterpret_cast<const float*>(nr) + k_begin : nullptr;
        mix_f32(reinterpret_cast<const float*>(xr) + k_begin, reinterpret_cast<const float*>(fr) + k_begin, ep,
                cx, cf, ce, k_end - k_begin, reinterpret_cast<float*>(orow) + k_begin);
        continue;
      }
      for (int64_t k = k_begin; k < k_end; k += kChunk) {
        const int64_t n = std::min(kChunk, k_end - k);
        if (noise_mode == 2) philox_fill(useed, static_cast<uint64_t>(b) * D + k, n, nb);
        if (all_f32) {  // same-dtype fp32: no conversion buffers
          const float* xp = reinterpret_cast<const float*>(xr) + k;
          const float* fp = reinterpret_cast<const float*>(fr) + k;
          float* op = reinterpret_cast<float*>(orow) + k;
          const float* ep = noise_mode == 1 ? reinterpret_cast<const float*>(nr) + k : nb;
          mix_f32(xp, fp, noise_mode == 1 || noise_mode == 2 ? ep : nullptr, cx, cf, ce, n, op);
          continue;
        }
        if (f32_in) {  // fp32 inputs, uint8 pixels out
          const float* ep = noise_mode == 1 ? reinterpret_cast<const float*>(nr) + k : nb;
          mix_pixels(reinterpret_cast<const float*>(xr) + k, reinterpret_cast<const float*>(fr) + k,
                     noise_mode == 1 || noise_mode == 2 ? ep : nullptr, cx, cf, ce, n,
                     reinterpret_cast<uint8_t*>(orow) + k);
          continue;
        } else {
          load_f32(xr + k * x_t.element_size(), xd, n, xb);
          load_f32(fr + k * F.element_size(), fd, n, fb);
          if (noise_mode == 1) load_f32(nr + k * noise->element_size(), nd, n, nb);
          mix_f32(xb, fb, noise_mode == 1 || noise_mode == 2 ? nb : nullptr, cx, cf, ce, n, ob);
        }
        if (out_uint8) {
          uint8_t* op = reinterpret_cast<uint8_t*>(orow) + k;
          for (int64_t i = 0; i < n; ++i) op[i] = to_pixel(ob[i]);
        } else {
          store_f32(ob, n, xd, orow + k * out.element_size());
        }
      }
    }
  });
  return out;
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> trigflow_step_backward_cpu(
    const at::Tensor& grad, const at::Tensor& t, const std::optional<at::Tensor>& t_next, double sigma_d,
    bool renoise, bool need_x, bool need_F, at::ScalarType x_dtype, at::ScalarType F_dtype) {
  TORCH_CHECK(grad.dim() == 2, "trigflow_step_backward: grad must be a (B, D) view, got ", grad.sizes());
  const int64_t B = grad.size(0), D = grad.size(1);
  check_rows(grad, "trigflow_step_backward: grad", B, D);
  check_times(t, "t", B);
  if (renoise) {
    TORCH_CHECK(t_next.has_value(), "trigflow_step_backward: renoise needs t_next");
    check_times(*t_next, "t_next", B);
  }
  std::optional<at::Tensor> dx, dF;
  if (need_x) dx = at::empty({B, D}, grad.options().dtype(x_dtype));
  if (need_F) dF = at::empty({B, D}, grad.options().dtype(F_dtype));
  if (!(need_x || need_F) || B == 0 || D == 0) return {dx, dF};
  const std::vector<TrigCoef> coef = row_coefs(t, t_next, renoise, sigma_d, B);
  const at::ScalarType gd = grad.scalar_type();
  const int64_t nchunk = (D + kGrain - 1) / kGrain;
  const bool f32 = gd == at::kFloat && (!need_x || x_dtype == at::kFloat) && (!need_F || F_dtype == at::kFloat);
  char* dxp = need_x ? static_cast<char*>(dx->mutable_data_ptr()) : nullptr;
  char* dfp = need_F ? static_cast<char*>(dF->mutable_data_ptr()) : nullptr;
  const int64_t xs = need_x ? dx->element_size() : 0, fs = need_F ? dF->element_size() : 0;

  at::parallel_for(0, B * nchunk, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float gb[kChunk], ob[kChunk];
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / nchunk;
      const int64_t k_end = std::min(D, (w % nchunk + 1) * kGrain);
      const float cx = coef[b].cx, cf = coef[b].cf;
      const char* gr = row_ptr(grad, b);
      for (int64_t k = (w % nchunk) * kGrain; k < k_end; k += kChunk) {
        const int64_t n = std::min(kChunk, k_end - k);
        const int64_t off = b * D + k;
        if (f32) {
          const float* gp = reinterpret_cast<const float*>(gr) + k;
          if (need_x) {
            float* op = reinterpret_cast<float*>(dxp) + off;
            for (int64_t i = 0; i < n; ++i) op[i] = cx * gp[i];
          }
          if (need_F) {
            float* op = reinterpret_cast<float*>(dfp) + off;
            for (int64_t i = 0; i < n; ++i) op[i] = cf * gp[i];
          }
          continue;
        }
        load_f32(gr + k * grad.element_size(), gd, n, gb);
        if (need_x) {
          for (int64_t i = 0; i < n; ++i) ob[i] = cx * gb[i];
          store_f32(ob, n, x_dtype, dxp + off * xs);
        }
        if (need_F) {
          for (int64_t i = 0; i < n; ++i) ob[i] = cf * gb[i];
          store_f32(ob, n, F_dtype, dfp + off * fs);
        }
      }
    }
  });
  return {dx, dF};
}

}  // namespace
}  // namespace scm::cpu

TORCH_LIBRARY_IMPL(scm, CPU, m) {
  m.impl("trigflow_step", &scm::cpu::trigflow_step_cpu);
  m.impl("trigflow_step_backward", &scm::cpu::trigflow_step_backward_cpu);
}
