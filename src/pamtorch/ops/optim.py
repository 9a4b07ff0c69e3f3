"""The optimizers' ``_foreach_*`` ops (stock torch.optim, foreach or per-tensor) and torch's
fused optimizer kernels.

Inside ``Optimizer.step`` a product with a Python number 1/2 <= |c| <= 2 (1 - lr·wd, β2,
a momentum, 1/√(1 - β2^t)) runs as ``x ± PAM(x, |c| - 1)`` (:func:`.elementwise.scalar_mul`),
on every path: the single-tensor ops, the ``_foreach_*`` ops and the fused kernels, which
therefore agree bit for bit where torch runs the same ops."""
from __future__ import annotations

import torch

from .. import arith
from .table import implements, aten, pam, pad, passes_through
from .elementwise import check_ord, norm2, pow_any, scalar_div, scalar_mul, scalar_scale


@implements([aten._foreach_norm], "optimizer")
def _pa_foreach_norm(func, args, kwargs, cfg):
    ord_ = args[1] if len(args) > 1 else kwargs.get("ord", 2)
    check_ord(ord_)
    dtype = kwargs.get("dtype")
    return [norm2(t if dtype is None else t.to(dtype)) for t in args[0]]


# ---------------------------------------------------------------------------
# optimizer's foreach ops

def _per_tensor(func, j, a) -> bool:
    """Whether argument ``j`` is a 1-D tensor of one scalar per list entry (the ``scalars``
    of ``_foreach_addcmul.Tensor`` / ``_foreach_addcdiv.Tensor``)."""
    return isinstance(a, torch.Tensor) and func._schema.arguments[j].name == "scalars"


def _foreach(fn):
    def impl(func, args, kwargs, cfg):
        lists = [a for a in args if isinstance(a, (list, tuple))]
        n = len(lists[0])
        outs = []
        for i in range(n):
            per = [a[i] if isinstance(a, (list, tuple)) or _per_tensor(func, j, a) else a
                   for j, a in enumerate(args)]
            outs.append(fn(per, kwargs, cfg))
        if func.overloadpacket.__name__.endswith("_"):
            for t, o in zip(args[0], outs):
                t.copy_(o)
            return None
        return outs
    return impl


for _names, _fn in [
    (("_foreach_mul", "_foreach_mul_"), lambda p, kw, c: scalar_mul(p[0], p[1], c)),
    (("_foreach_div", "_foreach_div_"), lambda p, kw, c: scalar_div(p[0], p[1])),
    (("_foreach_addcmul", "_foreach_addcmul_"),
     lambda p, kw, c: p[0] + scalar_scale(pam(p[1], p[2], c), kw.get("value", p[3] if len(p) > 3 else 1))),
    (("_foreach_addcdiv", "_foreach_addcdiv_"),
     lambda p, kw, c: p[0] + scalar_scale(pad(p[1], p[2]), kw.get("value", p[3] if len(p) > 3 else 1))),
    (("_foreach_lerp", "_foreach_lerp_"), lambda p, kw, c: p[0] + scalar_mul(p[1] - p[0], p[2], c)),
    (("_foreach_sqrt", "_foreach_sqrt_"), lambda p, kw, c: arith.pa_sqrt(p[0])),
    (("_foreach_reciprocal", "_foreach_reciprocal_"), lambda p, kw, c: arith.pa_reciprocal(p[0])),
    (("_foreach_pow", "_foreach_pow_"), lambda p, kw, c: pow_any(p[0], p[1])),
]:
    implements([getattr(aten, n) for n in _names if hasattr(aten, n)], "optimizer")(_foreach(_fn))


# The add/sub foreach ops multiply only through ``alpha``.
@implements([aten._foreach_add, aten._foreach_add_, aten._foreach_sub, aten._foreach_sub_], "optimizer")
def _pa_foreach_add(func, args, kwargs, cfg):
    alpha = kwargs.get("alpha", 1)
    sub = func.overloadpacket.__name__.startswith("_foreach_sub")

    def one(p, kw, c):
        b = scalar_scale(p[1], alpha)
        return p[0] - b if sub else p[0] + b
    return _foreach(one)(func, args, {}, cfg)


# ---------------------------------------------------------------------------
# the rest of the foreach surface, and torch.optim's fused=True kernels

