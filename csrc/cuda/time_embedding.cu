// CUDA kernels of the time embedding (A10): torch.ops.scm.time_embedding, time_embedding_jvp and
// time_embedding_backward (schemas in csrc/ops.cpp). Same math as csrc/cpu/time_embedding.cpp:
//   omega_k = exp(-ln(max_period) k / half) or 2 pi f_k;  theta_bk = (s c_b) omega_k
//   emb_b = [cos theta_b | sin theta_b | 0 (odd dim)]
//   JVP:      theta_dot_bk = s omega_k c_dot_b + s c_b 2 pi f_dot_k;  emb_dot = [-sin theta theta_dot | cos theta theta_dot | 0]
//   backward: gtheta_bk = -g_cos_bk sin theta_bk + g_sin_bk cos theta_bk
//             dc_b = s sum_k omega_k gtheta_bk;  df_k = 2 pi s sum_b c_b gtheta_bk
//
// Precision: the extension is built with --use_fast_math, which turns sinf/cosf/expf and '/' into
// approximate intrinsics whose error grows with |theta| (and would break the 2x-PyTorch rule for
// large time scales). So the products and the division are explicit IEEE intrinsics (__fmul_rn,
// __fdiv_rn: exactly the roundings of the fp32 reference), exp of the positional argument is
// evaluated in double and rounded once (fast-math does not touch double functions), and sin/cos use
// a double-precision reduction with fp32 polynomials (sincos_f). The cost is irrelevant next to
// writing the (B, dim) output.
// The sums of the backward use fixed-order tree reductions and per-chunk partials added in chunk
// order: deterministic, no atomics.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>

#include "scm/math.h"

namespace scm::cuda {
namespace {

constexpr int kThreads = 128;        // threads per block (frequencies k per block)
constexpr int kMaxGridY = 65535;     // rows per launch in grid.y; more rows loop (grid-stride)
constexpr int64_t kRowsPerChunk = 64;  // rows of one partial sum of dfreqs

// omega_k (A10). Positional: the fp32 argument -ln(max_period) k / half rounded like
// scm::positional_omega on the CPU, then a correctly rounded exp (see the precision note above).
__device__ __forceinline__ float omega_k(int64_t k, int64_t half, float log_max_period, const float* freqs,
                                         int64_t stride_f) {
  if (freqs != nullptr) return __fmul_rn(kTwoPi, freqs[k * stride_f]);
  const float x = __fdiv_rn(__fmul_rn(-log_max_period, static_cast<float>(k)), static_cast<float>(half));
  return static_cast<float>(exp(static_cast<double>(x)));
}

// sin and cos of an fp32 theta: reduction r = theta - j pi/2 in double (accurate for any
// |theta| < 2^40), then the Cephes sinf/cosf minimax polynomials on |r| <= pi/4 (~1 ulp) picked and
// signed by the quadrant j mod 4. Unlike sin/cos/sincos (float or double) it has no Payne-Hanek
// slow path, whose local array would put a stack frame into every kernel.
__device__ __forceinline__ void sincos_f(float theta, float& s, float& c) {
  const double x = static_cast<double>(theta);
  const double j = rint(x * 0.63661977236758134308);
  const float r = static_cast<float>(fma(-j, 6.123233995736766e-17, fma(-j, 1.5707963267948966, x)));
  const long long n = static_cast<long long>(j);
  scm::sincos_reduced(r, static_cast<int32_t>(n & 3), s, c);
}

// Fixed-order block sum (shared-memory tree): every thread gets the total.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  smem[threadIdx.x] = v;
  __syncthreads();
  for (int off = blockDim.x / 2; off > 0; off >>= 1) {
    if (threadIdx.x < off) smem[threadIdx.x] = __fadd_rn(smem[threadIdx.x], smem[threadIdx.x + off]);
    __syncthreads();
  }
  const float total = smem[0];
  __syncthreads();
  return total;
}

// grid (ceil(half / kThreads), min(B, kMaxGridY)); thread (k, b).
__global__ void fwd_kernel(const float* __restrict__ t, int64_t stride_t, const float* __restrict__ freqs,
                           int64_t stride_f, float* __restrict__ out, int64_t B, int64_t half, int64_t dim,
                           float log_max_period, float time_scale) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = k < half;
  const float w = active ? omega_k(k, half, log_max_period, freqs, stride_f) : 0.f;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    float* row = out + b * dim;
    if (active) {
      const float sc = __fmul_rn(time_scale, t[b * stride_t]);
      float s, c;
      sincos_f(__fmul_rn(sc, w), s, c);
      row[k] = c;
      row[half + k] = s;
    }
    if (blockIdx.x == 0 && threadIdx.x == 0 && (dim & 1)) row[dim - 1] = 0.f;
  }
}

