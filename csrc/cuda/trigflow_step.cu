// trigflow_step (A23) on CUDA: the two schema ops of csrc/ops.cpp.
//
//   out = cx * x_t + cf * F + ce * eps   (scm::trig_coef, fp32), noise_mode 0 denoise, 1 eps = noise,
//   2 eps = scm::philox_normal(seed, b * D + k), 3 eps = 0; out_uint8: scm::to_pixel.
// Grid (cdiv(D, kBlock * kPerThread), min(B, 65535)); blocks loop over samples beyond grid.y.
// Operand dtypes (fp32/fp16/bf16/fp64, possibly different) are a runtime switch per load: uniform
// across the grid, so the branch costs nothing next to the memory traffic.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "scm/math.h"

namespace scm::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;
constexpr int64_t kTile = kThreads * kPerThread;
constexpr int64_t kMaxGridY = 65535;

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default: TORCH_CHECK(false, "trigflow_step: unsupported dtype ", t);
  }
  return kF32;
}

__device__ __forceinline__ float load_f32(const void* p, int64_t i, int dt) {
  switch (dt) {
    case kF16: return __half2float(static_cast<const __half*>(p)[i]);
    case kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case kF64: return static_cast<float>(static_cast<const double*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_f32(void* p, int64_t i, int dt, float v) {
  switch (dt) {
    case kF16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case kBF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    case kF64: static_cast<double*>(p)[i] = static_cast<double>(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

struct FwdArgs {
  const void* x; const void* f; const void* n; void* out;
  const float* t; const float* s;
  int64_t stride_x, stride_f, stride_n, stride_t, stride_s;  // row strides (elements)
  int64_t B, D;
  float sigma_d;
  uint64_t seed;
  int mode, dx, df, dn;
  bool out_u8;
};

__global__ void trigflow_step_fwd_kernel(FwdArgs a) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kTile;
  for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {
    const bool renoise = a.mode != 0;
    const TrigCoef c = trig_coef(a.t[b * a.stride_t], renoise ? a.s[b * a.stride_s] : 0.f, renoise, a.sigma_d);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t k = base + j * kThreads + threadIdx.x;
      if (k >= a.D) break;
      float v = c.cx * load_f32(a.x, b * a.stride_x + k, a.dx) + c.cf * load_f32(a.f, b * a.stride_f + k, a.df);
      if (a.mode == 1) v += c.ce * load_f32(a.n, b * a.stride_n + k, a.dn);
      if (a.mode == 2) v += c.ce * philox_normal(a.seed, static_cast<uint64_t>(b * a.D + k));
      if (a.out_u8) {
        static_cast<uint8_t*>(a.out)[b * a.D + k] = to_pixel(v);
      } else {
        store_f32(a.out, b * a.D + k, a.dx, v);
      }
    }
  }
}

struct BwdArgs {
  const void* g; void* dx; void* df;
  const float* t; const float* s;
  int64_t stride_g, stride_t, stride_s, B, D;
  float sigma_d;
  int dg, ddx, ddf;
  bool renoise, need_x, need_f;
};

__global__ void trigflow_step_bwd_kernel(BwdArgs a) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kTile;
  for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {
    const TrigCoef c = trig_coef(a.t[b * a.stride_t], a.renoise ? a.s[b * a.stride_s] : 0.f, a.renoise, a.sigma_d);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t k = base + j * kThreads + threadIdx.x;
      if (k >= a.D) break;
      const float g = load_f32(a.g, b * a.stride_g + k, a.dg);
      if (a.need_x) store_f32(a.dx, b * a.D + k, a.ddx, c.cx * g);
      if (a.need_f) store_f32(a.df, b * a.D + k, a.ddf, c.cf * g);
    }
  }
}

void check_rows(const at::Tensor& x, const char* name, int64_t B, int64_t D) {
  TORCH_CHECK(x.is_cuda(), "trigflow_step: ", name, " must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == B && x.size(1) == D, "trigflow_step: ", name, " must have shape (", B,
              ", ", D, "), got ", x.sizes());
  TORCH_CHECK(D <= 1 || x.stride(1) == 1, "trigflow_step: ", name, " must have inner stride 1, got ", x.stride(1));
}

// x_t, F, noise: a (B, D) view with inner stride 1 and a free row stride, or a contiguous tensor of
// x_t's shape (B, ...) whose samples are rows of D = numel / B elements. The output has x_t's shape.
void check_samples(const at::Tensor& x, const at::Tensor& ref, const char* name) {
  if (x.dim() == 2 && ref.dim() == 2) {
    check_rows(x, name, ref.size(0), ref.size(1));
    return;
  }
  TORCH_CHECK(x.is_cuda(), "trigflow_step: ", name, " must be a CUDA tensor");
  TORCH_CHECK(x.sizes() == ref.sizes(), "trigflow_step: ", name, " must have shape ", ref.sizes(), ", got ",
              x.sizes());
  TORCH_CHECK(x.is_contiguous() && ref.is_contiguous(), "trigflow_step: ", name,
              ": tensors other than (B, D) views must be contiguous");
}

void check_times(const at::Tensor& t, const char* name, int64_t B) {
  TORCH_CHECK(t.is_cuda(), "trigflow_step: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, "trigflow_step: ", name, " must have shape (", B, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "trigflow_step: ", name, " must be float32, got ", t.scalar_type());
}

dim3 grid_for(int64_t B, int64_t D) {
  return dim3(static_cast<unsigned>((D + kTile - 1) / kTile), static_cast<unsigned>(std::min(B, kMaxGridY)));
}

at::Tensor trigflow_step_cuda(const at::Tensor& x_t, const at::Tensor& F, const at::Tensor& t,
                              const std::optional<at::Tensor>& t_next, const std::optional<at::Tensor>& noise,
                              double sigma_d, int64_t seed, int64_t noise_mode, bool out_uint8) {
  TORCH_CHECK(x_t.dim() >= 1, "trigflow_step: x_t must have a batch dim, got ", x_t.sizes());
  const int64_t B = x_t.size(0), D = B > 0 ? x_t.numel() / B : 0;
  check_samples(x_t, x_t, "x_t");
  check_samples(F, x_t, "F");
  check_times(t, "t", B);
  TORCH_CHECK(noise_mode >= 0 && noise_mode <= 3, "trigflow_step: noise_mode must be 0..3, got ", noise_mode);
  if (noise_mode != 0) {
    TORCH_CHECK(t_next.has_value(), "trigflow_step: noise_mode ", noise_mode, " needs t_next");
    check_times(*t_next, "t_next", B);
  }
  if (noise_mode == 1) {
    TORCH_CHECK(noise.has_value(), "trigflow_step: noise_mode 1 needs noise");
    check_samples(*noise, x_t, "noise");
  }
  TORCH_CHECK(!out_uint8 || noise_mode == 0, "trigflow_step: out_uint8 is for the last step (noise_mode 0)");
  TORCH_CHECK(seed >= 0, "trigflow_step: seed must be >= 0, got ", seed);
  c10::cuda::CUDAGuard guard(x_t.device());
  at::Tensor out = at::empty(x_t.sizes(), x_t.options().dtype(out_uint8 ? at::kByte : x_t.scalar_type()));
  if (B == 0 || D == 0) return out;
  FwdArgs a;
  a.x = x_t.const_data_ptr();
  a.f = F.const_data_ptr();
  a.n = noise_mode == 1 ? noise->const_data_ptr() : nullptr;
  a.out = out.mutable_data_ptr();
  a.t = t.const_data_ptr<float>();
  a.s = noise_mode != 0 ? t_next->const_data_ptr<float>() : nullptr;
  a.stride_x = x_t.stride(0);
  a.stride_f = F.stride(0);
  a.stride_n = noise_mode == 1 ? noise->stride(0) : 0;
  a.stride_t = t.stride(0);
  a.stride_s = noise_mode != 0 ? t_next->stride(0) : 0;
  a.B = B;
  a.D = D;
  a.sigma_d = static_cast<float>(sigma_d);
  a.seed = static_cast<uint64_t>(seed);
  a.mode = static_cast<int>(noise_mode);
  a.dx = dtype_code(x_t.scalar_type());
  a.df = dtype_code(F.scalar_type());
  a.dn = noise_mode == 1 ? dtype_code(noise->scalar_type()) : kF32;
  a.out_u8 = out_uint8;
  trigflow_step_fwd_kernel<<<grid_for(B, D), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> trigflow_step_backward_cuda(
    const at::Tensor& grad, const at::Tensor& t, const std::optional<at::Tensor>& t_next, double sigma_d,
    bool renoise, bool need_x, bool need_F, at::ScalarType x_dtype, at::ScalarType F_dtype) {
  TORCH_CHECK(grad.dim() == 2, "trigflow_step_backward: grad must be a (B, D) view, got ", grad.sizes());
  const int64_t B = grad.size(0), D = grad.size(1);
  check_rows(grad, "grad", B, D);
  check_times(t, "t", B);
  if (renoise) {
    TORCH_CHECK(t_next.has_value(), "trigflow_step_backward: renoise needs t_next");
    check_times(*t_next, "t_next", B);
  }
  c10::cuda::CUDAGuard guard(grad.device());
  std::optional<at::Tensor> dx, dF;
  if (need_x) dx = at::empty({B, D}, grad.options().dtype(x_dtype));
  if (need_F) dF = at::empty({B, D}, grad.options().dtype(F_dtype));
  if (!(need_x || need_F) || B == 0 || D == 0) return {dx, dF};
  BwdArgs a;
  a.g = grad.const_data_ptr();
  a.dx = need_x ? dx->mutable_data_ptr() : nullptr;
  a.df = need_F ? dF->mutable_data_ptr() : nullptr;
  a.t = t.const_data_ptr<float>();
  a.s = renoise ? t_next->const_data_ptr<float>() : nullptr;
  a.stride_g = grad.stride(0);
  a.stride_t = t.stride(0);
  a.stride_s = renoise ? t_next->stride(0) : 0;
  a.B = B;
  a.D = D;
  a.sigma_d = static_cast<float>(sigma_d);
  a.dg = dtype_code(grad.scalar_type());
  a.ddx = dtype_code(x_dtype);
  a.ddf = dtype_code(F_dtype);
  a.renoise = renoise;
  a.need_x = need_x;
  a.need_f = need_F;
  trigflow_step_bwd_kernel<<<grid_for(B, D), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dF};
}

}  // namespace
}  // namespace scm::cuda

TORCH_LIBRARY_IMPL(scm, CUDA, m) {
  m.impl("trigflow_step", &scm::cuda::trigflow_step_cuda);
  m.impl("trigflow_step_backward", &scm::cuda::trigflow_step_backward_cuda);
}
