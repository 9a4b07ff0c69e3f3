"""``torch.compile`` for multiplication-free models: one graph, PA ops inside.

    model = pamtorch.compile(model, Config.paper())       # a stock model: as under pamtorch.mode
    model = pamtorch.compile(pamtorch.convert(model, cfg)) # a converted one: its mode regions
    loss = loss_fn(model(x), y); loss.backward()           # forward and backward compiled

``torch.compile`` cannot trace into ``pamtorch.mode`` (Dynamo skips a frame that runs under
a dispatch mode, and a converted module's region enters one), so this module moves the PA
substitution to the graph level, with the same op table and the same dispatch logic:

1. Dynamo traces the model with stock arithmetic (a converted model's regions are traced
   as their stock classes, each node remembering its module);
2. ``aot_autograd`` turns that graph into a forward and a backward graph of aten ops,
   without decompositions, so they hold the ops the mode's dispatch handler sees in eager
   (``addmm``, ``gelu_backward``, ``_softmax``...); the function-level routes of the mode
   (``F.scaled_dot_product_attention``, exact/ste derivative kinds) are applied while it
   traces;
3. each graph is traced again (``make_fx``) with every node the config covers run under
   the mode's dispatch handler (:class:`pamtorch.mode.PAMode`), which makes the same
   decisions as in eager (free, routed, refused, left exact): a routed aten op becomes one
   custom-op node, ``torch.ops.pamtorch_pa.<op>`` (``pamtorch_pa.addmm``...), whose PA
   implementation from ``OP_TABLE`` runs when the graph runs, on real tensors, with the
   compiled kernels, as in eager. PA code that runs while tracing (the function-level
   routes) calls the kernels as custom ops (``pamtorch.pam_mm``, ``pamtorch.ew_pam``...).
   (Tracing the PA implementations themselves into integer aten ops for inductor to fuse
   was tried and measured slower than the compiled kernels: inductor's loops on the int64
   patterns of arith's torch forms made a ViT step 1.5x slower than the eager mode);
4. the PA graphs go to inductor (``backend="inductor"``: the free ops around the PA ops,
   views, additions, masks, fused into generated C++ loops) or run as they are
   (``backend="eager"``, compiles in seconds).

The compiled step equals the eager mode's bit for bit (forward, gradients), with these
limits: under inductor, floating-point sums run as ``torch.ops.pamtorch.sum`` (aten's own
sum, out of inductor's loops) because inductor adds a row in sequence where aten's CPU sum
adds in a pairwise/vectorized order, which rounds differently (``exact_sums=False`` lets
inductor fuse them: faster, last-bit differences), and the ops a config leaves exact are
compiled as ``torch.compile`` compiles them (decomposed, not bit-identical to eager aten);
random ops (dropout) draw from inductor's generator, not the eager one. The optimizer
step is not compiled: run it under ``pamtorch.mode(config)``. ``fullgraph`` defaults to
True: code a graph break leaves to eager torch would otherwise run outside PA (see
:func:`compile` for ``fullgraph=False``).

:func:`float_multiplications` lists the nodes of a PA graph that still multiply floats
(the mode's classification, as ``pamtorch.audit`` applies it at run time); the PA graphs
of a compiled model are kept in ``compiled.pamtorch_graphs``.
"""
from __future__ import annotations

import contextlib
import functools
import re
import threading
from typing import List, Optional

import torch
from torch import Tensor, fx

from . import arith, kernels
from .kernels import cpu as kernels_cpu
from .nn import functional as PF
from .config import Config
from .convert import ConvertedModule
from .mode import PAMode, _PAFunctionMode, answered_in_cpp, classify, kernel_route_paused, run_answered
from .ops.table import ACTIVE as _ACTIVE, OP_TABLE
from .recording import RECORDERS

__all__ = ["compile", "pa_backend", "float_multiplications", "pam_mm", "pam_bmm", "pam_mm_exact_grad_a",
           "pam_mm_exact_grad_b", "pam_bmm_exact_grad_a", "pam_bmm_exact_grad_b", "exact_sum"]

