"""Autograd for the PA arithmetic: the two derivative kinds of each op.

- ``"approx"`` (the default): the derivative of the original function, evaluated with PA
  ops. For Y = A ·̂ B: dA = B ·̂ dY.
- ``"exact"``: the true piecewise-constant derivative of the PA function, a signed power
  of two applied to dY by exponent arithmetic. For PAM: dA = sign(B) 2^(E_B + c) dY with c
  the mantissa carry. Where an input or output is zero, inf or NaN the power-of-two form
  does not apply and the approx formula is used.
- ``"ste"`` (straight-through): the exact function's gradient with ordinary float
  arithmetic. It multiplies; it is there for ablations only.

Neither "approx" nor "exact" runs a float multiplication. Pick the kind per call
(``derivative="exact"``) or as a scoped default (``with pamtorch.derivative("exact"):``).
"""
from __future__ import annotations

import contextlib
import math
import numbers
import threading

import torch

from . import arith
from .arith import LN2, LOG2E

__all__ = [
    "DERIVATIVES",
    "derivative",
    "resolve_derivative",
    "prepare_operands",
    "prepare_operand",
    "mul", "div", "exp2", "log2", "exp", "log", "sqrt", "rsqrt", "reciprocal", "pow",
    "round_mantissa", "rounded_call",
]

DERIVATIVES = ("approx", "exact", "ste")
_state = threading.local()


def _stack():
    if not hasattr(_state, "stack"):
        _state.stack = ["approx"]
    return _state.stack


def _check_kind(kind: str) -> str:
    if kind not in DERIVATIVES:
        raise ValueError(f"pamtorch: derivative must be one of {DERIVATIVES}, got {kind!r}")
    return kind


@contextlib.contextmanager
def derivative(kind: str):
    """Scoped default derivative kind for PA ops called without ``derivative=``."""
    stack = _stack()
    stack.append(_check_kind(kind))
    try:
        yield
    finally:
        stack.pop()


def resolve_derivative(kind: str | None) -> str:
    """``kind`` itself, or the scoped default when it is None."""
    return _stack()[-1] if kind is None else _check_kind(kind)


# ---------------------------------------------------------------------------
# operand checking and promotion

def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, torch.Tensor)


def _check_tensor(x, name: str, op: str):
    if isinstance(x, torch.Tensor):
        if x.dtype not in arith.SUPPORTED_DTYPES:
            names = ", ".join(str(d) for d in arith.SUPPORTED_DTYPES)
            raise TypeError(f"pamtorch.{op}: argument '{name}' has dtype {x.dtype}; "
                            f"supported dtypes are {names}")
        return
    if not _is_number(x):
        raise TypeError(f"pamtorch.{op}: argument '{name}' must be a tensor or a real Python "
                        f"number, got {type(x).__name__}")


def prepare_operand(x, op: str, name: str = "x") -> torch.Tensor:
    _check_tensor(x, name, op)
    if isinstance(x, torch.Tensor):
        return x
    return torch.tensor(float(x), dtype=torch.get_default_dtype()
                        if torch.get_default_dtype() in arith.SUPPORTED_DTYPES else torch.float32)


def prepare_operands(a, b, op: str):
    """Check a and b, promote them to one supported dtype and device like torch would."""
    _check_tensor(a, "a", op)
    _check_tensor(b, "b", op)
    tensors = [t for t in (a, b) if isinstance(t, torch.Tensor)]
    if not tensors:
        a = prepare_operand(a, op, "a")
        return a, torch.tensor(float(b), dtype=a.dtype)
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise RuntimeError(f"pamtorch.{op}: arguments are on different devices "
                           f"({a.device} and {b.device}); move them to one device")
    device = tensors[0].device
    dtype = torch.result_type(a, b)
    if dtype not in arith.SUPPORTED_DTYPES:
        raise TypeError(f"pamtorch.{op}: operands promote to {dtype}, which is not supported")
    a = a.to(dtype) if isinstance(a, torch.Tensor) else torch.tensor(float(a), dtype=dtype, device=device)
    b = b.to(dtype) if isinstance(b, torch.Tensor) else torch.tensor(float(b), dtype=dtype, device=device)
    try:
        torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise ValueError(f"pamtorch.{op}: shapes {tuple(a.shape)} and {tuple(b.shape)} "
                         f"cannot be broadcast together") from None
    return a, b


