// pamtorch: the kernel route of pamtorch.mode (see mode.py, "the kernel route").
//
// Boxed kernels on the BackendSelect dispatch key, which sits below autograd (forward and
// backward calls both reach it) and which every call passes. Each registered op carries a
// bit: its op kind's, or the "ask" bit of the ops the mode must classify whatever the
// config. A thread that runs no kernel route (mask 0) pays a boxed redispatch and nothing
// else: no Python. On a thread that runs one, an op whose bit is off in the thread's mask
// (a kind the config leaves exact) passes on with the route off, so the calls its own
// kernel makes are not caught (as inside a dispatch mode's call); an op whose bit is on is
// handed to the Python handler, which classifies it with the mode's own code and either
// returns its result or says "pass it on": then the original stack goes on to the kernels
// below, unconverted, without re-entering the dispatcher from the top, and with the route
// off (a dispatch mode does not see the calls inside the calls it passes on either). "Run
// and check" (integer inputs, a result type known only after running) passes it on and
// hands a floating-point result to the refusal. The most frequent calls of a step are
// answered without Python ("answers in C++" below).

#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/ExpandUtils.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/utils/tensor_memoryformats.h>

#include <array>
#include <atomic>
#include <memory>
#include <string>
#include <vector>

namespace py = pybind11;

namespace pa_ew {   // pa_elementwise.cpp
at::Tensor pam(const at::Tensor& a, const at::Tensor& b);
at::Tensor pad(const at::Tensor& a, const at::Tensor& b);
at::Tensor pam_(at::Tensor& a, const at::Tensor& b);
at::Tensor pad_(at::Tensor& a, const at::Tensor& b);
at::Tensor exp(const at::Tensor& x);
at::Tensor log(const at::Tensor& x);
at::Tensor sqrt(const at::Tensor& x);
at::Tensor rsqrt(const at::Tensor& x);
at::Tensor pow(const at::Tensor& x, double p);
at::Tensor act_forward(const at::Tensor& x, int64_t kind);
at::Tensor act_backward(const at::Tensor& dy, const at::Tensor& v, int64_t kind);
}  // namespace pa_ew
namespace pa_lowp {   // pa_lowp.cpp
at::Tensor pam(const at::Tensor& a, const at::Tensor& b);
at::Tensor pad(const at::Tensor& a, const at::Tensor& b);
}  // namespace pa_lowp
at::Tensor route_pam_mm(const at::Tensor& a, const at::Tensor& b);    // pam_matmul.cpp
at::Tensor route_pam_bmm(const at::Tensor& a, const at::Tensor& b);   // pam_matmul.cpp
namespace pa_cnn {   // pa_conv.cpp
using Ints = std::vector<int64_t>;
bool conv_forward(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, const Ints& stride,
                  const Ints& padding, const Ints& dilation, int64_t groups, at::Tensor* out);
bool conv_backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w, const Ints& stride,
                   const Ints& padding, const Ints& dilation, int64_t groups, const std::array<bool, 3>& mask,
                   at::Tensor out[3]);
bool batch_norm_forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
                        const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
                        at::Tensor out[3]);
bool batch_norm_backward(const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
                         const c10::optional<at::Tensor>& save_mean, const c10::optional<at::Tensor>& save_invstd,
                         bool train, double eps, const std::array<bool, 3>& mask, at::Tensor out[3]);
bool layer_norm_forward(const at::Tensor& x, const Ints& shape, const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, double eps, at::Tensor out[3]);
bool layer_norm_backward(const at::Tensor& dy, const at::Tensor& x, const Ints& shape, const at::Tensor& mean,
                         const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& bias, const std::array<bool, 3>& mask, at::Tensor out[3]);
}  // namespace pa_cnn

