// CUDA kernels of the sCM loss (A14-A17): torch.ops.scm.scm_loss / scm_loss_backward / scm_loss_jvp.
//
// Per sample b (D elements, ct = cos t_b, st = sin t_b, w = exp(-logvar_b) or 1):
//   (A14) g_i   = a_fm * Fm_i + a_dx * dx_i + a_x * x_i + a_j * J_i
//               a_fm = -ct^2 sigma_d, a_dx = ct^2, a_x = -r ct st, a_j = -r sigma_d
//   (A16) gnorm = ||g||_2,  g^ = g / (gnorm + c)
//   (A17) e_i   = F_i - Fm_i - g^_i,  sqerr = ||e||^2,  loss = w / D * sqerr + logvar_b
//   backward: dF_i = grad_b * 2 w / D * e_i;  jvp: dot_b = sum_i e_i * Fdot_i.
// Without F_minus, F^- = F.detach() and e = -g^ exactly (the kernels read F in F^-'s place).
//
// Forward and JVP: one block per sample; each thread strides over D accumulating in fp32, then a
// block reduction (warp shuffles, one shared slot per warp). The reduction order depends only on
// the block size, so the results are deterministic. Backward: a flattened (sample, D-tile) grid,
// elementwise, no atomics.
// Operands are (B, D) views with inner stride 1 and a free row stride (0 when broadcast over the
// batch); each has its own dtype (fp32/fp16/bf16/fp64), read through a uniform per-operand switch
// so that mixed dtypes need no template explosion. All arithmetic is fp32.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "scm/math.h"

namespace scm::cuda {
namespace {

constexpr int kThreads = 256;              // threads per block (8 warps)
constexpr int kWarps = kThreads / 32;
constexpr int kPerThread = 4;              // elements per thread in the backward tile
constexpr int kTile = kThreads * kPerThread;

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

int dtype_code(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default: TORCH_CHECK(false, "scm_loss: ", name, " must be float32, float16, bfloat16 or float64, got ",
                         x.scalar_type());
  }
  return kF32;
}

// One (B, D) operand: base pointer, row stride in bytes, dtype code.
struct Operand {
  const char* base;
  int64_t row_bytes;
  int dt;
};

__device__ __forceinline__ float load(const Operand& o, int64_t b, int64_t i) {
  const char* row = o.base + b * o.row_bytes;
  switch (o.dt) {
    case kF32: return reinterpret_cast<const float*>(row)[i];
    case kF16: return static_cast<float>(reinterpret_cast<const c10::Half*>(row)[i]);
    case kBF16: return static_cast<float>(reinterpret_cast<const c10::BFloat16*>(row)[i]);
    default: return static_cast<float>(reinterpret_cast<const double*>(row)[i]);
  }
}

__device__ __forceinline__ void store(char* base, int dt, int64_t i, float v) {
  switch (dt) {
    case kF32: reinterpret_cast<float*>(base)[i] = v; break;
    case kF16: reinterpret_cast<c10::Half*>(base)[i] = static_cast<c10::Half>(v); break;
    case kBF16: reinterpret_cast<c10::BFloat16*>(base)[i] = static_cast<c10::BFloat16>(v); break;
    default: reinterpret_cast<double*>(base)[i] = static_cast<double>(v); break;
  }
}

struct Params {
  Operand F, J, x, dx, Fm;
  bool has_fm;
  const float* t;
  int64_t stride_t;
  float sigma_d, r, c;
  int64_t D;
};


// (A14) g_i and (F - F^-)_i (0 without F_minus) of element i of sample b.
__device__ __forceinline__ void g_and_diff(const Params& p, const LossCoef& k, int64_t b, int64_t i, float& g,
                                           float& diff) {
  const float f = load(p.F, b, i);
  const float fm = p.has_fm ? load(p.Fm, b, i) : f;
  g = k.fm * fm + k.dx * load(p.dx, b, i) + k.x * load(p.x, b, i) + k.j * load(p.J, b, i);
  diff = f - fm;
}

// Sum of v over the block, returned to every thread (fixed order: deterministic).
__device__ __forceinline__ float block_sum(float v, float* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? smem[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) smem[kWarps] = v;
  }
  __syncthreads();
  const float total = smem[kWarps];
  __syncthreads();  // smem is reused by the next call
  return total;
}

