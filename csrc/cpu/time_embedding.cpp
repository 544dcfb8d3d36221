// CPU kernels of the time embedding (A10): torch.ops.scm.time_embedding, time_embedding_jvp and
// time_embedding_backward (schemas in csrc/ops.cpp).
//
// For row b (time c_b) and frequency k < half, s = time_scale:
//   omega_k = exp(-ln(max_period) k / half)  (scm::positional_omega)  or  2 pi f_k (Fourier)   (A10)
//   theta_bk = (s c_b) omega_k;  emb_b = [cos theta_b | sin theta_b | 0 (odd dim)]
//   JVP:      theta_dot_bk = s omega_k c_dot_b + s c_b 2 pi f_dot_k
//             emb_dot_b = [-sin theta_b theta_dot_b | cos theta_b theta_dot_b | 0]
//   backward: gtheta_bk = -g_cos_bk sin theta_bk + g_sin_bk cos theta_bk
//             dc_b = s sum_k omega_k gtheta_bk;  df_k = 2 pi s sum_b c_b gtheta_bk
//
// omega is computed once per call into a (half,) buffer; each row is then one branch-free loop
// over k that the compiler vectorizes: sin and cos come from one Cody-Waite reduction by pi/2 and
// two minimax polynomials (Cephes sinf/cosf, error ~1 ulp on [-pi/4, pi/4]). The 3-term reduction
// is exact for |theta| <= kMaxPolyArg; a row whose |s c_b| max_k |omega_k| exceeds it (very large
// time scales) takes a scalar std::sin/std::cos loop instead, so every row is accurate.
// The sum over b of the Fourier gradient uses fixed chunks of rows and adds the per-chunk partials
// in chunk order: the result does not depend on the number of threads (deterministic).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"
#include "scm/math.h"

namespace scm::cpu {
namespace {

// Function multi-versioning: an AVX2 clone of the row loops (8 lanes), chosen at load time on CPUs
// that have it, next to the baseline SSE2 version (4 lanes). No FMA: both clones round every
// product like the PyTorch reference does.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SCM_TE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SCM_TE_CLONES
#endif
#if defined(__GNUC__)
#define SCM_TE_INLINE inline __attribute__((always_inline))
#else
#define SCM_TE_INLINE inline
#endif

constexpr float kMaxPolyArg = 8192.f;  // |theta| limit of the exact 3-term reduction below

// sin(x) and cos(x) for |x| <= kMaxPolyArg, branch-free (inlined into vectorized loops).
SCM_TE_INLINE void sincos_poly(float x, float& s_out, float& c_out) {
  // j = round(x * 2/pi) with the 1.5 * 2^23 trick (|x * 2/pi| < 2^22); n = j mod 4 is the quadrant.
  const float j = (x * 0.636619772367581343f + 12582912.f) - 12582912.f;
  const int32_t n = static_cast<int32_t>(j);
  // r = x - j pi/2 with pi/2 = DP1 + DP2 + DP3 (DP1, DP2 short enough that j * DP is exact).
  const float r = ((x - j * 1.5703125f) - j * 4.837512969970703125e-4f) - j * 7.54978995489188216e-8f;
  scm::sincos_reduced(r, n, s_out, c_out);
}

// emb row: out_cos[k] = cos(sc w[k]), out_sin[k] = sin(sc w[k]).
SCM_TE_CLONES void fwd_row_poly(const float* __restrict w, int64_t half, float sc, float* __restrict out_cos,
                                float* __restrict out_sin) {
#pragma omp simd
  for (int64_t k = 0; k < half; ++k) {
    float s, c;
    sincos_poly(sc * w[k], s, c);
    out_cos[k] = c;
    out_sin[k] = s;
  }
}

void fwd_row_exact(const float* w, int64_t half, float sc, float* out_cos, float* out_sin) {
  for (int64_t k = 0; k < half; ++k) {
    const float theta = sc * w[k];
    out_cos[k] = std::cos(theta);
    out_sin[k] = std::sin(theta);
  }
}

// Tangent row: theta_dot = a w[k] + sc wd[k] (wd = 2 pi f_dot, or none).
template <bool HAS_WD>
SCM_TE_CLONES void jvp_row_poly(const float* __restrict w, const float* __restrict wd, int64_t half, float sc,
                                float a, float* __restrict out_cos, float* __restrict out_sin) {
#pragma omp simd
  for (int64_t k = 0; k < half; ++k) {
    float s, c;
    sincos_poly(sc * w[k], s, c);
    float td = a * w[k];
    if constexpr (HAS_WD) td += sc * wd[k];
    out_cos[k] = -s * td;
    out_sin[k] = c * td;
  }
}

template <bool HAS_WD>
void jvp_row_exact(const float* w, const float* wd, int64_t half, float sc, float a, float* out_cos,
                   float* out_sin) {
  for (int64_t k = 0; k < half; ++k) {
    const float theta = sc * w[k];
    float td = a * w[k];
    if constexpr (HAS_WD) td += sc * wd[k];
    out_cos[k] = -std::sin(theta) * td;
    out_sin[k] = std::cos(theta) * td;
  }
}

// gtheta[k] = -g_cos[k] sin(sc w[k]) + g_sin[k] cos(sc w[k]); returns sum_k w[k] gtheta[k].
SCM_TE_CLONES float bwd_row_poly(const float* __restrict w, int64_t half, float sc, const float* __restrict g_cos,
                                 const float* __restrict g_sin, float* __restrict gtheta) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < half; ++k) {
    float s, c;
    sincos_poly(sc * w[k], s, c);
    const float gt = g_sin[k] * c - g_cos[k] * s;
    gtheta[k] = gt;
    acc += w[k] * gt;
  }
  return acc;
}

