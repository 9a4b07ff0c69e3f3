"""Piecewise affine arithmetic on bit patterns.

A float is (-1)^S 2^E (1+M). Its magnitude bit pattern P = (E + bias_e) << m + M·2^m is,
on each binade, an affine function of the value, so integer additions of patterns give
the piecewise affine (PA) operations of Kosson & Jaggi (2023):

    PAM(a, b) = P_a + P_b - B        (Mitchell's multiplication, B = bits of 1.0)
    PAD(a, b) = P_a - P_b + B        (its inverse, the division)
    palog2(x) = (P_x - B) / 2^m      = E + M
    paexp2(y) = pattern y·2^m + B    = 2^floor(y) (1 + y - floor(y))

Everything here is integer arithmetic, comparisons, selects and float additions or
roundings: no float multiplication or division runs, not even to scale by 2^k, which is
done by adding k to the exponent field. float32, bfloat16 and float16 are each computed
on their own patterns. Composite ops (exp, log, pow) carry their intermediate in float64
PA arithmetic and round once to the output dtype. docs/numerics.md is the spec.

These functions take tensors of one supported dtype (broadcastable) and do not track
gradients; ``pamtorch.autograd`` wraps them with the two derivative kinds.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from .recording import recorded

__all__ = [
    "SUPPORTED_DTYPES",
    "Format",
    "fmt",
    "pam",
    "pad",
    "palog2",
    "paexp2",
    "pa_exp",
    "pa_log",
    "pa_sqrt",
    "pa_rsqrt",
    "pa_reciprocal",
    "pa_pow",
    "exponent",
    "mantissa_field",
    "is_zero",
    "is_finite_nonzero",
    "scale_pow2",
    "round_mantissa",
    "round_offset",
    "check_offset",
    "check_mantissa_bits",
    "offset_bits",
    "LOG2E",
    "LN2",
]

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


class Format(NamedTuple):
    """Bit layout of a floating-point dtype, as used by the PA operations."""

    dtype: torch.dtype
    view: torch.dtype      # same-width integer dtype used to reinterpret the bits
    work: torch.dtype      # wider integer dtype the pattern arithmetic runs in
    bits: int
    mbits: int             # mantissa (fraction) bits
    ebias: int             # exponent bias
    bias: int              # pattern of 1.0
    min_normal: int        # pattern of the smallest normal
    inf: int               # pattern of +inf
    nan: int               # canonical quiet NaN pattern


_FORMATS = {
    torch.float32: Format(torch.float32, torch.int32, torch.int64, 32, 23, 127,
                          0x3F800000, 0x00800000, 0x7F800000, 0x7FC00000),
    torch.bfloat16: Format(torch.bfloat16, torch.int16, torch.int32, 16, 7, 127,
                           0x3F80, 0x0080, 0x7F80, 0x7FC0),
    torch.float16: Format(torch.float16, torch.int16, torch.int32, 16, 10, 15,
                          0x3C00, 0x0400, 0x7C00, 0x7E00),
    torch.float64: Format(torch.float64, torch.int64, torch.int64, 64, 52, 1023,
                          0x3FF0000000000000, 0x0010000000000000,
                          0x7FF0000000000000, 0x7FF8000000000000),
}

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fmt(dtype: torch.dtype) -> Format:
    """The bit layout of ``dtype``; TypeError for dtypes the PA ops don't support."""
    if dtype not in SUPPORTED_DTYPES and dtype is not torch.float64:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"pamtorch: unsupported dtype {dtype}; supported dtypes are {names}")
    return _FORMATS[dtype]


def _split(x: torch.Tensor, f: Format):
    """(negative: bool tensor, magnitude pattern in f.work)."""
    p = x.view(f.view).to(f.work)
    if f.bits == 16:
        p = p & 0xFFFF
        neg = p >= 0x8000
        return neg, p & 0x7FFF
    if f.bits == 32:
        neg = p < 0
        return neg, p & 0x7FFFFFFF
    neg = p < 0
    return neg, p & 0x7FFFFFFFFFFFFFFF


def _join(neg: torch.Tensor, mag: torch.Tensor, f: Format) -> torch.Tensor:
    """Float tensor from a sign and a magnitude pattern already in [0, f.nan]."""
    if f.bits == 64:
        return torch.where(neg, mag | (-(2 ** 63)), mag).view(torch.float64)
    signed = torch.where(neg, mag - (1 << f.bits - 1), mag)  # two's complement of the sign bit
    return signed.to(f.view).view(f.dtype)


