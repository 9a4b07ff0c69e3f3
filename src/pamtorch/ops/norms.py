"""Normalisation layers: layer, batch, group, instance and RMS norm, forward and backward.

Layer and RMS norm live in :mod:`pamtorch.nn.functional`; batch and group norm are here,
in the same two layers:

* raw functions, whose signatures and outputs follow the aten ops, evaluated with PA ops
  only (``pam``, ``pad``, ``pa_rsqrt``, additions, sums). Each forward is written once on
  an ``_ops`` namespace: ``_RAW`` for the dispatch mode, ``_GradOps("exact"/"ste")`` so
  that autograd over it gives the exact derivative of the PA function. The backward
  functions are the *approx* derivative: the derivative formula of the exact block
  evaluated with PA ops.
* autograd functionals with ``F.batch_norm`` / ``F.group_norm`` / ``F.instance_norm``
  signatures plus ``derivative=``.

=========================================================  ===============================
aten op (all overloads, ``.out`` included)                  raw function
=========================================================  ===============================
``native_batch_norm``, ``_native_batch_norm_legit`` (and    ``batch_norm_forward``
``.no_stats``, ``_no_training``, ``_functional``),
``_batch_norm_with_update`` (and ``_functional``),
``_batch_norm_no_update``, ``cudnn_batch_norm``,
``miopen_batch_norm``
``native_batch_norm_backward``, ``batch_norm_backward``,    ``batch_norm_backward``
``cudnn_batch_norm_backward``, ``miopen_batch_norm_backward``
``native_group_norm``                                       ``group_norm_forward``
``native_group_norm_backward``                              ``group_norm_backward``
``native_layer_norm`` / ``_backward``                       ``PF.layer_norm_forward`` / ``_backward``
``_fused_rms_norm`` / ``_backward``                         ``PF.rms_norm_forward`` / ``_backward``
=========================================================  ===============================

Instance norm has no aten op of its own below autograd: ``aten.instance_norm`` reshapes
to ``(1, N·C, ...)`` and calls batch norm. ``aten.rms_norm`` is composite as well: on CPU
it decomposes into pow/mean/rsqrt/mul (the elementwise kind), on CUDA into
``_fused_rms_norm``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .. import arith
from ..autograd import resolve_derivative
from ..nn import functional as PF
from ..nn.functional import _RAW, _GradOps, _c
from .table import aten, arg, implements

__all__ = ["batch_norm_forward", "batch_norm_backward", "group_norm_forward", "group_norm_backward",
           "batch_norm", "group_norm", "instance_norm"]


# ---------------------------------------------------------------------------
# batch norm

def _channels(x: torch.Tensor, op: str):
    """(C, reduction dims, per-channel broadcast shape, values per channel) of an
    ``(N, C, *)`` input."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"pamtorch {op}: 'input' must be a tensor of shape (N, C, *), got {got}")
    c = x.shape[1]
    dims = (0,) + tuple(range(2, x.dim()))
    return c, dims, (1, c) + (1,) * (x.dim() - 2), x.numel() // max(c, 1)


def _per_channel(t: Optional[torch.Tensor], c: int, shape, like: torch.Tensor, name: str, op: str):
    """A per-channel parameter or statistic as a broadcastable tensor of ``like``'s dtype."""
    if t is None:
        return None
    if t.numel() != c:
        raise ValueError(f"pamtorch {op}: '{name}' must have {c} elements (one per channel), "
                         f"got shape {tuple(t.shape)}")
    return t.to(like.dtype).reshape(shape)


def _update_running(running_mean, running_var, mean, ssq, n: int, momentum: float):
    """``running += momentum ⊙̂ (batch - running)`` in place, with the unbiased batch
    variance ``Σ(x - mean)² ÷̂ (n - 1)`` (torch's ``(1-m)·running + m·batch``)."""
    with torch.no_grad():
        if running_mean is not None:
            batch = mean.detach().reshape(-1).to(running_mean.dtype)
            running_mean.add_(arith.pam(_c(momentum, running_mean), batch - running_mean))
        if running_var is not None:
            s = ssq.detach().reshape(-1).to(running_var.dtype)
            batch = arith.pad(s, _c(n - 1, s))
            running_var.add_(arith.pam(_c(momentum, running_var), batch - running_var))


