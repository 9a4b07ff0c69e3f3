"""Compiled CPU kernels for PAM matrix products (AVX2/FMA with a portable scalar path).

The C++ sources (``pam_matmul.cpp``, ``pa_elementwise.cpp`` next to this file) are compiled
once, on first use, into one library in a cache directory:

* ``$TORCH_EXTENSIONS_DIR/pamtorch_cpu_<hash>`` when that variable is set, else
* ``$XDG_CACHE_HOME/pamtorch/pamtorch_cpu_<hash>`` (default ``~/.cache/pamtorch/...``).

``<hash>`` covers the sources, the compile flags and the torch/Python versions, so an edit
or an upgrade rebuilds into a fresh directory. While compiling, one line is printed on
stderr. The instruction set is chosen at run time (``__builtin_cpu_supports("avx2")`` and
``"fma"``); the AVX2 code is confined to functions with a target attribute, so the build
itself is portable.

The cache is robust to interrupted builds, and a build never hangs:

* the library is only ever loaded into this process after its size and sha256 match the
  record ``<library>.json`` written after a successful build (a truncated library would
  otherwise kill the process with SIGBUS); a library without a record (older caches) is
  first loaded in a child process, and adopted only if that works;
* a build runs in a child process, with ``torch.utils.cpp_extension.load`` into a fresh
  temporary directory, and the finished library is renamed into place atomically;
* builders take the lock file ``lock`` in the cache directory (pid and host inside); a lock
  whose owner is gone, or that is older than max(1 h, 2 x the timeout), is removed with
  a warning, as is an empty, truncated, modified or unloadable library (then rebuilt);
* waiting for another builder plus building take at most ``PAMTORCH_BUILD_TIMEOUT``
  seconds (default 600; a cold compile takes about a minute on 2 cores).

If the build fails (no compiler, compile error, timeout, unsupported platform) a warning is
issued once and the chunked pure-torch implementation of
:mod:`pamtorch.kernels.torch_fallback` is used. ``PAMTORCH_NO_EXTENSION=1`` forces that
fallback. :func:`status` says which path runs and why.

Emulation notes (the results are bit-identical to the integer rules; docs/numerics.md
lists each instruction and the test that proves it):

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
  scalar rule; an entry whose other terms overflowed to the opposite inf is recomputed in
  k order (see docs/numerics.md).

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

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import torch

from .. import _per_batch, offset_d, torch_fallback

__all__ = ["pam_mm", "pam_mm_exact_grad_a", "pam_mm_exact_grad_b", "pam_bmm", "pam_bmm_exact_grad_a",
           "pam_bmm_exact_grad_b", "available", "backend", "load_extension", "status"]

_SRC_DIR = os.path.dirname(os.path.abspath(__file__))
_SOURCES = ["pam_matmul.cpp", "pa_elementwise.cpp", "pa_optim.cpp", "pa_norm.cpp", "pa_lowp.cpp", "pa_route.cpp",
            "pa_rnn.cpp", "pa_conv.cpp"]
_HEADERS = ["pa_bits.h", "pa_loops.h"]  # included by the sources: part of the build's hash, so an edit rebuilds
_LOCK = threading.Lock()
_EXT = None
_TRIED = False
_ERROR = None      # why the fallback runs
_LIBRARY = None    # path of the loaded library
_EVENTS: list = []  # what the last load had to repair, for status()
_DEFAULT_TIMEOUT = 600.0
_POLL = 0.25

# Run in a child process, so that a library that crashes on loading (SIGBUS on a
# truncated file) or a compiler that hangs cannot take this process with it.
# argv: mode ("build" or "load"), module name, build directory or library path, json args.
_CHILD = r"""
import importlib.util, json, sys
mode, name, where, extra = sys.argv[1:5]
try:
    if mode == "build":
        from torch.utils import cpp_extension
        sources, cflags, ldflags = json.loads(extra)
        mod = cpp_extension.load(name=name, sources=sources, extra_cflags=cflags,
                                 extra_ldflags=ldflags, build_directory=where, verbose=False)
    else:
        import torch
        spec = importlib.util.spec_from_file_location(name, where)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    result = {"file": mod.__file__, "cpu_path": mod.cpu_path()}
except Exception as e:
    result = {"error": f"{type(e).__name__}: {e}"}
