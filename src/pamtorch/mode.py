"""The dispatch-level mode: run an unmodified model, loss and optimizer multiplication-free.

``with pamtorch.mode(config):`` enters two modes:

* a ``TorchDispatchMode`` (below autograd) with one op table, ``OP_TABLE``, from aten
  ops to PA implementations. Forward and backward ops both pass through it, so the
  backward of a routed forward op is itself routed: this is the "approx" derivative
  (the original derivative evaluated with PA ops) for free;
* a ``TorchFunctionMode`` (above autograd) that swaps fused composites whose aten op
  has no PA implementation (``F.scaled_dot_product_attention``) for their math, and,
  for op kinds whose config asks for ``derivative="exact"`` or ``"ste"``, routes the
  matrix products to pamtorch's autograd functions, whose backward is that kind.

Every aten call is classified by :func:`classify`, by overload and by its arguments:

* "free": no floating-point (or complex) arithmetic, or an op known to do no float
  multiplication with these arguments (``PASS_THROUGH``: views, copies, additions,
  comparisons, sums, max, ...; ``add`` only with ``alpha=1``, ``scatter`` only without
  ``reduce="multiply"``, ``round`` only without ``decimals``, see ``FREE_WHEN``);
* "routable": a multiply-like op in ``OP_TABLE``, run by its PA implementation;
* "unknown": a float op that may multiply and has no PA implementation: an
  ``UnsupportedOpError`` that names the op, the module (or autograd node) it ran in and
  the way out, ``pamtorch.mode(config, leave_exact=[torch.ops.aten.<op>])``.

An integer or boolean op whose result is floating point (``pos / 7.0``,
``torch.exp(int_tensor)``, ``arange(5) * 1.1``) does float arithmetic: its integer
operands are converted to that float dtype and the op is routed (or refused) like any
float op. An in-place op whose float result cannot be cast to its integer ``self``
raises torch's error. Nothing runs exact behind your back; what runs exact on purpose
(``leave_exact``, or a kind the config leaves exact) is what the user asked for, and
``pamtorch.audit`` lists it as such. The audit shares this classification.

Scalars computed in Python (learning-rate schedules, Adam's bias corrections) are exact
Python floats, as in the paper; applying them to tensors is a PAM.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import time

import torch
import torch.nn.functional as F
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import (TorchDispatchMode, _get_current_dispatch_mode,
                                          _get_current_dispatch_mode_stack)

from . import arith as _arith
from .autograd import rounded_call
from .config import KINDS, Config, OpConfig
from .kernels.cpu import route_paused as kernel_route_paused
from .matmul import bmm as _pa_bmm, linear as _pa_linear, matmul as _pa_matmul
from .nn import functional as PF
from .ops import OP_TABLE, PASS_THROUGH, UnsupportedOpError, implements, op_kind
from .ops import activations as _activations
from .ops import norms as _norms
from .ops import optim as _optim
from .ops.table import ACTIVE as _ACTIVE, COMPLEX_OK, OPTIMIZER_STEP
from .recording import RECORDERS, exact_by_request, routing

__all__ = ["OP_TABLE", "PASS_THROUGH", "FREE_WHEN", "RECORDERS", "UnsupportedOpError", "classify",
           "implements", "mode", "PAMode", "op_kind", "is_float_op"]

aten = torch.ops.aten


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


_FLOAT, _COMPLEX = 1, 2


def _nested_scan(x) -> int:
    if isinstance(x, torch.Tensor):
        return _FLOAT if x.is_floating_point() else (_FLOAT | _COMPLEX if x.is_complex() else 0)
    flags = 0
    if isinstance(x, (list, tuple)):
        for y in x:
            flags |= _nested_scan(y)
    elif isinstance(x, dict):
        for y in x.values():
            flags |= _nested_scan(y)
    return flags


def is_float_op(args, kwargs) -> bool:
    """Whether any tensor among the (nested list/tuple/dict) arguments is floating point
    or complex."""
    return bool((_nested_scan(args) | _nested_scan(kwargs)) & _FLOAT)


def _scan(args, kwargs) -> int:
    """``_FLOAT`` if a tensor among the (nested list/tuple/dict) arguments is floating
    point or complex, with ``_COMPLEX`` if one is complex: one pass over the arguments."""
    flags = 0
    for x in args:
        if isinstance(x, torch.Tensor):
            flags |= _FLOAT if x.is_floating_point() else (_FLOAT | _COMPLEX if x.is_complex() else 0)
        elif isinstance(x, (list, tuple, dict)):
            flags |= _nested_scan(x)
    for x in kwargs.values():
        flags |= _nested_scan(x)
    return flags


def _float_dtype(x):
    """The dtype of the first floating-point or complex tensor in ``x`` (nested), or None."""
    if isinstance(x, torch.Tensor):
        return x.dtype if _is_float(x) else None
    if isinstance(x, (list, tuple)):
        for y in x:
            d = _float_dtype(y)
            if d is not None:
                return d
    return None


# ---------------------------------------------------------------------------
# classification

# the per-overload caches are keyed by id(): an OpOverload hashes in Python, id() does
# not; the overload is kept with the value, and compared, so a reused id cannot mislead
_SCHEMA_ARGS: dict = {}


def _argument(func, args, kwargs, name, default):
    """Argument ``name`` of an aten call, positional or keyword (None-valued as given)."""
    if name in kwargs:
        return kwargs[name]
    cached = _SCHEMA_ARGS.get(id(func))
    if cached is None or cached[0] is not func:
        cached = _SCHEMA_ARGS[id(func)] = (func, {a.name: i for i, a in enumerate(func._schema.arguments)
                                                  if not a.kwarg_only})
    i = cached[1].get(name)
    return args[i] if i is not None and i < len(args) else default


def _alpha(name):
    def why(func, args, kwargs):
        s = _argument(func, args, kwargs, name, 1)
        return None if s is None or s == 1 else f"{name}={s!r} multiplies"
    why.alpha = name   # the kernel route decides these calls in C++ (_fast_code)
    return why


def _reduce(free, name="reduce"):
    def why(func, args, kwargs):
        r = _argument(func, args, kwargs, name, None)
        return None if r is None or r in free else f"{name}={r!r} multiplies"
    return why


def _decimals(func, args, kwargs):
    k = _argument(func, args, kwargs, "decimals", 0)
    return None if k == 0 else f"decimals={k!r} scales by 10^{k!r}"


def _by_freq(func, args, kwargs):
    return "scale_grad_by_freq=True divides by the counts" if \
        _argument(func, args, kwargs, "scale_grad_by_freq", False) else None


# ops that are free of float multiplication only for some arguments: packet -> why(func,
# args, kwargs), the reason it multiplies, or None when this call is free. A call that is
# not free is routed when its op is in OP_TABLE, else it is "unknown".
FREE_WHEN: dict = {}
for _names, _why in [
    ("add add_ sub sub_ rsub index_add index_add_ _foreach_add _foreach_add_ _foreach_sub "
     "_foreach_sub_", _alpha("alpha")),
    ("scatter scatter_", _reduce(("add",))),
    ("scatter_reduce scatter_reduce_", _reduce(("sum", "amax", "amin"))),
    ("index_reduce index_reduce_", _reduce(("amax", "amin"))),
    ("round round_", _decimals),
    ("embedding_dense_backward", _by_freq),
]:
    FREE_WHEN.update((getattr(aten, n), _why) for n in _names.split() if hasattr(aten, n))

# collectives move or sum tensors (DDP's buffer broadcast, the SUM all-reduce); an AVG
# reduction divides inside the backend, so pamtorch's DDP hook all-reduces SUM and then
# divides with PAD
_COMMUNICATION = frozenset(["c10d", "_c10d_functional"])


@dataclasses.dataclass(frozen=True)
class Decision:
    """How the mode treats one aten call. ``cls``: "free", "routable", "unknown", or
    "after" (integer inputs and no way to know the result dtype before running: run it,
    then refuse a float result). ``reason``: why it is not free. ``promote``: the float
    dtype to convert integer operands to before routing (integer inputs, float result)."""

    cls: str
    reason: str = ""
    promote: torch.dtype | None = None


_FREE = Decision("free")
_AFTER = Decision("after", "integer inputs, and a result type only known after running it")
_COMPLEX_OPERANDS = Decision("unknown", "PA arithmetic is defined on real floating-point numbers, and "
                                        "this multiply-like call has complex operands")
_NO_PA = Decision("unknown", "it is a floating-point op with no piecewise affine implementation, not "
                             "known to be free of multiplications")
_MULTIPLY_LIKE = Decision("routable", "a multiply-like op")
_UNKNOWN_RESULT = object()


class _Overload:
    """What the classification needs from an aten overload alone: its packet, op-table
    entry, ``FREE_WHEN`` condition, whether it passes through, takes complex operands,
    writes its first argument; and ``free``: every call is free, whatever the arguments
    (a collective, or a pass-through op with no PA implementation and no condition)."""

    __slots__ = ("func", "packet", "entry", "cond", "pass_through", "complex_ok", "writes_self", "free")

    def __init__(self, func):
        packet = func.overloadpacket
        self.func, self.packet = func, packet
        self.entry, self.cond = OP_TABLE.get(packet), FREE_WHEN.get(packet)
        self.pass_through, self.complex_ok = packet in PASS_THROUGH, packet in COMPLEX_OK
        schema = func._schema.arguments
        self.writes_self = bool(schema) and schema[0].alias_info is not None and schema[0].alias_info.is_write
        self.free = func.namespace in _COMMUNICATION or \
            (self.pass_through and self.entry is None and self.cond is None)


_OVERLOADS: dict = {}     # id(overload) -> _Overload
_TABLE_SIZES = [None]     # the op table's version and the other tables' sizes _OVERLOADS was filled from


def _facts(func) -> _Overload:
    """The cached :class:`_Overload` of ``func``; all are found again once an op table has
    changed (OP_TABLE: any entry added, replaced or removed; PASS_THROUGH, FREE_WHEN,
    COMPLEX_OK: their size), so ops registered later count."""
    sizes = (OP_TABLE.version, len(PASS_THROUGH), len(FREE_WHEN), len(COMPLEX_OK))
    if sizes != _TABLE_SIZES[0]:
        _OVERLOADS.clear()
        _TABLE_SIZES[0] = sizes
    o = _OVERLOADS.get(id(func))
    if o is None or o.func is not func:
        o = _OVERLOADS[id(func)] = _Overload(func)
    return o


def _meta(x):
    if isinstance(x, torch.Tensor):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    if isinstance(x, (list, tuple)):
        return type(x)(_meta(y) for y in x)
    if isinstance(x, dict):
        return {k: _meta(v) for k, v in x.items()}
    return x


def _signature(x):
    """What decides the result dtype of a call: tensor dtypes (and 0-d or not), the Python
    type of numbers, other arguments (dtype=, rounding_mode=, sizes) as they are."""
    if isinstance(x, torch.Tensor):
        return (x.dtype, x.dim() == 0)
    if isinstance(x, (bool, int, float, complex)):
        return type(x)
    if isinstance(x, (list, tuple)):
        return tuple(_signature(y) for y in x)
    if isinstance(x, dict):
        return tuple((k, _signature(v)) for k, v in x.items())
    return x if isinstance(x, (str, torch.dtype, type(None))) else type(x)


_RESULT_DTYPES: dict = {}


def _float_result(func, args, kwargs):
    """The float dtype of the result of an op on integer/boolean tensors, found by running
    it once per argument signature on meta tensors (no data, no arithmetic, no dispatch
    mode sees it); None for an integer/boolean result; ``_UNKNOWN_RESULT`` when the op
    has no meta kernel."""
    key = (func, _signature(args), _signature(kwargs))
    try:
        return _RESULT_DTYPES[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable argument: no cache
        key = None
    try:
        with torch._C._DisableTorchDispatch():
            dtype = _float_dtype(func(*_meta(args), **_meta(kwargs)))
    except Exception:  # noqa: BLE001 - no meta kernel, or an error the real call will raise
        dtype = _UNKNOWN_RESULT
    if key is not None:
        _RESULT_DTYPES[key] = dtype
    return dtype


def decide(func, args, kwargs, out=_UNKNOWN_RESULT) -> Decision:
    """The :class:`Decision` for one aten call; ``out``, when given, is its result (the
    audit classifies after running, so it needs no meta run)."""
    return _decide(_facts(func), func, args, kwargs, out)


def _decide(o: _Overload, func, args, kwargs, out=_UNKNOWN_RESULT) -> Decision:
    if o.free:
        return _FREE
    flags = _scan(args, kwargs)
    promote = None
    if not flags & _FLOAT:
        if o.pass_through:
            return _FREE
        promote = _float_result(func, args, kwargs) if out is _UNKNOWN_RESULT else _float_dtype(out)
        if promote is None:
            return _FREE
        if promote is _UNKNOWN_RESULT:
            return _AFTER
    cond, routable = o.cond, o.entry is not None
    why = None if cond is None else cond(func, args, kwargs)
    if (why is not None or (cond is None and routable)) and not o.complex_ok and \
            (flags & _COMPLEX or (promote is not None and promote.is_complex)):
        return _COMPLEX_OPERANDS
    if promote is not None:
        why = f"its integer inputs give a {promote} result"
    elif why is None:
        if cond is not None or (not routable and o.pass_through):
            return _FREE
        return _MULTIPLY_LIKE if routable else _NO_PA
    return Decision("routable" if routable else "unknown", why, promote)


def classify(func, args, kwargs, out=_UNKNOWN_RESULT) -> str:
    """How the mode treats an aten call: "free" (runs as is: no float arithmetic, or an
    op known to do no float multiplication with these arguments), "routable" (a
    multiply-like call with a PA implementation in OP_TABLE) or "unknown" (float
    arithmetic that may multiply and has no PA implementation). Decided by overload and
    arguments: ``alpha``, ``reduce``, ``decimals``, ``scale_grad_by_freq``, and integer
    inputs with a float result (from ``out`` when given, else a meta-tensor run)."""
    cls = decide(func, args, kwargs, out).cls
    return "unknown" if cls == "after" else cls


def _check_inplace(o: _Overload, func, args, kwargs):
    """Raise torch's error for an in-place op whose float result cannot be written into
    its integer/boolean ``self`` (``int_tensor.mul_(float_tensor)``)."""
    if not o.writes_self or not args:
        return
    selfs = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
    if all(not isinstance(t, torch.Tensor) or _is_float(t) for t in selfs):
        return

    def empty(x):  # same dtypes and devices, no elements: torch checks the types, computes nothing
        if isinstance(x, torch.Tensor):
            return torch.empty((0,) * x.dim(), dtype=x.dtype, device=x.device)
        if isinstance(x, (list, tuple)):
            return type(x)(empty(y) for y in x)
        return x
    with torch._C._DisableTorchDispatch():
        func(*empty(args), **{k: empty(v) for k, v in kwargs.items()})
    raise RuntimeError(f"pamtorch.mode: {func} writes a floating-point result into an integer "
                       "or boolean tensor in place; torch refuses that cast")


def _to_dtype(x, dtype):
    """Integer/boolean tensors in ``x`` (nested) converted to ``dtype``."""
    if isinstance(x, torch.Tensor):
        return x if _is_float(x) else x.to(dtype)
    if isinstance(x, (list, tuple)):
        return type(x)(_to_dtype(y, dtype) for y in x)
    if isinstance(x, dict):
        return {k: _to_dtype(v, dtype) for k, v in x.items()}
    return x


# ---------------------------------------------------------------------------
# leave_exact

def _leave_exact(items):
    """(packets, overloads, kinds) from ``leave_exact``'s aten ops and op-kind names."""
    packets, overloads, kinds = set(), set(), set()
    for item in items:
        if isinstance(item, torch._ops.OpOverloadPacket):
            packets.add(item)
        elif isinstance(item, torch._ops.OpOverload):
            overloads.add(item)
        elif isinstance(item, str) and item in KINDS:
            kinds.add(item)
        else:
            raise ValueError(
                f"pamtorch.mode: leave_exact takes aten ops (torch.ops.aten.cumprod, or one "
                f"overload such as torch.ops.aten.cumprod.default) or op-kind names {KINDS}; "
                f"got {item!r}")
    return frozenset(packets), frozenset(overloads), frozenset(kinds)


