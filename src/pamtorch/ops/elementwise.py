"""Elementwise arithmetic: mul, div, addcmul, addcdiv, lerp, pow, exp/log/sqrt, mean, norms, dropout."""
from __future__ import annotations

import math

import torch

from .. import arith
from ..nn import functional as PF
from .table import (OPTIMIZER_STEP, UnsupportedOpError, accepts_complex, implements, aten, arg, inplace,
                    pam, pad, passes_through, promote)


# ---------------------------------------------------------------------------
# products with a Python number: the optimizer's forms for factors near 1

def _near_one(x, c, optimizer) -> bool:
    """Whether ``x ·̂ c`` takes the optimizer's form: a float tensor times a Python number
    with 1/2 <= |c| <= 2, c != ±1, inside ``Optimizer.step`` (or ``optimizer=True``)."""
    if optimizer is None:
        optimizer = OPTIMIZER_STEP[0] > 0
    return optimizer and isinstance(c, (int, float)) and not isinstance(c, bool) and \
        isinstance(x, torch.Tensor) and x.is_floating_point() and 0.5 <= abs(c) <= 2 and abs(c) != 1


def scalar_mul(x, c, cfg=None, optimizer=None):
    """``x ·̂ c`` = PAM(x, c); in the optimizer, for a Python number 1/2 <= |c| <= 2,
    ``±(x + PAM(x, |c| - 1))`` with |c| - 1 an exact Python float. The part a decay or a
    β removes, x·(1 - c), then carries PAM's error, [-1/9, 0] of itself, instead of 1 to 2
    times itself (PAM(x, c) for c just below 1: docs/training.md, "PA AdamW"); the bound
    on the product's relative error, |c - 1|/(9|c|), is at most PAM's 1/9. Zeros,
    infinities and NaN keep their IEEE product. ``optimizer``: None reads whether an
    ``Optimizer.step`` runs."""
    if not _near_one(x, c, optimizer):
        return pam(x, c, cfg)
    a = abs(c)
    out = torch.where(torch.isfinite(x) & (x != 0), x + pam(x, a - 1, cfg), x)
    return out if c > 0 else -out


def scalar_div(x, c, optimizer=None, cfg=None):
    """``x ÷̂ c`` = PAD(x, c) (with ``cfg``'s offset and mantissa bits); in the optimizer,
    for a Python number 1/2 <= |c| <= 2, ``scalar_mul(x, 1/c)`` with 1/c a Python float
    (Adam's √(1 - β2^t) near 1, whose PAD would apply 1 to 2 times the correction)."""
    if not _near_one(x, c, optimizer):
        return pad(x, c, cfg)
    return scalar_mul(x, 1 / c, cfg, optimizer=True)


def scalar_scale(x, s, optimizer=None):
    """:func:`~pamtorch.ops.table.scale` (an ``alpha``/``value`` factor; x itself for
    s == 1) with :func:`scalar_mul`'s optimizer form."""
    return x if s == 1 else scalar_mul(x, s, optimizer=optimizer)


# elementwise arithmetic

def _complex_pam(a, b, cfg):
    """(ar + i·ai)·̂(br + i·bi) = (ar·̂br − ai·̂bi) + i·(ar·̂bi + ai·̂br): four PAMs (rotary
    embeddings written with ``view_as_complex``)."""
    def parts(x):
        if isinstance(x, torch.Tensor) and x.is_complex():
            return x.real, x.imag
        if isinstance(x, complex):
            return x.real, x.imag
        return x, 0.0
    (ar, ai), (br, bi) = parts(a), parts(b)
    real = pam(ar, br, cfg) - pam(ai, bi, cfg)
    imag = pam(ar, bi, cfg) + pam(ai, br, cfg)
    return torch.complex(real, imag)


@implements([aten.mul, aten.mul_], "elementwise")
def _pa_mul(func, args, kwargs, cfg):
    a, b = args[0], args[1]
    if any(isinstance(x, complex) or (isinstance(x, torch.Tensor) and x.is_complex()) for x in (a, b)):
        return inplace(func, args, _complex_pam(a, b, cfg))
    if isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        return inplace(func, args, scalar_mul(a, b, cfg))
    return inplace(func, args, pam(a, b, cfg))


accepts_complex([aten.mul, aten.mul_])
passes_through("conj _conj conj_physical conj_physical_ resolve_conj resolve_neg _neg_view view_as_complex "
               "view_as_real real imag complex")


