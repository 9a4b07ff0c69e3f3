"""Autograd-aware PAM matrix products: ``matmul``, ``bmm``, ``linear``, ``conv2d``.

Every product ``sum_k a_k b_k`` is computed as ``sum_k PAM(a_k, b_k)`` (Mitchell's
piecewise affine multiplication) with float32 accumulation by ordinary additions, by
the kernels of :mod:`pamtorch.kernels` (Triton on CUDA, C++ or pure torch on CPU).
Shapes, broadcasting and argument conventions are those of the torch functions of the
same names.

Inputs may be float32, bfloat16 or float16 (both operands of one dtype, as torch
requires); they are upcast to float32 for the kernels (float16 subnormals, which PA
arithmetic treats as zero, are flushed first, since they are normal in float32) and the
result is cast back to the input dtype.

``offset`` α (0.5 <= α <= 2, rounded to the input dtype) applies per product term:
``sum_k PAM(a_k, b_k, offset=α)``, the pattern ``P_a + P_b - B + (P_α - B)`` of each term
(one integer constant in the kernels), bit-equal to summing ``pamtorch.mul(a_k, b_k,
offset=α)`` in k order. ``mantissa_bits`` k rounds the operands (and α) to k mantissa bits,
ties to even, before the product; the terms of k-bit operands are then k-bit themselves,
and they are accumulated in float32 (the sum is not rounded). The backward rounds the
upstream gradient the same way.

``derivative`` selects the backward products (``None``: the scoped default of
``pamtorch.derivative(...)``, "approx" unless set):

* ``"approx"``: the derivative of the exact product, evaluated with PAM:
  ``dA = dC @PAM B^T``, ``dB = A^T @PAM dC`` (the forward kernel on transposed views,
  with the offset per term: the derivative of α·a·b is α·b);
* ``"exact"``: the true piecewise-constant derivative of the PAM product,
  ``dA[i,k] = sum_j dC[i,j] sign(B[k,j]) 2^(E_B[k,j] + c)`` applied by exponent
  arithmetic (``pam_mm_exact_grad_a/b``); with an offset each term's slope is
  ``sign(B) 2^(E_B + E_α + floor((M_A + M_B + M_α) / 2^m))``, the slope of its pattern
  ``P_A + P_B - B + (P_α - B)`` (α's exponent, and its mantissa in the carry);
* ``"ste"``: straight-through, ordinary float matmuls (it multiplies; ablations only),
  times α with an offset.

"approx" and "exact" run no float multiplication in the backward pass either: only
the PAM kernels, additions/reductions (broadcast, unfold and expand backwards), reshapes
and casts.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import arith, kernels

__all__ = ["matmul", "bmm", "linear", "conv2d", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_F16_MIN_NORMAL = 2.0 ** -14


def _resolve(kind):
    from .autograd import resolve_derivative  # imported late: autograd imports a lot
    return resolve_derivative(kind)


# ---------------------------------------------------------------------------
# dtype handling

def _check_dtype(op, name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"pamtorch.{op}: argument '{name}' must be a torch.Tensor, "
                        f"got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"pamtorch.{op}: argument '{name}' has dtype {t.dtype}; "
                        f"supported dtypes are {names}")


def _check_pair(op, a, b, names=("a", "b")):
    _check_dtype(op, names[0], a)
    _check_dtype(op, names[1], b)
    if a.dtype != b.dtype:
        raise RuntimeError(f"pamtorch.{op}: expected both arguments to have the same dtype, "
                           f"but got {a.dtype} for '{names[0]}' and {b.dtype} for '{names[1]}'")
    if a.device != b.device:
        raise RuntimeError(f"pamtorch.{op}: expected both arguments on the same device, but "
                           f"got {a.device} for '{names[0]}' and {b.device} for '{names[1]}'")


def _f32(x: torch.Tensor) -> torch.Tensor:
    """float32 view of the values the PA arithmetic sees (no copy for float32)."""
    if x.dtype == torch.float32:
        return x
    y = x.float()
    if x.dtype == torch.float16:
        # float16 subnormals are zero to PA arithmetic but normal in float32
        y = torch.where(y.abs() < _F16_MIN_NORMAL, torch.copysign(torch.zeros_like(y), y), y)
    return y


# ---------------------------------------------------------------------------
# 2-D and batched autograd functions

def _mm32(a, b, offset=None):
    """float32 PAM product of float32 2-D tensors, empty cases handled here."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0 or K == 0:
        return torch.zeros((M, N), dtype=torch.float32, device=a.device)
    return kernels.pam_mm(a, b, offset)