# ---------------------------------------------------------------------------
# where an op runs, for error messages

_IN_OPTIMIZER = OPTIMIZER_STEP   # shared with the op table (the optimizer's scalar forms read it)


def _opt_pre(opt, args, kwargs):
    _IN_OPTIMIZER[0] += 1


def _opt_post(opt, args, kwargs):
    _IN_OPTIMIZER[0] -= 1


def _child_name(parent, child) -> str:
    for name, m in parent.named_modules():
        if m is child and name:
            return name
    return f"({type(child).__name__})"


def _module_path(stack) -> str:
    """'1.0' (Inner) of Sequential: the dotted path of the innermost module from the
    outermost one entered under the mode."""
    parts = [_child_name(p, c) for p, c in zip(stack, stack[1:])]
    inner = type(stack[-1]).__name__
    if not parts:
        return f"module {inner}"
    return f"module '{'.'.join(parts)}' ({inner}) of {type(stack[0]).__name__}"


class PAMode(TorchDispatchMode):
    """Routes floating-point aten ops through ``OP_TABLE`` according to ``config``;
    ``leave_exact`` (aten ops, overloads or op-kind names) run exact on request."""

    def __init__(self, config: Config | None = None, leave_exact=()):
        super().__init__()
        self.leave_packets, self.leave_overloads, self.leave_kinds = _leave_exact(leave_exact)
        config = config or Config.paper()
        self.config = config.replace(**{k: OpConfig(pa=False) for k in self.leave_kinds})
        self.leaves = bool(self.leave_packets or self.leave_overloads or self.leave_kinds)
        self.modules: list = []   # modules entered under the mode, this thread (mode() tracks them)
        self.thread = threading.get_ident()

    def kind_config(self, kind: str) -> tuple[str, OpConfig]:
        """(the config field that applies, its OpConfig) for an op of ``kind``."""
        if kind in ("elementwise", "optimizer") and _IN_OPTIMIZER[0]:
            kind = "optimizer"
        elif kind == "optimizer":
            kind = "elementwise"
        return kind, self.config.kind(kind)

    def where(self) -> str:
        """Where the current op runs: module path, autograd node or optimizer step."""
        node = torch._C._current_autograd_node()
        if node is not None:
            return f"in backward (autograd node {node.name()})"
        if _IN_OPTIMIZER[0]:
            return "in the optimizer step"
        if self.modules:
            return f"in the forward of {_module_path(self.modules)}"
        return "outside any module"

    def unsupported(self, func, reason: str) -> UnsupportedOpError:
        err = UnsupportedOpError(
            f"pamtorch.mode: {func} ran {self.where()}: {reason}, so it was not run exact "
            f"behind your back. To run it exact on purpose, pass "
            f"pamtorch.mode(config, leave_exact=[torch.ops.{func.namespace}.{func.overloadpacket.__name__}]) "
            "(pamtorch.audit then lists it as left exact by request and does not call the "
            "step multiplication-free); or leave its module out of pamtorch.convert with "
            "module_filter_fn; or report the op to the pamtorch maintainers so it can be "
            "added to the op table (pamtorch.ops).")
        err.pamtorch_context = True
        return err

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        o = _facts(func)
        if o.free:  # views, copies, sums, ...: one dict lookup
            return func(*args, **kwargs)
        d = _decide(o, func, args, kwargs)
        if d is _FREE:
            return func(*args, **kwargs)
        return self._route(o, func, d, args, kwargs)

    def _route(self, o: _Overload, func, d: Decision, args, kwargs):
        """A call that is not free: left exact on request, refused, run exact where the
        config leaves its kind exact, or run by its PA implementation."""
        entry = o.entry if d.cls == "routable" else None
        if self.leaves and (func in self.leave_overloads or o.packet in self.leave_packets or
                            (entry is not None and self.kind_config(entry.kind)[0] in self.leave_kinds)):
            with exact_by_request():
                return func(*args, **kwargs)
        if d.cls == "after":
            out = func(*args, **kwargs)
            dtype = _float_dtype(out if isinstance(out, (list, tuple)) else [out])
            if dtype is None:
                return out
            raise self.unsupported(func, f"its integer inputs gave a {dtype} result, computed "
                                         "with float arithmetic that has no PA implementation")
        _check_inplace(o, func, args, kwargs)
        if d.cls == "unknown":
            raise self.unsupported(func, d.reason)
        kind, opcfg = self.kind_config(entry.kind)
        if not opcfg.pa:  # the config leaves this kind exact
            return self._work(kind, None, func, args, kwargs, opcfg)
        if d.promote is not None:
            args, kwargs = _to_dtype(args, d.promote), _to_dtype(kwargs, d.promote)
        _ACTIVE.append(self.config)
        try:
            if RECORDERS:  # routing() only tells the recorders
                with routing():
                    out = self._work(kind, entry.impl, func, args, kwargs, opcfg)
            else:
                out = self._work(kind, entry.impl, func, args, kwargs, opcfg)
        except UnsupportedOpError as e:
            if getattr(e, "pamtorch_context", False):
                raise
            raise self.unsupported(func, str(e).removeprefix("pamtorch.mode: ")) from e
        finally:
            _ACTIVE.pop()
        if RECORDERS:
            for rec in list(RECORDERS):
                rec.routed(func, args, kwargs, out)
        return out

    def _work(self, kind, impl, func, args, kwargs, opcfg):
        """The work of a call of op kind ``kind``: exact (``impl`` None) or PA; the one
        place :func:`pamtorch.bench.bench_profile` times, by kind."""
        return func(*args, **kwargs) if impl is None else impl(func, args, kwargs, opcfg)


