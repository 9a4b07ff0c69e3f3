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
//
// No floating-point multiply or divide is used: only integer adds, shifts, compares and
// conversions between int64 and double (which are exact here).

#include <torch/extension.h>

#include <ATen/TensorIterator.h>
#include <ATen/native/cpu/Loops.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace pa_ew {

constexpr int64_t B32 = 0x3F800000, MN32 = 0x00800000, INF32 = 0x7F800000, NAN32 = 0x7FC00000;
constexpr int64_t B64 = 0x3FF0000000000000LL, MN64 = 0x0010000000000000LL,
                  INF64 = 0x7FF0000000000000LL, NAN64 = 0x7FF8000000000000LL;
constexpr uint32_t SIGN32 = 0x80000000u;
constexpr uint64_t SIGN64 = 0x8000000000000000ULL;
const double LOG2E = 1.4426950408889634;  // math.log2(math.e), as in arith.LOG2E

inline uint32_t u32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
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

inline float pam32(float x, float y) {
  const uint32_t ux = u32(x), uy = u32(y);
  const int64_t ma = ux & 0x7FFFFFFF, mb = uy & 0x7FFFFFFF;
  const bool za = ma < MN32, zb = mb < MN32, ia = ma == INF32, ib = mb == INF32;
  const bool nan = ma > INF32 || mb > INF32 || ((ia || ib) && (za || zb));
  int64_t r = range32(ma - B32 + mb);
  r = (za || zb) ? 0 : r;
  r = (ia || ib) ? INF32 : r;
  r = nan ? NAN32 : r;
  const uint32_t s = nan ? 0u : ((ux ^ uy) & SIGN32);
  return f32(static_cast<uint32_t>(r) | s);
}

inline float pad32(float x, float y) {
  const uint32_t ux = u32(x), uy = u32(y);
  const int64_t ma = ux & 0x7FFFFFFF, mb = uy & 0x7FFFFFFF;
  const bool za = ma < MN32, zb = mb < MN32, ia = ma == INF32, ib = mb == INF32;
  const bool nan = ma > INF32 || mb > INF32 || (za && zb) || (ia && ib);
  int64_t r = range32(ma - mb + B32);
  r = (za || ib) ? 0 : r;
  r = (zb || ia) ? INF32 : r;
  r = nan ? NAN32 : r;
  const uint32_t s = nan ? 0u : ((ux ^ uy) & SIGN32);
  return f32(static_cast<uint32_t>(r) | s);
}

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

// round(n / 2), ties to even (arith._half_round_even); >> is an arithmetic shift
inline int64_t half_round_even(int64_t n) {
  const int64_t h = n >> 1;
  return ((n & 1) && (h & 1)) ? h + 1 : h;
}

template <int SIGN>
inline float sqrt_like32(float x) {
  const uint32_t ux = u32(x);
  const bool neg = (ux & SIGN32) != 0;
  const int64_t m = ux & 0x7FFFFFFF;
  const bool zero = m < MN32, inf = m == INF32, nan = m > INF32;
  int64_t r = range32(half_round_even(SIGN * (m - B32)) + B32);
  r = zero ? (SIGN > 0 ? 0 : INF32) : r;
  r = inf ? (SIGN > 0 ? INF32 : 0) : r;
  r = (nan || (neg && !zero)) ? NAN32 : r;
  return f32(static_cast<uint32_t>(r) | ((neg && zero) ? SIGN32 : 0u));
}

void check_f32(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "pamtorch ", op, ": '", name, "' must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "pamtorch ", op, ": '", name, "' must be a CPU tensor, got ",
              t.device());
}

template <typename F>
at::Tensor binary(const at::Tensor& a, const at::Tensor& b, const char* op, F fn) {
  check_f32(a, op, "a");
  check_f32(b, op, "b");
  at::Tensor out;
  auto iter = at::TensorIteratorConfig()
                  .add_output(out)
                  .add_const_input(a)
                  .add_const_input(b)
                  .build();
  at::native::cpu_kernel(iter, fn);
  return iter.output();
}

template <typename F>
at::Tensor unary(const at::Tensor& x, const char* op, F fn) {
  check_f32(x, op, "x");
  at::Tensor out;
  auto iter = at::TensorIteratorConfig().add_output(out).add_const_input(x).build();
  at::native::cpu_kernel(iter, fn);
  return iter.output();
}

at::Tensor pam(const at::Tensor& a, const at::Tensor& b) {
  return binary(a, b, "pam", [](float x, float y) -> float { return pam32(x, y); });
}
at::Tensor pad(const at::Tensor& a, const at::Tensor& b) {
  return binary(a, b, "pad", [](float x, float y) -> float { return pad32(x, y); });
}
at::Tensor exp(const at::Tensor& x) {
  return unary(x, "exp", [](float v) -> float { return exp32(v); });
}
at::Tensor log(const at::Tensor& x) {
  return unary(x, "log", [](float v) -> float { return log32(v); });
}
at::Tensor sqrt(const at::Tensor& x) {
  return unary(x, "sqrt", [](float v) -> float { return sqrt_like32<1>(v); });
}
at::Tensor rsqrt(const at::Tensor& x) {
  return unary(x, "rsqrt", [](float v) -> float { return sqrt_like32<-1>(v); });
}

}  // namespace pa_ew

void register_elementwise(pybind11::module& m) {
  m.def("ew_pam", &pa_ew::pam, "PAM of two float32 tensors (broadcasting)");
  m.def("ew_pad", &pa_ew::pad, "PAD of two float32 tensors (broadcasting)");
  m.def("ew_exp", &pa_ew::exp, "PA exp of a float32 tensor");
  m.def("ew_log", &pa_ew::log, "PA log of a float32 tensor");
  m.def("ew_sqrt", &pa_ew::sqrt, "PA sqrt of a float32 tensor");
  m.def("ew_rsqrt", &pa_ew::rsqrt, "PA rsqrt of a float32 tensor");
}