def _ste(x, offset):
    return x if offset is None else x * offset


def _grads32(a, b, g, kind, need_a, need_b, offset=None):
    """(dA, dB) in float32 for C = a @PAM b (terms with ``offset``) and upstream g (all
    float32 2-D)."""
    M, K = a.shape
    N = b.shape[1]
    ga = gb = None
    empty = M == 0 or N == 0 or K == 0
    if need_a:
        if empty:
            ga = torch.zeros((M, K), dtype=torch.float32, device=a.device)
        elif kind == "exact":
            ga = kernels.pam_mm_exact_grad_a(a, b, g, offset)
        elif kind == "approx":
            ga = kernels.pam_mm(g, b.t(), offset)
        else:  # ste
            ga = _ste(g @ b.t(), offset)
    if need_b:
        if empty:
            gb = torch.zeros((K, N), dtype=torch.float32, device=b.device)
        elif kind == "exact":
            gb = kernels.pam_mm_exact_grad_b(a, b, g, offset)
        elif kind == "approx":
            gb = kernels.pam_mm(a.t(), g, offset)
        else:
            gb = _ste(a.t() @ g, offset)
    return ga, gb


def _round(ctx, a, b, offset, k):
    """Operands rounded to k mantissa bits (saved for the backward) and the offset the
    terms take (α rounded to the dtype and to k bits)."""
    a, b = arith.round_mantissa(a, k), arith.round_mantissa(b, k)
    ctx.off, ctx.k = arith.round_offset(offset, a.dtype, k), k
    ctx.save_for_backward(a, b)
    return a, b


class _PamMM(torch.autograd.Function):
    """a[M,K] @PAM b[K,N] for one supported dtype; any strides."""

    @staticmethod
    def forward(ctx, a, b, kind, offset, k):
        ctx.kind = kind
        a, b = _round(ctx, a, b, offset, k)
        return _mm32(_f32(a), _f32(b), ctx.off).to(a.dtype)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        g = arith.round_mantissa(g, ctx.k)
        ga, gb = _grads32(_f32(a), _f32(b), _f32(g), ctx.kind,
                          ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.off)
        return (None if ga is None else ga.to(a.dtype),
                None if gb is None else gb.to(b.dtype), None, None, None)


class _PamBMM(torch.autograd.Function):
    """a[B,M,K] @PAM b[B,K,N]; any strides (stride-0 broadcast batches included)."""

    @staticmethod
    def forward(ctx, a, b, kind, offset, k):
        ctx.kind = kind
        a, b = _round(ctx, a, b, offset, k)
        B, M, K = a.shape
        N = b.shape[2]
        if B == 0 or M == 0 or N == 0 or K == 0:
            return torch.zeros((B, M, N), dtype=a.dtype, device=a.device)
        return kernels.pam_bmm(_f32(a), _f32(b), ctx.off).to(a.dtype)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        g = arith.round_mantissa(g, ctx.k)
        a32, b32, g32 = _f32(a), _f32(b), _f32(g)
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        kind, off = ctx.kind, ctx.off
        ga = gb = None
        if a.numel() == 0 or b.numel() == 0 or g.numel() == 0:
            ga = torch.zeros_like(a) if need_a else None
            gb = torch.zeros_like(b) if need_b else None
            return ga, gb, None, None, None
        if need_a:
            if kind == "exact":
                ga = kernels.pam_bmm_exact_grad_a(a32, b32, g32, off)
            elif kind == "approx":
                ga = kernels.pam_bmm(g32, b32.transpose(1, 2), off)
            else:  # ste
                ga = _ste(torch.bmm(g32, b32.transpose(1, 2)), off)
            ga = ga.to(a.dtype)
        if need_b:
            if kind == "exact":
                gb = kernels.pam_bmm_exact_grad_b(a32, b32, g32, off)
            elif kind == "approx":
                gb = kernels.pam_bmm(a32.transpose(1, 2), g32, off)
            else:
                gb = _ste(torch.bmm(a32.transpose(1, 2), g32), off)
            gb = gb.to(b.dtype)
        return ga, gb, None, None, None


# ---------------------------------------------------------------------------
# public API