def _range(r: torch.Tensor, f: Format) -> torch.Tensor:
    """Flush patterns below the smallest normal to 0 and clamp overflow to inf."""
    r = torch.where(r < f.min_normal, torch.zeros_like(r), r)
    return r.clamp_max(f.inf)


def _classes(mag: torch.Tensor, f: Format):
    zero = mag < f.min_normal
    inf = mag == f.inf
    nan = mag > f.inf
    return zero, inf, nan


# ---------------------------------------------------------------------------
# compiled float32 CPU kernels (pamtorch/kernels/cpu/pa_elementwise.cpp): bit-exact ports
# of the torch implementations below, which stay the definition and the fallback.

_COMPILED = True   # tests set this to False to run the torch implementations
_EXT = None


def _ext(*ts):
    """The compiled module when every operand is a float32 CPU tensor, else None."""
    if not _COMPILED:
        return None
    for t in ts:
        if t.dtype is not torch.float32 or t.device.type != "cpu":
            return None
    return _loaded()


def _loaded():
    """The compiled module (built or loaded on first use), or None where it is unavailable."""
    global _EXT
    if _EXT is None:
        from .kernels.cpu import load_extension  # lazy: the kernels package imports arith

        _EXT = load_extension() or False
    return _EXT or None


# compiled bfloat16/float16 kernels (pamtorch/kernels/cpu/pa_lowp.cpp): PAM and PAD on the
# 16-bit patterns, and every unary op as a lookup in a table of its 65536 results, which
# the op's definition below computes once per dtype (and parameter).

_LOWP = True   # tests set this (or _COMPILED) to False to run the torch implementations


def _lowp(*ts):
    """The compiled module when the operands are CPU tensors of one 16-bit dtype, else None."""
    if not (_LOWP and _COMPILED):
        return None
    d = ts[0].dtype
    if d is not torch.bfloat16 and d is not torch.float16:
        return None
    for t in ts:
        if t.dtype is not d or t.device.type != "cpu":
            return None
    return _loaded()


@functools.lru_cache(maxsize=64)
def _table(definition, dtype: torch.dtype, *params) -> torch.Tensor:
    """definition(x, *params) for x = every pattern of the 16-bit ``dtype``, indexed by the
    pattern read as unsigned (what ``lowp_lookup`` reads). Computed outside any torch
    function or dispatch mode and kernel route (the table is used wherever the op runs
    next)."""
    from torch.utils._python_dispatch import _disable_current_modes

    from .kernels.cpu import route_paused  # lazy: the kernels package imports arith

    with torch._C.DisableTorchFunction(), _disable_current_modes(), route_paused(), torch.inference_mode(False):
        p = torch.arange(1 << 16, dtype=torch.int32)
        x = torch.where(p >= 1 << 15, p - (1 << 16), p).to(torch.int16).view(dtype)
        return definition(x, *params).contiguous()


def _lookup(ext, x: torch.Tensor, definition, *params) -> torch.Tensor:
    """definition(x, *params) elementwise, by table lookup on x's 16-bit patterns."""
    return ext.lowp_lookup(x, _table(definition, x.dtype, *params))


def check_offset(offset, where: str = "pamtorch") -> float | None:
    """``offset`` as a float, or None; ValueError unless 0.5 <= offset <= 2.

    An offset is a correction of PA's systematic error (PAM's relative error lies in
    [-1/9, 0], so α = 1.0552 centres it), applied as an integer added to the result
    pattern; within [0.5, 2] that integer is at most one binade, which the kernels'
    range logic relies on."""
    if offset is None:
        return None
    if isinstance(offset, bool) or not isinstance(offset, (int, float)):
        raise TypeError(f"{where}: offset must be a Python number or None, got {type(offset).__name__}")
    offset = float(offset)
    if not 0.5 <= offset <= 2.0:
        raise ValueError(f"{where}: offset must be in [0.5, 2] (a correction factor near 1, such as "
                         f"1.0552), got {offset!r}")
    return offset


