"""Piecewise affine building blocks: the raw math once, and autograd functionals on top.

Two layers live here.

**Raw functions** (``*_forward`` / ``*_backward``) are plain tensor functions that run
no float multiplication or division: only the PA ops of :mod:`pamtorch.arith`
(``pam``, ``pad``, ``pa_exp``, ``pa_log``, ``pa_rsqrt``, ``paexp2``, ``scale_pow2``),
additions, subtractions, sums, max, comparisons and selects. Their signatures and return
conventions follow the aten ops they stand in for, so the dispatch mode
(:mod:`pamtorch.mode`) calls them directly:

=====================================  ==================================================
aten op                                 raw function
=====================================  ==================================================
``_softmax(x, dim, _)``                 ``softmax_forward(x, dim)``
``_safe_softmax(x, dim)``               ``softmax_forward(x, dim, safe=True)``
``_softmax_backward_data(dy, y, d, _)`` ``softmax_backward(y, dy, dim)``
``_log_softmax(x, dim, _)``             ``log_softmax_forward(x, dim)``
``_log_softmax_backward_data(dy,y,..)`` ``log_softmax_backward(y, dy, dim)``
``native_layer_norm``                   ``layer_norm_forward(x, shape, w, b, eps)``
``native_layer_norm_backward``          ``layer_norm_backward(dy, x, shape, mean, rstd, w, b, mask)``
``_fused_rms_norm``                     ``rms_norm_forward(x, shape, w, eps)``
``_fused_rms_norm_backward``            ``rms_norm_backward(dy, x, shape, rstd, w, mask)``
``gelu(x, approximate)``                ``gelu_forward(x, approximate)``
``gelu_backward(dy, x, approximate)``   ``gelu_backward(dy, x, approximate)``
``nll_loss_forward`` / ``nll_loss2d_forward``   ``nll_loss_forward(logp, t, w, red, ii)``
``nll_loss_backward`` / ``nll_loss2d_backward`` ``nll_loss_backward(dy, logp, t, w, red, ii, tw)``
``mse_loss(x, t, red)``                 ``mse_loss_forward(x, t, red)``
``mse_loss_backward(dy, x, t, red)``    ``mse_loss_backward(dy, x, t, red)``
``native_dropout(x, p, train)``         ``dropout_forward(x, p, train)``
``native_dropout_backward(dy, m, s)``   ``dropout_backward(dy, m, s)``
=====================================  ==================================================

The backward functions evaluate the *approx* derivative: the standard derivative formula
of the original (exact-arithmetic) block, computed with PA ops.

**Autograd functionals** (``softmax``, ``log_softmax``, ``layer_norm``, ``rms_norm``,
``gelu``, ``cross_entropy``, ``nll_loss``, ``mse_loss``, ``dropout``,
``scaled_dot_product_attention`` (and its ``_math`` form), ``multi_head_attention_forward``,
``linear``, ``conv2d``) take ``derivative=``
("approx", "exact", "ste"; ``None``: the scoped default of ``pamtorch.derivative``):

* ``"approx"``: a ``torch.autograd.Function`` whose forward is the raw forward and whose
  backward is the raw backward.
* ``"exact"``: the true (piecewise constant) derivative of the PA block. The same forward
  code is run on autograd-aware PA ops (``pamtorch.mul`` etc. with ``derivative="exact"``)
  and torch's autograd chains their exact derivatives, so the gradient is that of the
  function actually computed (including the max shift of softmax).
* ``"ste"``: the same composition with straight-through PA ops (float derivatives;
  ablations only).

Every forward is written once (``_ops`` selects raw or autograd-aware PA ops), so the
three kinds and the dispatch mode compute bit-identical forward values.

Conventions for corner cases: softmax of a row that is all ``-inf`` gives NaN like torch
(``safe=True``, used by attention, gives 0 like ``aten._safe_softmax``); empty tensors give
empty results; NaN propagates.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as _F

from .. import arith
from .. import autograd as _ag
import importlib as _importlib
from ..arith import LOG2E
from ..autograd import resolve_derivative
from ..recording import RECORDERS

# the module, not the function ``pamtorch.matmul`` the package may re-export
_mm = _importlib.import_module("pamtorch.matmul")

__all__ = [
    # raw functions
    "softmax_forward", "softmax_backward", "log_softmax_forward", "log_softmax_backward", "balance_rows",
    "layer_norm_forward", "layer_norm_backward", "rms_norm_forward", "rms_norm_backward",
    "gelu_forward", "gelu_backward", "nll_loss_forward", "nll_loss_backward",
    "mse_loss_forward", "mse_loss_backward", "dropout_forward", "dropout_backward",
    "attention_forward",
    # autograd functionals
    "softmax", "log_softmax", "layer_norm", "rms_norm", "gelu", "cross_entropy", "nll_loss",
    "mse_loss", "dropout", "scaled_dot_product_attention",
    "scaled_dot_product_attention_math", "multi_head_attention_forward",
    "linear", "conv2d",
    # helpers
    "torch_label_smoothing",
]


# ---------------------------------------------------------------------------
# op namespaces: raw PA ops, or autograd-aware PA ops of one derivative kind

class _RawOps:
    """The raw PA ops of :mod:`pamtorch.arith` (no autograd)."""

    kind = None
    mul = staticmethod(arith.pam)
    div = staticmethod(arith.pad)
    exp = staticmethod(arith.pa_exp)
    exp2 = staticmethod(arith.paexp2)
    log = staticmethod(arith.pa_log)
    rsqrt = staticmethod(arith.pa_rsqrt)


class _GradOps:
    """Autograd-aware PA ops (``pamtorch.mul`` ...) with one derivative kind."""

    def __init__(self, kind: str):
        self.kind = kind

    def mul(self, a, b):
        return _ag.mul(a, b, derivative=self.kind)

    def div(self, a, b):
        return _ag.div(a, b, derivative=self.kind)

    def exp(self, x):
        return _ag.exp(x, derivative=self.kind)

    def exp2(self, x):
        return _ag.exp2(x, derivative=self.kind)

    def log(self, x):
        return _ag.log(x, derivative=self.kind)

    def rsqrt(self, x):
        return _ag.rsqrt(x, derivative=self.kind)


_RAW = _RawOps()


def _fused(*ts):
    """The compiled module for a fused raw block (``kernels/cpu/pa_elementwise.cpp``,
    ``pa_norm.cpp``: bit-identical to the composition here) when every operand is a float32 CPU
    tensor and no audit recorder listens (the composition reports each PA op it runs), else None."""
    return None if RECORDERS else arith._ext(*ts)


def _fused_rows(x: torch.Tensor, k: int, *ts):
    """:func:`_fused` for the row kernels of ``pa_norm.cpp``, which take ``x`` non-empty, its last
    ``k`` dims as the rows (and return None for layouts they do not take); ``ts``: the other
    operands (None: absent)."""
    if x.numel() == 0 or not 1 <= k <= x.dim():
        return None
    return _fused(x, *(t for t in ts if t is not None))


def _is_last(x: torch.Tensor, dim) -> bool:
    """Whether ``dim`` is a valid index of ``x``'s last dim."""
    return isinstance(dim, int) and -x.dim() <= dim < x.dim() and dim % x.dim() == x.dim() - 1