def _mm2d(a, b, kind, offset=None, k=None):
    return _PamMM.apply(a, b, kind, offset, k)


def _opts(op, offset, mantissa_bits):
    """The checked ``offset`` and ``mantissa_bits`` of a public function."""
    return (arith.check_offset(offset, f"pamtorch.{op}"),
            arith.check_mantissa_bits(mantissa_bits, f"pamtorch.{op}"))


def _shape_error(op, a_shape, b_shape):
    return RuntimeError(f"pamtorch.{op}: shapes cannot be multiplied "
                        f"({'x'.join(map(str, a_shape))} and {'x'.join(map(str, b_shape))})")


def matmul(a: torch.Tensor, b: torch.Tensor, *, offset: float | None = None,
           mantissa_bits: int | None = None, derivative: str | None = None) -> torch.Tensor:
    """PAM matrix product with ``torch.matmul`` semantics (1-D, 2-D, batched, broadcast);
    ``offset`` per product term and ``mantissa_bits`` as in the module docstring."""
    _check_pair("matmul", a, b)
    kind = _resolve(derivative)
    off, k = _opts("matmul", offset, mantissa_bits)
    if a.dim() == 0 or b.dim() == 0:
        raise RuntimeError("pamtorch.matmul: both arguments to matmul need to be at least 1D, "
                           f"but they are {a.dim()}D and {b.dim()}D")
    a_vec, b_vec = a.dim() == 1, b.dim() == 1
    a2 = a.unsqueeze(0) if a_vec else a
    b2 = b.unsqueeze(-1) if b_vec else b
    if a2.shape[-1] != b2.shape[-2]:
        raise _shape_error("matmul", a.shape, b.shape)
    M, K = a2.shape[-2:]
    N = b2.shape[-1]

    if b2.dim() == 2:
        # b unbatched: fold a's batch dimensions into M
        batch = a2.shape[:-2]
        out = _mm2d(a2.reshape(math.prod(batch) * M, K), b2, kind, off, k).reshape(*batch, M, N)
    else:
        try:
            batch = torch.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
        except RuntimeError:
            raise RuntimeError(f"pamtorch.matmul: batch dimensions of {tuple(a.shape)} and "
                               f"{tuple(b.shape)} cannot be broadcast together") from None
        nb = math.prod(batch)
        a3 = a2.expand(*batch, M, K).reshape(nb, M, K)
        b3 = b2.expand(*batch, K, N).reshape(nb, K, N)
        out = _PamBMM.apply(a3, b3, kind, off, k).reshape(*batch, M, N)
    if a_vec:
        out = out.squeeze(-2)
    if b_vec:
        out = out.squeeze(-1)
    return out


def bmm(a: torch.Tensor, b: torch.Tensor, *, offset: float | None = None,
        mantissa_bits: int | None = None, derivative: str | None = None) -> torch.Tensor:
    """PAM batched product with ``torch.bmm`` semantics: ``a[B,M,K] @ b[B,K,N]``."""
    _check_pair("bmm", a, b)
    kind = _resolve(derivative)
    off, k = _opts("bmm", offset, mantissa_bits)
    if a.dim() != 3 or b.dim() != 3:
        raise RuntimeError(f"pamtorch.bmm: batch1 and batch2 must be 3D tensors, got "
                           f"{a.dim()}D and {b.dim()}D")
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise _shape_error("bmm", a.shape, b.shape)
    return _PamBMM.apply(a, b, kind, off, k)


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           offset: float | None = None, mantissa_bits: int | None = None,
           derivative: str | None = None) -> torch.Tensor:
    """``input @PAM weight^T + bias`` with ``torch.nn.functional.linear`` semantics (and its
    argument names, so ``F.linear(input=..., weight=...)`` routes here unchanged); the bias
    add is an ordinary float32 addition."""
    x = input
    _check_pair("linear", x, weight, ("input", "weight"))
    kind = _resolve(derivative)
    off, k = _opts("linear", offset, mantissa_bits)
    if weight.dim() not in (1, 2):
        raise RuntimeError(f"pamtorch.linear: weight must be 1-D or 2-D, got shape "
                           f"{tuple(weight.shape)}")
    if x.dim() == 0:
        raise RuntimeError("pamtorch.linear: input must be at least 1-D")
    if x.shape[-1] != weight.shape[-1]:
        raise _shape_error("linear", x.shape, tuple(reversed(weight.shape)))
    w_t = weight.t() if weight.dim() == 2 else weight.unsqueeze(-1)
    lead = x.shape[:-1]
    out = _mm2d(x.reshape(math.prod(lead), x.shape[-1]), w_t, kind, off, k)
    out = out.reshape(*lead, *w_t.shape[1:]) if weight.dim() == 2 else out.reshape(lead)
    if bias is not None:
        _check_pair("linear", x, bias, ("input", "bias"))
        out = out + bias
    return out


