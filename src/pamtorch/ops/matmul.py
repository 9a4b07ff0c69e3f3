"""Matrix products: mm, addmm, bmm, baddbmm, mv, dot (PAM products, float32 sums).

The kind's ``offset`` α applies per product term, ``sum_k PAM(a_k, b_k, offset=α)`` (the
kernels add one integer constant to every term's pattern), and its ``mantissa_bits`` k
rounds the operands (and α) to k bits before the product; the sum is float32.

The argument checks raise torch's own errors (type and message), so code that catches
them, and the user reading them, sees no difference under the mode.
"""
from __future__ import annotations

import torch

from .. import arith, kernels
from ..matmul import _f32, _mm32
from .table import implements, aten, cpp_type_name, pam, scalar_type_name, scale


def _dims(t):
    return "x".join(map(str, t.shape))


def check_mm(a, b):
    """torch.mm's checks: two matrices of one dtype whose inner dimensions agree."""
    if a.dim() != 2:
        raise RuntimeError("self must be a matrix")
    if b.dim() != 2:
        raise RuntimeError("mat2 must be a matrix")
    if a.shape[1] != b.shape[0]:
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({_dims(a)} and {_dims(b)})")
    if a.dtype != b.dtype:
        raise RuntimeError(f"expected m1 and m2 to have the same dtype, but got: "
                           f"{cpp_type_name(a.dtype)} != {cpp_type_name(b.dtype)}")


def check_bmm(a, b):
    """torch.bmm's checks: two 3-D tensors of one dtype, batch and inner dimensions agree."""
    if a.dim() != 3:
        raise RuntimeError("batch1 must be a 3D tensor")
    if b.dim() != 3:
        raise RuntimeError("batch2 must be a 3D tensor")
    if (b.shape[0], b.shape[1]) != (a.shape[0], a.shape[2]):
        raise RuntimeError(f"Expected size for first two dimensions of batch2 tensor to be: "
                           f"[{a.shape[0]}, {a.shape[2]}] but got: [{b.shape[0]}, {b.shape[1]}].")
    if a.dtype != b.dtype:
        raise RuntimeError(f"expected scalar type {scalar_type_name(a.dtype)} but found "
                           f"{scalar_type_name(b.dtype)}")


def _operands(opcfg, *ts):
    """``ts`` rounded to the kind's mantissa bits, as float32, and the offset the terms take
    (α rounded to the operands' dtype and to those bits)."""
    k = opcfg.mantissa_bits
    return [_f32(arith.round_mantissa(t, k)) for t in ts] + [arith.round_offset(opcfg.offset, ts[0].dtype, k)]


def mm(a, b, opcfg):
    """a @PAM b for 2-D a, b of one dtype (checked as torch.mm checks), offset per term."""
    check_mm(a, b)
    a32, b32, off = _operands(opcfg, a, b)
    return _mm32(a32, b32, off).to(a.dtype)


def bmm(a, b, opcfg):
    """Batched a @PAM b for 3-D a, b of one dtype (checked as torch.bmm checks)."""
    check_bmm(a, b)
    if a.numel() == 0 or b.numel() == 0:
        return torch.zeros((a.shape[0], a.shape[1], b.shape[2]), dtype=a.dtype, device=a.device)
    a32, b32, off = _operands(opcfg, a, b)
    return kernels.pam_bmm(a32, b32, off).to(a.dtype)


def bmm_exact_grad_a(a, b, dc, opcfg):
    """dA of C = a @PAM b (3-D, the kind's offset and mantissa bits) for upstream ``dc``:
    the exact piecewise-constant derivative."""
    a32, b32, dc32, off = _operands(opcfg, a, b, dc)
    return kernels.pam_bmm_exact_grad_a(a32, b32, dc32, off).to(a.dtype)


def bmm_exact_grad_b(a, b, dc, opcfg):
    """dB of C = a @PAM b, as :func:`bmm_exact_grad_a`."""
    a32, b32, dc32, off = _operands(opcfg, a, b, dc)
    return kernels.pam_bmm_exact_grad_b(a32, b32, dc32, off).to(b.dtype)


def _beta_alpha(kwargs):
    return kwargs.get("beta", 1), kwargs.get("alpha", 1)


@implements([aten.mm], "matmul")
def _pa_mm(func, args, kwargs, cfg):
    return mm(args[0], args[1], cfg)


