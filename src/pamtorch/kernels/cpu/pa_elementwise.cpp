// pamtorch CPU kernels: the elementwise piecewise affine ops on float32 tensors.
//
// Each function here is a bit-exact port of the integer rules in pamtorch/arith.py (the
// pure-torch implementation, which stays the definition and the fallback). Broadcasting,
// strides, output allocation and threading come from ATen's TensorIterator, so these take
// the same operands torch's own elementwise ops take.
//
//   pam(a, b)   pattern |a| + |b| - B, sign xor       (arith.pam)
//   pad(a, b)   pattern |a| - |b| + B, sign xor       (arith.pad)
//   exp(x)      paexp2(x *^ log2 e), PAM in float64   (arith.pa_exp)
//   log(x)      palog2(x) /^ log2 e, PAD in float64   (arith.pa_log)
//   sqrt(x), rsqrt(x)                                 (arith.pa_sqrt, arith.pa_rsqrt)
//   exp_exact_grad(x, o, g)   the exact derivative of exp applied to g (autograd._Unary)
//   gelu_forward(x), gelu_backward(dy, x)   nn/functional.py's GELU composition in one pass
//   log_softmax_forward(x, dim), log_softmax_backward(y, dy, dim)   its log-softmax, fused
//       around torch's own amax and sum
//
// No floating-point multiply or divide is used: only integer adds, shifts, compares,
// floor/round-to-integer, and conversions between float, double and int64 (exact here,
// except the one final double -> float rounding of log, as in arith.pa_log).

#include <torch/extension.h>

#include <ATen/TensorIterator.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "pa_bits.h"
#include "pa_loops.h"

