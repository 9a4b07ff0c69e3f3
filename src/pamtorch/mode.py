"""The dispatch-level mode: run an unmodified model, loss and optimizer multiplication-free.

``with pamtorch.mode(config):`` enters two modes:

* a ``TorchDispatchMode`` (below autograd) with one op table, ``OP_TABLE``, from aten
  ops to PA implementations. Forward and backward ops both pass through it, so the
  backward of a routed forward op is itself routed: this is the "approx" derivative
  (the original derivative evaluated with PA ops) for free;
* a ``TorchFunctionMode`` (above autograd) that swaps fused composites whose aten op
  has no PA implementation (``F.scaled_dot_product_attention``) for their math, and,
  for op kinds whose config asks for ``derivative="exact"`` or ``"ste"``, routes the
  matrix products to pamtorch's autograd functions, whose backward is that kind.

Every floating-point aten op is one of: routed (in ``OP_TABLE``), known to do no
multiplication (``PASS_THROUGH``: views, copies, additions, comparisons, reductions by
sum or max, ...), or an error that names it. An op is never silently run exact, except
where the config says to leave its kind exact. ``pamtorch.audit`` shares these tables.

Scalars computed in Python (learning-rate schedules, Adam's bias corrections) are exact
Python floats, as in the paper; applying them to tensors is a PAM.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from . import arith, kernels
from .matmul import _f32, _mm32, bmm as _pa_bmm, linear as _pa_linear, matmul as _pa_matmul
from .config import Config, OpConfig
from .nn import functional as PF

__all__ = ["OP_TABLE", "PASS_THROUGH", "RECORDERS", "UnsupportedOpError", "classify", "implements",
           "mode", "PAMode", "op_kind", "is_float_op"]

aten = torch.ops.aten


class UnsupportedOpError(RuntimeError):
    """A floating-point op that may multiply and that pamtorch cannot route to PA."""


@dataclass(frozen=True)
class _Entry:
    kind: str
    impl: Callable


OP_TABLE: dict = {}


def implements(ops, kind: str):
    """Register ``impl(func, args, kwargs, opcfg)`` as the PA version of aten ``ops``."""
    def deco(fn):
        for op in ops:
            OP_TABLE[op] = _Entry(kind, fn)
        return fn
    return deco


def op_kind(func) -> str | None:
    e = OP_TABLE.get(func.overloadpacket)
    return None if e is None else e.kind


def _has_float(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.is_floating_point()
    if isinstance(x, (list, tuple)):
        return any(_has_float(y) for y in x)
    if isinstance(x, dict):
        return any(_has_float(y) for y in x.values())
    return False


def is_float_op(args, kwargs) -> bool:
    """Whether any tensor among the (nested list/tuple/dict) arguments is floating point."""
    return _has_float(args) or _has_float(kwargs)


# ---------------------------------------------------------------------------
# ops that do no float multiplication

PASS_THROUGH = frozenset(getattr(aten, n) for n in """
    add add_ sub sub_ rsub neg neg_ abs abs_ sum amax amin max min maximum minimum clamp clamp_
    clamp_min clamp_min_ clamp_max clamp_max_ where masked_fill masked_fill_ fill fill_ zero_
    copy_ _to_copy clone detach alias view _unsafe_view reshape expand t transpose permute
    unsqueeze squeeze select slice slice_scatter select_scatter index index_select gather
    scatter scatter_add scatter_add_ index_add index_add_ index_put index_put_ cat stack split
    split_with_sizes unbind narrow contiguous empty empty_like empty_strided zeros zeros_like
    ones ones_like full full_like new_empty new_zeros new_ones new_full new_empty_strided
    arange eq ne lt le gt ge isnan isinf isfinite logical_not logical_and logical_or sign
    signbit relu relu_ threshold_backward le_ lt_ ge_ gt_ eq_ ne_ any all argmax argmin max_pool2d_with_indices
    max_pool2d_with_indices_backward embedding embedding_dense_backward _local_scalar_dense
    lift_fresh as_strided as_strided_ constant_pad_nd im2col col2im floor ceil round trunc
    nan_to_num nan_to_num_ sort topk cumsum flip roll repeat tril triu bernoulli_ uniform_
    normal_ random_ rand rand_like randn randn_like randint randperm masked_select nonzero
    view_as_real unfold unfold_backward _reshape_alias copy set_ resize_ squeeze_ unsqueeze_
    t_ transpose_ exponential_ bitwise_and bitwise_or bitwise_xor bitwise_not
    __and__ __or__ __xor__ __rshift__ __lshift__ copysign _foreach_add _foreach_add_
    _foreach_sub _foreach_sub_ _foreach_neg _foreach_neg_ _foreach_zero_ _foreach_copy_
    _foreach_maximum _foreach_maximum_ _foreach_abs
    detach_ split_copy unsafe_split _has_compatible_shallow_copy_type new_empty
    scalar_tensor is_nonzero equal count_nonzero
    _unsafe_index _unsafe_index_put index_copy index_copy_ masked_scatter expand_as
    diagonal diag_embed movedim _pin_memory pin_memory
    upsample_nearest2d to result_type lift_fresh_copy view_as type_as item select_backward
    slice_backward diagonal_backward as_strided_scatter _unsafe_view_copy repeat_interleave