float bwd_row_exact(const float* w, int64_t half, float sc, const float* g_cos, const float* g_sin, float* gtheta) {
  float acc = 0.f;
  for (int64_t k = 0; k < half; ++k) {
    const float theta = sc * w[k];
    const float gt = g_sin[k] * std::cos(theta) - g_cos[k] * std::sin(theta);
    gtheta[k] = gt;
    acc += w[k] * gt;
  }
  return acc;
}

// partial[k] += cb * gtheta[k]
SCM_TE_CLONES void axpy_row(float cb, const float* __restrict gtheta, int64_t half, float* __restrict partial) {
#pragma omp simd
  for (int64_t k = 0; k < half; ++k) partial[k] += cb * gtheta[k];
}

// ---------------------------------------------------------------------------------------------
// Argument checks (the Python layer validates users' arguments; these guard direct op calls).
// ---------------------------------------------------------------------------------------------
void check_vec(const at::Tensor& x, const char* name, int64_t n) {
  TORCH_CHECK(x.device().is_cpu(), "time_embedding: ", name, " must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "time_embedding: ", name, " must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 1 && (n < 0 || x.size(0) == n), "time_embedding: ", name, " must have shape (",
              n < 0 ? "B" : std::to_string(n), ",), got ", x.sizes());
}

void check_common(const at::Tensor& t, int64_t dim, double max_period, const c10::optional<at::Tensor>& freqs) {
  check_vec(t, "t", -1);
  TORCH_CHECK(dim >= 2, "time_embedding: dim must be >= 2, got ", dim);
  TORCH_CHECK(max_period > 0, "time_embedding: max_period must be > 0, got ", max_period);
  if (freqs.has_value()) check_vec(*freqs, "freqs", dim / 2);
}

// omega_k (A10) into a (half,) buffer; returns max_k |omega_k|.
float fill_omega(std::vector<float>& w, int64_t half, double max_period, const c10::optional<at::Tensor>& freqs) {
  w.resize(half);
  float wmax = 0.f;
  if (freqs.has_value()) {
    const float* f = freqs->const_data_ptr<float>();
    const int64_t st = freqs->stride(0);
    for (int64_t k = 0; k < half; ++k) w[k] = kTwoPi * f[k * st];
  } else {
    const float lmp = static_cast<float>(std::log(max_period));
    for (int64_t k = 0; k < half; ++k) w[k] = positional_omega(k, half, lmp);
  }
  for (int64_t k = 0; k < half; ++k) wmax = std::max(wmax, std::abs(w[k]));
  return wmax;
}

inline bool use_poly(float sc, float wmax) { return std::abs(sc) * wmax <= kMaxPolyArg; }

// Rows per parallel task: enough work (~16k sin/cos pairs) to amortize the task.
inline int64_t grain_rows(int64_t half) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(half, 1)); }

// ---------------------------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------------------------
at::Tensor time_embedding(const at::Tensor& t, int64_t dim, double max_period, double time_scale,
                          const c10::optional<at::Tensor>& freqs) {
  check_common(t, dim, max_period, freqs);
  const int64_t B = t.size(0), half = dim / 2;
  at::Tensor out = at::empty({B, dim}, t.options().dtype(at::kFloat));
  std::vector<float> w;
  const float wmax = fill_omega(w, half, max_period, freqs);
  const float s = static_cast<float>(time_scale);
  const float* tp = t.const_data_ptr<float>();
  const int64_t st = t.stride(0);
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, B, grain_rows(half), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* row = op + b * dim;
      const float sc = s * tp[b * st];
      if (use_poly(sc, wmax)) {
        fwd_row_poly(w.data(), half, sc, row, row + half);
      } else {
        fwd_row_exact(w.data(), half, sc, row, row + half);
      }
      if (dim & 1) row[dim - 1] = 0.f;
    }
  });
  return out;
}