namespace pa_ew {

constexpr int64_t B32 = 0x3F800000, MN32 = 0x00800000, INF32 = 0x7F800000, NAN32 = 0x7FC00000;
constexpr int64_t B64 = 0x3FF0000000000000LL, MN64 = 0x0010000000000000LL,
                  INF64 = 0x7FF0000000000000LL, NAN64 = 0x7FF8000000000000LL;
constexpr uint32_t SIGN32 = 0x80000000u;
constexpr uint64_t SIGN64 = 0x8000000000000000ULL;
const double LOG2E = 1.4426950408889634;  // math.log2(math.e), as in arith.LOG2E

using pa_bits::f32;
using pa_bits::u32;
inline uint64_t u64(double d) {
  uint64_t u;
  std::memcpy(&u, &d, 8);
  return u;
}
inline double f64(uint64_t u) {
  double d;
  std::memcpy(&d, &u, 8);
  return d;
}

// flush patterns below the smallest normal to 0, clamp overflow to inf (arith._range)
inline int64_t range32(int64_t r) { return r < MN32 ? 0 : (r > INF32 ? INF32 : r); }
inline int64_t range64(int64_t r) { return r < MN64 ? 0 : (r > INF64 ? INF64 : r); }

// the float32 rules (pa_bits.h), in 32-bit unsigned lanes
using pa_bits::pad_bits;
using pa_bits::pam_bits;

// float64 PAM / PAD on patterns (arith.pam / arith.pad for float64, wrap-around included)
inline double pam64(double x, double y) {
  const uint64_t ux = u64(x), uy = u64(y);
  const int64_t ma = static_cast<int64_t>(ux & ~SIGN64), mb = static_cast<int64_t>(uy & ~SIGN64);
  const bool za = ma < MN64, zb = mb < MN64, ia = ma == INF64, ib = mb == INF64;
  const bool nan = ma > INF64 || mb > INF64 || ((ia || ib) && (za || zb));
  const int64_t t = ma - B64;
  const int64_t s = static_cast<int64_t>(static_cast<uint64_t>(t) + static_cast<uint64_t>(mb));
  int64_t r = range64(s);
  if (t > 0 && s < 0) r = INF64;
  r = (za || zb) ? 0 : r;
  r = (ia || ib) ? INF64 : r;
  r = nan ? NAN64 : r;
  const uint64_t sg = nan ? 0u : ((ux ^ uy) & SIGN64);
  return f64(static_cast<uint64_t>(r) | sg);
}

inline double pad64(double x, double y) {
  const uint64_t ux = u64(x), uy = u64(y);
  const int64_t ma = static_cast<int64_t>(ux & ~SIGN64), mb = static_cast<int64_t>(uy & ~SIGN64);
  const bool za = ma < MN64, zb = mb < MN64, ia = ma == INF64, ib = mb == INF64;
  const bool nan = ma > INF64 || mb > INF64 || (za && zb) || (ia && ib);
  const int64_t d = ma - mb;
  int64_t r = range64(d + B64);
  if (d > INF64 - B64) r = INF64;
  r = (za || ib) ? 0 : r;
  r = (zb || ia) ? INF64 : r;
  r = nan ? NAN64 : r;
  const uint64_t sg = nan ? 0u : ((ux ^ uy) & SIGN64);
  return f64(static_cast<uint64_t>(r) | sg);
}

// v * 2^k by exponent-field addition (arith._ldexp_f64: zero stays zero)
inline double ldexp_bits(double v, int k) {
  const uint64_t u = u64(v);
  if ((u & ~SIGN64) == 0) return v;
  return f64(u + (static_cast<uint64_t>(static_cast<int64_t>(k)) << 52));
}

// arith._paexp2_f64 for the float32 format: pattern round(y * 2^23) + B
inline float paexp2_32(double y) {
  if (std::isnan(y)) return f32(static_cast<uint32_t>(NAN32));
  const double lim = 512.0;  // 2^(32 - 23)
  const double yc = y > lim ? lim : (y < -lim ? -lim : y);
  const double t = std::nearbyint(ldexp_bits(yc, 23));  // round half to even
  return f32(static_cast<uint32_t>(range32(static_cast<int64_t>(t) + B32)));
}

inline float exp32(float x) { return paexp2_32(pam64(static_cast<double>(x), LOG2E)); }

inline float log32(float x) {
  const uint32_t ux = u32(x);
  const bool neg = (ux & SIGN32) != 0;
  const int64_t m = ux & 0x7FFFFFFF;
  if (m > INF32 || (neg && m >= MN32)) return f32(static_cast<uint32_t>(NAN32));
  if (m < MN32) return -std::numeric_limits<float>::infinity();
  if (m == INF32) return std::numeric_limits<float>::infinity();
  const double l = ldexp_bits(static_cast<double>(m - B32), -23);  // palog2, exact
  return static_cast<float>(pad64(l, LOG2E));                     // rounded once
}

// x * 2^k on patterns (arith.scale_pow2 for float32): zero stays signed zero, inf/NaN pass,
// flush below the smallest normal, inf above the largest finite
inline uint32_t scale_pow2_bits(uint32_t ug, int64_t k) {
  const int64_t m = ug & 0x7FFFFFFF;
  int64_t r = range32(m + static_cast<int64_t>(static_cast<uint64_t>(k) << 23));
  r = m < MN32 ? 0 : r;
  r = m >= INF32 ? m : r;
  return static_cast<uint32_t>(r) | (ug & SIGN32);
}

// The exact derivative of pa_exp applied to the upstream g (autograd._Unary.backward with
// kind "exact", op "exp"): g * 2^(floor(y) + c), y = pam64(x, log2 e), c the carry of the
// mantissa add; where the output o is zero, inf or NaN, the approx derivative pam(o, g).
constexpr uint64_t LOG2E_FRAC = 0x00071547652B82FEULL;  // fraction field of log2 e in float64
inline uint32_t exp_exact_grad_bits(uint32_t ux, uint32_t uo, uint32_t ug) {
  const uint32_t mo = uo & 0x7FFFFFFFu;
  if (mo < uint32_t(MN32) || mo >= uint32_t(INF32)) return pam_bits(uo, ug);
  const double y = pam64(static_cast<double>(f32(ux)), LOG2E);
  const double yc = y < -4096.0 ? -4096.0 : (y > 4096.0 ? 4096.0 : y);
  const int64_t fl = static_cast<int64_t>(std::floor(yc));
  const uint32_t mx = ux & 0x7FFFFFFFu;
  const uint64_t frac = mx < uint32_t(MN32) ? 0 : (mx & 0x7FFFFFu);
  const int64_t c = static_cast<int64_t>(((frac << 29) + LOG2E_FRAC) >> 52);
  return scale_pow2_bits(ug, fl + c);
}

// round(n / 2), ties to even (arith._half_round_even); >> is an arithmetic shift
inline int64_t half_round_even(int64_t n) {
  const int64_t h = n >> 1;
  return ((n & 1) && (h & 1)) ? h + 1 : h;
}

template <int SIGN>
inline uint32_t sqrt_like_bits(uint32_t ux) {
  const bool neg = (ux & SIGN32) != 0;
  const int64_t m = ux & 0x7FFFFFFF;
  const bool zero = m < MN32, inf = m == INF32, nan = m > INF32;
  int64_t r = range32(half_round_even(SIGN * (m - B32)) + B32);
  r = zero ? (SIGN > 0 ? 0 : INF32) : r;
  r = inf ? (SIGN > 0 ? INF32 : 0) : r;
  r = (nan || (neg && !zero)) ? NAN32 : r;
  return static_cast<uint32_t>(r) | ((neg && zero) ? SIGN32 : 0u);
}

void check_f32(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "pamtorch ", op, ": '", name, "' must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "pamtorch ", op, ": '", name, "' must be a CPU tensor, got ",
              t.device());
}

#if defined(__x86_64__) && !defined(PAM_NO_X86)
using pa_loops::has_avx2;
#endif

template <uint32_t (*OP)(uint32_t, uint32_t)>
at::Tensor binary(const at::Tensor& a, const at::Tensor& b, const char* op) {
  check_f32(a, op, "a");
  check_f32(b, op, "b");
  return pa_loops::binary_iter<uint32_t, OP>(a, b);
}

template <uint32_t (*OP)(uint32_t)>
inline void unary_body(uint32_t* __restrict o, const uint32_t* __restrict a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = OP(a[i]);
}
#if defined(__x86_64__) && !defined(PAM_NO_X86)
template <uint32_t (*OP)(uint32_t)>
__attribute__((target("avx2"))) void unary_avx2(uint32_t* o, const uint32_t* a, int64_t n) {
  unary_body<OP>(o, a, n);
}
#endif