# ---------------------------------------------------------------------------
# the kernels as custom ops: what a traced graph calls (eager code calls the kernels directly)

_EAGER = {name: getattr(kernels, name) for name in (
    "pam_mm", "pam_mm_exact_grad_a", "pam_mm_exact_grad_b",
    "pam_bmm", "pam_bmm_exact_grad_a", "pam_bmm_exact_grad_b")}


_LIB = torch.library.Library("pamtorch", "FRAGMENT")


def _direct(name, a, b, offset, ndim):
    """The compiled extension's ``name`` kernel called straight, where a compiled graph calls
    it (CPU float32 operands of matching shapes, no Python dispatch mode, no recorder; the
    kernel route paused here): the checks and mode switches of the :mod:`pamtorch.kernels`
    entry cost tens of microseconds a call, more than a small product. None where that
    does not hold: then the entry runs (and words any error)."""
    ext = kernels_cpu._EXT
    if (ext is None or RECORDERS or kernels._cache.get("cpu") is not kernels_cpu
            or torch._C._len_torch_dispatch_stack() or a.dtype != torch.float32 or b.dtype != torch.float32
            or a.device.type != "cpu" or b.device.type != "cpu" or a.dim() != ndim or b.dim() != ndim
            or a.shape[-1] != b.shape[-2] or a.shape[:-2] != b.shape[:-2]):
        return None
    was = ext.route_set_mask(0)
    try:
        return getattr(ext, name)(a.detach(), b.detach(), -1, kernels.offset_d(offset))
    finally:
        ext.route_set_mask(was)


def _define(name: str, schema: str, impl, fake):
    """The custom op ``pamtorch::<name>``: a plain library definition with a Python kernel
    (``torch.library.custom_op``'s wrappers cost some 30 us more a call, paid at every node
    of a compiled graph), its fake implementation; returns its overload."""
    _LIB.define(name + schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"pamtorch::{name}", fake, lib=_LIB)
    return getattr(torch.ops.pamtorch, name).default


def _product(name, ndim):
    def run(a, b, offset=None):
        out = _direct(name, a, b, offset, ndim)
        return _EAGER[name](a, b, offset) if out is None else out
    return run


# ``C[i,j] = Σ_k PAM(a[i,k], b[k,j])`` (float32 2-D, :func:`pamtorch.kernels.pam_mm`) and
# the batched ``a[B,M,K] @PAM b[B,K,N]`` (:func:`pamtorch.kernels.pam_bmm`), with the
# approx derivative as their autograd formula; the exact derivatives w.r.t. ``a`` and
# ``b`` for upstream ``dc``
pam_mm = _define("pam_mm", "(Tensor a, Tensor b, float? offset=None) -> Tensor", _product("pam_mm", 2),
                 lambda a, b, offset=None: a.new_empty((a.shape[0], b.shape[1])))
pam_bmm = _define("pam_bmm", "(Tensor a, Tensor b, float? offset=None) -> Tensor", _product("pam_bmm", 3),
                  lambda a, b, offset=None: a.new_empty((a.shape[0], a.shape[1], b.shape[2])))


def _exact_grad(name):
    return _define(name, "(Tensor a, Tensor b, Tensor dc, float? offset=None) -> Tensor",
                   lambda a, b, dc, offset=None: _EAGER[name](a, b, dc, offset),
                   lambda a, b, dc, offset=None: (a if name.endswith("_a") else b).new_empty(
                       (a if name.endswith("_a") else b).shape))


pam_mm_exact_grad_a, pam_mm_exact_grad_b, pam_bmm_exact_grad_a, pam_bmm_exact_grad_b = (
    _exact_grad(n) for n in ("pam_mm_exact_grad_a", "pam_mm_exact_grad_b", "pam_bmm_exact_grad_a",
                             "pam_bmm_exact_grad_b"))


def _pam_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.offset = inputs[2] if len(inputs) > 2 else None


def _pam_mm_backward(ctx, g):
    # the "approx" derivative: the exact product's derivative evaluated with PAM products
    a, b = ctx.saved_tensors
    ga = pam_mm(g, b.t(), ctx.offset) if ctx.needs_input_grad[0] else None
    gb = pam_mm(a.t(), g, ctx.offset) if ctx.needs_input_grad[1] else None
    return ga, gb, None