def _c(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-d constant of ``like``'s dtype and device."""
    return torch.tensor(float(value), dtype=like.dtype, device=like.device)


def _check_float(x: torch.Tensor, op: str, name: str = "input"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"pamtorch.nn.functional.{op}: '{name}' must be a tensor, got {type(x).__name__}")
    if x.dtype not in arith.SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in arith.SUPPORTED_DTYPES)
        raise TypeError(f"pamtorch.nn.functional.{op}: '{name}' has dtype {x.dtype}; "
                        f"supported dtypes are {names}")


def _trailing(x: torch.Tensor, normalized_shape, op: str):
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if k == 0 or x.dim() < k or tuple(x.shape[-k:]) != shape:
        raise RuntimeError(f"pamtorch.nn.functional.{op}: normalized_shape {list(shape)} does not "
                           f"match the trailing dimensions of input of shape {list(x.shape)}")
    return shape, tuple(range(x.dim() - k, x.dim())), math.prod(shape)


def _sum_lead(t: torch.Tensor, nlead: int) -> torch.Tensor:
    """Sum over the first ``nlead`` dims (``t.sum(())`` would sum everything)."""
    return t if nlead == 0 else t.sum(tuple(range(nlead)))


# ---------------------------------------------------------------------------
# softmax / log-softmax

def softmax_forward(x: torch.Tensor, dim: int, safe: bool = False, *, _ops=_RAW) -> torch.Tensor:
    """PA softmax: ``e = pa_exp(x - max); e ÷̂ Σe`` along ``dim``.

    ``-inf`` entries give 0; a row of only ``-inf`` gives NaN (as ``torch.softmax``), or 0
    with ``safe=True`` (as ``aten._safe_softmax``, used by attention). The max entry's
    ``pa_exp(0)`` is exactly 1, so the sum is >= 1 on every other row.
    """
    if x.numel() == 0:
        return x.clone()
    ext = _fused_rows(x, 1) if _ops is _RAW and _is_last(x, dim) else None
    y = None if ext is None else ext.fused_softmax_forward(x.detach(), safe)
    if y is not None:  # along the last dim: one pass, torch's own sum, one pass
        return y
    m = x.amax(dim, keepdim=True)
    if safe:
        m = torch.where(m == -math.inf, torch.zeros_like(m), m)
    e = _ops.exp(x - m)
    s = e.sum(dim, keepdim=True)
    if safe:
        s = torch.where(s == 0, torch.ones_like(s), s)
    return _ops.div(e, s)


def softmax_backward(y: torch.Tensor, dy: torch.Tensor, dim: int) -> torch.Tensor:
    """Approx softmax derivative: ``y ⊙̂ (dy - Σ(dy ⊙̂ y))`` along ``dim``."""
    if y.numel() == 0:
        return torch.zeros_like(y)
    dy = dy.to(y.dtype)
    ext = _fused_rows(y, 1, dy) if _is_last(y, dim) and dy.shape == y.shape else None
    dx = None if ext is None else ext.fused_softmax_backward(y.detach(), dy.detach())
    if dx is not None:
        return dx
    return arith.pam(y, dy - arith.pam(dy, y).sum(dim, keepdim=True))


def log_softmax_forward(x: torch.Tensor, dim: int, *, _ops=_RAW) -> torch.Tensor:
    """PA log-softmax: ``z - pa_log(Σ pa_exp(z))`` with ``z = x - max`` along ``dim``.

    ``-inf`` entries stay ``-inf``; a row of only ``-inf`` gives NaN (as torch).
    """
    if x.numel() == 0:
        return x.clone()
    ext = _fused(x) if _ops is _RAW else None
    if ext is not None:  # fused around torch's own amax and sum; None: a NaN arose
        y = ext.fused_log_softmax_forward(x, dim)
        if y is not None:
            return y
    z = x - x.amax(dim, keepdim=True)
    return z - _ops.log(_ops.exp(z).sum(dim, keepdim=True))


def log_softmax_backward(y: torch.Tensor, dy: torch.Tensor, dim: int) -> torch.Tensor:
    """Approx log-softmax derivative: ``dy - pa_exp(y) ⊙̂ Σ dy`` along ``dim``."""
    if y.numel() == 0:
        return torch.zeros_like(y)
    dy = dy.to(y.dtype)
    ext = _fused(y, dy)
    if ext is not None:  # one pass after torch's own sum of dy; None: a NaN arose
        dx = ext.fused_log_softmax_backward(y, dy, dim)
        if dx is not None:
            return dx
    return dy - arith.pam(arith.pa_exp(y), dy.sum(dim, keepdim=True))


