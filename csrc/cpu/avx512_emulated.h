// Test builds only (SCM_AVX512_EMULATE=1 at build time, see setup.py): the AVX-512 intrinsics of
// group_norm.cpp on a CPU without AVX-512, so that its explicit AVX-512 kernels (which the run-time
// dispatch takes only on AVX-512 CPUs) can be run and tested on any x86-64 machine. Most intrinsics
// come from SIMDe (SIMD Everywhere, Debian's libsimde-dev, header-only) through its native aliases;
// the dozen that SIMDe 0.7.4 lacks are written below, lane by lane, after the Intel SDM's definitions:
// the masked loads read only the lanes of the mask (as the hardware does, so a block's tail is never
// read past), the embedded-rounding add sets the rounding mode around each lane, vreduceps is
// x - round_down(32 x) / 32 for the one immediate the kernels use, and the fp16 conversions go
// through c10::Half (round to nearest even, as vcvtps2ph with _MM_FROUND_TO_NEAREST_INT).
// Nothing here is fast: it is a model of the instructions, not a fallback path.
#pragma once

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

#include <c10/util/Half.h>

#include <cfenv>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace scm_avx512_emulated {

struct F16 {
  float v[16];
};
struct I16 {
  int32_t v[16];
};
struct H16 {
  uint16_t v[16];
};

inline F16 f(simde__m512 a) {
  F16 r;
  simde_mm512_storeu_ps(r.v, a);
  return r;
}
inline simde__m512 f(const F16& a) { return simde_mm512_loadu_ps(a.v); }
inline I16 i(simde__m512i a) {
  I16 r;
  simde_mm512_storeu_si512(r.v, a);
  return r;
}
inline simde__m512i i(const I16& a) { return simde_mm512_loadu_si512(a.v); }
inline H16 h(simde__m256i a) {
  H16 r;
  simde_mm256_storeu_si256(reinterpret_cast<simde__m256i*>(r.v), a);
  return r;
}
inline simde__m256i h(const H16& a) { return simde_mm256_loadu_si256(reinterpret_cast<const simde__m256i*>(a.v)); }
inline bool on(simde__mmask16 m, int l) { return (m >> l) & 1; }

