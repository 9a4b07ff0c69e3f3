"""Losses, forward and backward: log-softmax, NLL, MSE (their raw functions live in
:mod:`pamtorch.nn.functional`), and here binary cross entropy (on probabilities and on
logits), smooth L1, Huber, soft margin, multi-class margin, and ``xlogy`` (which ``kl_div``
reaches), ``special.xlog1py`` and ``special.entr``, plus ``sgn`` (which the backward of
``l1_loss`` reaches).

``l1_loss`` and ``kl_div`` have no aten op of their own: they decompose into ``abs``/``sub``/
``mean`` and ``xlogy``/``exp``/``mul``/``sum``, which route as "elementwise"; "batchmean" is a
Python division by the batch size, a routed ``div``. The backward of
``binary_cross_entropy_with_logits`` is torch's decomposition (``sigmoid``, ``mul``, ``sub``,
``div``), routed op by op.
"""
from __future__ import annotations

import math

import torch

from .. import arith
from ..nn import functional as PF
from ..nn.functional import _RAW, _c, _reduction
from .table import UnsupportedOpError, implements, aten, arg, inplace, promote

__all__ = ["bce_forward", "bce_backward", "bce_with_logits_forward", "smooth_l1_forward",
           "smooth_l1_backward", "huber_forward", "huber_backward", "soft_margin_forward",
           "soft_margin_backward", "multi_margin_forward", "multi_margin_backward", "xlogy_forward"]


@implements([aten._log_softmax], "loss")
def _pa_log_softmax(func, args, kwargs, cfg):
    x, dim, half_to_float = args[:3]
    return PF.log_softmax_forward(x.float() if half_to_float else x, dim)


@implements([aten._log_softmax_backward_data], "loss")
def _pa_log_softmax_backward(func, args, kwargs, cfg):
    dy, y, dim, input_dtype = args[:4]
    dx = PF.log_softmax_backward(y, dy, dim)
    if cfg.derivative == "balanced":
        dx = PF.balance_rows(dx, y, dim)
    return dx.to(input_dtype)


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


# ---------------------------------------------------------------------------
# binary cross entropy, smooth L1, Huber, xlogy: raw forward (``_ops``: raw or autograd-aware
# PA ops, as in nn.functional) and approx backward, following torch's CPU kernels

def _reduce(loss: torch.Tensor, red: int, _ops=_RAW) -> torch.Tensor:
    """none: the losses; sum: Σ; mean: Σ ÷̂ numel (NaN for an empty input, as torch)."""
    if red == 0:
        return loss
    s = loss.sum()
    return s if red == 2 else _ops.div(s, _c(loss.numel(), s))


def _grad_scale(g: torch.Tensor, red: int, n: int) -> torch.Tensor:
    """The reduction's factor on a backward: ÷̂ numel for mean, none otherwise."""
    return arith.pad(g, _c(n, g)) if red == 1 else g


def _check_unit_interval(t: torch.Tensor, name: str):
    if not bool(((t >= 0) & (t <= 1)).all()):
        raise RuntimeError(f"pamtorch: binary_cross_entropy: all elements of {name} should be "
                           "between 0 and 1")


def bce_forward(x: torch.Tensor, t: torch.Tensor, weight=None, reduction=1, *, _ops=_RAW):
    """Binary cross entropy on probabilities, as ``aten.binary_cross_entropy``:
    ``(t - 1) ⊙̂ max(pa_log(1 - x), -100) - t ⊙̂ max(pa_log(x), -100)``, ``⊙̂ w``, reduced.
    ``x`` and ``t`` must lie in [0, 1] (RuntimeError otherwise, as torch)."""
    red = _reduction(reduction)
    _check_unit_interval(x, "input")
    _check_unit_interval(t, "target")
    t = t.to(x.dtype)
    lo = _c(-100.0, x)
    loss = _ops.mul(t - 1, torch.maximum(_ops.log(1 - x), lo)) - _ops.mul(t, torch.maximum(_ops.log(x), lo))
    if weight is not None:
        loss = _ops.mul(loss, weight.to(x.dtype))
    return _reduce(loss, red, _ops)


def bce_backward(dy: torch.Tensor, x: torch.Tensor, t: torch.Tensor, weight=None, reduction=1):
    """Approx derivative of :func:`bce_forward` w.r.t. ``x``:
    ``dy ⊙̂ (x - t) ÷̂ max((1 - x) ⊙̂ x, 1e-12)``, ``⊙̂ w``, ÷̂ numel for mean."""
    red = _reduction(reduction)
    t = t.to(x.dtype)
    den = torch.maximum(arith.pam(1 - x, x), _c(1e-12, x))
    g = arith.pad(arith.pam(dy.to(x.dtype), x - t), den)
    if weight is not None:
        g = arith.pam(g, weight.to(x.dtype))
    return _grad_scale(g, red, x.numel())