namespace {

thread_local uint32_t g_mask = 0;   // 0: no kernel route on this thread
// the families whose calls this thread answers in C++ (the config's kind for them is PA with
// no offset and no mantissa bits, and nothing else may see the call): kPlain* bits
thread_local uint32_t g_plain = 0;
// the handler, its answers and the refusal of a float result; never freed (the dispatcher
// may call during teardown)
py::object* g_handler = nullptr;
py::object* g_refuse = nullptr;
py::object* g_pass = nullptr;
py::object* g_opaque = nullptr;
py::object* g_after = nullptr;
std::vector<std::unique_ptr<torch::Library>> g_libraries;

const c10::DispatchKeySet kBelow(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::BackendSelect);

struct Mask {
  uint32_t prev;
  explicit Mask(uint32_t m) : prev(g_mask) { g_mask = m; }
  ~Mask() { g_mask = prev; }
};

// An argument as the dispatch mode would see it: a tensor stays a tensor, a wrapped number
// becomes the Python number, and a dtype, layout or memory format, an int in the boxed
// stack, becomes torch.float32 (not 6) again. (What passes on keeps its boxed stack.)
py::object to_python(const c10::IValue& v, const c10::Argument& a) {
  if (v.isTensor()) {
    const at::Tensor& t = v.toTensor();
    // a wrapped number (the 8.0 of x * 8.0) reaches a dispatch mode as the Python number,
    // and the op table's implementations tell the two apart (a number near 1 in an
    // optimizer step): the same here
    if (t.defined() && t.unsafeGetTensorImpl()->is_wrapped_number()) return torch::jit::toPyObject(c10::IValue(t.item()));
    return py::reinterpret_steal<py::object>(THPVariable_Wrap(t));
  }
  if (v.isInt()) {
    c10::TypePtr t = a.real_type();
    if (auto opt = t->castRaw<c10::OptionalType>()) t = opt->getElementType();
    switch (t->kind()) {
      case c10::TypeKind::ScalarTypeType:
        return py::reinterpret_borrow<py::object>(
            reinterpret_cast<PyObject*>(torch::getTHPDtype(static_cast<at::ScalarType>(v.toInt()))));
      case c10::TypeKind::LayoutType:
        return py::reinterpret_borrow<py::object>(
            reinterpret_cast<PyObject*>(torch::getTHPLayout(static_cast<at::Layout>(v.toInt()))));
      case c10::TypeKind::MemoryFormatType:
        return py::reinterpret_steal<py::object>(
            torch::utils::getTHPMemoryFormat(static_cast<at::MemoryFormat>(v.toInt())));
      default:
        break;
    }
  }
  return torch::jit::toPyObject(v);
}

// ---------------------------------------------------------------------------------------
// Answers in C++: the calls of a step that the Python handler would answer the same way
// every time, decided from the boxed arguments. Each returns false, before touching the
// stack, for anything outside its narrow case (another dtype or device, a broadcast that
// does not fit in place, an offset, ...), which then goes to Python as before.
// tests/test_mode_kernel_route.py checks them bit for bit against the Python handler.

enum Fast : int64_t {
  kNone = 0,
  kAlpha = 1,        // add/sub/rsub/index_add/_foreach_add/_foreach_sub (which pass through):
                     // free when alpha == 1 or no operand is a float tensor
  kMul = 2,          // aten::mul.Tensor: PAM
  kMulInplace = 3,   // aten::mul_.Tensor
  kDiv = 4,          // aten::div.Tensor: PAD
  kDivInplace = 5,   // aten::div_.Tensor
  kMm = 6,           // aten::mm: PAM product
  kAddmm = 7,        // aten::addmm with beta = alpha = 1: bias + PAM product
  kBmm = 8,          // aten::bmm
  kMulScalar = 9,    // aten::mul.Scalar / mul_.Scalar: PAM by a Python number, outside
  kMulScalarInplace = 10,   //   the optimizer's factors near 1 (Python decides those)
  kDivScalar = 11,   // aten::div.Scalar / div_.Scalar: PAD, likewise
  kDivScalarInplace = 12,
  kPow = 13,         // aten::pow.Tensor_Scalar: PA pow to a Python number
  kSqrt = 14, kRsqrt = 15, kExp = 16, kLog = 17,   // the PA unary ops (no offset)
  kMean = 18,        // aten::mean.dim / mean.default without dtype: sum ÷̂ n
  kAct = 19,         // 19-21: aten::sigmoid, tanh, silu (the nonlinear kind)
  kActInplace = 22,  // 22-24: sigmoid_, tanh_, silu_
  kActBackward = 25,   // 25-27: sigmoid_backward, tanh_backward (from the output), silu_backward
  kActLast = 27,
  kConv = 28,          // aten::convolution: 1-D/2-D, untransposed (pa_conv.cpp)
  kConvBackward = 29,  // aten::convolution_backward, likewise (the approx derivative)
  kBatchNorm = 30,     // aten::native_batch_norm
  kBatchNormBackward = 31,   // aten::native_batch_norm_backward (the approx derivative)
  kLayerNorm = 32,     // aten::native_layer_norm (pa_norm.cpp's fused kernel, where it applies)
  kLayerNormBackward = 33,   // aten::native_layer_norm_backward, likewise
};
constexpr uint32_t kPlainElementwise = 1;   // mul/div (the elementwise and optimizer kinds)
constexpr uint32_t kPlainMatmul = 2;        // mm/addmm/bmm
constexpr uint32_t kPlainAlpha = 4;         // the alpha-conditioned ops' free calls
constexpr uint32_t kPlainNonlinear = 8;     // sigmoid/tanh/silu
constexpr uint32_t kPlainConv = 16;         // convolution forward and backward (matmul kind, approx)
constexpr uint32_t kPlainNorm = 32;         // batch and layer norm, forward and backward (norm kind, approx)

// a Python ``s == 1`` on the Scalar: 1, 1.0, True or 1+0j
bool is_one(const c10::IValue& v) {
  if (v.isInt()) return v.toInt() == 1;
  if (v.isDouble()) return v.toDouble() == 1.0;
  if (v.isBool()) return v.toBool();
  if (v.isComplexDouble()) return v.toComplexDouble() == c10::complex<double>(1.0, 0.0);
  return false;
}

bool is_float(const at::Tensor& t) { return t.defined() && (t.is_floating_point() || t.is_complex()); }

// a float32 CPU tensor, dense, with no lazy negation or conjugation
bool f32(const at::Tensor& t) {
  return t.defined() && t.scalar_type() == at::kFloat && t.device().is_cpu() && t.layout() == at::kStrided &&
         !t.is_neg() && !t.is_conj() && !t.unsafeGetTensorImpl()->is_wrapped_number();
}

// a bfloat16 or float16 CPU tensor, likewise (the 16-bit PA kernels of pa_lowp.cpp)
bool lowp(const at::Tensor& t) {
  return t.defined() && (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf) && t.device().is_cpu() &&
         t.layout() == at::kStrided && !t.is_neg() && !t.is_conj() && !t.unsafeGetTensorImpl()->is_wrapped_number();
}

// an operand of the PA elementwise ops answered here: float32 or 16-bit, as above
bool pa_dense(const at::Tensor& t) { return f32(t) || lowp(t); }

// PAM / PAD by the kernels of the operands' dtype (a and b of one dtype, pa_dense)
at::Tensor pa_mul(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kFloat ? pa_ew::pam(a, b) : pa_lowp::pam(a, b);
}
at::Tensor pa_div(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kFloat ? pa_ew::pad(a, b) : pa_lowp::pad(a, b);
}

// matmul._f32: the float32 values PA arithmetic sees in a product's operand (float16
// subnormals, zeros to PA arithmetic but normal in float32, flushed to a signed zero)
at::Tensor as_f32(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return t;
  at::Tensor y = t.to(at::kFloat);
  if (t.scalar_type() == at::kHalf) y = at::where(at::lt(y.abs(), 6.103515625e-05), at::copysign(at::zeros_like(y), y), y);
  return y;
}

bool near_one(double c);
// how many optimizer steps run (ops/table.py's OPTIMIZER_STEP, told at every change): a
// factor near 1 takes the optimizer's form only inside one
std::atomic<int64_t> g_optimizer_steps{0};
inline bool optimizer_form(double c) { return near_one(c) && g_optimizer_steps.load(std::memory_order_relaxed) > 0; }

// the second operand of a mul/div of ``like`` (float32 or 16-bit) as the Python handler's
// promote() makes it: a tensor of like's dtype as it is; a real wrapped number (the 2.0 of
// x * 2.0, a Python number to the handler) as torch.tensor(float(c), dtype=like.dtype)
// (rounded to float32 first, then to a 16-bit dtype, as torch.tensor rounds a Python float),
// unless it is a factor near 1, whose optimizer form Python decides; undefined otherwise
at::Tensor pa_operand(const c10::IValue& v, const at::Tensor& like) {
  if (!v.isTensor()) return at::Tensor();
  const at::Tensor& t = v.toTensor();
  if (pa_dense(t) && t.scalar_type() == like.scalar_type()) return t;
  if (!t.defined() || !t.unsafeGetTensorImpl()->is_wrapped_number()) return at::Tensor();
  double c;
  if (t.scalar_type() == at::kDouble) {
    c = t.item<double>();
  } else if (t.scalar_type() == at::kLong) {
    c = static_cast<double>(t.item<int64_t>());
  } else {
    return at::Tensor();   // bool, complex: Python
  }
  if (optimizer_form(c)) return at::Tensor();
  return at::scalar_tensor(static_cast<float>(c), like.options());
}

// a real Scalar (int or float, not bool or complex) as the Python handler's float(c)
bool real_scalar(const c10::IValue& v, double* out) {
  if (v.isInt()) {
    *out = static_cast<double>(v.toInt());
    return true;
  }
  if (v.isDouble()) {
    *out = v.toDouble();
    return true;
  }
  return false;
}

// elementwise.scalar_mul/scalar_div take the optimizer's form for 1/2 <= |c| <= 2, c != ±1,
// inside a step: those calls are left to Python
bool near_one(double c) {
  const double a = std::fabs(c);
  return a >= 0.5 && a <= 2.0 && a != 1.0;
}

// an int list argument (SymInt[] holding plain ints)
bool int_list(const c10::IValue& v, std::vector<int64_t>* out) {
  if (!v.isIntList()) return false;
  *out = v.toIntVector();
  return true;
}

bool int_arg(const c10::IValue& v, int64_t* out) {
  if (!v.isInt()) return false;
  *out = v.toInt();
  return true;
}

c10::optional<at::Tensor> opt_tensor(const c10::IValue& v) {
  if (v.isTensor()) return v.toTensor();
  return c10::nullopt;
}

bool mask3(const c10::IValue& v, std::array<bool, 3>* out) {
  if (!v.isBoolList()) return false;
  auto l = v.toBoolList();
  if (l.size() != 3) return false;
  for (size_t i = 0; i < 3; ++i) (*out)[i] = l.get(i);
  return true;
}

// convolution, batch norm and layer norm (pa_conv.cpp): ops/conv.py's, ops/norms.py's and
// nn/functional.py's functions in C++
bool answer_cnn(int64_t fast, c10::ArrayRef<c10::IValue> args, size_t n, torch::jit::Stack* stack) {
  const bool conv = fast == kConv || fast == kConvBackward;
  if (!(g_plain & (conv ? kPlainConv : kPlainNorm))) return false;
  for (size_t i = 0; i < n; ++i)   // SymInts, tensor subclasses' wrappers and the like: Python
    if (!(args[i].isTensor() || args[i].isNone() || args[i].isIntList() || args[i].isInt() ||
          args[i].isBool() || args[i].isDouble() || args[i].isBoolList()))
      return false;
  at::Tensor out[3];
  size_t outputs = 3;
  {
    Mask off(0);
    c10::impl::ExcludeDispatchKeyGuard no_python(
        c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot}));
    if (fast == kConv) {
      // convolution(input, weight, bias?, stride, padding, dilation, transposed, output_padding, groups)
      std::vector<int64_t> stride, padding, dilation;
      int64_t groups;
      if (n != 9 || !args[0].isTensor() || !args[1].isTensor() || !int_list(args[3], &stride) ||
          !int_list(args[4], &padding) || !int_list(args[5], &dilation) || !args[6].isBool() || args[6].toBool() ||
          !int_arg(args[8], &groups))
        return false;
      if (!pa_cnn::conv_forward(args[0].toTensor(), args[1].toTensor(), opt_tensor(args[2]), stride, padding,
                                dilation, groups, &out[0]))
        return false;
      outputs = 1;
    } else if (fast == kConvBackward) {
      // convolution_backward(grad_output, input, weight, bias_sizes?, stride, padding, dilation,
      //                      transposed, output_padding, groups, output_mask)
      std::vector<int64_t> stride, padding, dilation;
      int64_t groups;
      std::array<bool, 3> mask;
      if (n != 11 || !args[0].isTensor() || !args[1].isTensor() || !args[2].isTensor() ||
          !int_list(args[4], &stride) || !int_list(args[5], &padding) || !int_list(args[6], &dilation) ||
          !args[7].isBool() || args[7].toBool() || !int_arg(args[9], &groups) || !mask3(args[10], &mask))
        return false;
      if (!pa_cnn::conv_backward(args[0].toTensor(), args[1].toTensor(), args[2].toTensor(), stride, padding,
                                 dilation, groups, mask, out))
        return false;
    } else if (fast == kBatchNorm) {
      // native_batch_norm(input, weight?, bias?, running_mean?, running_var?, training, momentum, eps)
      if (n != 8 || !args[0].isTensor() || !args[5].isBool() || !args[6].isDouble() || !args[7].isDouble())
        return false;
      if (!pa_cnn::batch_norm_forward(args[0].toTensor(), opt_tensor(args[1]), opt_tensor(args[2]),
                                      opt_tensor(args[3]), opt_tensor(args[4]), args[5].toBool(),
                                      args[6].toDouble(), args[7].toDouble(), out))
        return false;
    } else if (fast == kBatchNormBackward) {
      // native_batch_norm_backward(grad_out, input, weight?, running_mean?, running_var?,
      //                            save_mean?, save_invstd?, train, eps, output_mask)
      std::array<bool, 3> mask;
      if (n != 10 || !args[0].isTensor() || !args[1].isTensor() || !args[7].isBool() || !args[8].isDouble() ||
          !mask3(args[9], &mask))
        return false;
      if (!pa_cnn::batch_norm_backward(args[0].toTensor(), args[1].toTensor(), opt_tensor(args[2]),
                                       opt_tensor(args[3]), opt_tensor(args[4]), opt_tensor(args[5]),
                                       opt_tensor(args[6]), args[7].toBool(), args[8].toDouble(), mask, out))
        return false;
    } else if (fast == kLayerNorm) {
      // native_layer_norm(input, normalized_shape, weight?, bias?, eps)
      std::vector<int64_t> shape;
      if (n != 5 || !args[0].isTensor() || !int_list(args[1], &shape) || !args[4].isDouble()) return false;
      if (!pa_cnn::layer_norm_forward(args[0].toTensor(), shape, opt_tensor(args[2]), opt_tensor(args[3]),
                                      args[4].toDouble(), out))
        return false;
    } else if (fast == kLayerNormBackward) {
      // native_layer_norm_backward(grad_out, input, normalized_shape, mean, rstd, weight?, bias?, output_mask)
      std::vector<int64_t> shape;
      std::array<bool, 3> mask;
      if (n != 8 || !args[0].isTensor() || !args[1].isTensor() || !int_list(args[2], &shape) ||
          !args[3].isTensor() || !args[4].isTensor() || !mask3(args[7], &mask))
        return false;
      if (!pa_cnn::layer_norm_backward(args[0].toTensor(), args[1].toTensor(), shape, args[3].toTensor(),
                                       args[4].toTensor(), opt_tensor(args[5]), opt_tensor(args[6]), mask, out))
        return false;
    } else {
      return false;
    }
  }
  torch::jit::drop(*stack, n);
  for (size_t i = 0; i < outputs; ++i) stack->push_back(std::move(out[i]));
  return true;
}

