"""The compiled float32 elementwise kernels and batched matmul entries against the pure-torch
implementations they port (bit for bit), which test_arith checks against the reference."""
import math

import pytest
import torch

from pamtorch import arith, kernels
from pamtorch.kernels import cpu

EXT = cpu.load_extension()
pytestmark = pytest.mark.skipif(EXT is None, reason="compiled CPU kernels unavailable")


def patterns(n, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(-2 ** 31, 2 ** 31, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    vals = [0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.0, 2.0 ** -126, -(2.0 ** -126), 2.0 ** -149,
            3.4028234e38, -3.4028234e38, 0.5, 1.5, 88.0, -88.0, 89.0, -104.0, 1e-30, 7.0]
    s = torch.tensor(vals, dtype=torch.float32)
    # values where exp/log are interesting, plus random bits across every exponent
    dense = torch.linspace(-120, 120, 20001, dtype=torch.float32)
    return torch.cat([p.view(torch.float32), s, dense])


def torch_path(fn, *args):
    old = arith._COMPILED
    arith._COMPILED = False
    try:
        return fn(*args)
    finally:
        arith._COMPILED = old


def same_bits(x, y):
    assert x.dtype == y.dtype == torch.float32 and x.shape == y.shape
    bad = x.view(torch.int32) != y.view(torch.int32)
    assert not bad.any(), f"{int(bad.sum())} differ, first at {bad.flatten().nonzero()[:3].flatten().tolist()}"


@pytest.mark.parametrize("name", ["pam", "pad"])
def test_binary_matches_torch_implementation(name):
    fn = getattr(arith, name)
    a, b = patterns(400_000, 1), patterns(400_000, 2)
    s = patterns(0, 0)  # every special against every special
    sa, sb = torch.meshgrid(s[:20], s[:20], indexing="ij")
    a, b = torch.cat([a, sa.flatten()]), torch.cat([b, sb.flatten()])
    same_bits(fn(a, b), torch_path(fn, a, b))


@pytest.mark.parametrize("name", ["pa_exp", "pa_log", "pa_sqrt", "pa_rsqrt"])
def test_unary_matches_torch_implementation(name):
    fn = getattr(arith, name)
    x = patterns(400_000, 3)
    same_bits(fn(x), torch_path(fn, x))


@pytest.mark.parametrize("p", [2.0, 3.0, -1.0, -2.0, 0.5, -0.5, 1.0, 1.5, -2.5, 7.0, 1e-3, 1e10, -1e10, 2.0 ** 60,
                               -(2.0 ** 60) - 2 ** 8, math.inf, -math.inf, math.nan])
def test_pow_matches_torch_implementation(p):
    """The compiled PA pow on random bit patterns across every exponent and the specials,
    for integer (even, odd, huge), fractional, infinite and NaN exponents."""
    x = patterns(100_000, 5)
    same_bits(arith.pa_pow(x, p), torch_path(arith.pa_pow, x, p))
    y = x[:120_000].view(100, -1).t()[::3]   # strided
    same_bits(arith.pa_pow(y, p), torch_path(arith.pa_pow, y, p))


def test_broadcast_strides_zero_dim_and_empty():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 70, generator=g)
    row = torch.randn(6, 1, generator=g)
    for a, b in [(x.t(), row.t()), (x, torch.tensor(3.0)), (torch.tensor(-0.5), x[:, ::3]),
                 (torch.empty(0, 3), torch.ones(3))]:
        for name in ("pam", "pad"):
            fn = getattr(arith, name)
            same_bits(fn(a, b), torch_path(fn, a, b))
    same_bits(arith.pa_exp(x.t()[::2]), torch_path(arith.pa_exp, x.t()[::2]))


def test_other_dtypes_and_mixed_operands_take_the_torch_path():
    a = torch.randn(5, dtype=torch.bfloat16)
    assert arith.pam(a, a).dtype == torch.bfloat16
    assert arith._ext(torch.ones(2), torch.ones(2, dtype=torch.float64)) is None
    assert arith._ext(torch.ones(2, dtype=torch.float16)) is None


def test_extension_rejects_bad_operands_with_a_clear_error():
    with pytest.raises(RuntimeError, match="'b' must be float32"):
        EXT.ew_pam(torch.ones(2), torch.ones(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="must be float32"):
        EXT.ew_exp(torch.ones(2, dtype=torch.int32))
    with pytest.raises(RuntimeError):
        EXT.ew_pad(torch.ones(2, 3), torch.ones(4))  # shapes do not broadcast


@pytest.mark.parametrize("B,M,K,N", [(64, 12, 16, 12), (3, 200, 120, 90), (1, 5, 7, 3), (9, 33, 17, 1)])
def test_batched_entries_equal_the_per_matrix_kernels(B, M, K, N):
    g = torch.Generator().manual_seed(B * 1000 + M)
    a = torch.randn(B, M, K, generator=g)
    b = torch.randn(K, B, N, generator=g).transpose(0, 1)  # strided batch
    dc = torch.randn(B, M, N, generator=g)
    a[0, 0, 0] = math.inf
    a[-1, -1, 0] = 0.0
    same_bits(kernels.pam_bmm(a, b), torch.stack([cpu.pam_mm(a[i], b[i]) for i in range(B)]))
    same_bits(kernels.pam_bmm_exact_grad_a(a, b, dc),
              torch.stack([cpu.pam_mm_exact_grad_a(a[i], b[i], dc[i]) for i in range(B)]))
    same_bits(kernels.pam_bmm_exact_grad_b(a, b, dc),
              torch.stack([cpu.pam_mm_exact_grad_b(a[i], b[i], dc[i]) for i in range(B)]))


def test_batched_entries_validate():
    with pytest.raises(ValueError, match="cannot be batch-multiplied"):
        cpu.pam_bmm(torch.ones(2, 3, 4), torch.ones(3, 4, 5))
    with pytest.raises(ValueError, match="3-D"):
        cpu.pam_bmm(torch.ones(3, 4), torch.ones(4, 5))
    with pytest.raises(TypeError, match="float32"):
        cpu.pam_bmm(torch.ones(2, 3, 4, dtype=torch.float64), torch.ones(2, 4, 5))
    with pytest.raises(ValueError, match="dc must have shape"):
        cpu.pam_bmm_exact_grad_a(torch.ones(2, 3, 4), torch.ones(2, 4, 5), torch.ones(2, 3, 4))
    assert cpu.pam_bmm(torch.ones(0, 3, 4), torch.ones(0, 4, 5)).shape == (0, 3, 5)


def test_exact_exp_derivative_matches_torch_implementation():
    import pamtorch

    x = torch.cat([patterns(300_000, 5), torch.linspace(-150, 150, 30001)])
    g = torch.cat([patterns(300_000, 6), torch.randn(30001, generator=torch.Generator().manual_seed(7))])

    def grad():
        xx = x.clone().requires_grad_()
        pamtorch.exp(xx, derivative="exact").backward(g)
        return xx.grad

    same_bits(grad(), torch_path(grad))
    with pytest.raises(RuntimeError, match="'g' must be float32"):
        EXT.ew_exp_exact_grad(x, x, x.double())


def test_batched_entries_without_the_extension_use_the_fallback(monkeypatch):
    g = torch.Generator().manual_seed(11)
    a, b, dc = torch.randn(3, 6, 5, generator=g), torch.randn(3, 5, 4, generator=g), torch.randn(3, 6, 4, generator=g)
    want = (cpu.pam_bmm(a, b), cpu.pam_bmm_exact_grad_a(a, b, dc), cpu.pam_bmm_exact_grad_b(a, b, dc))
    monkeypatch.setattr(cpu, "load_extension", lambda: None)
    got = (cpu.pam_bmm(a, b), cpu.pam_bmm_exact_grad_a(a, b, dc), cpu.pam_bmm_exact_grad_b(a, b, dc))
    for x, y in zip(got, want):
        same_bits(x, y)