def _pam_bmm_backward(ctx, g):
    a, b = ctx.saved_tensors
    ga = pam_bmm(g, b.transpose(1, 2), ctx.offset) if ctx.needs_input_grad[0] else None
    gb = pam_bmm(a.transpose(1, 2), g, ctx.offset) if ctx.needs_input_grad[1] else None
    return ga, gb, None


torch.library.register_autograd("pamtorch::pam_mm", _pam_mm_backward, setup_context=_pam_mm_setup, lib=_LIB)
torch.library.register_autograd("pamtorch::pam_bmm", _pam_bmm_backward, setup_context=_pam_mm_setup, lib=_LIB)

_TRACED = {"pam_mm": pam_mm, "pam_mm_exact_grad_a": pam_mm_exact_grad_a,
           "pam_mm_exact_grad_b": pam_mm_exact_grad_b, "pam_bmm": pam_bmm,
           "pam_bmm_exact_grad_a": pam_bmm_exact_grad_a, "pam_bmm_exact_grad_b": pam_bmm_exact_grad_b}

# ``aten.sum.dim_IntList`` run by aten: a compiled graph keeps eager's summation order
exact_sum = _define("sum", "(Tensor x, int[1]? dim, bool keepdim=False, ScalarType? dtype=None) -> Tensor",
                    lambda x, dim, keepdim=False, dtype=None: torch.ops.aten.sum.dim_IntList(x, dim, keepdim,
                                                                                             dtype=dtype),
                    lambda x, dim, keepdim=False, dtype=None: torch.ops.aten.sum.dim_IntList(x, dim, keepdim,
                                                                                             dtype=dtype))


def _sum_dims(x, dim=None, keepdim=False, *, dtype=None):
    if not x.is_floating_point():
        return NotImplemented
    return exact_sum(x, dim, keepdim, dtype)


def _sum_all(x, *, dtype=None):
    if not x.is_floating_point():
        return NotImplemented
    return exact_sum(x, None, False, dtype)


_EXACT_SUMS = {torch.ops.aten.sum.dim_IntList: _sum_dims, torch.ops.aten.sum.default: _sum_all}

# the elementwise kernels of the compiled module (pa_elementwise.cpp) as custom ops, for PA
# code that runs while a graph is traced (the function-level routes: attention, the
# autograd functions of the exact derivatives): name -> number of tensor operands
_ELEMENTWISE = {"ew_pam": 2, "ew_pad": 2, "ew_exp": 1, "ew_log": 1, "ew_sqrt": 1, "ew_rsqrt": 1,
                "ew_exp_exact_grad": 3}
_EAGER_EXT = arith._ext


def _run_elementwise(name, *ts):
    return getattr(_EAGER_EXT(*ts), name)(*ts).contiguous()


def _fake_elementwise(*ts):
    return ts[0].new_empty(torch.broadcast_shapes(*(t.shape for t in ts)))


for _name, _n in _ELEMENTWISE.items():
    _LIB.define(f"{_name}({', '.join(f'Tensor x{i}' for i in range(_n))}) -> Tensor")
    _LIB.impl(_name, functools.partial(_run_elementwise, _name), "CPU")
    torch.library.register_fake(f"pamtorch::{_name}", _fake_elementwise, lib=_LIB)


class _ElementwiseOps:
    """What ``arith._ext`` answers while tracing: the elementwise kernels as custom ops."""

    def __getattr__(self, name):
        raise AttributeError(f"pamtorch.compile: the compiled kernel {name!r} has no custom op; add it to "
                             "pamtorch.compile._ELEMENTWISE (traced code called it outside nn.functional._fused)")


for _name in _ELEMENTWISE:
    setattr(_ElementwiseOps, _name, staticmethod(getattr(torch.ops.pamtorch, _name).default))
_TRACED_EXT = _ElementwiseOps()


def _traced_ext(*ts):
    return _TRACED_EXT if _EAGER_EXT(*ts) is not None else None


