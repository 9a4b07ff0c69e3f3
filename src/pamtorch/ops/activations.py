"""Activations: GELU, forward and backward."""
from __future__ import annotations

from ..nn import functional as PF
from .table import implements, aten


@implements([aten.gelu], "nonlinear")
def _pa_gelu(func, args, kwargs, cfg):
    return PF.gelu_forward(args[0])


@implements([aten.gelu_backward], "nonlinear")
def _pa_gelu_backward(func, args, kwargs, cfg):
    return PF.gelu_backward(args[0], args[1])