def offset_bits(offset: float, dtype: torch.dtype) -> int:
    """D = P_α - B: the integer the offset α (rounded to ``dtype``) adds to a PAM pattern
    (and subtracts from a PAD pattern); |D| <= 2^m since 0.5 <= α <= 2."""
    f = fmt(dtype)
    _, m = _split(torch.tensor(offset, dtype=dtype), f)
    return int(m) - f.bias


def _compiled_binary(name: str, a: torch.Tensor, b: torch.Tensor):
    """``name`` ("pam" or "pad") of a and b by a compiled kernel: the float32 one or the
    16-bit one, whichever the operands take; None when neither does."""
    ext = _ext(a, b)
    if ext is not None:
        return getattr(ext, "ew_" + name)(a, b)
    ext = _lowp(a, b)
    if ext is not None:
        return getattr(ext, "lowp_" + name)(a, b)
    return None


@recorded("pam", "other")
def pam(a: torch.Tensor, b: torch.Tensor, offset: float | None = None) -> torch.Tensor:
    """PAM: pattern P_a + P_b - B with sign S_a xor S_b (IEEE rules for the specials).

    With ``offset`` α (0.5 <= α <= 2, rounded to the dtype) the pattern is
    P_a + P_b - B + (P_α - B), range rules applied once: a ·̂ b ·̂ α in one integer add."""
    offset = check_offset(offset, "pamtorch.arith.pam")
    if offset is None:
        out = _compiled_binary("pam", a, b)
        if out is not None:
            return out
    f = fmt(a.dtype)
    na, ma = _split(a, f)
    nb, mb = _split(b, f)
    za, ia, xa = _classes(ma, f)
    zb, ib, xb = _classes(mb, f)
    t = ma - f.bias
    if offset is not None:
        t = t + offset_bits(offset, a.dtype)
    s = t + mb
    r = _range(s, f)
    if f.bits == 64:  # only float64 patterns can wrap around the work dtype
        r = torch.where((t > 0) & (s < 0), torch.full_like(r, f.inf), r)
    r = torch.where(za | zb, torch.zeros_like(r), r)
    r = torch.where(ia | ib, torch.full_like(r, f.inf), r)
    nan = xa | xb | ((ia | ib) & (za | zb))
    r = torch.where(nan, torch.full_like(r, f.nan), r)
    return _join((na ^ nb) & ~nan, r, f)


@recorded("pad", "other")
def pad(a: torch.Tensor, b: torch.Tensor, offset: float | None = None) -> torch.Tensor:
    """PAD: pattern P_a - P_b + B with sign S_a xor S_b (IEEE rules for the specials).

    With ``offset`` α the pattern is P_a - P_b + B - (P_α - B), a ÷̂ b ÷̂ α (PAD
    overestimates where PAM underestimates, so the same α > 1 compensates both), as the
    paper's released kernels define it."""
    offset = check_offset(offset, "pamtorch.arith.pad")
    if offset is None:
        out = _compiled_binary("pad", a, b)
        if out is not None:
            return out
    f = fmt(a.dtype)
    na, ma = _split(a, f)
    nb, mb = _split(b, f)
    za, ia, xa = _classes(ma, f)
    zb, ib, xb = _classes(mb, f)
    d = ma - mb
    c = f.bias if offset is None else f.bias - offset_bits(offset, a.dtype)
    r = _range(d + c, f)
    if f.bits == 64:
        r = torch.where(d > f.inf - c, torch.full_like(r, f.inf), r)
    r = torch.where(za | ib, torch.zeros_like(r), r)
    r = torch.where(zb | ia, torch.full_like(r, f.inf), r)
    nan = xa | xb | (za & zb) | (ia & ib)
    r = torch.where(nan, torch.full_like(r, f.nan), r)
    return _join((na ^ nb) & ~nan, r, f)


def check_mantissa_bits(k, where: str = "pamtorch") -> int | None:
    """``k`` as an int, or None; ValueError unless 1 <= k <= 23."""
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{where}: mantissa_bits must be an int or None, got {type(k).__name__}")
    if not 1 <= k <= 23:
        raise ValueError(f"{where}: mantissa_bits must be between 1 and 23 (float32's mantissa "
                         f"width), got {k}")
    return k