def _pair(v, name, least):
    """``v`` as a pair of ints each >= ``least`` (stride and dilation 1, padding 0)."""
    pair = (v, v) if isinstance(v, int) else tuple(v) if isinstance(v, (tuple, list)) else ()
    if len(pair) == 1:
        pair = (pair[0], pair[0])
    if len(pair) != 2 or not all(isinstance(e, int) and not isinstance(e, bool) for e in pair):
        raise ValueError(f"pamtorch.conv2d: '{name}' must be an int or a pair of ints, got {v!r}")
    if min(pair) < least:
        raise ValueError(f"pamtorch.conv2d: '{name}' must be >= {least}, got {v!r}")
    return pair


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           stride=1, padding=0, dilation=1, groups: int = 1, *, offset: float | None = None,
           mantissa_bits: int | None = None, derivative: str | None = None) -> torch.Tensor:
    """2-D convolution (cross-correlation) with PAM products, ``F.conv2d`` semantics.

    im2col (``F.unfold``) then one PAM product per group; the bias add is an ordinary
    addition. ``padding`` may be an int, a pair, "valid" or "same" (stride 1).
    """
    _check_pair("conv2d", x, weight, ("input", "weight"))
    kind = _resolve(derivative)
    off, k = _opts("conv2d", offset, mantissa_bits)
    if weight.dim() != 4:
        raise RuntimeError(f"pamtorch.conv2d: weight must be 4-D [out, in/groups, kh, kw], "
                           f"got shape {tuple(weight.shape)}")
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise RuntimeError(f"pamtorch.conv2d: expected 3-D (unbatched) or 4-D (batched) input, "
                           f"got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    if groups < 1 or c % groups or o % groups:
        raise RuntimeError(f"pamtorch.conv2d: groups={groups} must divide the input channels "
                           f"({c}) and the output channels ({o})")
    if cg * groups != c:
        raise RuntimeError(f"pamtorch.conv2d: weight of shape {tuple(weight.shape)} expects "
                           f"{cg * groups} input channels (groups={groups}), got {c}")
    stride = _pair(stride, "stride", 1)
    dilation = _pair(dilation, "dilation", 1)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError("pamtorch.conv2d: padding='same' needs stride 1")
            tot = (dilation[0] * (kh - 1), dilation[1] * (kw - 1))
            # asymmetric 'same' padding: the extra row/column goes after, like torch
            x = F.pad(x, (tot[1] // 2, tot[1] - tot[1] // 2, tot[0] // 2, tot[0] - tot[0] // 2))
            n, c, h, w = x.shape
            padding = (0, 0)
        else:
            raise ValueError(f"pamtorch.conv2d: padding must be an int, a pair, 'valid' or "
                             f"'same', got {padding!r}")
    padding = _pair(padding, "padding", 0)
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if ho <= 0 or wo <= 0:
        raise RuntimeError(f"pamtorch.conv2d: kernel ({kh}x{kw}, dilation {dilation}) is larger "
                           f"than the padded input ({h + 2 * padding[0]}x{w + 2 * padding[1]})")
    kk = cg * kh * kw
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    # [n, c*kh*kw, L] -> [c*kh*kw, n*L]; rows of one group are a contiguous slice
    cols = cols.transpose(0, 1).reshape(c * kh * kw, n * ho * wo)
    og = o // groups
    w2 = weight.reshape(o, kk)
    outs = [_mm2d(w2[g * og:(g + 1) * og], cols[g * kk:(g + 1) * kk], kind, off, k)
            for g in range(groups)]
    out = outs[0] if groups == 1 else torch.cat(outs, 0)
    out = out.reshape(o, n, ho, wo).transpose(0, 1)
    if bias is not None:
        _check_pair("conv2d", x, bias, ("input", "bias"))
        out = out + bias.reshape(1, o, 1, 1)
    out = out.contiguous()
    return out.squeeze(0) if unbatched else out