def batch_norm_forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                       training: bool, momentum: float, eps: float, *, _ops=_RAW):
    """PA batch norm over dim 1 of ``(N, C, *)``, ``(y, save_mean, save_invstd)`` like
    ``aten.native_batch_norm``.

    Training: ``mean = Σx ÷̂ n``, ``invstd = pa_rsqrt(Σ(x-mean)⊙̂(x-mean) ÷̂ n + eps)`` over
    the ``n`` values of each channel, and the running statistics, when given, are updated
    in place (:func:`_update_running`). Eval: ``mean``/``invstd`` from the running
    statistics; ``save_mean``/``save_invstd`` are empty on CPU, else the running mean and
    the invstd (as aten). Both: ``y = (x - mean) ⊙̂ (invstd ⊙̂ w) + b`` (``w`` is constant
    over a channel, so it folds into the per-channel scale).
    """
    c, dims, shape, n = _channels(x, "batch_norm")
    if training:
        nt = _c(n, x)
        mean = _ops.div(x.sum(dims, keepdim=True), nt)
        xc = x - mean
        ssq = _ops.mul(xc, xc).sum(dims, keepdim=True)
        invstd = _ops.rsqrt(_ops.div(ssq, nt) + eps)
        _update_running(running_mean, running_var, mean, ssq, n, momentum)
        save_mean, save_invstd = mean.reshape(c), invstd.reshape(c)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("pamtorch batch_norm: eval mode (training=False) needs 'running_mean' "
                             "and 'running_var'; got None")
        mean = _per_channel(running_mean, c, shape, x, "running_mean", "batch_norm")
        invstd = _ops.rsqrt(_per_channel(running_var, c, shape, x, "running_var", "batch_norm") + eps)
        xc = x - mean
        if x.device.type == "cpu":
            save_mean, save_invstd = x.new_empty(0), x.new_empty(0)
        else:
            save_mean, save_invstd = mean.reshape(c), invstd.reshape(c)
    w = _per_channel(weight, c, shape, x, "weight", "batch_norm")
    y = _ops.mul(xc, invstd if w is None else _ops.mul(invstd, w))
    if bias is not None:
        y = y + _per_channel(bias, c, shape, x, "bias", "batch_norm")
    return y, save_mean, save_invstd


def batch_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                        running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                        save_mean: Optional[torch.Tensor], save_invstd: Optional[torch.Tensor],
                        train: bool, eps: float, output_mask: Sequence[bool] = (True, True, True)):
    """Approx batch-norm derivative, ``(dx, dw, db)`` like ``aten.native_batch_norm_backward``.

    With ``x̂ = (x - mean) ⊙̂ invstd``, ``k = invstd ⊙̂ w``, per-channel sums ``Σdy`` and
    ``Σ dy⊙̂x̂``: ``db = Σdy``, ``dw = Σ dy⊙̂x̂``, and ``dx = k ⊙̂ (dy - Σdy ÷̂ n - x̂ ⊙̂ (Σ
    dy⊙̂x̂ ÷̂ n))`` in training (batch statistics), ``dx = dy ⊙̂ k`` in eval (running
    statistics, ``invstd = pa_rsqrt(running_var + eps)``). Entries are None where
    ``output_mask`` is False.
    """
    c, dims, shape, n = _channels(x, "batch_norm_backward")
    dy = dy.to(x.dtype)
    if train:
        mean = _per_channel(save_mean, c, shape, x, "save_mean", "batch_norm_backward")
        invstd = _per_channel(save_invstd, c, shape, x, "save_invstd", "batch_norm_backward")
    else:
        mean = _per_channel(running_mean, c, shape, x, "running_mean", "batch_norm_backward")
        invstd = arith.pa_rsqrt(_per_channel(running_var, c, shape, x, "running_var",
                                             "batch_norm_backward") + eps)
    w = _per_channel(weight, c, shape, x, "weight", "batch_norm_backward")
    k = invstd if w is None else arith.pam(invstd, w)
    need_dx, need_dw, need_db = (list(output_mask) + [False] * 3)[:3]
    xhat = s_dyx = None
    if need_dw or (need_dx and train):
        xhat = arith.pam(x - mean, invstd)
        s_dyx = arith.pam(dy, xhat).sum(dims, keepdim=True)
    s_dy = dy.sum(dims, keepdim=True) if (need_db or (need_dx and train)) else None
    dx = dw = db = None
    if need_dx:
        if train:
            nt = _c(n, x)
            dx = arith.pam(k, dy - arith.pad(s_dy, nt) - arith.pam(xhat, arith.pad(s_dyx, nt)))
        else:
            dx = arith.pam(dy, k)
    pdtype = x.dtype if weight is None else weight.dtype
    if need_dw:
        dw = s_dyx.reshape(c).to(pdtype)
    if need_db:
        db = s_dy.reshape(c).to(pdtype)
    return dx, dw, db


# ---------------------------------------------------------------------------
# group norm