// Forward: block b computes gnorm (pass 1) and sqerr (pass 2) of sample b.
__global__ void __launch_bounds__(kThreads) scm_loss_fwd_kernel(Params p, const float* __restrict__ lv,
                                                                int64_t stride_lv, float* __restrict__ loss,
                                                                float* __restrict__ gnorm,
                                                                float* __restrict__ sqerr) {
  __shared__ float smem[kWarps + 1];
  const int64_t b = blockIdx.x;
  const LossCoef k = loss_coef(p.t[b * p.stride_t], p.sigma_d, p.r);
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < p.D; i += kThreads) {
    float g, diff;
    g_and_diff(p, k, b, i, g, diff);
    acc += g * g;
  }
  const float gn = sqrtf(block_sum(acc, smem));
  const float inv = 1.f / (gn + p.c);
  acc = 0.f;
  for (int64_t i = threadIdx.x; i < p.D; i += kThreads) {
    float g, diff;
    g_and_diff(p, k, b, i, g, diff);
    const float e = diff - g * inv;
    acc += e * e;
  }
  const float sq = block_sum(acc, smem);
  if (threadIdx.x == 0) {
    const float inv_D = 1.f / static_cast<float>(p.D);
    float L = sq * inv_D;
    if (lv != nullptr) {
      const float v = lv[b * stride_lv];
      L = expf(-v) * inv_D * sq + v;
    }
    loss[b] = L;
    gnorm[b] = gn;
    sqerr[b] = sq;
  }
}

// Backward: block (b, tile) writes dF = grad * 2 w / D * e for kTile elements of sample b.
__global__ void __launch_bounds__(kThreads) scm_loss_bwd_kernel(Params p, const float* __restrict__ grad,
                                                                int64_t stride_grad, const float* __restrict__ lv,
                                                                int64_t stride_lv, const float* __restrict__ gnorm,
                                                                int64_t n_tiles, char* __restrict__ out,
                                                                int64_t out_row_bytes, int out_dt) {
  const int64_t b = blockIdx.x / n_tiles, tile = blockIdx.x % n_tiles;
  const LossCoef k = loss_coef(p.t[b * p.stride_t], p.sigma_d, p.r);
  const float inv = 1.f / (gnorm[b] + p.c);
  float scale = 2.f / static_cast<float>(p.D) * grad[b * stride_grad];
  if (lv != nullptr) scale *= expf(-lv[b * stride_lv]);
  char* row = out + b * out_row_bytes;  // dF is (B, D) contiguous
#pragma unroll
  for (int u = 0; u < kPerThread; ++u) {
    const int64_t i = tile * kTile + u * kThreads + threadIdx.x;
    if (i < p.D) {
      float g, diff;
      g_and_diff(p, k, b, i, g, diff);
      store(row, out_dt, i, scale * (diff - g * inv));
    }
  }
}