// a = PAM/PAD(a, b) for an in-place form, b broadcast to a's shape: into a where no memory
// is shared (between b and a, or within a; float32), else computed apart and copied in, as
// the Python handler does
at::Tensor in_place(at::Tensor& a, const at::Tensor& b, bool mul) {
  if (lowp(a)) return a.copy_(mul ? pa_lowp::pam(a, b) : pa_lowp::pad(a, b));
  if (at::has_internal_overlap(a) == at::MemOverlap::No && at::get_overlap_status(a, b) == at::MemOverlapStatus::No)
    return mul ? pa_ew::pam_(a, b) : pa_ew::pad_(a, b);
  return a.copy_(mul ? pa_ew::pam(a, b) : pa_ew::pad(a, b));
}

// Runs the call in C++ and leaves its result on the stack, or returns false (stack
// untouched). The calls made here run with this thread's route off and below Python
// dispatch, as the Python handler's do.
bool answer(int64_t fast, const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t n = schema.arguments().size();
  auto args = torch::jit::last(*stack, n);
  if (fast == kAlpha) {
    if (!(g_plain & kPlainAlpha)) return false;
    bool floating = false, alpha_one = true;
    for (size_t i = 0; i < n; ++i) {
      const auto& v = args[i];
      if (schema.arguments()[i].name() == "alpha" && !is_one(v)) alpha_one = false;
      if (v.isTensor()) {
        floating = floating || is_float(v.toTensor());
      } else if (v.isTensorList()) {
        for (const at::Tensor& t : v.toTensorList()) floating = floating || is_float(t);
      }
    }
    if (floating && !alpha_one) return false;   // alpha multiplies: Python routes it
    // floating-point operands: free with alpha 1; integer ones: free (an addition)
    Mask off(0);
    op.redispatchBoxed(ks & kBelow, stack);
    return true;
  }
  if (fast >= kConv) return answer_cnn(fast, args, n, stack);
  const bool product = fast == kMm || fast == kAddmm || fast == kBmm;
  const bool nonlinear = fast >= kAct && fast <= kActLast;
  if (!(g_plain & (product ? kPlainMatmul : nonlinear ? kPlainNonlinear : kPlainElementwise))) return false;
  const bool elementwise = !product && !nonlinear;
  at::Tensor out;
  {
    Mask off(0);
    c10::impl::ExcludeDispatchKeyGuard no_python(
        c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot}));
    if (nonlinear) {
      // ops/activations.py: the raw forward (fused_act_forward), or the approx derivative
      // from the output (sigmoid, tanh) or the input (silu), for float32 operands
      if (!args[0].isTensor() || !f32(args[0].toTensor())) return false;
      const at::Tensor& x = args[0].toTensor();
      if (fast >= kActBackward) {
        if (!args[1].isTensor() || !f32(args[1].toTensor())) return false;
        out = pa_ew::act_backward(x, args[1].toTensor(), fast - kActBackward);
      } else if (fast >= kActInplace) {
        out = x.copy_(pa_ew::act_forward(x, fast - kActInplace));
      } else {
        out = pa_ew::act_forward(x, fast - kAct);
      }
    } else if (fast >= kMulScalar && fast <= kDivScalarInplace) {
      if (!args[0].isTensor() || !pa_dense(args[0].toTensor())) return false;
      double c;
      if (!real_scalar(args[1], &c) || optimizer_form(c)) return false;
      at::Tensor a = args[0].toTensor();
      // promote(): the number as a 0-d tensor of a's dtype (torch.tensor(float(c), dtype=...))
      at::Tensor b = at::scalar_tensor(static_cast<float>(c), a.options());
      const bool mul = fast <= kMulScalarInplace;
      if (fast == kMulScalarInplace || fast == kDivScalarInplace) {
        out = in_place(a, b, mul);
      } else {
        out = mul ? pa_mul(a, b) : pa_div(a, b);
      }
    } else if (fast == kPow) {
      if (!args[0].isTensor() || !f32(args[0].toTensor())) return false;
      double p;
      if (!real_scalar(args[1], &p)) return false;
      const at::Tensor& x = args[0].toTensor();
      out = p == 0.0 ? at::ones_like(x) : pa_ew::pow(x, p);
    } else if (fast >= kSqrt && fast <= kLog) {
      if (!args[0].isTensor() || !f32(args[0].toTensor())) return false;
      const at::Tensor& x = args[0].toTensor();
      out = fast == kSqrt ? pa_ew::sqrt(x) : fast == kRsqrt ? pa_ew::rsqrt(x) : fast == kExp ? pa_ew::exp(x)
                                                                                              : pa_ew::log(x);
    } else if (fast == kMean) {
      if (!args[0].isTensor() || !f32(args[0].toTensor())) return false;
      const at::Tensor& x = args[0].toTensor();
      // mean.default(self, *, dtype) or mean.dim(self, dim, keepdim, *, dtype)
      const bool by_dim = n == 4;
      if (by_dim && !(args[1].isNone() || args[1].isIntList())) return false;
      if (!args[n - 1].isNone()) return false;   // a dtype: Python casts first
      at::Tensor sum;
      double count;
      std::vector<int64_t> dims;
      if (by_dim && args[1].isIntList()) dims = args[1].toIntVector();
      if (dims.empty()) {
        sum = at::sum(x);
        count = static_cast<double>(x.numel());
      } else {
        sum = at::sum(x, dims, args[2].toBool());
        if (x.dim() == 0) return false;
        int64_t prod = 1;
        for (int64_t d : dims) prod *= x.size(d);
        count = static_cast<double>(prod);
      }
      out = pa_ew::pad(sum, at::scalar_tensor(static_cast<float>(count), sum.options()));
    } else if (elementwise) {
      if (!args[0].isTensor()) return false;
      const at::Tensor& a = args[0].toTensor();
      if (!pa_dense(a)) return false;
      at::Tensor b = pa_operand(args[1], a);
      if (!b.defined()) return false;
      const bool inplace = fast == kMulInplace || fast == kDivInplace;
      if (inplace && at::infer_size(a.sizes(), b.sizes()) != a.sizes()) return false;   // Python raises
      const bool mul = fast == kMul || fast == kMulInplace;
      if (inplace) {
        at::Tensor self = a;
        out = in_place(self, b, mul);
      } else {
        out = mul ? pa_mul(a, b) : pa_div(a, b);
      }
    } else if (fast == kMm || fast == kAddmm) {
      const size_t m = fast == kMm ? 0 : 1;
      if (!args[m].isTensor() || !args[m + 1].isTensor()) return false;
      const at::Tensor& a = args[m].toTensor();
      const at::Tensor& b = args[m + 1].toTensor();
      // ops/matmul.mm: float32 operands (matmul._f32), the product rounded to their dtype
      if (!pa_dense(a) || !pa_dense(b) || a.scalar_type() != b.scalar_type() || a.dim() != 2 || b.dim() != 2 ||
          a.size(1) != b.size(0) || a.numel() == 0 || b.numel() == 0)
        return false;
      if (fast == kAddmm) {
        if (!args[0].isTensor() || !is_one(args[3]) || !is_one(args[4])) return false;
        const at::Tensor& bias = args[0].toTensor();
        std::vector<int64_t> shape{a.size(0), b.size(1)};
        if (!pa_dense(bias) || bias.scalar_type() != a.scalar_type() || !at::is_expandable_to(bias.sizes(), shape))
          return false;
        out = at::add(bias.expand(shape), route_pam_mm(as_f32(a), as_f32(b)).to(a.scalar_type()));
      } else {
        out = route_pam_mm(as_f32(a), as_f32(b)).to(a.scalar_type());
      }
    } else if (fast == kBmm) {
      if (!args[0].isTensor() || !args[1].isTensor()) return false;
      const at::Tensor& a = args[0].toTensor();
      const at::Tensor& b = args[1].toTensor();
      if (!pa_dense(a) || !pa_dense(b) || a.scalar_type() != b.scalar_type() || a.dim() != 3 || b.dim() != 3 ||
          a.size(0) != b.size(0) || a.size(2) != b.size(1) || a.numel() == 0 || b.numel() == 0)
        return false;
      out = route_pam_bmm(as_f32(a), as_f32(b)).to(a.scalar_type());
    } else {
      return false;
    }
  }
  torch::jit::drop(*stack, n);
  stack->push_back(std::move(out));
  return true;
}