template <uint32_t (*OP)(uint32_t)>
at::Tensor unary(const at::Tensor& x, const char* op) {
  check_f32(x, op, "x");
  at::Tensor out;
  auto iter = at::TensorIteratorConfig().add_output(out).add_const_input(x).build();
  iter.for_each([](char** data, const int64_t* strides, int64_t n) {
    auto* o = reinterpret_cast<uint32_t*>(data[0]);
    const auto* a = reinterpret_cast<const uint32_t*>(data[1]);
    if (strides[0] == 4 && strides[1] == 4) {
#if defined(__x86_64__) && !defined(PAM_NO_X86)
      if (has_avx2()) return unary_avx2<OP>(o, a, n);
#endif
      return unary_body<OP>(o, a, n);
    }
    for (int64_t i = 0; i < n; ++i) {
      uint32_t u;
      std::memcpy(&u, data[1] + i * strides[1], 4);
      const uint32_t r = OP(u);
      std::memcpy(data[0] + i * strides[0], &r, 4);
    }
  });
  return iter.output();
}

at::Tensor pam(const at::Tensor& a, const at::Tensor& b) { return binary<pam_bits>(a, b, "pam"); }
at::Tensor pad(const at::Tensor& a, const at::Tensor& b) { return binary<pad_bits>(a, b, "pad"); }
// a = PAM(a, b) / PAD(a, b) in place, for the route's in-place forms (pa_route.cpp checks
// the shapes and that no memory is shared); returns a
at::Tensor pam_(at::Tensor& a, const at::Tensor& b) {
  check_f32(a, "pam_", "a");
  check_f32(b, "pam_", "b");
  pa_loops::binary_inplace_iter<uint32_t, pam_bits>(a, b);
  return a;
}
at::Tensor pad_(at::Tensor& a, const at::Tensor& b) {
  check_f32(a, "pad_", "a");
  check_f32(b, "pad_", "b");
  pa_loops::binary_inplace_iter<uint32_t, pad_bits>(a, b);
  return a;
}
inline uint32_t exp_bits(uint32_t u) { return u32(exp32(f32(u))); }

// arith._pa_pow for float32 x and a Python-number exponent p != 0: paexp2(palog2(|x|) ·̂ p),
// the PAM in float64, rounded once; then torch.pow's signs and special values, in the same
// order as the torch implementation (its NaNs are the canonical 0x7FC00000)
inline uint32_t pow_bits(uint32_t ux, double p) {
  const bool neg = (ux & SIGN32) != 0;
  const int64_t m = ux & 0x7FFFFFFF;
  const bool zero = m < MN32, inf = m == INF32, nan = m > INF32;
  double l = ldexp_bits(static_cast<double>(m - B32), -23);   // palog2, exact
  if (zero) l = -std::numeric_limits<double>::infinity();
  if (inf) l = std::numeric_limits<double>::infinity();
  uint32_t out = u32(paexp2_32(pam64(l, p)));
  const bool finite = std::isfinite(p);
  if (!finite) {
    const bool one = std::isinf(p) ? (l == 0.0) : (l == 0.0 && !neg);
    if (one) out = u32(1.0f);
  }
  if (finite && p == std::floor(p)) {
    if (neg && std::fmod(std::fabs(p), 2.0) == 1.0) out ^= SIGN32;
  } else if (finite) {
    if (neg && !zero) out = static_cast<uint32_t>(NAN32);
    if (neg && zero) out &= ~SIGN32;
  }
  return nan ? static_cast<uint32_t>(NAN32) : out;
}

// out = f(x) on float32 patterns, element by element, any strides and layout (TensorIterator)
template <typename F>
at::Tensor map_bits(const at::Tensor& x, const F& f) {
  at::Tensor out;
  auto iter = at::TensorIteratorConfig().add_output(out).add_const_input(x).build();
  iter.for_each([&f](char** data, const int64_t* strides, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      uint32_t u;
      std::memcpy(&u, data[1] + i * strides[1], 4);
      const uint32_t r = f(u);
      std::memcpy(data[0] + i * strides[0], &r, 4);
    }
  });
  return iter.output();
}

at::Tensor pow(const at::Tensor& x, double p) {
  check_f32(x, "pow", "x");
  TORCH_CHECK(p != 0.0, "pamtorch pow: the exponent 0 is pow(x, 0) = 1, handled by the caller");
  return map_bits(x, [p](uint32_t u) { return pow_bits(u, p); });
}
inline uint32_t log_bits(uint32_t u) { return u32(log32(f32(u))); }

at::Tensor exp_exact_grad(const at::Tensor& x, const at::Tensor& o, const at::Tensor& g) {
  check_f32(x, "exp_exact_grad", "x");
  check_f32(o, "exp_exact_grad", "o");
  check_f32(g, "exp_exact_grad", "g");
  at::Tensor out;
  auto iter = at::TensorIteratorConfig()
                  .add_output(out)
                  .add_const_input(x)
                  .add_const_input(o)
                  .add_const_input(g)
                  .build();
  iter.for_each([](char** data, const int64_t* strides, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      uint32_t ux, uo, ug;
      std::memcpy(&ux, data[1] + i * strides[1], 4);
      std::memcpy(&uo, data[2] + i * strides[2], 4);
      std::memcpy(&ug, data[3] + i * strides[3], 4);
      const uint32_t r = exp_exact_grad_bits(ux, uo, ug);
      std::memcpy(data[0] + i * strides[0], &r, 4);
    }
  });
  return iter.output();
}