def _no_extension(*ts):
    return None


# while tracing: (module, attribute) -> what it is then. arith's float32 getter answers
# the custom ops; the bfloat16/float16 getter and nn.functional's fused blocks answer
# None, so those trace as compositions of the elementwise ops (bit-identical, by their
# kernels' own tests)
_TRACE_PATCHES = [(kernels, name, op) for name, op in _TRACED.items()] + [
    (arith, "_ext", _traced_ext), (arith, "_lowp", _no_extension), (PF, "_fused", _no_extension)]

# one trace at a time
_TRACE_LOCK = threading.RLock()


@contextlib.contextmanager
def _tracing():
    """While a graph is traced the PA kernels that traced code calls directly are custom ops
    (a graph node each, run by the same kernel when the graph runs). Another thread running
    eager PA meanwhile gets the same bits, through the same kernels."""
    with _TRACE_LOCK:
        saved = [(mod, name, getattr(mod, name)) for mod, name, _ in _TRACE_PATCHES if hasattr(mod, name)]
        for mod, name, value in _TRACE_PATCHES:
            if hasattr(mod, name):
                setattr(mod, name, value)
        try:
            yield
        finally:
            for mod, name, value in saved:
                setattr(mod, name, value)


@contextlib.contextmanager
def _no_modes():
    """No user dispatch or function mode while a graph is traced: a backward graph is
    compiled on the first backward, which may run under ``pamtorch.mode``."""
    from torch.utils._python_dispatch import _disable_current_modes

    function_modes = []
    while torch._C._len_torch_function_stack():
        function_modes.append(torch._C._pop_torch_function_stack())
    try:
        with _disable_current_modes(), kernel_route_paused():
            yield
    finally:
        for m in reversed(function_modes):
            torch._C._push_on_torch_function_stack(m)


# ---------------------------------------------------------------------------
# a routed aten op as one custom op: its PA implementation from the op table runs when the
# compiled graph runs, on real tensors, exactly as the mode runs it in eager

_ROUTED_LIB = torch.library.Library("pamtorch_pa", "FRAGMENT")
_ROUTED: dict = {}   # aten overload -> its custom op
_ROUTES: dict = {}   # the route argument -> (config of the mode, op kind)
_FAST: dict = {}     # (aten overload, route argument) -> whether the kernel route answers it in C++
_ALIAS = re.compile(r"\([a-z]!?\)")


def _route_key(config: Config, kind: str, numbers=()) -> str:
    """The string a graph node carries for (config, kind, ``numbers``: the positions or names
    of the Python numbers it passes as 0-d tensors): content, not an index, so a graph
    served from inductor's on-disk cache names the same route in any process."""
    key = f"{kind}|{','.join(map(str, numbers))}|{config!r}"
    _ROUTES.setdefault(key, (config, kind, tuple(numbers)))
    return key


def _as_tensors(func, args, kwargs):
    """(args, kwargs, where): the Python numbers an aten call passes for Tensor arguments
    (``mul.Tensor(x, 8.0)``, as traced graphs hold them) as 0-d tensors of the widest
    dtype of their kind, which a custom op can take, and where they were."""
    tensor_type = torch._C.TensorType.get()
    schema = func._schema.arguments
    where = []

    def box(i, v):
        where.append(i)
        dtype = (torch.bool if isinstance(v, bool) else torch.int64 if isinstance(v, int)
                 else torch.complex128 if isinstance(v, complex) else torch.float64)
        return torch.tensor(v, dtype=dtype)

    def numeric(v):
        return isinstance(v, (bool, int, float, complex))

    args = [box(i, v) if i < len(schema) and numeric(v) and schema[i].type == tensor_type else v
            for i, v in enumerate(args)]
    types = {a.name: a.type for a in schema}
    kwargs = {n: box(n, v) if numeric(v) and types.get(n) == tensor_type else v for n, v in kwargs.items()}
    return args, kwargs, where


def _unbox(numbers, args, kwargs, value):
    """The Python numbers back where ``_as_tensors`` boxed them (``value(t)`` of each)."""
    args = [value(v) if i in numbers else v for i, v in enumerate(args)]
    kwargs = {n: value(v) if n in numbers else v for n, v in kwargs.items()}
    return args, kwargs


