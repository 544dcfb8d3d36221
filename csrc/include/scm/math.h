// Math shared by the CPU (C++/OpenMP) and CUDA kernels of scm_kernels.
//
// Everything here is a pure function on scalars, marked SCM_HD so that it compiles for host and
// device alike: the CPU and CUDA kernels call the same code, and the Triton kernels and the
// plain-PyTorch references implement the same formulas (labels refer to shared/docs/algorithm.md).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SCM_HD __host__ __device__ __forceinline__
#else
#define SCM_HD inline
#endif

namespace scm {

// ---------------------------------------------------------------------------------------------
// Trigonometric mixing (A5, A7, A23).
//   x0  = cos t * x_t - sin t * sigma_d * F          (denoise, A5)
//   x_s = cos s * x0  + sin s * sigma_d * eps        (renoise to time s, A22/A23)
// ---------------------------------------------------------------------------------------------
struct TrigCoef {
  float cx;   // coefficient of x_t in the output
  float cf;   // coefficient of F in the output
  float ce;   // coefficient of the noise eps in the output (0 without renoise)
};

// Coefficients of out = cx * x_t + cf * F + ce * eps for one sample with time t (and next time s
// when renoise is true). Folding both moves into three numbers lets every backend do one FMA chain
// per element.
SCM_HD TrigCoef trig_coef(float t, float s, bool renoise, float sigma_d) {
  const float ct = cosf(t), st = sinf(t);
  TrigCoef c;
  if (renoise) {
    const float cs = cosf(s), ss = sinf(s);
    c.cx = cs * ct;
    c.cf = -cs * st * sigma_d;
    c.ce = ss * sigma_d;
  } else {
    c.cx = ct;
    c.cf = -st * sigma_d;
    c.ce = 0.f;
  }
  return c;
}

// uint8 pixels from a value in [-1, 1]: round(clamp((x + 1) * 127.5, 0, 255)), rounding half to
// even like torch.round. Adding and subtracting 2^23 rounds a float in [0, 2^23) to an integer in
// the current (round-to-nearest-even) mode without a call, so CPU loops over it vectorize.
// NaN maps to 0.
SCM_HD uint8_t to_pixel(float x) {
  float p = (x + 1.f) * 127.5f;
  p = p > 0.f ? p : 0.f;  // also NaN -> 0
  p = p < 255.f ? p : 255.f;
  // Exact IEEE semantics (no fast-math anywhere in this build) keep (p + 2^23) - 2^23 unfolded.
  return static_cast<uint8_t>(static_cast<int32_t>((p + 8388608.f) - 8388608.f));
}

// ---------------------------------------------------------------------------------------------
// sCM tangent (A14), per sample with time t, as one linear combination of the four inputs:
//   g = -cos^2 t * (sigma_d * F^- - dx_t/dt) - r * (cos t sin t * x_t + sigma_d * J)
//     = fm * F^- + dx * dx_t/dt + x * x_t + j * J
// ---------------------------------------------------------------------------------------------
struct LossCoef {
  float fm, dx, x, j;
};

SCM_HD LossCoef loss_coef(float t, float sigma_d, float r) {
  const float ct = cosf(t), st = sinf(t);
  LossCoef k;
  k.fm = -ct * ct * sigma_d;
  k.dx = ct * ct;
  k.x = -r * ct * st;
  k.j = -r * sigma_d;
  return k;
}

// sin and cos of theta = r + n * pi/2 from the reduced argument |r| <= pi/4 and the quadrant n:
// the Cephes sinf/cosf minimax polynomials (~1 ulp), picked and signed by n mod 4. Branch-free, so
// that CPU loops calling it vectorize; each backend does its own reduction (the CPU kernel a float
// Cody-Waite one that vectorizes, the CUDA kernel one in double).
SCM_HD void sincos_reduced(float r, int32_t n, float& s_out, float& c_out) {
  const float z = r * r;
  const float ps = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  const float pc =
      ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z - 0.5f * z + 1.f;
  const bool swap = (n & 1) != 0;
  const float sv = swap ? pc : ps;
  const float cv = swap ? ps : pc;
  s_out = (n & 2) ? -sv : sv;
  c_out = ((n + 1) & 2) ? -cv : cv;
}

// ---------------------------------------------------------------------------------------------
// Counter-based normal noise (A23): Philox4x32-10 (Salmon et al., SC'11) + Box-Muller.
// Element i of a stream keyed by `seed` belongs to group g = i / 4 and lane i % 4:
//   (r0, r1, r2, r3) = Philox4x32-10(counter = (lo32(g), hi32(g), 0, 0), key = (lo32(seed), hi32(seed)))
//   u_j = ((r_j >> 8) + 0.5) * 2^-24            (exact in fp32, strictly inside (0, 1))
//   lanes 0, 1: sqrt(-2 ln u0) * (cos, sin)(2 pi u1); lanes 2, 3: the same with (u2, u3).
// The Triton kernels and the PyTorch reference implement exactly this definition.
// ---------------------------------------------------------------------------------------------
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;

struct U32x4 {
  uint32_t v[4];
};

SCM_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

SCM_HD U32x4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                           uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#elif defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi2, lo2;
    mulhilo32(kPhiloxRoundA, c0, hi0, lo0);
    mulhilo32(kPhiloxRoundB, c2, hi2, lo2);
    const uint32_t n0 = hi2 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo2;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  U32x4 r;
  r.v[0] = c0;
  r.v[1] = c1;
  r.v[2] = c2;
  r.v[3] = c3;
  return r;
}