__global__ void jvp_kernel(const float* __restrict__ t, int64_t stride_t, const float* __restrict__ t_dot,
                           int64_t stride_td, const float* __restrict__ freqs, int64_t stride_f,
                           const float* __restrict__ freqs_dot, int64_t stride_fd, float* __restrict__ out,
                           int64_t B, int64_t half, int64_t dim, float log_max_period, float time_scale) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = k < half;
  const float w = active ? omega_k(k, half, log_max_period, freqs, stride_f) : 0.f;
  const float wd = (active && freqs_dot != nullptr) ? __fmul_rn(kTwoPi, freqs_dot[k * stride_fd]) : 0.f;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    float* row = out + b * dim;
    if (active) {
      const float sc = __fmul_rn(time_scale, t[b * stride_t]);
      const float a = t_dot != nullptr ? __fmul_rn(time_scale, t_dot[b * stride_td]) : 0.f;
      const float td = __fadd_rn(__fmul_rn(a, w), __fmul_rn(sc, wd));
      float s, c;
      sincos_f(__fmul_rn(sc, w), s, c);
      row[k] = -__fmul_rn(s, td);
      row[half + k] = __fmul_rn(c, td);
    }
    if (blockIdx.x == 0 && threadIdx.x == 0 && (dim & 1)) row[dim - 1] = 0.f;
  }
}

__device__ __forceinline__ float gtheta(const float* g_row, int64_t k, int64_t half, float sc, float w) {
  float s, c;
  sincos_f(__fmul_rn(sc, w), s, c);
  return __fsub_rn(__fmul_rn(g_row[half + k], c), __fmul_rn(g_row[k], s));
}

// dc_b: one block per row (grid-stride over rows), fixed-order block reduction over k.
__global__ void bwd_dt_kernel(const float* __restrict__ grad, int64_t stride_g, const float* __restrict__ t,
                              int64_t stride_t, const float* __restrict__ freqs, int64_t stride_f,
                              float* __restrict__ dt, int64_t B, int64_t half, float log_max_period,
                              float time_scale) {
  __shared__ float smem[kThreads];
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const float sc = __fmul_rn(time_scale, t[b * stride_t]);
    const float* g_row = grad + b * stride_g;
    float acc = 0.f;
    for (int64_t k = threadIdx.x; k < half; k += blockDim.x) {
      const float w = omega_k(k, half, log_max_period, freqs, stride_f);
      acc = __fadd_rn(acc, __fmul_rn(w, gtheta(g_row, k, half, sc, w)));
    }
    const float total = block_sum(acc, smem);
    if (threadIdx.x == 0) dt[b] = __fmul_rn(time_scale, total);
  }
}