def _fresh(out, inputs):
    """A custom op's result: contiguous (its fake says so) and never a view of an input."""
    if isinstance(out, (tuple, list)):
        return tuple(_fresh(o, inputs) for o in out)
    if not isinstance(out, Tensor):
        return out
    # a result that is neither a view nor an input owns its storage
    if (out._is_view() or any(out is t for t in inputs)) and any(
            out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in inputs):
        return out.clone(memory_format=torch.contiguous_format)
    return out.contiguous()


def _tensors(args, kwargs) -> list:
    flat = list(args) + list(kwargs.values())
    return [t for x in flat for t in (x if isinstance(x, (list, tuple)) else [x]) if isinstance(t, Tensor)]


def _run_routed(func, *args, pamtorch_route, **kwargs):
    config, kind, numbers = _ROUTES[pamtorch_route]
    if numbers:
        args, kwargs = _unbox(numbers, args, kwargs, lambda t: t.item())
    fast = _FAST.get((func, pamtorch_route))
    if fast is None:
        fast = _FAST[func, pamtorch_route] = answered_in_cpp(func, config)
    if fast:   # the eager kernel route's C++ answer: the same bits as the implementation below
        out = run_answered(func, config, args, kwargs)
    else:
        impl = OP_TABLE[func.overloadpacket].impl
        _ACTIVE.append(config)  # as the mode's dispatch handler does around an implementation
        try:
            out = impl(func, tuple(args), kwargs, config.kind(kind))
        finally:
            _ACTIVE.pop()
    return _fresh(out, _tensors(args, kwargs))


def _fake_routed(func, *args, pamtorch_route, **kwargs):
    # the PA implementations return what the aten op returns, shapes and dtypes (which
    # depend on a number's type, not on its value)
    numbers = _ROUTES[pamtorch_route][2]
    if numbers:
        args, kwargs = _unbox(numbers, args, kwargs, lambda t: {torch.bool: True, torch.int64: 1,
                                                                torch.complex128: 1j}.get(t.dtype, 1.0))
    out = func(*args, **kwargs)
    if isinstance(out, (tuple, list)):
        return tuple(None if o is None else torch.empty(o.shape, dtype=o.dtype, device=o.device) for o in out)
    return torch.empty(out.shape, dtype=out.dtype, device=out.device)


def _routed_op(func):
    """The custom op ``pamtorch_pa::<op>[__<overload>]`` standing for aten overload ``func``
    run by its PA implementation: the aten schema plus ``str pamtorch_route``."""
    op = _ROUTED.get(func)
    if op is None:
        text = _ALIAS.sub("", str(func._schema))   # aten::name.overload(args) -> returns
        head, rest = text.split("(", 1)
        args, ret = rest.rsplit(") -> ", 1)
        parts = [a.strip() for a in args.split(",") if a.strip()]
        parts += [] if "*" in parts else ["*"]
        overload = func._schema.overload_name
        name = func.overloadpacket.__name__ + (f"__{overload}" if overload else "")
        _ROUTED_LIB.define(f"{name}({', '.join(parts + ['str pamtorch_route'])}) -> {ret.strip()}")
        _ROUTED_LIB.impl(name, functools.partial(_run_routed, func), "CompositeExplicitAutograd")
        torch.library.register_fake(f"pamtorch_pa::{name}", functools.partial(_fake_routed, func),
                                    lib=_ROUTED_LIB)
        op = _ROUTED[func] = getattr(torch.ops.pamtorch_pa, name).default
    return op


class _TracingMode(PAMode):
    """The mode's dispatch handler while a graph is traced: the same decisions (free,
    routed, refused, left exact), but a routed op becomes one custom-op node whose PA
    implementation runs with the compiled graph; the tracer's own queries (``prim.device``
    of a fake tensor) and pamtorch's custom ops run as they are."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("prim", "pamtorch", "pamtorch_pa"):
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _work(self, kind, impl, func, args, kwargs, opcfg):
        if impl is None:
            return func(*args, **kwargs)
        args, kwargs, numbers = _as_tensors(func, args, kwargs)
        return _routed_op(func)(*args, **kwargs, pamtorch_route=_route_key(self.config, kind, numbers))


class _Remainder(PAMode):
    """The mode's dispatch handler for code a graph break leaves to eager torch: Dynamo
    compiles under it (it ignores compile internals), the compiled graphs run outside it."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True