print("\n" + json.dumps(result))
sys.exit(0 if "file" in result else 1)
"""


class _BuildError(Exception):
    """A build or verification step that failed; the message says which and why."""


class _OutOfTime(_BuildError):
    """PAMTORCH_BUILD_TIMEOUT ran out (says nothing about the library)."""


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
    for s in _SOURCES + _HEADERS:
        with open(os.path.join(_SRC_DIR, s), "rb") as f:
            h.update(f.read())
    cflags, ldflags = _flags()
    h.update(repr((cflags, ldflags, torch.__version__, sys.version_info[:2], sys.platform)).encode())
    return "pamtorch_cpu_" + h.hexdigest()[:12]


def _library_path(build_dir: str, name: str) -> str:
    return os.path.join(build_dir, name + (".pyd" if sys.platform == "win32" else ".so"))


def _timeout() -> float:
    raw = os.environ.get("PAMTORCH_BUILD_TIMEOUT", "")
    if raw == "":
        return _DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:  # also refuses nan
        raise ValueError(f"PAMTORCH_BUILD_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return value


def _digest(path: str):
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def _record(path: str, cpu_path: str) -> None:
    """Write ``<library>.json`` (size, sha256) next to a library that loaded in a child."""
    size, sha = _digest(path)
    tmp = f"{path}.json.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"size": size, "sha256": sha, "cpu_path": cpu_path}, f)
    os.replace(tmp, path + ".json")


def _verify(path: str):
    """('ok' | 'missing' | 'unrecorded' | 'broken', reason) for the library at ``path``,
    judged by its size and sha256 against its record, without loading it."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return "missing", "it does not exist"
    if size == 0:
        return "broken", "it is empty (an interrupted link leaves a 0-byte library)"
    try:
        with open(path + ".json") as f:
            rec = json.load(f)
        want_size, want_sha = int(rec["size"]), str(rec["sha256"])
    except FileNotFoundError:
        return "unrecorded", "no size/sha256 record"
    except (ValueError, KeyError, TypeError) as e:
        return "broken", f"its record {path}.json is unreadable ({type(e).__name__})"
    if size != want_size:
        return "broken", f"it has {size} bytes where {want_size} were recorded after its build (truncated?)"
    if _digest(path)[1] != want_sha:
        return "broken", "its sha256 differs from the one recorded after its build"
    return "ok", ""


def _import(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_child(args, deadline: float, what: str) -> dict:
    """Run ``_CHILD`` with ``args`` until ``deadline``; kill its whole process group
    (ninja, the compiler) when time runs out or this process is interrupted."""
    posix = os.name == "posix"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=posix)
    try:
        out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 0.01))
    except subprocess.TimeoutExpired:
        raise _OutOfTime(f"{what} did not finish within PAMTORCH_BUILD_TIMEOUT={_timeout():g} s "
                          "(set PAMTORCH_BUILD_TIMEOUT to allow more)") from None
    finally:
        if proc.poll() is None:
            try:
                if posix:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
            except ProcessLookupError:  # exited just now
                pass
            proc.communicate()
    lines = out.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except ValueError:
        result = {}
    if proc.returncode == 0 and "file" in result:
        return result
    if "error" in result:
        raise _BuildError(f"{what} failed: {result['error']}")
    if proc.returncode < 0:
        try:
            sig = signal.Signals(-proc.returncode).name
        except ValueError:
            sig = f"signal {-proc.returncode}"
        raise _BuildError(f"{what} was killed by {sig}")
    tail = (err.strip().splitlines() or ["no output"])[-1]
    raise _BuildError(f"{what} exited with status {proc.returncode}: {tail}")