# ---------------------------------------------------------------------------
# the kernel route: the mode's routing without a Python dispatch mode
#
# A TorchDispatchMode costs every aten call of a step a crossing into Python (about 3 us;
# a mode that does nothing makes the vit recipe's step 1.27 x slower), and most calls of a
# step (views, copies, additions) pass it untouched. The kernel route catches only the
# calls the mode must look at, with boxed C++ kernels on the BackendSelect dispatch key
# (kernels/cpu/pa_route.cpp), which sits below autograd like the Python key (forward and
# backward calls both reach it) and which every call passes. They are registered once per
# op, for the op-table ops (each with its kind's bit) and the ops that are neither in the
# op table nor always free (the "ask" bit: they may be refused whatever the config). On a
# thread that runs the route:
#   * an op of a kind the config leaves exact passes on with the route off, so the calls
#     inside it are not caught, as inside a dispatch mode's call;
#   * the others are handed to _kernel_call, which classifies them with _decide and routes
#     them with PAMode._route, exactly as the dispatch mode would (arguments as a dispatch
#     mode sees them, wrapped numbers as Python numbers), or lets them pass on untouched,
#     with the route off inside them (as inside a dispatch mode's call);
#   * the most frequent calls are answered in C++ with the same kernels (_FAST_OPS below).
# Ops that are always free never leave C++; on a thread that runs no kernel route a
# registered op costs a boxed redispatch. Differences from the dispatch route: factory
# functions (their own BackendSelect kernels) and composite ops (they decompose above
# autograd, where no dispatch mode sees them either) are not caught; and torch's composite
# code takes its branch for "no Python mode active" (isTensorSubclassLike), which for some
# ops is another order of the same float sums (the one found in a PA op, the weighted,
# label-smoothed mean cross entropy, is routed at the function level instead:
# _PAFunctionMode). Every stock model of tests/model_zoo.py trains to the dispatch route's
# bits on it under pam-matmul, pam-full and paper-exact-loss, and route="auto" takes it
# wherever it can run (kernel_route_applies).

