"""The two derivative kinds: approx equals its formula, exact equals finite differences."""
import numpy as np
import pytest
import torch

import pamtorch
import reference as R
from pamtorch import arith

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def values(n, dtype, seed, lo=-6, hi=6, positive=False):
    """Normal values of random sign and exponent, mantissa uniform in [0, 1)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randint(lo, hi, (n,), generator=g).double()
    m = torch.rand(n, generator=g, dtype=torch.float64)
    s = torch.ones(n, dtype=torch.float64) if positive else torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return (s * torch.exp2(e) * (1 + m)).to(dtype)


def grads(fn, *xs, g=None, kind):
    xs = [x.clone().requires_grad_(True) for x in xs]
    out = fn(*xs, derivative=kind)
    out.backward(torch.ones_like(out) if g is None else g)
    return [x.grad for x in xs]


def slope(fn, xs, i, dtype):
    """Central finite difference of fn in argument i with a power-of-two step, and a mask
    of the points where fn is affine across the step (five collinear samples) and the
    slope is a normal number of ``dtype``."""
    x = xs[i].double()
    e = torch.floor(torch.log2(x.abs()))
    h = torch.exp2(e - (8 if dtype == torch.float32 else 4))  # x ± h, x ± h/2 are exact

    def at(v):
        args = list(xs)
        args[i] = v.to(dtype)
        return fn(*args).double()

    pts = [at(x + k * h / 2) for k in (-2, -1, 0, 1, 2)]
    d = [pts[k + 1] - pts[k] for k in range(4)]
    affine = (d[0] == d[1]) & (d[1] == d[2]) & (d[2] == d[3]) & torch.isfinite(pts[0]) & torch.isfinite(pts[4])
    want = (pts[4] - pts[0]) / (2 * h)
    affine &= (want.abs() >= torch.finfo(dtype).tiny) & (want.abs() <= torch.finfo(dtype).max)
    return want, affine


BINARY = [("mul", pamtorch.mul), ("div", pamtorch.div)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,op", BINARY, ids=[b[0] for b in BINARY])
def test_binary_exact_matches_finite_differences(name, op, dtype):
    a = values(4000, dtype, 1)
    b = values(4000, dtype, 2)
    ga, gb = grads(op, a, b, kind="exact")
    for i, got in enumerate((ga, gb)):
        want, affine = slope(lambda x, y: op(x, y), [a, b], i, dtype)
        assert affine.float().mean() > 0.5, "too few points inside one affine piece"
        assert torch.equal(got.double()[affine], want[affine])


def test_mul_exact_matches_formula():
    a = values(100_000, torch.float32, 3)
    b = values(100_000, torch.float32, 4)
    g = values(100_000, torch.float32, 5)
    ga, _ = grads(pamtorch.mul, a, b, g=g, kind="exact")
    ea, ma = R.split(R.to_f64(a))
    eb, mb = R.split(R.to_f64(b))
    c = (ma + mb >= 1).astype(np.float64)
    want = np.sign(R.to_f64(b)) * np.ldexp(1.0, (eb + c).astype(np.int64)) * R.to_f64(g)
    assert np.array_equal(R.to_f64(ga), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_approx_matches_formula(dtype):
    a = values(10_000, dtype, 6)
    b = values(10_000, dtype, 7)
    g = values(10_000, dtype, 8)
    ga, gb = grads(pamtorch.mul, a, b, g=g, kind="approx")
    assert torch.equal(ga, arith.pam(b, g)) and torch.equal(gb, arith.pam(a, g))
    ga, gb = grads(pamtorch.div, a, b, g=g, kind="approx")
    y = arith.pad(a, b)
    assert torch.equal(ga, arith.pad(g, b))
    assert torch.equal(gb, -arith.pad(arith.pam(g, y), b))


UNARY = [
    ("exp2", pamtorch.exp2, dict(lo=0, hi=4)),
    ("log2", pamtorch.log2, dict(positive=True)),
    ("exp", pamtorch.exp, dict(lo=-4, hi=4)),
    ("log", pamtorch.log, dict(positive=True)),
    ("sqrt", pamtorch.sqrt, dict(positive=True)),
    ("rsqrt", pamtorch.rsqrt, dict(positive=True)),
    ("reciprocal", pamtorch.reciprocal, dict()),
    ("pow3", lambda x, **k: pamtorch.pow(x, 3, **k), dict(lo=-3, hi=3)),
    ("pow-half", lambda x, **k: pamtorch.pow(x, -0.5, **k), dict(positive=True)),
]


ROUNDED = ("exp", "log", "log2", "pow3", "pow-half")  # outputs rounded once from float64


# bfloat16's 8-bit outputs are too coarse for a finite difference of an op that rounds
CASES = [(u, d) for u in UNARY for d in (torch.float32, torch.bfloat16)
         if d == torch.float32 or u[0] not in ROUNDED]


@pytest.mark.parametrize("case,dtype", CASES, ids=[f"{u[0]}-{d}" for u, d in CASES])
def test_unary_exact_matches_finite_differences(case, dtype):
    name, op, kw = case
    x = values(4000, dtype, 9, **kw)
    (gx,) = grads(op, x, kind="exact")
    want, affine = slope(lambda v: op(v), [x], 0, dtype)
    assert affine.float().mean() > 0.3, "too few points inside one affine piece"
    # composite ops round their output once, so the measured slope carries that rounding
    rel = ((gx.double() - want) / want).abs()[affine]
    tol = 2.0 ** -12 if name in ROUNDED else 0
    assert rel.max() <= tol, f"{name}: worst relative gap {rel.max().item():.3g}"


def test_unary_approx_matches_formula():
    x = values(10_000, torch.float32, 10, positive=True)
    g = values(10_000, torch.float32, 11)
    (gx,) = grads(pamtorch.exp, x, g=g, kind="approx")
    assert torch.equal(gx, arith.pam(arith.pa_exp(x), g))
    (gx,) = grads(pamtorch.log, x, g=g, kind="approx")
    assert torch.equal(gx, arith.pad(g, x))
    (gx,) = grads(pamtorch.sqrt, x, g=g, kind="approx")
    half = arith.pad(g, arith.pa_sqrt(x))
    assert torch.equal(gx, arith.scale_pow2(half, torch.tensor(-1)))
    (gx,) = grads(lambda v, **k: pamtorch.pow(v, 2.5, **k), x, g=g, kind="approx")
    assert torch.equal(gx, arith.pam(arith.pam(torch.tensor(2.5), arith.pa_pow(x, 1.5)), g))


def test_scoped_default_and_per_call_kind():
    a = torch.tensor([1.5, 1.25], requires_grad=True)
    b = torch.tensor([1.75, 1.25])
    with pamtorch.derivative("exact"):
        pamtorch.mul(a, b).sum().backward()
    assert a.grad.tolist() == [2.0, 1.0]   # 2^(E_b + c): c = 1 for 1.5·1.75, 0 for 1.25·1.25
    a.grad = None
    pamtorch.mul(a, b).sum().backward()
    assert torch.equal(a.grad, arith.pam(b, torch.ones(2)))
    a.grad = None
    with pamtorch.derivative("exact"):
        pamtorch.mul(a, b, derivative="approx").sum().backward()
    assert torch.equal(a.grad, arith.pam(b, torch.ones(2)))


def test_broadcast_gradients_are_summed():
    a = torch.randn(3, 1, requires_grad=True)
    b = torch.randn(1, 4, requires_grad=True)
    pamtorch.mul(a, b).sum().backward()
    assert a.grad.shape == (3, 1) and b.grad.shape == (1, 4)
    assert torch.equal(a.grad[:, 0], arith.pam(b.detach().expand(3, 4), torch.ones(3, 4)).sum(1))


def test_backward_runs_no_float_multiplication():
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            flat = torch.utils._pytree.tree_leaves((args, kwargs))
            if any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in flat):
                seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    a = torch.rand(8, requires_grad=True)
    b = torch.rand(8, requires_grad=True)
    for kind in ("approx", "exact"):
        with Spy():
            y = pamtorch.div(pamtorch.exp(pamtorch.mul(a, b, derivative=kind), derivative=kind),
                             pamtorch.sqrt(b, derivative=kind), derivative=kind)
            pamtorch.pow(y, 1.5, derivative=kind).sum().backward()
    floaty = {"mul", "div", "mm", "exp", "log", "sqrt", "rsqrt", "pow", "reciprocal", "addcmul", "addcdiv"}
    assert not floaty & set(seen), sorted(floaty & set(seen))