def _unbroadcast(g: torch.Tensor | None, shape) -> torch.Tensor | None:
    """Sum a broadcast gradient back to ``shape`` (additions only)."""
    if g is None or g.shape == shape:
        return g
    extra = g.dim() - len(shape)
    if extra:
        g = g.sum(dim=tuple(range(extra)))
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    if dims:
        g = g.sum(dim=dims, keepdim=True)
    return g.reshape(shape)


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def _neg_bits(x: torch.Tensor) -> torch.Tensor:
    """True where the sign bit of x is set."""
    return torch.signbit(x)


def _exact_or(approx: torch.Tensor, exact: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    return torch.where(ok, exact, approx)


# ---------------------------------------------------------------------------
# binary ops

class _Mul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, offset, kind, k):
        a, b = arith.round_mantissa(a, k), arith.round_mantissa(b, k)
        off = arith.round_offset(offset, a.dtype, k)
        out = arith.round_mantissa(arith.pam(a, b, off), k)
        ctx.kind, ctx.off, ctx.k = kind, off, k
        ctx.save_for_backward(a, b)
        return out

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        off, kind, k = ctx.off, ctx.kind, ctx.k
        g = arith.round_mantissa(g, k)
        f = arith.fmt(a.dtype)
        ga = gb = None
        for i, (x, other) in enumerate(((a, b), (b, a))):
            if not ctx.needs_input_grad[i]:
                continue
            if kind == "ste":
                d = g * other if off is None else g * other * off
            else:
                d = arith.pam(other, g, off)
                if kind == "exact":
                    # slope 2^(E_out - E_x) of the pattern P_x + P_other - B + (P_α - B):
                    # E_other (+ E_α) plus the carry of the mantissa fields' sum
                    m = arith.mantissa_field(x) + arith.mantissa_field(other)
                    e = arith.exponent(other)
                    if off is not None:
                        alpha = _const(off, other)
                        m = m + arith.mantissa_field(alpha)
                        e = e + arith.exponent(alpha)
                    e = arith.scale_pow2(g, e + (m >> f.mbits).to(torch.int32), _neg_bits(other))
                    d = _exact_or(d, e, arith.is_finite_nonzero(other))
            d = arith.round_mantissa(_unbroadcast(d, x.shape), k)
            if i == 0:
                ga = d
            else:
                gb = d
        return ga, gb, None, None, None


class _Div(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, offset, kind, k):
        a, b = arith.round_mantissa(a, k), arith.round_mantissa(b, k)
        off = arith.round_offset(offset, a.dtype, k)
        out = arith.round_mantissa(arith.pad(a, b, off), k)
        ctx.kind, ctx.off, ctx.k = kind, off, k
        ctx.save_for_backward(a, b, out)
        return out

    @staticmethod
    def backward(ctx, g):
        a, b, out = ctx.saved_tensors
        kind, off, k = ctx.kind, ctx.off, ctx.k
        g = arith.round_mantissa(g, k)
        f = arith.fmt(a.dtype)
        ga = gb = None
        # the pattern P_a - P_b + B - (P_α - B) has exponent E_a + e with
        # e = -E_b (- E_α) + floor((M_a - M_b (- M_α)) / 2^m)
        m = arith.mantissa_field(a) - arith.mantissa_field(b)
        e = -arith.exponent(b)
        if off is not None:
            alpha = _const(off, a)
            m = m - arith.mantissa_field(alpha)
            e = e - arith.exponent(alpha)
        e = e + (m >> f.mbits).to(torch.int32)  # arithmetic shift: the floor
        if ctx.needs_input_grad[0]:
            if kind == "ste":
                ga = g / b if off is None else g / b / off
            else:
                ga = arith.pad(g, b, off)
                if kind == "exact":
                    ex = arith.scale_pow2(g, e, _neg_bits(b))
                    ga = _exact_or(ga, ex, arith.is_finite_nonzero(b))
            ga = arith.round_mantissa(_unbroadcast(ga, a.shape), k)
        if ctx.needs_input_grad[1]:
            if kind == "ste":
                gb = -(g * out / b)
            else:
                gb = -arith.pad(arith.pam(g, out), b)
                if kind == "exact":
                    # d out / d b = -2^(E_out - E_b), E_out = E_a + e
                    ex = arith.scale_pow2(g, arith.exponent(a) - arith.exponent(b) + e, ~_neg_bits(a))
                    ok = arith.is_finite_nonzero(a) & arith.is_finite_nonzero(b) & arith.is_finite_nonzero(out)
                    gb = _exact_or(gb, ex, ok)
            gb = arith.round_mantissa(_unbroadcast(gb, b.shape), k)
        return ga, gb, None, None, None