def balance_rows(dx: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    """The "balanced" loss derivative (``Config`` loss kind, ``derivative="balanced"``): the
    approx log-softmax derivative ``dx`` with each row's sum along ``dim`` subtracted from the
    row's entry at the largest ``y`` (the first, on ties). In exact arithmetic the rows of a
    cross entropy's gradient sum to 0; with ``pa_exp`` in place of exp they sum to up to ±18%
    of the target's pull (docs/nn.md), a drift that a fully PA CNN trained with SGD did not
    survive (RESULTS.md, "CNN"). A sum, a compare and a subtraction: no multiplication. NaN
    rows stay NaN."""
    if dx.numel() == 0:
        return dx
    residual = dx.sum(dim, keepdim=True)
    return dx.scatter_add(dim, y.argmax(dim, keepdim=True), -residual)


# ---------------------------------------------------------------------------
# layer norm / RMS norm

def layer_norm_forward(x: torch.Tensor, normalized_shape, weight: Optional[torch.Tensor] = None,
                       bias: Optional[torch.Tensor] = None, eps: float = 1e-5, *, _ops=_RAW):
    """PA layer norm, returning ``(y, mean, rstd)`` like ``aten.native_layer_norm``.

    ``mean = Σx ÷̂ n``, ``var = Σ (x-mean) ⊙̂ (x-mean) ÷̂ n``, ``rstd = pa_rsqrt(var + eps)``,
    ``y = ((x - mean) ⊙̂ rstd) ⊙̂ w + b``. ``mean`` and ``rstd`` have shape
    ``x.shape[:-k] + (1,)*k`` for ``k = len(normalized_shape)``, dtype of ``x``.
    """
    shape, dims, n = _trailing(x, normalized_shape, "layer_norm")
    if _ops is _RAW:
        fused = _fused_norm_forward(x, shape, weight, bias, eps, True)
        if fused is not None:
            return fused
    nt = _c(n, x)
    mean = _ops.div(x.sum(dims, keepdim=True), nt)
    xc = x - mean
    var = _ops.div(_ops.mul(xc, xc).sum(dims, keepdim=True), nt)
    rstd = _ops.rsqrt(var + eps)
    y = _ops.mul(xc, rstd)
    if weight is not None:
        y = _ops.mul(y, weight.to(x.dtype))
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y, mean, rstd


def layer_norm_backward(dy: torch.Tensor, x: torch.Tensor, normalized_shape, mean: torch.Tensor,
                        rstd: torch.Tensor, weight: Optional[torch.Tensor] = None,
                        bias: Optional[torch.Tensor] = None,
                        output_mask: Sequence[bool] = (True, True, True)):
    """Approx layer-norm derivative, ``(dx, dw, db)`` like ``aten.native_layer_norm_backward``.

    With ``x̂ = (x - mean) ⊙̂ rstd`` and ``g = dy ⊙̂ w`` (``dy`` without weight):
    ``dx = rstd ⊙̂ (g - Σg ÷̂ n - x̂ ⊙̂ (Σ(g ⊙̂ x̂) ÷̂ n))``, ``dw = Σ_batch dy ⊙̂ x̂``,
    ``db = Σ_batch dy``. Entries are None where ``output_mask`` is False or the parameter
    is None.
    """
    shape, dims, n = _trailing(x, normalized_shape, "layer_norm_backward")
    nlead = x.dim() - len(dims)
    dy = dy.to(x.dtype)
    mean, rstd = mean.to(x.dtype), rstd.to(x.dtype)
    want_dw = len(output_mask) > 1 and output_mask[1] and weight is not None
    dx = dw = db = None
    fused = _fused_norm_backward(dy, x, shape, mean, rstd, weight, output_mask[0], want_dw)
    if fused is not None:
        dx, dw = fused
    else:
        xhat = arith.pam(x - mean, rstd)
        if output_mask[0]:
            g = dy if weight is None else arith.pam(dy, weight.to(x.dtype))
            nt = _c(n, x)
            a = arith.pad(g.sum(dims, keepdim=True), nt)
            b = arith.pad(arith.pam(g, xhat).sum(dims, keepdim=True), nt)
            dx = arith.pam(rstd, g - a - arith.pam(xhat, b))
        if want_dw:
            dw = _sum_lead(arith.pam(dy, xhat), nlead)
    if dw is not None:
        dw = dw.to(weight.dtype)
    if len(output_mask) > 2 and output_mask[2] and bias is not None:
        db = _sum_lead(dy, nlead).to(bias.dtype)
    return dx, dw, db


def rms_norm_forward(x: torch.Tensor, normalized_shape, weight: Optional[torch.Tensor] = None,
                     eps: Optional[float] = None, *, _ops=_RAW):
    """PA RMS norm, ``(y, rstd)`` like ``aten._fused_rms_norm``.

    ``rstd = pa_rsqrt(Σ x ⊙̂ x ÷̂ n + eps)``, ``y = (x ⊙̂ rstd) ⊙̂ w``; ``eps=None`` is
    ``torch.finfo(x.dtype).eps`` (as ``torch.nn.functional.rms_norm``).
    """
    shape, dims, n = _trailing(x, normalized_shape, "rms_norm")
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    if _ops is _RAW:
        fused = _fused_norm_forward(x, shape, weight, None, eps, False)
        if fused is not None:
            return fused
    ms = _ops.div(_ops.mul(x, x).sum(dims, keepdim=True), _c(n, x))
    rstd = _ops.rsqrt(ms + eps)
    y = _ops.mul(x, rstd)
    if weight is not None:
        y = _ops.mul(y, weight.to(x.dtype))
    return y, rstd


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, normalized_shape, rstd: torch.Tensor,
                      weight: Optional[torch.Tensor] = None,
                      output_mask: Sequence[bool] = (True, True)):
    """Approx RMS-norm derivative ``(dx, dw)``: with ``x̂ = x ⊙̂ rstd``, ``g = dy ⊙̂ w``,
    ``dx = rstd ⊙̂ (g - x̂ ⊙̂ (Σ(g ⊙̂ x̂) ÷̂ n))``, ``dw = Σ_batch dy ⊙̂ x̂``."""
    shape, dims, n = _trailing(x, normalized_shape, "rms_norm_backward")
    nlead = x.dim() - len(dims)
    dy = dy.to(x.dtype)
    rstd = rstd.to(x.dtype)
    want_dw = len(output_mask) > 1 and output_mask[1] and weight is not None
    fused = _fused_norm_backward(dy, x, shape, None, rstd, weight, output_mask[0], want_dw)
    if fused is not None:
        dx, dw = fused
        return dx, None if dw is None else dw.to(weight.dtype)
    xhat = arith.pam(x, rstd)
    dx = dw = None
    if output_mask[0]:
        g = dy if weight is None else arith.pam(dy, weight.to(x.dtype))
        b = arith.pad(arith.pam(g, xhat).sum(dims, keepdim=True), _c(n, x))
        dx = arith.pam(rstd, g - arith.pam(xhat, b))
    if want_dw:
        dw = _sum_lead(arith.pam(dy, xhat), nlead).to(weight.dtype)
    return dx, dw


def _fused_norm_forward(x, shape, weight, bias, eps, centered):
    """Layer norm (``centered``) or RMS norm by ``pa_norm.cpp``'s fused kernel: the raw
    forward's result, or None where the kernel does not apply (then the composition runs)."""
    w = None if weight is None else weight.detach().to(x.dtype)
    b = None if bias is None else bias.detach().to(x.dtype)
    ext = _fused_rows(x, len(shape), w, b)
    if ext is None or any(t is not None and tuple(t.shape) != shape for t in (w, b)):
        return None
    y, mean, rstd = ext.fused_norm_forward(x.detach(), len(shape), w, b, float(eps), centered)
    if y is None:  # a layout it does not take, or a NaN from the bias add (torch's add picks its pattern)
        return None
    return (y, mean, rstd) if centered else (y, rstd)


def _fused_norm_backward(dy, x, shape, mean, rstd, weight, want_dx, want_dw):
    """``(dx, dw)`` of layer norm (``mean`` given) or RMS norm by ``pa_norm.cpp``'s fused kernel
    (``dw`` not yet in the weight's dtype), or None where it does not apply."""
    if not (want_dx or want_dw):
        return None
    w = None if weight is None else weight.detach().to(x.dtype)
    ext = _fused_rows(x, len(shape), dy, mean, rstd, w)
    stat = tuple(x.shape[:x.dim() - len(shape)]) + (1,) * len(shape)  # aten's mean / rstd shape
    if (ext is None or dy.shape != x.shape or tuple(rstd.shape) != stat
            or (mean is not None and tuple(mean.shape) != stat) or (w is not None and tuple(w.shape) != shape)):
        return None
    dx, dw = ext.fused_norm_backward(dy.detach(), x.detach(), len(shape), None if mean is None else mean.detach(),
                                     rstd.detach(), w, bool(want_dx), bool(want_dw), mean is not None)
    if (want_dx and dx is None) or (want_dw and dw is None):  # layouts the kernel does not take
        return None
    return dx, dw


# ---------------------------------------------------------------------------
# GELU

# tanh form: gelu(x) ≈ x σ(h), h = A x + B x³ (σ(2u) = (1 + tanh u)/2)
_GELU_A = 2.0 * math.sqrt(2.0 / math.pi)
_GELU_B = _GELU_A * 0.044715
_GELU_CLAMP = 10.0   # beyond ±10 the derivative is 1 / 0 to within float32


