"""Losses: log-softmax, NLL, MSE, forward and backward."""
from __future__ import annotations

from ..nn import functional as PF
from .table import implements, aten, arg


@implements([aten._log_softmax], "loss")
def _pa_log_softmax(func, args, kwargs, cfg):
    x, dim, half_to_float = args[:3]
    return PF.log_softmax_forward(x.float() if half_to_float else x, dim)


@implements([aten._log_softmax_backward_data], "loss")
def _pa_log_softmax_backward(func, args, kwargs, cfg):
    dy, y, dim, input_dtype = args[:4]
    return PF.log_softmax_backward(y, dy, dim).to(input_dtype)


@implements([aten.nll_loss_forward, aten.nll_loss2d_forward], "loss")
def _pa_nll_forward(func, args, kwargs, cfg):
    logp, target, weight, reduction, ignore_index = args[:5]
    return PF.nll_loss_forward(logp, target, weight, reduction, ignore_index)


@implements([aten.nll_loss_backward, aten.nll_loss2d_backward], "loss")
def _pa_nll_backward(func, args, kwargs, cfg):
    dy, logp, target, weight, reduction, ignore_index, total = args[:7]
    return PF.nll_loss_backward(dy, logp, target, weight, reduction, ignore_index, total)


@implements([aten.mse_loss], "loss")
def _pa_mse(func, args, kwargs, cfg):
    return PF.mse_loss_forward(args[0], args[1], arg(args, kwargs, 2, "reduction", 1))


@implements([aten.mse_loss_backward], "loss")
def _pa_mse_backward(func, args, kwargs, cfg):
    dy, x, target, reduction = args[:4]
    return PF.mse_loss_backward(dy, x, target, reduction)
