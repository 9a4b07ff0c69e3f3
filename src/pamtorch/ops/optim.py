"""The optimizers' ``_foreach_*`` ops (stock torch.optim, foreach or per-tensor) and torch's
fused optimizer kernels.

Inside ``Optimizer.step`` a product with a Python number 1/2 <= |c| <= 2 (1 - lr·wd, β2,
a momentum, 1/√(1 - β2^t)) runs as ``x ± PAM(x, |c| - 1)`` (:func:`.elementwise.scalar_mul`),
on every path: the single-tensor ops, the ``_foreach_*`` ops and the fused kernels, which
therefore agree bit for bit where torch runs the same ops. Under the mode a stock Adam/AdamW
on torch's default path steps on the fused one (:func:`fused_adam_groups`), whose float32
update is a compiled kernel (kernels/cpu/pa_optim.cpp)."""
from __future__ import annotations

import torch

from .. import arith
from ..recording import RECORDERS
from .table import implements, aten, pam, pad, passes_through
from .elementwise import _near_one, check_ord, norm2, pow_any, scalar_div, scalar_mul, scalar_scale


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
# the per-tensor calls of their CPU kernels, which the mode's kernel route sees (a dispatch
# mode sees the _foreach call only)
passes_through("sign_ floor_ ceil_ trunc_ frac frac_")

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


# ---------------------------------------------------------------------------
# the compiled Adam/AdamW update (kernels/cpu/pa_optim.cpp): one pass per tensor

# form kinds of pa_optim.cpp: how a product with a Python number runs
_IDENT, _PAM, _PAD, _NEAR, _NEAR_NEG, _SKIP = range(6)
_NAN_RULE: list = []   # [whether torch's CPU add/sub pick NaNs as the kernel does], once known


def _f32_bits(c) -> int:
    """The float32 pattern of a Python number, rounded as ``promote`` rounds it."""
    return int(torch.tensor(float(c), dtype=torch.float32).view(torch.int32).item()) & 0xFFFFFFFF


def _mul_form(x, c, optimizer=None, const=_f32_bits):
    """:func:`.elementwise.scalar_mul`'s choice for ``x ·̂ c``: PAM(x, c), or the optimizer's
    ``±(x + PAM(x, |c| - 1))``; the constant as ``const`` gives it (its float32 pattern, or
    for the 16-bit kernel a 0-d tensor of the dtype)."""
    if not _near_one(x, c, optimizer):
        return _PAM, const(c)
    return (_NEAR if c > 0 else _NEAR_NEG), const(abs(c) - 1)


def _scale_form(x, s, const=_f32_bits):
    """:func:`.elementwise.scalar_scale`'s: x itself for s == 1, else :func:`_mul_form`."""
    return (_IDENT, const(0)) if s == 1 else _mul_form(x, s, const=const)


def _div_form(x, c, const=_f32_bits):
    """:func:`.elementwise.scalar_div`'s: PAD(x, c), or the optimizer's form of x ·̂ (1/c)."""
    if not _near_one(x, c, None):
        return _PAD, const(c)
    return _mul_form(x, 1 / c, optimizer=True, const=const)


def _adam_forms(p, t, lr, beta1, beta2, wd, adamw, const=_f32_bits) -> list:
    """The forms of one tensor's update at step ``t``, in pa_optim.cpp's order (decay, beta1,
    beta2, gg, bc2, step): kind and constant of each, flattened."""
    decay = (_SKIP, const(0)) if wd == 0 else _mul_form(p, 1 - lr * wd, const=const) if adamw else \
        _scale_form(p, wd, const)
    return [*decay, *_mul_form(p, 1 - beta1, const=const), *_mul_form(p, beta2, const=const),
            *_scale_form(p, 1 - beta2, const), *_div_form(p, (1 - beta2 ** t) ** 0.5, const),
            *_scale_form(p, (lr / (1 - beta1 ** t)) * -1, const)]


def _nan_rule() -> bool:
    """Whether torch's CPU ``a + b`` and ``a - b`` return b's NaN (quieted) when both operands
    are NaN, and never flip a NaN's sign: the choice the kernel makes (its own adds could pick
    either NaN). Checked once, on both of torch's inner loops (vector body and tail)."""
    if not _NAN_RULE:
        n = 37
        a = torch.full((n,), 1.5).view(torch.int32)
        b = torch.full((n,), 1.5).view(torch.int32)
        a[0::3], b[0::2] = 0x7FC00001, -0x003FFFFE     # quiet NaNs, b's negative
        a[1::4], b[1::5] = 0x7F800011, 0x7FA00012      # signalling NaNs
        a, b = a.view(torch.float32), b.view(torch.float32)
        ai, bi = a.view(torch.int32), b.view(torch.int32)
        ok = True
        for out in (a + b, a - b):
            out = out.view(torch.int32)
            want = torch.where(torch.isnan(b), bi | 0x00400000, torch.where(torch.isnan(a), ai | 0x00400000, out))
            ok = ok and bool(torch.equal(out, want))
        _NAN_RULE.append(ok)
    return _NAN_RULE[0]