def round_mantissa(x: torch.Tensor, k: int | None) -> torch.Tensor:
    """x rounded to ``k`` mantissa bits, ties to even, on the bit pattern (integer ops).

    The dropped d = m - k low bits are rounded into the pattern (a carry may move the
    value to the next binade, or past the largest finite value to inf); zeros and
    subnormals become signed zero (PA arithmetic treats them as zero), inf and NaN pass
    through. k >= the dtype's mantissa width leaves x unchanged (subnormals flushed)."""
    if k is None:
        return x
    k = check_mantissa_bits(k, "pamtorch.round_mantissa")
    ext = _lowp(x)
    return _lookup(ext, x, _round_mantissa, k) if ext is not None else _round_mantissa(x, k)


def _round_mantissa(x: torch.Tensor, k: int) -> torch.Tensor:
    f = fmt(x.dtype)
    neg, m = _split(x, f)
    zero, inf, nan = _classes(m, f)
    d = f.mbits - k
    if d > 0:
        lsb = (m >> d) & 1
        r = (m + ((1 << (d - 1)) - 1) + lsb) & ~((1 << d) - 1)  # at most the inf pattern
    else:
        r = m
    r = torch.where(zero, torch.zeros_like(r), r)
    r = torch.where(inf | nan, m, r)
    return _join(neg, r, f)


def round_offset(offset: float | None, dtype: torch.dtype, k: int | None) -> float | None:
    """The offset an op on ``dtype`` operands rounded to ``k`` mantissa bits uses: α rounded
    to ``dtype``, then to k bits like every operand (so PAM terms keep k bits)."""
    if offset is None:
        return None
    t = torch.tensor(check_offset(offset), dtype=dtype)
    return float(round_mantissa(t, k)) if k is not None else float(t)


# ---------------------------------------------------------------------------
# exponent-field helpers (also used by the exact derivatives)

def exponent(x: torch.Tensor) -> torch.Tensor:
    """Unbiased exponent E of |x| as int32 (meaningful for normal x)."""
    f = fmt(x.dtype)
    _, m = _split(x, f)
    return ((m >> f.mbits) - f.ebias).to(torch.int32)


def mantissa_field(x: torch.Tensor) -> torch.Tensor:
    """The m-bit fraction field of |x| (0 for zeros and subnormals), in the work dtype."""
    f = fmt(x.dtype)
    _, m = _split(x, f)
    frac = m & ((1 << f.mbits) - 1)
    return torch.where(m < f.min_normal, torch.zeros_like(frac), frac)


def is_zero(x: torch.Tensor) -> torch.Tensor:
    """True where x is ±0 or subnormal, the values PA arithmetic treats as zero."""
    f = fmt(x.dtype)
    _, m = _split(x, f)
    return m < f.min_normal


def is_finite_nonzero(x: torch.Tensor) -> torch.Tensor:
    f = fmt(x.dtype)
    _, m = _split(x, f)
    return (m >= f.min_normal) & (m < f.inf)


@recorded("scale_pow2", "other")
def scale_pow2(x: torch.Tensor, k: torch.Tensor, negate: torch.Tensor | None = None) -> torch.Tensor:
    """x · 2^k (· -1 where ``negate``) by adding k to the exponent field of x.

    Zeros and subnormals give signed zero, inf and NaN pass through, results below the
    smallest normal flush to zero and above the largest finite become inf.
    """
    f = fmt(x.dtype)
    n, m = _split(x, f)
    zero, inf, nan = _classes(m, f)
    r = _range(m + (k.to(f.work) << f.mbits), f)
    r = torch.where(zero, torch.zeros_like(r), r)
    r = torch.where(inf | nan, m, r)
    if negate is not None:
        n = n ^ negate
    return _join(n, r, f)


# ---------------------------------------------------------------------------
# log2 / exp2 and the ops built from them

def _palog2_f64(x: torch.Tensor):
    """(negative, magnitude pattern, palog2(|x|) exactly in float64): (P - B)/2^m, the 2^-m
    applied to the exponent field."""
    f = fmt(x.dtype)
    neg, m = _split(x, f)
    return neg, m, _ldexp_f64((m - f.bias).to(torch.float64), -f.mbits)


def _ldexp_f64(v: torch.Tensor, k) -> torch.Tensor:
    """v · 2^k for float64 v by exponent-field addition (v, v·2^k normal or zero)."""
    f = _FORMATS[torch.float64]
    n, m = _split(v, f)
    return _join(n, torch.where(m == 0, m, m + (k << 52)), f)