# selects, sign and rounding: no product (Adamax's _foreach_abs_, Rprop's _foreach_sign_,
# Adafactor's _foreach_clamp_min_), and the sparse plumbing of SparseAdam, which sums
# duplicate indices (coalesce) and selects (sparse_mask); its arithmetic runs on the dense
# values and is routed
passes_through("""
    _foreach_abs_ _foreach_sign _foreach_sign_ _foreach_clamp_min _foreach_clamp_min_
    _foreach_clamp_max _foreach_clamp_max_ _foreach_minimum _foreach_minimum_ _foreach_max
    _foreach_zero _foreach_clone _foreach_copy _foreach_floor _foreach_floor_ _foreach_ceil
    _foreach_ceil_ _foreach_trunc _foreach_trunc_ _foreach_round _foreach_round_ _foreach_frac
    _foreach_frac_ _coalesce _indices _values is_coalesced sparse_mask
    _sparse_coo_tensor_with_dims_and_tensors
""")

for _names, _fn in [
    (("_foreach_rsqrt", "_foreach_rsqrt_"), arith.pa_rsqrt),   # Adafactor
    (("_foreach_exp", "_foreach_exp_"), arith.pa_exp),
    (("_foreach_log", "_foreach_log_"), arith.pa_log),
    (("_foreach_log2", "_foreach_log2_"), arith.palog2),
]:
    implements([getattr(aten, n) for n in _names], "optimizer")(_foreach(lambda p, kw, c, f=_fn: f(p[0])))


def _value(x) -> float:
    """A hyperparameter passed as a Python number or a one-element tensor (``lr``)."""
    return x.item() if isinstance(x, torch.Tensor) else float(x)


def _unscaled(grads, kwargs):
    """The fused kernels' AMP prologue: None when ``found_inf`` is set (the step is skipped),
    else the gradients, divided (PAD) by ``grad_scale`` and written back when it is given."""
    found_inf, grad_scale = kwargs.get("found_inf"), kwargs.get("grad_scale")
    if found_inf is not None and found_inf.item() == 1.0:
        return None
    if grad_scale is None:
        return list(grads)
    out = []
    for g in grads:
        g.copy_(pad(g, grad_scale.reshape(())))
        out.append(g)
    return out


def _decayed_grad(g, p, wd, maximize):
    """``-g`` for maximize, plus ``p ⊙̂ wd`` for L2 weight decay (``_foreach_neg`` and
    ``_foreach_add(alpha=wd)`` of the foreach path)."""
    if maximize:
        g = -g
    return g + scalar_scale(p, wd) if wd != 0 else g


@implements([aten._fused_adam_, aten._fused_adamw_], "optimizer")
def _pa_fused_adam(func, args, kwargs, cfg):
    """``Adam(fused=True)`` / ``AdamW(fused=True)``: torch's algorithm, each tensor's update
    in the ops and order of the foreach path (``_multi_tensor_adam``), so the two paths
    agree bit for bit (the C++ kernel's own association, ``(-step_size ⊙ m) ÷ denom``,
    differs only by rounding in exact arithmetic, but not in PA):

        p ← p ⊙̂ (1 - lr·wd)                      (AdamW; Adam adds p ⊙̂ wd to g)
        m ← m + (g - m) ⊙̂ (1 - β1)                v ← v ⊙̂ β2 + (g ⊙̂ g) ⊙̂ (1 - β2)
        v̂ ← max(v̂, v) (amsgrad)                  d ← pa_sqrt(v or v̂) ÷̂ √(1 - β2^t) + eps
        p ← p + (m ÷̂ d) ⊙̂ (-lr / (1 - β1^t))

    with the bias corrections exact Python floats, as in the foreach path, and each
    ⊙̂/÷̂ by a Python number 1/2..2 in the optimizer's form, p - p ⊙̂ lr·wd for the decay
    (:func:`.elementwise.scalar_mul`)."""
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = args[:6]
    lr, beta1, beta2 = _value(kwargs["lr"]), kwargs["beta1"], kwargs["beta2"]
    wd, eps, amsgrad, maximize = kwargs["weight_decay"], kwargs["eps"], kwargs["amsgrad"], kwargs["maximize"]
    adamw = func.overloadpacket is aten._fused_adamw_
    grads = _unscaled(grads, kwargs)
    if grads is None:
        return None
    for i, (p, g, m, v, step) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
        t = step.item()
        if adamw:
            g = -g if maximize else g
            if wd != 0:
                p.copy_(scalar_mul(p, 1 - lr * wd, cfg))
        else:
            g = _decayed_grad(g, p, wd, maximize)
        m.copy_(m + scalar_mul(g - m, 1 - beta1, cfg))
        v.copy_(scalar_mul(v, beta2, cfg) + scalar_scale(pam(g, g, cfg), 1 - beta2))
        if amsgrad:
            max_exp_avg_sqs[i].copy_(torch.maximum(max_exp_avg_sqs[i], v))
        root = arith.pa_sqrt(max_exp_avg_sqs[i] if amsgrad else v)
        denom = scalar_div(root, (1 - beta2 ** t) ** 0.5) + eps
        p.copy_(p + scalar_scale(pad(m, denom), (lr / (1 - beta1 ** t)) * -1))
    return None