def _adam_kernel(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, wd, eps, amsgrad, maximize,
                 adamw, cfg) -> list:
    """Run ``_pa_fused_adam``'s per-tensor update with a compiled kernel where one applies
    (no offset or mantissa rounding, no amsgrad, no audit recorder listening): float32
    contiguous CPU tensors take ``optim_adam_step`` (one pass per tensor; torch's NaN choice
    must be the kernel's), bfloat16/float16 CPU tensors ``optim_adam_step_lowp`` (the loop's
    ops in C++: torch's adds and the 16-bit PA kernels). Return the indices left to the
    Python loop. Each tensor's products with Python numbers take the forms the loop's
    ``scalar_mul``/``scalar_scale``/``scalar_div`` would, so the bits are the loop's."""
    everything = list(range(len(params)))
    if amsgrad or RECORDERS or cfg.offset is not None or cfg.mantissa_bits is not None or not params:
        return everything
    fit, lowp, rest = [], [], []
    with torch._C.DisableTorchFunction():  # attribute reads, not for the function mode to route
        for i, ts in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
            if all(t.dtype is torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in ts):
                fit.append(i)
            elif arith._lowp(*ts) is not None:
                lowp.append(i)
            else:
                rest.append(i)
    pick = lambda ts, idx: [ts[i] for i in idx]  # noqa: E731
    ext = arith._ext(params[fit[0]]) if fit else None
    if fit and (ext is None or not _nan_rule()):
        rest, fit = sorted(rest + fit), []
    if fit:
        forms, rows = [], {}
        for i in fit:
            t = steps[i].item()
            if t not in rows:
                rows[t] = _adam_forms(params[i], t, lr, beta1, beta2, wd, adamw) + [_f32_bits(eps)]
            forms += rows[t]
        ext.optim_adam_step(pick(params, fit), pick(grads, fit), pick(exp_avgs, fit), pick(exp_avg_sqs, fit),
                            forms, adamw, maximize)
    by_dtype: dict = {}   # the 16-bit tensors per dtype (one call each), in order of appearance
    for i in lowp:
        by_dtype.setdefault(params[i].dtype, []).append(i)
    for dtype, sel in by_dtype.items():
        const = lambda c, dtype=dtype: torch.tensor(float(c), dtype=dtype)  # noqa: E731  promote()'s
        kinds, consts, rows = [], [], {}
        for i in sel:
            t = steps[i].item()
            if t not in rows:
                rows[t] = _adam_forms(params[i], t, lr, beta1, beta2, wd, adamw, const)
            kinds += rows[t][0::2]
            consts += rows[t][1::2]
        arith._lowp(params[sel[0]]).optim_adam_step_lowp(
            pick(params, sel), pick(grads, sel), pick(exp_avgs, sel), pick(exp_avg_sqs, sel), kinds, consts,
            float(eps), arith._table(arith._sqrt_like, dtype, 1), adamw, maximize)
    return rest


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
    (:func:`.elementwise.scalar_mul`). Float32 contiguous CPU tensors take the compiled
    kernel, one pass per tensor with the loop's bits, and bfloat16/float16 CPU tensors the
    loop itself in C++ (:func:`_adam_kernel`)."""
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = args[:6]
    lr, beta1, beta2 = _value(kwargs["lr"]), kwargs["beta1"], kwargs["beta2"]
    wd, eps, amsgrad, maximize = kwargs["weight_decay"], kwargs["eps"], kwargs["amsgrad"], kwargs["maximize"]
    adamw = func.overloadpacket is aten._fused_adamw_
    grads = _unscaled(grads, kwargs)
    if grads is None:
        return None
    rest = _adam_kernel(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, wd, eps, amsgrad,
                        maximize, adamw, cfg)
    for i in rest:
        p, g, m, v, t = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], steps[i].item()
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


# stock Adam/AdamW under the mode: torch's default path on CPU is the single-tensor one, about
# ten routed aten ops per tensor; the fused path reaches the kernel above in one routed op
_FUSABLE = (torch.optim.Adam, torch.optim.AdamW)
_FUSABLE_MODULES = ("torch.optim.adam", "torch.optim.adamw", "pamtorch.optim")  # not user subclasses


def fused_adam_groups(opt, config, leave_exact=()) -> list:
    """Switch the param groups of a stock ``torch.optim.Adam``/``AdamW`` step (or
    ``pamtorch.optim``'s, with this ``config``) that take torch's default path
    (``foreach=None, fused=None``) to ``fused=True``, and return them for
    :func:`restore_groups`. Under the mode the three paths give the same bits (the fused op
    runs the foreach path's ops in its order, :func:`_pa_fused_adam`); only groups whose
    fused step is the compiled kernel or its loop are switched: float32 CPU parameters
    (the kernel), or bfloat16/float16 ones (the loop's 16-bit PA ops, each a compiled
    kernel; the three paths agree there too, tests/test_optim_fused_kernel.py), Python
    number hyperparameters, no amsgrad, differentiable or capturable, the optimizer kind PA
    with no offset or mantissa rounding and nothing left exact (an exact fused op would be
    torch's own kernel, which rounds differently). The default dtype must be float32, so that
    the ``step`` state a first fused step creates is the dtype the default path creates.
    Nothing is switched while an audit recorder listens: it reports the user's path."""
    if RECORDERS or not isinstance(opt, _FUSABLE) or type(opt).__module__ not in _FUSABLE_MODULES:
        return []
    op = config.optimizer
    if (leave_exact or not op.pa or op.offset is not None or op.mantissa_bits is not None
            or getattr(opt, "pa_config", config) != config or torch.get_default_dtype() is not torch.float32):
        return []
    return _switch_default_groups(opt, "fused", lambda group: not group.get("amsgrad"), _FUSED_DTYPES)


_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# stock optimizers whose foreach step gives the for-loop step's bits on CPU float32
# (tests/test_ops_optim.py checks each): NAdam and RAdam do not, and are not switched
_FOREACH_SAME = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.RMSprop,
                 torch.optim.Adagrad, torch.optim.Adamax)


def foreach_exact_groups(opt, config, leave_exact=()) -> list:
    """Switch the param groups of a stock optimizer step that the mode leaves exact (the
    config's optimizer kind not PA, as in ``pam-matmul``) from torch's CPU default, the
    for-loop path, to ``foreach=True``, and return them for :func:`restore_groups`. Each
    aten op of the step crosses into the Python dispatch mode (a few microseconds each);
    the for-loop path runs about eight ops per parameter, the foreach path that many per
    group, and on CPU float32 both compute the same bits (``_FOREACH_SAME``). Only exact
    instances of those classes (not user subclasses), groups on the default path with
    float32 CPU parameters, strided gradients and Python number hyperparameters are
    switched; nothing while an audit recorder listens: it reports the user's path."""
    if RECORDERS or type(opt) not in _FOREACH_SAME or config.optimizer.pa:
        return []
    return _switch_default_groups(opt, "foreach")


def _switch_default_groups(opt, key: str, also=lambda group: True, dtypes=(torch.float32,)) -> list:
    """Set ``group[key] = True`` ("fused" or "foreach") in the param groups of ``opt`` that
    take torch's default path (``foreach`` and ``fused`` None; not differentiable or
    capturable), whose hyperparameters are Python numbers, whose parameters are CPU tensors
    of one of ``dtypes`` with strided gradients, and for which ``also(group)`` holds; return
    them for :func:`restore_groups`."""
    def has_tensor(v):
        return isinstance(v, torch.Tensor) or (isinstance(v, tuple) and any(isinstance(x, torch.Tensor) for x in v))

    switched = []
    with torch._C.DisableTorchFunction():  # attribute reads, not for the function mode to route
        for group in opt.param_groups:
            if (group.get("foreach") is not None or group.get("fused") is not None
                    or group.get("differentiable") or group.get("capturable") or not also(group)):
                continue
            if any(has_tensor(v) for k, v in group.items() if k != "params"):
                continue
            if all(p.dtype in dtypes and p.device.type == "cpu" and
                   (p.grad is None or p.grad.layout is torch.strided) for p in group["params"]):
                group[key] = True
                switched.append(group)
    return switched


def restore_groups(groups):
    """Undo :func:`fused_adam_groups` or :func:`foreach_exact_groups`: the groups take
    torch's default path again (both keys were None or absent when they were switched)."""
    for group in groups:
        for key in ("fused", "foreach"):
            if key in group:
                group[key] = None


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
