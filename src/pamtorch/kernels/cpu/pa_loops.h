// The elementwise binary loop shared by pa_elementwise.cpp (float32 patterns, uint32_t) and
// pa_lowp.cpp (bfloat16/float16 patterns, uint16_t): a TensorIterator over out = OP(a, b) on
// bit patterns, whose contiguous and scalar-broadcast inner loops are compiled twice, for
// AVX2 and portably (the AVX2 copy only called where the CPU has it), and whose other
// strides take a scalar loop.
#pragma once

#include <torch/extension.h>

#include <ATen/TensorIterator.h>

#include <cstdint>
#include <cstring>

namespace pa_loops {

enum Bcast { BOTH, SCALAR_A, SCALAR_B };

template <class T, T (*OP)(T, T), Bcast K>
inline void loop_body(T* __restrict o, const T* __restrict a, const T* __restrict b, int64_t n) {
  if (K == BOTH) {
    for (int64_t i = 0; i < n; ++i) o[i] = OP(a[i], b[i]);
  } else if (K == SCALAR_A) {
    const T x = a[0];
    for (int64_t i = 0; i < n; ++i) o[i] = OP(x, b[i]);
  } else {
    const T y = b[0];
    for (int64_t i = 0; i < n; ++i) o[i] = OP(a[i], y);
  }
}

#if defined(__x86_64__) && !defined(PAM_NO_X86)
template <class T, T (*OP)(T, T), Bcast K>
__attribute__((target("avx2"))) void loop_avx2(T* o, const T* a, const T* b, int64_t n) {
  loop_body<T, OP, K>(o, a, b, n);
}
inline bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#endif

template <class T, T (*OP)(T, T), Bcast K>
void loop_fast(T* o, const T* a, const T* b, int64_t n) {
#if defined(__x86_64__) && !defined(PAM_NO_X86)
  if (has_avx2()) return loop_avx2<T, OP, K>(o, a, b, n);
#endif
  loop_body<T, OP, K>(o, a, b, n);
}

// out = OP(a, b) for any strides (data/strides as TensorIterator gives them: out, a, b), one
// value at a time through memcpy, so the operands may alias
template <class T, T (*OP)(T, T)>
inline void strided_loop(char** data, const int64_t* strides, int64_t n) {
  constexpr int64_t S = sizeof(T);
  for (int64_t i = 0; i < n; ++i) {
    T u, v;
    std::memcpy(&u, data[1] + i * strides[1], S);
    std::memcpy(&v, data[2] + i * strides[2], S);
    const T r = OP(u, v);
    std::memcpy(data[0] + i * strides[0], &r, S);
  }
}

// a = OP(a, b) in place (the output is the first operand, so the loops do not take
// __restrict): contiguous, with b contiguous or one broadcast value
template <class T, T (*OP)(T, T), Bcast K>
inline void inplace_body(T* a, const T* b, int64_t n) {
  if (K == SCALAR_B) {
    const T y = b[0];
    for (int64_t i = 0; i < n; ++i) a[i] = OP(a[i], y);
  } else {
    for (int64_t i = 0; i < n; ++i) a[i] = OP(a[i], b[i]);
  }
}

#if defined(__x86_64__) && !defined(PAM_NO_X86)
template <class T, T (*OP)(T, T), Bcast K>
__attribute__((target("avx2"))) void inplace_avx2(T* a, const T* b, int64_t n) {
  inplace_body<T, OP, K>(a, b, n);
}
#endif

template <class T, T (*OP)(T, T), Bcast K>
void inplace_fast(T* a, const T* b, int64_t n) {
#if defined(__x86_64__) && !defined(PAM_NO_X86)
  if (has_avx2()) return inplace_avx2<T, OP, K>(a, b, n);
#endif
  inplace_body<T, OP, K>(a, b, n);
}

// a = OP(a, b) elementwise, b broadcast to a's shape (checked by the caller, as the caller
// checks that b shares no memory with a and that no two elements of a share memory): the
// values out-of-place OP(a, b) followed by a.copy_() would give, without the new tensor
template <class T, T (*OP)(T, T)>
void binary_inplace_iter(at::Tensor& a, const at::Tensor& b) {
  auto iter = at::TensorIteratorConfig().add_output(a).add_const_input(a).add_const_input(b).build();
  iter.for_each([](char** data, const int64_t* strides, int64_t n) {
    constexpr int64_t S = sizeof(T);
    auto* o = reinterpret_cast<T*>(data[0]);
    const auto* y = reinterpret_cast<const T*>(data[2]);
    if (data[0] == data[1] && strides[0] == S && strides[1] == S && strides[2] == S)
      return inplace_fast<T, OP, BOTH>(o, y, n);
    if (data[0] == data[1] && strides[0] == S && strides[1] == S && strides[2] == 0)
      return inplace_fast<T, OP, SCALAR_B>(o, y, n);
    strided_loop<T, OP>(data, strides, n);
  });
}

// out = OP(a, b) elementwise with broadcasting, a new tensor of a's dtype (checked by the caller)
template <class T, T (*OP)(T, T)>
at::Tensor binary_iter(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out;
  auto iter = at::TensorIteratorConfig().add_output(out).add_const_input(a).add_const_input(b).build();
  iter.for_each([](char** data, const int64_t* strides, int64_t n) {
    constexpr int64_t S = sizeof(T);
    auto* o = reinterpret_cast<T*>(data[0]);
    const auto* x = reinterpret_cast<const T*>(data[1]);
    const auto* y = reinterpret_cast<const T*>(data[2]);
    if (strides[0] == S && strides[1] == S && strides[2] == S) return loop_fast<T, OP, BOTH>(o, x, y, n);
    if (strides[0] == S && strides[1] == 0 && strides[2] == S) return loop_fast<T, OP, SCALAR_A>(o, x, y, n);
    if (strides[0] == S && strides[1] == S && strides[2] == 0) return loop_fast<T, OP, SCALAR_B>(o, x, y, n);
    strided_loop<T, OP>(data, strides, n);
  });
  return iter.output();
}

}  // namespace pa_loops