_KERNEL_ROUTE = threading.local()   # .dispatch: the PAMode whose kernel route this thread runs
_KERNEL_LOCK = threading.Lock()
_PASS, _OPAQUE, _RUN_AND_CHECK = object(), object(), object()
_ASK = 1 << len(KINDS)   # the bit of the ops the mode classifies whatever the config


def _kind_bit(kind: str) -> int:
    return 1 << KINDS.index(kind)


def _route_mask(config: Config) -> int:
    """The bits of the ops a kernel route under ``config`` hands to Python: the PA kinds'
    and ``_ASK``. An elementwise op is of the optimizer kind inside an optimizer step
    (PAMode.kind_config), so either of the two sets both; Python then decides."""
    mask = _ASK
    for k in KINDS:
        if config.kind(k).pa:
            mask |= _kind_bit(k)
    if mask & (_kind_bit("elementwise") | _kind_bit("optimizer")):
        mask |= _kind_bit("elementwise") | _kind_bit("optimizer")
    return mask


def _kernel_call(name, args, kwargs):
    """A call of a registered op on a thread whose kernel route is on: its result, or
    ``_PASS`` (run it as it is), ``_OPAQUE`` (run it as it is, with the route off) or
    ``_RUN_AND_CHECK`` (as opaque, then refuse a floating-point result). The C++ kernel
    runs what passes on with its original boxed arguments, so nothing is converted back
    and no call re-enters the dispatcher from the top."""
    # as a dispatch mode is off while it handles a call, the calls made here (the
    # classification's meta runs, the PA implementation) are not caught
    with kernel_route_paused():
        func = _KernelRoute.overloads[name]
        dispatch = _KERNEL_ROUTE.dispatch
        o = _facts(func)
        d = _decide(o, func, args, kwargs)
        if d is _FREE:
            return _PASS
        if d.cls == "after":
            return _RUN_AND_CHECK
        if d.cls == "routable" and not dispatch.kind_config(o.entry.kind)[1].pa:
            return _OPAQUE   # its kind is exact here: it runs as it is, and what it calls with it
        return dispatch._route(o, func, d, args, kwargs)


# Calls the kernel route answers in C++ (pa_route.cpp, "answers in C++"): codes of its
# Fast enum. An alpha-conditioned op that passes through (add, sub, ...) is free when
# alpha == 1 or no float tensor is among its arguments (_decide). The other codes compute
# their op's PA result with the same compiled kernels as the op table's implementation,
# where the config's kind has no offset and no mantissa bits (_plain_families) and the op
# table still holds the built-in implementation; anything outside those narrow cases goes
# to _kernel_call as before.
_FAST_ALPHA = 1
_FAST_OPS = {"aten::mul.Tensor": 2, "aten::mul_.Tensor": 3, "aten::div.Tensor": 4, "aten::div_.Tensor": 5,
             "aten::mm": 6, "aten::addmm": 7, "aten::bmm": 8, "aten::mul.Scalar": 9, "aten::mul_.Scalar": 10,
             "aten::div.Scalar": 11, "aten::div_.Scalar": 12, "aten::pow.Tensor_Scalar": 13, "aten::sqrt": 14,
             "aten::rsqrt": 15, "aten::exp": 16, "aten::log": 17, "aten::mean.dim": 18, "aten::mean": 18,
             "aten::sigmoid": 19, "aten::tanh": 20, "aten::silu": 21, "aten::sigmoid_": 22, "aten::tanh_": 23,
             "aten::silu_": 24, "aten::sigmoid_backward": 25, "aten::tanh_backward": 26, "aten::silu_backward": 27,
             "aten::convolution": 28, "aten::convolution_backward": 29, "aten::native_batch_norm": 30,
             "aten::native_batch_norm_backward": 31, "aten::native_layer_norm": 32,
             "aten::native_layer_norm_backward": 33}
