"""Narrow mantissas (issue 11, point 5): ``mantissa_bits=k`` rounds the operands and the
result of each PA op to k mantissa bits, ties to even, on the bit pattern.

The reference rounding is float64 math: |x| = m·2^e (``np.frexp``, m in [1/2, 1)), then
m·2^(k+1) rounded half to even (``np.round``) and scaled back; zeros and subnormals become
signed zero (PA arithmetic's zero), inf and NaN pass through, and a carry past the largest
binade is inf.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pamtorch
import reference as R
from pamtorch import arith
from pamtorch.config import Config, OpConfig

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def ref_round(x, k, dtype):
    """x (float64 array of ``dtype`` values) rounded to k mantissa bits, as float64."""
    x = np.asarray(x, np.float64)
    tiny, emax, mbits = R.FORMATS[dtype]
    with np.errstate(all="ignore"):
        m, e = np.frexp(np.abs(x))
        r = np.ldexp(np.round(np.ldexp(m, k + 1)), e - k - 1)
        r = np.where(r >= R._over(emax), np.inf, r)
        out = np.where(np.isfinite(x), np.copysign(r, x), x)
        out = np.where(np.isfinite(x) & (np.abs(x) < tiny), np.copysign(0.0, x), out)
    return out


def random_patterns(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.float32:
        return torch.randint(-2 ** 31, 2 ** 31, (n,), generator=g, dtype=torch.int64).to(torch.int32).view(dtype)
    return torch.randint(-2 ** 15, 2 ** 15, (n,), generator=g, dtype=torch.int32).to(torch.int16).view(dtype)


def same(got, want):
    """Bit-equal as float64 values (NaN matching NaN, signed zeros checked)."""
    got, want = got.double(), torch.as_tensor(np.asarray(want), dtype=torch.float64)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(torch.where(nan, 0.0, got), torch.where(nan, 0.0, want))
    assert torch.equal(torch.signbit(got[~nan]), torch.signbit(want[~nan]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rounding_matches_the_float64_reference(dtype):
    x = random_patterns(200_000, dtype, 1)
    # ties and carries: values exactly half way between k-bit neighbours, all-ones mantissas
    halves = torch.tensor([1 + 2.0 ** -5, 1 + 3 * 2.0 ** -5, 1.9999, 1.96875, 1.984375, 3.0],
                          dtype=torch.float64).to(dtype)
    x = torch.cat([x, halves, -halves, torch.tensor([torch.finfo(dtype).max], dtype=dtype)])
    x64 = R.to_f64(x)
    for k in range(1, R.FORMATS[dtype][2] + 1):
        same(arith.round_mantissa(x, k), ref_round(x64, k, dtype))


def test_k23_is_the_identity_and_k7_is_bfloat16():
    x = random_patterns(500_000, torch.float32, 2)
    normal = torch.isfinite(x) & (x.abs() >= torch.finfo(torch.float32).tiny)
    assert torch.equal(arith.round_mantissa(x, 23)[normal].view(torch.int32), x[normal].view(torch.int32))
    assert torch.equal(arith.round_mantissa(x, 23)[~normal & torch.isfinite(x)],
                       torch.zeros_like(x)[~normal & torch.isfinite(x)])
    r7 = arith.round_mantissa(x, 7)
    bf = x.to(torch.bfloat16).float()
    assert torch.equal(r7[normal], bf[normal])
    assert torch.equal(torch.isnan(r7), torch.isnan(x))
    # every dtype's own width is the identity on its normal values
    for dtype in (torch.bfloat16, torch.float16):
        y = random_patterns(60_000, dtype, 3)
        ok = torch.isfinite(y) & (y.abs() >= torch.finfo(dtype).tiny)
        assert torch.equal(arith.round_mantissa(y, R.FORMATS[dtype][2])[ok], y[ok])
        assert torch.equal(arith.round_mantissa(y, 23)[ok], y[ok])


def test_rounding_leaves_inf_and_nan_and_flushes_subnormals():
    x = torch.tensor([math.inf, -math.inf, math.nan, 1e-40, -1e-40, 0.0, -0.0])
    r = arith.round_mantissa(x, 3)
    assert r[0] == math.inf and r[1] == -math.inf and torch.isnan(r[2])
    assert torch.equal(r[3:].view(torch.int32), torch.tensor([0, -2 ** 31, 0, -2 ** 31], dtype=torch.int32))


# ---------------------------------------------------------------------------
# the PA ops with mantissa_bits

def _values(n, seed, lo=-8, hi=8, positive=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.ldexp(1 + torch.rand(n, generator=g, dtype=torch.float64),
                    torch.randint(lo, hi, (n,), generator=g))
    if not positive:
        x = torch.where(torch.rand(n, generator=g) < 0.5, -x, x)
    return x


@pytest.mark.parametrize("k", [3, 5, 7, 10])
@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_ops_round_operands_and_result(dtype, k):
    a, b = _values(20_000, 1).to(dtype), _values(20_000, 2).to(dtype)
    pos = _values(20_000, 3, positive=True).to(dtype)
    small = (_values(20_000, 4, -4, 3)).to(dtype)
    a64, b64, p64, s64 = (R.to_f64(t) for t in (a, b, pos, small))
    ra, rb, rp, rs = (ref_round(t, k, dtype) for t in (a64, b64, p64, s64))

    def rk(v):  # the result rounded to the dtype, then to k bits
        return ref_round(R.to_f64(R.round_to(v, dtype)), k, dtype)

    same(pamtorch.mul(a, b, mantissa_bits=k), rk(R.pam(ra, rb, dtype)))
    same(pamtorch.div(a, b, mantissa_bits=k), rk(R.pad(ra, rb, dtype)))
    same(pamtorch.exp(small, mantissa_bits=k), rk(R.exp(rs, dtype)))
    same(pamtorch.log(pos, mantissa_bits=k), rk(R.log(rp, dtype)))
    same(pamtorch.sqrt(pos, mantissa_bits=k), rk(R.sqrt(rp, dtype)))
    same(pamtorch.rsqrt(pos, mantissa_bits=k), rk(R.rsqrt(rp, dtype)))
    same(pamtorch.reciprocal(a, mantissa_bits=k), rk(R.reciprocal(ra, dtype)))
    same(pamtorch.pow(small, 3, mantissa_bits=k), rk(R.pow(rs, 3, dtype)))
    # PAM of k-bit operands is already k-bit: the result rounding changes nothing
    assert torch.equal(pamtorch.mul(a, b, mantissa_bits=k),
                       arith.pam(arith.round_mantissa(a, k), arith.round_mantissa(b, k)))


def test_mantissa_with_offset_rounds_the_offset_too():
    a, b = _values(10_000, 5).float(), _values(10_000, 6).float()
    for k in (3, 5):
        al = float(arith.round_mantissa(torch.tensor(1.0552), k))
        got = pamtorch.mul(a, b, offset=1.0552, mantissa_bits=k)
        assert torch.equal(got, arith.pam(arith.round_mantissa(a, k), arith.round_mantissa(b, k), al))
        assert torch.equal(arith.round_mantissa(got, k), got)  # k-bit terms, no rounding needed


@pytest.mark.parametrize("k", [3, 5, 7])
def test_matmul_terms_are_the_rounded_elementwise_products(k):
    """Operands (and α) rounded to k bits, PAM terms, float32 accumulation in k order."""
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(6, 20, generator=g), torch.randn(20, 9, generator=g)
    for offset in (None, 1.0552):
        terms = pamtorch.mul(a[:, :, None], b[None], offset=offset, mantissa_bits=k)
        acc = torch.zeros(6, 9)
        for t in terms.unbind(1):
            acc += t
        got = pamtorch.matmul(a, b, offset=offset, mantissa_bits=k)
        assert torch.equal(got, acc)
        assert not torch.equal(arith.round_mantissa(got, k), got)  # the sum keeps float32


@pytest.mark.parametrize("derivative", ["approx", "exact"])
@pytest.mark.parametrize("k", [3, 5])
def test_both_derivative_kinds_give_finite_k_bit_gradients(derivative, k):
    g = torch.Generator().manual_seed(8)
    a = torch.randn(5, 7, generator=g).requires_grad_()
    b = torch.randn(7, 4, generator=g).requires_grad_()
    p = (torch.rand(5, 7, generator=g) + 0.5).requires_grad_()
    ops = [
        lambda: pamtorch.mul(a, p, mantissa_bits=k, derivative=derivative),
        lambda: pamtorch.div(a, p, mantissa_bits=k, derivative=derivative),
        lambda: pamtorch.exp(a, mantissa_bits=k, derivative=derivative),
        lambda: pamtorch.log(p, mantissa_bits=k, derivative=derivative),
        lambda: pamtorch.sqrt(p, mantissa_bits=k, derivative=derivative),
        lambda: pamtorch.pow(a, 2, mantissa_bits=k, derivative=derivative),
    ]
    for f in ops:
        for t in (a, p):
            t.grad = None
        f().sum().backward()
        for t in (a, p):
            if t.grad is not None:
                assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
                assert torch.equal(arith.round_mantissa(t.grad, k), t.grad)
    a.grad = b.grad = None
    pamtorch.matmul(a, b, mantissa_bits=k, derivative=derivative).pow(2).sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_rounded_gradients_follow_the_rounded_operands():
    """The exact derivative of mul at k bits is that of PAM at the rounded operands."""
    g = torch.Generator().manual_seed(9)
    a, b, gy = torch.randn(1000, generator=g), torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    x = a.clone().requires_grad_()
    pamtorch.mul(x, b, mantissa_bits=4, derivative="exact").backward(gy)
    xr = arith.round_mantissa(a, 4).requires_grad_()
    pamtorch.mul(xr, arith.round_mantissa(b, 4), derivative="exact").backward(arith.round_mantissa(gy, 4))
    assert torch.equal(x.grad, arith.round_mantissa(xr.grad, 4))


# ---------------------------------------------------------------------------
# under the mode

def test_mode_rounds_every_kind():
    k = 5
    cfg = Config.full().with_mantissa_bits(k)
    assert all(cfg.kind(n).mantissa_bits == k for n in ("matmul", "softmax", "norm", "loss"))
    g = torch.Generator().manual_seed(10)
    x, y, w = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(8, 3, generator=g)
    with pamtorch.mode(cfg):
        prod, quot, mm = x * y, x / y, x @ w
        outs = [torch.softmax(x, -1), F.layer_norm(x, (8,)), F.gelu(x), torch.exp(x),
                F.cross_entropy(x, torch.tensor([0, 1, 2, 3]))]
    assert torch.equal(prod, pamtorch.mul(x, y, mantissa_bits=k))
    assert torch.equal(quot, pamtorch.div(x, y, mantissa_bits=k))
    assert torch.equal(mm, pamtorch.matmul(x, w, mantissa_bits=k))
    for o in outs:
        assert torch.equal(arith.round_mantissa(o, k), o)
    # the exact-derivative function routes round at their boundary too
    with pamtorch.mode(cfg.with_derivative("exact")):
        xe = x.clone().requires_grad_()
        out = F.layer_norm(xe, (8,))
        out.sum().backward()
    assert torch.equal(arith.round_mantissa(out, k), out)
    assert torch.isfinite(xe.grad).all()


def _train(cfg, steps=60):
    torch.manual_seed(0)
    X = torch.randn(256, 16)
    y = (X @ torch.randn(16, 3)).argmax(1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    with pamtorch.mode(cfg):
        for _ in range(steps):
            loss = F.cross_entropy(model(X), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    with torch.no_grad():
        acc = (model(X).argmax(1) == y).float().mean().item()
    return losses, acc


@pytest.mark.parametrize("derivative", ["approx", "exact"])
def test_a_tiny_model_trains_with_five_mantissa_bits(derivative):
    losses, acc = _train(Config.full().with_derivative(derivative).with_mantissa_bits(5))
    assert losses[-1] < 0.1 * losses[0] and acc > 0.9
    assert all(math.isfinite(v) for v in losses)
    assert float(arith.round_mantissa(torch.tensor(losses[0]), 5)) == losses[0]  # a 5-bit loss
    full, _ = _train(Config.full().with_derivative(derivative), steps=3)
    assert full[:3] != losses[:3]


# ---------------------------------------------------------------------------
# errors

def test_mantissa_bits_errors():
    x = torch.ones(3)
    for bad in (0, 24, -1):
        with pytest.raises(ValueError, match="mantissa_bits must be between 1 and 23"):
            pamtorch.mul(x, x, mantissa_bits=bad)
        with pytest.raises(ValueError, match="mantissa_bits must be between 1 and 23"):
            Config.full().with_mantissa_bits(bad)
    for bad in (2.5, True, "5"):
        with pytest.raises(TypeError, match="mantissa_bits must be an int"):
            OpConfig(mantissa_bits=bad)
    with pytest.raises(ValueError, match="need pa=True"):
        OpConfig(pa=False, mantissa_bits=5)
    with pytest.raises(ValueError, match="mantissa_bits"):
        pamtorch.matmul(torch.ones(2, 2), torch.ones(2, 2), mantissa_bits=30)
    # a config's exact kinds stay exact: with_mantissa_bits touches the PA kinds only
    cfg = Config.matmul_only().with_mantissa_bits(5)
    assert cfg.matmul.mantissa_bits == 5 and cfg.norm.mantissa_bits is None and not cfg.norm.pa
    assert Config.full().with_mantissa_bits(5).with_mantissa_bits(None) == Config.full()