@implements([aten._fused_sgd_], "optimizer")
def _pa_fused_sgd(func, args, kwargs, cfg):
    """``SGD(fused=True)`` in the ops and order of the foreach path (``_multi_tensor_sgd``):
    ``g ← g + p ⊙̂ wd``; with momentum ``b ← g`` on the first step, else
    ``b ← b ⊙̂ μ + g ⊙̂ (1 - dampening)``, then ``g ← g + b ⊙̂ μ`` (nesterov) or ``g ← b``;
    ``p ← p + g ⊙̂ (-lr)``."""
    params, grads, bufs = args[:3]
    lr, wd, mu = _value(kwargs["lr"]), kwargs["weight_decay"], kwargs["momentum"]
    dampening, nesterov, first = kwargs["dampening"], kwargs["nesterov"], kwargs["is_first_step"]
    grads = _unscaled(grads, kwargs)
    if grads is None:
        return None
    for i, (p, g) in enumerate(zip(params, grads)):
        g = _decayed_grad(g, p, wd, kwargs["maximize"])
        if mu != 0:
            b = bufs[i]
            b.copy_(g if first else scalar_mul(b, mu, cfg) + scalar_scale(g, 1 - dampening))
            g = g + scalar_scale(b, mu) if nesterov else b
        p.copy_(p + scalar_scale(g, -lr))
    return None


@implements([aten._fused_adagrad_], "optimizer")
def _pa_fused_adagrad(func, args, kwargs, cfg):
    """``Adagrad(fused=True)`` in the ops and order of the foreach path
    (``_multi_tensor_adagrad``): ``s ← s + g ⊙̂ g``,
    ``p ← p + (g ⊙̂ -clr) ÷̂ (pa_sqrt(s) + eps)``, ``clr = lr / (1 + (t - 1)·lr_decay)``."""
    params, grads, state_sums, steps = args[:4]
    lr, lr_decay, wd, eps = _value(kwargs["lr"]), kwargs["lr_decay"], kwargs["weight_decay"], kwargs["eps"]
    grads = _unscaled(grads, kwargs)
    if grads is None:
        return None
    for p, g, s, step in zip(params, grads, state_sums, steps):
        g = _decayed_grad(g, p, wd, kwargs["maximize"])
        s.copy_(s + pam(g, g, cfg))
        std = arith.pa_sqrt(s) + eps
        p.copy_(p + pad(scalar_mul(g, -lr / (1 + (step.item() - 1) * lr_decay), cfg), std))
    return None


# GradScaler: fused optimizers take grad_scale/found_inf (above); every path first unscales
@implements([aten._amp_foreach_non_finite_check_and_unscale_], "optimizer")
def _pa_amp_unscale(func, args, kwargs, cfg):
    """``GradScaler.unscale_``: ``found_inf ← 1`` if any gradient holds inf or NaN, and every
    gradient ``⊙̂ inv_scale`` (left alone when it is 1). GradScaler's scales are powers of
    two, so the PAM is an exact exponent shift."""
    grads, found_inf, inv_scale = args[:3]
    inv = inv_scale.reshape(())
    for g in grads:
        if not bool(torch.isfinite(g).all()):
            found_inf.fill_(1.0)
        if inv.item() != 1.0:
            g.copy_(pam(g, inv, cfg))
    return None


@implements([aten._amp_update_scale_], "optimizer")
def _pa_amp_update_scale(func, args, kwargs, cfg):
    """``GradScaler.update``: ``scale ⊙̂ backoff`` after an inf/NaN (tracker reset), else
    ``scale ⊙̂ growth`` once ``growth_interval`` clean steps are counted (kept when that is
    not finite), as torch's kernel."""
    scale_, tracker, found_inf, growth, backoff, interval = args[:6]
    if found_inf.item():
        scale_.copy_(pam(scale_, backoff, cfg))
        tracker.zero_()
        return scale_
    clean = int(tracker.item()) + 1
    if clean == interval:
        grown = pam(scale_, growth, cfg)
        if bool(torch.isfinite(grown).all()):
            scale_.copy_(grown)
        clean = 0
    tracker.fill_(clean)
    return scale_
