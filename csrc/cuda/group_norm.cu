// CUDA kernels of the fused GroupNorm (A28-A30): torch.ops.scm.group_norm / group_norm_jvp /
// group_norm_backward, and of the pixel norm (A11): torch.ops.scm.pixel_norm / _jvp / _backward.
//
// GroupNorm: the decomposition of the Triton kernels (scm_kernels/group_norm/triton_kernels.py).
// x is an (N, C, S) view, channels-first (channel rows of S) or channels-last (position rows of C);
// every (N, C, S) operand has that layout with its own batch stride; outputs are packed. Block
// (n, g, k) covers channels [g Cg, (g+1) Cg) and positions [k s_split, (k+1) s_split) of sample n:
// nsplit > 1 splits a group over several blocks when N * G blocks cannot fill the GPU. Modes:
//   0 fused    (nsplit == 1) reduce the group, then write the outputs (the re-read hits L1/L2);
//   1 partial  write the block's partial reductions;
//   2 apply    combine the group's partials in split order, then write the outputs.
// (template arguments of the kernels, so that each mode compiles to its own straight-line kernel)
// Forward (A28): two-pass moments of the block's range (sum of x - pivot, then sum (x - mean)^2),
// merged across splits with Chan's formula (scm::merge); y = act((x - mu) r gamma s + beta s + b).
// JVP (A29): sums of x_dot and of (x - mu) x_dot, then y_dot. Backward (A30): per-channel sums
// P1 = sum da x^, P2 = sum da over the block's positions, (N, C, nsplit); in mode 0 the block then
// forms m1 = sum_c A P2 / M, m2 = sum_c A P1 / M (A = gamma s) and writes dx = r (da A - m1 - x^ m2);
// with splits the host adds the partials in order and passes (m1, m2) per group (mode 2).
// Loads are vectorized (16-byte packs) when the contiguous runs and all offsets allow it; sums are
// fp32, reduced with warp shuffles and one shared slot per warp in a fixed order (deterministic,
// no atomics). Divisions and square roots use the fast device forms (scm::fdiv, rsqrt_of,
// __fdividef in scm::sigmoid): the IEEE ones call a slow-path subroutine that makes ptxas spill.
//
// Pixel norm (A11) over dim 1 of an (O, C, I) view, r = (mean_c a^2 + eps)^(-1/2), y = a r, and for
// a tangent or upstream gradient t: out = r (t - a r^2 mean_c(a t)). Rows layout (I == 1, C
// contiguous): one warp per row; planes (stride(2) == 1): one thread per (o, i), looping over C.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "scm/norm.h"