def gelu_forward(x: torch.Tensor, approximate: str = "none", *, _ops=_RAW) -> torch.Tensor:
    """PA GELU, the tanh form written as one PA division:

        gelu(x) ≈ x ÷̂ (1 + paexp2(-(x ⊙̂ A·log2e + x³ ⊙̂ B·log2e)))

    with ``A = 2√(2/π)``, ``B = 0.044715 A`` (``x³ = (x ⊙̂ x) ⊙̂ x``), i.e.
    ``x σ(2√(2/π)(x + 0.044715 x³))`` with the natural-log constants folded into the PAMs
    so the exponential is a single ``paexp2``. Measured against the exact (erf) GELU in
    float32 on [-8, 8]: max abs error 0.059, mean abs error 0.0034 (0.0067 on [-4, 4]).
    The sigmoid form ``x σ(1.702 x)`` built the same way measured max 0.062, mean 0.0074.
    Large |x| saturate correctly (x for x → ∞, -0 for x → -∞). ``approximate`` is
    accepted for signature compatibility with ``aten.gelu`` and ignored: both torch
    variants map to this one PA function.
    """
    L = LOG2E
    ext = _fused(x) if _ops is _RAW else None
    if ext is not None:
        return ext.fused_gelu_forward(x, _GELU_A * L, _GELU_B * L)
    x3 = _ops.mul(_ops.mul(x, x), x)
    h2 = _ops.mul(x, _c(_GELU_A * L, x)) + _ops.mul(x3, _c(_GELU_B * L, x))
    e = _ops.exp2(-h2)
    return _ops.div(x, 1 + e)


def gelu_backward(dy: torch.Tensor, x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Approx derivative of the GELU above, evaluated with PA ops:

        f' = σ + (x σ) ⊙̂ (1 - σ) ⊙̂ h',   h' = A + 3B x²,
        σ = 1 ÷̂ (1 + e),  1 - σ = e ÷̂ (1 + e),  x σ = x ÷̂ (1 + e)

    (the derivative of ``x σ(h(x))``, the function the forward approximates GELU by),
    set to 1 for x > 10 and 0 for x < -10. ``dx = dy ⊙̂ f'``. Measured against the
    exact GELU derivative on [-12, 12]: max abs error 0.099, mean 0.0065.
    """
    dy = dy.to(x.dtype)
    L = LOG2E
    ext = _fused(dy, x)
    if ext is not None:
        return ext.fused_gelu_backward(dy, x, _GELU_A * L, _GELU_B * L, 3 * _GELU_B, _GELU_A, _GELU_CLAMP)
    x2 = arith.pam(x, x)
    x3 = arith.pam(x2, x)
    h2 = arith.pam(x, _c(_GELU_A * L, x)) + arith.pam(x3, _c(_GELU_B * L, x))
    e = arith.paexp2(-h2)
    d = 1 + e
    s = arith.pad(torch.ones_like(x), d)
    oms = torch.where(torch.isinf(e), torch.ones_like(e), arith.pad(e, d))
    f = arith.pad(x, d)
    hp = _GELU_A + arith.pam(x2, _c(3 * _GELU_B, x))
    df = s + arith.pam(arith.pam(f, oms), hp)
    df = torch.where(x > _GELU_CLAMP, torch.ones_like(df), df)
    df = torch.where(x < -_GELU_CLAMP, torch.zeros_like(df), df)
    return arith.pam(dy, df)


# ---------------------------------------------------------------------------
# losses

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def _reduction(reduction) -> int:
    if isinstance(reduction, str):
        if reduction not in _REDUCTIONS:
            raise ValueError(f"pamtorch: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
        return _REDUCTIONS[reduction]
    if reduction not in (0, 1, 2):
        raise ValueError(f"pamtorch: reduction must be 0, 1 or 2, got {reduction!r}")
    return int(reduction)


def _nll_pick(logp, target, weight, ignore_index):
    """(class dim, valid mask, safe target, picked log-prob, per-element weight or None)."""
    cdim = 1 if logp.dim() >= 2 else 0
    valid = target != ignore_index
    tsafe = torch.where(valid, target, torch.zeros_like(target))
    picked = logp.gather(cdim, tsafe.unsqueeze(cdim)).squeeze(cdim)
    wt = None
    if weight is not None:
        w = weight.to(logp.dtype)[tsafe]
        wt = torch.where(valid, w, torch.zeros_like(w))
    return cdim, valid, tsafe, picked, wt


def nll_loss_forward(logp: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                     reduction="mean", ignore_index: int = -100, *, _ops=_RAW):
    """NLL loss, ``(loss, total_weight)`` like ``aten.nll_loss_forward`` (any number of
    spatial dims: class dim 1, or 0 for 1-D input).

    Per element ``-logp[t] ⊙̂ w[t]`` (no PAM without ``weight``), 0 where ``t ==
    ignore_index``; ``total_weight = Σ w[t]`` over the kept elements (their count without
    weight); "mean" is ``Σ ÷̂ total_weight`` (NaN when nothing is kept, as torch), "sum" the
    sum, "none" the per-element losses with ``total_weight`` 0.
    """
    red = _reduction(reduction)
    _, valid, _, picked, wt = _nll_pick(logp, target, weight, ignore_index)
    if wt is None:
        wt = valid.to(logp.dtype)
        li = -picked
    else:
        li = -_ops.mul(picked, wt)
    li = torch.where(valid, li, torch.zeros_like(li))
    if red == 0:
        return li, torch.zeros((), dtype=logp.dtype, device=logp.device)
    total = wt.sum()
    s = li.sum()
    return (s if red == 2 else _ops.div(s, total)), total


def nll_loss_backward(dy: torch.Tensor, logp: torch.Tensor, target: torch.Tensor,
                      weight: Optional[torch.Tensor], reduction, ignore_index: int,
                      total_weight: torch.Tensor) -> torch.Tensor:
    """Derivative of :func:`nll_loss_forward` w.r.t. ``logp`` (like
    ``aten.nll_loss_backward``): ``-dy ⊙̂ w[t]`` (÷̂ ``total_weight`` for "mean") scattered
    to the target classes, 0 elsewhere and at ignored elements."""
    red = _reduction(reduction)
    cdim, valid, tsafe, _, wt = _nll_pick(logp, target, weight, ignore_index)
    g = (-dy.to(logp.dtype)).expand(target.shape)
    if wt is not None:
        g = arith.pam(g, wt)
    if red == 1:
        g = arith.pad(g, total_weight.to(logp.dtype))
    g = torch.where(valid, g, torch.zeros_like(g))
    return torch.zeros_like(logp).scatter(cdim, tsafe.unsqueeze(cdim), g.unsqueeze(cdim))


def mse_loss_forward(x: torch.Tensor, target: torch.Tensor, reduction="mean", *, _ops=_RAW):
    """MSE: ``(x - t) ⊙̂ (x - t)``, summed, or ``Σ ÷̂ numel`` for "mean"."""
    red = _reduction(reduction)
    d = x - target
    sq = _ops.mul(d, d)
    if red == 0:
        return sq
    s = sq.sum()
    return s if red == 2 else _ops.div(s, _c(sq.numel(), sq))


def mse_loss_backward(dy: torch.Tensor, x: torch.Tensor, target: torch.Tensor, reduction="mean"):
    """Approx MSE derivative w.r.t. ``x``: ``(2(x - t)) ⊙̂ dy`` (÷̂ numel for "mean"); the
    factor 2 is an exponent shift."""
    red = _reduction(reduction)
    d = x - target
    d2 = arith.scale_pow2(d, torch.ones((), dtype=torch.int32, device=d.device))
    g = arith.pam(d2, dy.to(d.dtype).expand_as(d2) if red == 0 else dy.to(d.dtype))
    if red == 1:
        g = arith.pad(g, _c(d.numel(), d))
    return g


# ---------------------------------------------------------------------------
# dropout

def dropout_forward(x: torch.Tensor, p: float, train: bool = True, generator=None, *, _ops=_RAW):
    """Dropout ``(y, mask)`` like ``aten.native_dropout``: keep with probability ``1-p``,
    ``y = x ⊙̂ (1/(1-p))`` where kept, 0 elsewhere. Not training or ``p == 0``: ``y = x``
    with an all-True mask; ``p == 1``: zeros and an all-False mask."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"pamtorch: dropout probability has to be between 0 and 1, but got {p}")
    if not train or p == 0.0:
        return x.clone(), torch.ones_like(x, dtype=torch.bool)
    if p == 1.0:
        keep = torch.zeros_like(x, dtype=torch.bool)
        return x.masked_fill(~keep, 0.0), keep
    mask = torch.empty(x.shape, dtype=torch.float32, device=x.device).bernoulli_(
        1.0 - p, generator=generator).bool()
    y = _ops.mul(x, _c(1.0 / (1.0 - p), x))
    return torch.where(mask, y, torch.zeros_like(y)), mask


def dropout_backward(dy: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """``dy ⊙̂ scale`` where ``mask``, 0 elsewhere (``aten.native_dropout_backward``)."""
    g = arith.pam(dy, _c(scale, dy))
    return torch.where(mask, g, torch.zeros_like(g))


# ---------------------------------------------------------------------------
# autograd functions (approx derivatives: forward = raw forward, backward = raw backward)

class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, safe):
        y = softmax_forward(x, dim, safe)
        ctx.dim = dim
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return softmax_backward(y, dy, ctx.dim), None, None


class _LogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        y = log_softmax_forward(x, dim)
        ctx.dim = dim
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return log_softmax_backward(y, dy, ctx.dim), None


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shape, weight, bias, eps):
        y, mean, rstd = layer_norm_forward(x, shape, weight, bias, eps)
        ctx.shape = shape
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        dx, dw, db = layer_norm_backward(dy, x, ctx.shape, mean, rstd, weight, bias,
                                         ctx.needs_input_grad[0:1] + ctx.needs_input_grad[2:4])
        return dx, None, dw, db, None


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shape, weight, eps):
        y, rstd = rms_norm_forward(x, shape, weight, eps)
        ctx.shape = shape
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, rstd, weight = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x, ctx.shape, rstd, weight,
                                   (ctx.needs_input_grad[0], ctx.needs_input_grad[2]))
        return dx, None, dw, None


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return gelu_forward(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return gelu_backward(dy, x)


class _NLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, target, weight, red, ignore_index):
        loss, total = nll_loss_forward(logp, target, weight, red, ignore_index)
        ctx.red, ctx.ignore_index = red, ignore_index
        ctx.save_for_backward(logp, target, weight, total)
        return loss

    @staticmethod
    def backward(ctx, dy):
        logp, target, weight, total = ctx.saved_tensors
        g = nll_loss_backward(dy, logp, target, weight, ctx.red, ctx.ignore_index, total)
        return g, None, None, None, None