""".split() if hasattr(aten, n))


# ---------------------------------------------------------------------------
# helpers for the implementations

def _promote(a, b):
    """Both operands as tensors of one supported float dtype (Python scalars included)."""
    ta, tb = isinstance(a, torch.Tensor), isinstance(b, torch.Tensor)
    ref = a if ta else b
    dtype = torch.result_type(a, b)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    if dtype not in arith.SUPPORTED_DTYPES:
        raise UnsupportedOpError(f"pamtorch.mode: PA arithmetic supports {arith.SUPPORTED_DTYPES}, got {dtype}")
    a = a.to(dtype) if ta else torch.tensor(float(a), dtype=dtype, device=ref.device)
    b = b.to(dtype) if tb else torch.tensor(float(b), dtype=dtype, device=ref.device)
    return a, b


def _pam(a, b, opcfg: OpConfig | None = None):
    if isinstance(b, (int, float)) and b == 1:
        return a
    if isinstance(a, (int, float)) and a == 1:
        return b
    a, b = _promote(a, b)
    out = arith.pam(a, b)
    if opcfg is not None and opcfg.offset is not None:
        out = arith.pam(out, torch.tensor(opcfg.offset, dtype=out.dtype, device=out.device))
    return out


def _pad(a, b):
    if isinstance(b, (int, float)) and b == 1:
        return a
    a, b = _promote(a, b)
    return arith.pad(a, b)


def _inplace(func, args, out):
    """Write ``out`` into the first argument for in-place overloads (name ends in ``_``)."""
    if func.overloadpacket.__name__.endswith("_"):
        return args[0].copy_(out)
    return out


def _scale(x, s):
    """alpha/beta style scalar factor: x itself when s == 1."""
    return x if s == 1 else _pam(x, s)


# ---------------------------------------------------------------------------
# matrix products

def _mm(a, b, opcfg):
    out = _mm32(_f32(a), _f32(b)).to(torch.result_type(a, b))
    if opcfg.offset is not None:
        out = _pam(out, opcfg.offset)
    return out


def _bmm(a, b, opcfg):
    if a.numel() == 0 or b.numel() == 0:
        out = torch.zeros((a.shape[0], a.shape[1], b.shape[2]), dtype=a.dtype, device=a.device)
    else:
        out = kernels.pam_bmm(_f32(a), _f32(b)).to(torch.result_type(a, b))
    if opcfg.offset is not None:
        out = _pam(out, opcfg.offset)
    return out


@implements([aten.mm], "matmul")
def _pa_mm(func, args, kwargs, cfg):
    return _mm(args[0], args[1], cfg)


@implements([aten.addmm], "matmul")
def _pa_addmm(func, args, kwargs, cfg):
    bias, a, b = args[:3]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    return _scale(bias, beta) + _scale(_mm(a, b, cfg), alpha)


@implements([aten.bmm], "matmul")
def _pa_bmm_op(func, args, kwargs, cfg):
    return _bmm(args[0], args[1], cfg)


@implements([aten.baddbmm], "matmul")
def _pa_baddbmm(func, args, kwargs, cfg):
    inp, a, b = args[:3]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    prod = _scale(_bmm(a, b, cfg), alpha)
    return prod if beta == 0 else _scale(inp, beta) + prod


@implements([aten.mv], "matmul")
def _pa_mv(func, args, kwargs, cfg):
    return _mm(args[0], args[1][:, None], cfg)[:, 0]


@implements([aten.dot], "matmul")
def _pa_dot(func, args, kwargs, cfg):
    return _mm(args[0][None], args[1][:, None], cfg)[0, 0]


def _conv_args(args):
    (x, w, bias, stride, padding, dilation, transposed, output_padding, groups) = args[:9]
    if transposed or x.dim() != 4:
        raise UnsupportedOpError("pamtorch.mode: only 2-D non-transposed convolutions have a PA "
                                 f"implementation (got {x.dim() - 2}-D, transposed={transposed})")
    return x, w, bias, tuple(stride), tuple(padding), tuple(dilation), groups


def _conv_cols(x, w, stride, padding, dilation):
    kh, kw = w.shape[2:]
    return F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [N, C*kh*kw, L]


def _conv_out_hw(x, w, stride, padding, dilation):
    return [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (w.shape[2 + i] - 1) - 1) // stride[i] + 1
            for i in range(2)]


@implements([aten.convolution], "matmul")
def _pa_convolution(func, args, kwargs, cfg):
    x, w, bias, stride, padding, dilation, groups = _conv_args(args)
    n, oc = x.shape[0], w.shape[0]
    oh, ow = _conv_out_hw(x, w, stride, padding, dilation)
    cols = _conv_cols(x, w, stride, padding, dilation)  # [N, C*k, L]
    cg, og = cols.shape[1] // groups, oc // groups
    outs = []
    for gi in range(groups):
        wg = w[gi * og:(gi + 1) * og].reshape(og, -1)                      # [og, cg]
        cg_cols = cols[:, gi * cg:(gi + 1) * cg]                            # [N, cg, L]
        flat = cg_cols.permute(1, 0, 2).reshape(cg, -1)                     # [cg, N*L]
        outs.append(_mm(wg, flat, cfg).reshape(og, n, -1).permute(1, 0, 2))
    out = torch.cat(outs, 1).reshape(n, oc, oh, ow)
    if bias is not None:
        out = out + bias[None, :, None, None]
    return out


@implements([aten.convolution_backward], "matmul")
def _pa_convolution_backward(func, args, kwargs, cfg):
    (g, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, mask) = args
    _conv_args((x, w, None, stride, padding, dilation, transposed, output_padding, groups))
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    n, oc = x.shape[0], w.shape[0]
    cols = _conv_cols(x, w, stride, padding, dilation)      # [N, C*k, L]
    cg, og = cols.shape[1] // groups, oc // groups
    g2 = g.reshape(n, oc, -1)                                # [N, OC, L]
    gx = gw = gb = None
    if mask[1]:
        parts = []
        for gi in range(groups):
            gg = g2[:, gi * og:(gi + 1) * og].permute(1, 0, 2).reshape(og, -1)       # [og, N*L]
            cc = cols[:, gi * cg:(gi + 1) * cg].permute(1, 0, 2).reshape(cg, -1)     # [cg, N*L]
            parts.append(_mm(gg, cc.t(), cfg))
        gw = torch.cat(parts, 0).reshape(w.shape)
    if mask[0]:
        parts = []
        for gi in range(groups):
            wg = w[gi * og:(gi + 1) * og].reshape(og, -1)                               # [og, cg]
            gg = g2[:, gi * og:(gi + 1) * og].permute(1, 0, 2).reshape(og, -1)          # [og, N*L]
            parts.append(_mm(wg.t(), gg, cfg).reshape(cg, n, -1).permute(1, 0, 2))       # [N, cg, L]
        dcols = torch.cat(parts, 1)
        gx = F.fold(dcols, x.shape[2:], w.shape[2:], dilation=dilation, padding=padding, stride=stride)
    if mask[2]:
        gb = g.sum((0, 2, 3))
    return gx, gw, gb


# ---------------------------------------------------------------------------
# elementwise arithmetic

@implements([aten.mul, aten.mul_], "elementwise")
def _pa_mul(func, args, kwargs, cfg):
    return _inplace(func, args, _pam(args[0], args[1], cfg))


@implements([aten.div, aten.div_], "elementwise")
def _pa_div(func, args, kwargs, cfg):
    out = _pad(args[0], args[1])
    mode = kwargs.get("rounding_mode")
    if mode == "floor":
        out = torch.floor(out)
    elif mode == "trunc":
        out = torch.trunc(out)
    return _inplace(func, args, out)


@implements([aten.addcmul, aten.addcmul_], "elementwise")
def _pa_addcmul(func, args, kwargs, cfg):
    inp, t1, t2 = args[:3]
    value = kwargs.get("value", args[3] if len(args) > 3 else 1)
    return _inplace(func, args, inp + _scale(_pam(t1, t2, cfg), value))


@implements([aten.addcdiv, aten.addcdiv_], "elementwise")
def _pa_addcdiv(func, args, kwargs, cfg):
    inp, t1, t2 = args[:3]
    value = kwargs.get("value", args[3] if len(args) > 3 else 1)
    return _inplace(func, args, inp + _scale(_pad(t1, t2), value))


@implements([aten.lerp, aten.lerp_], "elementwise")
def _pa_lerp(func, args, kwargs, cfg):
    start, end, weight = args[:3]
    return _inplace(func, args, start + _pam(end - start, weight, cfg))


def _unary(fn):
    def impl(func, args, kwargs, cfg):
        x = args[0]
        return _inplace(func, args, fn(x))
    return impl


for _ops, _fn in [
    ([aten.sqrt, aten.sqrt_], arith.pa_sqrt),
    ([aten.rsqrt, aten.rsqrt_], arith.pa_rsqrt),
    ([aten.exp, aten.exp_], arith.pa_exp),
    ([aten.log, aten.log_], arith.pa_log),
    ([aten.exp2, aten.exp2_], arith.paexp2),
    ([aten.log2, aten.log2_], arith.palog2),
    ([aten.reciprocal, aten.reciprocal_], arith.pa_reciprocal),
]:
    implements(_ops, "elementwise")(_unary(_fn))


@implements([aten.pow, aten.pow_], "elementwise")
def _pa_pow(func, args, kwargs, cfg):
    x, p = args[0], args[1]
    if isinstance(x, torch.Tensor) and isinstance(p, torch.Tensor):
        if p.dim() == 0 and not p.is_floating_point() or (p.dim() == 0 and p.device.type == "cpu"):
            p = p.item()
        else:
            raise UnsupportedOpError("pamtorch.mode: aten.pow with a tensor exponent has no PA "
                                     "implementation; use a Python number exponent")
    if not isinstance(x, torch.Tensor):  # scalar base: base^p = paexp2(p ·̂ log2 base)
        return arith.paexp2(_pam(p, math.log2(float(x))))
    return _inplace(func, args, arith.pa_pow(x, float(p)))


@implements([aten.square], "elementwise")
def _pa_square(func, args, kwargs, cfg):
    return _pam(args[0], args[0], cfg)


@implements([aten.add, aten.add_, aten.sub, aten.sub_], "elementwise")
def _pa_add_alpha(func, args, kwargs, cfg):
    """add/sub are additions; only an ``alpha`` other than 1 needs a PAM."""
    alpha = kwargs.get("alpha", 1)
    a, b = args[0], args[1]
    b = _scale(b, alpha)
    sub = func.overloadpacket in (aten.sub, aten.sub_)
    out = (a - b) if sub else (a + b)
    return _inplace(func, args, out)


@implements([aten.mean], "elementwise")
def _pa_mean(func, args, kwargs, cfg):
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        s, n = x.sum(), x.numel()
    else:
        dims = [dim] if isinstance(dim, int) else list(dim)
        s = x.sum(dims, keepdim=keepdim)
        n = math.prod(x.shape[d] for d in dims)
    return _pad(s, float(n))


def _pa_norm2(x, dim=None, keepdim=False):
    """Euclidean norm: PA squares, an ordinary sum, PA sqrt."""
    sq = arith.pam(x, x)
    s = sq.sum() if dim is None else sq.sum(dim, keepdim=keepdim)
    return arith.pa_sqrt(s)


def _check_ord(ord_):
    if float(ord_) != 2.0:
        raise UnsupportedOpError(f"pamtorch.mode: only the 2-norm is piecewise affine, got ord={ord_}")


@implements([aten.linalg_vector_norm], "elementwise")
def _pa_vector_norm(func, args, kwargs, cfg):
    x = args[0]
    ord_ = args[1] if len(args) > 1 else kwargs.get("ord", 2)
    dim = args[2] if len(args) > 2 else kwargs.get("dim")
    keepdim = args[3] if len(args) > 3 else kwargs.get("keepdim", False)
    _check_ord(ord_)
    dtype = kwargs.get("dtype")
    if dtype is not None:
        x = x.to(dtype)
    return _pa_norm2(x, dim, keepdim)


@implements([aten._foreach_norm], "optimizer")
def _pa_foreach_norm(func, args, kwargs, cfg):
    ord_ = args[1] if len(args) > 1 else kwargs.get("ord", 2)
    _check_ord(ord_)
    dtype = kwargs.get("dtype")
    return [_pa_norm2(t if dtype is None else t.to(dtype)) for t in args[0]]


# ---------------------------------------------------------------------------
# optimizer's foreach ops

def _foreach(fn):
    def impl(func, args, kwargs, cfg):
        lists = [a for a in args if isinstance(a, (list, tuple))]
        n = len(lists[0])
        outs = []
        for i in range(n):
            per = [a[i] if isinstance(a, (list, tuple)) else a for a in args]
            outs.append(fn(per, kwargs, cfg))
        if func.overloadpacket.__name__.endswith("_"):
            for t, o in zip(args[0], outs):
                t.copy_(o)
            return None
        return outs
    return impl


def _fe_scalar(per, i):
    s = per[i]
    return s.item() if isinstance(s, torch.Tensor) and s.dim() == 0 and s.device.type == "cpu" and \
        not isinstance(per[0], torch.Tensor) else s


for _names, _fn in [
    (("_foreach_mul", "_foreach_mul_"), lambda p, kw, c: _pam(p[0], p[1], c)),
    (("_foreach_div", "_foreach_div_"), lambda p, kw, c: _pad(p[0], p[1])),
    (("_foreach_addcmul", "_foreach_addcmul_"),
     lambda p, kw, c: p[0] + _scale(_pam(p[1], p[2], c), kw.get("value", p[3] if len(p) > 3 else 1))),
    (("_foreach_addcdiv", "_foreach_addcdiv_"),
     lambda p, kw, c: p[0] + _scale(_pad(p[1], p[2]), kw.get("value", p[3] if len(p) > 3 else 1))),
    (("_foreach_lerp", "_foreach_lerp_"), lambda p, kw, c: p[0] + _pam(p[1] - p[0], p[2], c)),
    (("_foreach_sqrt", "_foreach_sqrt_"), lambda p, kw, c: arith.pa_sqrt(p[0])),
    (("_foreach_reciprocal", "_foreach_reciprocal_"), lambda p, kw, c: arith.pa_reciprocal(p[0])),
    (("_foreach_pow", "_foreach_pow_"), lambda p, kw, c: arith.pa_pow(p[0], float(p[1]))),
]:
    implements([getattr(aten, n) for n in _names if hasattr(aten, n)], "optimizer")(_foreach(_fn))


# The add/sub foreach ops multiply only through ``alpha``.
@implements([aten._foreach_add, aten._foreach_add_, aten._foreach_sub, aten._foreach_sub_], "optimizer")
def _pa_foreach_add(func, args, kwargs, cfg):
    alpha = kwargs.get("alpha", 1)
    sub = func.overloadpacket.__name__.startswith("_foreach_sub")

    def one(p, kw, c):
        b = _scale(p[1], alpha)
        return p[0] - b if sub else p[0] + b
    return _foreach(one)(func, args, {}, cfg)


# ---------------------------------------------------------------------------
# nn blocks: the same raw forward/backward functions as pamtorch.nn.functional

def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


@implements([aten._softmax], "softmax")
def _pa_softmax(func, args, kwargs, cfg):
    x, dim, half_to_float = args[:3]
    return PF.softmax_forward(x.float() if half_to_float else x, dim)


@implements([aten._safe_softmax], "softmax")
def _pa_safe_softmax(func, args, kwargs, cfg):
    x, dim = args[:2]
    dtype = _arg(args, kwargs, 2, "dtype")
    return PF.softmax_forward(x if dtype is None else x.to(dtype), dim, safe=True)


@implements([aten._softmax_backward_data], "softmax")
def _pa_softmax_backward(func, args, kwargs, cfg):
    dy, y, dim, input_dtype = args[:4]
    return PF.softmax_backward(y, dy, dim).to(input_dtype)


@implements([aten._log_softmax], "loss")
def _pa_log_softmax(func, args, kwargs, cfg):
    x, dim, half_to_float = args[:3]
    return PF.log_softmax_forward(x.float() if half_to_float else x, dim)


@implements([aten._log_softmax_backward_data], "loss")
def _pa_log_softmax_backward(func, args, kwargs, cfg):
    dy, y, dim, input_dtype = args[:4]
    return PF.log_softmax_backward(y, dy, dim).to(input_dtype)


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
    return PF.mse_loss_forward(args[0], args[1], _arg(args, kwargs, 2, "reduction", 1))


@implements([aten.mse_loss_backward], "loss")
def _pa_mse_backward(func, args, kwargs, cfg):
    dy, x, target, reduction = args[:4]
    return PF.mse_loss_backward(dy, x, target, reduction)


@implements([aten.native_layer_norm], "norm")
def _pa_layer_norm(func, args, kwargs, cfg):
    x, shape, weight, bias, eps = args[:5]
    return PF.layer_norm_forward(x, tuple(shape), weight, bias, eps)


@implements([aten.native_layer_norm_backward], "norm")
def _pa_layer_norm_backward(func, args, kwargs, cfg):
    dy, x, shape, mean, rstd, weight, bias, mask = args[:8]
    return PF.layer_norm_backward(dy, x, tuple(shape), mean, rstd, weight, bias, mask)


@implements([aten.gelu], "nonlinear")
def _pa_gelu(func, args, kwargs, cfg):
    return PF.gelu_forward(args[0])


@implements([aten.gelu_backward], "nonlinear")
def _pa_gelu_backward(func, args, kwargs, cfg):
    return PF.gelu_backward(args[0], args[1])


@implements([aten.native_dropout], "elementwise")
def _pa_dropout(func, args, kwargs, cfg):
    x, p, train = args[0], args[1], _arg(args, kwargs, 2, "train", True)
    return PF.dropout_forward(x, p, True if train is None else train)


@implements([aten.native_dropout_backward], "elementwise")
def _pa_dropout_backward(func, args, kwargs, cfg):
    return PF.dropout_backward(args[0], args[1], args[2])


def _sdpa_weights(q, k, is_causal, mask, scale, cfg):
    """(q ⊙̂ scale, scores, safe-softmax weights) of attention, as pamtorch.nn computes them."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qs = _pam(q, scale, None)
    scores = _bmm(qs.flatten(0, -3), k.transpose(-2, -1).flatten(0, -3), cfg)
    scores = scores.reshape(*q.shape[:-1], k.shape[-2])
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if _ACTIVE[-1].softmax.pa:
        return qs, scale, scores, PF.softmax_forward(scores, -1, safe=True)
    return qs, scale, scores, aten._safe_softmax(scores, -1)