def bce_with_logits_forward(x: torch.Tensor, t: torch.Tensor, weight=None, pos_weight=None,
                            reduction=1, *, _ops=_RAW):
    """BCE on logits, as ``aten.binary_cross_entropy_with_logits``:
    ``(1 - t) ⊙̂ x - lw ⊙̂ log σ(x)``, ``lw = (pos_weight - 1) ⊙̂ t + 1`` (1 without
    pos_weight), ``⊙̂ w``, reduced; ``log σ(x) = min(x, 0) - pa_log(1 + pa_exp(-|x|))``."""
    red = _reduction(reduction)
    t = t.to(x.dtype)
    log_sig = torch.clamp_max(x, 0) - _ops.log(1 + _ops.exp(-x.abs()))
    if pos_weight is not None:
        pw = pos_weight.to(x.dtype)
        lw = _ops.mul(pw - 1, t) + 1
        log_sig = _ops.mul(log_sig, lw)
    loss = _ops.mul(1 - t, x) - log_sig
    if weight is not None:
        loss = _ops.mul(loss, weight.to(x.dtype))
    return _reduce(loss, red, _ops)


def smooth_l1_forward(x: torch.Tensor, t: torch.Tensor, reduction=1, beta: float = 1.0, *, _ops=_RAW):
    """Smooth L1, as ``aten.smooth_l1_loss``: with ``z = |x - t|``,
    ``z ⊙̂ z ÷̂ 2β`` where ``z < β``, else ``z - β/2`` (β = 0: ``z``), reduced."""
    red = _reduction(reduction)
    if beta < 0:
        raise RuntimeError(f"pamtorch: smooth_l1_loss does not support negative values for beta, got {beta}")
    z = (x - t.to(x.dtype)).abs()
    if beta == 0:
        return _reduce(z, red, _ops)
    quad = _ops.div(_ops.mul(z, z), _c(2.0 * beta, z))
    return _reduce(torch.where(z < beta, quad, z - 0.5 * beta), red, _ops)


def smooth_l1_backward(dy: torch.Tensor, x: torch.Tensor, t: torch.Tensor, reduction=1, beta: float = 1.0):
    """Approx smooth-L1 derivative: ``dy ⊙̂ s`` with ``s = -1`` for ``d <= -β``, ``1`` for
    ``d >= β``, ``d ÷̂ β`` between (``d = x - t``); ÷̂ numel for mean."""
    red = _reduction(reduction)
    d = x - t.to(x.dtype)
    one = torch.ones_like(d)
    inner = arith.pad(d, _c(beta, d)) if beta > 0 else d
    s = torch.where(d <= -beta, -one, torch.where(d >= beta, one, inner))
    return _grad_scale(arith.pam(s, dy.to(x.dtype)), red, x.numel())


def huber_forward(x: torch.Tensor, t: torch.Tensor, reduction=1, delta: float = 1.0, *, _ops=_RAW):
    """Huber, as ``aten.huber_loss``: with ``z = |x - t|``, ``z ⊙̂ z ⊙̂ 0.5`` (an exponent
    shift) where ``z < δ``, else ``(z - δ/2) ⊙̂ δ``, reduced."""
    red = _reduction(reduction)
    if not delta > 0:
        raise RuntimeError(f"pamtorch: huber_loss does not support non-positive values for delta, got {delta}")
    z = (x - t.to(x.dtype)).abs()
    quad = _ops.mul(_ops.mul(z, z), _c(0.5, z))
    lin = _ops.mul(z - 0.5 * delta, _c(delta, z))
    return _reduce(torch.where(z < delta, quad, lin), red, _ops)


def huber_backward(dy: torch.Tensor, x: torch.Tensor, t: torch.Tensor, reduction=1, delta: float = 1.0):
    """Approx Huber derivative: ``dy ⊙̂ clamp(x - t, -δ, δ)`` (a select, no product), ÷̂ numel
    for mean."""
    red = _reduction(reduction)
    d = (x - t.to(x.dtype)).clamp(-delta, delta)
    return _grad_scale(arith.pam(d, dy.to(x.dtype)), red, x.numel())


def soft_margin_forward(x: torch.Tensor, y: torch.Tensor, reduction=1, *, _ops=_RAW):
    """Soft margin, as ``aten.soft_margin_loss``: ``pa_log(1 + pa_exp(-(y ⊙̂ x)))``, reduced."""
    return _reduce(_ops.log(1 + _ops.exp(-_ops.mul(y.to(x.dtype), x))), _reduction(reduction), _ops)


