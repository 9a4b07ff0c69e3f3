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
// below, unconverted and without re-entering the dispatcher from the top. "Run and check" (integer inputs, a result type
// known only after running) passes it on with the route off and hands a floating-point
// result to the refusal.

#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/utils/tensor_memoryformats.h>

#include <memory>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

thread_local uint32_t g_mask = 0;   // 0: no kernel route on this thread
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

// An argument as the dispatch mode would see it: a tensor stays a tensor (toPyObject would
// turn a wrapped number, the 8.0 of x * 8.0, into a Python number, which the op's schema
// does not take), and a dtype, layout or memory format, an int in the boxed stack, becomes
// torch.float32 (not 6) again.
py::object to_python(const c10::IValue& v, const c10::Argument& a) {
  if (v.isTensor()) return py::reinterpret_steal<py::object>(THPVariable_Wrap(v.toTensor()));
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

void route_call(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack, uint32_t bit) {
  if (g_mask == 0 || g_handler == nullptr) {
    op.redispatchBoxed(ks & kBelow, stack);
    return;
  }
  if (!(g_mask & bit)) {
    Mask off(0);
    op.redispatchBoxed(ks & kBelow, stack);
    return;
  }
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
  if (opaque || after) {
    Mask off(0);
    op.redispatchBoxed(ks & kBelow, stack);
  } else {
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
  explicit RouteKernel(uint32_t b) : bit(b) {}
  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
    route_call(op, ks, stack, bit);
  }
};

uint32_t set_mask(uint32_t mask) {
  uint32_t prev = g_mask;
  g_mask = mask;
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
void register_ops(const std::string& ns, const std::vector<std::string>& names, uint32_t bit) {
  auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, ns,
                                              std::optional<c10::DispatchKey>(c10::DispatchKey::BackendSelect),
                                              __FILE__, __LINE__);
  for (const auto& name : names)
    lib->impl(name.c_str(), torch::CppFunction::makeFromBoxedFunctor(std::make_unique<RouteKernel>(bit)));
  g_libraries.push_back(std::move(lib));
}

}  // namespace

void register_route(pybind11::module& m) {
  m.def("route_set_mask", &set_mask, "this thread's kernel route: the bits it hands to Python (0: off); returns the old mask");
  m.def("route_set_handler", &set_handler, "the Python handler of routed calls, the refusal of a float result, and the pass/opaque/after answers");
  m.def("route_register", &register_ops, "the route kernel, with this bit, for these ops on BackendSelect");
}