def _sdpa_args(args, kwargs):
    dropout_p = _arg(args, kwargs, 3, "dropout_p", 0.0)
    if dropout_p:
        raise UnsupportedOpError("pamtorch.mode: fused CPU attention with dropout has no PA version; "
                                 "call torch.nn.functional.scaled_dot_product_attention from Python")
    return _arg(args, kwargs, 4, "is_causal", False), kwargs.get("attn_mask"), kwargs.get("scale")


def _bmm_nd(a, b, cfg):
    """Batched PAM product over all leading dims."""
    out = _bmm(a.flatten(0, -3), b.flatten(0, -3), cfg)
    return out.reshape(*a.shape[:-2], a.shape[-2], b.shape[-1])


@implements([aten._scaled_dot_product_flash_attention_for_cpu], "matmul")
def _pa_sdpa_cpu(func, args, kwargs, cfg):
    """The fused CPU attention that C++ callers (nn.MultiheadAttention) reach: PAM products,
    q scaled first, safe PA softmax; returns (out, logsumexp) like the aten op."""
    q, k, v = args[:3]
    is_causal, mask, scale = _sdpa_args(args, kwargs)
    _, _, scores, w = _sdpa_weights(q, k, is_causal, mask, scale, cfg)
    out = _bmm_nd(w, v, cfg)
    m = scores.amax(-1, keepdim=True)
    lse = (m + arith.pa_log(arith.pa_exp(scores - m).sum(-1, keepdim=True))).squeeze(-1)
    return out.transpose(1, 2).contiguous().transpose(1, 2), lse.float()


