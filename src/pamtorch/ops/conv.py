"""Convolutions (1-D, 2-D, 3-D; transposed, grouped, depthwise, dilated, strided) and their
backward, as PAM matrix products over gathered patches.

Every convolution is, per group ``g``, one PAM product ``C_g = A_g ·̂ B_g`` (float32
accumulation, in the order of the reduction index):

* a convolution, weight ``W[OC, C/g, *K]``: ``A = W`` as ``[g, OC/g, C/g·∏K]`` and
  ``B = im2col(x)``, the zero-padded input's patch values ``[g, C/g·∏K, N·∏O]``
  (channel-major then kernel offsets: ``F.unfold``'s order); ``y`` is ``C`` reshaped;
* a transposed convolution, weight ``W[C, OC/g, *K]``, is the input gradient of a
  convolution: ``A = W^T`` as ``[g, OC/g·∏K, C/g]``, ``B = x`` as ``[g, C/g, N·∏I]``, and
  ``y = col2im(C)``, the sum of the patch values back into the (cropped) output.

The backward is the backward of that product: ``dA = dC ·̂ B^T`` and ``dB = A^T ·̂ dC``
("approx"), or the exact piecewise-constant derivative of the PAM product (the config's
``derivative="exact"``; with an offset, that of the offset terms) by exponent arithmetic;
the kind's offset and mantissa bits apply as in :mod:`.matmul`; ``dC`` is ``dy``
reshaped (convolution) or ``im2col(dy)`` (transposed), and ``dx`` is ``col2im(dB)`` or
``dB`` reshaped. im2col copies values and col2im adds them; the bias gradient is a sum.
"""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch.nn.functional as F

from .table import implements, passes_through, aten, arg
from .matmul import bmm, bmm_exact_grad_a, bmm_exact_grad_b, mm

# nn.ConvNd's reflect/replicate padding modes pad with these before the convolution (F.pad,
# aten.pad, is their composite): they copy values, and their backward sums the gradients of
# the copies (circular padding is slices and copies)
passes_through("""
    pad _pad_enum _pad_circular
    reflection_pad1d reflection_pad2d reflection_pad3d replication_pad1d replication_pad2d
    replication_pad3d reflection_pad1d_backward reflection_pad2d_backward reflection_pad3d_backward
    replication_pad1d_backward replication_pad2d_backward replication_pad3d_backward
""")


class ConvParams(NamedTuple):
    """A convolution's geometry, each list with one entry per spatial dimension."""

    stride: tuple
    padding: tuple
    dilation: tuple
    transposed: bool
    output_padding: tuple
    groups: int


def _expand(v, d: int, name: str, low: int) -> tuple:
    """``v`` as a d-tuple of ints >= ``low`` (a single value is repeated, as torch does)."""
    v = [v] if isinstance(v, int) else list(v)
    if len(v) == 1:
        v = v * d
    if len(v) != d or any(int(i) < low for i in v):
        raise RuntimeError(f"pamtorch.mode: convolution {name}={list(v)} must be one value or {d} "
                           f"values (one per spatial dimension), each >= {low}")
    return tuple(int(i) for i in v)


def conv_params(x, w, stride, padding, dilation, transposed, output_padding, groups) -> ConvParams:
    """Check a convolution call and return its geometry with every list expanded."""
    if x.dim() not in (3, 4, 5) or w.dim() != x.dim():
        raise RuntimeError(f"pamtorch.mode: convolution takes a batched input [N, C, *spatial] with 1 to 3 "
                           f"spatial dimensions and a weight of the same rank; got input "
                           f"{tuple(x.shape)} and weight {tuple(w.shape)}")
    d = x.dim() - 2
    groups = int(groups)
    p = ConvParams(_expand(stride, d, "stride", 1), _expand(padding, d, "padding", 0),
                   _expand(dilation, d, "dilation", 1), bool(transposed),
                   _expand(output_padding if transposed else 0, d, "output_padding", 0), groups)
    c = x.shape[1]
    in_ch = w.shape[0] if transposed else w.shape[1] * groups
    if groups < 1 or c != in_ch or w.shape[0] % groups:
        raise RuntimeError(f"pamtorch.mode: convolution with groups={groups}, weight {tuple(w.shape)} "
                           f"and transposed={p.transposed} expects {in_ch} input channels "
                           f"(and groups dividing weight.shape[0]), got input {tuple(x.shape)}")
    if transposed:
        for i in range(d):
            if p.output_padding[i] >= max(p.stride[i], p.dilation[i]):
                raise RuntimeError(f"pamtorch.mode: transposed convolution output_padding="
                                   f"{list(p.output_padding)} must be smaller than the stride "
                                   f"{list(p.stride)} or the dilation {list(p.dilation)}")
    if any(s <= 0 for s in conv_output_size(x.shape[2:], w.shape[2:], p)):
        raise RuntimeError(f"pamtorch.mode: convolution kernel {tuple(w.shape[2:])} with dilation "
                           f"{list(p.dilation)} is larger than the padded input {tuple(x.shape[2:])} + "
                           f"2·{list(p.padding)}")
    return p