namespace scm::cuda_gn {
namespace {

// Kernels are declared __launch_bounds__(kThreads, 1): with kThreads alone, ptxas (CUDA 13) caps some
// of them at 64 registers and spills a few bytes; they need up to ~80.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kTargetBlocks = 512;  // split groups until about this many blocks run
constexpr int64_t kMinPerBlock = 4096;  // ... each with at least this many elements
constexpr int64_t kSplitAlign = 64;     // s_split is a multiple of this (any pack width divides it)

// Modes of the kernels (template arguments: with a runtime mode ptxas spills a register in some builds).
using Fused = std::integral_constant<int, 0>;    // nsplit == 1: reduce, then write
using Partial = std::integral_constant<int, 1>;  // write the block's partial reductions
using Apply = std::integral_constant<int, 2>;    // combine the partials, then write
constexpr Fused kFused{};
constexpr Partial kPartial{};
constexpr Apply kApply{};

// V consecutive elements, loaded / stored in one transaction.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block, returned to every thread (fixed order: deterministic). Every warp adds the
// per-warp partials itself, so that no shuffle sits in a branch: a shuffle in a divergent branch
// compiles to a subroutine call, whose call frame makes ptxas spill.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = warp_sum(lane < kWarps ? smem[lane] : 0.f);
  __syncthreads();  // smem is reused by the next call
  return v;
}

// Per-channel fp32 operand: (C,) or (N, C) with strides; p == nullptr: the constant dflt.
struct Chan {
  const float* p;
  int64_t sn, sc;
  float dflt;
  __device__ __forceinline__ float at(int64_t n, int64_t c) const { return p != nullptr ? p[n * sn + c * sc] : dflt; }
};

struct Affine {
  Chan w, b, s, sh;  // gamma, beta (C,), scale, shift (N, C)
};

// Sizes are int32 (the host checks C S < 2^31 and the block count): 64-bit integer division
// compiles to a subroutine call, whose call frame makes ptxas spill.
struct Geo {
  int32_t C, S, Cg, G, nsplit, s_split;
  bool cl;
  float M, invM;  // elements per group and 1 / M (host-rounded)
};

// The block's (sample, group, split) and its positions [s_lo, s_lo + len).
struct Range {
  int32_t n, g, ng, k, s_lo, len;
};

__device__ __forceinline__ Range block_range(const Geo& q) {
  Range r;
  const int32_t b = static_cast<int32_t>(blockIdx.x);
  r.k = b % q.nsplit;
  r.ng = b / q.nsplit;
  r.n = r.ng / q.G;
  r.g = r.ng % q.G;
  r.s_lo = r.k * q.s_split;
  r.len = min(q.S, r.s_lo + q.s_split) - r.s_lo;
  return r;
}

// Element j of the block's range in memory order -> its offset inside the sample and its channel.
// Channels-first: rows are channels (len positions each); channels-last: rows are positions (Cg
// channels each). V consecutive j (j a multiple of V) share a row when V divides the row length.
__device__ __forceinline__ void locate(const Geo& q, const Range& r, int32_t j, int32_t& off, int32_t& c) {
  if (q.cl) {
    const int32_t s = j / q.Cg;
    const int32_t cl = j - s * q.Cg;
    c = r.g * q.Cg + cl;
    off = (r.s_lo + s) * q.C + c;
  } else {
    const int32_t cl = j / r.len;
    c = r.g * q.Cg + cl;
    off = c * q.S + r.s_lo + (j - cl * r.len);
  }
}

template <typename T, int V>
__device__ __forceinline__ void load_pack(const T* p, float* out) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int v = 0; v < V; ++v) out[v] = static_cast<float>(pk.v[v]);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const float* in) {
  Pack<T, V> pk;
#pragma unroll
  for (int v = 0; v < V; ++v) pk.v[v] = static_cast<T>(in[v]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

// Loop over the packs of the block's range: OFF is the pack's offset inside the sample, C the channel
// of its first element (channels-last packs step one channel per element). A plain loop, not a
// function taking a lambda: accumulators captured by reference end up in local memory.
#define SCM_GN_FOR_PACKS(q, r, V, OFF, C)                                                           \
  for (int64_t j_ = static_cast<int64_t>(threadIdx.x) * (V), total_ = int64_t{(q).Cg} * (r).len; j_ < total_; \
       j_ += static_cast<int64_t>(kThreads) * (V))                                                  \
    if (int32_t OFF = 0, C = 0; locate((q), (r), static_cast<int32_t>(j_), OFF, C), true)

// ---------------------------------------------------------------------------------------------
// Forward (A28)
// ---------------------------------------------------------------------------------------------
template <typename T, int V, int kMode>
__global__ void __launch_bounds__(kThreads, 1)
    gn_fwd_kernel(Geo q, const T* __restrict__ x, int64_t sx, T* __restrict__ y, int64_t sy, Affine af,
                  float eps, float* __restrict__ mean, float* __restrict__ rstd, float* __restrict__ part, bool silu) {
  __shared__ float smem[kWarps];
  const Range r = block_range(q);
  const T* xs = x + int64_t{r.n} * sx;
  Moments m{0.f, 0.f, 0.f};
  if constexpr (kMode == 2) {
    for (int32_t k = 0; k < q.nsplit; ++k) {
      const float* p = part + (int64_t{r.ng} * q.nsplit + k) * 3;
      m = merge(m, Moments{p[0], p[1], p[2]});
    }
  } else {
    int32_t off0, c0;
    locate(q, r, 0, off0, c0);
    const float pivot = static_cast<float>(xs[off0]);
    float acc = 0.f;
    SCM_GN_FOR_PACKS(q, r, V, off, c) {
      float v[V];
      load_pack<T, V>(xs + off, v);
#pragma unroll
      for (int i = 0; i < V; ++i) acc += v[i] - pivot;
    }
    const float cnt = static_cast<float>(int64_t{q.Cg} * r.len);
    const float bm = pivot + fdiv(block_sum(acc, smem), cnt);
    acc = 0.f;
    SCM_GN_FOR_PACKS(q, r, V, off, c) {
      float v[V];
      load_pack<T, V>(xs + off, v);
#pragma unroll
      for (int i = 0; i < V; ++i) acc += (v[i] - bm) * (v[i] - bm);
    }
    m = Moments{cnt, bm, block_sum(acc, smem)};
  }
  if constexpr (kMode == 1) {
    if (threadIdx.x == 0) {
      float* p = part + static_cast<int64_t>(blockIdx.x) * 3;
      p[0] = m.n;
      p[1] = m.mean;
      p[2] = m.m2;
    }
    return;
  }
  const float mu = m.mean, rs = group_rstd(m, q.M, eps);
  if (r.k == 0 && threadIdx.x == 0) {
    mean[r.ng] = mu;
    rstd[r.ng] = rs;
  }
  T* ys = y + int64_t{r.n} * sy;
  SCM_GN_FOR_PACKS(q, r, V, off, c) {
    float v[V];
    load_pack<T, V>(xs + off, v);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int32_t ci = q.cl ? c + i : c;
      const float s = af.s.at(r.n, ci);
      const float a = (v[i] - mu) * (af.w.at(0, ci) * s * rs) + (af.b.at(0, ci) * s + af.sh.at(r.n, ci));
      v[i] = silu ? a * sigmoid(a) : a;
    }
    store_pack<T, V>(ys + off, v);
  }
}

// ---------------------------------------------------------------------------------------------
// JVP (A29)
// ---------------------------------------------------------------------------------------------
template <typename T, int V, int kMode>
__global__ void __launch_bounds__(kThreads, 1)
    gn_jvp_kernel(Geo q, const T* __restrict__ x, int64_t sx, const T* __restrict__ xd, int64_t sxd,
                  T* __restrict__ yd, int64_t syd, Affine af, Affine tg, const float* __restrict__ mean,
                  const float* __restrict__ rstd, float* __restrict__ part, bool silu) {
  __shared__ float smem[kWarps];
  const Range r = block_range(q);
  const T* xs = x + int64_t{r.n} * sx;
  const T* xds = xd != nullptr ? xd + int64_t{r.n} * sxd : nullptr;
  const float mu = mean[r.ng], rs = rstd[r.ng];
  float sum_d = 0.f, sum_xd = 0.f;  // sum x_dot, sum (x - mu) x_dot
  if constexpr (kMode == 2) {
    for (int32_t k = 0; k < q.nsplit; ++k) {
      sum_d += part[(int64_t{r.ng} * q.nsplit + k) * 2];
      sum_xd += part[(int64_t{r.ng} * q.nsplit + k) * 2 + 1];
    }
  } else if (xds != nullptr) {
    SCM_GN_FOR_PACKS(q, r, V, off, c) {
      float v[V], d[V];
      load_pack<T, V>(xs + off, v);
      load_pack<T, V>(xds + off, d);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        sum_d += d[i];
        sum_xd += (v[i] - mu) * d[i];
      }
    }
    sum_d = block_sum(sum_d, smem);
    sum_xd = block_sum(sum_xd, smem);
  }
  if constexpr (kMode == 1) {
    if (threadIdx.x == 0) {
      part[static_cast<int64_t>(blockIdx.x) * 2] = sum_d;
      part[static_cast<int64_t>(blockIdx.x) * 2 + 1] = sum_xd;
    }
    return;
  }
  const float m1 = sum_d * q.invM, m2 = rs * sum_xd * q.invM;  // mean(x_dot), mean(x^ x_dot)
  T* yds = yd + int64_t{r.n} * syd;
  SCM_GN_FOR_PACKS(q, r, V, off, c) {
    float v[V], d[V];
    load_pack<T, V>(xs + off, v);
    if (xds != nullptr) {
      load_pack<T, V>(xds + off, d);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) d[i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int32_t ci = q.cl ? c + i : c;
      const float gam = af.w.at(0, ci), bet = af.b.at(0, ci), s = af.s.at(r.n, ci), sd = tg.s.at(r.n, ci);
      const float xh = (v[i] - mu) * rs;
      const float xhd = xds != nullptr ? rs * (d[i] - m1 - xh * m2) : 0.f;
      const float A = gam * s;
      const float ad = xhd * A + xh * (tg.w.at(0, ci) * s + gam * sd) + (tg.b.at(0, ci) * s + bet * sd + tg.sh.at(r.n, ci));
      if (silu) {
        const float a = xh * A + bet * s + af.sh.at(r.n, ci);
        v[i] = silu_grad_from_sig(a, sigmoid(a)) * ad;
      } else {
        v[i] = ad;
      }
    }
    store_pack<T, V>(yds + off, v);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward (A30)
// ---------------------------------------------------------------------------------------------
// x^ and da = dy SiLU'(a) of one element of channel c.
__device__ __forceinline__ void bwd_elem(const Affine& af, int32_t n, int32_t c, float xv, float dyv, float mu,
                                         float rs, bool silu, float& xh, float& da) {
  xh = (xv - mu) * rs;
  da = dyv;
  if (silu) {
    const float s = af.s.at(n, c);
    const float a = xh * af.w.at(0, c) * s + af.b.at(0, c) * s + af.sh.at(n, c);
    da *= silu_grad_from_sig(a, sigmoid(a));
  }
}

template <typename T, int V, int kMode>
__global__ void __launch_bounds__(kThreads, 1)
    gn_bwd_kernel(Geo q, const T* __restrict__ dy, int64_t sdy, const T* __restrict__ x, int64_t sx,
                  T* __restrict__ dx, int64_t sdx, Affine af, const float* __restrict__ mean,
                  const float* __restrict__ rstd, float* __restrict__ p1, float* __restrict__ p2,
                  const float* __restrict__ gsum, bool silu) {
  __shared__ float smem[kWarps];
  __shared__ float red[2][kThreads];
  const Range r = block_range(q);
  const T* xs = x + int64_t{r.n} * sx;
  const T* dys = dy + int64_t{r.n} * sdy;
  const float mu = mean[r.ng], rs = rstd[r.ng];
  const int tid = threadIdx.x;
  const int32_t c_base = r.g * q.Cg;
  const int64_t pbase = int64_t{r.n} * q.C * q.nsplit + r.k;  // P[(n C + c) nsplit + k] = P[pbase + c nsplit]
#define SCM_GN_PIDX(c) (pbase + (c) * q.nsplit)
  if constexpr (kMode != 2) {
    if (!q.cl) {
      // channels-first: warp w reduces channel rows w, w + kWarps, ... (lanes over positions)
      const int warp = tid >> 5, lane = tid & 31;
      for (int32_t cl = warp; cl < q.Cg; cl += kWarps) {
        const int32_t c = c_base + cl;
        const T* xr = xs + c * q.S + r.s_lo;
        const T* dr = dys + c * q.S + r.s_lo;
        float a1 = 0.f, a2 = 0.f;
        for (int32_t j0 = 0; j0 < r.len; j0 += 32 * V) {  // warp-uniform trip count (shuffles below)
          const int32_t j = j0 + lane * V;
          if (j < r.len) {
            float v[V], d[V];
            load_pack<T, V>(xr + j, v);
            load_pack<T, V>(dr + j, d);
#pragma unroll
            for (int i = 0; i < V; ++i) {
              float xh, da;
              bwd_elem(af, r.n, c, v[i], d[i], mu, rs, silu, xh, da);
              a1 += da * xh;
              a2 += da;
            }
          }
        }
        a1 = warp_sum(a1);
        a2 = warp_sum(a2);
        if (lane == 0) {
          p1[SCM_GN_PIDX(c)] = a1;
          p2[SCM_GN_PIDX(c)] = a2;
        }
      }
    } else {
      // channels-last: thread t handles channel t % Cg on positions t / Cg, + R, ... (R row groups),
      // then the R partial sums of each channel are added in order.
      const int32_t R = q.Cg >= kThreads ? 1 : kThreads / q.Cg;
      for (int32_t c0 = 0; c0 < q.Cg; c0 += kThreads) {
        const int32_t cl = c0 + (q.Cg >= kThreads ? tid : tid % q.Cg);
        const int32_t row0 = q.Cg >= kThreads ? 0 : tid / q.Cg;
        float a1 = 0.f, a2 = 0.f;
        if (cl < q.Cg && row0 < R) {
          const int32_t c = c_base + cl;
          for (int32_t s = row0; s < r.len; s += R) {
            const int32_t off = (r.s_lo + s) * q.C + c;
            float xh, da;
            bwd_elem(af, r.n, c, static_cast<float>(xs[off]), static_cast<float>(dys[off]), mu, rs, silu, xh, da);
            a1 += da * xh;
            a2 += da;
          }
        }
        red[0][tid] = a1;
        red[1][tid] = a2;
        __syncthreads();
        if (R == 1) {
          if (cl < q.Cg) {
            p1[SCM_GN_PIDX(c_base + cl)] = a1;
            p2[SCM_GN_PIDX(c_base + cl)] = a2;
          }
        } else if (tid < q.Cg) {
          float s1 = 0.f, s2 = 0.f;
          for (int32_t k = 0; k < R; ++k) {
            s1 += red[0][k * q.Cg + tid];
            s2 += red[1][k * q.Cg + tid];
          }
          p1[SCM_GN_PIDX(c_base + tid)] = s1;
          p2[SCM_GN_PIDX(c_base + tid)] = s2;
        }
        __syncthreads();
      }
    }
  }
  if constexpr (kMode == 1) return;
  float m1, m2;
  if constexpr (kMode == 2) {
    m1 = gsum[int64_t{r.ng} * 2];
    m2 = gsum[int64_t{r.ng} * 2 + 1];
  } else {
    __syncthreads();  // the P sums of this block are visible to all its threads
    float s1 = 0.f, s2 = 0.f;
    for (int32_t cl = tid; cl < q.Cg; cl += kThreads) {
      const int32_t c = c_base + cl;
      const float A = af.w.at(0, c) * af.s.at(r.n, c);
      s1 += A * p2[SCM_GN_PIDX(c)];
      s2 += A * p1[SCM_GN_PIDX(c)];
    }
    m1 = block_sum(s1, smem) * q.invM;
    m2 = block_sum(s2, smem) * q.invM;
  }
  T* dxs = dx + int64_t{r.n} * sdx;
  SCM_GN_FOR_PACKS(q, r, V, off, c) {
    float v[V], d[V];
    load_pack<T, V>(xs + off, v);
    load_pack<T, V>(dys + off, d);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int32_t ci = q.cl ? c + i : c;
      float xh, da;
      bwd_elem(af, r.n, ci, v[i], d[i], mu, rs, silu, xh, da);
      v[i] = rs * (da * af.w.at(0, ci) * af.s.at(r.n, ci) - m1 - xh * m2);
    }
    store_pack<T, V>(dxs + off, v);
  }
#undef SCM_GN_PIDX
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
const char* const kOp = "group_norm";

Geo make_geo(const at::Tensor& x, int64_t G) {
  TORCH_CHECK(x.is_cuda(), kOp, ": x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 3, kOp, ": x must be an (N, C, S) view, got shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, kOp,
              ": x must be float32, float16, bfloat16 or float64, got ", dt);
  Geo q;
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2);
  TORCH_CHECK(N > 0 && C > 0 && S > 0, kOp, ": x must not be empty, got shape ", x.sizes());
  TORCH_CHECK(G >= 1 && C % G == 0, kOp, ": num_groups must divide C = ", C, ", got ", G);
  TORCH_CHECK(C * S < (int64_t{1} << 31) - kThreads * 16, kOp, ": the CUDA kernels need fewer than 2^31 elements "
              "per sample, got C * S = ", C * S);
  const int64_t Cg = C / G;
  const bool cf = (S == 1 || x.stride(2) == 1) && (C == 1 || x.stride(1) == S);
  q.cl = !cf && (C == 1 || x.stride(1) == 1) && (S == 1 || x.stride(2) == C);
  TORCH_CHECK(cf || q.cl, kOp, ": x must be channels-first or channels-last, got strides ", x.strides());
  const int64_t NG = N * G;
  int64_t k = 1;
  if (NG < kTargetBlocks) {
    k = std::min({(kTargetBlocks + NG - 1) / NG, std::max<int64_t>(1, Cg * S / kMinPerBlock),
                  (S + kSplitAlign - 1) / kSplitAlign});
    k = std::max<int64_t>(k, 1);
  }
  int64_t s_split = (S + k - 1) / k;
  if (k > 1) s_split = (s_split + kSplitAlign - 1) / kSplitAlign * kSplitAlign;
  const int64_t nsplit = (S + s_split - 1) / s_split;
  TORCH_CHECK(NG * nsplit <= static_cast<int64_t>(INT32_MAX), kOp, ": too many blocks, N * G = ", NG);
  q.C = static_cast<int32_t>(C);
  q.S = static_cast<int32_t>(S);
  q.Cg = static_cast<int32_t>(Cg);
  q.G = static_cast<int32_t>(G);
  q.nsplit = static_cast<int32_t>(nsplit);
  q.s_split = static_cast<int32_t>(s_split);
  q.M = static_cast<float>(Cg * S);
  q.invM = static_cast<float>(1.0 / static_cast<double>(Cg * S));
  return q;
}

void check_like(const at::Tensor& t, const at::Tensor& x, const Geo& q, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), kOp, ": ", name, " must be on x's device");
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type(), kOp, ": ", name,
              " must have x's shape and dtype");
  const bool same = q.cl ? (t.stride(1) == 1 && t.stride(2) == q.C)
                         : (q.S == 1 || t.stride(2) == 1) && (q.C == 1 || t.stride(1) == q.S);
  TORCH_CHECK(same, kOp, ": ", name, " must have x's layout, got strides ", t.strides());
}