_PLAIN_ELEMENTWISE, _PLAIN_MATMUL, _PLAIN_ALPHA, _PLAIN_NONLINEAR, _PLAIN_CONV, _PLAIN_NORM = 1, 2, 4, 8, 16, 32
_KERNEL_FAST = [True]     # tests turn the C++ answers off to compare them with _kernel_call's
# the op table's built-in entries for the answered ops (importing pamtorch.ops filled it):
# an entry replaced later turns the answers off
_BUILTIN_ENTRIES = {p: OP_TABLE.get(p) for p in (
    aten.mul, aten.mul_, aten.div, aten.div_, aten.mm, aten.addmm, aten.bmm, aten.pow, aten.sqrt, aten.rsqrt,
    aten.exp, aten.log, aten.mean, aten.sigmoid, aten.sigmoid_, aten.tanh, aten.tanh_, aten.silu, aten.silu_,
    aten.sigmoid_backward, aten.tanh_backward, aten.silu_backward, aten.convolution, aten.convolution_backward,
    aten.native_batch_norm, aten.native_batch_norm_backward, aten.native_layer_norm,
    aten.native_layer_norm_backward)}


def _fast_code(qual: str, o: _Overload) -> int:
    if o.cond is not None and getattr(o.cond, "alpha", None) == "alpha" and o.pass_through:
        return _FAST_ALPHA
    return _FAST_OPS.get(qual, 0)


def _plain_families(config: Config) -> int:
    """What the kernel route answers in C++ under ``config`` (bits of pa_route.cpp's
    kPlain*): the free calls of the alpha-conditioned ops, and the families of _FAST_OPS
    whose kinds are PA with no offset and no mantissa bits (mul and div are of the
    optimizer kind inside a step, so both kinds must be), while the op table holds the
    implementations those answers reproduce, with the compiled kernels on (``arith._COMPILED``:
    off, the op table runs its pure-torch compositions, and so does every call here)."""
    key = (config, OP_TABLE.version, _KERNEL_FAST[0], _arith._COMPILED)
    plain = _PLAIN_CACHE.get(key)
    if plain is None:
        if len(_PLAIN_CACHE) > 64:
            _PLAIN_CACHE.clear()
        plain = _PLAIN_CACHE[key] = _plain_families_now(config)
    return plain


_PLAIN_CACHE: dict = {}   # (config, op-table version, _KERNEL_FAST, arith._COMPILED) -> bits


def _plain_families_now(config: Config) -> int:
    if not _KERNEL_FAST[0]:
        return 0
    if not _arith._COMPILED or any(OP_TABLE.get(p) is not e for p, e in _BUILTIN_ENTRIES.items()):
        return _PLAIN_ALPHA

    def plain(*kinds):
        return all(config.kind(k).pa and config.kind(k).offset is None and config.kind(k).mantissa_bits is None
                   for k in kinds)

    def approx(kind):   # the aten-level backward ops then take the approx formulas
        return plain(kind) and config.kind(kind).derivative == "approx"
    return _PLAIN_ALPHA | (_PLAIN_ELEMENTWISE if plain("elementwise", "optimizer") else 0) | \
        (_PLAIN_MATMUL if plain("matmul") else 0) | (_PLAIN_NONLINEAR if plain("nonlinear") else 0) | \
        (_PLAIN_CONV if approx("matmul") else 0) | (_PLAIN_NORM if approx("norm") else 0)


def _kernel_refuse(name, result):
    """A ``_RUN_AND_CHECK`` call gave a floating-point result: refuse it, as PAMode does."""
    func = _KernelRoute.overloads[name]
    raise _KERNEL_ROUTE.dispatch.unsupported(func, f"its integer inputs gave a {result.dtype} result, computed with "
                                                   "float arithmetic that has no PA implementation")


class _KernelRoute:
    """The registrations on BackendSelect, made once per op; found again at most once a
    second (listing the dispatcher's ops takes milliseconds), at once when an op table
    changed size or a route needs the ops of another kind (then the ops left unregistered
    are looked at again; otherwise only the ops new since the last listing are)."""

    ext = None              # the compiled extension
    tables = None           # the op-table sizes at the last listing
    listed = -1.0           # time.monotonic() of the last listing
    overloads: dict = {}    # "ns::name[.overload]" -> OpOverload, for the ops that call _kernel_call
    registered: set = set()  # qualified names with a kernel
    skipped: set = set()     # qualified names looked at and left unregistered, for these tables and kinds
    kinds = 0               # the kind bits whose op-table ops are all registered

    @classmethod
    def available(cls) -> bool:
        if cls.ext is None:
            from .kernels import cpu as _cpu
            if not _cpu.available():
                return False
            cls.ext = _cpu.load_extension()
            cls.ext.route_set_handler(_kernel_call, _kernel_refuse, _PASS, _OPAQUE, _RUN_AND_CHECK)
            cls.ext.route_set_optimizer(_IN_OPTIMIZER[0])   # told at every change from now on
        return True

    @classmethod
    def refresh(cls, mask: int):
        """Register what a route with ``mask`` needs: the ops that may be refused, the
        op-table ops of its PA kinds, and those of the other kinds whose kernel is a
        composition (they must pass on with the route off). The other op-table ops are left
        unregistered until a route makes their kind PA: an exact op's own kernel calls no
        op the route would catch, and a registered op costs plain PyTorch a boxed
        redispatch (BENCHMARKS.md: not resolved by a before/after measurement, 0.98-1.06 x
        of the vit fp32 step)."""
        tables = (OP_TABLE.version, len(PASS_THROUGH), len(FREE_WHEN), len(COMPLEX_OK))
        now = time.monotonic()
        kinds = cls.kinds | (mask & ~_ASK)
        if tables == cls.tables and kinds == cls.kinds and now - cls.listed < 1.0:
            return
        if tables != cls.tables or kinds != cls.kinds:
            cls.skipped = set()   # looked at again: the tables or the kinds changed
        cls.tables, cls.kinds, cls.listed = tables, kinds, now
        has = torch._C._dispatch_has_kernel_for_dispatch_key
        new: dict = {}   # (namespace, bit) -> names
        for qual in torch._C._dispatch_get_all_op_names():
            if qual in cls.registered or qual in cls.skipped:
                continue
            cls.skipped.add(qual)   # until it is registered below
            ns, _, rest = qual.partition("::")
            if not hasattr(torch.ops, ns) or has(qual, "BackendSelect"):
                continue
            if has(qual, "CompositeImplicitAutograd") and not (
                    has(qual, "CPU") or has(qual, "CompositeExplicitAutograd") or
                    has(qual, "CompositeExplicitAutogradNonFunctional")):
                continue   # it decomposes above autograd
            name, _, overload = rest.partition(".")
            try:
                func = getattr(getattr(getattr(torch.ops, ns), name), overload or "default")
            except (AttributeError, RuntimeError):
                continue
            o = _Overload(func)
            if o.entry is None and o.free:
                continue
            bit = _ASK if o.entry is None else _kind_bit(o.entry.kind)
            if not bit & (kinds | _ASK) and not has(qual, "CompositeExplicitAutograd"):
                continue
            cls.skipped.discard(qual)
            new.setdefault((ns, bit), []).append((rest, _fast_code(qual, o)))
            cls.overloads[qual] = func
            cls.registered.add(qual)
        for (ns, bit), named in new.items():
            cls.ext.route_register(ns, [n for n, _ in named], bit, [f for _, f in named])