def conv_output_size(size, ksize, p: ConvParams) -> list:
    """Spatial output size of a convolution (or of its transposed form) over ``size``."""
    if p.transposed:
        return [(size[i] - 1) * p.stride[i] - 2 * p.padding[i] + p.dilation[i] * (ksize[i] - 1)
                + p.output_padding[i] + 1 for i in range(len(size))]
    return [(size[i] + 2 * p.padding[i] - p.dilation[i] * (ksize[i] - 1) - 1) // p.stride[i] + 1
            for i in range(len(size))]


def _pads(size, reach, padding) -> list:
    """``F.pad`` list taking each dim from ``size`` to ``reach`` with ``padding`` in front
    (negative entries crop)."""
    out = []
    for s, r, p in zip(reversed(size), reversed(reach), reversed(padding)):
        out += [p, r - s - p]
    return out


def _reach(out_size, ksize, stride, dilation) -> list:
    """Extent of the padded input the windows touch: (O-1)·s + d·(K-1) + 1."""
    return [(o - 1) * s + d * (k - 1) + 1 for o, k, s, d in zip(out_size, ksize, stride, dilation)]


def patches(x, ksize, stride, padding, dilation, out_size):
    """View ``[N, C, *K, *O]`` of the input zero-padded by ``padding`` in front:
    ``patches[n, c, k, o] = x_padded[n, c, o·stride + k·dilation]``."""
    d = len(ksize)
    reach = _reach(out_size, ksize, stride, dilation)
    xp = F.pad(x, _pads(x.shape[2:], reach, padding)).contiguous()
    st = xp.stride()
    return xp.as_strided((*xp.shape[:2], *ksize, *out_size),
                         (st[0], st[1], *(st[2 + i] * dilation[i] for i in range(d)),
                          *(st[2 + i] * stride[i] for i in range(d))))


def col2im(cols, size, stride, padding, dilation):
    """Adjoint of :func:`patches`: ``cols[N, C, *K, *O]`` summed into ``[N, C, *size]``
    (each position gets its window terms in ascending kernel-offset order, starting from 0)."""
    n, c = cols.shape[:2]
    d = (cols.dim() - 2) // 2
    ksize, out_size = list(cols.shape[2:2 + d]), list(cols.shape[2 + d:])
    reach = _reach(out_size, ksize, stride, dilation)
    if d <= 2:
        # F.fold (aten.col2im), 1-D lifted to 2-D: the sums of unfold's backward, bit for bit
        # on every device
        lift = [1] * (2 - d)
        canvas = F.fold(cols.reshape(n, c * math.prod(ksize), math.prod(out_size)), lift + reach,
                        lift + ksize, dilation=lift + list(dilation), stride=lift + list(stride))
        canvas = canvas.reshape(n, c, *reach)
    else:
        canvas = cols.new_zeros((n, c, *reach))
        for k in itertools.product(*map(range, ksize)):
            win = tuple(slice(k[i] * dilation[i], k[i] * dilation[i] + (out_size[i] - 1) * stride[i] + 1,
                              stride[i]) for i in range(d))
            canvas[(slice(None), slice(None)) + win] += cols[(slice(None), slice(None)) + k]
    return F.pad(canvas, [-v for v in _pads(size, reach, padding)])


def _groups_cols(cols6, groups):
    """``[N, C, *K, *O]`` -> ``[g, C/g·∏K, N·∏O]``."""
    n, d = cols6.shape[0], (cols6.dim() - 2) // 2
    perm = (1, *range(2, 2 + d), 0, *range(2 + d, 2 + 2 * d))
    return cols6.permute(perm).reshape(groups, -1, n * math.prod(cols6.shape[2 + d:]))