@implements([aten._scaled_dot_product_flash_attention_for_cpu_backward], "matmul")
def _pa_sdpa_cpu_backward(func, args, kwargs, cfg):
    """Approx derivative of the attention above: the weights are recomputed (PA), then
    dV = wᵀ @ dO, dW = dO @ vᵀ, dS = softmax'(dW), dQ = (dS @ k) ⊙̂ s, dK = dSᵀ @ (q ⊙̂ s)."""
    dout, q, k, v = args[:4]
    rest = (args[0], args[1], args[2], args[6] if len(args) > 6 else kwargs.get("dropout_p", 0.0),
            args[7] if len(args) > 7 else kwargs.get("is_causal", False))
    is_causal, mask, scale = _sdpa_args(rest, kwargs)
    qs, s, _, w = _sdpa_weights(q, k, is_causal, mask, scale, cfg)
    dv = _bmm_nd(w.transpose(-2, -1), dout, cfg)
    dw = _bmm_nd(dout, v.transpose(-2, -1), cfg)
    ds = PF.softmax_backward(w, dw, -1) if _ACTIVE[-1].softmax.pa else \
        aten._softmax_backward_data(dw, w, -1, w.dtype)
    dq = _pam(_bmm_nd(ds, k, cfg), s, None)
    dk = _bmm_nd(ds.transpose(-2, -1), qs, cfg)
    return dq, dk, dv