void route_call(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack, uint32_t bit,
                int64_t fast) {
  if (g_mask == 0 || g_handler == nullptr) {
    op.redispatchBoxed(ks & kBelow, stack);
    return;
  }
  if (!(g_mask & bit)) {
    Mask off(0);
    op.redispatchBoxed(ks & kBelow, stack);
    return;
  }
  if (fast != kNone && g_plain != 0 && answer(fast, op, ks, stack)) return;
  const auto& schema = op.schema();
  const size_t n = schema.arguments().size();
  const std::string& overload = schema.overload_name();
  bool opaque = false, after = false;
  {
    py::gil_scoped_acquire gil;
    py::list args;
    py::dict kwargs;
    auto values = torch::jit::last(*stack, n);
    for (size_t i = 0; i < n; ++i) {
      const auto& a = schema.arguments()[i];
      py::object v = to_python(values[i], a);
      if (a.kwarg_only())
        kwargs[py::str(a.name())] = v;
      else
        args.append(v);
    }
    py::str name(overload.empty() ? schema.name() : schema.name() + "." + overload);
    py::object out = (*g_handler)(name, py::tuple(args), kwargs);
    if (out.is(*g_opaque)) {
      opaque = true;
    } else if (out.is(*g_after)) {
      after = true;
    } else if (!out.is(*g_pass)) {
      torch::jit::drop(*stack, n);
      const auto& rets = schema.returns();
      if (rets.size() == 1) {
        stack->push_back(torch::jit::toIValue(out, rets[0].type()));
      } else if (rets.size() > 1) {
        py::sequence seq = out.cast<py::sequence>();
        TORCH_CHECK(seq.size() == rets.size(), "pamtorch kernel route: ", schema.name(), " returned ",
                    seq.size(), " values, its schema ", rets.size());
        for (size_t i = 0; i < rets.size(); ++i) stack->push_back(torch::jit::toIValue(seq[i], rets[i].type()));
      }
      return;
    }
  }
  {
    // what passes on runs with the route off, as a dispatch mode's call of it: the calls its
    // own kernel makes (a _foreach op's per-tensor calls) are its business
    Mask off(0);
    op.redispatchBoxed(ks & kBelow, stack);
  }
  if (after) {
    // integer inputs, a result type known only now: a floating-point result was computed
    // with float arithmetic that has no PA implementation, and is refused
    const size_t r = schema.returns().size();
    for (const auto& v : torch::jit::last(*stack, r)) {
      if (v.isTensor() && v.toTensor().defined() &&
          (v.toTensor().is_floating_point() || v.toTensor().is_complex())) {
        py::gil_scoped_acquire gil;
        py::str name(overload.empty() ? schema.name() : schema.name() + "." + overload);
        (*g_refuse)(name, py::cast(v.toTensor()));
        break;
      }
    }
  }
}

