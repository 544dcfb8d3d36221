// Scalar math of the normalization ops (group_norm A28-A30, pixel_norm A11), shared by the CPU and
// CUDA kernels (SCM_HD: host and device). Labels refer to shared/docs/algorithm.md.
#pragma once

#include <cstdint>
#include <cstring>

#include "scm/math.h"

// Host: always inlined, so that the CPU loops calling these functions vectorize (GCC's inlining
// heuristics otherwise leave a call to the sigmoid's exponential in large loop bodies, which then
// run scalar).
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

// The host sigmoid (and the CPU group_norm's explicit AVX2 SiLU, which shares these constants) in
// base 2 with c = -log2(e) in fp32: with t = a c, 1 + e^-a = 1 + 2^t and
//   d = c (1 + 2^t) = P(f) 2^(k+1) + c,  sigmoid(a) = c / d,  SiLU(a) = t / d,
// where t is clamped to [-128, 127]; k = round(t) by adding and removing kExp2BiasMagic = 1.5 * 2^23
// + 128 (round to nearest even: the constant is even, so ties go as vroundps's; the sum's low bits
// hold k + 128); f = t - k in [-1/2, 1/2] (exact); P(f) = c 2^f / 2 by a degree-5 polynomial
// (relative-error fit with c folded in, coefficients rounded to fp32: max relative error 1.5e-7 in
// fp32 Horner); 2^(k+1) = the sum's bits shifted left by 23, which is 0 at k = -128 and +inf at
// k = 127. So sigmoid is 1 at t = -inf (a = +inf) and +0 at t = +inf (d = -inf), with no selects
// and no denormal operands (the smallest nonzero 2^(k+1) is 2^-126). The clamp is one maxps and
// one minps (see exp2_clamp), which return the bound for t = NaN: sigmoid(NaN) = 1, and every
// caller's result stays NaN through its other factor a (SiLU = a sigmoid, SiLU' = sigmoid (1 + a
// (1 - sigmoid))). Rounding t = a c adds |t| 2^-24 ln 2 relative error to 2^t (3e-7 at |a| = 10),
// as any exp of a rounded argument. 14 vector ops per sigmoid where the previous form (e^-a by a
// degree-6 polynomial, saturated by two compare-and-selects) took 20. Branch-free and call-free:
// CPU loops over it vectorize.
constexpr float kNegLog2e32 = -0x1.715476p+0f;  // c
constexpr float kExp2BiasMagic = 12583040.f;     // 1.5 * 2^23 + 128
// P(f) = c 2^f / 2 on [-1/2, 1/2], constant term first.
constexpr float kHalfNegLog2eExp2P[6] = {-0x1.715478p-1f, -0x1.fffff6p-2f, -0x1.62e22ep-3f,
                                         -0x1.4801d2p-5f, -0x1.c9675ep-8f, -0x1.f61ba6p-11f};

// The clamp bounds of t, [-128, 127]. CPU loops take them from exp2_clamp() before the loop: bounds
// the compiler sees as constants let GCC fold the rest of the sigmoid, and its caller's arithmetic,
// into each arm of the clamp (op(cond ? t : K) -> cond ? op(t) : op(K)), so that the vectorized loop
// computed every result three ways and selected among them (a loop of dy SiLU'(a), x86-64-v3: 12
// compares and blends per vector instead of one maxps and one minps, 42 vector instructions instead
// of 32; the fp32 8x256x32x32 backward on a Zen 3, 2 threads: 1.59 -> 1.14 ms, min of 5 alternated
// runs).
struct Exp2Clamp {
  float lo, hi;
};
SCM_NORM_HD Exp2Clamp exp2_clamp() {
  float lo = -128.f, hi = 127.f;
#if !defined(__CUDA_ARCH__) && defined(__GNUC__)
  __asm__("" : "+m"(lo), "+m"(hi));  // opaque: the values are unknown to the optimizer
#endif
  return {lo, hi};
}

// d = c (1 + 2^t) of t = a c (see above).
SCM_NORM_HD float neg_log2e_one_plus_exp2(float t, Exp2Clamp b) {
  t = t > b.lo ? t : b.lo;  // maxps / minps (NaN -> lo)
  t = t < b.hi ? t : b.hi;
  const float u = t + kExp2BiasMagic;
  const float f = t - (u - kExp2BiasMagic);
  const float* P = kHalfNegLog2eExp2P;
  float p = P[5];
  p = p * f + P[4];
  p = p * f + P[3];
  p = p * f + P[2];
  p = p * f + P[1];
  p = p * f + P[0];
  uint32_t bits;
  std::memcpy(&bits, &u, sizeof(bits));
  bits <<= 23;
  float two_k1;
  std::memcpy(&two_k1, &bits, sizeof(two_k1));
  return p * two_k1 + kNegLog2e32;
}

// sigmoid(a) = 1 / (1 + e^-a). Host: c / d (above), clamp bounds b = exp2_clamp() taken before the
// loop. Device: expf.
SCM_NORM_HD float sigmoid(float a, Exp2Clamp b) {
#if defined(__CUDA_ARCH__)
  (void)b;
  return __fdividef(1.f, 1.f + expf(-a));  // 0 for 1 + e^-a = inf (a < -88)
#else
  return kNegLog2e32 / neg_log2e_one_plus_exp2(a * kNegLog2e32, b);
#endif
}
SCM_NORM_HD float sigmoid(float a) { return sigmoid(a, Exp2Clamp{-128.f, 127.f}); }

// (A28) SiLU and its derivative from sigmoid(a) = sig:
//   SiLU(a) = a sig,  SiLU'(a) = sig (1 + a (1 - sig)).
SCM_NORM_HD float silu_from_sig(float a, float sig) { return a * sig; }
SCM_NORM_HD float silu_grad_from_sig(float a, float sig) { return sig * (1.f + a * (1.f - sig)); }

}  // namespace scm