# ---------------------------------------------------------------------------
# the mode

_ALPHA_OPS = frozenset([aten.add, aten.add_, aten.sub, aten.sub_, aten._foreach_add,
                        aten._foreach_add_, aten._foreach_sub, aten._foreach_sub_])

# collectives move or sum tensors (DDP's buffer broadcast, the SUM all-reduce); an AVG
# reduction divides inside the backend, so pamtorch's DDP hook all-reduces SUM and then
# divides with PAD
_COMMUNICATION = frozenset(["c10d", "_c10d_functional"])

# objects with a ``routed(func, args, kwargs, out)`` method, told of every routed op
RECORDERS: list = []
# the config of the innermost active PAMode, for implementations that span op kinds
_ACTIVE: list = [Config.paper()]


def classify(func, args, kwargs) -> str:
    """How the mode treats an aten call: "free" (runs as is: no float tensor, or an op
    known to do no float multiplication), "routable" (a multiply-like op in OP_TABLE), or
    "unknown" (a float op that may multiply and has no PA implementation)."""
    if not is_float_op(args, kwargs) or func.namespace in _COMMUNICATION:
        return "free"
    packet = func.overloadpacket
    if packet in OP_TABLE:
        if packet in _ALPHA_OPS and kwargs.get("alpha", 1) == 1:
            return "free"
        return "routable"
    return "free" if packet in PASS_THROUGH else "unknown"


