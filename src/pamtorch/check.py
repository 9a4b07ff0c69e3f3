"""``pamtorch check``: measured error of every PA op, the kernel status and a self-test.

For each op and dtype it prints the mean, min and max relative error against exact
float64 arithmetic on random inputs (log-uniform magnitudes, random signs), then which
CPU kernels run (compiled C++ with AVX2/FMA or the scalar path, or the pure-torch
fallback and why; the cache directory; any stale lock or broken library it repaired),
then checks that the matrix-product kernel picked for this machine agrees with the
elementwise PAM.
"""
from __future__ import annotations

import math

import torch

from . import arith

__all__ = ["error_table", "kernel_status_lines", "kernel_self_test", "run_check"]

# (name, PA function, exact float64 function, domain [lo, hi) of |x| (powers of two,
# within float16's range for every result), signed?)
_OPS = [
    ("mul", lambda a, b: arith.pam(a, b), lambda a, b: a * b, (2.0 ** -4, 2.0 ** 4), True),
    ("mul offset=1.0552", lambda a, b: arith.pam(arith.pam(a, b), torch.tensor(1.0552, dtype=a.dtype)),
     lambda a, b: a * b, (2.0 ** -4, 2.0 ** 4), True),
    ("div", lambda a, b: arith.pad(a, b), lambda a, b: a / b, (2.0 ** -4, 2.0 ** 4), True),
    ("exp2", lambda x, _: arith.paexp2(x), lambda x, _: torch.exp2(x), (2.0 ** -4, 8.0), True),
    ("exp", lambda x, _: arith.pa_exp(x), lambda x, _: torch.exp(x), (2.0 ** -4, 4.0), True),
    ("log2", lambda x, _: arith.palog2(x), lambda x, _: torch.log2(x), (2.0, 2.0 ** 8), False),
    ("log", lambda x, _: arith.pa_log(x), lambda x, _: torch.log(x), (2.0, 2.0 ** 8), False),
    ("sqrt", lambda x, _: arith.pa_sqrt(x), lambda x, _: torch.sqrt(x), (2.0 ** -8, 2.0 ** 8), False),
    ("rsqrt", lambda x, _: arith.pa_rsqrt(x), lambda x, _: torch.rsqrt(x), (2.0 ** -8, 2.0 ** 8), False),
    ("reciprocal", lambda x, _: arith.pa_reciprocal(x), lambda x, _: 1 / x, (2.0 ** -8, 2.0 ** 8), True),
    ("pow p=3", lambda x, _: arith.pa_pow(x, 3), lambda x, _: x ** 3, (2.0 ** -3, 2.0 ** 3), True),
]


def _inputs(n, lo, hi, signed, g):
    """±2^E (1+M) with E uniform on [log2 lo, log2 hi) and M uniform on [0, 1)."""
    e = torch.randint(int(math.log2(lo)), int(math.log2(hi)), (n,), generator=g).double()
    mag = torch.exp2(e) + torch.ldexp(torch.rand(n, generator=g, dtype=torch.float64), e)
    if signed:
        mag = torch.where(torch.rand(n, generator=g) < 0.5, -mag, mag)
    return mag


def error_table(n: int = 200_000, seed: int = 0) -> list[dict]:
    """Relative error statistics of each PA op against exact arithmetic."""
    rows = []
    for dtype in arith.SUPPORTED_DTYPES:
        for name, pa, exact, (lo, hi), signed in _OPS:
            g = torch.Generator().manual_seed(seed)
            a = _inputs(n, lo, hi, signed, g).to(dtype)
            b = _inputs(n, lo, hi, signed, g).to(dtype)
            got = pa(a, b).double()
            want = exact(a.double(), b.double())
            rel = got / want - 1
            rel = rel[torch.isfinite(rel)]
            rows.append(dict(op=name, dtype=str(dtype).replace("torch.", ""),
                             mean=rel.mean().item(), min=rel.min().item(), max=rel.max().item()))
    return rows