def _groups(x: torch.Tensor, n: int, c: int, hxw: int, group: int, op: str) -> int:
    """Channels per group, after checking the aten size arguments against ``x``."""
    if group <= 0 or c % group:
        raise ValueError(f"pamtorch {op}: the number of channels C={c} must be divisible by "
                         f"the number of groups, got group={group}")
    if x.numel() != n * c * hxw or (x.dim() >= 2 and (x.shape[0] != n or x.shape[1] != c)):
        raise ValueError(f"pamtorch {op}: input of shape {tuple(x.shape)} does not match "
                         f"N={n}, C={c}, HxW={hxw}")
    return c // group


def group_norm_forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       N: int, C: int, HxW: int, group: int, eps: float, *, _ops=_RAW):
    """PA group norm, ``(y, mean, rstd)`` like ``aten.native_group_norm`` (``mean``/``rstd``
    of shape ``(N, group)``).

    Over the ``n = C/group · HxW`` values of each (sample, group): ``mean = Σx ÷̂ n``,
    ``rstd = pa_rsqrt(Σ(x-mean)⊙̂(x-mean) ÷̂ n + eps)``, ``y = (x - mean) ⊙̂ (rstd ⊙̂ w) + b``
    (one scale per sample and channel).
    """
    cg = _groups(x, N, C, HxW, group, "group_norm")
    xg = x.reshape(N, group, cg * HxW)
    nt = _c(cg * HxW, x)
    mean = _ops.div(xg.sum(-1, keepdim=True), nt)
    xc = (xg - mean).reshape(N, group, cg, HxW)
    rstd = _ops.rsqrt(_ops.div(_ops.mul(xc, xc).sum((2, 3), keepdim=True), nt) + eps)  # (N, G, 1, 1)
    scale = rstd if weight is None else _ops.mul(rstd, weight.to(x.dtype).reshape(1, group, cg, 1))
    y = _ops.mul(xc, scale)
    if bias is not None:
        y = y + bias.to(x.dtype).reshape(1, group, cg, 1)
    return y.reshape(x.shape), mean.reshape(N, group), rstd.reshape(N, group)


def group_norm_backward(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                        weight: Optional[torch.Tensor], N: int, C: int, HxW: int, group: int,
                        output_mask: Sequence[bool] = (True, True, True)):
    """Approx group-norm derivative, ``(dx, dw, db)`` like ``aten.native_group_norm_backward``.

    With ``x̂ = (x - mean) ⊙̂ rstd``, per (sample, channel) sums ``p = Σ dy⊙̂x̂``, ``q = Σdy``
    and their group means ``a = Σ_c w⊙̂q ÷̂ n``, ``b = Σ_c w⊙̂p ÷̂ n`` (the means of
    ``g = dy⊙̂w`` and ``g⊙̂x̂`` over the group): ``dx = dy ⊙̂ (rstd⊙̂w) - x̂ ⊙̂ (rstd⊙̂b) -
    rstd⊙̂a`` (= ``rstd ⊙̂ (g - a - x̂ ⊙̂ b)``), ``dw = Σ_N p``, ``db = Σ_N q``.
    """
    cg = _groups(x, N, C, HxW, group, "group_norm_backward")
    x4 = x.reshape(N, group, cg, HxW)
    dy4 = dy.to(x.dtype).reshape(N, group, cg, HxW)
    mean4 = mean.to(x.dtype).reshape(N, group, 1, 1)
    rstd4 = rstd.to(x.dtype).reshape(N, group, 1, 1)
    need_dx, need_dw, need_db = (list(output_mask) + [False] * 3)[:3]
    xhat = arith.pam(x4 - mean4, rstd4)
    p = arith.pam(dy4, xhat).sum(-1, keepdim=True)        # (N, G, C/G, 1)
    q = dy4.sum(-1, keepdim=True)
    dx = dw = db = None
    if need_dx:
        if weight is None:
            gp, gq, k = p, q, rstd4
        else:
            w4 = weight.to(x.dtype).reshape(1, group, cg, 1)
            gp, gq, k = arith.pam(p, w4), arith.pam(q, w4), arith.pam(rstd4, w4)
        nt = _c(cg * HxW, x)
        a = arith.pad(gq.sum(2, keepdim=True), nt)
        b = arith.pad(gp.sum(2, keepdim=True), nt)
        dx = (arith.pam(dy4, k) - arith.pam(xhat, arith.pam(rstd4, b)) - arith.pam(rstd4, a)).reshape(x.shape)
    pdtype = x.dtype if weight is None else weight.dtype
    if need_dw:
        dw = p.sum(0).reshape(C).to(pdtype)
    if need_db:
        db = q.sum(0).reshape(C).to(pdtype)
    return dx, dw, db


