"""Softmax and attention: (safe) softmax and its backward, the fused CPU attention."""
from __future__ import annotations

import math

import torch

from .. import arith
from ..nn import functional as PF
from .table import ACTIVE, UnsupportedOpError, implements, aten, arg, pam
from .matmul import bmm


@implements([aten._softmax], "softmax")
def _pa_softmax(func, args, kwargs, cfg):
    x, dim, half_to_float = args[:3]
    return PF.softmax_forward(x.float() if half_to_float else x, dim)


@implements([aten._safe_softmax], "softmax")
def _pa_safe_softmax(func, args, kwargs, cfg):
    x, dim = args[:2]
    dtype = arg(args, kwargs, 2, "dtype")
    return PF.softmax_forward(x if dtype is None else x.to(dtype), dim, safe=True)


@implements([aten._softmax_backward_data], "softmax")
def _pa_softmax_backward(func, args, kwargs, cfg):
    dy, y, dim, input_dtype = args[:4]
    return PF.softmax_backward(y, dy, dim).to(input_dtype)


def _sdpa_weights(q, k, is_causal, mask, scale, cfg):
    """(q ⊙̂ scale, scores, safe-softmax weights) of attention, as pamtorch.nn computes them."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qs = pam(q, scale, None)
    scores = bmm(qs.flatten(0, -3), k.transpose(-2, -1).flatten(0, -3), cfg)
    scores = scores.reshape(*q.shape[:-1], k.shape[-2])
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if ACTIVE[-1].softmax.pa:
        return qs, scale, scores, PF.softmax_forward(scores, -1, safe=True)
    return qs, scale, scores, aten._safe_softmax(scores, -1)


def _sdpa_args(args, kwargs):
    dropout_p = arg(args, kwargs, 3, "dropout_p", 0.0)
    if dropout_p:
        raise UnsupportedOpError("pamtorch.mode: fused CPU attention with dropout has no PA version; "
                                 "call torch.nn.functional.scaled_dot_product_attention from Python")
    return arg(args, kwargs, 4, "is_causal", False), kwargs.get("attn_mask"), kwargs.get("scale")


def bmm_nd(a, b, cfg):
    """Batched PAM product over all leading dims."""
    out = bmm(a.flatten(0, -3), b.flatten(0, -3), cfg)
    return out.reshape(*a.shape[:-2], a.shape[-2], b.shape[-1])


@implements([aten._scaled_dot_product_flash_attention_for_cpu], "matmul")
def _pa_sdpa_cpu(func, args, kwargs, cfg):
    """The fused CPU attention that C++ callers (nn.MultiheadAttention) reach: PAM products,
    q scaled first, safe PA softmax; returns (out, logsumexp) like the aten op."""
    q, k, v = args[:3]
    is_causal, mask, scale = _sdpa_args(args, kwargs)
    _, _, scores, w = _sdpa_weights(q, k, is_causal, mask, scale, cfg)
    out = bmm_nd(w, v, cfg)
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
    dv = bmm_nd(w.transpose(-2, -1), dout, cfg)
    dw = bmm_nd(dout, v.transpose(-2, -1), cfg)
    ds = PF.softmax_backward(w, dw, -1) if ACTIVE[-1].softmax.pa else \
        aten._softmax_backward_data(dw, w, -1, w.dtype)
    dq = pam(bmm_nd(ds, k, cfg), s, None)
    dk = bmm_nd(ds.transpose(-2, -1), qs, cfg)
    return dq, dk, dv