def _add_scaled(inp, prod, beta, alpha, packet, inplace_packet):
    """beta ·̂ inp + alpha ·̂ prod, inp expanded to the product's shape as torch requires;
    beta = 0 ignores inp (its NaN and inf too), as torch documents."""
    inp_e = inp.expand(prod.shape)
    prod = scale(prod, alpha)
    out = prod if beta == 0 else scale(inp_e, beta) + prod
    if packet is inplace_packet:
        return inp.copy_(out)
    return out


@implements([aten.addmm, aten.addmm_], "matmul")
def _pa_addmm(func, args, kwargs, cfg):
    bias, a, b = args[:3]
    if a.dtype != b.dtype or bias.dtype != a.dtype:
        other = b.dtype if a.dtype == bias.dtype else a.dtype
        raise RuntimeError(f"self and mat2 must have the same dtype, but got "
                           f"{scalar_type_name(bias.dtype)} and {scalar_type_name(other)}")
    return _add_scaled(bias, mm(a, b, cfg), *_beta_alpha(kwargs), func.overloadpacket, aten.addmm_)


@implements([aten.bmm], "matmul")
def _pa_bmm_op(func, args, kwargs, cfg):
    return bmm(args[0], args[1], cfg)


@implements([aten.baddbmm, aten.baddbmm_], "matmul")
def _pa_baddbmm(func, args, kwargs, cfg):
    inp, a, b = args[:3]
    if inp.dtype != a.dtype and a.dtype == b.dtype:
        raise RuntimeError(f"Input dtypes must be the same, got: input {cpp_type_name(inp.dtype)}, "
                           f"batch1: {cpp_type_name(a.dtype)}, batch2: {cpp_type_name(b.dtype)}")
    return _add_scaled(inp, bmm(a, b, cfg), *_beta_alpha(kwargs), func.overloadpacket, aten.baddbmm_)


@implements([aten.mv], "matmul")
def _pa_mv(func, args, kwargs, cfg):
    m, v = args[0], args[1]
    if m.dim() != 2 or v.dim() != 1:
        raise RuntimeError(f"vector + matrix @ vector expected, got 1, {m.dim()}, {v.dim()}")
    if m.shape[1] != v.shape[0]:
        raise RuntimeError(f"size mismatch, got input ({m.shape[0]}), mat ({_dims(m)}), vec ({v.shape[0]})")
    if m.dtype != v.dtype:
        raise RuntimeError(f"addmv input tensors must have the same dtype, but got "
                           f"{scalar_type_name(v.dtype)}, {scalar_type_name(m.dtype)}, and {scalar_type_name(v.dtype)}")
    return mm(m, v[:, None], cfg)[:, 0]


@implements([aten.dot], "matmul")
def _pa_dot(func, args, kwargs, cfg):
    a, b = args[0], args[1]
    if a.dim() != 1 or b.dim() != 1:
        raise RuntimeError(f"1D tensors expected, but got {a.dim()}D and {b.dim()}D tensors")
    if a.shape[0] != b.shape[0]:
        raise RuntimeError(f"inconsistent tensor size, expected tensor [{a.shape[0]}] and src "
                           f"[{b.shape[0]}] to have the same number of elements, but got "
                           f"{a.shape[0]} and {b.shape[0]} elements respectively")
    if a.dtype != b.dtype:
        raise RuntimeError(f"dot : expected both vectors to have same dtype, but found "
                           f"{scalar_type_name(a.dtype)} and {scalar_type_name(b.dtype)}")
    return mm(a[None], b[:, None], cfg)[0, 0]


@implements([aten._trilinear], "matmul")
def _pa_trilinear(func, args, kwargs, cfg):
    """``nn.Bilinear``'s op (and its own backward): Σ over ``sumdim`` of i1 ·̂ i2 ·̂ i3, each
    input unsqueezed at its ``expand`` dims; PAM products, float sums."""
    i1, i2, i3, expand1, expand2, expand3, sumdim = args[:7]

    def grow(t, dims):
        for d in sorted(dims):
            t = t.unsqueeze(d)
        return t

    prod = pam(pam(grow(i1, expand1), grow(i2, expand2), cfg), grow(i3, expand3), cfg)
    return prod.sum(list(sumdim)) if len(sumdim) else prod