// partial[chunk, k] = sum_{b in chunk, in order} c_b gtheta_bk (Fourier: freqs given);
// grid (ceil(half / kThreads), min(n_chunks, kMaxGridY)).
__global__ void bwd_df_partial_kernel(const float* __restrict__ grad, int64_t stride_g, const float* __restrict__ t,
                                      int64_t stride_t, const float* __restrict__ freqs, int64_t stride_f,
                                      float* __restrict__ partial, int64_t B, int64_t half, int64_t n_chunks,
                                      float time_scale) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= half) return;
  const float w = omega_k(k, half, 0.f, freqs, stride_f);
  for (int64_t ch = blockIdx.y; ch < n_chunks; ch += gridDim.y) {
    const int64_t b_end = std::min(B, (ch + 1) * kRowsPerChunk);
    float acc = 0.f;
    for (int64_t b = ch * kRowsPerChunk; b < b_end; ++b) {
      const float cb = t[b * stride_t];
      const float sc = __fmul_rn(time_scale, cb);
      acc = __fadd_rn(acc, __fmul_rn(cb, gtheta(grad + b * stride_g, k, half, sc, w)));
    }
    partial[ch * half + k] = acc;
  }
}

// df_k = 2 pi s sum_chunks partial[chunk, k], chunks in order.
__global__ void bwd_df_sum_kernel(const float* __restrict__ partial, float* __restrict__ df, int64_t half,
                                  int64_t n_chunks, float scale) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= half) return;
  float acc = 0.f;
  for (int64_t ch = 0; ch < n_chunks; ++ch) acc = __fadd_rn(acc, partial[ch * half + k]);
  df[k] = __fmul_rn(scale, acc);
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
void check_vec(const at::Tensor& x, const char* name, int64_t n, const at::Tensor& like) {
  TORCH_CHECK(x.is_cuda() && x.device() == like.device(), "time_embedding: ", name, " must be a CUDA tensor on ",
              like.device(), ", got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "time_embedding: ", name, " must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 1 && (n < 0 || x.size(0) == n), "time_embedding: ", name, " must have shape (",
              n < 0 ? "B" : std::to_string(n), ",), got ", x.sizes());
}

void check_common(const at::Tensor& t, int64_t dim, double max_period, const c10::optional<at::Tensor>& freqs) {
  check_vec(t, "t", -1, t);
  TORCH_CHECK(dim >= 2, "time_embedding: dim must be >= 2, got ", dim);
  TORCH_CHECK(max_period > 0, "time_embedding: max_period must be > 0, got ", max_period);
  if (freqs.has_value()) check_vec(*freqs, "freqs", dim / 2, t);
}

inline const float* ptr_or_null(const c10::optional<at::Tensor>& x) {
  return x.has_value() ? x->const_data_ptr<float>() : nullptr;
}
inline int64_t stride_or_zero(const c10::optional<at::Tensor>& x) { return x.has_value() ? x->stride(0) : 0; }

inline dim3 row_grid(int64_t half, int64_t rows) {
  return dim3(static_cast<unsigned>((half + kThreads - 1) / kThreads),
              static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(rows, kMaxGridY))));
}