at::Tensor exp(const at::Tensor& x) { return unary<exp_bits>(x, "exp"); }
at::Tensor log(const at::Tensor& x) { return unary<log_bits>(x, "log"); }
at::Tensor sqrt(const at::Tensor& x) { return unary<sqrt_like_bits<1>>(x, "sqrt"); }
at::Tensor rsqrt(const at::Tensor& x) { return unary<sqrt_like_bits<-1>>(x, "rsqrt"); }

// ---------------------------------------------------------------------------
// Fused blocks: one pass per element over the compositions of pamtorch/nn/functional.py,
// each step the same float32 operation in the same order (the float adds are IEEE adds,
// the PA ops the ports above), so the results equal the composition bit for bit.

// paexp2_32 of a float32 y in 32-bit lanes: |y| * 2^23 is exact in float32 by exponent-field
// addition for |y| >= 2^-126 (below, it rounds to 0 anyway); the clamp to +-255 (instead of
// +-512) keeps it in int32 and still lies beyond the inf and flush boundaries (|t| >= 2^30),
// so the result pattern is the same. The comparisons are on patterns and the float add is
// unconditional, so that the compiler may if-convert the selects.
constexpr uint32_t P255 = 0x437F0000u, P2_23 = 0x4B000000u;  // patterns of 255 and 2^23
inline float paexp2_f32(float y) {
  const uint32_t uy = u32(y), my = uy & 0x7FFFFFFFu;
  const uint32_t ua = my > P255 ? P255 : my;  // |y| clamped (NaN handled below)
  const bool tiny = ua < uint32_t(MN32);
  // round half to even by the float add of 2^23 (|v| < 2^23; larger |v| are integers already)
  const uint32_t uv = ua + (23u << 23);
  const float v = f32(uv);
  const float rounded = (v + 8388608.0f) - 8388608.0f;
  const int32_t ta = static_cast<int32_t>(uv < P2_23 ? rounded : v);
  const int32_t t = tiny ? 0 : ((uy & SIGN32) ? -ta : ta);
  uint32_t r = static_cast<uint32_t>(t) + uint32_t(B32);
  r = t >= int32_t(INF32 - B32) ? uint32_t(INF32) : r;
  r = t < int32_t(MN32 - B32) ? 0u : r;
  r = my > uint32_t(INF32) ? uint32_t(NAN32) : r;
  return f32(r);
}

// gelu_forward: x /^ (1 + paexp2(-(x *^ cA + ((x *^ x) *^ x) *^ cB)))
inline uint32_t gelu_fwd_bits(uint32_t ux, uint32_t ca, uint32_t cb) {
  const uint32_t x3 = pam_bits(pam_bits(ux, ux), ux);
  const float h2 = f32(pam_bits(ux, ca)) + f32(pam_bits(x3, cb));
  const float e = paexp2_f32(-h2);
  return pad_bits(ux, u32(1.0f + e));
}

// gelu_backward: dy *^ f', f' = s + ((x /^ d) *^ (e /^ d)) *^ (A + x^2 *^ c3B), s = 1 /^ d,
// d = 1 + e (e /^ d read as 1 where e is inf), f' = 1 above +clamp and 0 below -clamp
struct GeluBwdConsts {
  uint32_t ca, cb, c3b;
  float a, clamp;
};
inline uint32_t gelu_bwd_bits(uint32_t udy, uint32_t ux, const GeluBwdConsts& k) {
  const uint32_t x2 = pam_bits(ux, ux);
  const uint32_t x3 = pam_bits(x2, ux);
  const float h2 = f32(pam_bits(ux, k.ca)) + f32(pam_bits(x3, k.cb));
  const float e = paexp2_f32(-h2);
  const uint32_t d = u32(1.0f + e);
  const float s = f32(pad_bits(u32(1.0f), d));
  const uint32_t oms = std::isinf(e) ? u32(1.0f) : pad_bits(u32(e), d);
  const uint32_t f = pad_bits(ux, d);
  const float hp = k.a + f32(pam_bits(x2, k.c3b));
  float df = s + f32(pam_bits(pam_bits(f, oms), u32(hp)));
  const float x = f32(ux);
  df = x > k.clamp ? 1.0f : df;
  df = x < -k.clamp ? 0.0f : df;
  return pam_bits(udy, u32(df));
}