# ---------------------------------------------------------------------------
# the op table

def _with_reserve(out, x):
    """aten's 4-output batch norms add a cuDNN reserve buffer; PA needs none."""
    return (*out, torch.empty(0, dtype=torch.uint8, device=x.device))


@implements([aten.native_batch_norm, aten._native_batch_norm_legit], "norm")
def _pa_batch_norm(func, args, kwargs, cfg):
    if func._overloadname.startswith("no_stats"):   # (x, w, b, training, momentum, eps)
        x, w, b, training, momentum, eps = args[:6]
        return batch_norm_forward(x, w, b, None, None, training, momentum, eps)
    return batch_norm_forward(*args[:8])


@implements([aten._native_batch_norm_legit_no_training], "norm")
def _pa_batch_norm_no_training(func, args, kwargs, cfg):
    x, w, b, rm, rv, momentum, eps = args[:7]
    return batch_norm_forward(x, w, b, rm, rv, False, momentum, eps)


@implements([aten._native_batch_norm_legit_functional], "norm")
def _pa_batch_norm_functional(func, args, kwargs, cfg):
    x, w, b, rm, rv, training, momentum, eps = args[:8]
    rm, rv = rm.clone(), rv.clone()
    return (*batch_norm_forward(x, w, b, rm, rv, training, momentum, eps), rm, rv)


@implements([aten._batch_norm_with_update, aten._batch_norm_no_update], "norm")
def _pa_batch_norm_update(func, args, kwargs, cfg):
    x, w, b, rm, rv, momentum, eps = args[:7]
    training = func.overloadpacket is aten._batch_norm_with_update
    return _with_reserve(batch_norm_forward(x, w, b, rm, rv, training, momentum, eps), x)


@implements([aten._batch_norm_with_update_functional], "norm")
def _pa_batch_norm_update_functional(func, args, kwargs, cfg):
    x, w, b, rm, rv, momentum, eps = args[:7]
    rm, rv = rm.clone(), rv.clone()
    return (*_with_reserve(batch_norm_forward(x, w, b, rm, rv, True, momentum, eps), x), rm, rv)


@implements([getattr(aten, n) for n in ("cudnn_batch_norm", "miopen_batch_norm") if hasattr(aten, n)], "norm")
def _pa_batch_norm_vendor(func, args, kwargs, cfg):
    out = batch_norm_forward(*args[:8])
    return _with_reserve(out, args[0]) if func.overloadpacket is aten.cudnn_batch_norm else out


@implements([aten.native_batch_norm_backward], "norm")
def _pa_batch_norm_backward(func, args, kwargs, cfg):
    return batch_norm_backward(*args[:10])


@implements([aten.batch_norm_backward], "norm")
def _pa_batch_norm_backward_update(func, args, kwargs, cfg):
    # (dy, x, w, running_mean, running_var, save_mean, save_invstd, update, eps, mask, reserve)
    return batch_norm_backward(*args[:10])


@implements([getattr(aten, n) for n in ("cudnn_batch_norm_backward", "miopen_batch_norm_backward")
             if hasattr(aten, n)], "norm")
def _pa_batch_norm_backward_vendor(func, args, kwargs, cfg):
    # (x, dy, w, running_mean, running_var, save_mean, save_invstd, eps[, reserve]):
    # autograd calls these only in training, with every gradient wanted
    x, dy, w, rm, rv, sm, si, eps = args[:8]
    return batch_norm_backward(dy, x, w, rm, rv, sm, si, True, eps)


@implements([aten.native_group_norm], "norm")
def _pa_group_norm(func, args, kwargs, cfg):
    return group_norm_forward(*args[:8])


@implements([aten.native_group_norm_backward], "norm")
def _pa_group_norm_backward(func, args, kwargs, cfg):
    return group_norm_backward(*args[:10])


@implements([aten.native_layer_norm], "norm")
def _pa_layer_norm(func, args, kwargs, cfg):
    x, shape, weight, bias, eps = args[:5]
    return PF.layer_norm_forward(x, tuple(shape), weight, bias, eps)


@implements([aten.native_layer_norm_backward], "norm")
def _pa_layer_norm_backward(func, args, kwargs, cfg):
    dy, x, shape, mean, rstd, weight, bias, mask = args[:8]
    return PF.layer_norm_backward(dy, x, tuple(shape), mean, rstd, weight, bias, mask)


