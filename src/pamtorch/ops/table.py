"""The one op table: aten op -> PA implementation, plus the ops known to do no float
multiplication, and the small helpers every op family uses.

Each family file in this package (``matmul``, ``conv``, ``elementwise``, ``activations``,
``norms``, ``losses``, ``attention``, ``pooling``, ``recurrent``, ``optim``) holds its ops'
forward and backward and registers them here with ``@implements``; the dispatch mode
(:mod:`pamtorch.mode`), the audit and ``convert`` all read this one table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import arith
from ..config import Config, OpConfig

__all__ = ["OP_TABLE", "PASS_THROUGH", "UnsupportedOpError", "implements", "passes_through", "op_kind"]

aten = torch.ops.aten


class UnsupportedOpError(RuntimeError):
    """A floating-point op that may multiply and that pamtorch cannot route to PA."""


@dataclass(frozen=True)
class _Entry:
    kind: str
    impl: Callable


OP_TABLE: dict = {}


def implements(ops, kind: str):
    """Register ``impl(func, args, kwargs, opcfg)`` as the PA version of aten ``ops``
    (overload packets); ``kind`` is the config field that decides whether it runs PA."""
    def deco(fn):
        for op in ops:
            OP_TABLE[op] = _Entry(kind, fn)
        return fn
    return deco


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
    _unsafe_index _unsafe_index_put index_copy index_copy_ masked_scatter expand_as
    diagonal diag_embed movedim _pin_memory pin_memory
    upsample_nearest2d to result_type lift_fresh_copy view_as type_as item select_backward
    slice_backward diagonal_backward as_strided_scatter _unsafe_view_copy repeat_interleave
    eye empty_permuted
""")

# the config of the innermost active PAMode, for implementations that span op kinds
ACTIVE: list = [Config.paper()]


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


def pam(a, b, opcfg: OpConfig | None = None):
    """PAM of tensors or Python numbers, with ``opcfg``'s offset if it has one."""
    if isinstance(b, (int, float)) and b == 1:
        return a
    if isinstance(a, (int, float)) and a == 1:
        return b
    a, b = promote(a, b)
    out = arith.pam(a, b)
    if opcfg is not None and opcfg.offset is not None:
        out = arith.pam(out, torch.tensor(opcfg.offset, dtype=out.dtype, device=out.device))
    return out


def pad(a, b):
    """PAD of tensors or Python numbers."""
    if isinstance(b, (int, float)) and b == 1:
        return a
    a, b = promote(a, b)
    return arith.pad(a, b)


def inplace(func, args, out):
    """Write ``out`` into the first argument for in-place overloads (name ends in ``_``)."""
    if func.overloadpacket.__name__.endswith("_"):
        return args[0].copy_(out)
    return out


def scale(x, s):
    """alpha/beta style scalar factor: x itself when s == 1."""
    return x if s == 1 else pam(x, s)
