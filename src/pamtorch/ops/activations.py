"""Activations: each one's PA forward, its two derivative kinds and its op-table entry.

Every forward is written once on an ``_ops`` namespace, as in :mod:`pamtorch.nn.functional`:
raw PA ops for the dispatch mode, or autograd-aware PA ops of one derivative kind, so that
``derivative="exact"`` is the true (piecewise constant) derivative of the PA function as
computed. The ``*_backward`` functions are the "approx" kind: the derivative formula of the
exact activation evaluated with PA ops; they take the arguments of the aten backward op the
mode receives. Nothing here runs a float multiplication or division: only PAM (``⊙̂``), PAD
(``÷̂``), ``E(t) = pa_exp(t) = paexp2(t ⊙̂ log2 e)``, ``pa_log``, exponent shifts, additions,
comparisons, clamps, selects and table look-ups.

Exponential arguments are clamped so that ``E`` stays finite in the input dtype (a select
discarding an infinite branch would still give NaN exact gradients). GELU lives in
:mod:`pamtorch.nn.functional`; hardtanh (ReLU6) is clamps and selects only and passes
through. docs/nn.md gives each construction's measured error against exact arithmetic.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

from .. import arith
from ..autograd import _unbroadcast, resolve_derivative
from ..nn import functional as PF
from ..nn.functional import _GradOps, _RawOps, _c
from .table import arg, aten, implements, inplace, passes_through

__all__ = [
    "tanh_forward", "tanh_backward", "sigmoid_forward", "sigmoid_backward", "silu_forward",
    "silu_backward", "softplus_forward", "softplus_backward", "mish_forward", "mish_backward",
    "hardswish_forward", "hardswish_backward", "hardsigmoid_forward", "hardsigmoid_backward",
    "leaky_relu_forward", "leaky_relu_backward", "elu_forward", "elu_backward", "glu_forward",
    "glu_backward", "log_sigmoid_forward", "log_sigmoid_backward", "prelu_forward",
    "prelu_backward", "erf_forward", "sin_forward", "cos_forward",
    "tanh", "sigmoid", "silu", "softplus", "mish", "hardswish", "hardsigmoid", "leaky_relu",
    "elu", "celu", "selu", "glu", "logsigmoid", "prelu", "erf", "sin", "cos", "FUNCTION_ROUTES",
]

# ---------------------------------------------------------------------------
# sin/cos range reduction: N·x/(2π) by signed powers of two, i.e. exponent shifts and
# float64 additions (a PAM by 1/(2π) would put up to 11% of x into the phase)

_WAVE_BITS = 10                    # 2^10 table segments per turn
_WAVE_N = 1 << _WAVE_BITS


def _signed_digits(c: float, rel: float = 2.0 ** -34):
    """((sign, k), ...) with Σ sign·2^k = c within rel·c (greedy nearest power of two)."""
    digits, r = [], c
    while abs(r) > rel * c:
        k = round(math.log2(abs(r)))
        s = 1 if r > 0 else -1
        digits.append((s, k))
        r -= s * 2.0 ** k
    return tuple(digits)


_TURN_DIGITS = _signed_digits(1.0 / (2.0 * math.pi))


def _shift_sum(v: torch.Tensor, extra: int) -> torch.Tensor:
    """Σ sign·v·2^(k+extra) over the digits of 1/(2π), in float64."""
    v = v.to(torch.float64)
    out = torch.zeros_like(v)
    for s, k in _TURN_DIGITS:
        term = arith.scale_pow2(v, torch.tensor(k + extra, dtype=torch.int32, device=v.device))
        out = out + term if s > 0 else out - term
    return out


def _phase(x: torch.Tensor):
    """(j, t) with N·x/(2π) = (integer multiple of N) + j + t, j in [0, N) (int64),
    t in [0, 1) in x's dtype; NaN t (and j = 0) for non-finite x."""
    u = _shift_sum(x, _WAVE_BITS)
    fl = torch.floor(u)
    t = (u - fl).to(x.dtype)
    fl = torch.where(torch.isfinite(fl), fl, torch.zeros_like(fl))
    return fl.to(torch.int64) & (_WAVE_N - 1), t


