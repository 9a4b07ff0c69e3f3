"""The one op table: aten op -> PA implementation, plus the ops known to do no float
multiplication, and the small helpers every op family uses.

Each family file in this package (``matmul``, ``conv``, ``elementwise``, ``activations``,
``norms``, ``losses``, ``attention``, ``pooling``, ``recurrent``, ``optim``) holds its ops'
forward and backward and registers them here with ``@implements``; the dispatch mode
(:mod:`pamtorch.mode`), the audit and ``convert`` all read this one table.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .. import arith
from ..config import Config, OpConfig

__all__ = ["OP_TABLE", "PASS_THROUGH", "UnsupportedOpError", "implements", "passes_through", "op_kind",
           "out_names", "write_out",
           "scalar_type_name", "cpp_type_name"]

aten = torch.ops.aten


class UnsupportedOpError(RuntimeError):
    """A floating-point op that may multiply and that pamtorch cannot route to PA."""


@dataclass(frozen=True)
class _Entry:
    kind: str
    impl: Callable


class _OpTable(dict):
    """A dict of aten overload packet -> _Entry whose ``version`` counts its changes, so
    what is derived from it (the kernel route's C++ answers, which reproduce the built-in
    entries) can be cached and still see an entry replaced or removed."""

    version = 0

    def __setitem__(self, key, value):
        self.version += 1
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self.version += 1
        super().__delitem__(key)

    def pop(self, *args):
        self.version += 1
        return super().pop(*args)

    def popitem(self):
        self.version += 1
        return super().popitem()

    def setdefault(self, key, default=None):
        self.version += 1
        return super().setdefault(key, default)

    def update(self, *args, **kwargs):
        self.version += 1
        super().update(*args, **kwargs)

    def clear(self):
        self.version += 1
        super().clear()


OP_TABLE: _OpTable = _OpTable()


def implements(ops, kind: str):
    """Register ``impl(func, args, kwargs, opcfg)`` as the PA version of aten ``ops``
    (overload packets); ``kind`` is the config field that decides whether it runs PA.

    ``impl`` computes the functional result; the ``.out`` overloads (``torch.mul(a, b,
    out=c)``) are handled here for every op: ``impl`` runs without the out arguments and
    its result is written into them (see :func:`write_out`). For the kinds in
    ``BOUNDARY_ROUNDED`` the config's ``mantissa_bits`` is applied here too (see
    :func:`_round_boundary`)."""
    def deco(fn):
        entry = _Entry(kind, _with_out(_round_boundary(fn) if kind in BOUNDARY_ROUNDED else fn, kind))
        for op in ops:
            OP_TABLE[op] = entry
        return fn
    return deco


_OUT_NAMES: dict = {}


def out_names(func) -> tuple:
    """Names of the out arguments of aten overload ``func`` (``("out",)`` for ``mul.out``,
    ``()`` for ``mul.Tensor``)."""
    names = _OUT_NAMES.get(func)
    if names is None:
        names = _OUT_NAMES[func] = tuple(a.name for a in func._schema.arguments if a.is_out)
    return names


_FUNCTIONAL: dict = {}


def functional_overload(func):
    """The overload of ``func``'s packet that takes the same arguments without the out
    ones (``mul.Tensor`` for ``mul.out``); ``func`` itself when there is none."""
    g = _FUNCTIONAL.get(func)
    if g is None:
        sig = [(a.name, str(a.type)) for a in func._schema.arguments if not a.is_out]
        packet = func.overloadpacket
        cands = [getattr(packet, n) for n in packet.overloads()]
        g = _FUNCTIONAL[func] = next(
            (c for c in cands if not out_names(c) and [(a.name, str(a.type)) for a in c._schema.arguments] == sig),
            func)
    return g


# Kinds whose implementations are composite PA functions (nn.functional's forwards and
# backwards) that take no mantissa width: under ``mantissa_bits`` the float operands and
# results of their aten ops are rounded at the op's boundary. The matrix products, the
# elementwise and the optimizer ops round inside, at each PAM/PAD (``pam``/``pad`` below).
BOUNDARY_ROUNDED = ("softmax", "norm", "loss", "nonlinear")


def _written(func) -> set:
    """Names of the arguments aten overload ``func`` writes (``self`` of ``tanh_``)."""
    return {a.name for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write}


def _round_boundary(fn):
    """``fn`` with its float operands and results rounded to ``opcfg.mantissa_bits``;
    arguments the op writes are rounded in place (before: the operand; after: the result)."""
    def impl(func, args, kwargs, opcfg):
        k = opcfg.mantissa_bits
        if k is None:
            return fn(func, args, kwargs, opcfg)

        written_ids: set = set()

        def rnd(x, inplace=False):
            if isinstance(x, (list, tuple)):
                return type(x)(rnd(y, inplace) for y in x)
            if isinstance(x, torch.Tensor) and x.dtype in arith.SUPPORTED_DTYPES:
                if inplace:
                    written_ids.add(id(x))
                    return x.copy_(arith.round_mantissa(x, k))
                # a result that is a written argument was rounded in place already
                return x if id(x) in written_ids else arith.round_mantissa(x, k)
            return x

        names = [a.name for a in func._schema.arguments]
        written = _written(func)
        args = tuple(rnd(x, i < len(names) and names[i] in written) for i, x in enumerate(args))
        kwargs = {n: rnd(x, n in written) for n, x in kwargs.items()}
        result = fn(func, args, kwargs, opcfg)
        outs = [x for i, x in enumerate(args) if i < len(names) and names[i] in written]
        rnd(outs + [x for n, x in kwargs.items() if n in written], inplace=True)
        return rnd(result)
    impl.__wrapped__ = fn
    return impl


def _with_out(fn, kind):
    def impl(func, args, kwargs, opcfg):
        names = out_names(func)
        if not names or not any(n in kwargs for n in names):
            return fn(func, args, kwargs, opcfg)
        outs = [kwargs[n] for n in names]
        # the implementation sees the functional overload, as if out= had not been given
        result = fn(functional_overload(func), args, {k: v for k, v in kwargs.items() if k not in names}, opcfg)
        listed = isinstance(outs[0], (list, tuple))  # Tensor[] out (_foreach_*.List_out): returns ()
        if listed:
            outs = list(outs[0])
        results = result if isinstance(result, (tuple, list)) else (result,)
        if len(results) != len(outs):
            raise RuntimeError(f"{func}: expected {len(results)} out tensors, got {len(outs)}")
        for o, r in zip(outs, results):
            if r is not None:  # an output the op was asked not to compute (output_mask)
                write_out(o, r, same_dtype=kind == "matmul")
        if listed:
            return None
        return outs[0] if len(outs) == 1 else tuple(outs)
    impl.__wrapped__ = fn
    return impl


def write_out(out: torch.Tensor, result: torch.Tensor, same_dtype: bool = False) -> torch.Tensor:
    """Write ``result`` into the ``out=`` tensor as torch does: the same errors for an
    unsafe cast (or, for matrix products, any other dtype) and another device; ``out`` is
    resized when its shape differs, with torch's warning when it was not empty."""
    if same_dtype and out.dtype != result.dtype:
        raise RuntimeError(f"Expected out tensor to have dtype {cpp_type_name(result.dtype)}, but got "
                           f"{cpp_type_name(out.dtype)} instead")
    if not torch.can_cast(result.dtype, out.dtype):
        raise RuntimeError(f"result type {scalar_type_name(result.dtype)} can't be cast to the desired "
                           f"output type {scalar_type_name(out.dtype)}")
    if out.device != result.device:
        raise RuntimeError(f"Expected out tensor to be on {result.device}, but got {out.device} instead")
    if out.shape != result.shape:
        if out.numel() != 0:
            warnings.warn(
                f"An output with one or more elements was resized since it had shape {list(out.shape)}, "
                f"which does not match the required output shape {list(result.shape)}. This behavior is "
                "deprecated, and in a future PyTorch release outputs will not be resized unless they have "
                "zero elements. You can explicitly reuse an out tensor t by resizing it, inplace, to zero "
                "elements with t.resize_(0).", UserWarning, stacklevel=2)
        out.resize_(result.shape)
    return out.copy_(result)


