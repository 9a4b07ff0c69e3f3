"""Convolutions and their backward, as PAM matrix products over unfolded patches."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .table import UnsupportedOpError, implements, aten
from .matmul import mm


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
        outs.append(mm(wg, flat, cfg).reshape(og, n, -1).permute(1, 0, 2))
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
            parts.append(mm(gg, cc.t(), cfg))
        gw = torch.cat(parts, 0).reshape(w.shape)
    if mask[0]:
        parts = []
        for gi in range(groups):
            wg = w[gi * og:(gi + 1) * og].reshape(og, -1)                               # [og, cg]
            gg = g2[:, gi * og:(gi + 1) * og].permute(1, 0, 2).reshape(og, -1)          # [og, N*L]
            parts.append(mm(wg.t(), gg, cfg).reshape(cg, n, -1).permute(1, 0, 2))       # [N, cg, L]
        dcols = torch.cat(parts, 1)
        gx = F.fold(dcols, x.shape[2:], w.shape[2:], dilation=dilation, padding=padding, stride=stride)
    if mask[2]:
        gb = g.sum((0, 2, 3))
    return gx, gw, gb