class _MSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, target, red):
        ctx.red = red
        ctx.save_for_backward(x, target)
        return mse_loss_forward(x, target, red)

    @staticmethod
    def backward(ctx, dy):
        x, target = ctx.saved_tensors
        g = mse_loss_backward(dy, x, target, ctx.red)
        gx = g if ctx.needs_input_grad[0] else None
        gt = -g if ctx.needs_input_grad[1] else None
        return gx, gt, None


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, generator):
        y, mask = dropout_forward(x, p, True, generator)
        ctx.scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(mask)
        ctx.mark_non_differentiable(mask)
        return y

    @staticmethod
    def backward(ctx, dy):
        (mask,) = ctx.saved_tensors
        return dropout_backward(dy, mask, ctx.scale), None, None


# ---------------------------------------------------------------------------
# public functionals

def _kind(derivative) -> str:
    return resolve_derivative(derivative)


def softmax(x: torch.Tensor, dim: int, *, safe: bool = False, derivative: str | None = None) -> torch.Tensor:
    """PA softmax along ``dim`` (see :func:`softmax_forward`)."""
    _check_float(x, "softmax")
    kind = _kind(derivative)
    if kind == "approx":
        return _Softmax.apply(x, dim, safe)
    return softmax_forward(x, dim, safe, _ops=_GradOps(kind))


def log_softmax(x: torch.Tensor, dim: int, *, derivative: str | None = None) -> torch.Tensor:
    """PA log-softmax along ``dim`` (see :func:`log_softmax_forward`)."""
    _check_float(x, "log_softmax")
    kind = _kind(derivative)
    if kind == "approx":
        return _LogSoftmax.apply(x, dim)
    return log_softmax_forward(x, dim, _ops=_GradOps(kind))


def layer_norm(x: torch.Tensor, normalized_shape, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5, *,
               derivative: str | None = None) -> torch.Tensor:
    """PA layer norm with ``F.layer_norm`` semantics (see :func:`layer_norm_forward`)."""
    _check_float(x, "layer_norm")
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    kind = _kind(derivative)
    if kind == "approx":
        return _LayerNorm.apply(x, shape, weight, bias, eps)
    return layer_norm_forward(x, shape, weight, bias, eps, _ops=_GradOps(kind))[0]


def rms_norm(x: torch.Tensor, normalized_shape, weight: Optional[torch.Tensor] = None,
             eps: Optional[float] = None, *, derivative: str | None = None) -> torch.Tensor:
    """PA RMS norm with ``F.rms_norm`` semantics (see :func:`rms_norm_forward`)."""
    _check_float(x, "rms_norm")
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    kind = _kind(derivative)
    if kind == "approx":
        return _RMSNorm.apply(x, shape, weight, eps)
    return rms_norm_forward(x, shape, weight, eps, _ops=_GradOps(kind))[0]


def gelu(x: torch.Tensor, approximate: str = "none", *, derivative: str | None = None) -> torch.Tensor:
    """PA GELU (see :func:`gelu_forward`; ``approximate`` is accepted and ignored)."""
    _check_float(x, "gelu")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"pamtorch: approximate must be 'none' or 'tanh', got {approximate!r}")
    kind = _kind(derivative)
    if kind == "approx":
        return _Gelu.apply(x)
    return gelu_forward(x, _ops=_GradOps(kind))


def nll_loss(logp: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
             ignore_index: int = -100, reduction: str = "mean", *,
             derivative: str | None = None) -> torch.Tensor:
    """NLL loss with ``F.nll_loss`` semantics (see :func:`nll_loss_forward`)."""
    _check_float(logp, "nll_loss")
    red = _reduction(reduction)
    kind = _kind(derivative)
    if kind == "approx":
        return _NLL.apply(logp, target, weight, red, ignore_index)
    return nll_loss_forward(logp, target, weight, red, ignore_index, _ops=_GradOps(kind))[0]


