"""The PA arithmetic against the float64 reference, on random bit patterns and specials."""
import math

import pytest
import torch

import pamtorch
import reference as R
from pamtorch import arith

N = 1_000_000


@pytest.fixture(params=["float32", "float32-torch", "bfloat16", "float16"])
def dtype(request, monkeypatch):
    """Each dtype; float32 twice: the compiled CPU kernels and the pure-torch implementation."""
    if request.param.endswith("-torch"):
        monkeypatch.setattr(arith, "_COMPILED", False)
    return getattr(torch, request.param.split("-")[0])


def random_patterns(n, dtype, seed):
    """Uniform random bit patterns: every exponent, sign, NaN payload and subnormal."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.float32:
        p = torch.randint(-2 ** 31, 2 ** 31, (n,), generator=g, dtype=torch.int64).to(torch.int32)
        return p.view(torch.float32)
    p = torch.randint(-2 ** 15, 2 ** 15, (n,), generator=g, dtype=torch.int32).to(torch.int16)
    return p.view(dtype)


def specials(dtype):
    fi = torch.finfo(dtype)
    tiny, big = fi.tiny, fi.max
    vals = [0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.0, tiny, -tiny, big, -big,
            tiny / 2, -tiny / 4, tiny * 1.5, big / 1.5, 2.0, 0.5, 1.9999, 1.0001, 3.0]
    t = torch.tensor(vals, dtype=torch.float64).to(dtype)
    # values next to the underflow and overflow boundaries of a product or quotient
    emax = R.FORMATS[dtype][1]
    e = torch.arange(-emax - 3, emax + 3, dtype=torch.float64)
    edge = torch.cat([torch.exp2(e), torch.exp2(e) * 1.75, -torch.exp2(e) * 1.25]).to(dtype)
    return torch.cat([t, edge])


def key(x):
    """Monotonic integer key of a float's pattern: adjacent floats differ by 1."""
    f = arith.fmt(x.dtype)
    neg, mag = arith._split(x, f)
    return torch.where(neg, -mag, mag)


def assert_close_ulps(out, ref, ulps):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    nan_o, nan_r = torch.isnan(out), torch.isnan(ref)
    assert torch.equal(nan_o, nan_r), f"NaN mismatch at {torch.nonzero(nan_o ^ nan_r)[:5].flatten().tolist()}"
    d = (key(out) - key(ref)).abs()
    d = torch.where(nan_o, torch.zeros_like(d), d)
    worst = int(d.max()) if d.numel() else 0
    if worst > ulps:
        i = int(d.argmax())
        raise AssertionError(f"{worst} ulps apart at {i}: got {out[i].item()!r}, want {ref[i].item()!r}")


def binary_inputs(dtype, seed):
    a = random_patterns(N, dtype, seed)
    b = random_patterns(N, dtype, seed + 1)
    s = specials(dtype)
    sa, sb = torch.meshgrid(s, s, indexing="ij")
    return torch.cat([a, sa.flatten()]), torch.cat([b, sb.flatten()])


@pytest.mark.parametrize("op,ref", [(pamtorch.mul, R.pam), (pamtorch.div, R.pad)], ids=["mul", "div"])
def test_binary_bit_exact(op, ref, dtype):
    a, b = binary_inputs(dtype, 1)
    out = op(a, b)
    want = R.round_to(ref(R.to_f64(a), R.to_f64(b), dtype), dtype)
    assert_close_ulps(out, want, 0)
    # signs of zeros and infinities are part of the result
    z = (out == 0) | torch.isinf(out)
    assert torch.equal(torch.signbit(out[z]), torch.signbit(want[z]))


def unary_inputs(dtype, seed):
    return torch.cat([random_patterns(N, dtype, seed), specials(dtype)])


UNARY = [
    ("log2", pamtorch.log2, R.palog2),
    ("exp", pamtorch.exp, R.exp),
    ("log", pamtorch.log, R.log),
    ("sqrt", pamtorch.sqrt, R.sqrt),
    ("rsqrt", pamtorch.rsqrt, R.rsqrt),
    ("reciprocal", pamtorch.reciprocal, R.reciprocal),
]


@pytest.mark.parametrize("name,op,ref", UNARY, ids=[u[0] for u in UNARY])
def test_unary_within_one_ulp(name, op, ref, dtype):
    x = unary_inputs(dtype, 7)
    assert_close_ulps(op(x), R.round_to(ref(R.to_f64(x), dtype), dtype), 1)


def test_exp2_within_one_ulp(dtype):
    # random patterns are mostly huge; add a dense sweep of the interesting range
    x = torch.cat([unary_inputs(dtype, 3),
                   torch.linspace(-160, 160, 200_001, dtype=torch.float64).to(dtype)])
    assert_close_ulps(pamtorch.exp2(x), R.round_to(R.paexp2(R.to_f64(x), dtype), dtype), 1)


@pytest.mark.parametrize("p", [2, 3, 0.5, -1, -0.5, 1 / 3, 0, 1, -2, 2.5])
def test_pow_within_one_ulp(p, dtype):
    x = torch.cat([random_patterns(200_000, dtype, 11), specials(dtype)])
    assert_close_ulps(pamtorch.pow(x, p), R.round_to(R.pow(R.to_f64(x), p, dtype), dtype), 1)


def test_reciprocal_and_mul_are_exact_identities():
    x = torch.tensor([1.0, 2.0, 0.25, -8.0])
    assert torch.equal(pamtorch.mul(x, 1.0), x)
    assert torch.equal(pamtorch.reciprocal(x), torch.tensor([1.0, 0.5, 4.0, -0.125]))
    assert torch.equal(pamtorch.sqrt(torch.tensor([4.0, 16.0, 0.25])), torch.tensor([2.0, 4.0, 0.5]))