@contextlib.contextmanager
def kernel_route_handler(wrap):
    """In the body, the kernel route hands its Python calls to ``wrap(name, args, kwargs)``
    instead of ``_kernel_call`` (which ``wrap`` should call): for timing or counting them
    (``pamtorch bench profile``, tests). Needs the compiled kernels (``_KernelRoute.available()``)."""
    ext = _KernelRoute.ext
    ext.route_set_handler(wrap, _kernel_refuse, _PASS, _OPAQUE, _RUN_AND_CHECK)
    try:
        yield
    finally:
        ext.route_set_handler(_kernel_call, _kernel_refuse, _PASS, _OPAQUE, _RUN_AND_CHECK)


def kernel_route_applies(config: Config, leave_exact=()) -> bool:
    """Whether :func:`mode` can run ``config`` by the kernel route (``route="auto"`` then
    does, for any config): no op left exact on request, no Python dispatch mode active on
    this thread (an audit's recorder, or any mode that must see what a PA mode passes on
    rather than what it is given), no accelerator (the autograd engine runs a device's
    backward on its own threads, which the route's thread-local state does not reach), and
    the compiled CPU kernels."""
    return (isinstance(config, Config) and not leave_exact and not RECORDERS
            and not _get_current_dispatch_mode_stack()
            and not torch.cuda.is_available() and not torch.backends.mps.is_available()
            and _KernelRoute.available())


@contextlib.contextmanager
def _kernel_routed(dispatch: PAMode):
    """Run the body with ``dispatch``'s routing done by the BackendSelect kernels."""
    mask = _route_mask(dispatch.config)
    with _KERNEL_LOCK:
        _KernelRoute.refresh(mask)
    prev = getattr(_KERNEL_ROUTE, "dispatch", None)
    _KERNEL_ROUTE.dispatch = dispatch
    was = _KernelRoute.ext.route_set_mask(mask)
    was_plain = _KernelRoute.ext.route_set_plain(_plain_families(dispatch.config))
    try:
        yield
    finally:
        _KernelRoute.ext.route_set_plain(was_plain)
        _KernelRoute.ext.route_set_mask(was)
        _KERNEL_ROUTE.dispatch = prev


_ANSWERS: dict = {}   # id(config) -> (config, PAMode, mask), for run_answered


def answered_in_cpp(func, config: Config) -> bool:
    """Whether the kernel route under ``config`` may answer a call of aten overload
    ``func`` in C++ (it has a code of _FAST_OPS, and the route answers more than the free
    calls under this config); pa_route.cpp still checks the call's own conditions and hands
    it to Python where they fail."""
    return (func.name() in _FAST_OPS and _KernelRoute.available()
            and _plain_families(config) & ~_PLAIN_ALPHA != 0)


def run_answered(func, config: Config, args, kwargs):
    """Run one call of aten overload ``func`` as ``pamtorch.mode(config)``'s kernel route
    runs it (its C++ answer, or the mode's Python handler), with the route on for this call
    only: for :mod:`pamtorch.compile`'s routed graph nodes, whose graphs run with the route
    off. Same result, bit for bit, as the op table's implementation under ``config``."""
    entry = _ANSWERS.get(id(config))
    if entry is None or entry[0] is not config:
        mask = _route_mask(config)
        with _KERNEL_LOCK:
            _KernelRoute.refresh(mask)
        entry = _ANSWERS[id(config)] = (config, PAMode(config), mask)
    ext = _KernelRoute.ext
    prev = getattr(_KERNEL_ROUTE, "dispatch", None)
    _KERNEL_ROUTE.dispatch = entry[1]
    was = ext.route_set_mask(entry[2])
    was_plain = ext.route_set_plain(_plain_families(config))
    try:
        return func(*args, **kwargs)
    finally:
        ext.route_set_plain(was_plain)
        ext.route_set_mask(was)
        _KERNEL_ROUTE.dispatch = prev


def _softmax_route(input, dim=None, _stacklevel=3, dtype=None, *, derivative):
    return PF.softmax(input if dtype is None else input.to(dtype), dim, derivative=derivative)


def _torch_softmax_route(input, dim, dtype=None, *, derivative):
    """``torch.softmax`` / ``Tensor.softmax``: dtype is their third positional argument."""
    return PF.softmax(input if dtype is None else input.to(dtype), dim, derivative=derivative)


def _log_softmax_route(input, dim=None, _stacklevel=3, dtype=None, *, derivative):
    return PF.log_softmax(input if dtype is None else input.to(dtype), dim, derivative=derivative)


def _cross_entropy_route(input, target, weight=None, size_average=None, ignore_index=-100,
                         reduce=None, reduction="mean", label_smoothing=0.0, *, derivative):
    if size_average is not None or reduce is not None:  # F's deprecated arguments, read as torch does
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    return PF.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                            derivative=derivative)


def _nll_loss_route(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                    reduction="mean", *, derivative):
    # with F.log_softmax's route (both "loss" kind) a log_softmax + nll_loss model gets the
    # derivative of the composition that PF.cross_entropy gives
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    return PF.nll_loss(input, target, weight, ignore_index, reduction, derivative=derivative)


def _mse_route(input, target, size_average=None, reduce=None, reduction="mean", weight=None, *, derivative):
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    return PF.mse_loss(input, target, reduction, derivative=derivative)