_SMOOTHINGS = ("torch", "fairseq")


def _smoothing_weights(eps: float, C: int, smoothing: str) -> tuple[float, float]:
    """(a, b) of ``a ⊙̂ nll + b ⊙̂ smooth``: torch's (1-ε, ε/C) or fairseq's
    (1-ε-ε/(C-1), ε/(C-1)), as exact Python floats (scalars computed in Python are exact)."""
    if smoothing not in _SMOOTHINGS:
        raise ValueError(f"pamtorch.cross_entropy: smoothing must be one of {_SMOOTHINGS}, got {smoothing!r}")
    if smoothing == "torch":
        return 1.0 - eps, eps / C
    if C < 2:
        raise ValueError(f"pamtorch.cross_entropy: smoothing='fairseq' spreads ε over the C-1 other "
                         f"classes and needs C >= 2 classes, got C={C}")
    ei = eps / (C - 1)
    return 1.0 - eps - ei, ei


def torch_label_smoothing(eps: float, num_classes: int, smoothing: str = "fairseq") -> float:
    """The ``label_smoothing`` that makes torch's ``F.cross_entropy`` compute the loss of
    ``smoothing`` with ε = ``eps``: ``eps`` itself for ``"torch"``, and ``ε' = ε·C/(C-1)`` for
    ``"fairseq"``, since torch's weights ``(1-ε', ε'/C)`` are then fairseq's
    ``(1-ε-ε/(C-1), ε/(C-1))``. This is how a stock model (or a recipe's ``--smoothing
    fairseq``) gets fairseq's smoothing under ``pamtorch.mode`` and in fp32 alike; the
    float32 weights it leads to are :func:`cross_entropy`'s ``smoothing="fairseq"`` ones.
    fairseq's weight on the target class, ``1-ε-ε/(C-1)``, is negative for ε > (C-1)/C,
    which torch cannot express: that is an error."""
    if smoothing not in _SMOOTHINGS:
        raise ValueError(f"pamtorch: smoothing must be one of {_SMOOTHINGS}, got {smoothing!r}")
    eps = float(eps)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"pamtorch: label_smoothing must be in [0, 1], got {eps}")
    if smoothing == "torch" or eps == 0.0:
        return eps
    C = int(num_classes)
    if C < 2:
        raise ValueError(f"pamtorch: smoothing='fairseq' spreads ε over the C-1 other classes and needs "
                         f"C >= 2 classes, got C={C}")
    out = eps * C / (C - 1)
    if out > 1.0:
        raise ValueError(f"pamtorch: smoothing='fairseq' with label_smoothing={eps} and {C} classes gives the "
                         f"target class the weight 1-ε-ε/(C-1) = {1.0 - eps - eps / (C - 1):.4g} < 0; "
                         f"use label_smoothing <= (C-1)/C = {(C - 1) / C:.4g}")
    return out


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                  *, smoothing: str = "torch", derivative: str | None = None) -> torch.Tensor:
    """PA cross entropy with ``F.cross_entropy`` semantics, computed as torch 2.13's
    ``cross_entropy_loss`` composes it (aten ``LossNLL.cpp``), op for op on PA ops, so this
    function, the dispatch mode (which receives torch's decomposition) and ``convert``
    give the same value bit for bit. ``ℓ = log_softmax(x)`` over the class dim (1, or 0
    for 1-D input), ``C`` classes, ``ε = label_smoothing``.

    Class-index targets ``t``: ``nll = nll_loss(ℓ, t, weight, ignore_index, reduction)``
    and, for ε > 0, ``s_n = -Σ_c ℓ_nc (⊙̂ w_c)``, 0 where ``t_n == ignore_index``; "none"
    keeps ``s``, "sum" is ``Σ s``, "mean" is ``Σ s ÷̂ Σ_kept w_(t_n)`` (the kept count
    without ``weight``: the same denominator as the NLL term, as torch). Then
    ``loss = nll ⊙̂ a + s ⊙̂ b``.

    Probability targets ``p`` (same shape as the input): ``p' = p ⊙̂ a + b`` for ε > 0;
    ``loss = -Σ ℓ ⊙̂ p' (⊙̂ w_c)`` over the classes ("none"), over everything ("sum"), or
    that ÷̂ (numel / C) ("mean").

    ``smoothing="torch"``: ``a = 1-ε``, ``b = ε/C`` (ε spread over all C classes).
    ``smoothing="fairseq"``: ``a = 1-ε-ε/(C-1)``, ``b = ε/(C-1)`` (fairseq's
    ``label_smoothed_nll_loss``, used by the paper's IWSLT runs: the target class keeps
    ``1-ε``, each other class gets ``ε/(C-1)``); "sum" is fairseq's criterion value and
    "mean" divides both terms by the kept targets (fairseq's per-token normalisation).

    ``derivative="approx"``: log-softmax, NLL and each PAM/PAD backpropagate their approx
    formula (for class-index targets without smoothing the input gradient is
    ``pa_exp(ℓ) ⊙̂ Σ g - g`` scattered, i.e. softmax − one-hot in PA form). ``"exact"``:
    the true derivative of the PA loss as computed (every PA op's exact derivative,
    chained by autograd), *not* the float ``softmax(x) - onehot``.
    """
    _check_float(input, "cross_entropy")
    red = _reduction(reduction)
    eps = float(label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"pamtorch: label_smoothing must be in [0, 1], got {label_smoothing}")
    cdim = 1 if input.dim() >= 2 else 0
    C = input.shape[cdim]
    a, b = _smoothing_weights(eps, C, smoothing)
    kind = _kind(derivative)
    ops = _GradOps(kind)
    logp = log_softmax(input, cdim, derivative=kind)
    wshape = [1] * input.dim()
    wshape[cdim] = C
    w = None if weight is None else weight.to(input.dtype)

    if target.is_floating_point():  # class probabilities
        if target.shape != input.shape:
            raise ValueError(f"pamtorch.cross_entropy: probability targets must have the input's shape "
                             f"{list(input.shape)}, got {list(target.shape)}")
        t = target.to(input.dtype)
        if eps > 0:
            t = ops.mul(t, _c(a, t)) + b
        terms = ops.mul(logp, t)
        if w is not None:
            terms = ops.mul(terms, w.view(wshape))
        if red == 0:
            return -terms.sum(cdim)
        s = -terms.sum()
        return s if red == 2 else ops.div(s, _c(input.numel() // C if C else 0, s))

    nll = nll_loss(logp, target, weight, ignore_index, red, derivative=kind)
    if eps == 0.0:
        return nll
    ignore = target == ignore_index
    smooth = -(logp.sum(cdim) if w is None else ops.mul(logp, w.view(wshape)).sum(cdim))
    smooth = smooth.masked_fill(ignore, 0.0)
    if red == 1:
        if w is None:
            den = (~ignore).sum().to(input.dtype)
        else:  # torch's order: gather with ignored targets at class 0, zero them, sum
            den = w.gather(0, target.masked_fill(ignore, 0).flatten()).masked_fill(ignore.flatten(), 0).sum()
        ret = ops.div(smooth.sum(), den)
    else:
        ret = smooth.sum() if red == 2 else smooth
    return ops.mul(nll, _c(a, nll)) + ops.mul(ret, _c(b, ret))


def mse_loss(input: torch.Tensor, target: torch.Tensor, reduction: str = "mean", *,
             derivative: str | None = None) -> torch.Tensor:
    """PA MSE loss with ``F.mse_loss`` semantics (see :func:`mse_loss_forward`)."""
    _check_float(input, "mse_loss")
    red = _reduction(reduction)
    input, target = torch.broadcast_tensors(input, target.to(input.dtype))
    kind = _kind(derivative)
    if kind == "approx":
        return _MSE.apply(input, target, red)
    return mse_loss_forward(input, target, red, _ops=_GradOps(kind))


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False, *,
            generator=None, derivative: str | None = None) -> torch.Tensor:
    """PA dropout (the kept values scaled by PAM with ``1/(1-p)``); ``inplace`` is accepted
    and ignored (a new tensor is returned)."""
    _check_float(x, "dropout")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"pamtorch: dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x.masked_fill(torch.ones_like(x, dtype=torch.bool), 0.0)  # zeros, graph kept
    kind = _kind(derivative)
    if kind == "approx":
        return _Dropout.apply(x, p, generator)
    return dropout_forward(x, p, True, generator, _ops=_GradOps(kind))[0]


# ---------------------------------------------------------------------------
# products

def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
           derivative: str | None = None, offset: float | None = None,
           mantissa_bits: int | None = None) -> torch.Tensor:
    """PAM ``x @ weight^T + bias`` (:func:`pamtorch.matmul.linear`); ``offset`` α applies to
    every product term, ``mantissa_bits`` rounds the operands."""
    return _mm.linear(x, weight, bias, derivative=derivative, offset=offset, mantissa_bits=mantissa_bits)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride=1,
           padding=0, dilation=1, groups: int = 1, *, derivative: str | None = None,
           offset: float | None = None, mantissa_bits: int | None = None) -> torch.Tensor:
    """PAM 2-D convolution (:func:`pamtorch.matmul.conv2d`); ``offset`` and
    ``mantissa_bits`` as in :func:`linear`."""
    return _mm.conv2d(x, weight, bias, stride, padding, dilation, groups, derivative=derivative,
                      offset=offset, mantissa_bits=mantissa_bits)


