"""Float64 reference for the piecewise affine arithmetic, written from the math.

Nothing here reads or writes bit patterns: values are split with ``np.frexp`` into
(-1)^S 2^E (1+M) and the formulas of docs/numerics.md are evaluated in float64, which
holds every intermediate exactly for float32, bfloat16 and float16 inputs. The result
is then rounded to the target dtype once. Tests compare the kernels against this.
"""
import numpy as np
import torch

# (smallest normal, exponent of the largest binade, mantissa bits) per dtype
FORMATS = {
    torch.float32: (2.0 ** -126, 127, 23),
    torch.bfloat16: (2.0 ** -126, 127, 7),
    torch.float16: (2.0 ** -14, 15, 10),
    torch.float64: (2.0 ** -1022, 1023, 52),   # range of the composite ops' intermediates
}

LOG2E = float(np.log2(np.e))


def _over(emax):
    """2^(emax+1): the first magnitude that overflows (inf for float64 itself)."""
    return np.inf if emax >= 1023 else 2.0 ** (emax + 1)


def split(x):
    """|x| = 2^E (1+M) with M in [0,1), for finite nonzero x (float64 arrays)."""
    m, e = np.frexp(np.abs(x))
    return e.astype(np.float64) - 1.0, 2.0 * m - 1.0


def to_f64(t):
    return t.detach().to(torch.float64).cpu().numpy()


def round_to(x, dtype):
    """Round float64 values to ``dtype`` with flush of results below the smallest normal
    and overflow to inf at 2^(emax+1), the library's range rules."""
    tiny, emax, _ = FORMATS[dtype]
    x = np.asarray(x, dtype=np.float64)
    out = torch.from_numpy(x.copy()).to(dtype)
    o = out.to(torch.float64).numpy()
    with np.errstate(invalid="ignore"):
        small = np.isfinite(x) & (np.abs(o) < tiny)
        big = np.isfinite(x) & (np.abs(x) >= _over(emax))
    o = np.where(small, np.copysign(0.0, x), o)
    o = np.where(big, np.copysign(np.inf, x), o)
    return torch.from_numpy(o).to(dtype)


def _classify(x, dtype):
    tiny = FORMATS[dtype][0]
    nan = np.isnan(x)
    inf = np.isinf(x)
    zero = ~nan & ~inf & (np.abs(x) < tiny)  # zeros and subnormals
    return nan, inf, zero


def _signbit(x):
    return np.signbit(x)


def pam(a, b, dtype):
    """PAM of float64 arrays holding ``dtype`` values. Returns float64 (exact)."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    tiny, emax, _ = FORMATS[dtype]
    na, ia, za = _classify(a, dtype)
    nb, ib, zb = _classify(b, dtype)
    neg = _signbit(a) ^ _signbit(b)
    sign = np.where(neg, -1.0, 1.0)
    normal = ~(na | nb | ia | ib | za | zb)
    with np.errstate(all="ignore"):
        ea, ma = split(np.where(normal, a, 1.0))
        eb, mb = split(np.where(normal, b, 1.0))
        s = ma + mb
        c = (s >= 1.0).astype(np.float64)
        mag = np.ldexp(1.0 + s - c, (ea + eb + c).astype(np.int64))
        mag = np.where(mag < tiny, 0.0, mag)
        mag = np.where(mag >= _over(emax), np.inf, mag)
    out = sign * mag
    out = np.where(za | zb, sign * 0.0, out)
    out = np.where(ia | ib, sign * np.inf, out)
    out = np.where(na | nb | ((ia | ib) & (za | zb)), np.nan, out)
    return out


def pad(a, b, dtype):
    """PAD (division) of float64 arrays holding ``dtype`` values. Returns float64."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    tiny, emax, _ = FORMATS[dtype]
    na, ia, za = _classify(a, dtype)
    nb, ib, zb = _classify(b, dtype)
    neg = _signbit(a) ^ _signbit(b)
    sign = np.where(neg, -1.0, 1.0)
    normal = ~(na | nb | ia | ib | za | zb)
    with np.errstate(all="ignore"):
        ea, ma = split(np.where(normal, a, 1.0))
        eb, mb = split(np.where(normal, b, 1.0))
        c = (ma < mb).astype(np.float64)
        mag = np.ldexp(1.0 + ma - mb + c, (ea - eb - c).astype(np.int64))
        mag = np.where(mag < tiny, 0.0, mag)
        mag = np.where(mag >= _over(emax), np.inf, mag)
    out = sign * mag
    out = np.where(za & ~zb, sign * 0.0, out)            # 0 / x
    out = np.where(ib & ~ia, sign * 0.0, out)            # x / inf
    out = np.where(zb & ~za, sign * np.inf, out)         # x / 0
    out = np.where(ia & ~ib, sign * np.inf, out)         # inf / x
    out = np.where(na | nb | (za & zb) | (ia & ib), np.nan, out)
    return out