@recorded("palog2", "other")
def palog2(x: torch.Tensor) -> torch.Tensor:
    """palog2(x) = E + M for x > 0; -inf for zero/subnormal, NaN for x < 0, inf for inf."""
    ext = _lowp(x)
    return _lookup(ext, x, _palog2) if ext is not None else _palog2(x)


def _palog2(x: torch.Tensor) -> torch.Tensor:
    f = fmt(x.dtype)
    neg, m, l64 = _palog2_f64(x)
    zero, inf, nan = _classes(m, f)
    out = torch.where(zero, torch.full_like(l64, -math.inf), l64)
    out = torch.where(inf, torch.full_like(l64, math.inf), out)
    out = torch.where(nan | (neg & ~zero), torch.full_like(l64, math.nan), out)
    return out.to(x.dtype)


def _paexp2_f64(y: torch.Tensor, f: Format) -> torch.Tensor:
    """paexp2 of float64 y, rounded once into format f: pattern round(y·2^m) + B."""
    lim = float(2 ** (f.bits - f.mbits))  # beyond every finite/normal boundary of f
    yc = torch.nan_to_num(y, nan=0.0).clamp(-lim, lim)
    t = torch.round(_ldexp_f64(yc, f.mbits))  # exact scale, then round half to even
    r = _range(t.to(torch.int64) + f.bias, f).to(f.work)
    r = torch.where(torch.isnan(y), torch.full_like(r, f.nan), r)
    return _join(torch.zeros_like(r, dtype=torch.bool), r, f)


@recorded("paexp2", "other")
def paexp2(y: torch.Tensor) -> torch.Tensor:
    """paexp2(y) = 2^floor(y) (1 + y - floor(y)); overflows to inf, underflows to 0."""
    ext = _lowp(y)
    return _lookup(ext, y, _paexp2) if ext is not None else _paexp2(y)


def _paexp2(y: torch.Tensor) -> torch.Tensor:
    return _paexp2_f64(y.to(torch.float64), fmt(y.dtype))


def _offset64(offset: float | None, dtype: torch.dtype) -> float | None:
    """The offset α rounded to ``dtype``, as the float64 the composite ops carry it in."""
    return None if offset is None else float(torch.tensor(offset, dtype=dtype))


@recorded("pa_exp", "other")
def pa_exp(x: torch.Tensor, offset: float | None = None) -> torch.Tensor:
    """exp(x) = paexp2(x ·̂ log2 e), the PAM carried in float64. With ``offset`` α the PAM
    takes it, paexp2(x ·̂ log2 e ·̂ α) ≈ e^(αx), as in the paper's released code."""
    offset = check_offset(offset, "pamtorch.arith.pa_exp")
    ext = _ext(x) if offset is None else None
    if ext is not None:
        return ext.ew_exp(x)
    ext = _lowp(x)
    return _lookup(ext, x, _pa_exp, offset) if ext is not None else _pa_exp(x, offset)


def _pa_exp(x: torch.Tensor, offset: float | None) -> torch.Tensor:
    f = fmt(x.dtype)
    y = pam(x.to(torch.float64), torch.full((), LOG2E, dtype=torch.float64), _offset64(offset, x.dtype))
    return _paexp2_f64(y, f)


@recorded("pa_log", "other")
def pa_log(x: torch.Tensor, offset: float | None = None) -> torch.Tensor:
    """log(x) = palog2(x) ÷̂ log2 e, carried in float64 and rounded once. With ``offset`` α
    the PAD takes it, palog2(x) ÷̂ log2 e ÷̂ α ≈ ln(x)/α, as in the paper's released code."""
    offset = check_offset(offset, "pamtorch.arith.pa_log")
    ext = _ext(x) if offset is None else None
    if ext is not None:
        return ext.ew_log(x)
    ext = _lowp(x)
    return _lookup(ext, x, _pa_log, offset) if ext is not None else _pa_log(x, offset)


def _pa_log(x: torch.Tensor, offset: float | None) -> torch.Tensor:
    f = fmt(x.dtype)
    neg, m, l64 = _palog2_f64(x)
    zero, inf, nan = _classes(m, f)
    out = pad(l64, torch.full((), LOG2E, dtype=torch.float64), _offset64(offset, x.dtype))
    out = torch.where(zero, torch.full_like(out, -math.inf), out)
    out = torch.where(inf, torch.full_like(out, math.inf), out)
    out = torch.where(nan | (neg & ~zero), torch.full_like(out, math.nan), out)
    return out.to(x.dtype)