// Contiguous blocks, one simple loop per step through buffers that stay in L1: GCC vectorizes
// each step but paexp2's (the whole chain in one loop it does not vectorize at all).
constexpr int64_t GELU_BLOCK = 256;
__attribute__((always_inline)) inline void gelu_fwd_body(uint32_t* __restrict o, const uint32_t* __restrict x, int64_t n, uint32_t ca,
                          uint32_t cb) {
  alignas(32) uint32_t a[GELU_BLOCK], b[GELU_BLOCK];
  for (int64_t j = 0; j < n; j += GELU_BLOCK) {
    const int64_t m = n - j < GELU_BLOCK ? n - j : GELU_BLOCK;
    const uint32_t* __restrict xs = x + j;
    uint32_t* __restrict os = o + j;
    for (int64_t i = 0; i < m; ++i) a[i] = pam_bits(xs[i], xs[i]);
    for (int64_t i = 0; i < m; ++i) a[i] = pam_bits(a[i], xs[i]);
    for (int64_t i = 0; i < m; ++i) a[i] = pam_bits(a[i], cb);
    for (int64_t i = 0; i < m; ++i) b[i] = pam_bits(xs[i], ca);
    for (int64_t i = 0; i < m; ++i) a[i] = u32(f32(b[i]) + f32(a[i]));
    for (int64_t i = 0; i < m; ++i) a[i] = u32(1.0f + paexp2_f32(-f32(a[i])));
    for (int64_t i = 0; i < m; ++i) os[i] = pad_bits(xs[i], a[i]);
  }
}
__attribute__((always_inline)) inline void gelu_bwd_body(uint32_t* __restrict o, const uint32_t* __restrict g, const uint32_t* __restrict x,
                          int64_t n, const GeluBwdConsts k) {
  alignas(32) uint32_t x2[GELU_BLOCK], a[GELU_BLOCK], b[GELU_BLOCK], e[GELU_BLOCK], d[GELU_BLOCK],
      s[GELU_BLOCK];
  const uint32_t one = u32(1.0f), uclamp = u32(k.clamp) & 0x7FFFFFFFu;
  for (int64_t j = 0; j < n; j += GELU_BLOCK) {
    const int64_t m = n - j < GELU_BLOCK ? n - j : GELU_BLOCK;
    const uint32_t* __restrict xs = x + j;
    const uint32_t* __restrict gs = g + j;
    uint32_t* __restrict os = o + j;
    for (int64_t i = 0; i < m; ++i) x2[i] = pam_bits(xs[i], xs[i]);
    for (int64_t i = 0; i < m; ++i) a[i] = pam_bits(x2[i], xs[i]);
    for (int64_t i = 0; i < m; ++i) a[i] = pam_bits(a[i], k.cb);
    for (int64_t i = 0; i < m; ++i) b[i] = pam_bits(xs[i], k.ca);
    for (int64_t i = 0; i < m; ++i) a[i] = u32(f32(b[i]) + f32(a[i]));        // h2
    for (int64_t i = 0; i < m; ++i) e[i] = u32(paexp2_f32(-f32(a[i])));
    for (int64_t i = 0; i < m; ++i) d[i] = u32(1.0f + f32(e[i]));
    for (int64_t i = 0; i < m; ++i) s[i] = pad_bits(one, d[i]);
    for (int64_t i = 0; i < m; ++i) a[i] = pad_bits(e[i], d[i]);
    for (int64_t i = 0; i < m; ++i) a[i] = (e[i] & 0x7FFFFFFFu) == uint32_t(INF32) ? one : a[i];  // 1 - s
    for (int64_t i = 0; i < m; ++i) b[i] = pad_bits(xs[i], d[i]);                // x s
    for (int64_t i = 0; i < m; ++i) x2[i] = pam_bits(x2[i], k.c3b);
    for (int64_t i = 0; i < m; ++i) x2[i] = u32(k.a + f32(x2[i]));               // h'
    for (int64_t i = 0; i < m; ++i) b[i] = pam_bits(b[i], a[i]);
    for (int64_t i = 0; i < m; ++i) b[i] = pam_bits(b[i], x2[i]);
    for (int64_t i = 0; i < m; ++i) b[i] = u32(f32(s[i]) + f32(b[i]));           // f'
    for (int64_t i = 0; i < m; ++i) {  // x > clamp -> 1, x < -clamp -> 0 (NaN: neither)
      const uint32_t mx = xs[i] & 0x7FFFFFFFu;
      const bool big = mx > uclamp && mx <= uint32_t(INF32);
      b[i] = big ? ((xs[i] & SIGN32) ? 0u : one) : b[i];
    }
    for (int64_t i = 0; i < m; ++i) os[i] = pam_bits(gs[i], b[i]);
  }
}
#if defined(__x86_64__) && !defined(PAM_NO_X86)
__attribute__((target("avx2"))) void gelu_fwd_avx2(uint32_t* o, const uint32_t* a, int64_t n, uint32_t ua,
                                                   uint32_t ub) {
  gelu_fwd_body(o, a, n, ua, ub);
}
__attribute__((target("avx2"))) void gelu_bwd_avx2(uint32_t* o, const uint32_t* g, const uint32_t* a, int64_t n,
                                                   const GeluBwdConsts k) {
  gelu_bwd_body(o, g, a, n, k);
}
#endif

at::Tensor gelu_forward(const at::Tensor& x, double ca, double cb) {
  check_f32(x, "gelu_forward", "x");
  const uint32_t ua = u32(static_cast<float>(ca)), ub = u32(static_cast<float>(cb));
  at::Tensor out;
  auto iter = at::TensorIteratorConfig().add_output(out).add_const_input(x).build();
  iter.for_each([ua, ub](char** data, const int64_t* strides, int64_t n) {
    if (strides[0] == 4 && strides[1] == 4) {
      auto* o = reinterpret_cast<uint32_t*>(data[0]);
      const auto* a = reinterpret_cast<const uint32_t*>(data[1]);
#if defined(__x86_64__) && !defined(PAM_NO_X86)
      if (has_avx2()) return gelu_fwd_avx2(o, a, n, ua, ub);
#endif
      return gelu_fwd_body(o, a, n, ua, ub);
    }
    for (int64_t i = 0; i < n; ++i) {
      uint32_t u;
      std::memcpy(&u, data[1] + i * strides[1], 4);
      const uint32_t r = gelu_fwd_bits(u, ua, ub);
      std::memcpy(data[0] + i * strides[0], &r, 4);
    }
  });
  return iter.output();
}