class _Phase(torch.autograd.Function):
    """:func:`_phase` with its derivative dt/dx = N/(2π) applied by the same shifts and adds
    (the map is linear, so approx and exact coincide)."""

    @staticmethod
    def forward(ctx, x):
        j, t = _phase(x)
        ctx.mark_non_differentiable(j)
        return j, t

    @staticmethod
    def backward(ctx, gj, gt):
        return _shift_sum(gt, _WAVE_BITS).to(gt.dtype)


class _ActRawOps(_RawOps):
    phase = staticmethod(_phase)


class _ActGradOps(_GradOps):
    def phase(self, x):
        return _Phase.apply(x)


_RAW = _ActRawOps()

_WAVE_TABLES: dict = {}


def _wave_table(like: torch.Tensor):
    """(sin(2πj/N), sin(2π(j+1)/N) - sin(2πj/N)) for j < N, in like's dtype and device."""
    key = (like.dtype, like.device)
    if key not in _WAVE_TABLES:
        s = torch.tensor([math.sin(2.0 * math.pi * j / _WAVE_N) for j in range(_WAVE_N + 1)],
                         dtype=torch.float64)
        _WAVE_TABLES[key] = (s[:-1].to(like.dtype).to(like.device),
                             (s[1:] - s[:-1]).to(like.dtype).to(like.device))
    return _WAVE_TABLES[key]


