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

// arith.pa_exp of a float32 z (pa_elementwise.cpp's scalar exp32, vectorizable): paexp2(y) with y = z *^ log2 e the
// float64 PAM, i.e. pattern round(y * 2^23) + B, y clamped to +-512. In three vectorizable steps:
//  1. from the float64 pattern of z, the pattern of v = clamp(y) * 2^23: y's pattern is
//     |z| + log2e - B (z finite and nonzero: a float32 in float64 lies far inside the float64
//     range, so the PAM neither flushes nor overflows), times 2^23 by exponent-field addition,
//     clamped to 2^32 (also for z = inf), 0 for z = 0, z's sign;
//  2. round(v), ties to even, by the float64 add of 1.5 * 2^52 (|v| <= 2^32 < 2^51), read off
//     the pattern of the sum;
//  3. round(v) + B into the float32 range, NaN for NaN z.
constexpr int64_t EXP_C = 0x3FF71547652B82FELL - 0x3FF0000000000000LL + (23LL << 52);  // log2e - B, * 2^23
constexpr int64_t P2_32 = (1023LL + 32) << 52, MN64 = 1LL << 52, ABS64 = 0x7FFFFFFFFFFFFFFFLL;
constexpr double ROUNDER = 6755399441055744.0;  // 1.5 * 2^52
constexpr int64_t ROUNDER_BITS = 0x4338000000000000LL;
PA_INLINE int64_t exp_v_bits(int64_t u) {
  const int64_t ma = u & ABS64;
  int64_t p = ma > P2_32 - EXP_C ? P2_32 : ma + EXP_C;  // compared first: inf + EXP_C would wrap
  p = ma < MN64 ? 0 : p;
  return p | (u & ~ABS64);
}
PA_INLINE int64_t round_bits(int64_t v) {
  double d;
  std::memcpy(&d, &v, 8);
  d += ROUNDER;
  int64_t r;
  std::memcpy(&r, &d, 8);
  return r - ROUNDER_BITS;
}
PA_INLINE uint32_t exp_out_bits(int64_t t, uint32_t uz) {
  int64_t r = t + B32;
  r = r < int64_t(MN32) ? 0 : r;
  r = r > int64_t(INF32) ? int64_t(INF32) : r;
  return (uz & ABS32) > INF32 ? NAN32 : static_cast<uint32_t>(r);
}

// step 0: the float64 pattern of a float32 z (exact)
PA_INLINE int64_t exp_z_bits(float z) {
  const double d = z;
  int64_t u;
  std::memcpy(&u, &d, 8);
  return u;
}

}  // namespace pa_bits