# ---------------------------------------------------------------------------
# which config a node runs under

def _module_ids(stack) -> list:
    """ids of the modules in a node's ``nn_module_stack`` (keys ``"<id>"`` or ``"<id>@<n>"``)."""
    out = []
    for key in (stack or {}):
        head = str(key).split("@")[0]
        if head.isdigit():
            out.append(int(head))
    return out


class _Scope:
    """The config each graph node runs under: ``config`` for every node (a stock model,
    as under ``pamtorch.mode``), or per converted region (``regions``: id(module) ->
    config; a node outside every region runs exact, as in the eager converted model)."""

    def __init__(self, config: Optional[Config], leave_exact=(), regions=None):
        self.config, self.leave_exact, self.regions = config, tuple(leave_exact), regions
        self._modes: dict = {}

    def of(self, node: fx.Node) -> Optional[Config]:
        if self.regions is None:
            return self.config
        stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack")
        for i in _module_ids(stack):
            if i in self.regions:
                return self.regions[i]
        return None

    def dispatch_mode(self, config: Config) -> _TracingMode:
        m = self._modes.get(id(config))
        if m is None:
            m = self._modes[id(config)] = (config, _TracingMode(config, self.leave_exact))
        return m[1]


class _Routed(fx.Interpreter):
    """Runs a graph with each covered node under a mode: the function-level routes
    (``_PAFunctionMode``) over Dynamo's graph, the dispatch handler over an aten graph."""

    def __init__(self, gm, scope: _Scope, make_mode):
        super().__init__(gm)
        self.scope, self.make_mode = scope, make_mode

    def run_node(self, n):
        cfg = self.scope.of(n) if n.op in ("call_function", "call_method", "call_module") else None
        if cfg is None:
            return super().run_node(n)
        with self.make_mode(cfg):
            return super().run_node(n)


class _FunctionRouted(torch.nn.Module):
    """Dynamo's graph run with the mode's function-level routes, for aot_autograd to trace."""

    def __init__(self, gm: fx.GraphModule, scope: _Scope):
        super().__init__()
        self.gm, self.scope = gm, scope

    def forward(self, *args):
        # the aten nodes keep their Dynamo node's metadata (its module stack), as
        # aot_autograd arranges for a GraphModule itself
        with fx.traceback.preserve_node_meta():
            return _Routed(self.gm, self.scope,
                           lambda cfg: _PAFunctionMode(cfg, self.scope.leave_exact)).run(*args)


def _pa_graph(gm: fx.GraphModule, example_inputs, scope: _Scope, inductor: bool,
              exact_sums: bool) -> fx.GraphModule:
    """``gm`` (an aten graph) traced again with its covered nodes routed by the mode's
    dispatch handler; for inductor, decomposed as inductor's own aot_autograd would, and
    with the float sums as ``pamtorch.sum`` if ``exact_sums``."""
    from torch._guards import detect_fake_mode
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    table = dict(select_decomp_table()) if inductor else {}
    if inductor and exact_sums:
        table.update(_EXACT_SUMS)

    def run(*args):
        return _Routed(gm, scope, scope.dispatch_mode).run(*args)

    fake = detect_fake_mode(example_inputs) or contextlib.nullcontext()
    with _no_modes(), _tracing(), fake:
        out = make_fx(run, tracing_mode="real", decomposition_table=table)(*example_inputs)
    out.graph.eliminate_dead_code()
    out.recompile()
    return out