Chan chan(const std::optional<at::Tensor>& t, float dflt, bool per_sample, int64_t N, int64_t C, const char* name) {
  if (!t.has_value()) return Chan{nullptr, 0, 0, dflt};
  TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kFloat, kOp, ": ", name, " must be a float32 CUDA tensor");
  if (per_sample) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == N && t->size(1) == C, kOp, ": ", name, " must have shape (", N, ", ",
                C, "), got ", t->sizes());
    return Chan{t->const_data_ptr<float>(), t->stride(0), t->stride(1), dflt};
  }
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, kOp, ": ", name, " must have shape (", C, "), got ", t->sizes());
  return Chan{t->const_data_ptr<float>(), 0, t->stride(0), dflt};
}

void check_stats(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n, kOp, ": ", name,
              " must be a contiguous float32 (N, G) CUDA tensor");
}

at::Tensor empty_layout(const at::Tensor& x, const Geo& q) {
  const int64_t N = x.size(0), C = q.C, S = q.S;
  if (q.cl) return at::empty_strided({N, C, S}, {C * S, 1, C}, x.options());
  return at::empty_strided({N, C, S}, {C * S, S, 1}, x.options());
}

// Pack width: 16 bytes when every contiguous run, offset, batch stride and pointer allows it.
int pack_width(const Geo& q, int64_t elem, std::initializer_list<const at::Tensor*> ts) {
  const int64_t V = 16 / elem;
  if (V <= 1) return 1;
  const bool runs = q.cl ? q.Cg % V == 0 : (q.S % V == 0 && q.s_split % V == 0);
  if (!runs) return 1;
  for (const at::Tensor* t : ts) {
    if (t == nullptr) continue;
    if ((t->size(0) > 1 && t->stride(0) % V != 0) || reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 != 0)
      return 1;
  }
  return static_cast<int>(V);
}

