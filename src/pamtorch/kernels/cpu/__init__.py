"""Compiled CPU kernels for PAM matrix products (AVX2/FMA with a portable scalar path).

The C++ source (``pam_matmul.cpp`` next to this file) is compiled once, on first use,
with ``torch.utils.cpp_extension.load`` into a cache directory:

* ``$TORCH_EXTENSIONS_DIR/pamtorch_cpu_<hash>`` when that variable is set, else
* ``$XDG_CACHE_HOME/pamtorch/pamtorch_cpu_<hash>`` (default ``~/.cache/pamtorch/...``).

``<hash>`` covers the source, the compile flags and the torch/Python versions, so an edit
or an upgrade rebuilds into a fresh directory; a finished build is imported directly
without invoking the compiler again. While compiling, one line is printed on stderr.
The instruction set is chosen at run time (``__builtin_cpu_supports("avx2")`` and
``"fma"``); the AVX2 code is confined to functions with a target attribute, so the
build itself is portable.

If the build fails (no compiler, unsupported platform) a warning is issued once and the
chunked pure-torch implementation of :mod:`pamtorch.kernels.torch_fallback` is used.
``PAMTORCH_NO_EXTENSION=1`` forces that fallback.

Emulation notes (the results are bit-identical to the integer rules):

* a product's sign is applied by the integer add of the patterns (adding 2^31 modulo
  2^32 is a XOR of bit 31) or by a float multiply with an exact +-1.0/0.0 table; a
  multiply by +-1 is bit-identical to a sign XOR, by 0.0 it yields a zero operand's 0;
* patterns below the smallest normal become zero through FTZ+DAZ (set in MXCSR for the
  duration of a call, restored afterwards), which also flushes subnormal partial sums;
* in the exact gradients the power of two 2^(E+c) is applied by a float multiply with an
  exact power of two, which under FTZ/DAZ equals adding (E+c)<<23 to dC's pattern with
  flush to zero / overflow to inf (fused into an FMA only when the operand ranges prove
  that no term can overflow or underflow);
* inf/NaN operands are packed as zeros and their terms added afterwards with the exact
  scalar rule.

The kernel picks its inner loop per call from operand statistics gathered while
packing (zeros present in ``a`` and/or ``b``; whether any product can underflow or
overflow); accumulation is sequential over the reduction index in every path, so the
AVX2 path, the portable scalar path and the pure-torch fallback agree bit for bit
(apart from the fallback not flushing subnormal partial sums).

All entry points take float32 2-D CPU tensors with any strides and return new
contiguous float32 tensors; bf16/f16 callers upcast first. Thread count follows
``torch.get_num_threads()``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading
import warnings

import torch

from .. import _per_batch, torch_fallback

__all__ = ["pam_mm", "pam_mm_exact_grad_a", "pam_mm_exact_grad_b", "pam_bmm", "pam_bmm_exact_grad_a",
           "pam_bmm_exact_grad_b", "available", "backend", "load_extension"]

_SRC_DIR = os.path.dirname(os.path.abspath(__file__))
_SOURCES = ["pam_matmul.cpp", "pa_elementwise.cpp"]
_LOCK = threading.Lock()
_EXT = None
_TRIED = False
_ERROR = None


def _flags():
    # -ffp-contract=off: GCC would otherwise fuse the separate multiply and add of the
    # overflow-safe gradient loop into an FMA (its intrinsics are plain vector arithmetic),
    # losing the inf of an overflowing term; intended FMAs are explicit intrinsics.
    cflags = ["-O3", "-std=c++17", "-ffp-contract=off"]
    ldflags = []
    if sys.platform.startswith("linux"):
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


def _cache_root() -> str:
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pamtorch")


def _ext_name() -> str:
    h = hashlib.sha256()
    for s in _SOURCES:
        with open(os.path.join(_SRC_DIR, s), "rb") as f:
            h.update(f.read())
    cflags, ldflags = _flags()
    h.update(repr((cflags, ldflags, torch.__version__, sys.version_info[:2], sys.platform)).encode())
    return "pamtorch_cpu_" + h.hexdigest()[:12]


def _import_built(name: str, build_dir: str):
    for fn in os.listdir(build_dir) if os.path.isdir(build_dir) else []:
        if fn.startswith(name + ".") and fn.endswith((".so", ".pyd", ".dylib")):
            spec = importlib.util.spec_from_file_location(name, os.path.join(build_dir, fn))
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
    return None


def load_extension():
    """Return the compiled module, building it on first use; None if unavailable."""
    global _EXT, _TRIED, _ERROR
    if _EXT is not None or _TRIED:
        return _EXT
    with _LOCK:
        if _EXT is not None or _TRIED:
            return _EXT
        _TRIED = True
        if os.environ.get("PAMTORCH_NO_EXTENSION", "") not in ("", "0"):
            _ERROR = "disabled by PAMTORCH_NO_EXTENSION"
            return None
        try:
            name = _ext_name()
            build_dir = os.path.join(_cache_root(), name)
            mod = None
            try:
                mod = _import_built(name, build_dir)
            except Exception:  # stale or broken artefact: rebuild below
                mod = None
            if mod is None:
                from torch.utils import cpp_extension

                os.makedirs(build_dir, exist_ok=True)
                print(f"pamtorch: compiling the CPU matmul kernels into {build_dir} "
                      "(first use only, about a minute)...", file=sys.stderr, flush=True)
                cflags, ldflags = _flags()
                mod = cpp_extension.load(
                    name=name,
                    sources=[os.path.join(_SRC_DIR, s) for s in _SOURCES],
                    extra_cflags=cflags,
                    extra_ldflags=ldflags,
                    build_directory=build_dir,
                    verbose=False,
                )
            _EXT = mod
        except Exception as e:  # noqa: BLE001 - any build problem means: use the fallback
            _ERROR = f"{type(e).__name__}: {e}"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            warnings.warn(
                "pamtorch: could not build the compiled CPU kernels "
                f"({first[:300]}); falling back to the slow pure-torch implementation. "
                "Install a C++ compiler (g++/clang++) and ninja to get the fast kernels.",
                RuntimeWarning, stacklevel=3)
            _EXT = None
        return _EXT


def available() -> bool:
    """True when the compiled kernels are (or could be built and) loaded."""
    return load_extension() is not None


def backend() -> str:
    """'avx2+fma', 'scalar' (compiled, portable path) or 'torch' (pure-torch fallback)."""
    ext = load_extension()
    return ext.cpu_path() if ext is not None else "torch"


def _check(t, name, ndim=2, op=None):
    name = f"{op}: {name}" if op else name
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32 (upcast bf16/f16 first), got {t.dtype}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor, got device {t.device}")


def _check_mm(a, b):
    _check(a, "a")
    _check(b, "b")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"pam_mm: shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be multiplied "
                         f"(a.shape[1]={a.shape[1]} != b.shape[0]={b.shape[0]})")


def _check_grad(a, b, dc):
    _check_mm(a, b)
    _check(dc, "dc")
    want = (a.shape[0], b.shape[1])
    if tuple(dc.shape) != want:
        raise ValueError(f"dc must have shape {want} (rows of a, columns of b), got {tuple(dc.shape)}")


def pam_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """C[i,j] = sum_k PAM(a[i,k], b[k,j]), float32 accumulation in k order.

    PAM: pattern |a|+|b|-1.0 as integers, sign XOR, zero/subnormal operand -> signed 0,
    results below the smallest normal -> signed 0, at or above inf -> signed inf,
    NaN in -> NaN, inf*0 -> NaN."""
    _check_mm(a, b)
    ext = load_extension()
    if ext is None:
        return torch_fallback.pam_mm(a, b)
    return ext.pam_mm(a.detach(), b.detach(), -1)


def pam_mm_exact_grad_a(a: torch.Tensor, b: torch.Tensor, dc: torch.Tensor) -> torch.Tensor:
    """Exact derivative of sum(dc * pam_mm(a, b)) w.r.t. a:
    dA[i,k] = sum_j dC[i,j] * sign(B[k,j]) * 2^(E_B[k,j] + c), c = [mant(A[i,k]) + mant(B[k,j]) >= 2^23].
    The power of two is applied by exponent arithmetic (flush/inf); B zero -> term dC*0;
    B inf/NaN -> PAM(B, dC)."""
    _check_grad(a, b, dc)
    ext = load_extension()
    if ext is None:
        return torch_fallback.pam_mm_exact_grad_a(a, b, dc)
    return ext.pam_mm_exact_grad_a(a.detach(), b.detach(), dc.detach(), -1)


def pam_mm_exact_grad_b(a: torch.Tensor, b: torch.Tensor, dc: torch.Tensor) -> torch.Tensor:
    """Exact derivative w.r.t. b: dB[k,j] = sum_i dC[i,j] * sign(A[i,k]) * 2^(E_A[i,k] + c)."""
    _check_grad(a, b, dc)
    ext = load_extension()
    if ext is None:
        return torch_fallback.pam_mm_exact_grad_b(a, b, dc)
    return ext.pam_mm_exact_grad_b(a.detach(), b.detach(), dc.detach(), -1)


def _check_bmm(op, a, b, dc=None, dc_shape=None):
    for t, name in ((a, "a"), (b, "b")) + (((dc, "dc"),) if dc is not None else ()):
        _check(t, name, 3, op)
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"{op}: shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be batch-multiplied")
    if dc is not None and tuple(dc.shape) != dc_shape:
        raise ValueError(f"{op}: dc must have shape {dc_shape}, got {tuple(dc.shape)}")


def pam_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched :func:`pam_mm`: ``[B,M,K] x [B,K,N] -> [B,M,N]``; small matrices run one per thread."""
    _check_bmm("pam_bmm", a, b)
    ext = load_extension()
    if ext is None:
        return _per_batch(torch_fallback.pam_mm, (a.shape[0], a.shape[1], b.shape[2]), a.device, a, b)
    return ext.pam_bmm(a.detach(), b.detach(), -1)


