"""Piecewise affine neural-network modules and functionals.

``pamtorch.nn.functional``: the raw PA blocks (``*_forward`` / ``*_backward``, called by
the dispatch mode) and autograd functionals (``softmax``, ``layer_norm``, ``gelu``,
``cross_entropy``, ``scaled_dot_product_attention``, ...). ``pamtorch.nn``: drop-in
subclasses of the torch modules (``Linear``, ``Conv2d``, ``LayerNorm``, ``RMSNorm``,
``MultiheadAttention``, ``GELU``, ``Dropout``, ``Softmax``, ``CrossEntropyLoss``,
``MSELoss``) taking a ``config``. See docs/nn.md.
"""
from . import functional
from .modules import (
    GELU,
    Conv2d,
    CrossEntropyLoss,
    Dropout,
    LayerNorm,
    Linear,
    MSELoss,
    MultiheadAttention,
    PAModule,
    RMSNorm,
    Softmax,
)

__all__ = ["functional", "Linear", "Conv2d", "LayerNorm", "RMSNorm", "MultiheadAttention",
           "GELU", "Dropout", "Softmax", "CrossEntropyLoss", "MSELoss", "PAModule"]