def scalar_type_name(dtype: torch.dtype) -> str:
    """The ScalarType name torch's error messages use (Float, BFloat16, Long, ...)."""
    return {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
            torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
            torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool"}.get(dtype, str(dtype))


def cpp_type_name(dtype: torch.dtype) -> str:
    """The C++ type name of the matrix products' dtype errors (float, c10::BFloat16, ...)."""
    return {torch.float32: "float", torch.float64: "double", torch.float16: "c10::Half",
            torch.bfloat16: "c10::BFloat16"}.get(dtype, str(dtype))


def op_kind(func) -> str | None:
    e = OP_TABLE.get(func.overloadpacket)
    return None if e is None else e.kind


# ops that do no float multiplication; families add their own with ``passes_through``
PASS_THROUGH: set = set()


def passes_through(names: str) -> None:
    """Declare the aten ops named in the whitespace-separated ``names`` free of float
    multiplication (views, copies, additions, comparisons, selects, sums, max, ...)."""
    PASS_THROUGH.update(getattr(aten, n) for n in names.split() if hasattr(aten, n))


passes_through("""
    add add_ sub sub_ rsub neg neg_ abs abs_ sum amax amin max min maximum minimum clamp clamp_
    clamp_min clamp_min_ clamp_max clamp_max_ where masked_fill masked_fill_ fill fill_ zero_
    copy_ _to_copy clone detach alias view _unsafe_view reshape expand t transpose permute
    unsqueeze squeeze select slice slice_scatter select_scatter index index_select gather
    scatter scatter_add scatter_add_ index_add index_add_ index_put index_put_ cat stack split
    split_with_sizes unbind narrow contiguous empty empty_like empty_strided zeros zeros_like
    ones ones_like full full_like new_empty new_zeros new_ones new_full new_empty_strided
    arange eq ne lt le gt ge isnan isinf isfinite logical_not logical_and logical_or sign
    signbit relu relu_ threshold_backward le_ lt_ ge_ gt_ eq_ ne_ any all argmax argmin max_pool2d_with_indices
    max_pool2d_with_indices_backward embedding embedding_dense_backward _local_scalar_dense
    lift_fresh as_strided as_strided_ constant_pad_nd im2col col2im floor ceil round trunc
    nan_to_num nan_to_num_ sort topk cumsum flip roll repeat tril triu bernoulli_ uniform_
    normal_ random_ rand rand_like randn randn_like randint randperm masked_select nonzero
    view_as_real unfold unfold_backward _reshape_alias copy set_ resize_ squeeze_ unsqueeze_
    t_ transpose_ exponential_ bitwise_and bitwise_or bitwise_xor bitwise_not
    __and__ __or__ __xor__ __rshift__ __lshift__ copysign _foreach_add _foreach_add_
    _foreach_sub _foreach_sub_ _foreach_neg _foreach_neg_ _foreach_zero_ _foreach_copy_
    _foreach_maximum _foreach_maximum_ _foreach_abs
    detach_ split_copy unsafe_split _has_compatible_shallow_copy_type new_empty
    scalar_tensor is_nonzero equal count_nonzero
    _unsafe_index _unsafe_index_put _unsafe_masked_index _unsafe_masked_index_put_accumulate
    _index_put_impl _index_put_impl_
    index_copy index_copy_ masked_scatter expand_as
    diagonal diag_embed movedim _pin_memory pin_memory
    upsample_nearest2d to result_type lift_fresh_copy view_as type_as item select_backward
    slice_backward diagonal_backward as_strided_scatter _unsafe_view_copy repeat_interleave
    flatten unflatten
    eye empty_permuted is_same_size
""")

# routed ops whose implementation also takes complex operands (the classifier refuses a
# multiply-like call with complex operands unless its op is here)
COMPLEX_OK: set = set()


def accepts_complex(ops) -> None:
    """Declare that the PA implementations of ``ops`` handle complex operands too."""
    COMPLEX_OK.update(ops)


# the config of the innermost active PAMode, for implementations that span op kinds
ACTIVE: list = [Config.paper()]

class _StepCount(list):
    """``[n]``: how many ``Optimizer.step`` calls are running. Every change is also told to
    the compiled kernel route (pa_route.cpp), which answers a product with a number near 1
    in C++ only outside a step (inside one it takes the optimizer's form, in Python)."""

    def __setitem__(self, i, value):
        super().__setitem__(i, value)
        from ..kernels import cpu   # lazy: the kernels build on first use

        if cpu._EXT is not None:
            cpu._EXT.route_set_optimizer(int(self[0]))


# how many Optimizer.step calls are running (the mode's optimizer-step hooks and
# pamtorch.optim count them): inside one the mode runs the optimizer kind
OPTIMIZER_STEP: _StepCount = _StepCount([0])


# ---------------------------------------------------------------------------
# helpers for the implementations

def arg(args, kwargs, i, name, default=None):
    """Argument ``i`` of an aten call, passed positionally or as ``name``."""
    return args[i] if len(args) > i else kwargs.get(name, default)


def promote(a, b):
    """Both operands as tensors of one supported float dtype (Python scalars included)."""
    ta, tb = isinstance(a, torch.Tensor), isinstance(b, torch.Tensor)
    ref = a if ta else b
    dtype = torch.result_type(a, b)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    if dtype not in arith.SUPPORTED_DTYPES:
        raise UnsupportedOpError(f"pamtorch.mode: PA arithmetic supports {arith.SUPPORTED_DTYPES}, got {dtype}")
    a = a.to(dtype) if ta else torch.tensor(float(a), dtype=dtype, device=ref.device)
    b = b.to(dtype) if tb else torch.tensor(float(b), dtype=dtype, device=ref.device)
    return a, b


def _pa_binary(op, a, b, opcfg):
    a, b = promote(a, b)
    if opcfg is None:
        return op(a, b)
    k = opcfg.mantissa_bits
    off = arith.round_offset(opcfg.offset, a.dtype, k)
    return arith.round_mantissa(op(arith.round_mantissa(a, k), arith.round_mantissa(b, k), off), k)


def pam(a, b, opcfg: OpConfig | None = None):
    """PAM of tensors or Python numbers, with ``opcfg``'s offset α (the pattern
    P_a + P_b - B + (P_α - B)) and mantissa bits (operands, α and result rounded) if it
    has them. Always a new tensor: ``x * 1`` is PAM(x, 1) (x with subnormals flushed),
    never x itself."""
    return _pa_binary(arith.pam, a, b, opcfg)


def pad(a, b, opcfg: OpConfig | None = None):
    """PAD of tensors or Python numbers (with ``opcfg``'s offset, the pattern
    P_a - P_b + B - (P_α - B), and mantissa bits); always a new tensor, like :func:`pam`."""
    return _pa_binary(arith.pad, a, b, opcfg)


def inplace(func, args, out):
    """Write ``out`` into the first argument for in-place overloads (name ends in ``_``),
    with torch's errors where it does not fit: a broadcast shape larger than the first
    argument's, or a result dtype that cannot be cast to it (``int_tensor.mul_(0.5)``)."""
    if not func.overloadpacket.__name__.endswith("_"):
        return out
    self = args[0]
    if out.shape != self.shape:
        raise RuntimeError(f"output with shape {list(self.shape)} doesn't match the broadcast shape "
                           f"{list(out.shape)}")
    if not torch.can_cast(out.dtype, self.dtype):
        raise RuntimeError(f"result type {scalar_type_name(out.dtype)} can't be cast to the desired "
                           f"output type {scalar_type_name(self.dtype)}")
    return self.copy_(out)


def scale(x, s):
    """alpha/beta style scalar factor x ·̂ s; x itself when s == 1 (no multiplication), so a
    caller must combine the result into a new tensor (``a + scale(b, alpha)``), never
    return it as is."""
    return x if s == 1 else pam(x, s)