def test_special_value_rules():
    inf, nan = math.inf, math.nan
    sub = torch.finfo(torch.float32).tiny / 4
    a = torch.tensor([sub, inf, -inf, 0.0, -3.0, 2.0, nan])
    b = torch.tensor([inf, 0.0, 2.0, -0.0, 0.0, nan, 1.0])
    out = pamtorch.mul(a, b)
    assert torch.isnan(out[0]) and torch.isnan(out[1])          # subnormal × inf, inf × 0
    assert out[2] == -inf
    assert out[3] == 0 and torch.signbit(out[3])                # zeros keep the xor sign
    assert out[4] == 0 and torch.signbit(out[4])
    assert torch.isnan(out[5]) and torch.isnan(out[6])
    q = pamtorch.div(torch.tensor([1.0, 0.0, inf, 1.0, -2.0]), torch.tensor([0.0, 0.0, inf, inf, 0.0]))
    assert q[0] == inf and torch.isnan(q[1]) and torch.isnan(q[2])
    assert q[3] == 0 and q[4] == -inf
    assert pamtorch.log(torch.tensor(0.0)) == -inf
    assert torch.isnan(pamtorch.log(torch.tensor(-1.0)))
    assert pamtorch.exp2(torch.tensor(200.0)) == inf and pamtorch.exp2(torch.tensor(-200.0)) == 0
    big = torch.finfo(torch.float32).max
    assert pamtorch.mul(torch.tensor(big), torch.tensor(2.0)) == inf    # overflow is inf, not NaN
    assert pamtorch.mul(torch.tensor(1e-30), torch.tensor(1e-30)) == 0   # underflow flushes


def test_offset_compensation():
    g = torch.Generator().manual_seed(0)
    a = 1 + torch.rand(100_000, generator=g)
    b = 1 + torch.rand(100_000, generator=g)
    plain = (pamtorch.mul(a, b) / (a * b) - 1).mean().item()
    comp = (pamtorch.mul(a, b, offset=1.0552) / (a * b) - 1).mean().item()
    assert -0.045 < plain < -0.035
    assert abs(comp) < 0.005
    assert torch.equal(pamtorch.mul(a, b, offset=1.0552),
                       arith.pam(arith.pam(a, b), torch.tensor(1.0552)))


def test_pam_relative_error_bounds(dtype):
    x = random_patterns(200_000, dtype, 5)
    y = random_patterns(200_000, dtype, 6)
    fi = torch.finfo(dtype)
    ok = torch.isfinite(x) & torch.isfinite(y) & (x.abs() >= fi.tiny) & (y.abs() >= fi.tiny)
    x, y = x[ok], y[ok]
    exact = x.double() * y.double()
    keep = (exact.abs() > fi.tiny * 4) & (exact.abs() < fi.max / 4)
    rel = (pamtorch.mul(x, y).double()[keep] / exact[keep]) - 1
    assert rel.max() <= 0 and rel.min() >= -1 / 9 - 1e-12


# ---------------------------------------------------------------------------
# input handling

def test_python_numbers_and_promotion():
    x = torch.tensor([1.5, 2.0], dtype=torch.bfloat16)
    assert pamtorch.mul(x, 3).dtype == torch.bfloat16
    assert pamtorch.mul(2.0, x).dtype == torch.bfloat16
    assert pamtorch.mul(x, torch.tensor([1.0, 1.0])).dtype == torch.float32
    out = pamtorch.mul(1.5, 1.5)
    assert out.dim() == 0 and out.item() == 2.0
    assert pamtorch.div(3.0, torch.tensor(1.5)).item() == 2.0


def test_empty_noncontiguous_broadcast_zero_dim():
    assert pamtorch.mul(torch.empty(0, 3), torch.empty(3)).shape == (0, 3)
    a = torch.randn(4, 6)[:, ::2]
    b = torch.randn(6, 4).t()[:, ::2]
    assert not a.is_contiguous()
    assert torch.equal(pamtorch.mul(a, b), pamtorch.mul(a.contiguous(), b.contiguous()))
    c = pamtorch.mul(torch.randn(3, 1), torch.randn(1, 5))
    assert c.shape == (3, 5)
    assert pamtorch.exp(torch.tensor(0.0)).item() == 1.0
    assert pamtorch.sqrt(a.t()).shape == (3, 4)


def test_bad_inputs_get_clear_errors():
    with pytest.raises(TypeError, match="int64.*supported dtypes"):
        pamtorch.mul(torch.arange(3), 2.0)
    with pytest.raises(TypeError, match="complex"):
        pamtorch.exp(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="float64"):
        pamtorch.div(torch.zeros(2, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match=r"\(3,\) and \(4,\)"):
        pamtorch.mul(torch.zeros(3), torch.zeros(4))
    with pytest.raises(TypeError, match="tensor or a real Python number"):
        pamtorch.mul("2", torch.zeros(1))
    with pytest.raises(TypeError, match="Python number"):
        pamtorch.pow(torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="derivative"):
        pamtorch.mul(torch.ones(1), 1.0, derivative="exactly")
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="different devices"):
            pamtorch.mul(torch.ones(2, device="cuda"), torch.ones(2))
    meta = torch.ones(2, device="meta")
    with pytest.raises(RuntimeError, match="different devices"):
        pamtorch.mul(meta, torch.ones(2))
