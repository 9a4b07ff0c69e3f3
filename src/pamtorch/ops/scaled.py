"""Ops that are additions or copies except for a scalar option that multiplies: ``rsub``
and ``index_add`` with ``alpha`` != 1, and the embedding backward with
``scale_grad_by_freq=True``. The mode sends only those calls here; the plain ones are free
(``pamtorch.mode.FREE_WHEN`` decides by argument)."""
from __future__ import annotations

import torch

from .table import implements, aten, pad, scale


@implements([aten.rsub], "elementwise")
def _pa_rsub(func, args, kwargs, cfg):
    """rsub(a, b, alpha) = b - a ·̂ alpha."""
    a, b = args[0], args[1]
    return b - scale(a, kwargs.get("alpha", 1))


@implements([aten.index_add, aten.index_add_], "elementwise")
def _pa_index_add(func, args, kwargs, cfg):
    """index_add(x, dim, index, src, alpha) = index_add(x, dim, index, src ·̂ alpha)."""
    x, dim, index, src = args[:4]
    op = aten.index_add_ if func.overloadpacket is aten.index_add_ else aten.index_add
    return op(x, dim, index, scale(src, kwargs.get("alpha", 1)))


@implements([aten.embedding_dense_backward], "elementwise")
def _pa_embedding_backward_by_freq(func, args, kwargs, cfg):
    """With scale_grad_by_freq each gradient row is divided by how often its index occurs
    in the batch: g ÷̂ count[index], then the plain (summing) embedding backward."""
    grad, indices, num_weights, padding_idx = args[:4]
    counts = torch.bincount(indices.flatten(), minlength=num_weights)[indices]
    return aten.embedding_dense_backward(pad(grad, counts.to(grad.dtype).unsqueeze(-1)), indices,
                                         num_weights, padding_idx, False)