# ---------------------------------------------------------------- the build lock
def _fd_holders(lock_stat, pids):
    """Which of ``pids`` hold the lock file open (Linux /proc); None if some could not be
    inspected."""
    holders, unknown = [], False
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except FileNotFoundError:  # exited meanwhile
            continue
        except OSError:
            unknown = True
            continue
        for fd in fds:
            try:
                st = os.stat(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (lock_stat.st_dev, lock_stat.st_ino):
                holders.append(pid)
                break
    return None if unknown else holders


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _stale_reason(path: str, stale_after: float):
    """Why the lock at ``path`` is stale, or None while a live builder may hold it."""
    try:
        st = os.stat(path)
        with open(path) as f:
            text = f.read(200)
    except FileNotFoundError:
        return None
    age = time.time() - st.st_mtime
    proc = os.path.isdir("/proc/self/fd")
    fields = text.split()
    if len(fields) >= 2 and fields[0].isdigit() and fields[1] == socket.gethostname():
        pid = int(fields[0])
        if not _pid_alive(pid):
            return f"its owner, process {pid}, is gone"
        if proc and _fd_holders(st, [pid]) == []:
            return f"process {pid} does not hold it (the owner is gone, its id reused or a zombie)"
    elif not fields and proc and age > 5:
        # torch's own lock (an older pamtorch, or torch.utils.cpp_extension) holds no pid
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
        if _fd_holders(st, pids) == []:
            return "no process holds it open"
    if age > stale_after:
        return f"it is {age / 60:.0f} minutes old"
    return None


def _acquire(path: str, deadline: float, stale_after: float) -> int:
    """Create the lock file (pid, host, time inside) and return its open descriptor,
    removing stale locks and waiting for a live builder until ``deadline``."""
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            os.write(fd, f"{os.getpid()} {socket.gethostname()} {time.time():.0f}\n".encode())
            return fd
        why = _stale_reason(path, stale_after)
        if why is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            _note(f"removed the stale build lock {path} ({why})")
            continue
        if time.monotonic() >= deadline:
            try:
                with open(path) as f:
                    owner = f.read(200).split()
            except OSError:
                owner = []
            who = f"process {owner[0]}" if owner else "another process"
            raise _OutOfTime(f"{who} held the build lock {path} for all of PAMTORCH_BUILD_TIMEOUT="
                              f"{_timeout():g} s (remove it if no build is running)")
        time.sleep(_POLL)


def _release(path: str, fd: int) -> None:
    st = os.fstat(fd)
    os.close(fd)
    try:
        cur = os.stat(path)
        if (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino):  # still ours, not a successor's
            os.unlink(path)
    except FileNotFoundError:
        pass


def _note(msg: str) -> None:
    _EVENTS.append(msg)
    warnings.warn(f"pamtorch: {msg}", RuntimeWarning, stacklevel=5)


# ---------------------------------------------------------------- build and load
def _build(name: str, build_dir: str, lib: str, deadline: float) -> None:
    """Compile into a fresh temporary directory (in a child) and rename into place."""
    cflags, ldflags = _flags()
    tmp = tempfile.mkdtemp(prefix="build-", dir=build_dir)
    try:
        print(f"pamtorch: compiling the CPU kernels into {build_dir} (first use only, about a "
              f"minute; at most PAMTORCH_BUILD_TIMEOUT={_timeout():g} s)...", file=sys.stderr, flush=True)
        sources = [os.path.join(_SRC_DIR, s) for s in _SOURCES]
        result = _run_child(["build", name, tmp, json.dumps([sources, cflags, ldflags])], deadline,
                            "the compile")
        built = result["file"]
        _record(built, result["cpu_path"])
        os.replace(built, lib)
        os.replace(built + ".json", lib + ".json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_leftovers(build_dir: str, older_than: float) -> None:
    """Temporary build directories of builders that were killed (we hold the lock)."""
    now = time.time()
    for fn in os.listdir(build_dir):
        p = os.path.join(build_dir, fn)
        try:
            if not (fn.startswith("build-") or ".tmp-" in fn) or now - os.path.getmtime(p) <= older_than:
                continue
            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)
        except FileNotFoundError:  # removed meanwhile by an orphaned builder
            pass


def _load_locked(name: str, build_dir: str, lib: str, deadline: float):
    """Holding the lock: load a verified library, adopting or repairing the cache."""
    state, why = _verify(lib)
    if state == "unrecorded":  # an older cache: prove it loads, in a child
        try:
            result = _run_child(["load", name, lib, ""], deadline, "loading it in a child process")
        except _OutOfTime:
            raise  # no verdict on the library: leave it for the next run
        except _BuildError as e:
            state, why = "broken", str(e)
        else:
            _record(lib, result["cpu_path"])
            state, why = _verify(lib)
    if state == "ok":
        try:
            return _import(name, lib)
        except ImportError as e:
            state, why = "broken", f"it fails to load: {e}"
    if state == "broken":
        _note(f"the cached CPU kernel library {lib} is broken ({why}); removed it, rebuilding")
    for p in (lib, lib + ".json"):
        if os.path.exists(p):
            os.unlink(p)
    _build(name, build_dir, lib, deadline)
    state, why = _verify(lib)
    if state != "ok":
        raise _BuildError(f"the library just built at {lib} does not verify ({why})")
    return _import(name, lib)  # loaded in the build's child, so an ImportError here is news


def _load(name: str, build_dir: str):
    global _LIBRARY
    lib = _library_path(build_dir, name)
    if _verify(lib)[0] == "ok":  # the common case: no lock, no child
        try:
            mod = _import(name, lib)
            _LIBRARY = lib
            return mod
        except ImportError:
            pass  # repaired under the lock below
    timeout = _timeout()
    deadline = time.monotonic() + timeout
    os.makedirs(build_dir, exist_ok=True)
    lock = os.path.join(build_dir, "lock")
    fd = _acquire(lock, deadline, max(3600.0, 2 * timeout))
    try:
        _remove_leftovers(build_dir, timeout)
        mod = _load_locked(name, build_dir, lib, deadline)
    finally:
        _release(lock, fd)
    _LIBRARY = lib
    return mod


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
        _timeout()  # a malformed PAMTORCH_BUILD_TIMEOUT is the user's error, not a fallback
        try:
            name = _ext_name()
            _EXT = _load(name, os.path.join(_cache_root(), name))
        except Exception as e:  # noqa: BLE001 - any build problem means: use the fallback
            _ERROR = str(e) if isinstance(e, _BuildError) else f"{type(e).__name__}: {e}"
            first = _ERROR.strip().splitlines()[0] if _ERROR.strip() else type(e).__name__
            hint = "" if isinstance(e, _OutOfTime) else (
                " Install a C++ compiler (g++/clang++) and ninja to get the fast kernels.")
            warnings.warn(
                "pamtorch: could not build the compiled CPU kernels "
                f"({first[:400]}); falling back to the slow pure-torch implementation." + hint,
                RuntimeWarning, stacklevel=3)
            _EXT = None
        return _EXT


@contextlib.contextmanager
def route_paused():
    """This thread's kernel route (``pamtorch.mode``'s, pa_route.cpp) off in the body: for
    work that must run as it is under an active mode, as ``_disable_current_modes`` takes
    the dispatch modes off. Nothing to do while the extension is not loaded (then no route
    can be on)."""
    ext = _EXT
    if ext is None:
        yield
        return
    was = ext.route_set_mask(0)
    try:
        yield
    finally:
        ext.route_set_mask(was)


def available() -> bool:
    """True when the compiled kernels are (or could be built and) loaded."""
    return load_extension() is not None


def backend() -> str:
    """'avx2+fma', 'scalar' (compiled, portable path) or 'torch' (pure-torch fallback)."""
    ext = load_extension()
    return ext.cpu_path() if ext is not None else "torch"


def status() -> dict:
    """What runs on the CPU: ``backend`` ('avx2+fma', 'scalar' or 'torch'), ``library``
    (the loaded file, sha256-verified, or None), ``cache_dir``, ``reason`` (why the
    fallback runs, or None) and ``events`` (stale locks or broken libraries repaired)."""
    ext = load_extension()
    try:
        cache_dir = os.path.join(_cache_root(), _ext_name())
    except OSError as e:
        cache_dir = f"unknown ({e})"
    return dict(backend=ext.cpu_path() if ext is not None else "torch",
                library=_LIBRARY if ext is not None else None, cache_dir=cache_dir,
                reason=None if ext is not None else _ERROR, events=list(_EVENTS))


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


def pam_mm(a: torch.Tensor, b: torch.Tensor, offset: float | None = None) -> torch.Tensor:
    """C[i,j] = sum_k PAM(a[i,k], b[k,j]), float32 accumulation in k order.

    PAM: pattern |a|+|b|-1.0 (+ D = P_α - 1.0 with an ``offset`` α) as integers, sign XOR,
    zero/subnormal operand -> signed 0, results below the smallest normal -> signed 0,
    at or above inf -> signed inf, NaN in -> NaN, inf*0 -> NaN."""
    _check_mm(a, b)
    ext = load_extension()
    if ext is None:
        return torch_fallback.pam_mm(a, b, offset)
    return ext.pam_mm(a.detach(), b.detach(), -1, offset_d(offset))


def pam_mm_exact_grad_a(a: torch.Tensor, b: torch.Tensor, dc: torch.Tensor,
                        offset: float | None = None) -> torch.Tensor:
    """Exact derivative of sum(dc * pam_mm(a, b, offset)) w.r.t. a:
    dA[i,k] = sum_j dC[i,j] * sign(B[k,j]) * 2^(E_B[k,j] + c), c = [mant(A[i,k]) + mant(B[k,j]) >= 2^23]
    (with an offset α: 2^(E_B + E_α + floor((mant(A) + mant(B) + mant(α)) / 2^23))).
    The power of two is applied by exponent arithmetic (flush/inf); B zero -> term dC*0;
    B inf/NaN -> PAM(B, dC)."""
    _check_grad(a, b, dc)
    ext = load_extension()
    if ext is None:
        return torch_fallback.pam_mm_exact_grad_a(a, b, dc, offset)
    return ext.pam_mm_exact_grad_a(a.detach(), b.detach(), dc.detach(), -1, offset_d(offset))


def pam_mm_exact_grad_b(a: torch.Tensor, b: torch.Tensor, dc: torch.Tensor,
                        offset: float | None = None) -> torch.Tensor:
    """Exact derivative w.r.t. b: dB[k,j] = sum_i dC[i,j] * sign(A[i,k]) * 2^(E_A[i,k] + c)."""
    _check_grad(a, b, dc)
    ext = load_extension()
    if ext is None:
        return torch_fallback.pam_mm_exact_grad_b(a, b, dc, offset)
    return ext.pam_mm_exact_grad_b(a.detach(), b.detach(), dc.detach(), -1, offset_d(offset))


def _check_bmm(op, a, b, dc=None, dc_shape=None):
    for t, name in ((a, "a"), (b, "b")) + (((dc, "dc"),) if dc is not None else ()):
        _check(t, name, 3, op)
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"{op}: shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be batch-multiplied")
    if dc is not None and tuple(dc.shape) != dc_shape:
        raise ValueError(f"{op}: dc must have shape {dc_shape}, got {tuple(dc.shape)}")