Affine affine(const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& b,
              const std::optional<at::Tensor>& s, const std::optional<at::Tensor>& sh, float dw, float ds, int64_t N,
              int64_t C, bool tangents) {
  return Affine{chan(w, dw, false, N, C, tangents ? "weight_dot" : "weight"),
                chan(b, 0.f, false, N, C, tangents ? "bias_dot" : "bias"),
                chan(s, ds, true, N, C, tangents ? "scale_dot" : "scale"),
                chan(sh, 0.f, true, N, C, tangents ? "shift_dot" : "shift")};
}

// Runs launch(std::integral_constant<int, V>) for the pack width V (1 or 16 / sizeof(T)).
template <typename T, class F>
void with_pack(int V, F&& launch) {
  constexpr int kV = static_cast<int>(16 / sizeof(T));
  if (V == kV && kV > 1) {
    launch(std::integral_constant<int, kV>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t num_groups, double eps,
    bool silu) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Geo q = make_geo(x, num_groups);
  const int64_t N = x.size(0);
  const Affine af = affine(weight, bias, scale, shift, 1.f, 1.f, N, q.C, false);
  at::Tensor y = empty_layout(x, q);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({N, q.G}, f32), rstd = at::empty({N, q.G}, f32);
  at::Tensor part = at::empty({q.nsplit > 1 ? N * q.G * q.nsplit * 3 : int64_t{1}}, f32);
  const int V = pack_width(q, x.element_size(), {&x, &y});
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>(N * q.G * q.nsplit);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_cuda", [&] {
    with_pack<scalar_t>(V, [&](auto vc) {
      constexpr int kV = decltype(vc)::value;
      auto launch = [&](auto mode) {
        gn_fwd_kernel<scalar_t, kV, decltype(mode)::value><<<blocks, kThreads, 0, stream>>>(
            q, x.const_data_ptr<scalar_t>(), x.stride(0), y.mutable_data_ptr<scalar_t>(), y.stride(0), af,
            static_cast<float>(eps), mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(),
            part.mutable_data_ptr<float>(), silu);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (q.nsplit == 1) {
        launch(kFused);
      } else {
        launch(kPartial);
        launch(kApply);
      }
    });
  });
  return {y, mean, rstd};
}