@implements([aten.div, aten.div_], "elementwise")
def _pa_div(func, args, kwargs, cfg):
    out = scalar_div(args[0], args[1], cfg=cfg) if isinstance(args[0], torch.Tensor) else pad(args[0], args[1], cfg)
    mode = kwargs.get("rounding_mode")
    if mode == "floor":
        out = torch.floor(out)
    elif mode == "trunc":
        out = torch.trunc(out)
    return inplace(func, args, out)


@implements([aten.addcmul, aten.addcmul_], "elementwise")
def _pa_addcmul(func, args, kwargs, cfg):
    inp, t1, t2 = args[:3]
    value = kwargs.get("value", args[3] if len(args) > 3 else 1)
    return inplace(func, args, inp + scalar_scale(pam(t1, t2, cfg), value))


@implements([aten.addcdiv, aten.addcdiv_], "elementwise")
def _pa_addcdiv(func, args, kwargs, cfg):
    inp, t1, t2 = args[:3]
    value = kwargs.get("value", args[3] if len(args) > 3 else 1)
    return inplace(func, args, inp + scalar_scale(pad(t1, t2, cfg), value))


@implements([aten.lerp, aten.lerp_], "elementwise")
def _pa_lerp(func, args, kwargs, cfg):
    start, end, weight = args[:3]
    return inplace(func, args, start + scalar_mul(end - start, weight, cfg))


def _rounded(fn, x, cfg, *rest):
    """fn(x, *rest) with x and the result rounded to the kind's mantissa bits."""
    k = cfg.mantissa_bits
    if k is None or not isinstance(x, torch.Tensor):
        return fn(x, *rest)
    return arith.round_mantissa(fn(arith.round_mantissa(x, k), *rest), k)


def _unary(fn, takes_offset=False):
    def impl(func, args, kwargs, cfg):
        x = args[0]
        if takes_offset:  # exp and log: the offset enters their inner PAM / PAD
            off = arith.round_offset(cfg.offset, x.dtype, cfg.mantissa_bits)
            return inplace(func, args, _rounded(fn, x, cfg, off))
        return inplace(func, args, _rounded(fn, x, cfg))
    return impl


for _ops, _fn, _off in [
    ([aten.sqrt, aten.sqrt_], arith.pa_sqrt, False),
    ([aten.rsqrt, aten.rsqrt_], arith.pa_rsqrt, False),
    ([aten.exp, aten.exp_], arith.pa_exp, True),
    ([aten.log, aten.log_], arith.pa_log, True),
    ([aten.exp2, aten.exp2_], arith.paexp2, False),
    ([aten.log2, aten.log2_], arith.palog2, False),
    ([aten.reciprocal, aten.reciprocal_], arith.pa_reciprocal, False),
]:
    implements(_ops, "elementwise")(_unary(_fn, _off))


@implements([aten.pow, aten.pow_], "elementwise")
def _pa_pow(func, args, kwargs, cfg):
    return inplace(func, args, _rounded(pow_any, args[0], cfg, args[1]))


def pow_any(x, p):
    """x ** p for the operands aten.pow takes: a tensor to a Python number or a 0-d
    tensor (PA pow), a Python number to a tensor (:func:`scalar_pow`); an exponent
    tensor with values of its own has no PA form."""
    if isinstance(x, torch.Tensor) and isinstance(p, torch.Tensor):
        if p.dim() == 0 and (not p.is_floating_point() or p.device.type == "cpu"):
            p = p.item()
        else:
            raise UnsupportedOpError("pamtorch.mode: aten.pow with a tensor exponent has no PA "
                                     "implementation; use a Python number exponent")
    if not isinstance(x, torch.Tensor):
        return scalar_pow(x, p)
    return arith.pa_pow(x, float(p))


def _odd_integer(p):
    """(p is a finite integer, p is an odd integer) for a float tensor p; floats of 2^53
    and above are even, so clamping there keeps the parity."""
    integer = (p == torch.trunc(p)) & torch.isfinite(p)
    n = torch.where(integer, p, torch.zeros_like(p)).to(torch.float64).clamp(-2.0 ** 53, 2.0 ** 53)
    return integer, integer & ((n.to(torch.int64) & 1) == 1)


