"""Who is told of the PA arithmetic that runs: the recorders of :func:`pamtorch.audit`.

pamtorch's own PA entry points (the elementwise ops of :mod:`pamtorch.arith`, the matrix
product kernels of :mod:`pamtorch.kernels`) are decorated with :func:`recorded`. The
compiled kernels are Python bindings that no dispatch mode sees, so these entry points
report themselves: a recorder learns of every PA product that ran, whether it came from
an op the mode routed, a function-level route (``F.scaled_dot_product_attention``, the
exact-derivative paths), a ``pamtorch.nn`` module or a direct ``pamtorch.matmul`` call.

Each product is counted once: only the outermost entry point reports (``pa_reciprocal``
calls ``pad``: one report). Inside an aten op that the dispatch mode routed (see
:func:`routing`) the entry points report their multiplications only, with
``inside=True``: the mode reports the op itself, so the audit's table lists ``addmm``
once while its energy estimate counts the M·N·K products its kernel ran.

This module sits below :mod:`pamtorch.arith` and imports nothing from pamtorch.
"""
from __future__ import annotations

import contextlib
import functools
import threading

__all__ = ["RECORDERS", "recorded", "routing", "exact_by_request", "by_request", "elementwise_count",
           "product_count"]

# objects with ``routed(func, args, kwargs, out)`` (an aten op the mode routed) and
# ``kernel(name, kind, n, inside)`` (a PA entry point that ran ``n`` multiplications,
# ``inside`` a routed op or not); they decide themselves which threads they listen to
RECORDERS: list = []

_local = threading.local()


def _depth() -> int:
    return getattr(_local, "depth", 0)


@contextlib.contextmanager
def routing():
    """The dispatch mode runs the PA implementation of one aten op inside: entry points
    report with ``inside=True``."""
    _local.routed = getattr(_local, "routed", 0) + 1
    try:
        yield
    finally:
        _local.routed -= 1


@contextlib.contextmanager
def exact_by_request():
    """The aten op run inside runs exact because ``pamtorch.mode(leave_exact=...)`` or the
    config asked for it; a recorder files it as "left exact by request"."""
    _local.exact = getattr(_local, "exact", 0) + 1
    try:
        yield
    finally:
        _local.exact -= 1


def by_request() -> bool:
    """Whether the current thread runs an op inside :func:`exact_by_request`."""
    return getattr(_local, "exact", 0) > 0


def elementwise_count(args, out) -> int:
    """One multiplication per output element."""
    return out.numel()


def product_count(args, out) -> int:
    """a[..., M, K] @ b[..., K, N] (and its gradients, which take a and b first):
    B·M·K·N multiplications."""
    a, b = args[0], args[1]
    return a.numel() * b.shape[-1]


def recorded(name: str, kind: str, count=elementwise_count):
    """Decorate a PA entry point: when a recorder listens and no PA entry point up the
    stack reports the same work, tell it ``kernel(name, kind, count(args, out), inside)``.
    ``kind`` is "matmul" for matrix products (they also pay an fp32 add per product),
    "other" for the rest."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not RECORDERS:
                return fn(*args, **kwargs)
            depth = _depth()
            _local.depth = depth + 1
            try:
                out = fn(*args, **kwargs)
            finally:
                _local.depth = depth
            if depth == 0:
                n, inside = count(args, out), getattr(_local, "routed", 0) > 0
                for rec in list(RECORDERS):
                    rec.kernel(name, kind, n, inside)
            return out
        return wrapper
    return deco