# ---------------------------------------------------------------------------
# attention

def _kinds(config, derivative):
    """(matmul, softmax, elementwise) OpConfigs: from ``config``, or all PA with ``derivative``."""
    if config is None:
        from ..config import OpConfig
        op = OpConfig(derivative=_kind(derivative))
        return op, op, op
    return config.matmul, config.softmax, config.elementwise


def _pa_matmul(a, b, op):
    if not op.pa:
        return torch.matmul(a, b)
    return _mm.matmul(a, b, derivative=op.derivative, offset=op.offset, mantissa_bits=op.mantissa_bits)


def attention_forward(q, k, v, mask=None, dropout_p: float = 0.0, scale: float | None = None, *,
                      config=None, derivative: str | None = None, generator=None):
    """Attention on ``[..., L, E]`` queries and ``[..., S, E]`` keys/values, returning
    ``(out, weights)``: ``weights = softmax_safe((q ⊙̂ scale) @PAM kᵀ + mask)`` (dropout
    applied), ``out = weights @PAM v``. ``mask`` is additive (float, ``-inf`` masks) or
    boolean (True = attend, as SDPA). Fully masked rows give zero weights (as
    ``aten._safe_softmax``). Autograd-aware; kinds from ``config`` (matmul for the
    products and the scale, softmax, elementwise for dropout)."""
    mop, sop, eop = _kinds(config, derivative)
    E = q.shape[-1]
    s = 1.0 / math.sqrt(E) if scale is None else float(scale)
    qs = _ag.mul(q, _c(s, q), derivative=mop.derivative) if mop.pa else q * s
    scores = _pa_matmul(qs, k.transpose(-2, -1), mop)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, -math.inf)
        else:
            scores = scores + mask.to(scores.dtype)
    if sop.pa:
        w = softmax(scores, -1, safe=True, derivative=sop.derivative)
    else:
        w = torch.ops.aten._safe_softmax(scores, -1)
    if dropout_p > 0.0:
        if eop.pa:
            w = dropout(w, dropout_p, True, generator=generator, derivative=eop.derivative)
        else:
            w = _F.dropout(w, dropout_p, True)
    return _pa_matmul(w, v, mop), w


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False, *, config=None,
                                 derivative: str | None = None) -> torch.Tensor:
    """PA ``F.scaled_dot_product_attention``: ``softmax_safe((q ⊙̂ scale) @PAM kᵀ + mask)
    @PAM v``, one PAM by the scale (default ``1/√E``) on q, as the paper's code does
    (torch's math path instead multiplies q and k by ``√scale`` each).

    ``attn_mask``: boolean (True = take part) or additive float, broadcastable to
    ``[..., L, S]``; ``is_causal`` masks the upper triangle with ``-inf`` (not together
    with ``attn_mask``, as torch). Fully masked rows give 0. ``config`` (a
    :class:`pamtorch.Config`) picks per-kind settings; else everything is PA with
    ``derivative``.
    """
    return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, config,
                 derivative)[0]


def scaled_dot_product_attention_math(query, key, value, attn_mask=None, dropout_p: float = 0.0,
                                      is_causal: bool = False, dropout_mask=None, *,
                                      scale: float | None = None, enable_gqa: bool = False,
                                      config=None, derivative: str | None = None):
    """PA ``aten._scaled_dot_product_attention_math``: ``(out, weights)`` (weights after
    dropout), computed as :func:`scaled_dot_product_attention` (one PAM by the scale on
    q), for callers of the aten op itself."""
    if dropout_mask is not None:
        raise NotImplementedError("pamtorch.scaled_dot_product_attention_math: an explicit "
                                  "dropout_mask is not supported; pass dropout_p")
    return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, config,
                 derivative)


def _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, config, derivative):
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_float(t, "scaled_dot_product_attention", name)
    L, S = query.shape[-2], key.shape[-2]
    if is_causal:
        if attn_mask is not None:
            raise RuntimeError("pamtorch.scaled_dot_product_attention: _scaled_dot_product_attention: "
                               "Explicit attn_mask should not be set when is_causal=True")
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
    if enable_gqa and query.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(rep, -3)
        value = value.repeat_interleave(rep, -3)
    return attention_forward(query, key, value, attn_mask, dropout_p, scale,
                             config=config, derivative=derivative)


def _mha_mask(mask, dtype, name):
    """Bool (True = not attended, nn.MultiheadAttention's convention) or additive float
    mask as an additive float mask of ``dtype`` (``F._canonical_mask``'s rule)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)
    if not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")
    return mask.to(dtype)


def _in_projection_packed(q, k, v, w, b, lin):
    """torch's ``_in_projection_packed``: one product for self-attention (``q is k is
    v``), two when ``k is v``, else three, so the gradients sum in torch's order."""
    E = q.shape[-1]
    if k is v:
        if q is k:
            p = lin(q, w, b).unflatten(-1, (3, E))
            return p[..., 0, :], p[..., 1, :], p[..., 2, :]
        w_q, w_kv = w.split([E, 2 * E])
        b_q, b_kv = (None, None) if b is None else b.split([E, 2 * E])
        kv = lin(k, w_kv, b_kv).unflatten(-1, (2, E))
        return lin(q, w_q, b_q), kv[..., 0, :], kv[..., 1, :]
    b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
    w_q, w_k, w_v = w.chunk(3)
    return lin(q, w_q, b_q), lin(k, w_k, b_k), lin(v, w_v, b_v)