def palog2(x, dtype):
    """E + M for positive normal x; -inf for zero/subnormal, NaN for negative, inf for inf."""
    x = np.asarray(x, np.float64)
    nan, inf, zero = _classify(x, dtype)
    with np.errstate(all="ignore"):
        e, m = split(np.where(nan | inf | zero, 1.0, x))
    out = e + m
    out = np.where(zero, -np.inf, out)
    out = np.where(inf & (x > 0), np.inf, out)
    out = np.where(nan | ((x < 0) & ~zero), np.nan, out)
    return out


def paexp2(y, dtype):
    """2^floor(y) (1 + y - floor(y)), flushed/overflowed to ``dtype``'s normal range."""
    y = np.asarray(y, np.float64)
    tiny, emax, _ = FORMATS[dtype]
    with np.errstate(all="ignore"):
        f = np.floor(np.clip(y, -1e4, 1e4))
        mag = np.ldexp(1.0 + np.clip(y, -1e4, 1e4) - f, f.astype(np.int64))
    mag = np.where(mag < tiny, 0.0, mag)
    mag = np.where(mag >= _over(emax), np.inf, mag)
    return np.where(np.isnan(y), np.nan, mag)


def _zero_subnormals(x, dtype):
    tiny = FORMATS[dtype][0]
    return np.where(np.abs(x) < tiny, np.copysign(0.0, x), x)


def exp(x, dtype):
    """paexp2(x ·̂ log2 e) with the PAM carried in float64."""
    x = _zero_subnormals(np.asarray(x, np.float64), dtype)
    return paexp2(pam(x, LOG2E, torch.float64), dtype)


def log(x, dtype):
    """palog2(x) ÷̂ log2 e with the PAD carried in float64."""
    return pad(palog2(x, dtype), LOG2E, torch.float64)


def sqrt(x, dtype):
    x = np.asarray(x, np.float64)
    out = paexp2(palog2(x, dtype) / 2.0, dtype)
    return np.where((x == 0) | (np.abs(x) < FORMATS[dtype][0]), np.copysign(0.0, x), out)


def rsqrt(x, dtype):
    x = np.asarray(x, np.float64)
    out = paexp2(-palog2(x, dtype) / 2.0, dtype)
    return np.where(np.abs(x) < FORMATS[dtype][0], np.copysign(np.inf, x), out)


def reciprocal(x, dtype):
    return pad(np.ones_like(np.asarray(x, np.float64)), x, dtype)


def pow(x, p, dtype):
    """paexp2(palog2(|x|) ·̂ p), PAM in float64; torch.pow's sign rules for x < 0."""
    x = np.asarray(x, np.float64)
    if p == 0:
        return np.ones_like(x)
    with np.errstate(invalid="ignore"):
        out = paexp2(pam(palog2(np.abs(x), dtype), p, torch.float64), dtype)
    neg = np.signbit(x)
    if float(p).is_integer():
        if int(p) % 2:
            out = np.where(neg, -out, out)
    else:
        out = np.where(neg & (np.abs(x) >= FORMATS[dtype][0]), np.nan, out)
    return np.where(np.isnan(x), np.nan, out)