# functions that get a non-approx derivative kind at the autograd level, with their kind
_FUNCTION_ROUTES = {
    F.softmax: _softmax_route,
    torch.softmax: _torch_softmax_route,
    torch.Tensor.softmax: _torch_softmax_route,
    F.log_softmax: _log_softmax_route,
    F.layer_norm: lambda input, normalized_shape, weight=None, bias=None, eps=1e-5, *, derivative:
        PF.layer_norm(input, normalized_shape, weight, bias, eps, derivative=derivative),
    F.gelu: lambda input, approximate="none", *, derivative: PF.gelu(input, approximate, derivative=derivative),
    F.cross_entropy: _cross_entropy_route,
    F.nll_loss: _nll_loss_route,
    F.mse_loss: _mse_route,
}
# log-softmax is a "loss" op, as aten._log_softmax is in the op table (Config's docstring)
_FUNCTION_KINDS = {F.softmax: "softmax", torch.softmax: "softmax", torch.Tensor.softmax: "softmax",
                   F.log_softmax: "loss", F.layer_norm: "norm", F.gelu: "nonlinear",
                   F.cross_entropy: "loss", F.nll_loss: "loss", F.mse_loss: "loss"}
_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm)
_BMMS = (torch.bmm, torch.Tensor.bmm)

# the aten ops each function-level route stands for: leave_exact naming one of them
# leaves the function to the dispatch level, where the request applies
_SOFTMAX_OPS = ("_softmax", "_softmax_backward_data", "_safe_softmax")
_FUNCTION_OPS = {
    **{f: _SOFTMAX_OPS for f in (F.softmax, torch.softmax, torch.Tensor.softmax)},
    F.log_softmax: ("_log_softmax", "_log_softmax_backward_data"),
    F.layer_norm: ("native_layer_norm", "native_layer_norm_backward"),
    F.gelu: ("gelu", "gelu_backward"),
    F.cross_entropy: ("_log_softmax", "_log_softmax_backward_data", "nll_loss_forward",
                      "nll_loss_backward", "nll_loss2d_forward", "nll_loss2d_backward"),
    F.mse_loss: ("mse_loss", "mse_loss_backward"),
    **{f: ("mm", "bmm") for f in _MATMULS + _BMMS},
    F.linear: ("addmm", "mm"),
    F.scaled_dot_product_attention: ("bmm", "mul", *_SOFTMAX_OPS,
                                     "_scaled_dot_product_flash_attention_for_cpu",
                                     "_scaled_dot_product_flash_attention_for_cpu_backward"),
    F.nll_loss: ("nll_loss_forward", "nll_loss_backward", "nll_loss2d_forward", "nll_loss2d_backward"),
    F.multi_head_attention_forward: ("addmm", "mm", "bmm", "baddbmm", "mul", "div", "mean", *_SOFTMAX_OPS,
                                     "_scaled_dot_product_flash_attention_for_cpu",
                                     "_scaled_dot_product_flash_attention_for_cpu_backward"),
}
_MATH_SDPA = (torch.ops.aten._scaled_dot_product_attention_math,
              torch.ops.aten._scaled_dot_product_attention_math.default)
for _f in _MATH_SDPA:
    _FUNCTION_OPS[_f] = ("bmm", "mul", *_SOFTMAX_OPS)
# the activations (tanh, sigmoid, silu, ..., erf, sin, cos) route the same way, kind "nonlinear"
_FUNCTION_ROUTES.update(_activations.FUNCTION_ROUTES)
_FUNCTION_KINDS.update(dict.fromkeys(_activations.FUNCTION_ROUTES, "nonlinear"))
_FUNCTION_OPS.update(_activations.FUNCTION_OPS)
# batch, group and instance norm: kind "norm", exact/ste derivatives by the same route
_NORM_ROUTES = {F.batch_norm: _norms.batch_norm, F.group_norm: _norms.group_norm,
                F.instance_norm: _norms.instance_norm}
_FUNCTION_ROUTES.update(_NORM_ROUTES)
_FUNCTION_KINDS.update(dict.fromkeys(_NORM_ROUTES, "norm"))
_BN_OPS = ("native_batch_norm", "native_batch_norm_backward", "_native_batch_norm_legit",
           "_native_batch_norm_legit_no_training", "_batch_norm_with_update", "batch_norm_backward")
_FUNCTION_OPS.update({F.batch_norm: _BN_OPS, F.instance_norm: _BN_OPS,
                      F.group_norm: ("native_group_norm", "native_group_norm_backward")})


def _weighted_smoothed_mean(args, kwargs) -> bool:
    """Whether an ``F.cross_entropy`` call takes class-index targets, a class weight, label
    smoothing and the mean reduction (where torch's composition branches on
    isTensorSubclassLike)."""
    names = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction",
             "label_smoothing")
    bound = dict(zip(names, args), **kwargs)
    if bound.get("size_average") is not None or bound.get("reduce") is not None:
        reduction = torch.nn._reduction.legacy_get_string(bound.get("size_average"), bound.get("reduce"))
    else:
        reduction = bound.get("reduction", "mean")
    target = bound.get("target")
    return (bound.get("weight") is not None and bound.get("label_smoothing", 0.0) > 0 and reduction == "mean"
            and isinstance(target, torch.Tensor) and not target.is_floating_point())