# ---------------------------------------------------------------------------
# unary ops: forward, approx derivative, exact derivative (as (k, negate) or None).
# ``p`` is the op's parameter: pow's exponent, exp's and log's offset (None: none).

def _log2e64(like):
    return torch.tensor(LOG2E, dtype=torch.float64, device=like.device)


class _Unary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, op, p, kind, k):
        x = arith.round_mantissa(x, k)
        if op in ("exp", "log"):
            p = arith.round_offset(p, x.dtype, k)
        out = arith.round_mantissa(_FORWARD[op](x, p), k)
        ctx.op, ctx.p, ctx.kind, ctx.k = op, p, kind, k
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx, g):
        x, out = ctx.saved_tensors
        op, p, kind, k = ctx.op, ctx.p, ctx.kind, ctx.k
        g = arith.round_mantissa(g, k)
        if kind == "ste":
            d = _STE[op](x, out, g, p)
        elif kind == "exact" and op == "exp" and p is None and arith._ext(x, out, g) is not None:
            d = arith._ext(x).ew_exp_exact_grad(x, out, g)  # float32 CPU: one compiled pass, same bits
        else:
            d = _APPROX[op](x, out, g, p)
            if kind == "exact":
                e, neg, ok = _EXACT[op](x, out, p)
                d = _exact_or(d, arith.scale_pow2(g, e, neg), ok)
        return arith.round_mantissa(d, k), None, None, None, None


_FORWARD = {
    "exp2": lambda x, p: arith.paexp2(x),
    "log2": lambda x, p: arith.palog2(x),
    "exp": lambda x, p: arith.pa_exp(x, p),
    "log": lambda x, p: arith.pa_log(x, p),
    "sqrt": lambda x, p: arith.pa_sqrt(x),
    "rsqrt": lambda x, p: arith.pa_rsqrt(x),
    "reciprocal": lambda x, p: arith.pa_reciprocal(x),
    "pow": lambda x, p: arith.pa_pow(x, p),
}

_APPROX = {
    "exp2": lambda x, o, g, p: arith.pam(arith.pam(o, _const(LN2, o)), g),
    "log2": lambda x, o, g, p: arith.pad(g, arith.pam(x, _const(LN2, x))),
    "exp": lambda x, o, g, p: arith.pam(o, g, p),   # d/dx e^(αx) = α e^(αx)
    "log": lambda x, o, g, p: arith.pad(g, x, p),   # d/dx ln(x)/α = 1/(αx)
    "sqrt": lambda x, o, g, p: arith.scale_pow2(arith.pad(g, o), _const(-1, o).to(torch.int32)),
    "rsqrt": lambda x, o, g, p: arith.scale_pow2(arith.pad(arith.pam(g, o), x),
                                                 _const(-1, o).to(torch.int32), _const(1, o).bool()),
    "reciprocal": lambda x, o, g, p: -arith.pad(arith.pam(g, o), x),
    "pow": lambda x, o, g, p: _approx_pow(x, g, p),
}