struct RouteKernel final : c10::OperatorKernel {
  uint32_t bit;
  int64_t fast;
  RouteKernel(uint32_t b, int64_t f) : bit(b), fast(f) {}
  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
    route_call(op, ks, stack, bit, fast);
  }
};

uint32_t set_mask(uint32_t mask) {
  uint32_t prev = g_mask;
  g_mask = mask;
  return prev;
}

uint32_t set_plain(uint32_t plain) {
  uint32_t prev = g_plain;
  g_plain = plain;
  return prev;
}

void set_handler(py::object handler, py::object refuse, py::object pass, py::object opaque,
                 py::object after) {
  if (g_handler == nullptr) {
    g_handler = new py::object();
    g_refuse = new py::object();
    g_pass = new py::object();
    g_opaque = new py::object();
    g_after = new py::object();
  }
  *g_handler = std::move(handler);
  *g_refuse = std::move(refuse);
  *g_pass = std::move(pass);
  *g_opaque = std::move(opaque);
  *g_after = std::move(after);
}

// Register the route kernel, with its bit, for ops "name.overload" of namespace ns on
// BackendSelect. The registrations last as long as the process.
// fast: for each name, the Fast code of the calls it may answer in C++ (kNone: none)
void register_ops(const std::string& ns, const std::vector<std::string>& names, uint32_t bit,
                  const std::vector<int64_t>& fast) {
  TORCH_CHECK(fast.empty() || fast.size() == names.size(), "route_register: ", names.size(), " names, ",
              fast.size(), " fast codes");
  auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, ns,
                                              std::optional<c10::DispatchKey>(c10::DispatchKey::BackendSelect),
                                              __FILE__, __LINE__);
  for (size_t i = 0; i < names.size(); ++i)
    lib->impl(names[i].c_str(), torch::CppFunction::makeFromBoxedFunctor(
                                    std::make_unique<RouteKernel>(bit, fast.empty() ? kNone : fast[i])));
  g_libraries.push_back(std::move(lib));
}

}  // namespace

void register_route(pybind11::module& m) {
  m.def("route_set_mask", &set_mask, "this thread's kernel route: the bits it hands to Python (0: off); returns the old mask");
  m.def("route_set_handler", &set_handler, "the Python handler of routed calls, the refusal of a float result, and the pass/opaque/after answers");
  m.def("route_set_plain", &set_plain,
        "this thread's calls answered in C++ (1: the elementwise ops, 2: the products, 4: free alpha calls, 8: sigmoid/tanh/silu); returns the old value");
  m.def("route_set_optimizer", [](int64_t steps) { g_optimizer_steps.store(steps, std::memory_order_relaxed); },
        "how many optimizer steps run (a factor near 1 is answered in C++ only outside one)");
  m.def("route_register", &register_ops, "the route kernel, with this bit, for these ops on BackendSelect",
        py::arg("ns"), py::arg("names"), py::arg("bit"), py::arg("fast") = std::vector<int64_t>());
}