def _outside_modes(fn):
    """A compiled PA graph (boxed calling convention) that runs outside any dispatch mode
    and kernel route: a backward run under ``pamtorch.mode`` is already PA, and the mode
    must not route the graph's aten and custom-op calls a second time."""
    from torch.utils._python_dispatch import _disable_current_modes

    def run(args):
        # below autograd: aot_autograd's runtime does the graph's autograd, so the ops inside
        # need none (it saves each custom op's Python autograd kernel, tens of us a call)
        with kernel_route_paused(), torch._C._AutoDispatchBelowAutograd():
            if torch._C._len_torch_dispatch_stack():
                with _disable_current_modes():
                    return fn(args)
            return fn(args)
    run._boxed_call = True
    return run


class _Backend:
    """A ``torch.compile`` backend (see the module docstring); ``graphs`` collects the PA
    graphs it built."""

    def __init__(self, scope: _Scope, inductor: bool, exact_sums: bool):
        self.scope, self.inductor, self.exact_sums = scope, inductor, exact_sums
        self.graphs: list = []

    def _compiler(self, is_backward: bool, is_inference: bool = False):
        def compile_graph(gm, example_inputs):
            # a backward graph is compiled at the first backward, which may run under
            # pamtorch.mode: its kernel route would catch inductor's own fake-tensor calls
            with _no_modes():
                pa = _pa_graph(gm, example_inputs, self.scope, self.inductor, self.exact_sums)
                self.graphs.append(pa)
                if not self.inductor:
                    from functorch.compile import make_boxed_func
                    return _outside_modes(make_boxed_func(pa))
                from torch._inductor.compile_fx import compile_fx_inner
                return _outside_modes(compile_fx_inner(pa, example_inputs, is_backward=is_backward,
                                                       is_inference=is_inference))
        return compile_graph

    def __call__(self, gm: fx.GraphModule, example_inputs):
        from torch._dynamo.backends.common import aot_autograd

        aot = aot_autograd(fw_compiler=self._compiler(False), bw_compiler=self._compiler(True),
                           inference_compiler=self._compiler(False, True))
        with _no_modes(), _tracing():
            return aot(_FunctionRouted(gm, self.scope), example_inputs)


_BACKENDS = ("inductor", "eager")


def pa_backend(config: Optional[Config] = None, *, inductor: bool = True, exact_sums: bool = True,
               leave_exact=()):
    """A ``torch.compile`` backend that compiles a stock model as ``pamtorch.mode(config,
    leave_exact)`` runs it: ``torch.compile(model, backend=pa_backend(cfg))``
    (``from pamtorch.compile import pa_backend``). Its ``graphs`` holds the PA graphs it built."""
    config = Config.paper() if config is None else config
    if not isinstance(config, Config):
        raise TypeError(f"pamtorch.compile: config must be a pamtorch Config, got {type(config).__name__}")
    return _Backend(_Scope(config, leave_exact), inductor, exact_sums)


def _regions(model: torch.nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, ConvertedModule)]


