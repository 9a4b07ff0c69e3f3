"""PAM matrix-product kernels and the one place that picks one per device.

Every backend provides the same three functions on float32 2-D tensors of any strides,
returning new float32 tensors:

* ``pam_mm(a[M,K], b[K,N]) -> [M,N]``, ``C[i,j] = sum_k PAM(A[i,k], B[k,j])``;
* ``pam_mm_exact_grad_a(a, b, dc[M,N]) -> [M,K]``, the exact derivative w.r.t. ``a``;
* ``pam_mm_exact_grad_b(a, b, dc) -> [K,N]``, the exact derivative w.r.t. ``b``.

Each takes ``offset`` (None, or α with 0.5 <= α <= 2, rounded to float32): every product
term is then ``PAM(A[i,k], B[k,j], offset=α)``, pattern ``P_a + P_b - B + D`` with the
integer ``D = P_α - B`` (:func:`offset_d`), and the exact derivatives are those of the
offset terms.

Batched ``pam_bmm``, ``pam_bmm_exact_grad_a``, ``pam_bmm_exact_grad_b`` take 3-D
operands ``[B,M,K]``, ``[B,K,N]`` (``dc[B,M,N]``); a backend that has them (Triton) runs
one launch, the C++ one loops in C++ (small matrices one per thread),
otherwise the 2-D function runs per batch entry on views.

Backends: ``kernels.triton`` for CUDA tensors (a CUDA tensor never silently takes a CPU
path: if Triton cannot be imported a RuntimeError says so), ``kernels.cpu`` (C++) for
CPU tensors when ``kernels.cpu.available()``, else ``kernels.torch_fallback``. Backend
modules are imported on first use.
"""
from __future__ import annotations

import functools
import importlib

import torch

from .. import arith
from ..recording import product_count, recorded

__all__ = ["pam_mm", "pam_mm_exact_grad_a", "pam_mm_exact_grad_b",
           "pam_bmm", "pam_bmm_exact_grad_a", "pam_bmm_exact_grad_b",
           "backend_name", "get_backend", "offset_d"]

_cache: dict = {}


def _route_paused():
    from .cpu import route_paused   # lazy: .cpu builds its extension on first use
    return route_paused()


def _below_modes(fn):
    """Run a kernel entry below Python dispatch and with the mode's kernel route off: the
    aten calls a kernel makes inside (its
    allocations, views and copies; tens of thousands a step for the batched C++ loop) are
    its own business, not ops for an active ``pamtorch.mode`` or audit to route or record.
    The entry itself is recorded by ``@recorded``, which wraps this."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch._C._DisableTorchDispatch(), _route_paused():
            return fn(*args, **kwargs)
    return run


def _triton_backend():
    if "triton" not in _cache:
        try:
            mod = importlib.import_module("pamtorch.kernels.triton.matmul")
        except Exception as e:  # triton missing, or broken in this environment
            raise RuntimeError(
                "pamtorch: CUDA tensors need the Triton kernels, but importing them failed "
                f"({type(e).__name__}: {e}). Install triton (pip install triton) or move the "
                "tensors to the CPU.") from e
        _cache["triton"] = mod
    return _cache["triton"]


def _cpu_backend():
    if "cpu" not in _cache:
        mod = None
        try:
            cpu = importlib.import_module("pamtorch.kernels.cpu")
            available = getattr(cpu, "available", None)  # None: not built/written yet
            if available is not None and available():
                mod = cpu
        except ImportError:
            mod = None
        if mod is None:
            mod = importlib.import_module("pamtorch.kernels.torch_fallback")
        _cache["cpu"] = mod
    return _cache["cpu"]


def get_backend(device) -> object:
    """The kernel module used for tensors on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return _triton_backend()
    if device.type == "cpu":
        return _cpu_backend()
    raise RuntimeError(f"pamtorch: no PAM kernels for device type '{device.type}' "
                       "(supported: cpu, cuda)")


def backend_name(device) -> str:
    """Short name of the backend for ``device``: 'triton', 'cpu' or 'torch_fallback'."""
    return get_backend(device).__name__.split(".")[-1].replace("matmul", "triton")


def offset_d(offset: float | None) -> int:
    """D = P_α - B for float32: the integer an offset α adds to every PAM term's pattern
    (0 without an offset)."""
    if offset is None:
        return 0
    return arith.offset_bits(arith.check_offset(offset, "pamtorch.kernels"), torch.float32)


def _check(op: str, name: str, t, expect_shape=None, device=None, ndim=2):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: argument '{name}' must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype != torch.float32:
        raise TypeError(f"{op}: argument '{name}' must have dtype torch.float32, got {t.dtype} "
                        "(pamtorch.matmul upcasts bfloat16/float16 before calling the kernels)")
    if device is not None and t.device != device:
        raise RuntimeError(f"{op}: argument '{name}' is on {t.device}, expected {device} "
                           "(all arguments must be on one device)")
    if expect_shape is not None and tuple(t.shape) != tuple(expect_shape):
        raise ValueError(f"{op}: argument '{name}' must have shape {tuple(expect_shape)}, "
                         f"got {tuple(t.shape)}")