def kernel_status_lines(st: dict | None = None) -> list[str]:
    """Human-readable lines for :func:`pamtorch.kernels.cpu.status` (computed when None)."""
    if st is None:
        from .kernels import cpu

        st = cpu.status()
    if st["backend"] == "torch":
        lines = ["CPU kernels (matmul and elementwise): pure-torch fallback, "
                 f"because {st['reason'] or 'the compiled kernels are not loaded'}",
                 f"  cache: {st['cache_dir']}"]
    else:
        path = "AVX2/FMA" if st["backend"] == "avx2+fma" else "portable scalar"
        lines = [f"CPU kernels (matmul and elementwise): compiled C++, {path} path",
                 f"  library: {st['library']} (size and sha256 verified before loading)"]
    lines += [f"  repaired: {e}" for e in st["events"]]
    return lines


def kernel_self_test(seed: int = 0) -> list[dict]:
    """The matrix-product kernels on this machine against elementwise PAM sums in float64."""
    from . import kernels

    g = torch.Generator().manual_seed(seed)
    m, k, n = 37, 129, 53
    a = torch.randn(m, k, generator=g)
    b = torch.randn(k, n, generator=g)
    dc = torch.randn(m, n, generator=g)
    prods = arith.pam(a[:, :, None], b[None, :, :]).double()
    ref = prods.sum(1)
    tol = k * torch.finfo(torch.float32).eps * prods.abs().sum(1) + 1e-30
    results = []
    out = kernels.pam_mm(a, b).double()
    results.append(dict(kernel="pam_mm", backend=kernels.backend_name(a.device),
                        ok=bool(((out - ref).abs() <= tol).all()),
                        max_err=(out - ref).abs().max().item()))
    # exact grad_a: sum_j dC[i,j] · sign(B) 2^(E_B + c), by exponent arithmetic elementwise
    e_b = arith.exponent(b)[None].expand(m, k, n)
    carry = ((arith.mantissa_field(a)[:, :, None] + arith.mantissa_field(b)[None]) >> 23).to(torch.int32)
    terms = arith.scale_pow2(dc[:, None, :].expand(m, k, n).contiguous(), e_b + carry,
                             torch.signbit(b)[None].expand(m, k, n))
    ref_ga = terms.double().sum(2)
    tol_ga = n * torch.finfo(torch.float32).eps * terms.double().abs().sum(2) + 1e-30
    ga = kernels.pam_mm_exact_grad_a(a, b, dc).double()
    results.append(dict(kernel="pam_mm_exact_grad_a", backend=kernels.backend_name(a.device),
                        ok=bool(((ga - ref_ga).abs() <= tol_ga).all()),
                        max_err=(ga - ref_ga).abs().max().item()))
    return results


def run_check(n: int = 200_000) -> int:
    """Print the error table and the kernel self-test; return a process exit code."""
    print(f"pamtorch check: relative error of PA ops against exact arithmetic ({n} random inputs each)")
    print()
    print(f"| {'op':<18} | {'dtype':<8} | {'mean':>9} | {'min':>9} | {'max':>9} |")
    print(f"|{'-' * 20}|{'-' * 10}|{'-' * 11}|{'-' * 11}|{'-' * 11}|")
    for r in error_table(n):
        print(f"| {r['op']:<18} | {r['dtype']:<8} | {r['mean']:>+8.3%} | {r['min']:>+8.3%} | {r['max']:>+8.3%} |")
    print()
    for line in kernel_status_lines():
        print(line)
    ok = True
    for r in kernel_self_test():
        status = "agrees" if r["ok"] else "DISAGREES"
        ok &= r["ok"]
        print(f"kernel {r['kernel']} [{r['backend']}] {status} with the elementwise reference "
              f"(max abs error {r['max_err']:.3g})")
    return 0 if ok else 1