_IN_OPTIMIZER = [0]


def _opt_pre(opt, args, kwargs):
    _IN_OPTIMIZER[0] += 1


def _opt_post(opt, args, kwargs):
    _IN_OPTIMIZER[0] -= 1


class PAMode(TorchDispatchMode):
    """Routes floating-point aten ops through ``OP_TABLE`` according to ``config``."""

    def __init__(self, config: Config | None = None):
        super().__init__()
        self.config = config or Config.paper()

    def kind_config(self, kind: str) -> OpConfig:
        if kind in ("elementwise", "optimizer") and _IN_OPTIMIZER[0]:
            return self.config.optimizer
        if kind == "optimizer":
            return self.config.elementwise
        return self.config.kind(kind)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        cls = classify(func, args, kwargs)
        if cls == "free":
            return func(*args, **kwargs)
        if cls == "unknown":
            raise UnsupportedOpError(
                f"pamtorch.mode: {func} is a floating-point op with no piecewise affine "
                "implementation, and it is not known to be free of multiplications, so it was "
                "not run exact behind your back. Route around it, leave its module out with "
                "pamtorch.convert's module_filter_fn, or report the op name to the pamtorch "
                "maintainers so it can be added to pamtorch.mode.OP_TABLE.")
        entry = OP_TABLE[func.overloadpacket]
        opcfg = self.kind_config(entry.kind)
        if not opcfg.pa:  # the config leaves this kind exact
            return func(*args, **kwargs)
        _ACTIVE.append(self.config)
        try:
            out = entry.impl(func, args, kwargs, opcfg)
        finally:
            _ACTIVE.pop()
        for rec in RECORDERS:
            rec.routed(func, args, kwargs, out)
        return out


