"""Float64 references and comparison rules for the PAM matrix-product kernels.

Shared by tests/test_triton_interpret.py, tests/test_matmul.py and
benchmarks/gpu.py (which puts tests/ on sys.path), so every backend is held to
the same rule:

    |C - ref| <= K * eps32 * sum_k |product_k| + tiny          (finite entries)

with ``ref`` the float64 sum of the exact reference products (``reference.pam``), NaN
exactly where the reference is NaN and infinities of the same sign where it is infinite.
The exact-derivative reference is written from the formula: each term is
``PAM(dC, q)`` with ``q = sign(B) 2^(E_B + c)`` (a power of two, so PAM by it is the
exponent shift), or ``q = B`` itself where B is zero, subnormal, inf or NaN.
"""
import numpy as np
import torch

from reference import pam, split, to_f64

EPS32 = 2.0 ** -23
TINY32 = 2.0 ** -126

# unit roundoff of the output dtypes (the final cast rounds once more)
OUT_EPS = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
OUT_TINY = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -126, torch.float16: 2.0 ** -14}

_FMAX = {torch.float32: float(torch.finfo(torch.float32).max),
         torch.bfloat16: float(torch.finfo(torch.bfloat16).max),
         torch.float16: float(torch.finfo(torch.float16).max)}

_CHUNK = 1 << 22  # float64 elements of the product cube held at once


def _f32_bits(x64):
    return np.asarray(x64, np.float32).view(np.int32).astype(np.int64)