def _approx_pow(x, g, p):
    """(p ·̂ x^(p-1)) ·̂ dy with x^(p-1) the PA pow: finite at x = 0 for p >= 1 (0 for
    p > 1, dy for p = 1), where the form (dy ·̂ y ·̂ p) ÷̂ x is 0/0. p = 0 gives 0, as torch."""
    if p == 0:
        return torch.zeros_like(g)
    return arith.pam(arith.pam(_const(p, x), arith.pa_pow(x, p - 1)), g)

_STE = {
    "exp2": lambda x, o, g, p: g * torch.exp2(x) * LN2,
    "log2": lambda x, o, g, p: g / (x * LN2),
    "exp": lambda x, o, g, p: g * torch.exp(x) if p is None else g * torch.exp(x * p) * p,
    "log": lambda x, o, g, p: g / x if p is None else g / (x * p),
    "sqrt": lambda x, o, g, p: g * 0.5 * torch.rsqrt(x),
    "rsqrt": lambda x, o, g, p: g * -0.5 * torch.rsqrt(x) / x,
    "reciprocal": lambda x, o, g, p: -g / (x * x),
    "pow": lambda x, o, g, p: torch.zeros_like(g) if p == 0 else g * p * torch.pow(x, p - 1),
}


def _ok(*ts):
    ok = arith.is_finite_nonzero(ts[0])
    for t in ts[1:]:
        ok = ok & arith.is_finite_nonzero(t)
    return ok


def _floor_exp(y64: torch.Tensor) -> torch.Tensor:
    """floor(y) as int32: the binade paexp2(y) lands in before its output is rounded."""
    return torch.floor(y64.clamp(-4096, 4096)).to(torch.int32)


def _half_exp(x: torch.Tensor, sign: int) -> torch.Tensor:
    """Exponent of the unrounded sqrt (sign 1) or rsqrt (sign -1) pattern sign·(P-B)/2 + B."""
    f = arith.fmt(x.dtype)
    _, m = arith._split(x, f)
    return ((((sign * (m - f.bias)) >> 1) + f.bias >> f.mbits) - f.ebias).to(torch.int32)


def _exact_exp2(x, o, p):
    return _floor_exp(x.to(torch.float64)), None, _ok(o)


def _exact_exp(x, o, p):
    """y = x ·̂ log2 e (·̂ α) in float64, then paexp2: slope 2^floor(y) · 2^(E_α + carry)."""
    f = arith.fmt(x.dtype)
    l2e = _log2e64(x)
    m = (arith.mantissa_field(x).to(torch.int64) << (52 - f.mbits)) + arith.mantissa_field(l2e)
    e = torch.zeros((), dtype=torch.int32, device=x.device)
    if p is not None:
        alpha = torch.tensor(p, dtype=torch.float64, device=x.device)
        m = m + arith.mantissa_field(alpha)
        e = e + arith.exponent(alpha)
    y = arith.pam(x.to(torch.float64), l2e, p)
    return _floor_exp(y) + e + (m >> 52).to(torch.int32), None, _ok(o)


def _exact_log(x, o, p):
    """palog2(x) (slope 2^-E_x) ÷̂ log2 e (÷̂ α): slope 2^(-E_α + floor((M_l - M_log2e - M_α)/2^52))."""
    l64 = arith._palog2_f64(x)[2]
    m = arith.mantissa_field(l64) - arith.mantissa_field(_log2e64(x))
    e = -arith.exponent(x)
    if p is not None:
        alpha = torch.tensor(p, dtype=torch.float64, device=x.device)
        m = m - arith.mantissa_field(alpha)
        e = e - arith.exponent(alpha)
    return e + (m >> 52).to(torch.int32), None, _ok(x) & ~torch.signbit(x)


