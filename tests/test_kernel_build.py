"""The compiled CPU kernels' cache survives interrupted builds and never hangs.

Every experiment runs in a subprocess with its own TORCH_EXTENSIONS_DIR under tmp_path,
never in the user's cache. One real compile per session (the ``built`` fixture, itself
made under a stale lock and over a 0-byte library) provides the library that the other
tests copy and then break; their rebuilds use ``CXX=/bin/false`` (fails at once) or a
short PAMTORCH_BUILD_TIMEOUT, so each takes a few seconds.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_SRC = os.path.join(os.path.dirname(_HERE), "src")
try:
    import pamtorch.kernels.cpu  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, _SRC)

from reference import pam, split  # noqa: E402

from pamtorch.check import kernel_status_lines  # noqa: E402
from pamtorch.kernels import cpu  # noqa: E402

NAME = cpu._ext_name()

# Loads the kernels, runs one product, prints status() and every warning as JSON.
PROBE = """
import json, warnings
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import torch
    from pamtorch.kernels import cpu, torch_fallback
    st = cpu.status()
    a, b = torch.randn(5, 6), torch.randn(6, 7)
    assert torch.equal(cpu.pam_mm(a, b), torch_fallback.pam_mm(a, b))
print(json.dumps(dict(st, warnings=[str(x.message) for x in w])))
"""


def run(cache, code=PROBE, timeout=120, **env_extra):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(cache), OMP_NUM_THREADS="1",
               PYTHONPATH=_SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("PAMTORCH_NO_EXTENSION", "PAMTORCH_BUILD_TIMEOUT", "CXX"):
        env.pop(k, None)
    env.update(env_extra)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=timeout)
    r.elapsed = time.monotonic() - t0
    r.status = None
    if r.returncode == 0 and code is PROBE:
        r.status = json.loads(r.stdout.strip().splitlines()[-1])
    return r


def cache_dir(root):
    d = root / NAME
    d.mkdir(parents=True, exist_ok=True)
    return d


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def has(warnings, *parts):
    return any(all(p in w for p in parts) for w in warnings)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One real compile, started with a stale lock (dead owner) and a 0-byte library."""
    if shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or ninja")
    root = tmp_path_factory.mktemp("built")
    d = cache_dir(root)
    lib = d / (NAME + ".so")
    lib.write_bytes(b"")
    (d / "lock").write_text(f"{dead_pid()} {socket.gethostname()} 0\n")
    r = run(root, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return root, d, lib, r


def test_stale_lock_and_empty_library_are_rebuilt(built):
    root, d, lib, r = built
    st = r.status
    assert st["backend"] in ("avx2+fma", "scalar") and st["reason"] is None, st
    assert st["library"] == str(lib)
    assert has(st["warnings"], "removed the stale build lock", str(d / "lock"), "is gone")
    assert has(st["warnings"], str(lib), "is broken", "empty")
    assert not has(st["warnings"], "could not build")
    assert "compiling" in r.stderr
    assert not (d / "lock").exists()
    assert [p.name for p in d.iterdir() if p.name.startswith("build-")] == []  # temp dir removed
    rec = json.loads((d / (NAME + ".so.json")).read_text())
    assert rec["size"] == lib.stat().st_size and rec["cpu_path"] == st["backend"]
    # the next process loads the verified library directly: no compile, no warning
    again = run(root)
    assert again.status["library"] == str(lib) and again.status["warnings"] == []
    assert "compiling" not in again.stderr


def copy_built(built, tmp_path, record=True):
    lib = cache_dir(tmp_path) / (NAME + ".so")
    shutil.copyfile(built[2], lib)
    if record:
        shutil.copyfile(str(built[2]) + ".json", str(lib) + ".json")
    return lib


@pytest.mark.parametrize("record", [True, False], ids=["recorded", "unrecorded"])
def test_truncated_library_gives_a_warning_not_sigbus(built, tmp_path, record):
    lib = copy_built(built, tmp_path, record)
    with open(lib, "r+b") as f:
        f.truncate(lib.stat().st_size // 2)
    r = run(tmp_path, CXX="/bin/false")
    assert r.returncode == 0, (r.returncode, r.stderr)
    st = r.status
    assert st["backend"] == "torch" and "compile failed" in st["reason"]
    assert has(st["warnings"], str(lib), "is broken", "truncated" if record else "child process")
    assert has(st["warnings"], "could not build")
    assert not lib.exists()


def test_unrecorded_truncated_library_is_what_used_to_crash(built, tmp_path):
    """Control: loading the truncated library in-process is fatal (SIGBUS or ImportError)."""
    lib = tmp_path / (NAME + ".so")
    shutil.copyfile(built[2], lib)
    with open(lib, "r+b") as f:
        f.truncate(lib.stat().st_size // 2)
    code = (f"import torch, importlib.util as u\n"
            f"s = u.spec_from_file_location({NAME!r}, {str(lib)!r})\n"
            "s.loader.exec_module(u.module_from_spec(s))\n")
    r = run(tmp_path, code=code)
    assert r.returncode != 0
    probe = copy_built(built, tmp_path / "cache", record=False)
    shutil.copyfile(lib, probe)
    p = run(tmp_path / "cache", CXX="/bin/false")
    assert p.returncode == 0
    if r.returncode == -signal.SIGBUS:
        assert has(p.status["warnings"], "killed by SIGBUS")


def test_modified_library_is_caught_by_its_sha256(built, tmp_path):
    lib = copy_built(built, tmp_path)
    data = bytearray(lib.read_bytes())
    data[len(data) // 3] ^= 0xFF  # same size, one byte differs
    lib.write_bytes(bytes(data))
    r = run(tmp_path, CXX="/bin/false")
    assert r.returncode == 0, r.stderr
    assert has(r.status["warnings"], str(lib), "sha256 differs")
    assert r.status["backend"] == "torch"


def test_recorded_library_that_fails_to_load_is_rebuilt(tmp_path):
    """A library whose record matches but which dlopen refuses (ImportError in-process)."""
    lib = cache_dir(tmp_path) / (NAME + ".so")
    lib.write_bytes(b"not an ELF file" * 100)
    cpu._record(str(lib), "scalar")
    r = run(tmp_path, CXX="/bin/false")
    assert r.returncode == 0, r.stderr
    assert has(r.status["warnings"], str(lib), "fails to load")
    assert has(r.status["warnings"], "could not build")
    assert not lib.exists()


def test_unrecorded_good_library_is_adopted(built, tmp_path):
    """Caches written before the records existed: loaded once in a child, then recorded."""
    lib = copy_built(built, tmp_path, record=False)
    r = run(tmp_path, CXX="/bin/false")
    assert r.returncode == 0, r.stderr
    assert r.status["library"] == str(lib) and r.status["warnings"] == []
    rec = json.loads((tmp_path / NAME / (NAME + ".so.json")).read_text())
    assert rec["size"] == lib.stat().st_size


def test_live_lock_times_out_to_the_fallback(tmp_path):
    """A lock held by a live process: wait PAMTORCH_BUILD_TIMEOUT, then fall back; the
    lock is left alone."""
    lock = cache_dir(tmp_path) / "lock"
    fd = os.open(lock, os.O_CREAT | os.O_WRONLY)
    try:
        os.write(fd, f"{os.getpid()} {socket.gethostname()} 0\n".encode())
        r = run(tmp_path, PAMTORCH_BUILD_TIMEOUT="2")
    finally:
        os.close(fd)
    assert r.returncode == 0, r.stderr
    assert has(r.status["warnings"], f"process {os.getpid()} held the build lock {lock}",
               "PAMTORCH_BUILD_TIMEOUT=2 s", "falling back")
    assert not has(r.status["warnings"], "stale")
    assert lock.exists() and r.elapsed < 30


def test_torch_lock_without_pid(tmp_path):
    """torch's own lock file is empty: stale when no process holds it open, live when one does."""
    lock = cache_dir(tmp_path) / "lock"
    lock.write_bytes(b"")
    os.utime(lock, (time.time() - 60, time.time() - 60))
    r = run(tmp_path, CXX="/bin/false")
    assert r.returncode == 0, r.stderr
    assert has(r.status["warnings"], f"removed the stale build lock {lock}", "no process holds it")
    assert has(r.status["warnings"], "could not build") and not lock.exists()

    lock.write_bytes(b"")
    os.utime(lock, (time.time() - 60, time.time() - 60))
    with open(lock):  # held open by this (live) process, as torch's FileBaton does
        r = run(tmp_path, PAMTORCH_BUILD_TIMEOUT="1")
    assert r.returncode == 0, r.stderr
    assert has(r.status["warnings"], f"another process held the build lock {lock}")
    assert lock.exists()


def test_hanging_compiler_is_killed_at_the_timeout(tmp_path):
    pidfile = tmp_path / "cxx.pid"
    cxx = tmp_path / "cxx"
    cxx.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 120\n")
    cxx.chmod(0o755)
    r = run(tmp_path / "cache", CXX=str(cxx), PAMTORCH_BUILD_TIMEOUT="6")
    assert r.returncode == 0, r.stderr
    assert has(r.status["warnings"], "the compile did not finish within PAMTORCH_BUILD_TIMEOUT=6 s")
    assert r.elapsed < 40
    pid = int(pidfile.read_text())
    time.sleep(0.5)
    try:  # the compiler (a grandchild) was killed with its process group
        with open(f"/proc/{pid}/stat") as f:
            assert f.read().split(") ")[1][0] in "ZX"
    except FileNotFoundError:
        pass
    d = tmp_path / "cache" / NAME
    assert not (d / "lock").exists() and [p for p in d.iterdir() if p.name.startswith("build-")] == []


def test_malformed_timeout_is_a_clear_error(tmp_path):
    r = run(tmp_path, code="from pamtorch.kernels import cpu; cpu.load_extension()",
            PAMTORCH_BUILD_TIMEOUT="soon")
    assert r.returncode == 1
    assert "PAMTORCH_BUILD_TIMEOUT must be a positive number of seconds, got 'soon'" in r.stderr


def test_check_reports_the_kernel_status(built, tmp_path):
    code = "from pamtorch.cli import main; main(['check', '-n', '2000'])"
    r = run(built[0], code=code)
    assert r.returncode == 0, r.stderr
    assert "compiled C++" in r.stdout and f"library: {built[2]}" in r.stdout
    r = run(tmp_path, code=code, PAMTORCH_NO_EXTENSION="1")
    assert r.returncode == 0, r.stderr
    assert "pure-torch fallback, because disabled by PAMTORCH_NO_EXTENSION" in r.stdout
    assert f"cache: {tmp_path / NAME}" in r.stdout


def test_kernel_status_lines():
    lines = kernel_status_lines(dict(backend="scalar", library="/c/x.so", cache_dir="/c", reason=None,
                                     events=["removed the stale build lock /c/lock (x)"]))
    assert lines[0].endswith("compiled C++, portable scalar path")
    assert "/c/x.so" in lines[1] and lines[2] == "  repaired: removed the stale build lock /c/lock (x)"
    lines = kernel_status_lines(dict(backend="torch", library=None, cache_dir="/c", reason="no g++",
                                     events=[]))
    assert lines == ["CPU kernels (matmul and elementwise): pure-torch fallback, because no g++",
                     "  cache: /c"]


# ---------------------------------------------------------------- what the built kernels execute
# docs/numerics.md ("What the CPU kernels execute") lists the float multiplies and FMAs of
# the vector matmul kernels; these tests prove each one bit-identical to the definition:
# C[i,j] = sequential float32 sum over k of PAM(A[i,k], B[k,j]), with the partial sums
# flushed like the kernels' FTZ (the reference products come from tests/reference.py).
F0, FB, FA, FAB, FG, FZ, FZT, SB, FUSED, UNFUSED = 0, 1, 2, 3, 4, 5, 6, 7, 10, 11
TINY = 2.0 ** -126
F32 = torch.float32


@pytest.fixture(scope="module")
def ext(built):
    lib = str(built[2])
    assert cpu._verify(lib)[0] == "ok"
    return cpu._import(NAME, lib)


def rand_vals(shape, gen, emin=-20, emax=20, zeros=0.0, specials=0.0):
    """float32 with random bit-level mantissas, exponents in [emin, emax], random signs,
    a fraction of signed zeros and subnormals, and of inf/NaN."""
    e = torch.randint(emin, emax + 1, shape, generator=gen)
    bits = ((torch.randint(0, 2, shape, generator=gen) << 31) | ((e + 127) << 23)
            | torch.randint(0, 1 << 23, shape, generator=gen))
    x = torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits).to(torch.int32).view(torch.float32)
    u = torch.rand(shape, generator=gen)
    x = torch.where(u < zeros / 2, x * 0.0, x)
    x = torch.where((u >= zeros / 2) & (u < zeros), torch.copysign(torch.tensor(1e-40), x), x)
    pick = torch.tensor([float("inf"), float("-inf"), float("nan")])[torch.randint(0, 3, shape, generator=gen)]
    return torch.where(torch.rand(shape, generator=gen) < specials, pick, x)


def sequential_ftz(terms):
    """float32 sum over axis 1 of float64 ``terms`` (each exactly a float32), in index
    order, flushing partial sums below 2^-126 to signed zero (FTZ)."""
    terms = terms.astype(np.float32)
    acc = np.zeros((terms.shape[0], terms.shape[2]), np.float32)
    with np.errstate(all="ignore"):
        for k in range(terms.shape[1]):
            acc = acc + terms[:, k, :]
            acc = np.where((acc != 0) & (np.abs(acc) < TINY), np.copysign(np.float32(0), acc), acc)
    return acc


def definition_mm(a, b):
    return sequential_ftz(pam(a.double().numpy()[:, :, None], b.double().numpy()[None], F32))


def grad_terms(d, q, other):
    """dC · sign(q) · 2^(E_q + c), c the carry of mant(q) + mant(other); flush below
    2^-126, inf at 2^128; q zero -> dC·0; q inf/NaN -> PAM(q, dC); dC subnormal -> 0.
    mant(other) is its 23-bit fraction field (0 for zeros; for inf/NaN, whose own
    gradient entry this is, the field as stored, as both implementations do)."""
    d, q, other = np.broadcast_arrays(d, q, other)
    with np.errstate(all="ignore"):
        qn = np.isfinite(q) & (np.abs(q) >= TINY)
        eq, mq = split(np.where(qn, q, 1.0))
        ob = other.astype(np.float32).view(np.int32)
        mo = np.where((ob & 0x7FFFFFFF) >= 0x00800000, ob & 0x7FFFFF, 0) / 2.0 ** 23
        c = (mq + mo >= 1.0).astype(np.int64)
        dd = np.where(np.abs(d) < TINY, np.copysign(0.0, d), d)
        t = np.ldexp(dd, eq.astype(np.int64) + c)
        t = np.where(np.abs(t) < TINY, np.copysign(0.0, t), t)
        t = np.where(np.abs(t) >= 2.0 ** 128, np.copysign(np.inf, t), t)
        t = np.where(np.signbit(q), -t, t)
        t = np.where(qn, t, dd * 0.0)
        return np.where(np.isfinite(q), t, pam(q, d, F32))


def definition_grad_a(a, b, dc):
    A, B, D = a.double().numpy(), b.double().numpy(), dc.double().numpy()
    # sum over j of term(D[i,j], B[k,j], A[i,k]) -> arrange the summed index in axis 1
    T = grad_terms(D[:, None, :], B[None, :, :], A[:, :, None])  # (M, K, N)
    return sequential_ftz(T.transpose(0, 2, 1))  # (M, N, K) -> sum over N


def definition_grad_b(a, b, dc):
    A, B, D = a.double().numpy(), b.double().numpy(), dc.double().numpy()
    T = grad_terms(D.T[None, :, :], A.T[:, None, :], B[:, :, None])  # (K, N, M)
    return sequential_ftz(T.transpose(0, 2, 1))  # sum over M


def assert_bits(out, want):
    """Every non-NaN result bit for bit (signed zeros included), NaN where NaN."""
    got = out.numpy()
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan), "NaN positions differ"
    diff = (got.view(np.int32) != want.view(np.int32)) & ~nan
    assert not diff.any(), f"{int(diff.sum())} entries differ, e.g. {got[diff][:3]} vs {want[diff][:3]}"


def test_forward_modes_bit_for_bit(ext):
    """F0 adds integer sums of patterns, FZ too over the normal entries of A's rows (a zero
    term leaves a sum from +0 unchanged), FZT over B's columns; FB/FA/FAB multiply them by an exact 1.0 or 0.0
    in an FMA (a select); FG by +-1.0 or 0.0 (sign and select), with the clamped pattern
    giving inf on overflow and DAZ reading subnormal patterns as zero."""
    g = torch.Generator().manual_seed(3)
    M, K, N = 13, 300, 37
    cases = [
        (F0, rand_vals((M, K), g), rand_vals((K, N), g)),
        (FZT, rand_vals((M, K), g), rand_vals((K, N), g, zeros=0.3)),
        # products from 2^-126: partial sums flush to -0 and zero terms' signs show; the
        # masked modes, since skipping zero terms (FZ, FZT) is exact only from 2^-103
        (FA, rand_vals((M, K), g, -63, -61, zeros=0.3), rand_vals((K, N), g, -63, -61)),
        (FB, rand_vals((M, K), g, -63, -61), rand_vals((K, N), g, -63, -61, zeros=0.3)),
        (FAB, rand_vals((M, K), g, -63, -61, zeros=0.3), rand_vals((K, N), g, -63, -61, zeros=0.3)),
        (FZ, rand_vals((M, K), g, zeros=0.3), rand_vals((K, N), g)),
        (FZ, rand_vals((M, K), g, zeros=0.2, specials=0.01), rand_vals((K, N), g)),
        (FAB, rand_vals((M, K), g, zeros=0.3), rand_vals((K, N), g, zeros=0.3)),
        (FAB, rand_vals((M, K), g, zeros=0.2, specials=0.01), rand_vals((K, N), g, zeros=0.2, specials=0.01)),
        (FG, rand_vals((M, K), g, -90, 30, 0.2), rand_vals((K, N), g, -90, 30, 0.2)),  # underflow, FTZ sums
        (FG, rand_vals((M, K), g, 40, 127, 0.1), rand_vals((K, N), g, 40, 127, 0.1)),  # overflow to inf
        (FG, rand_vals((M, K), g, -127, 127, 0.2, 0.01), rand_vals((K, N), g, -127, 127, 0.2, 0.01)),
    ]
    a, b = (x.clone() for x in next(c for c in cases if c[0] == FAB)[1:])
    a[0] = -0.0  # a row of zero products: +0, never -0
    cases.append((FAB, a, b))
    for mode, a, b in cases:
        want = definition_mm(a, b)
        out = ext.pam_mm(a, b, -1)
        assert ext.last_mode() == mode
        assert_bits(out, want)
        assert_bits(ext.pam_mm(a, b, 1), want)  # forced FG
        assert_bits(ext.pam_mm(a, b, 0), want)  # portable scalar path
        if mode in (FZ, FZT):  # zeros of A (B) skipped; path 2 masks them instead (FA, FB)
            assert_bits(ext.pam_mm(a, b, 2), want)
            assert ext.last_mode() == (FA if mode == FZ else FB)
    assert (ext.pam_mm(a, b, -1)[0].view(torch.int32) == 0).all()


def test_small_batch_lanes_bit_for_bit(ext):
    """SB: 8 small matrices of a batch in the vector lanes, each entry an accumulator over k;
    zeros (masked in an FMA by 1.0 / 0.0) in A, in B and in both; products near 2^-126 without
    zeros (flushed partial sums); transposed operands; a partial group of 8. Each matrix
    against the definition; groups with inf/NaN or possible underflow with zeros go through
    the 2-D modes, also against the definition."""
    g = torch.Generator().manual_seed(8)
    nb, M, K, N = 11, 9, 17, 10
    cases = [
        (SB, rand_vals((nb, M, K), g), rand_vals((nb, K, N), g)),
        (SB, rand_vals((nb, M, K), g, zeros=0.3), rand_vals((nb, K, N), g)),
        (SB, rand_vals((nb, M, K), g), rand_vals((nb, K, N), g, zeros=0.3)),
        (SB, rand_vals((nb, M, K), g, zeros=0.3), rand_vals((nb, K, N), g, zeros=0.3)),
        (SB, rand_vals((nb, M, K), g, -63, -61), rand_vals((nb, K, N), g, -63, -61)),
        (None, rand_vals((nb, M, K), g, -63, -61, zeros=0.3), rand_vals((nb, K, N), g, -63, -61)),
        (None, rand_vals((nb, M, K), g, zeros=0.2, specials=0.01), rand_vals((nb, K, N), g, zeros=0.2)),
    ]
    for mode, a, b in cases:
        for x, y in ((a, b), (a.transpose(1, 2).contiguous().transpose(1, 2), b.transpose(1, 2).contiguous().transpose(1, 2))):
            out = ext.pam_bmm(x, y, -1)
            assert (ext.last_mode() == SB) == (mode == SB)
            for i in range(nb):
                assert_bits(out[i], definition_mm(x[i], y[i]))


BIG = 1.5 * 2.0 ** 127  # two of them overflow float32
INF, NAN = float("inf"), float("nan")


def _t(rows):
    return torch.tensor(rows, dtype=F32)


# Each case: args, the definition, and the wanted special entries. The vector kernels defer
# the inf operands' terms; the finite terms BIG + BIG overflow to +inf. In k order an earlier
# -inf term gives -inf (-inf + BIG = -inf); a -inf after the overflow gives NaN.
INF_ORDER_CASES = {
    # rows of a: terms -inf, BIG, BIG and BIG, BIG, -inf (inf in a)
    "pam_mm a": ((_t([[-INF, BIG, BIG], [BIG, BIG, -INF]]), torch.ones(3, 1)), definition_mm),
    # columns of b: the same terms, inf in b
    "pam_mm b": ((torch.ones(1, 3), _t([[-INF, BIG], [BIG, BIG], [BIG, -INF]])), definition_mm),
    # dA[0, k] = sum_j term(dC[0, j], B[k, j]): PAM(-inf, 1), BIG·2^0, BIG·2^0, 1·2^0 and
    # 1·2^0, BIG·2^0, BIG·2^0, PAM(-inf, 1)
    "pam_mm_exact_grad_a": ((torch.ones(1, 2), _t([[-INF, 1, 1, 1], [1, 1, 1, -INF]]),
                             _t([[1, BIG, BIG, 1]])), definition_grad_a),
    # dB[k, 0] = sum_i term(dC[i, 0], A[i, k]): the same terms, the inf in a
    "pam_mm_exact_grad_b": ((_t([[-INF, 1], [1, 1], [1, 1], [1, -INF]]), torch.ones(2, 1),
                             _t([[1], [BIG], [BIG], [1]])), definition_grad_b),
}


@pytest.mark.parametrize("case", list(INF_ORDER_CASES))
def test_inf_operand_before_an_overflowing_sum(ext, case):
    args, definition = INF_ORDER_CASES[case]
    want = definition(*args)
    assert want.ravel()[0] == -INF and np.isnan(want.ravel()[1])
    fn = getattr(ext, case.split()[0])
    assert_bits(fn(*args, 0), want)  # the scalar path follows k order
    assert_bits(fn(*args, 1), want)  # forced FG / unfused
    assert_bits(fn(*args, -1), want)
    assert ext.last_mode() != 100  # the vector path ran
    # batched: the case, then with its last argument negated (+inf first, and NaN)
    bfn = getattr(ext, case.split()[0].replace("pam_mm", "pam_bmm"))
    stacked = [torch.stack([x, x]) for x in args[:-1]] + [torch.stack([args[-1], -args[-1]])]
    want_neg = definition(*[x[1] for x in stacked])
    assert want_neg.ravel()[0] == INF and np.isnan(want_neg.ravel()[1])
    out = bfn(*stacked, -1)
    assert_bits(out[0], want)
    assert_bits(out[1], want_neg)


def test_inf_operands_with_overflow_bit_for_bit(ext):
    """Small random products whose values (±BIG, ±2, ±1, ±0.5, 0, ±inf, NaN) overflow
    finite sums and products next to inf operands on both sides, in every position:
    every entry point and path equals the k-order definition."""
    g = torch.Generator().manual_seed(5)
    vals = _t([BIG, -BIG, 2, -2, 1, -1, 0.5, 0, INF, -INF, NAN])
    weights = torch.tensor([4, 4, 1, 1, 1, 1, 1, 1, 1, 1, 0.2])

    def draw(*shape):
        return vals[torch.multinomial(weights, int(np.prod(shape)), True, generator=g)].reshape(shape)

    for _ in range(40):
        M, K, N = (int(v) for v in torch.randint(1, 7, (3,), generator=g))
        a, b, dc = draw(M, K), draw(K, N), draw(M, N)
        dc = torch.where(dc.isinf(), torch.ones(()), dc)  # dC and q both inf: the scalar route only
        for fn, definition, args in ((ext.pam_mm, definition_mm, (a, b)),
                                     (ext.pam_mm_exact_grad_a, definition_grad_a, (a, b, dc)),
                                     (ext.pam_mm_exact_grad_b, definition_grad_b, (a, b, dc))):
            want = definition(*args)
            for path in (-1, 1, 0):
                assert_bits(fn(*args, path), want)
        stacked = (torch.stack([a, -a]), torch.stack([b, b]), torch.stack([dc, -dc]))
        for fn, definition, n in ((ext.pam_bmm, definition_mm, 2),
                                  (ext.pam_bmm_exact_grad_a, definition_grad_a, 3),
                                  (ext.pam_bmm_exact_grad_b, definition_grad_b, 3)):
            out = fn(*stacked[:n], -1)
            for i in range(2):
                assert_bits(out[i], definition(*[x[i] for x in stacked[:n]]))


def test_exact_grads_bit_for_bit(ext):
    """The power of two sign(q)·2^(E_q+c) is built as a float from integer pattern
    arithmetic and applied by vmulps (flush/inf like exponent arithmetic under FTZ/DAZ),
    or by an FMA only where no term can overflow or underflow (then the product is exact
    and fusing changes nothing)."""
    g = torch.Generator().manual_seed(12)
    M, K, N = 19, 45, 23
    for lo, hi, kind, spec in ((-20, 20, FUSED, 0.0), (-100, 60, UNFUSED, 0.0),
                               (-120, 120, UNFUSED, 0.0), (-20, 20, FUSED, 0.02)):
        a = rand_vals((M, K), g, lo, hi, zeros=0.1, specials=spec)
        b = rand_vals((K, N), g, lo, hi, zeros=0.1, specials=spec)
        dc = rand_vals((M, N), g, lo, hi, zeros=0.1)
        for fn, definition in ((ext.pam_mm_exact_grad_a, definition_grad_a),
                               (ext.pam_mm_exact_grad_b, definition_grad_b)):
            want = definition(a, b, dc)
            out = fn(a, b, dc, -1)
            assert ext.last_mode() == kind
            assert_bits(out, want)
            assert_bits(fn(a, b, dc, 1), want)  # unfused
            assert_bits(fn(a, b, dc, 0), want)  # scalar


def test_float_multiplies_are_only_the_documented_ones(built):
    """Disassemble the built library: in the pamtorch kernels, float multiplies and FMAs
    occur only in the forward modes FB/FA/FAB/FG and SB with zeros (FMA by 0, ±1) and the exact-gradient
    kernels (FMA when fused, vmulps otherwise, by ±2^k); F0 and the elementwise kernels
    have none; nothing divides or takes a square root (docs/numerics.md)."""
    import re

    import platform

    objdump = shutil.which("objdump")
    if objdump is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs objdump and an x86-64 build (the AVX2 kernels)")
    asm = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", str(built[2])],
                         capture_output=True, text=True, check=True).stdout
    arith = re.compile(r"v?(mul|div|sqrt|rcp|rsqrt)(ps|pd|ss|sd)$|vf(n?m)(add|sub)")
    found = {}
    fn = None
    for line in asm.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            fn = m.group(1)
            continue
        fields = line.split("\t")
        if fn is None or len(fields) < 2 or not fields[1].split():
            continue
        ins = fields[1].split()[0]
        if arith.match(ins) and ("pa_ew::" in fn or "(anonymous namespace)::" in fn):
            found.setdefault(fn, set()).add(ins)
    assert found, "no FMA found at all: is this the AVX2 build?"
    for fn, ins in found.items():
        assert not any(re.match(r"v?(div|sqrt|rcp|rsqrt)", i) for i in ins), (fn, ins)
        assert "pa_ew::" not in fn, (fn, ins)
        if re.search(r"\bfwd_\w+<[1-4],", fn):
            assert all(i.startswith("vfmadd") for i in ins), (fn, ins)
        elif re.search(r"\bsb_(compute|block)<", fn) and "true" in fn:  # SB with zeros: FMA by 1.0 / 0.0
            assert all(i.startswith("vfmadd") for i in ins), (fn, ins)
        elif re.search(r"\beg_\w+<true,", fn):
            assert all(i.startswith("vfmadd") for i in ins), (fn, ins)
        elif re.search(r"\beg_\w+<false,", fn):
            assert ins == {"vmulps"}, (fn, ins)
        else:
            raise AssertionError(f"undocumented float multiply in {fn}: {sorted(ins)}")