def _softmax_route(x, dim=None, _stacklevel=3, dtype=None, *, derivative):
    return PF.softmax(x if dtype is None else x.to(dtype), dim, derivative=derivative)


def _log_softmax_route(x, dim=None, _stacklevel=3, dtype=None, *, derivative):
    return PF.log_softmax(x if dtype is None else x.to(dtype), dim, derivative=derivative)


def _cross_entropy_route(input, target, weight=None, size_average=None, ignore_index=-100,
                         reduce=None, reduction="mean", label_smoothing=0.0, *, derivative):
    return PF.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                            derivative=derivative)


def _mse_route(input, target, size_average=None, reduce=None, reduction="mean", weight=None, *, derivative):
    return PF.mse_loss(input, target, reduction, derivative=derivative)


# functions that get a non-approx derivative kind at the autograd level, with their kind
_FUNCTION_ROUTES = {
    F.softmax: _softmax_route,
    torch.softmax: _softmax_route,
    torch.Tensor.softmax: _softmax_route,
    F.log_softmax: _log_softmax_route,
    F.layer_norm: lambda x, shape, weight=None, bias=None, eps=1e-5, *, derivative:
        PF.layer_norm(x, shape, weight, bias, eps, derivative=derivative),
    F.gelu: lambda x, approximate="none", *, derivative: PF.gelu(x, approximate, derivative=derivative),
    F.cross_entropy: _cross_entropy_route,
    F.mse_loss: _mse_route,
}
_FUNCTION_KINDS = {F.softmax: "softmax", torch.softmax: "softmax", torch.Tensor.softmax: "softmax",
                   F.log_softmax: "softmax", F.layer_norm: "norm", F.gelu: "nonlinear",
                   F.cross_entropy: "loss", F.mse_loss: "loss"}


