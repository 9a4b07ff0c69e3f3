"""Matrix products: mm, addmm, bmm, baddbmm, mv, dot (PAM products, float32 sums)."""
from __future__ import annotations

import torch

from .. import kernels
from ..matmul import _f32, _mm32
from .table import implements, aten, pam, scale


def mm(a, b, opcfg):
    out = _mm32(_f32(a), _f32(b)).to(torch.result_type(a, b))
    if opcfg.offset is not None:
        out = pam(out, opcfg.offset)
    return out


def bmm(a, b, opcfg):
    if a.numel() == 0 or b.numel() == 0:
        out = torch.zeros((a.shape[0], a.shape[1], b.shape[2]), dtype=a.dtype, device=a.device)
    else:
        out = kernels.pam_bmm(_f32(a), _f32(b)).to(torch.result_type(a, b))
    if opcfg.offset is not None:
        out = pam(out, opcfg.offset)
    return out


@implements([aten.mm], "matmul")
def _pa_mm(func, args, kwargs, cfg):
    return mm(args[0], args[1], cfg)


@implements([aten.addmm], "matmul")
def _pa_addmm(func, args, kwargs, cfg):
    bias, a, b = args[:3]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    return scale(bias, beta) + scale(mm(a, b, cfg), alpha)


@implements([aten.bmm], "matmul")
def _pa_bmm_op(func, args, kwargs, cfg):
    return bmm(args[0], args[1], cfg)


@implements([aten.baddbmm], "matmul")
def _pa_baddbmm(func, args, kwargs, cfg):
    inp, a, b = args[:3]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    prod = scale(bmm(a, b, cfg), alpha)
    return prod if beta == 0 else scale(inp, beta) + prod


@implements([aten.mv], "matmul")
def _pa_mv(func, args, kwargs, cfg):
    return mm(args[0], args[1][:, None], cfg)[:, 0]


@implements([aten.dot], "matmul")
def _pa_dot(func, args, kwargs, cfg):
    return mm(args[0][None], args[1][:, None], cfg)[0, 0]