def _check_ab(op, a, b, ndim=2):
    _check(op, "a", a, ndim=ndim)
    _check(op, "b", b, device=a.device, ndim=ndim)
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"{op}: inner dimensions differ: 'a' is {tuple(a.shape)} and 'b' is "
                         f"{tuple(b.shape)}; expected a[{'B,' * (ndim - 2)}M,K] and "
                         f"b[{'B,' * (ndim - 2)}K,N]")
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"{op}: batch sizes differ: 'a' is {tuple(a.shape)} and 'b' is "
                         f"{tuple(b.shape)}")


@recorded("pam_mm", "matmul", product_count)
@_below_modes
def pam_mm(a: torch.Tensor, b: torch.Tensor, offset: float | None = None) -> torch.Tensor:
    """``a[M,K] @PAM b[K,N]`` -> float32 ``[M,N]`` (terms with ``offset`` α if given)."""
    _check_ab("pam_mm", a, b)
    offset_d(offset)
    return get_backend(a.device).pam_mm(a, b, offset)


@recorded("pam_mm_exact_grad_a", "matmul", product_count)
@_below_modes
def pam_mm_exact_grad_a(a: torch.Tensor, b: torch.Tensor, dc: torch.Tensor,
                        offset: float | None = None) -> torch.Tensor:
    """Exact derivative of ``a @PAM b`` (with ``offset``) w.r.t. ``a`` for upstream
    ``dc[M,N]`` -> ``[M,K]``."""
    op = "pam_mm_exact_grad_a"
    _check_ab(op, a, b)
    _check(op, "dc", dc, (a.shape[0], b.shape[1]), a.device)
    offset_d(offset)
    return get_backend(a.device).pam_mm_exact_grad_a(a, b, dc, offset)


@recorded("pam_mm_exact_grad_b", "matmul", product_count)
@_below_modes
def pam_mm_exact_grad_b(a: torch.Tensor, b: torch.Tensor, dc: torch.Tensor,
                        offset: float | None = None) -> torch.Tensor:
    """Exact derivative of ``a @PAM b`` (with ``offset``) w.r.t. ``b`` for upstream
    ``dc[M,N]`` -> ``[K,N]``."""
    op = "pam_mm_exact_grad_b"
    _check_ab(op, a, b)
    _check(op, "dc", dc, (a.shape[0], b.shape[1]), a.device)
    offset_d(offset)
    return get_backend(a.device).pam_mm_exact_grad_b(a, b, dc, offset)


def _per_batch(fn, out_shape, device, *ts, offset=None):
    out = torch.empty(out_shape, dtype=torch.float32, device=device)
    for i in range(out_shape[0]):
        out[i].copy_(fn(*(t[i] for t in ts), offset))
    return out


@recorded("pam_bmm", "matmul", product_count)
@_below_modes
def pam_bmm(a: torch.Tensor, b: torch.Tensor, offset: float | None = None) -> torch.Tensor:
    """Batched ``a[B,M,K] @PAM b[B,K,N]`` -> float32 ``[B,M,N]`` (any strides)."""
    _check_ab("pam_bmm", a, b, 3)
    offset_d(offset)
    be = get_backend(a.device)
    if hasattr(be, "pam_bmm"):
        return be.pam_bmm(a, b, offset)
    return _per_batch(be.pam_mm, (a.shape[0], a.shape[1], b.shape[2]), a.device, a, b, offset=offset)


@recorded("pam_bmm_exact_grad_a", "matmul", product_count)
@_below_modes
def pam_bmm_exact_grad_a(a: torch.Tensor, b: torch.Tensor, dc: torch.Tensor,
                         offset: float | None = None) -> torch.Tensor:
    """Batched exact derivative w.r.t. ``a`` -> ``[B,M,K]``."""
    op = "pam_bmm_exact_grad_a"
    _check_ab(op, a, b, 3)
    _check(op, "dc", dc, (a.shape[0], a.shape[1], b.shape[2]), a.device, ndim=3)
    offset_d(offset)
    be = get_backend(a.device)
    if hasattr(be, op):
        return getattr(be, op)(a, b, dc, offset)
    return _per_batch(be.pam_mm_exact_grad_a, a.shape, a.device, a, b, dc, offset=offset)


@recorded("pam_bmm_exact_grad_b", "matmul", product_count)
@_below_modes
def pam_bmm_exact_grad_b(a: torch.Tensor, b: torch.Tensor, dc: torch.Tensor,
                         offset: float | None = None) -> torch.Tensor:
    """Batched exact derivative w.r.t. ``b`` -> ``[B,K,N]``."""
    op = "pam_bmm_exact_grad_b"
    _check_ab(op, a, b, 3)
    _check(op, "dc", dc, (a.shape[0], a.shape[1], b.shape[2]), a.device, ndim=3)
    offset_d(offset)
    be = get_backend(a.device)
    if hasattr(be, op):
        return getattr(be, op)(a, b, dc, offset)
    return _per_batch(be.pam_mm_exact_grad_b, b.shape, a.device, a, b, dc, offset=offset)