def _rows(m, per_row):
    return max(1, _CHUNK // max(1, per_row))


def mm_reference(a, b):
    """(sum_k PAM(a[i,k], b[k,j]), sum_k |PAM(...)|) in float64, for 2-D tensors."""
    a64, b64 = to_f64(a), to_f64(b)
    M, K = a64.shape
    N = b64.shape[1]
    ref = np.zeros((M, N))
    mag = np.zeros((M, N))
    step = _rows(M, K * N)
    with np.errstate(invalid="ignore"):
        for i in range(0, M, step):
            p = pam(a64[i:i + step, :, None], b64[None, :, :], torch.float32)
            ref[i:i + step] = p.sum(axis=1)
            mag[i:i + step] = np.abs(p).sum(axis=1)
    return ref, mag


def _carry(x64, y64):
    """c = [mant(x) + mant(y) >= 2^23] on float32 fields; zero/subnormal count as 0."""
    def mant(v):
        p = _f32_bits(v) & 0x7FFFFFFF
        return np.where(p < 0x00800000, 0, p & 0x7FFFFF)
    return (mant(x64) + mant(y64)) >= (1 << 23)


def exact_grad_a_terms(a64, b64, g64):
    """Terms T[i,k,j] of dA for row block a64[m,K], b64[K,N], g64[m,N]."""
    a3 = a64[:, :, None]
    b3 = b64[None, :, :]
    with np.errstate(all="ignore"):
        fin = np.isfinite(b3) & (np.abs(b3) >= TINY32)
        e, _ = split(np.where(fin, b3, 1.0))
        c = _carry(a3, b3)
        q = np.where(fin, np.copysign(np.ldexp(1.0, (e + c).astype(np.int64)), b3), b3)
        q = np.broadcast_to(q, np.broadcast_shapes(a3.shape, b3.shape))
        return pam(g64[:, None, :], q, torch.float32)


def exact_grad_a_reference(a, b, dc):
    """(dA, sum_j |term|) in float64 for C = a @PAM b and upstream dc."""
    a64, b64, g64 = to_f64(a), to_f64(b), to_f64(dc)
    M, K = a64.shape
    N = b64.shape[1]
    ref = np.zeros((M, K))
    mag = np.zeros((M, K))
    step = _rows(M, K * N)
    with np.errstate(invalid="ignore"):
        for i in range(0, M, step):
            t = exact_grad_a_terms(a64[i:i + step], b64, g64[i:i + step])
            ref[i:i + step] = t.sum(axis=2)
            mag[i:i + step] = np.abs(t).sum(axis=2)
    return ref, mag


def exact_grad_b_reference(a, b, dc):
    """(dB, sum_i |term|): the grad_a rule on transposes, dB^T = grad_a(B^T, A^T, dC^T)."""
    ref, mag = exact_grad_a_reference(b.t(), a.t(), dc.t())
    return ref.T, mag.T


def approx_grad_references(a, b, dc):
    """((dA, mag), (dB, mag)) for dA = dC @PAM B^T, dB = A^T @PAM dC."""
    return mm_reference(dc, b.t()), mm_reference(a.t(), dc)


def check_close(out, ref, mag, n_terms, dtype=torch.float32, what="result"):
    """Assert ``out`` (a tensor) matches the float64 ``ref`` under the module's rule.

    ``dtype``: the dtype ``out`` was produced in (a final cast adds its rounding).
    Returns the largest error relative to the allowed error (<= 1 passes).
    """
    o = to_f64(out)
    ref = np.asarray(ref, np.float64)
    assert o.shape == ref.shape, f"{what}: shape {o.shape} != reference {ref.shape}"
    nan_o, nan_r = np.isnan(o), np.isnan(ref)
    bad = np.argwhere(nan_o != nan_r)
    assert bad.size == 0, f"{what}: NaN mismatch at {bad[:5].tolist()} (got {o[tuple(bad[0])]}, " \
                          f"expected {ref[tuple(bad[0])]})"
    inf_r = np.isinf(ref)
    assert np.array_equal(o[inf_r], ref[inf_r]), f"{what}: infinities differ"
    fin = ~nan_r & ~inf_r
    with np.errstate(invalid="ignore", over="ignore"):
        tol = (n_terms * EPS32 * mag + TINY32 * max(n_terms, 1)
               + OUT_EPS[dtype] * np.abs(ref) + OUT_TINY[dtype])
        # a float32 sum of finite terms may overflow where the float64 sum is just finite
        ovf = fin & np.isinf(o) & (np.sign(o) == np.sign(ref)) & (np.abs(ref) + tol >= _FMAX[dtype])
        fin = fin & ~ovf
        err = np.abs(o - ref)
    assert np.isfinite(o[fin]).all(), f"{what}: non-finite value where reference is finite"
    ratio = np.where(fin, err / tol, 0.0)
    worst = float(ratio.max()) if ratio.size else 0.0
    if worst > 1.0:
        idx = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        raise AssertionError(f"{what}: error {err[idx]:.3g} > tolerance {tol[idx]:.3g} at "
                             f"{tuple(int(i) for i in idx)} (got {o[idx]!r}, expected {ref[idx]!r})")
    return worst


def special_matrix(shape, generator=None, frac=0.15):
    """Random float32 normals with a fraction of ±0, subnormals, ±inf and NaN mixed in."""
    x = torch.randn(shape, generator=generator)
    r = torch.rand(shape, generator=generator)
    vals = torch.tensor([0.0, -0.0, 1e-40, -3e-39, float("inf"), -float("inf"), float("nan")])
    pick = torch.randint(0, len(vals), shape, generator=generator)
    return torch.where(r < frac, vals[pick], x)


def sparse_specials(shape, generator=None):
    """Normals with a few zeros/subnormals, and a single inf and NaN (so most outputs
    stay finite and their values are still compared)."""
    x = torch.randn(shape, generator=generator)
    r = torch.rand(shape, generator=generator)
    x = torch.where(r < 0.1, torch.zeros(()), x)
    x = torch.where((r >= 0.1) & (r < 0.15), torch.full((), -1e-39), x)
    flat = x.view(-1)
    if flat.numel() >= 4:
        flat[1] = float("inf")
        flat[flat.numel() // 2] = -float("inf")
        flat[-2] = float("nan")
    return x
