// pamtorch CPU kernels: PA elementwise ops on bfloat16/float16 bit patterns.
// Bit-exact ports of the compositions they replace (see the functions' comments); no
// floating-point multiply or divide: integer adds, compares, selects and table loads only.
//
//   lowp_pam(a, b)   pattern |a| + |b| - B, sign xor   (arith.pam on a 16-bit dtype)
//   lowp_pad(a, b)   pattern |a| - |b| + B, sign xor   (arith.pad on a 16-bit dtype)
//   lowp_lookup(x, table)   table[pattern of x]: any unary op of a 16-bit dtype, the table
//       holding the op's 65536 results (arith computes it once with the op's definition)
//
// Both 16-bit formats share the PA rules with their own constants (arith._FORMATS); a
// magnitude pattern is below 2^15, so the sums |a| + |b| and |a| + B fit in 16 unsigned bits
// and the loops run in 16-bit lanes. Broadcasting, strides, output allocation and threading
// come from ATen's TensorIterator, as in pa_elementwise.cpp.

#include <torch/extension.h>

#include <ATen/TensorIterator.h>

#include <cstdint>
#include <cstring>

#include "pa_loops.h"

namespace pa_lowp {

struct BF16 {  // bias 127, 7 mantissa bits
  static constexpr uint16_t B = 0x3F80, MN = 0x0080, INF = 0x7F80, NAN_ = 0x7FC0;
};
struct F16 {  // bias 15, 10 mantissa bits
  static constexpr uint16_t B = 0x3C00, MN = 0x0400, INF = 0x7C00, NAN_ = 0x7E00;
};
constexpr uint16_t SIGN = 0x8000, MAG = 0x7FFF;

// arith.pam: s = |a| + |b| < 2^16; "s < B + MN" is the underflow test of range(s - B) and
// covers s < B, where s - B would wrap; zero/inf/NaN operands by the IEEE rules, and the sign
// of a NaN result cleared (the canonical NaN)
template <class F>
inline uint16_t pam_bits(uint16_t ux, uint16_t uy) {
  const uint16_t ma = ux & MAG, mb = uy & MAG;
  const uint16_t s = static_cast<uint16_t>(ma + mb);
  uint16_t r = static_cast<uint16_t>(s - F::B);
  r = s < uint16_t(F::B + F::MN) ? uint16_t(0) : r;
  r = r > F::INF ? F::INF : r;
  const bool zero = (ma < F::MN) | (mb < F::MN);
  const bool inf = (ma == F::INF) | (mb == F::INF);
  const bool nan = (ma > F::INF) | (mb > F::INF) | (inf & zero);
  r = zero ? uint16_t(0) : r;
  r = inf ? F::INF : r;
  return nan ? F::NAN_ : static_cast<uint16_t>(r | ((ux ^ uy) & SIGN));
}

// arith.pad: (|a| + B) - |b| with |a| + B < 2^16; below MN (the would-be negative results
// included) flushes to 0
template <class F>
inline uint16_t pad_bits(uint16_t ux, uint16_t uy) {
  const uint16_t ma = ux & MAG, mb = uy & MAG;
  const uint16_t s = static_cast<uint16_t>(ma + F::B);
  uint16_t r = static_cast<uint16_t>(s - mb);
  r = s < static_cast<uint16_t>(mb + F::MN) ? uint16_t(0) : r;
  r = r > F::INF ? F::INF : r;
  const bool za = ma < F::MN, zb = mb < F::MN, ia = ma == F::INF, ib = mb == F::INF;
  const bool nan = (ma > F::INF) | (mb > F::INF) | (za & zb) | (ia & ib);
  r = (za | ib) ? uint16_t(0) : r;
  r = (zb | ia) ? F::INF : r;
  return nan ? F::NAN_ : static_cast<uint16_t>(r | ((ux ^ uy) & SIGN));
}

void check_lowp(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf, "pamtorch ", op, ": '",
              name, "' must be bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "pamtorch ", op, ": '", name, "' must be a CPU tensor, got ", t.device());
}


template <template <class> class OP>
at::Tensor binary(const at::Tensor& a, const at::Tensor& b, const char* op) {
  check_lowp(a, op, "a");
  check_lowp(b, op, "b");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "pamtorch ", op, ": 'a' and 'b' must have one dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  return a.scalar_type() == at::kBFloat16 ? pa_loops::binary_iter<uint16_t, OP<BF16>::f>(a, b)
                                             : pa_loops::binary_iter<uint16_t, OP<F16>::f>(a, b);
}

template <class F>
struct Pam {
  static uint16_t f(uint16_t x, uint16_t y) { return pam_bits<F>(x, y); }
};
template <class F>
struct Pad {
  static uint16_t f(uint16_t x, uint16_t y) { return pad_bits<F>(x, y); }
};

at::Tensor pam(const at::Tensor& a, const at::Tensor& b) { return binary<Pam>(a, b, "lowp_pam"); }
at::Tensor pad(const at::Tensor& a, const at::Tensor& b) { return binary<Pad>(a, b, "lowp_pad"); }

// out = table[pattern of x]: the table holds an op's value for each of the 65536 patterns
at::Tensor lookup(const at::Tensor& x, const at::Tensor& table) {
  check_lowp(x, "lowp_lookup", "x");
  TORCH_CHECK(table.scalar_type() == x.scalar_type() && table.dim() == 1 && table.numel() == 65536 &&
                  table.is_contiguous() && table.device().is_cpu(),
              "pamtorch lowp_lookup: 'table' must be a contiguous CPU tensor of 65536 elements of x's dtype (",
              x.scalar_type(), "), got ", table.scalar_type(), " with shape ", table.sizes());
  const uint16_t* tab = reinterpret_cast<const uint16_t*>(table.data_ptr());
  at::Tensor out;
  auto iter = at::TensorIteratorConfig().add_output(out).add_const_input(x).build();
  iter.for_each([tab](char** data, const int64_t* strides, int64_t n) {
    if (strides[0] == 2 && strides[1] == 2) {
      auto* __restrict o = reinterpret_cast<uint16_t*>(data[0]);
      const auto* __restrict a = reinterpret_cast<const uint16_t*>(data[1]);
      for (int64_t i = 0; i < n; ++i) o[i] = tab[a[i]];
      return;
    }
    for (int64_t i = 0; i < n; ++i) {
      uint16_t u;
      std::memcpy(&u, data[1] + i * strides[1], 2);
      std::memcpy(data[0] + i * strides[0], &tab[u], 2);
    }
  });
  return iter.output();
}

}  // namespace pa_lowp

void register_lowp(pybind11::module& m) {
  m.def("lowp_pam", &pa_lowp::pam, "PAM of two bfloat16 or two float16 tensors (broadcasting)");
  m.def("lowp_pad", &pa_lowp::pad, "PAD of two bfloat16 or two float16 tensors (broadcasting)");
  m.def("lowp_lookup", &pa_lowp::lookup, "table[pattern] for each element of a bfloat16/float16 tensor");
}