def _half_round_even(n: torch.Tensor) -> torch.Tensor:
    """round(n / 2), ties to even, for integer tensors."""
    h = n >> 1
    return torch.where((n & 1).bool() & (h & 1).bool(), h + 1, h)


def _sqrt_like(x: torch.Tensor, sign: int) -> torch.Tensor:
    f = fmt(x.dtype)
    neg, m = _split(x, f)
    zero, inf, nan = _classes(m, f)
    r = _range(_half_round_even(sign * (m - f.bias)) + f.bias, f)
    small, big = (0, f.inf) if sign > 0 else (f.inf, 0)
    r = torch.where(zero, torch.full_like(r, small), r)
    r = torch.where(inf, torch.full_like(r, big), r)
    bad = nan | (neg & ~zero)
    r = torch.where(bad, torch.full_like(r, f.nan), r)
    return _join(neg & zero, r, f)


@recorded("pa_sqrt", "other")
def pa_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt(x) = paexp2(palog2(x) / 2): pattern round((P - B)/2) + B. sqrt(-0) = -0."""
    ext = _ext(x)
    if ext is not None:
        return ext.ew_sqrt(x)
    ext = _lowp(x)
    return _lookup(ext, x, _sqrt_like, 1) if ext is not None else _sqrt_like(x, 1)


@recorded("pa_rsqrt", "other")
def pa_rsqrt(x: torch.Tensor) -> torch.Tensor:
    """rsqrt(x) = paexp2(-palog2(x) / 2): pattern round((B - P)/2) + B. rsqrt(-0) = -inf."""
    ext = _ext(x)
    if ext is not None:
        return ext.ew_rsqrt(x)
    ext = _lowp(x)
    return _lookup(ext, x, _sqrt_like, -1) if ext is not None else _sqrt_like(x, -1)


@recorded("pa_reciprocal", "other")
def pa_reciprocal(x: torch.Tensor) -> torch.Tensor:
    """1 ÷̂ x (PAD): pattern 2B - P."""
    return pad(torch.ones_like(x), x)


@recorded("pa_pow", "other")
def pa_pow(x: torch.Tensor, p: float) -> torch.Tensor:
    """pow(x, p) = paexp2(palog2(|x|) ·̂ p), carried in float64 and rounded once.

    Negative x gives NaN unless p is an integer, then the sign is (-1)^p, as torch.pow.
    pow(x, 0) = 1 for every x (NaN included), as torch.pow. The IEEE values where
    palog2(|x|) ·̂ p is 0 ·̂ inf or NaN: pow(±1, ±inf) = 1 and pow(1, NaN) = 1; and
    p = ±inf counts as an even integer, so pow(-2, inf) = inf and pow(-0.5, inf) = 0.
    """
    fmt(x.dtype)  # TypeError for unsupported dtypes, pow(x, 0) included
    p = float(p)
    if p == 0.0:
        return torch.ones_like(x)
    ext = _ext(x)
    if ext is not None:
        return ext.ew_pow(x, p)
    ext = _lowp(x)
    return _lookup(ext, x, _pa_pow, p) if ext is not None else _pa_pow(x, p)


def _pa_pow(x: torch.Tensor, p: float) -> torch.Tensor:
    f = fmt(x.dtype)
    neg, m, l64 = _palog2_f64(x)
    zero, inf, nan = _classes(m, f)
    l64 = torch.where(zero, torch.full_like(l64, -math.inf), l64)
    l64 = torch.where(inf, torch.full_like(l64, math.inf), l64)
    y = pam(l64, torch.full((), p, dtype=torch.float64))
    out = _paexp2_f64(y, f)
    if not math.isfinite(p):
        one = (l64 == 0) if math.isinf(p) else (l64 == 0) & ~neg
        out = torch.where(one, torch.ones_like(out), out)
    if math.isfinite(p) and p == math.floor(p):
        if int(p) % 2 == 1:
            out = torch.where(neg, -out, out)
    elif math.isfinite(p):
        out = torch.where(neg & ~zero, torch.full_like(out, math.nan), out)
        out = torch.where(neg & zero, out.abs(), out)
    return torch.where(nan, torch.full_like(out, math.nan), out)