at::Tensor gelu_backward(const at::Tensor& dy, const at::Tensor& x, double ca, double cb, double c3b,
                         double a, double clamp) {
  check_f32(dy, "gelu_backward", "dy");
  check_f32(x, "gelu_backward", "x");
  const GeluBwdConsts k{u32(static_cast<float>(ca)), u32(static_cast<float>(cb)), u32(static_cast<float>(c3b)),
                        static_cast<float>(a), static_cast<float>(clamp)};
  at::Tensor out;
  auto iter = at::TensorIteratorConfig().add_output(out).add_const_input(dy).add_const_input(x).build();
  iter.for_each([&k](char** data, const int64_t* strides, int64_t n) {
    if (strides[0] == 4 && strides[1] == 4 && strides[2] == 4) {
      auto* o = reinterpret_cast<uint32_t*>(data[0]);
      const auto* g = reinterpret_cast<const uint32_t*>(data[1]);
      const auto* a = reinterpret_cast<const uint32_t*>(data[2]);
#if defined(__x86_64__) && !defined(PAM_NO_X86)
      if (has_avx2()) return gelu_bwd_avx2(o, g, a, n, k);
#endif
      return gelu_bwd_body(o, g, a, n, k);
    }
    for (int64_t i = 0; i < n; ++i) {
      uint32_t g, u;
      std::memcpy(&g, data[1] + i * strides[1], 4);
      std::memcpy(&u, data[2] + i * strides[2], 4);
      const uint32_t r = gelu_bwd_bits(g, u, k);
      std::memcpy(data[0] + i * strides[0], &r, 4);
    }
  });
  return iter.output();
}

// log_softmax_forward along dim: z = x - amax(x), out = z - pa_log(sum(pa_exp(z))). The max and
// the sum are torch's own reductions (at::amax, at::sum) on tensors of the composition's shape
// and layout, so their summation order is the composition's. Which NaN pattern a float
// subtraction of two NaNs returns depends on how torch's kernel is compiled, so when a NaN
// arises (a NaN or inf in a row) this returns an undefined tensor (None) and the caller runs
// the composition; without NaNs every step is an IEEE operation with one result.
// contiguous rows (the reduced value broadcast, stride 0), compiled twice like the loops above;
// each returns whether a NaN arose
// pa_exp by the vectorizable steps of pa_bits.h (exp32's bits), in chunks of LSM_BLK
constexpr int64_t LSM_BLK = 256;
// (o may be z: each o[i] is written after the last read of z[i])
PA_INLINE void exp_chunk(float* o, const float* z, int64_t k) {
  alignas(32) int64_t p[LSM_BLK];
  for (int64_t i = 0; i < k; ++i) p[i] = pa_bits::exp_z_bits(z[i]);
  for (int64_t i = 0; i < k; ++i) p[i] = pa_bits::exp_v_bits(p[i]);
  for (int64_t i = 0; i < k; ++i) p[i] = pa_bits::round_bits(p[i]);
  for (int64_t i = 0; i < k; ++i) o[i] = f32(pa_bits::exp_out_bits(p[i], u32(z[i])));
}
PA_INLINE bool lsm_fwd_body(float* __restrict e, const float* __restrict x, float m, int64_t n) {
  uint32_t nan = 0;  // an integer OR reduction vectorizes; a bool one did not
  for (int64_t c = 0; c < n; c += LSM_BLK) {
    const int64_t k = std::min(LSM_BLK, n - c);
    float* __restrict ec = e + c;
    const float* __restrict xc = x + c;
    for (int64_t i = 0; i < k; ++i) ec[i] = xc[i] - m;
    for (int64_t i = 0; i < k; ++i) nan |= static_cast<uint32_t>((u32(ec[i]) & pa_bits::ABS32) > pa_bits::INF32);
    exp_chunk(ec, ec, k);
  }
  return nan != 0;
}
PA_INLINE bool lsm_bwd_body(float* __restrict o, const float* __restrict g, const float* __restrict y,
                         uint32_t s, int64_t n) {
  uint32_t nan = 0;
  for (int64_t c = 0; c < n; c += LSM_BLK) {
    const int64_t k = std::min(LSM_BLK, n - c);
    float* __restrict oc = o + c;
    const float* __restrict gc = g + c;
    exp_chunk(oc, y + c, k);
    for (int64_t i = 0; i < k; ++i) oc[i] = gc[i] - f32(pam_bits(u32(oc[i]), s));
    for (int64_t i = 0; i < k; ++i) nan |= static_cast<uint32_t>((u32(oc[i]) & pa_bits::ABS32) > pa_bits::INF32);
  }
  return nan != 0;
}
#if defined(__x86_64__) && !defined(PAM_NO_X86)
__attribute__((target("avx2"))) bool lsm_fwd_avx2(float* e, const float* x, float m, int64_t n) {
  return lsm_fwd_body(e, x, m, n);
}
__attribute__((target("avx2"))) bool lsm_bwd_avx2(float* o, const float* g, const float* y, uint32_t s, int64_t n) {
  return lsm_bwd_body(o, g, y, s, n);
}
#endif

