"""Helpers shared by the compiled-kernel tests (test_kernels_fused.py,
test_kernels_fused_norm.py, test_lowp_fast.py): run the pure-torch composition, compare bit
patterns, and count a kernel's calls."""
from __future__ import annotations

import torch

from pamtorch import arith
from pamtorch.kernels import cpu

_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def composition(fn, *args, **kwargs):
    """``fn`` with every compiled kernel off: the Python composition on pure-torch PA ops."""
    old = arith._COMPILED
    arith._COMPILED = False
    try:
        return fn(*args, **kwargs)
    finally:
        arith._COMPILED = old


def same_bits(x, y, layout=False):
    """Assert equal bit patterns (signed zeros and NaN payloads told apart) of two tensors, or
    of two tuples/lists of tensors and Nones, element by element. ``layout``: the strides of
    the non-trivial dimensions too (later reductions over a result sum in its memory order)."""
    if isinstance(x, (tuple, list)):
        assert isinstance(y, (tuple, list)) and len(x) == len(y), (x, y)
        for a, b in zip(x, y):
            same_bits(a, b, layout)
        return
    if x is None or y is None:
        assert x is None and y is None, (x, y)
        return
    assert x.dtype == y.dtype and x.dtype in _BITS and x.shape == y.shape, (x.dtype, y.dtype, x.shape, y.shape)
    if layout:
        assert [st for st, n in zip(x.stride(), x.shape) if n > 1] == \
            [st for st, n in zip(y.stride(), y.shape) if n > 1], (x.stride(), y.stride())
    bits = _BITS[x.dtype]
    bad = x.view(bits) != y.view(bits)
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} differ, e.g. {x[bad][:4].tolist()} "
                           f"(patterns {x.view(bits)[bad][:4].tolist()}) vs {y[bad][:4].tolist()} "
                           f"(patterns {y.view(bits)[bad][:4].tolist()})")


def spy(monkeypatch, name, ext=None):
    """Count the calls of the compiled extension's (or ``ext``'s) ``name`` that computed
    something (a kernel returns None, or only Nones, for layouts it does not take), so a test
    knows it ran."""
    ext = ext if ext is not None else cpu.load_extension()
    calls = []
    real = getattr(ext, name)

    def call(*a):
        out = real(*a)
        if any(t is not None for t in (out if isinstance(out, tuple) else (out,))):
            calls.append(1)
        return out
    monkeypatch.setattr(ext, name, call)
    return calls
