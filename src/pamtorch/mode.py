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

Every floating-point aten op is one of: routed (in ``OP_TABLE``), known to do no
multiplication (``PASS_THROUGH``: views, copies, additions, comparisons, reductions by
sum or max, ...), or an error that names it. An op is never silently run exact, except
where the config says to leave its kind exact. ``pamtorch.audit`` shares these tables.

Scalars computed in Python (learning-rate schedules, Adam's bias corrections) are exact
Python floats, as in the paper; applying them to tensors is a PAM.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .config import Config, OpConfig
from .matmul import bmm as _pa_bmm, linear as _pa_linear, matmul as _pa_matmul
from .nn import functional as PF
from .ops import OP_TABLE, PASS_THROUGH, UnsupportedOpError, implements, op_kind
from .ops.table import ACTIVE as _ACTIVE

__all__ = ["OP_TABLE", "PASS_THROUGH", "RECORDERS", "UnsupportedOpError", "classify", "implements",
           "mode", "PAMode", "op_kind", "is_float_op"]

aten = torch.ops.aten


def _has_float(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.is_floating_point()
    if isinstance(x, (list, tuple)):
        return any(_has_float(y) for y in x)
    if isinstance(x, dict):
        return any(_has_float(y) for y in x.values())
    return False


def is_float_op(args, kwargs) -> bool:
    """Whether any tensor among the (nested list/tuple/dict) arguments is floating point."""
    return _has_float(args) or _has_float(kwargs)


# ---------------------------------------------------------------------------
# the mode

_ALPHA_OPS = frozenset([aten.add, aten.add_, aten.sub, aten.sub_, aten._foreach_add,
                        aten._foreach_add_, aten._foreach_sub, aten._foreach_sub_])

# collectives move or sum tensors (DDP's buffer broadcast, the SUM all-reduce); an AVG
# reduction divides inside the backend, so pamtorch's DDP hook all-reduces SUM and then
# divides with PAD
_COMMUNICATION = frozenset(["c10d", "_c10d_functional"])

# objects with a ``routed(func, args, kwargs, out)`` method, told of every routed op
RECORDERS: list = []
# the config of the innermost active PAMode, for implementations that span op kinds

def classify(func, args, kwargs) -> str:
    """How the mode treats an aten call: "free" (runs as is: no float tensor, or an op
    known to do no float multiplication), "routable" (a multiply-like op in OP_TABLE), or
    "unknown" (a float op that may multiply and has no PA implementation)."""
    if not is_float_op(args, kwargs) or func.namespace in _COMMUNICATION:
        return "free"
    packet = func.overloadpacket
    if packet in OP_TABLE:
        if packet in _ALPHA_OPS and kwargs.get("alpha", 1) == 1:
            return "free"
        return "routable"
    return "free" if packet in PASS_THROUGH else "unknown"


_IN_OPTIMIZER = [0]


def _opt_pre(opt, args, kwargs):
    _IN_OPTIMIZER[0] += 1


def _opt_post(opt, args, kwargs):
    _IN_OPTIMIZER[0] -= 1


class PAMode(TorchDispatchMode):
    """Routes floating-point aten ops through ``OP_TABLE`` according to ``config``."""

    def __init__(self, config: Config | None = None):
        super().__init__()
        self.config = config or Config.paper()

    def kind_config(self, kind: str) -> OpConfig:
        if kind in ("elementwise", "optimizer") and _IN_OPTIMIZER[0]:
            return self.config.optimizer
        if kind == "optimizer":
            return self.config.elementwise
        return self.config.kind(kind)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        cls = classify(func, args, kwargs)
        if cls == "free":
            return func(*args, **kwargs)
        if cls == "unknown":
            raise UnsupportedOpError(
                f"pamtorch.mode: {func} is a floating-point op with no piecewise affine "
                "implementation, and it is not known to be free of multiplications, so it was "
                "not run exact behind your back. Route around it, leave its module out with "
                "pamtorch.convert's module_filter_fn, or report the op name to the pamtorch "
                "maintainers so it can be added to pamtorch.mode.OP_TABLE.")
        entry = OP_TABLE[func.overloadpacket]
        opcfg = self.kind_config(entry.kind)
        if not opcfg.pa:  # the config leaves this kind exact
            return func(*args, **kwargs)
        _ACTIVE.append(self.config)
        try:
            out = entry.impl(func, args, kwargs, opcfg)
        finally:
            _ACTIVE.pop()
        for rec in RECORDERS:
            rec.routed(func, args, kwargs, out)
        return out


def _softmax_route(input, dim=None, _stacklevel=3, dtype=None, *, derivative):
    return PF.softmax(input if dtype is None else input.to(dtype), dim, derivative=derivative)


def _log_softmax_route(input, dim=None, _stacklevel=3, dtype=None, *, derivative):
    return PF.log_softmax(input if dtype is None else input.to(dtype), dim, derivative=derivative)


def _cross_entropy_route(input, target, weight=None, size_average=None, ignore_index=-100,
                         reduce=None, reduction="mean", label_smoothing=0.0, *, derivative):
    return PF.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                            derivative=derivative)


def _mse_route(input, target, size_average=None, reduce=None, reduction="mean", weight=None, *, derivative):
    return PF.mse_loss(input, target, reduction, derivative=derivative)


# functions that get a non-approx derivative kind at the autograd level, with their kind
_FUNCTION_ROUTES = {
    F.softmax: _softmax_route,
    torch.softmax: _softmax_route,
    torch.Tensor.softmax: _softmax_route,
    F.log_softmax: _log_softmax_route,
    F.layer_norm: lambda input, normalized_shape, weight=None, bias=None, eps=1e-5, *, derivative:
        PF.layer_norm(input, normalized_shape, weight, bias, eps, derivative=derivative),
    F.gelu: lambda input, approximate="none", *, derivative: PF.gelu(input, approximate, derivative=derivative),
    F.cross_entropy: _cross_entropy_route,
    F.mse_loss: _mse_route,
}
_FUNCTION_KINDS = {F.softmax: "softmax", torch.softmax: "softmax", torch.Tensor.softmax: "softmax",
                   F.log_softmax: "softmax", F.layer_norm: "norm", F.gelu: "nonlinear",
                   F.cross_entropy: "loss", F.mse_loss: "loss"}


class _PAFunctionMode(TorchFunctionMode):
    """Above autograd: decompose fused ops, and give matrix products the exact or
    straight-through derivative where the config asks for it."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("out") is not None:
            # out= has no autograd, so the derivative kind is moot: the dispatch level
            # routes the op and writes out (ops.table.implements)
            return func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            # the fused aten op has no PA backward: use the PA attention of pamtorch.nn,
            # which scales q first and uses a safe softmax, as torch's math path does
            return PF.scaled_dot_product_attention(*args, **kwargs, config=self.config)
        kind = _FUNCTION_KINDS.get(func)
        if kind is not None:
            op = self.config.kind(kind)
            if op.pa and op.derivative != "approx":
                return _FUNCTION_ROUTES[func](*args, **kwargs, derivative=op.derivative)
        mm = self.config.matmul
        if mm.pa and mm.derivative != "approx" and mm.offset is None:
            if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm,
                        torch.Tensor.mm):
                return _pa_matmul(args[0], args[1], derivative=mm.derivative)
            if func in (torch.bmm, torch.Tensor.bmm):
                return _pa_bmm(args[0], args[1], derivative=mm.derivative)
            if func is F.linear:
                return _pa_linear(*args, **kwargs, derivative=mm.derivative)
        return func(*args, **kwargs)


@contextlib.contextmanager
def mode(config: Config | None = None):
    """Run everything inside multiplication-free (see the module docstring).

    ``config`` (default ``Config.paper()``) says which op kinds are PA and with which
    derivative. Stock ``torch.optim`` optimizers run PA inside, foreach included."""
    config = config or Config.paper()
    pre = register_optimizer_step_pre_hook(_opt_pre)
    post = register_optimizer_step_post_hook(_opt_post)
    try:
        with _PAFunctionMode(config), PAMode(config):
            yield
    finally:
        pre.remove()
        post.remove()