SCM_HD float uint_to_unit(uint32_t r) {
  return (static_cast<float>(r >> 8) + 0.5f) * 5.9604644775390625e-08f;  // 2^-24
}

// Natural logarithm of a positive normal float (Cephes logf: x = m 2^e with m in [sqrt(1/2),
// sqrt(2)), a degree-9 polynomial in m - 1; ~1 ulp). Branch-free, so CPU loops calling it vectorize.
SCM_HD float log_poly(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  float e = static_cast<float>(static_cast<int32_t>((bits >> 23) & 0xffu) - 126);
  bits = (bits & 0x807fffffu) | 0x3f000000u;  // mantissa in [0.5, 1)
  float m;
  memcpy(&m, &bits, sizeof(m));
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.f : e;
  m = small ? m + m - 1.f : m - 1.f;
  const float z = m * m;
  float y = ((((((((7.0376836292e-2f * m - 1.1514610310e-1f) * m + 1.1676998740e-1f) * m - 1.2420140846e-1f) * m +
                 1.4249322787e-1f) * m - 1.6668057665e-1f) * m + 2.0000714765e-1f) * m - 2.4999993993e-1f) * m +
             3.3333331174e-1f) * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return (m + y) + 0.693359375f * e;
}

// Box-Muller pair for uniforms (ua, ub): sqrt(-2 ln ua) * (cos, sin)(2 pi ub). The angle is reduced
// exactly: 2 pi ub = (4 ub - j) pi/2 + j pi/2 with j = round(4 ub), and 4 ub - j is exact in fp32.
SCM_HD void box_muller(float ua, float ub, float& n_cos, float& n_sin) {
  const float radius = sqrtf(-2.f * log_poly(ua));
  const float q = 4.f * ub;
  const float j = (q + 8388608.f) - 8388608.f;  // round to nearest even, no call (0 <= q < 2^23)
  float s, c;
  sincos_reduced((q - j) * 1.57079632679489662f, static_cast<int32_t>(j), s, c);
  n_cos = radius * c;
  n_sin = radius * s;
}

// The four normals of group `g` of the stream keyed by `seed`.
SCM_HD void philox_normal4(uint64_t seed, uint64_t g, float out[4]) {
  const U32x4 r = philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), 0u, 0u,
                                static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  box_muller(uint_to_unit(r.v[0]), uint_to_unit(r.v[1]), out[0], out[1]);
  box_muller(uint_to_unit(r.v[2]), uint_to_unit(r.v[3]), out[2], out[3]);
}

// Normal number i of the stream keyed by `seed` (one lane of philox_normal4). The lane is picked
// with selects rather than a runtime array index, which would put the array on the GPU stack.
SCM_HD float philox_normal(uint64_t seed, uint64_t i) {
  float n[4];
  philox_normal4(seed, i >> 2, n);
  const unsigned lane = static_cast<unsigned>(i & 3);
  const float lo = (lane & 1) ? n[1] : n[0];
  const float hi = (lane & 1) ? n[3] : n[2];
  return (lane & 2) ? hi : lo;
}

// ---------------------------------------------------------------------------------------------
// Time embedding (A10). Frequencies of the positional embedding:
//   omega_k = exp(-ln(max_period) * k / half), k = 0 .. half-1.
// Fourier features use omega_k = 2 pi f_k with given f_k.
// Row layout of the (B, dim) output: [cos(s c omega) | sin(s c omega) | 0 (odd dim)].
// ---------------------------------------------------------------------------------------------
SCM_HD float positional_omega(int64_t k, int64_t half, float log_max_period) {
  return expf(-log_max_period * static_cast<float>(k) / static_cast<float>(half));
}

constexpr float kTwoPi = 6.283185307179586f;


// ---------------------------------------------------------------------------------------------
// Welford / Chan merge of (count, mean, M2) statistics, for the normalization kernels (sec. 6):
// exact variance without E[x^2] - E[x]^2.
// ---------------------------------------------------------------------------------------------
struct Welford {
  float n = 0.f;
  float mean = 0.f;
  float m2 = 0.f;
};

SCM_HD void welford_add(Welford& w, float x) {
  w.n += 1.f;
  const float d = x - w.mean;
  w.mean += d / w.n;
  w.m2 += d * (x - w.mean);
}

SCM_HD Welford welford_merge(const Welford& a, const Welford& b) {
  if (a.n == 0.f) return b;
  if (b.n == 0.f) return a;
  Welford r;
  r.n = a.n + b.n;
  const float d = b.mean - a.mean;
  const float fb = b.n / r.n;
  r.mean = a.mean + d * fb;
  r.m2 = a.m2 + b.m2 + d * d * a.n * fb;
  return r;
}

}  // namespace scm
