// Scalar math of the normalization ops (group_norm A28-A30, pixel_norm A11), shared by the CPU and
// CUDA kernels (SCM_HD: host and device). Labels refer to shared/docs/algorithm.md.
#pragma once

#include <cstdint>
#include <cstring>

#include "scm/math.h"

// Host: always inlined, so that the CPU loops calling these functions vectorize (GCC's inlining
// heuristics otherwise leave a call to exp_poly in large loop bodies, which then run scalar).
#if defined(__CUDACC__) || defined(__HIPCC__) || !defined(__GNUC__)
#define SCM_NORM_HD SCM_HD
#else
#define SCM_NORM_HD inline __attribute__((always_inline))
#endif

namespace scm {

// a / b and 1 / sqrt(v): IEEE on the host; on the device the fast forms (__fdividef, rsqrtf; a few
// ulp), because the IEEE division and square root call a slow-path subroutine whose call frame
// makes ptxas spill the registers live across it.
SCM_NORM_HD float fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdividef(a, b);
#else
  return a / b;
#endif
}

SCM_NORM_HD float rsqrt_of(float v) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(v);
#else
  return 1.f / sqrtf(v);
#endif
}

// Moments (count, mean, M2 = sum (x - mean)^2) of a set of values. Two sets merge exactly with
// Chan et al.'s formula, so statistics are built from exact two-pass moments of small blocks and
// never from E[x^2] - E[x]^2.
struct Moments {
  float n, mean, m2;
};

SCM_NORM_HD Moments merge(Moments a, Moments b) {
  const float n = a.n + b.n;
  if (n == 0.f) return a;
  const float d = b.mean - a.mean;
  const float w = fdiv(b.n, n);
  return {n, a.mean + d * w, a.m2 + b.m2 + d * d * (a.n * w)};
}

// r = (sigma^2 + eps)^(-1/2) of a group of M elements with moments m.
SCM_NORM_HD float group_rstd(const Moments& m, float M, float eps) { return rsqrt_of(fdiv(m.m2, M) + eps); }

// e^x for |x| <= 87 (garbage outside, see sigmoid) as 2^t, t = x log2(e): t = k + f with
// k = round(t), |f| <= 1/2 exact, 2^f by a degree-6 polynomial (relative error 2e-9, ~1 ulp in
// fp32 Horner) and 2^k built in the exponent bits. Error: ~2 ulp plus |t| 2^-24 from rounding t
// (5e-7 relative at |x| = 10), which the sigmoid turns into negligible absolute errors.
// Branch-free and call-free, so CPU loops over it vectorize (std::exp does not without -ffast-math).
// The polynomial's coefficients, highest degree first (also the CPU group_norm forward's AVX-512 SiLU).
constexpr float kExp2P6 = 1.5353498748e-4f, kExp2P5 = 1.3398880837e-3f, kExp2P4 = 9.6184369177e-3f,
                kExp2P3 = 5.5503323674e-2f, kExp2P2 = 2.4022647738e-1f, kExp2P1 = 6.9314718246e-1f,
                kExp2P0 = 1.f;

SCM_NORM_HD float exp_poly(float x) {
  const float t = x * 1.44269504088896341f;
  // k = round(t): adding and removing 1.5 * 2^23 rounds to nearest in the current mode.
  const float k = (t + 12582912.f) - 12582912.f;
  const float f = t - k;
  float p = kExp2P6;
  p = p * f + kExp2P5;
  p = p * f + kExp2P4;
  p = p * f + kExp2P3;
  p = p * f + kExp2P2;
  p = p * f + kExp2P1;
  p = p * f + kExp2P0;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(two_k));
  return p * two_k;
}

// sigmoid(a) = 1 / (1 + e^-a). Host: exp_poly, saturated to 1 / 0 for |a| > 80 (where it is 1 or
// < 2e-35) by selects at the very end. Clamping a before exp_poly instead lets the compiler
// evaluate the clamped branch (a / (1 + e^80)) in every vector lane, whose denormal results cost a
// microcode assist per vector (10x slower loops). Device: expf.
SCM_NORM_HD float sigmoid(float a) {
#if defined(__CUDA_ARCH__)
  return __fdividef(1.f, 1.f + expf(-a));  // 0 for 1 + e^-a = inf (a < -88)
#else
  float s = 1.f / (1.f + exp_poly(-a));
  s = a > 80.f ? 1.f : s;
  s = a < -80.f ? 0.f : s;
  return s;
#endif
}

// (A28) SiLU and its derivative from sigmoid(a) = sig:
//   SiLU(a) = a sig,  SiLU'(a) = sig (1 + a (1 - sig)).
SCM_NORM_HD float silu_from_sig(float a, float sig) { return a * sig; }
SCM_NORM_HD float silu_grad_from_sig(float a, float sig) { return sig * (1.f + a * (1.f - sig)); }

}  // namespace scm