at::Tensor time_embedding(const at::Tensor& t, int64_t dim, double max_period, double time_scale,
                          const c10::optional<at::Tensor>& freqs) {
  check_common(t, dim, max_period, freqs);
  const c10::cuda::CUDAGuard guard(t.device());
  const int64_t B = t.size(0), half = dim / 2;
  at::Tensor out = at::empty({B, dim}, t.options().dtype(at::kFloat));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  fwd_kernel<<<row_grid(half, B), kThreads, 0, stream>>>(
      t.const_data_ptr<float>(), t.stride(0), ptr_or_null(freqs), stride_or_zero(freqs),
      out.mutable_data_ptr<float>(), B, half, dim, static_cast<float>(std::log(max_period)),
      static_cast<float>(time_scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor time_embedding_jvp(const at::Tensor& t, const c10::optional<at::Tensor>& t_dot, int64_t dim,
                              double max_period, double time_scale, const c10::optional<at::Tensor>& freqs,
                              const c10::optional<at::Tensor>& freqs_dot) {
  check_common(t, dim, max_period, freqs);
  const int64_t B = t.size(0), half = dim / 2;
  if (t_dot.has_value()) check_vec(*t_dot, "t_dot", B, t);
  const bool has_fd = freqs.has_value() && freqs_dot.has_value();
  if (has_fd) check_vec(*freqs_dot, "freqs_dot", half, t);
  const c10::cuda::CUDAGuard guard(t.device());
  at::Tensor out = at::empty({B, dim}, t.options().dtype(at::kFloat));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  jvp_kernel<<<row_grid(half, B), kThreads, 0, stream>>>(
      t.const_data_ptr<float>(), t.stride(0), ptr_or_null(t_dot), stride_or_zero(t_dot), ptr_or_null(freqs),
      stride_or_zero(freqs), has_fd ? freqs_dot->const_data_ptr<float>() : nullptr,
      has_fd ? freqs_dot->stride(0) : 0, out.mutable_data_ptr<float>(), B, half, dim,
      static_cast<float>(std::log(max_period)), static_cast<float>(time_scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> time_embedding_backward(const at::Tensor& grad, const at::Tensor& t, int64_t dim,
                                                           double max_period, double time_scale,
                                                           const c10::optional<at::Tensor>& freqs, bool need_dfreqs) {
  check_common(t, dim, max_period, freqs);
  const int64_t B = t.size(0), half = dim / 2;
  TORCH_CHECK(grad.is_cuda() && grad.device() == t.device(), "time_embedding_backward: grad must be on ", t.device());
  TORCH_CHECK(grad.scalar_type() == at::kFloat, "time_embedding_backward: grad must be float32, got ",
              grad.scalar_type());
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == B && grad.size(1) == dim,
              "time_embedding_backward: grad must have shape (", B, ", ", dim, "), got ", grad.sizes());
  TORCH_CHECK(grad.stride(1) == 1 || dim == 1, "time_embedding_backward: grad must have inner stride 1");
  const c10::cuda::CUDAGuard guard(t.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const float lmp = static_cast<float>(std::log(max_period));
  const float s = static_cast<float>(time_scale);
  at::Tensor dt = at::empty({B}, t.options().dtype(at::kFloat));
  const unsigned rows_grid = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(B, kMaxGridY)));
  bwd_dt_kernel<<<rows_grid, kThreads, 0, stream>>>(grad.const_data_ptr<float>(), grad.stride(0),
                                                     t.const_data_ptr<float>(), t.stride(0), ptr_or_null(freqs),
                                                     stride_or_zero(freqs), dt.mutable_data_ptr<float>(), B, half,
                                                     lmp, s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!(need_dfreqs && freqs.has_value())) return {dt, at::empty({0}, t.options().dtype(at::kFloat))};
  const int64_t n_chunks = (B + kRowsPerChunk - 1) / kRowsPerChunk;
  at::Tensor partial = at::empty({n_chunks, half}, t.options().dtype(at::kFloat));
  bwd_df_partial_kernel<<<row_grid(half, n_chunks), kThreads, 0, stream>>>(
      grad.const_data_ptr<float>(), grad.stride(0), t.const_data_ptr<float>(), t.stride(0),
      freqs->const_data_ptr<float>(), freqs->stride(0), partial.mutable_data_ptr<float>(), B, half, n_chunks, s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor df = at::empty({half}, t.options().dtype(at::kFloat));
  bwd_df_sum_kernel<<<static_cast<unsigned>((half + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      partial.const_data_ptr<float>(), df.mutable_data_ptr<float>(), half, n_chunks, kTwoPi * s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dt, df};
}

}  // namespace
}  // namespace scm::cuda

TORCH_LIBRARY_IMPL(scm, CUDA, m) {
  m.impl("time_embedding", &scm::cuda::time_embedding);
  m.impl("time_embedding_jvp", &scm::cuda::time_embedding_jvp);
  m.impl("time_embedding_backward", &scm::cuda::time_embedding_backward);
}