def _exact_pow(x, o, p):
    """For finite nonzero p only; p = 0, inf or NaN takes the approx formula."""
    l64 = arith._palog2_f64(x)[2]
    p64 = torch.tensor(float(p), dtype=torch.float64, device=x.device)
    c = ((arith.mantissa_field(l64) + arith.mantissa_field(p64)) >> 52).to(torch.int32)
    k = _floor_exp(arith.pam(l64, p64)) + arith.exponent(p64) + c - arith.exponent(x)
    neg = torch.full_like(x, p < 0, dtype=torch.bool)
    if math.isfinite(p) and p == math.floor(p) and int(p) % 2 == 0:
        neg = neg ^ torch.signbit(x)
    return k, neg, _ok(x, o) & (l64 != 0) & (math.isfinite(p) and p != 0)


_EXACT = {
    "exp2": _exact_exp2,
    "log2": lambda x, o, p: (-arith.exponent(x), None, _ok(x) & ~torch.signbit(x)),
    "exp": _exact_exp,
    "log": _exact_log,
    "sqrt": lambda x, o, p: (_half_exp(x, 1) - arith.exponent(x) - 1, None, _ok(x, o)),
    "rsqrt": lambda x, o, p: (_half_exp(x, -1) - arith.exponent(x) - 1,
                              torch.ones_like(x, dtype=torch.bool), _ok(x, o)),
    "reciprocal": lambda x, o, p: (-2 * arith.exponent(x) - (arith.mantissa_field(x) != 0).to(torch.int32),
                                   torch.ones_like(x, dtype=torch.bool), _ok(x, o)),
    "pow": _exact_pow,
}


# ---------------------------------------------------------------------------
# public, autograd-aware functions

def _k(mantissa_bits, op):
    return arith.check_mantissa_bits(mantissa_bits, f"pamtorch.{op}")


def mul(a, b, *, offset: float | None = None, mantissa_bits: int | None = None,
        derivative: str | None = None) -> torch.Tensor:
    """PAM product a ·̂ b (Mitchell): patterns add, P_a + P_b - B. With ``offset`` α
    (0.5 <= α <= 2) the pattern is P_a + P_b - B + (P_α - B), one integer add: a ·̂ b ·̂ α,
    the error compensation (α = 1.0552 centres the mean error). With ``mantissa_bits`` k
    the operands, α and the result are rounded to k mantissa bits (ties to even)."""
    a, b = prepare_operands(a, b, "mul")
    offset = arith.check_offset(offset, "pamtorch.mul")
    return _Mul.apply(a, b, offset, resolve_derivative(derivative), _k(mantissa_bits, "mul"))


def div(a, b, *, offset: float | None = None, mantissa_bits: int | None = None,
        derivative: str | None = None) -> torch.Tensor:
    """PAD quotient a ÷̂ b: patterns subtract, P_a - P_b + B. With ``offset`` α the pattern
    is P_a - P_b + B - (P_α - B), a ÷̂ b ÷̂ α (the paper's released PAD offset);
    ``mantissa_bits`` as in :func:`mul`."""
    a, b = prepare_operands(a, b, "div")
    offset = arith.check_offset(offset, "pamtorch.div")
    return _Div.apply(a, b, offset, resolve_derivative(derivative), _k(mantissa_bits, "div"))


def _unary(op: str, x, p=None, derivative=None, mantissa_bits=None):
    x = prepare_operand(x, op)
    return _Unary.apply(x, op, p, resolve_derivative(derivative), _k(mantissa_bits, op))


def exp2(x, *, mantissa_bits: int | None = None, derivative: str | None = None) -> torch.Tensor:
    """paexp2(x) = 2^floor(x) (1 + x - floor(x)). With ``mantissa_bits`` k the operand and
    the result are rounded to k mantissa bits (ties to even); likewise below."""
    return _unary("exp2", x, derivative=derivative, mantissa_bits=mantissa_bits)


def log2(x, *, mantissa_bits: int | None = None, derivative: str | None = None) -> torch.Tensor:
    """palog2(x) = E + M for x = 2^E (1+M)."""
    return _unary("log2", x, derivative=derivative, mantissa_bits=mantissa_bits)