def pam_bmm_exact_grad_a(a: torch.Tensor, b: torch.Tensor, dc: torch.Tensor) -> torch.Tensor:
    """Batched :func:`pam_mm_exact_grad_a` -> ``[B,M,K]``."""
    _check_bmm("pam_bmm_exact_grad_a", a, b, dc, (a.shape[0], a.shape[1], b.shape[2]))
    ext = load_extension()
    if ext is None:
        return _per_batch(torch_fallback.pam_mm_exact_grad_a, tuple(a.shape), a.device, a, b, dc)
    return ext.pam_bmm_exact_grad_a(a.detach(), b.detach(), dc.detach(), -1)


def pam_bmm_exact_grad_b(a: torch.Tensor, b: torch.Tensor, dc: torch.Tensor) -> torch.Tensor:
    """Batched :func:`pam_mm_exact_grad_b` -> ``[B,K,N]``."""
    _check_bmm("pam_bmm_exact_grad_b", a, b, dc, (a.shape[0], a.shape[1], b.shape[2]))
    ext = load_extension()
    if ext is None:
        return _per_batch(torch_fallback.pam_mm_exact_grad_b, tuple(b.shape), a.device, a, b, dc)
    return ext.pam_bmm_exact_grad_b(a.detach(), b.detach(), dc.detach(), -1)