at::Tensor group_norm_jvp_cuda(const at::Tensor& x, const std::optional<at::Tensor>& x_dot,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                               const std::optional<at::Tensor>& weight_dot, const std::optional<at::Tensor>& bias_dot,
                               const std::optional<at::Tensor>& scale_dot,
                               const std::optional<at::Tensor>& shift_dot, const at::Tensor& mean,
                               const at::Tensor& rstd, int64_t num_groups, bool silu) {
  const c10::cuda::CUDAGuard guard(x.device());
  Geo q = make_geo(x, num_groups);
  const int64_t N = x.size(0);
  if (x_dot.has_value()) {
    check_like(*x_dot, x, q, "x_dot");
  } else {  // nothing to reduce: one pass per group
    q.nsplit = 1;
    q.s_split = q.S;
  }
  check_stats(mean, N * q.G, "mean");
  check_stats(rstd, N * q.G, "rstd");
  const Affine af = affine(weight, bias, scale, shift, 1.f, 1.f, N, q.C, false);
  const Affine tg = affine(weight_dot, bias_dot, scale_dot, shift_dot, 0.f, 0.f, N, q.C, true);
  at::Tensor yd = empty_layout(x, q);
  at::Tensor part = at::empty({q.nsplit > 1 ? N * q.G * q.nsplit * 2 : int64_t{1}}, x.options().dtype(at::kFloat));
  const at::Tensor* xdp = x_dot.has_value() ? &*x_dot : nullptr;
  const int V = pack_width(q, x.element_size(), {&x, &yd, xdp});
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>(N * q.G * q.nsplit);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_jvp_cuda", [&] {
    with_pack<scalar_t>(V, [&](auto vc) {
      constexpr int kV = decltype(vc)::value;
      auto launch = [&](auto mode) {
        gn_jvp_kernel<scalar_t, kV, decltype(mode)::value><<<blocks, kThreads, 0, stream>>>(
            q, x.const_data_ptr<scalar_t>(), x.stride(0), xdp != nullptr ? xdp->const_data_ptr<scalar_t>() : nullptr,
            xdp != nullptr ? xdp->stride(0) : 0, yd.mutable_data_ptr<scalar_t>(), yd.stride(0), af, tg,
            mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), part.mutable_data_ptr<float>(), silu);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (q.nsplit == 1) {
        launch(kFused);
      } else {
        launch(kPartial);
        launch(kApply);
      }
    });
  });
  return yd;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    bool silu) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Geo q = make_geo(x, num_groups);
  const int64_t N = x.size(0);
  check_like(grad_y, x, q, "grad_y");
  check_stats(mean, N * q.G, "mean");
  check_stats(rstd, N * q.G, "rstd");
  const Affine af = affine(weight, bias, scale, shift, 1.f, 1.f, N, q.C, false);
  at::Tensor dx = empty_layout(x, q);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor p1 = at::empty({N, q.C, q.nsplit}, f32), p2 = at::empty({N, q.C, q.nsplit}, f32);
  at::Tensor gsum = at::empty({q.nsplit > 1 ? N * q.G * 2 : int64_t{1}}, f32);
  const int V = pack_width(q, x.element_size(), {&x, &dx, &grad_y});
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>(N * q.G * q.nsplit);
  at::Tensor s1, s2;  // P1, P2 summed over the splits
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_backward_cuda", [&] {
    with_pack<scalar_t>(V, [&](auto vc) {
      constexpr int kV = decltype(vc)::value;
      auto launch = [&](auto mode) {
        gn_bwd_kernel<scalar_t, kV, decltype(mode)::value><<<blocks, kThreads, 0, stream>>>(
            q, grad_y.const_data_ptr<scalar_t>(), grad_y.stride(0), x.const_data_ptr<scalar_t>(), x.stride(0),
            dx.mutable_data_ptr<scalar_t>(), dx.stride(0), af, mean.const_data_ptr<float>(),
            rstd.const_data_ptr<float>(), p1.mutable_data_ptr<float>(), p2.mutable_data_ptr<float>(),
            gsum.const_data_ptr<float>(), silu);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (q.nsplit == 1) {
        launch(kFused);
        return;
      }
      launch(kPartial);
      // fixed-order sums over the splits, then the group means of dx^ and dx^ x^ (A30)
      s1 = p1.sum(-1);
      s2 = p2.sum(-1);
      at::Tensor A = weight.has_value() ? weight->unsqueeze(0).expand({N, q.C}) : at::ones({N, q.C}, f32);
      if (scale.has_value()) A = A * *scale;
      gsum.view({N * q.G, 2}).select(1, 0).copy_((A * s2).view({N * q.G, q.Cg}).sum(-1) / q.M);
      gsum.view({N * q.G, 2}).select(1, 1).copy_((A * s1).view({N * q.G, q.Cg}).sum(-1) / q.M);
      launch(kApply);
    });
  });
  if (q.nsplit == 1) return {dx, p1.view({N, q.C}), p2.view({N, q.C})};
  return {dx, s1, s2};
}

