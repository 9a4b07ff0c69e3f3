"""pamtorch: multiplication-free training with piecewise affine arithmetic.

The arithmetic (``mul``, ``div``, ``exp2``, ``log2``, ``exp``, ``log``, ``sqrt``, ``rsqrt``,
``reciprocal``, ``pow``) follows docs/numerics.md bit for bit; each op is differentiable
with the derivative kind chosen per call or with ``pamtorch.derivative(kind)``.
"""
from .arith import SUPPORTED_DTYPES
from .autograd import (
    derivative,
    div,
    exp,
    exp2,
    log,
    log2,
    mul,
    pow,
    reciprocal,
    rsqrt,
    sqrt,
)

from .matmul import bmm, conv2d, linear, matmul
from .config import Config, OpConfig
from .mode import mode
from .audit import audit, error_report
from . import nn, optim
from .convert import convert
from .compile import compile

__version__ = "0.1.0"

__all__ = [
    "SUPPORTED_DTYPES",
    "derivative",
    "mul", "div", "exp2", "log2", "exp", "log", "sqrt", "rsqrt", "reciprocal", "pow",
    "matmul", "bmm", "linear", "conv2d",
    "Config", "OpConfig", "mode", "convert", "compile", "audit", "error_report", "nn", "optim",
]