class _PAFunctionMode(TorchFunctionMode):
    """Above autograd: decompose fused ops, and give matrix products the exact or
    straight-through derivative where the config asks for it."""

    def __init__(self, config: Config, leave_exact=(), kernel_route: bool = False):
        super().__init__()
        self.config = config
        # on the kernel route torch's cross entropy takes its branch for "no Python mode"
        # (isTensorSubclassLike), whose mean of a weighted, label-smoothed loss sums the
        # weights in another order than the dispatch route and pamtorch.nn: such calls run
        # pamtorch.nn's function, which composes the loss as the other branch does
        self.ce_by_function = kernel_route and config.loss.pa and config.loss.derivative == "approx"
        packets, overloads, _ = _leave_exact(leave_exact)
        self.leave = {p.__name__ for p in packets} | {o.overloadpacket.__name__ for o in overloads}
        self.handled = self._handled(config)

    def _handled(self, config: Config) -> frozenset:
        """The functions this mode may do something with under ``config``; every other
        call runs as it is, with no further Python (a step makes thousands)."""
        funcs = {F.scaled_dot_product_attention, F.multi_head_attention_forward, *_MATH_SDPA}
        funcs.update(f for f, k in _FUNCTION_KINDS.items()
                     if config.kind(k).pa and config.kind(k).derivative not in ("approx", "balanced"))
        if config.matmul.pa and config.matmul.derivative != "approx":
            funcs.update(_MATMULS + _BMMS + (F.linear,))
        if self.leave:
            funcs.update(f for f, ops in _FUNCTION_OPS.items() if self.leave.intersection(ops))
        if self.ce_by_function:
            funcs.add(F.cross_entropy)
        return frozenset(funcs)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func not in self.handled:
            return func(*args, **kwargs) if kwargs else func(*args)
        kwargs = kwargs or {}
        if kwargs.get("out") is not None:
            # out= has no autograd, so the derivative kind is moot: the dispatch level
            # routes the op and writes out (ops.table.implements)
            return func(*args, **kwargs)
        if self.leave and self.leave.intersection(_FUNCTION_OPS.get(func, ())):
            return func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            # the fused aten op has no PA backward: use the PA attention of pamtorch.nn,
            # which applies the scale once, as one PAM on q (torch's math path scales q
            # and k by its square root each), and uses a safe softmax
            return PF.scaled_dot_product_attention(*args, **kwargs, config=self.config)
        if func is F.multi_head_attention_forward:
            # nn.MultiheadAttention's function: the same attention, one PAM on q
            return PF.multi_head_attention_forward(*args, **kwargs, config=self.config)
        if func in _MATH_SDPA:
            return PF.scaled_dot_product_attention_math(*args, **kwargs, config=self.config)
        kind = _FUNCTION_KINDS.get(func)
        if func is F.cross_entropy and self.ce_by_function and _weighted_smoothed_mean(args, kwargs):
            op = self.config.loss
            if op.mantissa_bits is not None:
                return rounded_call(_FUNCTION_ROUTES[func], op.mantissa_bits, *args, **kwargs, derivative="approx")
            return _FUNCTION_ROUTES[func](*args, **kwargs, derivative="approx")
        if kind is not None:
            op = self.config.kind(kind)
            # "balanced" (loss kind) is the approx derivative made zero-sum per row: the
            # dispatch level's log-softmax backward applies it (ops/losses.py)
            if op.pa and op.derivative not in ("approx", "balanced"):
                if op.mantissa_bits is not None:  # the route's operands and results, as at dispatch
                    return rounded_call(_FUNCTION_ROUTES[func], op.mantissa_bits, *args, **kwargs,
                                        derivative=op.derivative)
                return _FUNCTION_ROUTES[func](*args, **kwargs, derivative=op.derivative)
        mm = self.config.matmul
        if mm.pa and mm.derivative != "approx":
            opts = dict(offset=mm.offset, mantissa_bits=mm.mantissa_bits, derivative=mm.derivative)
            if func in _MATMULS:
                return _pa_matmul(args[0], args[1], **opts)
            if func in _BMMS:
                return _pa_bmm(args[0], args[1], **opts)
            if func is F.linear:
                return _pa_linear(*args, **kwargs, **opts)
        return func(*args, **kwargs)


@contextlib.contextmanager
def mode(config: Config | None = None, leave_exact=(), route: str = "auto"):
    """Run everything inside multiplication-free (see the module docstring).

    ``config`` (default ``Config.paper()``) says which op kinds are PA and with which
    derivative. Stock ``torch.optim`` optimizers run PA inside, foreach included.

    ``leave_exact``: aten ops (``torch.ops.aten.cumprod``), single overloads
    (``torch.ops.aten.round.decimals``) or op-kind names (``"optimizer"``) that run with
    torch's own float arithmetic, on request. ``pamtorch.audit`` lists them as "left
    exact by request", and its verdict is then not multiplication-free.

    ``route``: how aten calls reach the op table. ``"dispatch"``: a ``TorchDispatchMode``
    sees every call. ``"kernel"``: kernels on the BackendSelect dispatch key catch the
    calls of the op kinds the config makes PA and of the ops that may be refused, and every
    other call runs with no Python crossing, the most frequent ones answered in C++: the
    same routing, and the same bits except where torch's own composite code branches on
    whether a Python mode is active (docs/training.md, "The kernel route"). ``"auto"``
    (default): the kernel route where it can run (``kernel_route_applies``: no
    ``leave_exact``, no audit or other Python dispatch mode active, CPU only), else the
    dispatch mode."""
    config = config or Config.paper()
    if not isinstance(config, Config):
        raise TypeError(f"pamtorch.mode: config must be a pamtorch Config, got {type(config).__name__}")
    if route not in ("auto", "dispatch", "kernel"):
        raise ValueError(f"pamtorch.mode: route must be 'auto', 'dispatch' or 'kernel', got {route!r}")
    leave_exact = tuple(leave_exact)
    kernel = route != "dispatch" and kernel_route_applies(config, leave_exact)
    if route == "kernel" and not kernel:
        raise ValueError("pamtorch.mode: route='kernel' needs no leave_exact, no audit recording, no Python "
                         "dispatch mode active on this thread, no CUDA or MPS device and the compiled CPU "
                         "kernels; use route='auto' or 'dispatch'")
    with _entered(PAMode(config, leave_exact), leave_exact, kernel_route=kernel):
        yield


@contextlib.contextmanager
def _entered(dispatch: PAMode, leave_exact=(), kernel_route: bool = False):
    """The body of :func:`mode` around a given dispatch mode (``pamtorch.bench``'s
    profile enters a timing subclass of :class:`PAMode` this way)."""
    stack, thread = dispatch.modules, dispatch.thread

    def enter(module, args):
        if threading.get_ident() == thread:
            stack.append(module)

    def leave(module, args, out):
        if threading.get_ident() == thread and stack and stack[-1] is module:
            stack.pop()

    # a stock Adam/AdamW steps on its fused path (one routed op, a compiled kernel; the same
    # bits, ops/optim.py) when this mode routes its ops, and a stock optimizer that the config
    # leaves exact on its foreach path (fewer ops to cross into the mode, the same bits); the
    # user's setting is back after the step
    fused: dict = {}   # id(optimizer) -> stack of the param groups switched per running step

    def opt_pre(opt, args, kwargs):
        _opt_pre(opt, args, kwargs)
        if threading.get_ident() == thread and (getattr(_KERNEL_ROUTE, "dispatch", None) if kernel_route
                                                else _get_current_dispatch_mode()) is dispatch:
            fused.setdefault(id(opt), []).append(_optim.fused_adam_groups(opt, dispatch.config, leave_exact) or
                                                 _optim.foreach_exact_groups(opt, dispatch.config, leave_exact))

    def opt_post(opt, args, kwargs):
        _opt_post(opt, args, kwargs)
        if threading.get_ident() == thread and fused.get(id(opt)):
            _optim.restore_groups(fused[id(opt)].pop())

    hooks = [register_optimizer_step_pre_hook(opt_pre), register_optimizer_step_post_hook(opt_post),
             register_module_forward_pre_hook(enter), register_module_forward_hook(leave, always_call=True)]
    # the fused fast paths of nn.MultiheadAttention and nn.TransformerEncoder (nested
    # tensors from a padding mask, torch._transformer_encoder_layer_fwd) bypass the
    # modules' math; with them off the stock math path runs, and is routed op by op
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    # an optimizer step that raises never runs its post hook: restore the step depth on exit
    in_optimizer = _IN_OPTIMIZER[0]
    try:
        with _PAFunctionMode(dispatch.config, leave_exact, kernel_route), \
                (_kernel_routed(dispatch) if kernel_route else dispatch):
            yield
    finally:
        _IN_OPTIMIZER[0] = in_optimizer
        for stack in fused.values():  # steps that raised
            for groups in stack:
                _optim.restore_groups(groups)
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in hooks:
            h.remove()
