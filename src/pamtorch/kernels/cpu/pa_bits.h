// The float32 PA bit rules shared by the compiled kernels (pa_elementwise.cpp, pa_norm.cpp,
// pa_optim.cpp): bit casts, PAM and PAD on float32 patterns, as arith.pam / arith.pad define
// them. One copy, so that every kernel applies the same rule; each .cpp includes it.
//
// Every function is always inlined: the loops that call them are compiled twice (an AVX2
// copy and a portable one), and a call would run the portable code inside the AVX2 loop.
#pragma once

#include <cstdint>
#include <cstring>

#define PA_INLINE __attribute__((always_inline)) inline

namespace pa_bits {

constexpr uint32_t B32 = 0x3F800000u, MN32 = 0x00800000u, INF32 = 0x7F800000u, NAN32 = 0x7FC00000u,
                   SIGN32 = 0x80000000u, ABS32 = 0x7FFFFFFFu;

PA_INLINE uint32_t u32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
PA_INLINE float f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// arith.pam on float32 patterns: |a| + |b| - B, sign xor, flush below the smallest normal, inf
// above; zero/inf/NaN operands by IEEE rules, NaN canonical. Branch-free, so that the loops
// vectorize. |a| + |b| < 2^32 cannot wrap; "s < B + MN" is the underflow test of range(s - B)
// and covers the s < B case in which s - B would wrap.
PA_INLINE uint32_t pam_bits(uint32_t ux, uint32_t uy) {
  const uint32_t ma = ux & ABS32, mb = uy & ABS32;
  const uint32_t s = ma + mb;
  uint32_t r = s - B32;
  r = s < B32 + MN32 ? 0u : r;
  r = r > INF32 ? INF32 : r;
  const bool zero = (ma < MN32) | (mb < MN32);
  const bool inf = (ma == INF32) | (mb == INF32);
  const bool nan = (ma > INF32) | (mb > INF32) | (inf & zero);
  r = zero ? 0u : r;
  r = inf ? INF32 : r;
  return nan ? NAN32 : r | ((ux ^ uy) & SIGN32);
}

// arith.pad on float32 patterns: |a| - |b| + B, computed as (|a| + B) - |b| with |a| + B < 2^32;
// below MN (the would-be negative results included) flushes to 0; sign xor.
PA_INLINE uint32_t pad_bits(uint32_t ux, uint32_t uy) {
  const uint32_t ma = ux & ABS32, mb = uy & ABS32;
  const uint32_t s = ma + B32;
  uint32_t r = s - mb;
  r = s < mb + MN32 ? 0u : r;
  r = r > INF32 ? INF32 : r;
  const bool za = ma < MN32, zb = mb < MN32;
  const bool ia = ma == INF32, ib = mb == INF32;
  const bool nan = (ma > INF32) | (mb > INF32) | (za & zb) | (ia & ib);
  r = (za | ib) ? 0u : r;
  r = (zb | ia) ? INF32 : r;
  return nan ? NAN32 : r | ((ux ^ uy) & SIGN32);
}

}  // namespace pa_bits