// Two passes and one buffer of x's size: e = pa_exp(x - m), s = sum(e), then e is overwritten
// with (x - m) - pa_log(s), the difference recomputed (the same IEEE subtraction) rather than
// kept in a second buffer.
at::Tensor log_softmax_forward(const at::Tensor& x, int64_t dim) {
  check_f32(x, "log_softmax_forward", "x");
  const at::Tensor m = at::amax(x, {dim}, /*keepdim=*/true);
  at::Tensor e;
  std::atomic<bool> nan{false};
  auto it1 = at::TensorIteratorConfig().add_output(e).add_const_input(x).add_const_input(m).build();
  it1.for_each([&nan](char** data, const int64_t* strides, int64_t n) {
    bool any = false;
    if (strides[0] == 4 && strides[1] == 4 && strides[2] == 0) {
      float mv;
      std::memcpy(&mv, data[2], 4);
      auto* e = reinterpret_cast<float*>(data[0]);
      const auto* x = reinterpret_cast<const float*>(data[1]);
#if defined(__x86_64__) && !defined(PAM_NO_X86)
      if (has_avx2()) any = lsm_fwd_avx2(e, x, mv, n); else
#endif
      any = lsm_fwd_body(e, x, mv, n);
      n = 0;
    }
    for (int64_t i = 0; i < n; ++i) {
      float xv, mv;
      std::memcpy(&xv, data[1] + i * strides[1], 4);
      std::memcpy(&mv, data[2] + i * strides[2], 4);
      const float zv = xv - mv;
      const float ev = exp32(zv);
      any |= zv != zv;
      std::memcpy(data[0] + i * strides[0], &ev, 4);
    }
    if (any) nan.store(true, std::memory_order_relaxed);
  });
  if (nan.load()) return at::Tensor();
  e = it1.output(0);
  const at::Tensor s = at::sum(e, {dim}, /*keepdim=*/true);
  auto it2 = at::TensorIteratorConfig().add_output(e).add_const_input(x).add_const_input(m)
                 .add_const_input(s).build();
  it2.for_each([](char** data, const int64_t* strides, int64_t n) {
    if (strides[0] == 4 && strides[1] == 4 && strides[2] == 0 && strides[3] == 0) {  // one row: log once
      float mv, sv;
      std::memcpy(&mv, data[2], 4);
      std::memcpy(&sv, data[3], 4);
      const float ls = log32(sv);
      auto* o = reinterpret_cast<float*>(data[0]);
      const auto* x = reinterpret_cast<const float*>(data[1]);
      for (int64_t i = 0; i < n; ++i) o[i] = (x[i] - mv) - ls;
      return;
    }
    for (int64_t i = 0; i < n; ++i) {
      float xv, mv, sv;
      std::memcpy(&xv, data[1] + i * strides[1], 4);
      std::memcpy(&mv, data[2] + i * strides[2], 4);
      std::memcpy(&sv, data[3] + i * strides[3], 4);
      const float r = (xv - mv) - log32(sv);
      std::memcpy(data[0] + i * strides[0], &r, 4);
    }
  });
  return e;
}

// log_softmax_backward along dim: dy - pa_exp(y) *^ sum(dy), the sum torch's own (at::sum);
// an undefined tensor (None) where a NaN arises, as above
at::Tensor log_softmax_backward(const at::Tensor& y, const at::Tensor& dy, int64_t dim) {
  check_f32(y, "log_softmax_backward", "y");
  check_f32(dy, "log_softmax_backward", "dy");
  const at::Tensor s = at::sum(dy, {dim}, /*keepdim=*/true);
  at::Tensor out;
  auto iter = at::TensorIteratorConfig()
                  .add_output(out)
                  .add_const_input(dy)
                  .add_const_input(y)
                  .add_const_input(s)
                  .build();
  std::atomic<bool> nan{false};
  iter.for_each([&nan](char** data, const int64_t* strides, int64_t n) {
    bool any = false;
    if (strides[0] == 4 && strides[1] == 4 && strides[2] == 4 && strides[3] == 0) {
      uint32_t sv;
      std::memcpy(&sv, data[3], 4);
      auto* o = reinterpret_cast<float*>(data[0]);
      const auto* g = reinterpret_cast<const float*>(data[1]);
      const auto* y = reinterpret_cast<const float*>(data[2]);
#if defined(__x86_64__) && !defined(PAM_NO_X86)
      if (has_avx2()) any = lsm_bwd_avx2(o, g, y, sv, n); else
#endif
      any = lsm_bwd_body(o, g, y, sv, n);
      n = 0;
    }
    for (int64_t i = 0; i < n; ++i) {
      float g, yv;
      uint32_t sv;
      std::memcpy(&g, data[1] + i * strides[1], 4);
      std::memcpy(&yv, data[2] + i * strides[2], 4);
      std::memcpy(&sv, data[3] + i * strides[3], 4);
      const float r = g - f32(pam_bits(u32(exp32(yv)), sv));
      any |= r != r;
      std::memcpy(data[0] + i * strides[0], &r, 4);
    }
    if (any) nan.store(true, std::memory_order_relaxed);
  });
  if (nan.load()) return at::Tensor();
  return iter.output();
}

// ---------------------------------------------------------------------------
// The exponential-family activations of ops/activations.py (raw forms), one pass per
// element, each step the float32 operation of the composition in its order: the clamps
// keep NaN (as torch.clamp), the adds are IEEE adds, and every result leaves through a
// PAM or PAD, whose NaN is the canonical one whatever NaN went in.
// kind: 0 sigmoid, 1 tanh, 2 SiLU.

inline float clamp_keep_nan(float v, float lo, float hi) { return v != v ? v : (v < lo ? lo : (v > hi ? hi : v)); }

