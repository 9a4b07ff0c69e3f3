"""Property tests (hypothesis) of the elementwise PA ops against the float64 reference,
and the edge cases of the public functions: pow's gradient at zero and its IEEE special
values, conv2d's argument checks.

The hypothesis examples are bit patterns: any pattern of the dtype (every exponent, sign,
subnormal and NaN payload) mixed with the special values, so shrinking lands on the
simplest failing pattern. Runs are derandomized: the same examples on every machine.
"""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import pamtorch
import reference as R
from pamtorch import arith

PROPS = settings(derandomize=True, max_examples=60, deadline=None, database=None)

BITS = {torch.float32: 32, torch.bfloat16: 16, torch.float16: 16}
VIEW = {32: torch.int32, 16: torch.int16}


@pytest.fixture(params=["float32", "float32-torch", "bfloat16", "float16"])
def dtype(request, monkeypatch):
    """Each dtype; float32 twice: the compiled CPU kernels and the pure-torch implementation."""
    if request.param.endswith("-torch"):
        monkeypatch.setattr(arith, "_COMPILED", False)
    return getattr(torch, request.param.split("-")[0])


def special_patterns(dtype):
    """Bit patterns of ±0, ±inf, NaN, ±1, the smallest normal and largest finite, the
    largest subnormal, 2 and 1.5."""
    fi = torch.finfo(dtype)
    vals = [0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.0, fi.tiny, -fi.tiny, fi.max, -fi.max,
            2.0, 1.5, -0.75]
    t = torch.tensor(vals, dtype=torch.float64).to(dtype)
    sub = (torch.tensor(fi.tiny, dtype=dtype).view(VIEW[BITS[dtype]]) - 1).view(dtype).reshape(1)
    mask = (1 << BITS[dtype]) - 1
    return [p & mask for p in torch.cat([t, sub, -sub]).view(VIEW[BITS[dtype]]).tolist()]


def patterns(dtype):
    """Strategy: one unsigned bit pattern of ``dtype``, special values preferred."""
    bits = BITS[dtype]
    return st.one_of(st.sampled_from(special_patterns(dtype)), st.integers(0, (1 << bits) - 1))


def tensor_of(pats, dtype):
    bits = BITS[dtype]
    signed = [p - (1 << bits) if p >= 1 << (bits - 1) else p for p in pats]
    return torch.tensor(signed, dtype=VIEW[bits]).view(dtype)


def key(x):
    """Monotonic integer key of a float's pattern: adjacent floats differ by 1."""
    f = arith.fmt(x.dtype)
    neg, mag = arith._split(x, f)
    return torch.where(neg, -mag, mag)


def assert_ulps(out, want, ulps):
    assert out.dtype == want.dtype and out.shape == want.shape
    assert torch.equal(torch.isnan(out), torch.isnan(want)), (out, want)
    ok = ~torch.isnan(out)
    d = (key(out[ok]) - key(want[ok])).abs()
    assert d.numel() == 0 or int(d.max()) <= ulps, (out, want)
    if ulps == 0:  # signed zeros and infinities are part of the result
        z = ok & ((want == 0) | torch.isinf(want))
        assert torch.equal(torch.signbit(out[z]), torch.signbit(want[z])), (out, want)


def vectors(dtype, n=2):
    return st.lists(st.tuples(*[patterns(dtype)] * n), min_size=1, max_size=48)


# bit-exact ops: 0 ulps, as tests/test_arith.py; the rounded composites: 1 ulp (docs/numerics.md)
BINARY = [("mul", pamtorch.mul, R.pam, 0), ("div", pamtorch.div, R.pad, 0)]
UNARY = [
    ("exp2", pamtorch.exp2, R.paexp2, 1),
    ("log2", pamtorch.log2, R.palog2, 1),
    ("exp", pamtorch.exp, R.exp, 1),
    ("log", pamtorch.log, R.log, 1),
    ("sqrt", pamtorch.sqrt, R.sqrt, 1),
    ("rsqrt", pamtorch.rsqrt, R.rsqrt, 1),
    ("reciprocal", pamtorch.reciprocal, R.reciprocal, 0),
]


@pytest.mark.parametrize("name,op,ref,ulps", BINARY, ids=[b[0] for b in BINARY])
def test_binary_ops_match_the_reference_on_any_bit_patterns(name, op, ref, ulps, dtype):
    @PROPS
    @given(vectors(dtype))
    def check(pairs):
        a = tensor_of([p for p, _ in pairs], dtype)
        b = tensor_of([q for _, q in pairs], dtype)
        want = R.round_to(ref(R.to_f64(a), R.to_f64(b), dtype), dtype)
        assert_ulps(op(a, b), want, ulps)
        # the product is symmetric in its operands, bit for bit
        if name == "mul":
            assert_ulps(op(b, a), want, 0)
    check()


@pytest.mark.parametrize("name,op,ref,ulps", UNARY, ids=[u[0] for u in UNARY])
def test_unary_ops_match_the_reference_on_any_bit_patterns(name, op, ref, ulps, dtype):
    @PROPS
    @given(vectors(dtype, 1))
    def check(singles):
        x = tensor_of([p for (p,) in singles], dtype)
        assert_ulps(op(x), R.round_to(ref(R.to_f64(x), dtype), dtype), ulps)
    check()