def _static_kv(t, name, NH, D):
    if t.size(0) != NH:
        raise AssertionError(f"expecting {name}.size(0) of {NH}, but got {t.size(0)}")
    if t.size(2) != D:
        raise AssertionError(f"expecting {name}.size(2) of {D}, but got {t.size(2)}")
    return t


def multi_head_attention_forward(query, key, value, embed_dim_to_check: int, num_heads: int,
                                 in_proj_weight, in_proj_bias, bias_k, bias_v, add_zero_attn: bool,
                                 dropout_p: float, out_proj_weight, out_proj_bias, training: bool = True,
                                 key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                                 use_separate_proj_weight: bool = False, q_proj_weight=None,
                                 k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None,
                                 average_attn_weights: bool = True, is_causal: bool = False, *,
                                 config=None, derivative: str | None = None):
    """PA ``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` calls; the
    mode routes it here, and ``pamtorch.nn.MultiheadAttention`` calls it too, so the two
    agree bit for bit): sequence-first ``[L, N, E]`` (or unbatched ``[L, E]``) inputs,
    torch's arguments and packing of the input projections, then per head
    ``softmax_safe((q ⊙̂ s) @PAM kᵀ + mask) @PAM v`` with one PAM by ``s = 1/√D`` on q
    (:func:`attention_forward`), and the output projection.

    As torch: masks are bool (True = not attended) or additive float; ``is_causal``
    needs ``attn_mask`` and, with no ``key_padding_mask`` and ``need_weights=False``,
    replaces it by the causal mask; the returned weights are after dropout, averaged over
    heads (``Σ ÷̂ H``) unless ``average_attn_weights=False``. Unlike torch's
    ``need_weights`` path, a fully masked row gets zero weights rather than NaN.
    Kinds from ``config``: matmul (projections, products, the scale), softmax,
    elementwise (dropout); else everything PA with ``derivative``."""
    mop, sop, _ = _kinds(config, derivative)
    if query.dim() not in (2, 3):
        raise AssertionError(f"query should be unbatched 2D or batched 3D tensor but received "
                             f"{query.dim()}-D query tensor")
    batched = query.dim() == 3
    if not batched:   # as torch: the unsqueezed tensors are new, so no packed projection
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    L, N, E = query.shape
    H = num_heads
    if E != embed_dim_to_check:
        raise AssertionError(f"was expecting embedding dimension of {embed_dim_to_check}, but got {E}")
    D = E // H
    if D * H != E:
        raise AssertionError(f"embed_dim {E} not divisible by num_heads {H}")
    kpm = _mha_mask(key_padding_mask, query.dtype, "key_padding_mask")
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the "
                           "Transformer module method `generate_square_subsequent_mask` to create this mask.")
    causal = is_causal and kpm is None and not need_weights   # torch then hands SDPA is_causal
    amask = None if causal else _mha_mask(attn_mask, query.dtype, "attn_mask")

    def lin(x, w, b):
        if not mop.pa:
            return _F.linear(x, w, b)
        return linear(x, w, b, derivative=mop.derivative, offset=mop.offset, mantissa_bits=mop.mantissa_bits)

    if not use_separate_proj_weight:
        if in_proj_weight is None:
            raise AssertionError("use_separate_proj_weight is False but in_proj_weight is None")
        if key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        q, k, v = _in_projection_packed(query, key, value, in_proj_weight, in_proj_bias, lin)
    else:
        for name, w in (("q", q_proj_weight), ("k", k_proj_weight), ("v", v_proj_weight)):
            if w is None:
                raise AssertionError(f"use_separate_proj_weight is True but {name}_proj_weight is None")
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match "
                                 f"value's {value.shape[:2]}")
        b_q, b_k, b_v = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)
        q, k, v = lin(query, q_proj_weight, b_q), lin(key, k_proj_weight, b_k), lin(value, v_proj_weight, b_v)

    S = key.shape[0]
    if amask is not None:
        if amask.dim() == 2:
            if tuple(amask.shape) != (L, S):
                raise RuntimeError(f"The shape of the 2D attn_mask is {tuple(amask.shape)}, but should be {(L, S)}.")
            amask = amask.unsqueeze(0)
        elif amask.dim() == 3:
            if tuple(amask.shape) != (N * H, L, S):
                raise RuntimeError(f"The shape of the 3D attn_mask is {tuple(amask.shape)}, "
                                   f"but should be {(N * H, L, S)}.")
        else:
            raise RuntimeError(f"attn_mask's dimension {amask.dim()} is not supported")
    if bias_k is not None and bias_v is not None:
        if static_k is not None or static_v is not None:
            raise AssertionError("bias cannot be added to static key or value.")
        k = torch.cat([k, bias_k.repeat(1, N, 1)])
        v = torch.cat([v, bias_v.repeat(1, N, 1)])
        amask = None if amask is None else _F.pad(amask, (0, 1))
        kpm = None if kpm is None else _F.pad(kpm, (0, 1))
    elif bias_k is not None or bias_v is not None:
        raise AssertionError("bias_k and bias_v must both be set or both be None")

    q = q.reshape(L, N * H, D).transpose(0, 1)
    k = k.reshape(k.shape[0], N * H, D).transpose(0, 1) if static_k is None else \
        _static_kv(static_k, "static_k", N * H, D)
    v = v.reshape(v.shape[0], N * H, D).transpose(0, 1) if static_v is None else \
        _static_kv(static_v, "static_v", N * H, D)
    if add_zero_attn:
        z = torch.zeros(N * H, 1, D, dtype=k.dtype, device=k.device)
        k, v = torch.cat([k, z], 1), torch.cat([v, z.to(v.dtype)], 1)
        amask = None if amask is None else _F.pad(amask, (0, 1))
        kpm = None if kpm is None else _F.pad(kpm, (0, 1))
    S = k.shape[1]
    if kpm is not None:
        if tuple(kpm.shape) != (N, S):
            raise AssertionError(f"expecting key_padding_mask shape of {(N, S)}, but got {tuple(kpm.shape)}")
        kpm = kpm.view(N, 1, 1, S).expand(-1, H, -1, -1).reshape(N * H, 1, S)
        amask = kpm if amask is None else amask + kpm
    if causal:
        amask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()

    p = dropout_p if training else 0.0
    out, w = attention_forward(q, k, v, amask, p, None, config=config, derivative=derivative)
    out = lin(out.transpose(0, 1).reshape(L * N, E), out_proj_weight, out_proj_bias).view(L, N, -1)
    if not batched:
        out = out.squeeze(1)
    if not need_weights:
        return out, None
    w = w.view(N, H, L, S)
    if average_attn_weights:
        w = w.sum(1)
        w = _ag.div(w, _c(H, w), derivative=sop.derivative) if sop.pa else w / H
    return out, (w if batched else w.squeeze(0))