def scalar_pow(s, p: torch.Tensor) -> torch.Tensor:
    """s ** p for a Python number s and a float tensor p, with torch.pow's rules:
    paexp2(p ·̂ log2|s|) for finite nonzero s (log2|s| an exact Python float, like every
    Python-side scalar); for s < 0 the sign (-1)^p where p is an integer and NaN where p
    is finite and not; 0**p, inf**p, 1**p and nan**p are their IEEE values and x**0 = 1
    (selects, no multiplication)."""
    s = float(s)
    _, p = promote(s, p)
    integer, odd = _odd_integer(p)
    negative = math.copysign(1.0, s) < 0
    if math.isnan(s):
        out = torch.full_like(p, math.nan)
    elif abs(s) == 1:  # 1**p = 1 (NaN p too); (-1)**±inf = 1
        out = torch.ones_like(p)
        if negative:
            out = torch.where(torch.isfinite(p) & ~integer | torch.isnan(p), torch.nan, out)
    elif s == 0 or math.isinf(s):
        big, small = (math.inf, 0.0) if s != 0 else (0.0, math.inf)
        out = torch.where(p > 0, big, torch.where(p < 0, small, math.nan)).to(p.dtype)
    else:
        out = arith.paexp2(pam(p, math.log2(abs(s))))
        if negative:
            out = torch.where(torch.isfinite(p) & ~integer, torch.nan, out)
    if negative:
        out = torch.where(odd, -out, out)
    return torch.where(p == 0, torch.ones_like(out), out)


@implements([aten.square], "elementwise")
def _pa_square(func, args, kwargs, cfg):
    return pam(args[0], args[0], cfg)


@implements([aten.add, aten.add_, aten.sub, aten.sub_], "elementwise")
def _pa_add_alpha(func, args, kwargs, cfg):
    """add/sub are additions; only an ``alpha`` other than 1 needs a PAM."""
    alpha = kwargs.get("alpha", 1)
    a, b = args[0], args[1]
    b = scalar_scale(b, alpha)
    sub = func.overloadpacket in (aten.sub, aten.sub_)
    out = (a - b) if sub else (a + b)
    return inplace(func, args, out)


@implements([aten.mean], "elementwise")
def _pa_mean(func, args, kwargs, cfg):
    """sum ÷̂ n. With ``dtype`` the input is cast first, as torch does; for float64 the
    sum is a float64 sum and the PAD runs on float64 patterns."""
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    dtype = kwargs.get("dtype")
    if dtype is not None:
        x = x.to(dtype)
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        s, n = x.sum(), x.numel()
    else:
        dims = [dim] if isinstance(dim, int) else list(dim)
        s = x.sum(dims, keepdim=keepdim)
        n = math.prod(x.shape[d] for d in dims)
    if dtype is torch.float64:
        return arith.pad(s, torch.tensor(float(n), dtype=torch.float64, device=s.device))
    return pad(s, float(n), cfg)


def norm2(x, dim=None, keepdim=False):
    """Euclidean norm: PA squares, an ordinary sum, PA sqrt."""
    sq = arith.pam(x, x)
    s = sq.sum() if dim is None else sq.sum(dim, keepdim=keepdim)
    return arith.pa_sqrt(s)


def check_ord(ord_):
    if float(ord_) != 2.0:
        raise UnsupportedOpError(f"pamtorch.mode: only the 2-norm is piecewise affine, got ord={ord_}")


@implements([aten.linalg_vector_norm], "elementwise")
def _pa_vector_norm(func, args, kwargs, cfg):
    x = args[0]
    ord_ = args[1] if len(args) > 1 else kwargs.get("ord", 2)
    dim = args[2] if len(args) > 2 else kwargs.get("dim")
    keepdim = args[3] if len(args) > 3 else kwargs.get("keepdim", False)
    check_ord(ord_)
    dtype = kwargs.get("dtype")
    if dtype is not None:
        x = x.to(dtype)
    return norm2(x, dim, keepdim)


@implements([aten.native_dropout], "elementwise")
def _pa_dropout(func, args, kwargs, cfg):
    x, p, train = args[0], args[1], arg(args, kwargs, 2, "train", True)
    return PF.dropout_forward(x, p, True if train is None else train)


@implements([aten.native_dropout_backward], "elementwise")
def _pa_dropout_backward(func, args, kwargs, cfg):
    return PF.dropout_backward(args[0], args[1], args[2])