class _PAFunctionMode(TorchFunctionMode):
    """Above autograd: decompose fused ops, and give matrix products the exact or
    straight-through derivative where the config asks for it."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            # the fused aten op has no PA backward: use the PA attention of pamtorch.nn,
            # which scales q first and uses a safe softmax, as torch's math path does
            return PF.scaled_dot_product_attention(*args, **kwargs, config=self.config)
        kind = _FUNCTION_KINDS.get(func)
        if kind is not None:
            op = self.config.kind(kind)
            if op.pa and op.derivative != "approx":
                return _FUNCTION_ROUTES[func](*args, **kwargs, derivative=op.derivative)
        mm = self.config.matmul
        if mm.pa and mm.derivative != "approx" and mm.offset is None:
            if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm,
                        torch.Tensor.mm):
                return _pa_matmul(args[0], args[1], derivative=mm.derivative)
            if func in (torch.bmm, torch.Tensor.bmm):
                return _pa_bmm(args[0], args[1], derivative=mm.derivative)
            if func is F.linear:
                return _pa_linear(*args, **kwargs, derivative=mm.derivative)
        return func(*args, **kwargs)


@contextlib.contextmanager
def mode(config: Config | None = None):
    """Run everything inside multiplication-free (see the module docstring).

    ``config`` (default ``Config.paper()``) says which op kinds are PA and with which
    derivative. Stock ``torch.optim`` optimizers run PA inside, foreach included."""
    config = config or Config.paper()
    pre = register_optimizer_step_pre_hook(_opt_pre)
    post = register_optimizer_step_post_hook(_opt_post)
    try:
        with _PAFunctionMode(config), PAMode(config):
            yield
    finally:
        pre.remove()
        post.remove()
