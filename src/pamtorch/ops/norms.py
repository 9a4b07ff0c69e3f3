"""Normalisation layers: layer norm, forward and backward."""
from __future__ import annotations

from ..nn import functional as PF
from .table import implements, aten


@implements([aten.native_layer_norm], "norm")
def _pa_layer_norm(func, args, kwargs, cfg):
    x, shape, weight, bias, eps = args[:5]
    return PF.layer_norm_forward(x, tuple(shape), weight, bias, eps)


@implements([aten.native_layer_norm_backward], "norm")
def _pa_layer_norm_backward(func, args, kwargs, cfg):
    dy, x, shape, mean, rstd, weight, bias, mask = args[:8]
    return PF.layer_norm_backward(dy, x, tuple(shape), mean, rstd, weight, bias, mask)