def _ungroup_cols(m, n, c, ksize, out_size):
    """``[g, C/g·∏K, N·∏O]`` -> ``[N, C, *K, *O]`` (inverse of :func:`_groups_cols`)."""
    d = len(ksize)
    t = m.reshape(c, *ksize, n, *out_size)
    return t.permute(1 + d, 0, *range(1, 1 + d), *range(2 + d, 2 + 2 * d))


def _groups_x(x, groups):
    """``[N, C, *S]`` -> ``[g, C/g, N·∏S]``."""
    n, c = x.shape[:2]
    return x.reshape(n, groups, c // groups, -1).permute(1, 2, 0, 3).reshape(groups, c // groups, -1)


def _ungroup_x(m, n, size):
    """``[g, C/g, N·∏S]`` -> ``[N, C, *S]``."""
    g, cg = m.shape[:2]
    return m.reshape(g * cg, n, *size).transpose(0, 1)


def _operands(x, w, p: ConvParams):
    """(A, B) of the convolution's PAM product C = A ·̂ B (see the module docstring)."""
    g, ks = p.groups, w.shape[2:]
    if p.transposed:
        return w.reshape(g, w.shape[0] // g, -1).transpose(1, 2), _groups_x(x, g)
    out_size = conv_output_size(x.shape[2:], ks, p)
    cols = patches(x, ks, p.stride, p.padding, p.dilation, out_size)
    return w.reshape(g, w.shape[0] // g, -1), _groups_cols(cols, g)


def _per_sample(p: ConvParams, opcfg) -> bool:
    """Whether the per-sample form below runs: an ungrouped, untransposed convolution with the
    approx derivative. It computes the same terms in the same order as the grouped product
    (so the same bits) without transposing the patch matrix, which the kernels would
    otherwise gather column by column: C_n = W ·̂ cols_n per sample, dcols_n = W^T ·̂ dC_n, and
    dW^T = cols ·̂ dC^T (the same reduction over (n, o) as dC ·̂ cols^T, with the operands
    swapped: a PAM's pattern sum is symmetric)."""
    return not p.transposed and p.groups == 1 and opcfg.derivative != "exact"


def _sample_cols(x, ks, p: ConvParams, out_size):
    """The patch matrix per sample, ``[N, C·∏K, ∏O]`` (F.unfold's layout, one copy)."""
    cols = patches(x, ks, p.stride, p.padding, p.dilation, out_size)
    return cols.reshape(x.shape[0], -1, math.prod(out_size))


def conv_forward(x, w, bias, p: ConvParams, opcfg):
    """y = conv(x, w) + bias with PAM products (module docstring)."""
    n, ks = x.shape[0], list(w.shape[2:])
    out_size = conv_output_size(x.shape[2:], ks, p)
    if _per_sample(p, opcfg) and n and x.numel() and w.numel():
        b = _sample_cols(x, ks, p, out_size)
        a = w.reshape(1, w.shape[0], -1).expand(n, -1, -1)
        y = bmm(a, b, opcfg).reshape(n, w.shape[0], *out_size)
        if bias is not None:
            y = y + bias.reshape(1, -1, *[1] * len(out_size))
        return y.contiguous()
    a, b = _operands(x, w, p)
    c = bmm(a, b, opcfg)
    if p.transposed:
        cols = _ungroup_cols(c, n, w.shape[1] * p.groups, ks, list(x.shape[2:]))
        y = col2im(cols, out_size, p.stride, p.padding, p.dilation)
    else:
        y = _ungroup_x(c, n, out_size)
    if bias is not None:
        y = y + bias.reshape(1, -1, *[1] * len(out_size))
    return y.contiguous()


def _grad_a(a, b, dc, opcfg):
    """dA of C = A ·̂ B for upstream dC (the kind's offset per term in both kinds)."""
    if opcfg.derivative == "exact" and a.numel() and b.numel():
        return bmm_exact_grad_a(a, b, dc, opcfg)
    return bmm(dc, b.transpose(1, 2), opcfg)


def _grad_b(a, b, dc, opcfg):
    """dB of C = A ·̂ B for upstream dC."""
    if opcfg.derivative == "exact" and a.numel() and b.numel():
        return bmm_exact_grad_b(a, b, dc, opcfg)
    return bmm(a.transpose(1, 2), dc, opcfg)


def conv_backward(gy, x, w, p: ConvParams, mask, opcfg):
    """(dx, dw, dbias) of :func:`conv_forward`, each only where ``mask`` asks for it."""
    n, ks, g = x.shape[0], list(w.shape[2:]), p.groups
    gx = gw = gb = None
    if (mask[0] or mask[1]) and _per_sample(p, opcfg) and n and x.numel() and w.numel() and gy.numel():
        out_size = list(gy.shape[2:])
        oc, so = w.shape[0], math.prod(out_size)
        if mask[1]:
            cols = _groups_cols(patches(x, ks, p.stride, p.padding, p.dilation, out_size), 1)[0]  # [C·∏K, N·∏O]
            dct = gy.reshape(n, oc, so).transpose(1, 2).reshape(n * so, oc)                      # dC^T [N·∏O, OC]
            gw = mm(cols, dct, opcfg).t().reshape(w.shape).contiguous()
        if mask[0]:
            wt = w.reshape(1, oc, -1).transpose(1, 2).expand(n, -1, -1)                            # W^T per sample
            dcols = bmm(wt, gy.reshape(n, oc, so), opcfg)                                        # [N, C·∏K, ∏O]
            cols6 = dcols.reshape(n, x.shape[1], *ks, *out_size)
            gx = col2im(cols6, x.shape[2:], p.stride, p.padding, p.dilation).contiguous()
        if mask[2]:
            gb = gy.sum((0, *range(2, gy.dim())))
        return gx, gw, gb
    if mask[0] or mask[1]:
        a, b = _operands(x, w, p)
        if p.transposed:
            dc = _groups_cols(patches(gy, ks, p.stride, p.padding, p.dilation, list(x.shape[2:])), g)
        else:
            dc = _groups_x(gy, g)
        if mask[1]:
            da = _grad_a(a, b, dc, opcfg)
            gw = (da.transpose(1, 2) if p.transposed else da).reshape(w.shape).contiguous()
        if mask[0]:
            db = _grad_b(a, b, dc, opcfg)
            if p.transposed:
                gx = _ungroup_x(db, n, x.shape[2:])
            else:
                cols = _ungroup_cols(db, n, x.shape[1], ks, list(gy.shape[2:]))
                gx = col2im(cols, x.shape[2:], p.stride, p.padding, p.dilation)
            gx = gx.contiguous()
    if mask[2]:
        gb = gy.sum((0, *range(2, gy.dim())))
    return gx, gw, gb


# ---------------------------------------------------------------------------
# the aten ops: aten.convolution (what nn.Conv*/ConvTranspose* and F.conv* reach) and the
# backend-specific convolutions, which the mode sees only when called directly

def _fwd(x, w, bias, stride, padding, dilation, transposed, output_padding, groups):
    return x, w, bias, conv_params(x, w, stride, padding, dilation, transposed, output_padding, groups)


def _std_args(a, k):
    return _fwd(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8])


def _fixed(a, k, groups=1, dilated=False, transposed=False):
    """(self, weight, kernel_size, bias, stride, padding[, output_padding][, dilation])."""
    x, w = a[0], a[1]
    d = x.dim() - 2
    stride, padding = arg(a, k, 4, "stride", 1), arg(a, k, 5, "padding", 0)
    op = arg(a, k, 6, "output_padding", 0) if transposed else 0
    dil = arg(a, k, 7 if transposed else 6, "dilation", 1) if dilated else 1
    g = x.shape[1] if groups == "depthwise" else groups
    if list(w.shape[2:]) != list(_expand(arg(a, k, 2, "kernel_size"), d, "kernel_size", 1)):
        raise RuntimeError(f"pamtorch.mode: kernel_size={arg(a, k, 2, 'kernel_size')} does not match "
                           f"the weight's shape {tuple(w.shape)}")
    return _fwd(x, w, arg(a, k, 3, "bias"), stride, padding, dil, transposed, op, g)


_FORWARD_ARGS = {
    aten.convolution: _std_args,
    aten._convolution: _std_args,
    aten.convolution_overrideable: _std_args,
    aten._slow_conv2d_forward: lambda a, k: _fixed(a, k),
    aten.slow_conv3d_forward: lambda a, k: _fixed(a, k),
    aten.slow_conv_dilated2d: lambda a, k: _fixed(a, k, dilated=True),
    aten.slow_conv_dilated3d: lambda a, k: _fixed(a, k, dilated=True),
    aten.slow_conv_transpose2d: lambda a, k: _fixed(a, k, dilated=True, transposed=True),
    aten.slow_conv_transpose3d: lambda a, k: _fixed(a, k, dilated=True, transposed=True),
    aten._conv_depthwise2d: lambda a, k: _fixed(a, k, "depthwise", dilated=True),
    aten.conv_depthwise3d: lambda a, k: _fixed(a, k, "depthwise", dilated=True),
    # (self, weight, bias, padding, stride, dilation, groups)
    aten.mkldnn_convolution: lambda a, k: _fwd(a[0], a[1], a[2], a[4], a[3], a[5], False, 0, a[6]),
    aten.miopen_convolution: lambda a, k: _fwd(a[0], a[1], a[2], a[4], a[3], a[5], False, 0, a[6]),
    aten.miopen_depthwise_convolution:
        lambda a, k: _fwd(a[0], a[1], a[2], a[4], a[3], a[5], False, 0, a[6]),
    # (self, weight, bias, padding, output_padding, stride, dilation, groups)
    aten.miopen_convolution_transpose:
        lambda a, k: _fwd(a[0], a[1], a[2], a[5], a[3], a[6], True, a[4], a[7]),
    # (self, weight, padding, stride, dilation, groups); (.., padding, output_padding, stride, ..)
    aten.cudnn_convolution: lambda a, k: _fwd(a[0], a[1], None, a[3], a[2], a[4], False, 0, a[5]),
    aten.cudnn_convolution_transpose:
        lambda a, k: _fwd(a[0], a[1], None, a[4], a[2], a[5], True, a[3], a[6]),
    # (input, weight, bias, padding, stride=1)
    aten._nnpack_spatial_convolution:
        lambda a, k: _fwd(a[0], a[1], a[2], arg(a, k, 4, "stride", 1), a[3], 1, False, 0, 1),
}


@implements(list(_FORWARD_ARGS), "matmul")
def _pa_convolution(func, args, kwargs, cfg):
    x, w, bias, p = _FORWARD_ARGS[func.overloadpacket](args, kwargs)
    return conv_forward(x, w, bias, p, cfg)


def _bias_mask(mask):
    return [bool(m) for m in mask] if mask is not None else [True, True, True]


@implements([aten.convolution_backward, aten.convolution_backward_overrideable], "matmul")
def _pa_convolution_backward(func, args, kwargs, cfg):
    if func.overloadpacket is aten.convolution_backward:
        (g, x, w, _bias_sizes, stride, padding, dilation, transposed, output_padding, groups, mask) = args[:11]
    else:
        (g, x, w, stride, padding, dilation, transposed, output_padding, groups, mask) = args[:10]
    p = conv_params(x, w, stride, padding, dilation, transposed, output_padding, groups)
    return conv_backward(g, x, w, p, _bias_mask(mask), cfg)


@implements([aten._slow_conv2d_backward], "matmul")
def _pa_slow_conv2d_backward(func, args, kwargs, cfg):
    g, x, w, _ks, stride, padding = args[:6]
    p = conv_params(x, w, stride, padding, 1, False, 0, 1)
    return conv_backward(g, x, w, p, _bias_mask(arg(args, kwargs, 6, "output_mask")), cfg)


def _tbc(x, w):
    """conv_tbc's time-batch-channel operands as conv1d's: x [T,B,C] -> [B,C,T], w [K,C,O] -> [O,C,K]."""
    if x.dim() != 3 or w.dim() != 3:
        raise RuntimeError(f"pamtorch.mode: conv_tbc takes input [T, B, C] and weight [K, C, O], got "
                           f"{tuple(x.shape)} and {tuple(w.shape)}")
    return x.permute(1, 2, 0), w.permute(2, 1, 0)


@implements([aten.conv_tbc], "matmul")
def _pa_conv_tbc(func, args, kwargs, cfg):
    x, w = _tbc(args[0], args[1])
    p = conv_params(x, w, 1, arg(args, kwargs, 3, "pad", 0), 1, False, 0, 1)
    return conv_forward(x, w, args[2], p, cfg).permute(2, 0, 1).contiguous()


@implements([aten.conv_tbc_backward], "matmul")
def _pa_conv_tbc_backward(func, args, kwargs, cfg):
    gy, (x, w) = args[0].permute(1, 2, 0), _tbc(args[1], args[2])
    p = conv_params(x, w, 1, args[4], 1, False, 0, 1)
    gx, gw, gb = conv_backward(gy, x, w, p, [True, True, True], cfg)
    return (gx.permute(2, 0, 1).contiguous(), gw.permute(2, 1, 0).contiguous(), gb)