def pam_bmm(a: torch.Tensor, b: torch.Tensor, offset: float | None = None) -> torch.Tensor:
    """Batched :func:`pam_mm`: ``[B,M,K] x [B,K,N] -> [B,M,N]``; small matrices run one per thread."""
    _check_bmm("pam_bmm", a, b)
    ext = load_extension()
    if ext is None:
        return _per_batch(torch_fallback.pam_mm, (a.shape[0], a.shape[1], b.shape[2]), a.device, a, b,
                          offset=offset)
    return ext.pam_bmm(a.detach(), b.detach(), -1, offset_d(offset))


def pam_bmm_exact_grad_a(a: torch.Tensor, b: torch.Tensor, dc: torch.Tensor,
                         offset: float | None = None) -> torch.Tensor:
    """Batched :func:`pam_mm_exact_grad_a` -> ``[B,M,K]``."""
    _check_bmm("pam_bmm_exact_grad_a", a, b, dc, (a.shape[0], a.shape[1], b.shape[2]))
    ext = load_extension()
    if ext is None:
        return _per_batch(torch_fallback.pam_mm_exact_grad_a, tuple(a.shape), a.device, a, b, dc,
                          offset=offset)
    return ext.pam_bmm_exact_grad_a(a.detach(), b.detach(), dc.detach(), -1, offset_d(offset))


def pam_bmm_exact_grad_b(a: torch.Tensor, b: torch.Tensor, dc: torch.Tensor,
                         offset: float | None = None) -> torch.Tensor:
    """Batched :func:`pam_mm_exact_grad_b` -> ``[B,K,N]``."""
    _check_bmm("pam_bmm_exact_grad_b", a, b, dc, (a.shape[0], a.shape[1], b.shape[2]))
    ext = load_extension()
    if ext is None:
        return _per_batch(torch_fallback.pam_mm_exact_grad_b, tuple(b.shape), a.device, a, b, dc,
                          offset=offset)
    return ext.pam_bmm_exact_grad_b(a.detach(), b.detach(), dc.detach(), -1, offset_d(offset))