// ---------------------------------------------------------------------------------------------
// Pixel norm (A11)
// ---------------------------------------------------------------------------------------------
// t == nullptr: forward (writes rstd); else out = r (t - a r^2 mean_c(a t)) with the saved rstd.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    pn_rows_kernel(const T* __restrict__ a, int64_t sa, const T* __restrict__ t, int64_t st, T* __restrict__ out,
                   int64_t so, float* __restrict__ rstd, const float* __restrict__ rstd_in, int64_t O, int64_t C,
                   float invC, float eps) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (o >= O) return;
  const T* ar = a + o * sa;
  const T* tr = t != nullptr ? t + o * st : nullptr;
  float acc = 0.f;
  for (int64_t c = lane; c < C; c += 32) {
    const float av = static_cast<float>(ar[c]);
    acc += tr != nullptr ? av * static_cast<float>(tr[c]) : av * av;
  }
  acc = warp_sum(acc);
  float r, k = 0.f;
  if (tr == nullptr) {
    r = rsqrt_of(acc * invC + eps);
    if (lane == 0) rstd[o] = r;
  } else {
    r = rstd_in[o];
    k = r * r * acc * invC;
  }
  T* orow = out + o * so;
  for (int64_t c = lane; c < C; c += 32) {
    const float av = static_cast<float>(ar[c]);
    orow[c] = static_cast<T>(tr != nullptr ? r * (static_cast<float>(tr[c]) - av * k) : av * r);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    pn_planes_kernel(const T* __restrict__ a, int64_t sao, int64_t sac, const T* __restrict__ t, int64_t sto,
                     int64_t stc, T* __restrict__ out, int64_t soo, int64_t soc, float* __restrict__ rstd,
                     const float* __restrict__ rstd_in, int64_t O, int64_t C, int64_t I, float invC, float eps) {
  const int32_t idx = static_cast<int32_t>(blockIdx.x) * kThreads + static_cast<int32_t>(threadIdx.x);
  if (idx >= O * I) return;
  const int32_t o = idx / static_cast<int32_t>(I), i = idx % static_cast<int32_t>(I);  // 32-bit: no division call
  const T* ap = a + o * sao + i;
  const T* tp = t != nullptr ? t + o * sto + i : nullptr;
  float acc = 0.f;
  for (int64_t c = 0; c < C; ++c) {
    const float av = static_cast<float>(ap[c * sac]);
    acc += tp != nullptr ? av * static_cast<float>(tp[c * stc]) : av * av;
  }
  float r, k = 0.f;
  if (tp == nullptr) {
    r = rsqrt_of(acc * invC + eps);
    rstd[idx] = r;
  } else {
    r = rstd_in[idx];
    k = r * r * acc * invC;
  }
  T* op = out + o * soo + i;
  for (int64_t c = 0; c < C; ++c) {
    const float av = static_cast<float>(ap[c * sac]);
    op[c * soc] = static_cast<T>(tp != nullptr ? r * (static_cast<float>(tp[c * stc]) - av * k) : av * r);
  }
}

bool pn_rows(const at::Tensor& a) {
  TORCH_CHECK(a.is_cuda(), "pixel_norm: a must be a CUDA tensor");
  TORCH_CHECK(a.dim() == 3 && a.numel() > 0, "pixel_norm: a must be a non-empty (O, C, I) view, got ", a.sizes());
  TORCH_CHECK(a.size(0) * a.size(2) < (int64_t{1} << 31) - kThreads, "pixel_norm: the CUDA kernels need O * I < 2^31");
  const bool rows = a.size(2) == 1 && (a.size(1) == 1 || a.stride(1) == 1);
  TORCH_CHECK(rows || a.size(2) == 1 || a.stride(2) == 1, "pixel_norm: a must have stride(2) == 1, or I == 1 and "
              "stride(1) == 1, got strides ", a.strides());
  return rows;
}

at::Tensor pn_empty(const at::Tensor& a, bool rows) {
  if (rows) return at::empty_strided({a.size(0), a.size(1), 1}, {a.size(1), 1, 1}, a.options());
  return at::empty(a.sizes(), a.options());
}

void pn_launch(const at::Tensor& a, const at::Tensor* t, at::Tensor& out, float* rstd, const float* rstd_in,
               float eps) {
  const bool rows = pn_rows(a);
  const int64_t O = a.size(0), C = a.size(1), I = a.size(2);
  const float invC = static_cast<float>(1.0 / static_cast<double>(C));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "pixel_norm_cuda", [&] {
    const scalar_t* tp = t != nullptr ? t->const_data_ptr<scalar_t>() : nullptr;
    if (rows) {
      const unsigned blocks = static_cast<unsigned>((O + kWarps - 1) / kWarps);
      pn_rows_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          a.const_data_ptr<scalar_t>(), a.stride(0), tp, t != nullptr ? t->stride(0) : 0,
          out.mutable_data_ptr<scalar_t>(), out.stride(0), rstd, rstd_in, O, C, invC, eps);
    } else {
      const unsigned blocks = static_cast<unsigned>((O * I + kThreads - 1) / kThreads);
      pn_planes_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          a.const_data_ptr<scalar_t>(), a.stride(0), a.stride(1), tp, t != nullptr ? t->stride(0) : 0,
          t != nullptr ? t->stride(1) : 0, out.mutable_data_ptr<scalar_t>(), out.stride(0), out.stride(1), rstd,
          rstd_in, O, C, I, invC, eps);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> pixel_norm_cuda(const at::Tensor& a, double eps) {
  const c10::cuda::CUDAGuard guard(a.device());
  const bool rows = pn_rows(a);
  at::Tensor y = pn_empty(a, rows);
  at::Tensor rstd = at::empty({a.size(0), a.size(2)}, a.options().dtype(at::kFloat));
  pn_launch(a, nullptr, y, rstd.mutable_data_ptr<float>(), nullptr, static_cast<float>(eps));
  return {y, rstd};
}

at::Tensor pixel_norm_grad_cuda(const at::Tensor& t, const at::Tensor& a, const at::Tensor& rstd, const char* name) {
  const c10::cuda::CUDAGuard guard(a.device());
  const bool rows = pn_rows(a);
  TORCH_CHECK(t.is_cuda() && t.sizes() == a.sizes() && t.scalar_type() == a.scalar_type() && t.strides() == a.strides(),
              "pixel_norm: ", name, " must have a's shape, dtype and strides");
  TORCH_CHECK(rstd.is_cuda() && rstd.scalar_type() == at::kFloat && rstd.is_contiguous() &&
                  rstd.numel() == a.size(0) * a.size(2),
              "pixel_norm: rstd must be a contiguous float32 (O, I) CUDA tensor");
  at::Tensor out = pn_empty(a, rows);
  pn_launch(a, &t, out, nullptr, rstd.const_data_ptr<float>(), 0.f);
  return out;
}

at::Tensor pixel_norm_jvp_cuda(const at::Tensor& a, const at::Tensor& a_dot, const at::Tensor& rstd) {
  return pixel_norm_grad_cuda(a_dot, a, rstd, "a_dot");
}

at::Tensor pixel_norm_backward_cuda(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& rstd) {
  return pixel_norm_grad_cuda(grad, a, rstd, "grad");
}

}  // namespace
}  // namespace scm::cuda_gn

TORCH_LIBRARY_IMPL(scm, CUDA, m) {
  m.impl("group_norm", &scm::cuda_gn::group_norm_cuda);
  m.impl("group_norm_jvp", &scm::cuda_gn::group_norm_jvp_cuda);
  m.impl("group_norm_backward", &scm::cuda_gn::group_norm_backward_cuda);
  m.impl("pixel_norm", &scm::cuda_gn::pixel_norm_cuda);
  m.impl("pixel_norm_jvp", &scm::cuda_gn::pixel_norm_jvp_cuda);
  m.impl("pixel_norm_backward", &scm::cuda_gn::pixel_norm_backward_cuda);
}