def _wave(x: torch.Tensor, quarter_turns: int, _ops) -> torch.Tensor:
    j, t = _ops.phase(x)
    j = (j + quarter_turns * (_WAVE_N // 4)) & (_WAVE_N - 1)
    s, d = _wave_table(x)
    return s[j] + _ops.mul(t, d[j])


def sin_forward(x: torch.Tensor, *, _ops=_RAW) -> torch.Tensor:
    """PA sine: the phase ``N x/(2π) = j + t`` (mod N, N = 1024) by exponent shifts and
    additions of the signed binary digits of 1/(2π), then linear interpolation in a table of
    ``N`` exact values: ``S[j] + t ⊙̂ (S[j+1] - S[j])``. The PAM moves at most 1/9 of one
    segment's rise (2π/N), so ``|error| <= 7e-4`` for any finite x; NaN at ±inf, as torch."""
    return _wave(x, 0, _ops)


def cos_forward(x: torch.Tensor, *, _ops=_RAW) -> torch.Tensor:
    """PA cosine: :func:`sin_forward` a quarter turn on (table index + N/4)."""
    return _wave(x, 1, _ops)


# ---------------------------------------------------------------------------
# the exponential family

_TANH_CLAMP = 9.0   # tanh(9) rounds to 1 in float32; E(±9) are normal even in float16
_SIGMOID, _TANH, _SILU = 0, 1, 2   # the kinds of the fused kernels (pa_elementwise.cpp)


def _exp_limit(x: torch.Tensor) -> float:
    """A bound on t that keeps E(t) finite (and E(-t) of use) in x's dtype."""
    return 10.0 if x.dtype == torch.float16 else 80.0


def _scale(x, s, _ops):
    """x ⊙̂ s for a Python number s (x itself when s == 1)."""
    return x if s == 1 else _ops.mul(x, _c(s, x))


def _neg_abs(x):
    """-|x| by a select (abs's derivative would multiply by sign(x))."""
    return torch.where(x > 0, -x, x)


def tanh_forward(x: torch.Tensor, *, _ops=_RAW) -> torch.Tensor:
    """PA tanh: ``(E(t) - E(-t)) ÷̂ (E(t) + E(-t))``, ``t = clamp(x, ±9)``. Odd and 0 at 0
    exactly; the PA exponential's slopes on either side of 0 (1/2 and 1 per unit of
    ``t log2 e``) average out, so the slope at 0 is within 12% of 1."""
    ext = PF._fused(x) if _ops is _RAW else None
    if ext is not None:   # kernels/cpu/pa_elementwise.cpp: these steps in one pass, bit for bit
        return ext.fused_act_forward(x, _TANH)
    t = x.clamp(-_TANH_CLAMP, _TANH_CLAMP)
    a, b = _ops.exp(t), _ops.exp(-t)
    return _ops.div(a - b, a + b)


def tanh_backward(dy: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Approx tanh derivative from the output (``aten.tanh_backward``): ``dy ⊙̂ (1 - y ⊙̂ y)``."""
    y = y.to(dy.dtype)
    ext = PF._fused(dy, y)
    if ext is not None:
        return ext.fused_act_backward(dy, y, _TANH)
    return arith.pam(dy, 1 - arith.pam(y, y))


def sigmoid_forward(x: torch.Tensor, *, _ops=_RAW) -> torch.Tensor:
    """PA sigmoid: ``E(h) ÷̂ (E(h) + E(-h))``, ``h = x ⊙̂ ½`` (an exponent shift) clamped so
    both stay finite; the symmetric form halves the error of ``1 ÷̂ (1 + E(-x))``."""
    ext = PF._fused(x) if _ops is _RAW else None
    if ext is not None:
        return ext.fused_act_forward(x, _SIGMOID)
    lim = _exp_limit(x)
    h = _ops.mul(x, _c(0.5, x)).clamp(-lim, lim)
    a, b = _ops.exp(h), _ops.exp(-h)
    return _ops.div(a, a + b)


def sigmoid_backward(dy: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Approx sigmoid derivative from the output: ``dy ⊙̂ (y ⊙̂ (1 - y))``."""
    y = y.to(dy.dtype)
    ext = PF._fused(dy, y)
    if ext is not None:
        return ext.fused_act_backward(dy, y, _SIGMOID)
    return arith.pam(dy, arith.pam(y, 1 - y))


def _gate(x: torch.Tensor, z: torch.Tensor, _ops) -> torch.Tensor:
    """x σ(z) as one PAD: ``x ÷̂ (1 + E(-z))`` (the form of the GELU)."""
    return _ops.div(x, 1 + _ops.exp((-z).clamp_max(_exp_limit(z))))


def _gate_parts(z: torch.Tensor):
    """(d, σ, 1 - σ) of ``σ(z) = 1 ÷̂ d``, ``d = 1 + e``, ``e = E(-z)`` clamped like
    :func:`_gate`; ``1 - σ = e ÷̂ d``."""
    e = arith.pa_exp((-z).clamp_max(_exp_limit(z)))
    d = 1 + e
    return d, arith.pad(torch.ones_like(d), d), arith.pad(e, d)


def silu_forward(x: torch.Tensor, *, _ops=_RAW) -> torch.Tensor:
    """PA SiLU: ``x ÷̂ (1 + E(-x))``."""
    ext = PF._fused(x) if _ops is _RAW else None
    if ext is not None:
        return ext.fused_act_forward(x, _SILU)
    return _gate(x, x, _ops)


def silu_backward(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Approx SiLU derivative ``σ + (x σ) ⊙̂ (1 - σ)`` with ``σ = 1 ÷̂ d``,
    ``1 - σ = e ÷̂ d``, ``x σ = x ÷̂ d`` (``d = 1 + E(-x)``); ``dx = dy ⊙̂ f'``."""
    ext = PF._fused(dy, x)
    if ext is not None:
        return ext.fused_act_backward(dy, x, _SILU)
    d, s, oms = _gate_parts(x)
    return arith.pam(dy, s + arith.pam(arith.pad(x, d), oms))


def softplus_forward(x: torch.Tensor, beta=1.0, threshold=20.0, *, _ops=_RAW) -> torch.Tensor:
    """PA softplus: ``(max(z, 0) + pa_log(1 + E(-|z|))) ÷̂ β`` with ``z = x ⊙̂ β``; ``x``
    itself where ``z > threshold`` (as torch)."""
    z = _scale(x, beta, _ops)
    sp = z.clamp_min(0) + _ops.log(1 + _ops.exp(_neg_abs(z)))
    if beta != 1:
        sp = _ops.div(sp, _c(beta, x))
    return torch.where(z > threshold, x, sp)


def softplus_backward(dy: torch.Tensor, x: torch.Tensor, beta=1.0, threshold=20.0) -> torch.Tensor:
    """Approx softplus derivative ``dy ⊙̂ σ(x ⊙̂ β)`` (PA sigmoid), ``dy`` above the threshold."""
    z = x if beta == 1 else arith.pam(x, _c(beta, x))
    return torch.where(z > threshold, dy, arith.pam(dy, sigmoid_forward(z)))


def log_sigmoid_forward(x: torch.Tensor, *, _ops=_RAW):
    """PA log-sigmoid, ``(out, buffer)`` like ``aten.log_sigmoid_forward``:
    ``out = min(x, 0) - pa_log(1 + e)``, ``buffer = e = E(-|x|)`` (what torch's CPU kernel
    keeps; the backward below recomputes instead of trusting it)."""
    e = _ops.exp(_neg_abs(x))
    return x.clamp_max(0) - _ops.log(1 + e), e


def log_sigmoid_backward(dy: torch.Tensor, x: torch.Tensor, buffer=None) -> torch.Tensor:
    """Approx log-sigmoid derivative ``dy ⊙̂ σ(-x)`` (PA sigmoid)."""
    return arith.pam(dy, sigmoid_forward(-x))


def _mish_linear(x: torch.Tensor) -> float:
    """Beyond this mish(x) rounds to x (float32, bfloat16; float16), and E(x)² is finite."""
    return 5.0 if x.dtype == torch.float16 else 20.0


def _mish_n(x: torch.Tensor, _ops):
    """``n = E(x) ⊙̂ (E(x) + 2)`` (= (1 + eˣ)² - 1), so tanh(softplus(x)) = n ÷̂ (n + 2)."""
    e = _ops.exp(x.clamp_max(_mish_linear(x)))
    return _ops.mul(e, e + 2)


def mish_forward(x: torch.Tensor, *, _ops=_RAW) -> torch.Tensor:
    """PA Mish: ``(x ⊙̂ n) ÷̂ (n + 2)`` with ``n = E(x) ⊙̂ (E(x) + 2)`` (``x tanh(softplus x)``
    in one PAM and one PAD), ``x`` itself beyond 20 (5 in float16)."""
    n = _mish_n(x, _ops)
    return torch.where(x > _mish_linear(x), x, _ops.div(_ops.mul(x, n), n + 2))


def mish_backward(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Approx Mish derivative ``T + (x ⊙̂ σ(x)) ⊙̂ (1 - T ⊙̂ T)`` with ``T = n ÷̂ (n + 2)``
    and the PA sigmoid; 1 beyond the linear limit."""
    n = _mish_n(x, _RAW)
    t = arith.pad(n, n + 2)
    d = t + arith.pam(arith.pam(x, sigmoid_forward(x)), 1 - arith.pam(t, t))
    return torch.where(x > _mish_linear(x), dy, arith.pam(dy, d.to(dy.dtype)))


def hardsigmoid_forward(x: torch.Tensor, *, _ops=_RAW) -> torch.Tensor:
    """PA hardsigmoid: ``clamp(x + 3, 0, 6) ÷̂ 6`` (exactly 0 and 1 at the ends)."""
    return _ops.div((x + 3).clamp(0, 6), _c(6.0, x))


def hardsigmoid_backward(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dy ÷̂ 6`` on (-3, 3), 0 elsewhere (as torch)."""
    inside = (x > -3) & (x < 3)
    return torch.where(inside, arith.pad(dy, _c(6.0, dy)), torch.zeros_like(dy))


def hardswish_forward(x: torch.Tensor, *, _ops=_RAW) -> torch.Tensor:
    """PA hardswish: ``x ⊙̂ hardsigmoid(x)`` (PAM by 0 and by 1 are exact, so 0 below -3 and
    x above 3)."""
    return _ops.mul(x, hardsigmoid_forward(x, _ops=_ops))


def hardswish_backward(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dy ⊙̂ (x ÷̂ 3 + ½)`` on [-3, 3], 0 below, ``dy`` above (torch's boundary rule)."""
    mid = arith.pam(dy, arith.pad(x, _c(3.0, x)) + 0.5)
    return torch.where(x < -3, torch.zeros_like(dy), torch.where(x <= 3, mid, dy))


def leaky_relu_forward(x: torch.Tensor, negative_slope=0.01, *, _ops=_RAW) -> torch.Tensor:
    """``x`` for x > 0, ``x ⊙̂ slope`` otherwise."""
    return torch.where(x > 0, x, _scale(x, negative_slope, _ops))


def leaky_relu_backward(dy: torch.Tensor, x: torch.Tensor, negative_slope=0.01,
                        self_is_result=False) -> torch.Tensor:
    """``dy`` where x > 0, ``dy ⊙̂ slope`` elsewhere (``x`` may be the result: same sign)."""
    return torch.where(x > 0, dy, _scale(dy, negative_slope, _RAW))


def elu_forward(x: torch.Tensor, alpha=1.0, scale=1.0, input_scale=1.0, *, _ops=_RAW) -> torch.Tensor:
    """PA ELU as ``aten.elu`` (ELU, CELU and SELU): ``x ⊙̂ scale`` for x > 0, else
    ``(E(x ⊙̂ input_scale) - 1) ⊙̂ (alpha·scale)`` (the constants are Python numbers)."""
    neg = _ops.exp(_scale(x.clamp_max(0), input_scale, _ops)) - 1
    return torch.where(x > 0, _scale(x, scale, _ops), _scale(neg, alpha * scale, _ops))


def elu_backward(dy: torch.Tensor, alpha, scale, input_scale, is_result: bool,
                 self_or_result: torch.Tensor) -> torch.Tensor:
    """Approx ELU derivative as ``aten.elu_backward``: ``dy ⊙̂ scale`` for positive, else
    ``dy ⊙̂ input_scale ⊙̂ (y + alpha·scale)`` from the result ``y`` or
    ``dy ⊙̂ (input_scale·alpha·scale) ⊙̂ E(x ⊙̂ input_scale)`` from the input."""
    v = self_or_result
    if is_result:
        neg = arith.pam(_scale(dy, input_scale, _RAW), v + alpha * scale)
    else:
        e = arith.pa_exp(_scale(v.clamp_max(0), input_scale, _RAW))
        neg = arith.pam(_scale(dy, input_scale * alpha * scale, _RAW), e)
    return torch.where(v > 0, _scale(dy, scale, _RAW), neg)


def _glu_halves(x: torch.Tensor, dim: int):
    n = x.shape[dim]
    if n % 2:
        raise RuntimeError(f"pamtorch glu: halving dimension must be even, but dimension {dim} "
                           f"is size {n}")
    return x.split(n // 2, dim)


def glu_forward(x: torch.Tensor, dim: int = -1, *, _ops=_RAW) -> torch.Tensor:
    """PA GLU: ``a σ(b)`` as one PAD, ``a ÷̂ (1 + E(-b))``, for the halves a, b along dim."""
    a, b = _glu_halves(x, dim)
    return _gate(a, b, _ops)


def glu_backward(dy: torch.Tensor, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Approx GLU derivative: ``da = dy ⊙̂ σ(b)``, ``db = (dy ⊙̂ (a ÷̂ d)) ⊙̂ (1 - σ(b))``
    with ``σ(b) = 1 ÷̂ d``, ``1 - σ(b) = e ÷̂ d``, ``d = 1 + E(-b)``."""
    a, b = _glu_halves(x, dim)
    d, s, oms = _gate_parts(b)
    return torch.cat([arith.pam(dy, s), arith.pam(arith.pam(dy, arith.pad(a, d)), oms)], dim)


def prelu_forward(x: torch.Tensor, weight: torch.Tensor, *, _ops=_RAW) -> torch.Tensor:
    """PReLU as ``aten._prelu_kernel`` (weight broadcast against x): ``x`` for x > 0, else
    ``weight ⊙̂ x``."""
    return torch.where(x > 0, x, _ops.mul(weight.to(x.dtype), x))


def prelu_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor):
    """``(dx, dweight)`` as ``aten._prelu_kernel_backward`` (dweight in x's shape, summed by
    autograd): ``dx = dy`` or ``weight ⊙̂ dy``, ``dweight = 0`` or ``x ⊙̂ dy``."""
    pos = x > 0
    dx = torch.where(pos, dy, arith.pam(weight.to(dy.dtype), dy))
    dw = torch.where(pos, torch.zeros_like(dy), arith.pam(x.to(dy.dtype), dy))
    return dx, dw


# erf(z) ≈ tanh(A z + B z³), the erf inside GELU's tanh form (x = √2 z)
_ERF_A = 2.0 / math.sqrt(math.pi)
_ERF_B = 4.0 * 0.044715 / math.sqrt(math.pi)


def erf_forward(x: torch.Tensor, *, _ops=_RAW) -> torch.Tensor:
    """PA erf: ``tanh(x ⊙̂ A + ((x ⊙̂ x) ⊙̂ x) ⊙̂ B)`` with the PA tanh above, ``A = 2/√π``,
    ``B = 0.044715·4/√π`` (GELU's tanh approximation, as an erf)."""
    x3 = _ops.mul(_ops.mul(x, x), x)
    return tanh_forward(_ops.mul(x, _c(_ERF_A, x)) + _ops.mul(x3, _c(_ERF_B, x)), _ops=_ops)


# ---------------------------------------------------------------------------
# autograd functionals: derivative="approx" (raw forward, approx backward), "exact" or
# "ste" (the forward on autograd-aware PA ops)

class _Approx(torch.autograd.Function):
    """A raw forward with its approx backward ``bwd(dy, x, y, *args)``."""

    @staticmethod
    def forward(ctx, fwd, bwd, x, *args):
        y = fwd(x, *args)
        ctx.bwd, ctx.args = bwd, args
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y = ctx.saved_tensors
        return (None, None, ctx.bwd(dy, x, y, *ctx.args)) + (None,) * len(ctx.args)


def _params(fwd, args, kwargs) -> tuple:
    """``fwd``'s parameters after the input, bound from ``args``/``kwargs`` with defaults."""
    bound = inspect.signature(fwd).bind(None, *args, **kwargs)
    bound.apply_defaults()
    return tuple(v for k, v in bound.arguments.items() if k != "_ops")[1:]


def _functional(name, fwd, bwd):
    def f(input, *args, derivative: str | None = None, **kwargs):
        PF._check_float(input, name)
        args = _params(fwd, args, kwargs)
        kind = resolve_derivative(derivative)
        if kind == "approx":
            return _Approx.apply(fwd, bwd, input, *args)
        return fwd(input, *args, _ops=_ActGradOps(kind))
    f.__name__ = name
    f.__doc__ = (f"PA {name} (see :func:`{fwd.__name__}`) with ``derivative`` \"approx\", "
                 "\"exact\" or \"ste\" (None: the scoped default).")
    return f


def _erf_backward(dy, x, y):
    """2/√π e^{-x²} dy with PA ops (as autograd's erf formula under the mode)."""
    g = arith.pa_exp(-arith.pam(x, x))
    return arith.pam(dy, arith.pam(g, _c(_ERF_A, g)))


def _selu_fwd(x, *, _ops=_RAW):
    return elu_forward(x, _SELU_ALPHA, _SELU_SCALE, 1.0, _ops=_ops)


def _celu_fwd(x, alpha=1.0, *, _ops=_RAW):
    return elu_forward(x, alpha, 1.0, 1.0 / alpha, _ops=_ops)


def _logsigmoid_fwd(x, *, _ops=_RAW):
    return log_sigmoid_forward(x, _ops=_ops)[0]


_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946

tanh = _functional("tanh", tanh_forward, lambda dy, x, y: tanh_backward(dy, y))
sigmoid = _functional("sigmoid", sigmoid_forward, lambda dy, x, y: sigmoid_backward(dy, y))
silu = _functional("silu", silu_forward, lambda dy, x, y: silu_backward(dy, x))
softplus = _functional("softplus", softplus_forward,
                       lambda dy, x, y, beta=1.0, threshold=20.0: softplus_backward(dy, x, beta, threshold))
mish = _functional("mish", mish_forward, lambda dy, x, y: mish_backward(dy, x))
hardswish = _functional("hardswish", hardswish_forward, lambda dy, x, y: hardswish_backward(dy, x))
hardsigmoid = _functional("hardsigmoid", hardsigmoid_forward,
                          lambda dy, x, y: hardsigmoid_backward(dy, x))
leaky_relu = _functional("leaky_relu", leaky_relu_forward,
                         lambda dy, x, y, s=0.01: leaky_relu_backward(dy, x, s))
elu = _functional("elu", elu_forward,
                  lambda dy, x, y, a=1.0, s=1.0, i=1.0: elu_backward(dy, a, s, i, False, x))
celu = _functional("celu", _celu_fwd,
                   lambda dy, x, y, a=1.0: elu_backward(dy, a, 1.0, 1.0 / a, False, x))
selu = _functional("selu", _selu_fwd,
                   lambda dy, x, y: elu_backward(dy, _SELU_ALPHA, _SELU_SCALE, 1.0, False, x))
glu = _functional("glu", glu_forward, lambda dy, x, y, dim=-1: glu_backward(dy, x, dim))
logsigmoid = _functional("logsigmoid", _logsigmoid_fwd, lambda dy, x, y: log_sigmoid_backward(dy, x))
erf = _functional("erf", erf_forward, _erf_backward)
sin = _functional("sin", sin_forward, lambda dy, x, y: arith.pam(dy, cos_forward(x)))
cos = _functional("cos", cos_forward, lambda dy, x, y: -arith.pam(dy, sin_forward(x)))


class _PReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return prelu_forward(x, weight)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx, dw = prelu_backward(dy, x, weight)
        return dx, _unbroadcast(dw, weight.shape)


def _prelu_weight(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.prelu's broadcast: one weight for all, or one per channel along dim 1."""
    if weight.numel() == 1:
        return weight.reshape(())
    return weight.reshape([1, -1] + [1] * (x.dim() - 2))


def prelu(input: torch.Tensor, weight: torch.Tensor, *, derivative: str | None = None) -> torch.Tensor:
    """PA PReLU with ``F.prelu`` semantics (see :func:`prelu_forward`)."""
    PF._check_float(input, "prelu")
    w = _prelu_weight(input, weight)
    kind = resolve_derivative(derivative)
    if kind == "approx":
        return _PReLU.apply(input, w)
    return prelu_forward(input, w, _ops=_ActGradOps(kind))


# ---------------------------------------------------------------------------
# function-level routes: what the mode calls above autograd when the config asks for a
# non-approx derivative kind (torch's argument names; the approx kind takes the aten ops
# below), and the aten ops each stands for (``leave_exact`` naming one skips the route)

def _inplace_route(fn):
    """A route for ``F.f(input, *params, inplace=False)``: with inplace=True the result of
    a copy (which the backward may save) is written back into the input."""
    def route(input, *params, inplace=False, derivative, **kw):
        if not inplace:
            return fn(input, *params, **kw, derivative=derivative)
        return input.copy_(fn(input.clone(), *params, **kw, derivative=derivative))
    return route


FUNCTION_ROUTES = {
    torch.tanh: tanh, torch.Tensor.tanh: tanh,
    torch.sigmoid: sigmoid, torch.Tensor.sigmoid: sigmoid,
    torch.erf: erf, torch.Tensor.erf: erf,
    torch.sin: sin, torch.Tensor.sin: sin,
    torch.cos: cos, torch.Tensor.cos: cos,
    F.silu: _inplace_route(silu), F.mish: _inplace_route(mish),
    F.hardswish: _inplace_route(hardswish), F.hardsigmoid: _inplace_route(hardsigmoid),
    F.leaky_relu: _inplace_route(leaky_relu), F.elu: _inplace_route(elu),
    F.celu: _inplace_route(celu), F.selu: _inplace_route(selu),
    F.softplus: softplus, F.glu: glu, F.logsigmoid: logsigmoid, F.prelu: prelu,
}
FUNCTION_OPS = {
    **{f: ("tanh", "tanh_backward") for f in (torch.tanh, torch.Tensor.tanh)},
    **{f: ("sigmoid", "sigmoid_backward") for f in (torch.sigmoid, torch.Tensor.sigmoid)},
    **{f: ("erf", "exp", "mul") for f in (torch.erf, torch.Tensor.erf)},
    **{f: ("sin", "cos", "mul") for f in (torch.sin, torch.Tensor.sin, torch.cos, torch.Tensor.cos)},
    F.silu: ("silu", "silu_backward"), F.mish: ("mish", "mish_backward"),
    F.hardswish: ("hardswish", "hardswish_backward"),
    F.hardsigmoid: ("hardsigmoid", "hardsigmoid_backward"),
    F.leaky_relu: ("leaky_relu", "leaky_relu_backward"),
    **{f: ("elu", "elu_backward") for f in (F.elu, F.selu)},
    F.celu: ("celu", "elu_backward"), F.softplus: ("softplus", "softplus_backward"),
    F.glu: ("glu", "glu_backward"), F.logsigmoid: ("log_sigmoid_forward", "log_sigmoid_backward"),
    F.prelu: ("_prelu_kernel", "_prelu_kernel_backward"),
}


# ---------------------------------------------------------------------------
# the op table

@implements([aten.gelu], "nonlinear")
def _pa_gelu(func, args, kwargs, cfg):
    return PF.gelu_forward(args[0])


@implements([aten.gelu_backward], "nonlinear")
def _pa_gelu_backward(func, args, kwargs, cfg):
    return PF.gelu_backward(args[0], args[1])


def _unary(fn):
    def impl(func, args, kwargs, cfg):
        return inplace(func, args, fn(args[0]))
    return impl


for _ops_, _fn in [
    ([aten.tanh, aten.tanh_], tanh_forward),
    ([aten.sigmoid, aten.sigmoid_], sigmoid_forward),
    ([aten.silu, aten.silu_], silu_forward),
    ([aten.mish, aten.mish_], mish_forward),
    ([aten.hardswish, aten.hardswish_], hardswish_forward),
    ([aten.hardsigmoid, aten.hardsigmoid_], hardsigmoid_forward),
    ([aten.erf, aten.erf_], erf_forward),
    ([aten.sin, aten.sin_], sin_forward),
    ([aten.cos, aten.cos_], cos_forward),
]:
    implements(_ops_, "nonlinear")(_unary(_fn))

for _ops_, _fn in [
    ([aten.tanh_backward], tanh_backward),
    ([aten.sigmoid_backward], sigmoid_backward),
    ([aten.silu_backward], silu_backward),
    ([aten.mish_backward], mish_backward),
    ([aten.hardswish_backward], hardswish_backward),
    ([aten.hardsigmoid_backward], hardsigmoid_backward),
]:
    implements(_ops_, "nonlinear")(lambda func, args, kwargs, cfg, _fn=_fn: _fn(args[0], args[1]))


@implements([aten.softplus], "nonlinear")
def _pa_softplus(func, args, kwargs, cfg):
    return softplus_forward(args[0], arg(args, kwargs, 1, "beta", 1.0),
                            arg(args, kwargs, 2, "threshold", 20.0))


@implements([aten.softplus_backward], "nonlinear")
def _pa_softplus_backward(func, args, kwargs, cfg):
    return softplus_backward(args[0], args[1], arg(args, kwargs, 2, "beta"),
                             arg(args, kwargs, 3, "threshold"))


@implements([aten.leaky_relu, aten.leaky_relu_], "nonlinear")
def _pa_leaky_relu(func, args, kwargs, cfg):
    return inplace(func, args, leaky_relu_forward(args[0], arg(args, kwargs, 1, "negative_slope", 0.01)))


@implements([aten.leaky_relu_backward], "nonlinear")
def _pa_leaky_relu_backward(func, args, kwargs, cfg):
    return leaky_relu_backward(args[0], args[1], arg(args, kwargs, 2, "negative_slope"))


@implements([aten.elu, aten.elu_], "nonlinear")
def _pa_elu(func, args, kwargs, cfg):
    alpha, scale, input_scale = (arg(args, kwargs, i, n, 1.0)
                                 for i, n in ((1, "alpha"), (2, "scale"), (3, "input_scale")))
    return inplace(func, args, elu_forward(args[0], alpha, scale, input_scale))


@implements([aten.celu, aten.celu_], "nonlinear")
def _pa_celu(func, args, kwargs, cfg):
    alpha = arg(args, kwargs, 1, "alpha", 1.0)
    if alpha == 0:
        raise ValueError("pamtorch celu: alpha must not be 0 (CELU divides by it)")
    return inplace(func, args, elu_forward(args[0], alpha, 1.0, 1.0 / alpha))


@implements([aten.elu_backward], "nonlinear")
def _pa_elu_backward(func, args, kwargs, cfg):
    return elu_backward(*args[:6])


@implements([aten.glu], "nonlinear")
def _pa_glu(func, args, kwargs, cfg):
    return glu_forward(args[0], arg(args, kwargs, 1, "dim", -1))


@implements([aten.glu_backward], "nonlinear")
def _pa_glu_backward(func, args, kwargs, cfg):
    return glu_backward(args[0], args[1], args[2])


@implements([aten.log_sigmoid_forward], "nonlinear")
def _pa_log_sigmoid(func, args, kwargs, cfg):
    return log_sigmoid_forward(args[0])


@implements([aten.log_sigmoid_backward], "nonlinear")
def _pa_log_sigmoid_backward(func, args, kwargs, cfg):
    return log_sigmoid_backward(args[0], args[1])


@implements([aten._prelu_kernel], "nonlinear")
def _pa_prelu(func, args, kwargs, cfg):
    return prelu_forward(args[0], args[1])


@implements([aten._prelu_kernel_backward], "nonlinear")
def _pa_prelu_backward(func, args, kwargs, cfg):
    return prelu_backward(args[0], args[1], args[2])


# ReLU6 and friends: clamps and selects, no multiplication
passes_through("hardtanh hardtanh_ hardtanh_backward")