def exp(x, *, offset: float | None = None, mantissa_bits: int | None = None,
        derivative: str | None = None) -> torch.Tensor:
    """exp(x) = paexp2(x ·̂ log2 e). With ``offset`` α the inner PAM takes it,
    paexp2(x ·̂ log2 e ·̂ α) ≈ e^(αx), as in the paper's released code."""
    offset = arith.check_offset(offset, "pamtorch.exp")
    return _unary("exp", x, offset, derivative=derivative, mantissa_bits=mantissa_bits)


def log(x, *, offset: float | None = None, mantissa_bits: int | None = None,
        derivative: str | None = None) -> torch.Tensor:
    """log(x) = palog2(x) ÷̂ log2 e. With ``offset`` α the PAD takes it,
    palog2(x) ÷̂ log2 e ÷̂ α ≈ ln(x)/α, as in the paper's released code."""
    offset = arith.check_offset(offset, "pamtorch.log")
    return _unary("log", x, offset, derivative=derivative, mantissa_bits=mantissa_bits)


def sqrt(x, *, mantissa_bits: int | None = None, derivative: str | None = None) -> torch.Tensor:
    """sqrt(x) = paexp2(palog2(x) / 2): the exponent-and-mantissa field halved."""
    return _unary("sqrt", x, derivative=derivative, mantissa_bits=mantissa_bits)


def rsqrt(x, *, mantissa_bits: int | None = None, derivative: str | None = None) -> torch.Tensor:
    """rsqrt(x) = paexp2(-palog2(x) / 2)."""
    return _unary("rsqrt", x, derivative=derivative, mantissa_bits=mantissa_bits)


def reciprocal(x, *, mantissa_bits: int | None = None, derivative: str | None = None) -> torch.Tensor:
    """1 ÷̂ x."""
    return _unary("reciprocal", x, derivative=derivative, mantissa_bits=mantissa_bits)


def pow(x, p, *, mantissa_bits: int | None = None,  # noqa: A001 - mirrors torch.pow
        derivative: str | None = None) -> torch.Tensor:
    """pow(x, p) = paexp2(palog2(x) ·̂ p) for a Python number p."""
    if isinstance(p, torch.Tensor) or not _is_number(p):
        raise TypeError(f"pamtorch.pow: exponent 'p' must be a Python number, got {type(p).__name__}")
    return _unary("pow", x, float(p), derivative=derivative, mantissa_bits=mantissa_bits)


# ---------------------------------------------------------------------------
# narrow mantissas at an op's boundary

class _RoundMantissa(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        return arith.round_mantissa(x, k)

    @staticmethod
    def backward(ctx, g):
        return arith.round_mantissa(g, ctx.k), None


def round_mantissa(x: torch.Tensor, k: int) -> torch.Tensor:
    """x rounded to ``k`` mantissa bits, ties to even (:func:`pamtorch.arith.round_mantissa`);
    the derivative passes the upstream gradient straight through, rounded to k bits too."""
    return _RoundMantissa.apply(x, arith.check_mantissa_bits(k, "pamtorch.round_mantissa"))


def rounded_call(fn, k: int, *args, **kwargs):
    """``fn(*args, **kwargs)`` with its float tensor operands and results (nested in lists
    and tuples too) rounded to ``k`` mantissa bits by :func:`round_mantissa`: a composite
    op's boundary. With ``inplace=True`` the rounded result is written into the first
    argument, which is returned."""
    def rnd(x):
        if isinstance(x, (list, tuple)):
            return type(x)(rnd(y) for y in x)
        if isinstance(x, torch.Tensor) and x.dtype in arith.SUPPORTED_DTYPES:
            return round_mantissa(x, k)
        return x

    inplace = kwargs.pop("inplace", False)
    if inplace:
        kwargs["inplace"] = False
    out = rnd(fn(*rnd(args), **{n: rnd(v) for n, v in kwargs.items()}))
    return args[0].copy_(out) if inplace else out