// The lanes of m between 16 elements of type E at p and lanes v (the others of v stay as they are):
// only those lanes of memory are touched, as by the hardware's masked loads and stores.
template <class E>
inline void masked_read(simde__mmask16 m, const void* p, E* v) {
  for (int l = 0; l < 16; ++l)
    if (on(m, l)) std::memcpy(&v[l], static_cast<const char*>(p) + sizeof(E) * l, sizeof(E));
}
template <class E>
inline void masked_write(void* p, simde__mmask16 m, const E* v) {
  for (int l = 0; l < 16; ++l)
    if (on(m, l)) std::memcpy(static_cast<char*>(p) + sizeof(E) * l, &v[l], sizeof(E));
}
inline simde__m512 maskz_loadu_ps(simde__mmask16 m, const void* p) {
  F16 r{};
  masked_read(m, p, r.v);
  return f(r);
}
inline void mask_storeu_ps(void* p, simde__mmask16 m, simde__m512 a) { masked_write(p, m, f(a).v); }
inline simde__m256i maskz_loadu_epi16(simde__mmask16 m, const void* p) {
  H16 r{};
  masked_read(m, p, r.v);
  return h(r);
}
inline void mask_storeu_epi16(void* p, simde__mmask16 m, simde__m256i a) { masked_write(p, m, h(a).v); }
inline simde__m512 mask3_fmadd_ps(simde__m512 a, simde__m512 b, simde__m512 c, simde__mmask16 m) {
  const F16 x = f(a), y = f(b), z = f(c);
  F16 r = z;
  for (int l = 0; l < 16; ++l)
    if (on(m, l)) r.v[l] = std::fma(x.v[l], y.v[l], z.v[l]);
  return f(r);
}
// a + b rounded as `rounding` says (_MM_FROUND_TO_NEAREST_INT / NEG_INF / POS_INF / ZERO in its low bits).
inline simde__m512 add_round_ps(simde__m512 a, simde__m512 b, int rounding) {
  static const int modes[4] = {FE_TONEAREST, FE_DOWNWARD, FE_UPWARD, FE_TOWARDZERO};
  const F16 x = f(a), y = f(b);
  F16 r;
  const int old = std::fegetround();
  std::fesetround(modes[rounding & 3]);
  for (int l = 0; l < 16; ++l) {
    volatile float s = x.v[l];
    s += y.v[l];
    r.v[l] = s;
  }
  std::fesetround(old);
  return f(r);
}
// vreduceps with imm = (M << 4) | rounding: x - round(2^M x) 2^-M (rounding down is the only mode the
// kernels use, asserted here); 0 for +-inf and for |x| >= 2^(23 - M) (every such float is a multiple
// of 2^-M), NaN stays NaN.
inline simde__m512 reduce_ps(simde__m512 a, int imm) {
  const int M = imm >> 4;
  if ((imm & 7) != 1) std::abort();  // only round-down (with the exception bit free) is modelled
  const F16 x = f(a);
  F16 r;
  for (int l = 0; l < 16; ++l) {
    const float v = x.v[l];
    if (std::isnan(v)) {
      r.v[l] = v;
    } else if (std::isinf(v) || std::fabs(v) >= std::ldexp(1.f, 23 - M)) {
      r.v[l] = 0.f;
    } else {
      const double s = std::ldexp(1.0, M);
      r.v[l] = static_cast<float>(static_cast<double>(v) - std::floor(static_cast<double>(v) * s) / s);
    }
  }
  return f(r);
}
// Fused multiply-adds rounded once (SIMDe's fallback rounds the product and the sum separately).
inline simde__m512 fma3(simde__m512 a, simde__m512 b, simde__m512 c, float sp, float sc) {
  const F16 x = f(a), y = f(b), z = f(c);
  F16 r;
  for (int l = 0; l < 16; ++l) r.v[l] = std::fma(sp * x.v[l], y.v[l], sc * z.v[l]);
  return f(r);
}
// vscalefps: a 2^floor(b), rounded once (ldexp), with the SDM's special cases for infinite b.
inline simde__m512 scalef_ps(simde__m512 a, simde__m512 b) {
  const F16 x = f(a), y = f(b);
  F16 r;
  for (int l = 0; l < 16; ++l) {
    const float u = x.v[l], v = y.v[l];
    if (std::isnan(u) || std::isnan(v)) {
      r.v[l] = std::nanf("");
    } else if (std::isinf(v)) {
      r.v[l] = v > 0 ? (u == 0.f ? std::nanf("") : u * v) : (std::isinf(u) ? std::nanf("") : u * 0.f);
    } else {
      r.v[l] = std::ldexp(u, static_cast<int>(std::fmax(-1000.f, std::fmin(1000.f, std::floor(v)))));
    }
  }
  return f(r);
}
inline simde__m512i cvtepu16_epi32(simde__m256i a) {
  const H16 x = h(a);
  I16 r;
  for (int l = 0; l < 16; ++l) r.v[l] = x.v[l];
  return i(r);
}
inline simde__m256i cvtepi32_epi16(simde__m512i a) {
  const I16 x = i(a);
  H16 r;
  for (int l = 0; l < 16; ++l) r.v[l] = static_cast<uint16_t>(x.v[l]);
  return h(r);
}
inline simde__m512 cvtph_ps(simde__m256i a) {
  const H16 x = h(a);
  F16 r;
  for (int l = 0; l < 16; ++l) r.v[l] = static_cast<float>(c10::Half(x.v[l], c10::Half::from_bits()));
  return f(r);
}
inline simde__m256i cvtps_ph(simde__m512 a, int rounding) {
  if ((rounding & 7) != 0) std::abort();  // only round to nearest even is modelled
  const F16 x = f(a);
  H16 r;
  for (int l = 0; l < 16; ++l) r.v[l] = c10::Half(x.v[l]).x;
  return h(r);
}

}  // namespace scm_avx512_emulated

#define _mm512_maskz_loadu_ps(m, p) scm_avx512_emulated::maskz_loadu_ps(m, p)
#define _mm512_mask_storeu_ps(p, m, a) scm_avx512_emulated::mask_storeu_ps(p, m, a)
#define _mm256_maskz_loadu_epi16(m, p) scm_avx512_emulated::maskz_loadu_epi16(m, p)
#define _mm256_mask_storeu_epi16(p, m, a) scm_avx512_emulated::mask_storeu_epi16(p, m, a)
#define _mm512_mask3_fmadd_ps(a, b, c, m) scm_avx512_emulated::mask3_fmadd_ps(a, b, c, m)
#define _mm512_add_round_ps(a, b, r) scm_avx512_emulated::add_round_ps(a, b, r)
#define _mm512_reduce_ps(a, imm) scm_avx512_emulated::reduce_ps(a, imm)
#define _mm512_cvtepu16_epi32(a) scm_avx512_emulated::cvtepu16_epi32(a)
#define _mm512_cvtepi32_epi16(a) scm_avx512_emulated::cvtepi32_epi16(a)
#define _mm512_cvtph_ps(a) scm_avx512_emulated::cvtph_ps(a)
#define _mm512_cvtps_ph(a, r) scm_avx512_emulated::cvtps_ph(a, r)
#undef _mm512_fmadd_ps
#undef _mm512_fmsub_ps
#undef _mm512_fnmadd_ps
#undef _mm512_scalef_ps
#define _mm512_fmadd_ps(a, b, c) scm_avx512_emulated::fma3(a, b, c, 1.f, 1.f)
#define _mm512_fmsub_ps(a, b, c) scm_avx512_emulated::fma3(a, b, c, 1.f, -1.f)
#define _mm512_fnmadd_ps(a, b, c) scm_avx512_emulated::fma3(a, b, c, -1.f, 1.f)
#define _mm512_scalef_ps(a, b) scm_avx512_emulated::scalef_ps(a, b)