@implements([aten._fused_rms_norm], "norm")
def _pa_fused_rms_norm(func, args, kwargs, cfg):
    x, shape, weight = args[:3]
    return PF.rms_norm_forward(x, tuple(shape), weight, arg(args, kwargs, 3, "eps"))


@implements([aten._fused_rms_norm_backward], "norm")
def _pa_fused_rms_norm_backward(func, args, kwargs, cfg):
    dy, x, shape, rstd, weight, mask = args[:6]
    return PF.rms_norm_backward(dy, x, tuple(shape), rstd, weight, mask)


# ---------------------------------------------------------------------------
# autograd functionals (derivative kinds at the function level, as for PF.layer_norm)

class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, training, momentum, eps):
        y, save_mean, save_invstd = batch_norm_forward(x, weight, bias, running_mean, running_var,
                                                       training, momentum, eps)
        ctx.training, ctx.eps = training, eps
        # training uses the batch statistics; the running ones change with the next step
        stats = (None, None) if training else (running_mean, running_var)
        ctx.save_for_backward(x, weight, *stats, save_mean, save_invstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rm, rv, sm, si = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db = batch_norm_backward(dy, x, weight, rm, rv, sm, si, ctx.training, ctx.eps,
                                         (need[0], need[3], need[4]))
        return dx, None, None, dw, db, None, None, None


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps):
        n, c = x.shape[0], x.shape[1]
        hxw = math.prod(x.shape[2:])
        y, mean, rstd = group_norm_forward(x, weight, bias, n, c, hxw, num_groups, eps)
        ctx.sizes = (n, c, hxw, num_groups)
        ctx.save_for_backward(x, mean, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean, rstd, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db = group_norm_backward(dy, x, mean, rstd, weight, *ctx.sizes,
                                         (need[0], need[2], need[3]))
        return dx, None, dw, db, None


def _check_param(t, name, op):
    if t is not None:
        PF._check_float(t, op, name)


def batch_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
               weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
               derivative: str | None = None) -> torch.Tensor:
    """PA batch norm with ``F.batch_norm`` semantics (see :func:`batch_norm_forward`); the
    running statistics are updated in place when ``training``."""
    PF._check_float(input, "batch_norm")
    for t, name in ((weight, "weight"), (bias, "bias")):
        _check_param(t, name, "batch_norm")
    c, _, _, n = _channels(input, "batch_norm")
    if training and n == 1:
        raise ValueError(f"pamtorch batch_norm: expected more than 1 value per channel when "
                         f"training, got input size {tuple(input.shape)}")
    kind = resolve_derivative(derivative)
    if kind == "approx":
        return _BatchNorm.apply(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return batch_norm_forward(input, weight, bias, running_mean, running_var, training, momentum, eps,
                              _ops=_GradOps(kind))[0]


def group_norm(input: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5, *,
               derivative: str | None = None) -> torch.Tensor:
    """PA group norm with ``F.group_norm`` semantics (see :func:`group_norm_forward`)."""
    PF._check_float(input, "group_norm")
    for t, name in ((weight, "weight"), (bias, "bias")):
        _check_param(t, name, "group_norm")
    _channels(input, "group_norm")
    kind = resolve_derivative(derivative)
    if kind == "approx":
        return _GroupNorm.apply(input, num_groups, weight, bias, eps)
    n, c = input.shape[0], input.shape[1]
    return group_norm_forward(input, weight, bias, n, c, math.prod(input.shape[2:]), num_groups, eps,
                              _ops=_GradOps(kind))[0]


def instance_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor] = None,
                  running_var: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5, *, derivative: str | None = None) -> torch.Tensor:
    """PA instance norm with ``F.instance_norm`` semantics: batch norm of the input viewed
    as ``(1, N·C, *)``, as ``aten.instance_norm`` does; running statistics (when given and
    ``use_input_stats``) get the mean over the batch of the per-instance updates
    (``Σ_N ÷̂ N``)."""
    PF._check_float(input, "instance_norm")
    _channels(input, "instance_norm")
    n, c = input.shape[0], input.shape[1]

    def rep(t):
        return None if t is None else t.repeat(n)

    rm, rv = rep(running_mean), rep(running_var)
    y = batch_norm(input.reshape(1, n * c, *input.shape[2:]), rm, rv, rep(weight), rep(bias),
                   use_input_stats, momentum, eps, derivative=derivative)
    if use_input_stats:
        with torch.no_grad():
            for run, per_instance in ((running_mean, rm), (running_var, rv)):
                if run is not None:
                    run.copy_(arith.pad(per_instance.reshape(n, c).sum(0), _c(n, per_instance)))
    return y.reshape(input.shape)
