"""Reductions that multiply: variance and standard deviation (``var``, ``std``, ``var_mean``,
``std_mean``), ``logsumexp`` and the p-norm ``norm``, forward only; ``nansum`` passes.

Their backward formulas are torch's (``var_backward``, ``std_backward``,
``logsumexp_backward``, ``norm_backward``), written in aten ``mul``/``div``/``exp``/``pow``/
``sub``/``mean`` calls that the mode routes on their own, so the approx derivative comes
for free.
"""
from __future__ import annotations

import math

import torch

from .. import arith
from ..nn.functional import _RAW, _c
from .elementwise import norm2
from .table import implements, aten, arg, passes_through

__all__ = ["var_forward", "logsumexp_forward", "norm_forward"]

passes_through("nansum")   # a sum that skips NaN; nanmean is nansum ÷̂ count, a routed div


def _dims(x: torch.Tensor, dim) -> tuple:
    """The reduced dims as a tuple; None or [] mean all of them (as aten's ``int[1]? dim``)."""
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return tuple(range(x.dim()))
    return (dim,) if isinstance(dim, int) else tuple(dim)


def var_forward(x: torch.Tensor, dim=None, correction=None, keepdim: bool = False, *, _ops=_RAW):
    """``(var, mean)``: ``mean = Σx ÷̂ n``, ``var = Σ (x-mean) ⊙̂ (x-mean) ÷̂ max(0, n - c)``.

    ``c`` (``correction``) defaults to 1; ``n`` is the number of reduced elements. A divisor
    of 0 gives inf (NaN for an all-equal or empty input), as torch. Both outputs keep the
    reduced dims when ``keepdim``.
    """
    dims = _dims(x, dim)
    n = math.prod(x.shape[d] for d in dims)
    c = 1.0 if correction is None else float(correction)
    mean = _ops.div(x.sum(dims, keepdim=True), _c(n, x))
    xc = x - mean
    var = _ops.div(_ops.mul(xc, xc).sum(dims, keepdim=keepdim), _c(max(0.0, n - c), x))
    return var, (mean if keepdim or not dims else mean.squeeze(dims))


def logsumexp_forward(x: torch.Tensor, dim, keepdim: bool = False, *, _ops=_RAW):
    """``m + pa_log(Σ pa_exp(x - m))`` with ``m = max`` along ``dim`` (``m`` set to 0 where it
    is ±inf, as torch, so a row of -inf gives -inf and a row holding +inf gives +inf)."""
    dims = _dims(x, dim)
    if x.numel() == 0:
        return _ops.log(_ops.exp(x).sum(dims, keepdim=keepdim))
    m = x.amax(dims, keepdim=True)
    m = torch.where(m.abs() == math.inf, torch.zeros_like(m), m)
    s = _ops.log(_ops.exp(x - m).sum(dims, keepdim=True)) + m
    return s if keepdim else s.squeeze(dims)


def norm_forward(x: torch.Tensor, p=2.0, dim=None, keepdim: bool = False) -> torch.Tensor:
    """The p-norm along ``dim``: ``pa_sqrt(Σ x ⊙̂ x)`` for p = 2; for p = 1, ±inf and 0 the
    sum, max, min and count of ``|x|`` (no product); else ``pa_pow(Σ pa_pow(|x|, p), 1/p)``."""
    dims = _dims(x, dim)
    p = 2.0 if p is None else float(p)
    a = x.abs()
    if p == 2:
        return norm2(x, dims, keepdim)
    if p == 1:
        return a.sum(dims, keepdim=keepdim)
    if p == math.inf:
        return a.amax(dims, keepdim=keepdim)
    if p == -math.inf:
        return a.amin(dims, keepdim=keepdim)
    if p == 0:
        return (x != 0).sum(dims, keepdim=keepdim).to(x.dtype)
    return arith.pa_pow(arith.pa_pow(a, p).sum(dims, keepdim=keepdim), 1.0 / p)


def _float_input(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


@implements([aten.var, aten.std, aten.var_mean, aten.std_mean], "elementwise")
def _pa_var(func, args, kwargs, cfg):
    """var / std / var_mean / std_mean (``.correction``; the ``.dim`` and ``unbiased``
    overloads decompose into it). std is ``pa_sqrt(var)``."""
    x = _float_input(args[0])
    var, mean = var_forward(x, arg(args, kwargs, 1, "dim"), kwargs.get("correction"),
                            kwargs.get("keepdim", False))
    name = func.overloadpacket.__name__
    first = arith.pa_sqrt(var) if name.startswith("std") else var
    return (first, mean) if name.endswith("_mean") else first


@implements([aten.logsumexp], "softmax")
def _pa_logsumexp(func, args, kwargs, cfg):
    """logsumexp, kind "softmax": it is log-softmax's normalizer, computed by the same PA ops,
    so one config switch leaves both exact or both PA."""
    x = _float_input(args[0])
    return logsumexp_forward(x, arg(args, kwargs, 1, "dim"), arg(args, kwargs, 2, "keepdim", False))


@implements([aten.norm], "elementwise")
def _pa_norm(func, args, kwargs, cfg):
    """``torch.norm`` and ``F.pairwise_distance`` / ``triplet_margin_loss`` (which reach it),
    every ``Scalar``/``ScalarOpt`` overload; ``dtype`` casts the input first, as torch."""
    x = _float_input(args[0])
    dtype = kwargs.get("dtype")
    if dtype is not None:
        x = x.to(dtype)
    return norm_forward(x, arg(args, kwargs, 1, "p", 2.0), arg(args, kwargs, 2, "dim"),
                        arg(args, kwargs, 3, "keepdim", False))