inline uint32_t act_fwd_bits(uint32_t ux, int kind) {
  const float x = f32(ux);
  if (kind == 0) {   // E(h) ÷̂ (E(h) + E(-h)), h = clamp(x ⊙̂ ½, ±80)
    const float h = clamp_keep_nan(f32(pam_bits(ux, u32(0.5f))), -80.0f, 80.0f);
    const float a = exp32(h), b = exp32(-h);
    return pad_bits(u32(a), u32(a + b));
  }
  if (kind == 1) {   // (E(t) - E(-t)) ÷̂ (E(t) + E(-t)), t = clamp(x, ±9)
    const float t = clamp_keep_nan(x, -9.0f, 9.0f);
    const float a = exp32(t), b = exp32(-t);
    return pad_bits(u32(a - b), u32(a + b));
  }
  // x ÷̂ (1 + E(min(-x, 80)))
  const float e = exp32(clamp_keep_nan(-x, -std::numeric_limits<float>::infinity(), 80.0f));
  return pad_bits(ux, u32(1.0f + e));
}

// kind 0: dy ⊙̂ (y ⊙̂ (1 - y)); 1: dy ⊙̂ (1 - y ⊙̂ y) (v: the output y); 2: SiLU from the
// input v = x, dy ⊙̂ (σ + (x ÷̂ d) ⊙̂ (e ÷̂ d)), e = E(min(-x, 80)), d = 1 + e, σ = 1 ÷̂ d
inline uint32_t act_bwd_bits(uint32_t ug, uint32_t uv, int kind) {
  if (kind == 0) return pam_bits(ug, pam_bits(uv, u32(1.0f - f32(uv))));
  if (kind == 1) return pam_bits(ug, u32(1.0f - f32(pam_bits(uv, uv))));
  const float x = f32(uv);
  const float e = exp32(clamp_keep_nan(-x, -std::numeric_limits<float>::infinity(), 80.0f));
  const uint32_t d = u32(1.0f + e);
  const float sg = f32(pad_bits(u32(1.0f), d));
  const float oms = f32(pad_bits(u32(e), d));
  return pam_bits(ug, u32(sg + f32(pam_bits(pad_bits(uv, d), u32(oms)))));
}

at::Tensor act_forward(const at::Tensor& x, int64_t kind) {
  check_f32(x, "act_forward", "x");
  TORCH_CHECK(kind >= 0 && kind <= 2, "pamtorch act_forward: kind must be 0 (sigmoid), 1 (tanh) or 2 (silu)");
  const int k = static_cast<int>(kind);
  return map_bits(x, [k](uint32_t u) { return act_fwd_bits(u, k); });
}

at::Tensor act_backward(const at::Tensor& dy, const at::Tensor& v, int64_t kind) {
  check_f32(dy, "act_backward", "dy");
  check_f32(v, "act_backward", "v");
  TORCH_CHECK(kind >= 0 && kind <= 2, "pamtorch act_backward: kind must be 0 (sigmoid), 1 (tanh) or 2 (silu)");
  at::Tensor out;
  auto iter = at::TensorIteratorConfig().add_output(out).add_const_input(dy).add_const_input(v).build();
  const int k = static_cast<int>(kind);
  iter.for_each([k](char** data, const int64_t* strides, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      uint32_t g, u;
      std::memcpy(&g, data[1] + i * strides[1], 4);
      std::memcpy(&u, data[2] + i * strides[2], 4);
      const uint32_t r = act_bwd_bits(g, u, k);
      std::memcpy(data[0] + i * strides[0], &r, 4);
    }
  });
  return iter.output();
}

}  // namespace pa_ew

void register_elementwise(pybind11::module& m) {
  m.def("ew_pam", &pa_ew::pam, "PAM of two float32 tensors (broadcasting)");
  m.def("ew_pad", &pa_ew::pad, "PAD of two float32 tensors (broadcasting)");
  m.def("ew_exp", &pa_ew::exp, "PA exp of a float32 tensor");
  m.def("ew_pow", &pa_ew::pow, "PA pow of a float32 tensor to a nonzero Python-number exponent");
  m.def("fused_act_forward", &pa_ew::act_forward, "PA sigmoid (0), tanh (1) or SiLU (2) in one pass");
  m.def("fused_act_backward", &pa_ew::act_backward,
        "approx PA sigmoid (0) / tanh (1) derivative from the output, SiLU (2) from the input, applied to dy");
  m.def("ew_log", &pa_ew::log, "PA log of a float32 tensor");
  m.def("ew_exp_exact_grad", &pa_ew::exp_exact_grad, "exact derivative of PA exp applied to g");
  m.def("ew_sqrt", &pa_ew::sqrt, "PA sqrt of a float32 tensor");
  m.def("ew_rsqrt", &pa_ew::rsqrt, "PA rsqrt of a float32 tensor");
  m.def("fused_gelu_forward", &pa_ew::gelu_forward, "PA GELU (nn.functional.gelu_forward) in one pass");
  m.def("fused_gelu_backward", &pa_ew::gelu_backward, "approx PA GELU derivative applied to dy in one pass");
  m.def("fused_log_softmax_forward", &pa_ew::log_softmax_forward,
        "PA log-softmax along dim; None where a NaN arises (then the composition runs)");
  m.def("fused_log_softmax_backward", &pa_ew::log_softmax_backward,
        "approx PA log-softmax derivative; None where a NaN arises");
}