def soft_margin_backward(dy: torch.Tensor, x: torch.Tensor, y: torch.Tensor, reduction=1):
    """Approx soft-margin derivative, in torch's order: ``z = pa_exp(-(y ⊙̂ x))``,
    ``-(y ⊙̂ z)`` (÷̂ numel for mean) ``÷̂ (1 + z) ⊙̂ dy``."""
    y = y.to(x.dtype)
    z = arith.pa_exp(-arith.pam(y, x))
    g = _grad_scale(-arith.pam(y, z), _reduction(reduction), x.numel())
    return arith.pam(arith.pad(g, 1 + z), dy.to(x.dtype))


def _margins(x: torch.Tensor, target: torch.Tensor, margin: float):
    """(2-D input, its margins ``margin - x[y] + x``, and where they count: ``> 0`` off the
    target class), for 1-D or 2-D ``x`` of multi_margin_loss."""
    x2 = x.reshape(1, -1) if x.dim() <= 1 else x
    t = target.reshape(-1, 1)
    if bool(((t < 0) | (t >= x2.shape[1])).any()):
        raise RuntimeError(f"pamtorch: multi_margin_loss: target out of range [0, {x2.shape[1]})")
    z = margin - x2.gather(1, t) + x2
    off = torch.arange(x2.shape[1], device=x.device) != t
    return x2, t, z, (z > 0) & off


def multi_margin_forward(x: torch.Tensor, target: torch.Tensor, p=1, margin=1.0, weight=None,
                         reduction=1, *, _ops=_RAW):
    """Multi-class margin, as ``aten.multi_margin_loss``: per sample
    ``Σ_{i≠y, z_i>0} h_i ÷̂ C`` with ``z_i = margin - x_y + x_i``, ``h = z`` (p = 1) or
    ``z ⊙̂ z`` (p = 2), ``⊙̂ w[y]``; mean is ``Σ ÷̂ N``."""
    red = _reduction(reduction)
    if p not in (1, 2):
        raise RuntimeError(f"pamtorch: multi_margin_loss: only p == 1 and p == 2 supported, got {p}")
    x2, t, z, keep = _margins(x, target, float(margin))
    h = z if p == 1 else _ops.mul(z, z)
    if weight is not None:
        h = _ops.mul(h, weight.to(x.dtype)[t])
    per = _ops.div(torch.where(keep, h, torch.zeros_like(h)).sum(1), _c(x2.shape[1], x))
    if red == 0:
        return per if target.dim() > 0 else per.reshape(())
    s = per.sum()
    return s if red == 2 else _ops.div(s, _c(x2.shape[0], s))


def multi_margin_backward(dy: torch.Tensor, x: torch.Tensor, target: torch.Tensor, p=1, margin=1.0,
                          weight=None, reduction=1):
    """Approx multi-margin derivative, as torch's kernel: with ``g = 1/C`` (``1/(N C)`` for
    mean, a Python constant), ``h = g`` (p = 1) or ``z ⊙̂ 2g`` (p = 2), ``⊙̂ w[y]``, at the
    counted classes, ``-Σ h`` at the target, all ``⊙̂ dy``."""
    red = _reduction(reduction)
    x2, t, z, keep = _margins(x, target, float(margin))
    n, c = x2.shape
    g = 1.0 / (n * c) if red == 1 else 1.0 / c
    h = torch.full_like(z, g) if p == 1 else arith.pam(z, _c(2 * g, z))
    if weight is not None:
        h = arith.pam(h, weight.to(x.dtype)[t])
    h = torch.where(keep, h, torch.zeros_like(h))
    h = h.scatter(1, t, -h.sum(1, keepdim=True))
    d = dy.to(x.dtype)
    d = d.reshape(-1, 1) if red == 0 and d.dim() > 0 else d
    return arith.pam(h, d).reshape(x.shape)


def xlogy_forward(x: torch.Tensor, y: torch.Tensor, *, _ops=_RAW):
    """``x ⊙̂ pa_log(y)``, 0 where ``x == 0`` unless ``y`` is NaN (as ``torch.xlogy``)."""
    out = _ops.mul(x, _ops.log(y))
    return torch.where((x == 0) & ~torch.isnan(y), torch.zeros_like(out), out)


@implements([aten.binary_cross_entropy], "loss")
def _pa_bce(func, args, kwargs, cfg):
    return bce_forward(args[0], args[1], arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "reduction", 1))


@implements([aten.binary_cross_entropy_backward], "loss")
def _pa_bce_backward(func, args, kwargs, cfg):
    dy, x, t = args[:3]
    return bce_backward(dy, x, t, arg(args, kwargs, 3, "weight"), arg(args, kwargs, 4, "reduction", 1))