def compile(model: torch.nn.Module, config: Optional[Config] = None, *, backend: str = "inductor",
            exact_sums: bool = True, leave_exact=(), **compile_kwargs):
    """``torch.compile(model)`` with piecewise affine arithmetic, forward and backward.

    A stock model (no converted modules) compiles as ``pamtorch.mode(config, leave_exact)``
    runs it (``config`` default ``Config.paper()``). A model made by ``pamtorch.convert``
    compiles its mode regions, each with its own config, and leaves the rest exact, as
    it runs in eager; ``config`` and ``leave_exact`` must then be left out.

    ``backend``: "inductor" (generated C++ for the free ops around the PA ops) or "eager" (the PA
    graphs run op by op; compiles in seconds). ``exact_sums`` (default True): under
    inductor, float sums run by aten, so the results equal the eager mode's bit for bit
    (module docstring).

    ``fullgraph`` defaults to True: a graph break leaves code to eager torch. With
    ``fullgraph=False`` (stock models only) that code runs under the mode's dispatch
    handler in the forward (a mode torch.compile compiles under, as it ignores the
    compiled graphs); its backward is PA only if ``backward()`` runs under
    ``pamtorch.mode(config)``, and the mode's function-level routes do not apply to it
    (attention there is refused, exact/ste derivative kinds there are approx).

    Other keyword arguments go to ``torch.compile`` (``dynamic``...). Returns
    ``torch.compile``'s module, with the PA graphs built so far in ``pamtorch_graphs``
    (filled on the first call). While it runs, the fused fast paths of
    ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` are off (as under the mode)
    and a converted model's regions are their stock classes (one thread at a time)."""
    if backend not in _BACKENDS:
        raise ValueError(f"pamtorch.compile: backend must be one of {_BACKENDS}, got {backend!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"pamtorch.compile: model must be a torch.nn.Module, got {type(model).__name__}")
    regions = _regions(model)
    if regions and (config is not None or leave_exact):
        raise ValueError("pamtorch.compile: this model has converted modules (pamtorch.convert), which "
                         "carry their own config; call pamtorch.compile(model) without config and "
                         "leave_exact, or compile the stock model with a config")
    compile_kwargs.setdefault("fullgraph", True)
    remainder = None
    if regions:
        if not compile_kwargs["fullgraph"]:
            raise ValueError("pamtorch.compile: a converted model compiles with fullgraph=True only (code "
                             "a graph break leaves to eager torch would run its regions exact); remove "
                             "the graph break, or compile the stock model with a config")
        scope = _Scope(None, (), {})
        be = _Backend(scope, backend == "inductor", exact_sums)
    else:
        be = pa_backend(config, inductor=backend == "inductor", exact_sums=exact_sums,
                        leave_exact=leave_exact)
        scope = None
        if not compile_kwargs["fullgraph"]:
            remainder = _Remainder(be.scope.config, leave_exact)
    compiled = torch.compile(model, backend=be, **compile_kwargs)
    compiled.pamtorch_graphs = be.graphs
    undo: list = []
    # enter() changes global state (the fast-path flag) and the regions' classes until leave():
    # one call at a time per compiled model; another thread's call waits
    busy = threading.RLock()

    def enter(mod, args):
        busy.acquire()
        # as under the mode: the fused fast paths of nn.MultiheadAttention and
        # nn.TransformerEncoderLayer (aten ops with no PA form) are off
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        undo.append(lambda: torch.backends.mha.set_fastpath_enabled(fastpath))
        if remainder is not None:
            remainder.__enter__()
            undo.append(lambda: remainder.__exit__(None, None, None))
        if scope is None:
            return
        # Dynamo traces the regions' own (stock) forwards; the nodes keep their module's
        # id, which the backend maps to the region's config
        scope.regions.clear()
        for m in regions:
            scope.regions[id(m)] = m.pamtorch_config
            undo.append(functools.partial(setattr, m, "__class__", type(m)))
            m.__class__ = m._pa_base

    def leave(mod, args, out):
        try:
            while undo:
                undo.pop()()
        finally:
            busy.release()

    compiled.register_forward_pre_hook(enter)
    compiled.register_forward_hook(leave, always_call=True)
    return compiled


# ---------------------------------------------------------------------------
# checking a graph

def _val(x):
    if isinstance(x, fx.Node):
        return x.meta.get("val")
    if isinstance(x, (list, tuple)):
        return type(x)(_val(y) for y in x)
    if isinstance(x, dict):
        return {k: _val(v) for k, v in x.items()}
    return x


# prims that inductor's decompositions leave in a graph and that do no arithmetic: a cast
# (aten._to_copy's decomposition) and arange
_FREE_PRIMS = ("convert_element_type", "iota")


def float_multiplications(gm: fx.GraphModule) -> list:
    """The nodes of a traced graph that multiply floats, as strings: aten/prims calls the
    mode classifies as not free (``pamtorch.mode.classify``, the rule ``pamtorch.audit``
    applies), with their example values from the trace. The ``pamtorch`` custom ops (the
    PAM kernels, the exact sum) do no float multiplication."""
    found = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        if n.target.namespace in ("pamtorch", "pamtorch_pa") or (n.target.namespace == "prims" and
                                                n.target.overloadpacket.__name__ in _FREE_PRIMS):
            continue
        if classify(n.target, _val(n.args), _val(n.kwargs), _val(n)) != "free":
            found.append(f"{n.name}: {n.target}")
    return found