at::Tensor time_embedding_jvp(const at::Tensor& t, const c10::optional<at::Tensor>& t_dot, int64_t dim,
                              double max_period, double time_scale, const c10::optional<at::Tensor>& freqs,
                              const c10::optional<at::Tensor>& freqs_dot) {
  check_common(t, dim, max_period, freqs);
  const int64_t B = t.size(0), half = dim / 2;
  if (t_dot.has_value()) check_vec(*t_dot, "t_dot", B);
  const bool has_wd = freqs.has_value() && freqs_dot.has_value();
  if (has_wd) check_vec(*freqs_dot, "freqs_dot", half);
  at::Tensor out = at::empty({B, dim}, t.options().dtype(at::kFloat));
  std::vector<float> w, wd;
  const float wmax = fill_omega(w, half, max_period, freqs);
  if (has_wd) {
    wd.resize(half);
    const float* fd = freqs_dot->const_data_ptr<float>();
    const int64_t sfd = freqs_dot->stride(0);
    for (int64_t k = 0; k < half; ++k) wd[k] = kTwoPi * fd[k * sfd];
  }
  const float s = static_cast<float>(time_scale);
  const float* tp = t.const_data_ptr<float>();
  const int64_t st = t.stride(0);
  const float* tdp = t_dot.has_value() ? t_dot->const_data_ptr<float>() : nullptr;
  const int64_t std_ = t_dot.has_value() ? t_dot->stride(0) : 0;
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, B, grain_rows(half), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* row = op + b * dim;
      const float sc = s * tp[b * st];
      const float a = tdp ? s * tdp[b * std_] : 0.f;
      const bool poly = use_poly(sc, wmax);
      if (has_wd) {
        if (poly) jvp_row_poly<true>(w.data(), wd.data(), half, sc, a, row, row + half);
        else jvp_row_exact<true>(w.data(), wd.data(), half, sc, a, row, row + half);
      } else {
        if (poly) jvp_row_poly<false>(w.data(), nullptr, half, sc, a, row, row + half);
        else jvp_row_exact<false>(w.data(), nullptr, half, sc, a, row, row + half);
      }
      if (dim & 1) row[dim - 1] = 0.f;
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> time_embedding_backward(const at::Tensor& grad, const at::Tensor& t, int64_t dim,
                                                           double max_period, double time_scale,
                                                           const c10::optional<at::Tensor>& freqs, bool need_dfreqs) {
  check_common(t, dim, max_period, freqs);
  const int64_t B = t.size(0), half = dim / 2;
  TORCH_CHECK(grad.scalar_type() == at::kFloat, "time_embedding_backward: grad must be float32, got ",
              grad.scalar_type());
  check_rows(grad, "time_embedding_backward: grad", B, dim);
  const bool need_df = need_dfreqs && freqs.has_value();
  std::vector<float> w;
  const float wmax = fill_omega(w, half, max_period, freqs);
  const float s = static_cast<float>(time_scale);
  const float* tp = t.const_data_ptr<float>();
  const int64_t st = t.stride(0);
  const float* gp = grad.const_data_ptr<float>();
  const int64_t sg = grad.stride(0);

  at::Tensor dt = at::empty({B}, t.options().dtype(at::kFloat));
  float* dtp = dt.mutable_data_ptr<float>();
  // Fixed chunks of rows (independent of the thread count): partial df per chunk, summed in order.
  constexpr int64_t kRowsPerChunk = 64;
  const int64_t n_chunks = (B + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<float> partial(need_df ? n_chunks * half : 0, 0.f);
  const int64_t grain_chunks = std::max<int64_t>(1, grain_rows(half) / kRowsPerChunk);
  at::parallel_for(0, n_chunks, grain_chunks, [&](int64_t c0, int64_t c1) {
    std::vector<float> gtheta(half);
    for (int64_t ch = c0; ch < c1; ++ch) {
      float* part = need_df ? partial.data() + ch * half : nullptr;
      const int64_t b_end = std::min(B, (ch + 1) * kRowsPerChunk);
      for (int64_t b = ch * kRowsPerChunk; b < b_end; ++b) {
        const float* g = gp + b * sg;
        const float cb = tp[b * st];
        const float sc = s * cb;
        const float acc = use_poly(sc, wmax) ? bwd_row_poly(w.data(), half, sc, g, g + half, gtheta.data())
                                             : bwd_row_exact(w.data(), half, sc, g, g + half, gtheta.data());
        dtp[b] = s * acc;
        if (need_df) axpy_row(cb, gtheta.data(), half, part);
      }
    }
  });
  at::Tensor dfreqs;
  if (need_df) {
    dfreqs = at::zeros({half}, t.options().dtype(at::kFloat));
    float* dfp = dfreqs.mutable_data_ptr<float>();
    for (int64_t ch = 0; ch < n_chunks; ++ch) axpy_row(1.f, partial.data() + ch * half, half, dfp);
    const float scale = kTwoPi * s;
    for (int64_t k = 0; k < half; ++k) dfp[k] *= scale;
  } else {
    dfreqs = at::empty({0}, t.options().dtype(at::kFloat));
  }
  return {dt, dfreqs};
}

}  // namespace
}  // namespace scm::cpu

TORCH_LIBRARY_IMPL(scm, CPU, m) {
  m.impl("time_embedding", &scm::cpu::time_embedding);
  m.impl("time_embedding_jvp", &scm::cpu::time_embedding_jvp);
  m.impl("time_embedding_backward", &scm::cpu::time_embedding_backward);
}