@pytest.mark.parametrize("name,op,ref,ulps", UNARY, ids=[u[0] for u in UNARY])
def test_unary_ops_match_the_reference_on_the_values_of_their_range(name, op, ref, ulps, dtype):
    """Random patterns are mostly huge or tiny; here values within ±2^8 (exp2, exp) or
    positive values of every binade (the others), where the functions are not saturated."""
    lo, hi = (-256.0, 256.0) if name in ("exp2", "exp") else (2.0 ** -20, 2.0 ** 20)

    @PROPS
    @given(st.lists(st.floats(lo, hi, width=32), min_size=1, max_size=48))
    def check(vals):
        x = torch.tensor(vals, dtype=torch.float64).to(dtype)
        assert_ulps(op(x), R.round_to(ref(R.to_f64(x), dtype), dtype), ulps)
    check()


# ---------------------------------------------------------------------------
# pow: the gradient at zero and subnormals (issue 10 item 3), the IEEE special values
# (item 15)

def tiny_inputs(dtype):
    """0, -0, a subnormal, and normals around 1, as a leaf that wants a gradient."""
    sub = torch.finfo(dtype).tiny / 4
    return torch.tensor([0.0, -0.0, sub, -sub, 1.5, 0.75, -2.0], dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["approx", "exact"])
@pytest.mark.parametrize("p", [1, 2, 3, 2.5, 1.5])
def test_pow_gradient_is_finite_at_zero_and_subnormals(p, kind, dtype):
    x = tiny_inputs(dtype)
    if p != int(p):
        x = x.abs()  # a non-integer power of a negative number is NaN, and so its gradient
    x.requires_grad_(True)
    g = torch.tensor([1.25, -1.25, 1.5, 0.75, 1.0, 1.0, 1.0], dtype=dtype)
    pamtorch.pow(x, p, derivative=kind).backward(g)
    assert torch.isfinite(x.grad).all(), x.grad
    # PA treats subnormals as zero: the derivative there is p·0^(p-1) dy, i.e. 0 for p > 1
    # and dy itself for p = 1, bit for bit
    want0 = g[:4] if p == 1 else torch.zeros(4, dtype=dtype)
    assert torch.equal(x.grad[:4], want0)


@pytest.mark.parametrize("p", [2, 3, 2.5, -1.5])
def test_pow_approx_gradient_is_p_times_pow_p_minus_one(p):
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(1000, generator=g) * 8 + 2.0 ** -8).requires_grad_(True)
    dy = torch.randn(1000, generator=g)
    pamtorch.pow(x, p, derivative="approx").backward(dy)
    # written from the math in float64: (p ·̂ x^(p-1)) ·̂ dy with the reference PA pow/PAM
    xp = R.round_to(R.pow(R.to_f64(x), p - 1, torch.float32), torch.float32)
    inner = R.round_to(R.pam(p, R.to_f64(xp), torch.float32), torch.float32)
    want = R.round_to(R.pam(R.to_f64(inner), R.to_f64(dy), torch.float32), torch.float32)
    assert_ulps(x.grad, want, 1)


@pytest.mark.parametrize("p", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("kind", ["approx", "exact", "ste"])
def test_pow_with_an_infinite_or_nan_exponent_has_a_gradient(p, kind):
    x = torch.tensor([0.5, 2.0, 1.0, 3.0], requires_grad=True)
    pamtorch.pow(x, p, derivative=kind).sum().backward()
    # torch's rule: dy · p · x^(p-1), evaluated where it is defined
    want = torch.pow(x.detach(), p - 1) * p
    assert torch.equal(torch.isnan(x.grad), torch.isnan(want))
    assert torch.equal(x.grad[~torch.isnan(want)], want[~torch.isnan(want)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pow_special_values_follow_ieee(dtype):
    inf, nan = math.inf, math.nan
    x = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0, 0.5, -2.0, -0.5, 0.0, 1.0, -1.0, 2.0], dtype=dtype)
    p = [inf, inf, -inf, -inf, inf, inf, inf, inf, -inf, nan, nan, nan]
    got = [pamtorch.pow(x[i], p[i]).item() for i in range(len(p))]
    # C's pow: pow(±1, ±inf) = 1, pow(1, NaN) = 1, |x| < 1 or > 1 to ±inf gives 0 or inf
    want = [math.pow(float(x[i]), p[i]) for i in range(len(p))]
    assert [str(v) for v in got] == [str(v) for v in want]


# ---------------------------------------------------------------------------
# conv2d's arguments (issue 10 item 13)

@pytest.mark.parametrize("kw,msg", [
    (dict(stride=0), "'stride' must be >= 1, got 0"),
    (dict(stride=(1, 0)), r"'stride' must be >= 1, got \(1, 0\)"),
    (dict(dilation=0), "'dilation' must be >= 1, got 0"),
    (dict(padding=-1), "'padding' must be >= 0, got -1"),
    (dict(padding=(0, -2)), r"'padding' must be >= 0, got \(0, -2\)"),
    (dict(stride=1.5), "'stride' must be an int or a pair of ints, got 1.5"),
    (dict(dilation=(1, 1, 1)), "'dilation' must be an int or a pair of ints"),
])
def test_conv2d_refuses_bad_stride_padding_dilation_with_a_value_error(kw, msg):
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with pytest.raises(ValueError, match="pamtorch.conv2d: " + msg):
        pamtorch.conv2d(x, w, **kw)


def test_conv2d_accepts_the_smallest_valid_arguments():
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    out = pamtorch.conv2d(x, w, stride=(1, 2), padding=0, dilation=1)
    assert out.shape == torch.nn.functional.conv2d(x, w, stride=(1, 2)).shape