// JVP: block b computes sum_i e_i * Fdot_i of sample b.
__global__ void __launch_bounds__(kThreads) scm_loss_jvp_kernel(Params p, Operand fdot,
                                                                const float* __restrict__ gnorm,
                                                                float* __restrict__ dot) {
  __shared__ float smem[kWarps + 1];
  const int64_t b = blockIdx.x;
  const LossCoef k = loss_coef(p.t[b * p.stride_t], p.sigma_d, p.r);
  const float inv = 1.f / (gnorm[b] + p.c);
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < p.D; i += kThreads) {
    float g, diff;
    g_and_diff(p, k, b, i, g, diff);
    acc += (diff - g * inv) * load(fdot, b, i);
  }
  const float s = block_sum(acc, smem);
  if (threadIdx.x == 0) dot[b] = s;
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
Operand operand(const at::Tensor& x, const char* name, int64_t B, int64_t D) {
  TORCH_CHECK(x.is_cuda(), "scm_loss: ", name, " must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == B && x.size(1) == D, "scm_loss: ", name, " must have shape (", B, ", ",
              D, "), got ", x.sizes());
  TORCH_CHECK(D <= 1 || x.stride(1) == 1, "scm_loss: ", name, " must have inner stride 1, got ", x.stride(1));
  return {static_cast<const char*>(x.const_data_ptr()), x.stride(0) * static_cast<int64_t>(x.element_size()),
          dtype_code(x, name)};
}

void check_vec(const at::Tensor& x, const char* name, int64_t B) {
  TORCH_CHECK(x.is_cuda(), "scm_loss: ", name, " must be a CUDA tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "scm_loss: ", name, " must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 1 && x.size(0) == B, "scm_loss: ", name, " must have shape (", B, "), got ", x.sizes());
}

Params make_params(const at::Tensor& F, const at::Tensor& J, const at::Tensor& x_t, const at::Tensor& dxt_dt,
                   const at::Tensor& t, const std::optional<at::Tensor>& F_minus, double sigma_d, double r,
                   double c) {
  TORCH_CHECK(F.dim() == 2, "scm_loss: F must be a (B, D) view, got ", F.sizes());
  const int64_t B = F.size(0), D = F.size(1);
  TORCH_CHECK(B > 0 && D > 0, "scm_loss: F must not be empty, got ", F.sizes());
  TORCH_CHECK(B <= static_cast<int64_t>(INT32_MAX), "scm_loss: batch too large for the grid, got ", B);
  Params p;
  p.F = operand(F, "F", B, D);
  p.J = operand(J, "J", B, D);
  p.x = operand(x_t, "x_t", B, D);
  p.dx = operand(dxt_dt, "dxt_dt", B, D);
  p.has_fm = F_minus.has_value();
  p.Fm = p.has_fm ? operand(*F_minus, "F_minus", B, D) : p.F;
  check_vec(t, "t", B);
  p.t = t.const_data_ptr<float>();
  p.stride_t = t.stride(0);
  p.sigma_d = static_cast<float>(sigma_d);
  p.r = static_cast<float>(r);
  p.c = static_cast<float>(c);
  p.D = D;
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scm_loss_cuda(const at::Tensor& F, const at::Tensor& J,
                                                             const at::Tensor& x_t, const at::Tensor& dxt_dt,
                                                             const at::Tensor& t,
                                                             const std::optional<at::Tensor>& logvar,
                                                             const std::optional<at::Tensor>& F_minus,
                                                             double sigma_d, double r, double c) {
  const c10::cuda::CUDAGuard guard(F.device());
  const Params p = make_params(F, J, x_t, dxt_dt, t, F_minus, sigma_d, r, c);
  const int64_t B = F.size(0);
  if (logvar.has_value()) check_vec(*logvar, "logvar", B);
  const auto opts = F.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({B}, opts), gnorm = at::empty({B}, opts), sqerr = at::empty({B}, opts);
  const float* lv = logvar.has_value() ? logvar->const_data_ptr<float>() : nullptr;
  const int64_t slv = logvar.has_value() ? logvar->stride(0) : 0;
  scm_loss_fwd_kernel<<<static_cast<unsigned>(B), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      p, lv, slv, loss.mutable_data_ptr<float>(), gnorm.mutable_data_ptr<float>(), sqerr.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, gnorm, sqerr};
}

at::Tensor scm_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& F, const at::Tensor& J,
                                  const at::Tensor& x_t, const at::Tensor& dxt_dt, const at::Tensor& t,
                                  const std::optional<at::Tensor>& logvar, const std::optional<at::Tensor>& F_minus,
                                  const at::Tensor& gnorm, double sigma_d, double r, double c) {
  const c10::cuda::CUDAGuard guard(F.device());
  const Params p = make_params(F, J, x_t, dxt_dt, t, F_minus, sigma_d, r, c);
  const int64_t B = F.size(0), D = F.size(1);
  check_vec(grad_loss, "grad_loss", B);
  check_vec(gnorm, "gnorm", B);
  if (logvar.has_value()) check_vec(*logvar, "logvar", B);
  at::Tensor dF = at::empty({B, D}, F.options());
  const int64_t n_tiles = (D + kTile - 1) / kTile;
  TORCH_CHECK(B * n_tiles <= static_cast<int64_t>(INT32_MAX), "scm_loss_backward: too many tiles, B = ", B,
              ", D = ", D);
  const float* lv = logvar.has_value() ? logvar->const_data_ptr<float>() : nullptr;
  const int64_t slv = logvar.has_value() ? logvar->stride(0) : 0;
  scm_loss_bwd_kernel<<<static_cast<unsigned>(B * n_tiles), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      p, grad_loss.const_data_ptr<float>(), grad_loss.stride(0), lv, slv, gnorm.const_data_ptr<float>(), n_tiles,
      static_cast<char*>(dF.mutable_data_ptr()), D * static_cast<int64_t>(dF.element_size()), dtype_code(dF, "F"));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dF;
}

at::Tensor scm_loss_jvp_cuda(const at::Tensor& F_dot, const at::Tensor& F, const at::Tensor& J,
                             const at::Tensor& x_t, const at::Tensor& dxt_dt, const at::Tensor& t,
                             const std::optional<at::Tensor>& F_minus, const at::Tensor& gnorm, double sigma_d,
                             double r, double c) {
  const c10::cuda::CUDAGuard guard(F.device());
  const Params p = make_params(F, J, x_t, dxt_dt, t, F_minus, sigma_d, r, c);
  const int64_t B = F.size(0), D = F.size(1);
  const Operand fdot = operand(F_dot, "F_dot", B, D);
  check_vec(gnorm, "gnorm", B);
  at::Tensor dot = at::empty({B}, F.options().dtype(at::kFloat));
  scm_loss_jvp_kernel<<<static_cast<unsigned>(B), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      p, fdot, gnorm.const_data_ptr<float>(), dot.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dot;
}

}  // namespace
}  // namespace scm::cuda

TORCH_LIBRARY_IMPL(scm, CUDA, m) {
  m.impl("scm_loss", &scm::cuda::scm_loss_cuda);
  m.impl("scm_loss_backward", &scm::cuda::scm_loss_backward_cuda);
  m.impl("scm_loss_jvp", &scm::cuda::scm_loss_jvp_cuda);
}