@implements([aten.binary_cross_entropy_with_logits], "loss")
def _pa_bce_logits(func, args, kwargs, cfg):
    return bce_with_logits_forward(args[0], args[1], arg(args, kwargs, 2, "weight"),
                                   arg(args, kwargs, 3, "pos_weight"), arg(args, kwargs, 4, "reduction", 1))


@implements([aten.smooth_l1_loss], "loss")
def _pa_smooth_l1(func, args, kwargs, cfg):
    return smooth_l1_forward(args[0], args[1], arg(args, kwargs, 2, "reduction", 1),
                             arg(args, kwargs, 3, "beta", 1.0))


@implements([aten.smooth_l1_loss_backward], "loss")
def _pa_smooth_l1_backward(func, args, kwargs, cfg):
    dy, x, t = args[:3]
    return smooth_l1_backward(dy, x, t, arg(args, kwargs, 3, "reduction"), arg(args, kwargs, 4, "beta"))


@implements([aten.huber_loss], "loss")
def _pa_huber(func, args, kwargs, cfg):
    return huber_forward(args[0], args[1], arg(args, kwargs, 2, "reduction", 1), arg(args, kwargs, 3, "delta", 1.0))


@implements([aten.huber_loss_backward], "loss")
def _pa_huber_backward(func, args, kwargs, cfg):
    dy, x, t = args[:3]
    return huber_backward(dy, x, t, arg(args, kwargs, 3, "reduction"), arg(args, kwargs, 4, "delta"))


@implements([aten.soft_margin_loss], "loss")
def _pa_soft_margin(func, args, kwargs, cfg):
    return soft_margin_forward(args[0], args[1], arg(args, kwargs, 2, "reduction", 1))


@implements([aten.soft_margin_loss_backward], "loss")
def _pa_soft_margin_backward(func, args, kwargs, cfg):
    dy, x, y = args[:3]
    return soft_margin_backward(dy, x, y, arg(args, kwargs, 3, "reduction"))


@implements([aten.multi_margin_loss], "loss")
def _pa_multi_margin(func, args, kwargs, cfg):
    return multi_margin_forward(args[0], args[1], arg(args, kwargs, 2, "p", 1), arg(args, kwargs, 3, "margin", 1.0),
                                arg(args, kwargs, 4, "weight"), arg(args, kwargs, 5, "reduction", 1))


@implements([aten.multi_margin_loss_backward], "loss")
def _pa_multi_margin_backward(func, args, kwargs, cfg):
    dy, x, t = args[:3]
    return multi_margin_backward(dy, x, t, arg(args, kwargs, 3, "p"), arg(args, kwargs, 4, "margin"),
                                 arg(args, kwargs, 5, "weight"), arg(args, kwargs, 6, "reduction", 1))


@implements([aten.xlogy, aten.xlogy_], "elementwise")
def _pa_xlogy(func, args, kwargs, cfg):
    """xlogy, its Scalar_Self/Scalar_Other, in-place and out= overloads. Kind "elementwise":
    it is a pointwise op (``special.xlogy``, entropies), and ``kl_div``, which reaches it,
    decomposes into elementwise ops anyway."""
    x, y = promote(args[0], args[1])
    return inplace(func, args, xlogy_forward(x, y))


@implements([aten.sgn, aten.sgn_], "elementwise")
def _pa_sgn(func, args, kwargs, cfg):
    """sgn of a real tensor is sign: a select, no product. Of a complex one it is z / |z|."""
    x = args[0]
    if x.is_complex():
        raise UnsupportedOpError(f"pamtorch.mode: {func} of a complex tensor divides (z / |z|); "
                                 "only real tensors are supported")
    return inplace(func, args, torch.sign(x))


@implements([aten.special_xlog1py], "elementwise")
def _pa_xlog1py(func, args, kwargs, cfg):
    """``special.xlog1py``: ``x ⊙̂ pa_log(1 + y)`` (the ``1 + y`` a float addition, so tiny
    ``y`` lose their relative precision), 0 where ``x == 0`` unless ``y`` is NaN."""
    x, y = promote(args[0], args[1])
    return xlogy_forward(x, 1 + y)


@implements([aten.special_entr], "elementwise")
def _pa_entr(func, args, kwargs, cfg):
    """``special.entr``: ``-(x ⊙̂ pa_log x)`` for x > 0, 0 at 0, -inf for x < 0, NaN at NaN."""
    x = args[0]
    out = -xlogy_forward(x, x)
    return torch.where(x < 0, torch.full_like(out, -math.inf), out)
