"""PA activations (pamtorch.ops.activations): the forward against exact float64 math, the
approx backward against the exact derivative, the exact derivative against finite
differences, the constructions against tests/reference.py, and the dispatch mode end to end
with a spy that sees every aten op the mode runs."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import pamtorch
import reference as R
from pamtorch.config import Config, OpConfig
from pamtorch.mode import PASS_THROUGH
from pamtorch.ops import activations as A

SELU = (A._SELU_ALPHA, A._SELU_SCALE)

# name: (exact float64 function, PA forward, approx backward (dy, x) -> dx, input range,
#        forward (max, mean) abs error bound, backward (max, mean) abs error bound)
# The bounds are the measured errors of docs/nn.md, rounded up.
CASES = {
    "tanh": (torch.tanh, A.tanh_forward, lambda dy, x: A.tanh_backward(dy, A.tanh_forward(x)),
             8, (0.067, 0.0048), (0.076, 0.0070)),
    "sigmoid": (torch.sigmoid, A.sigmoid_forward,
                lambda dy, x: A.sigmoid_backward(dy, A.sigmoid_forward(x)), 8, (0.050, 0.0081),
                (0.040, 0.0062)),
    "silu": (F.silu, A.silu_forward, A.silu_backward, 8, (0.100, 0.0134), (0.101, 0.0215)),
    "softplus": (F.softplus, A.softplus_forward, A.softplus_backward, 8, (0.086, 0.0067),
                 (0.050, 0.0081)),
    "softplus_b2_t5": (lambda x: F.softplus(x, 2.0, 5.0), lambda x: A.softplus_forward(x, 2.0, 5.0),
                       lambda dy, x: A.softplus_backward(dy, x, 2.0, 5.0), 8, (0.043, 0.0017),
                       (0.050, 0.0041)),
    "mish": (F.mish, A.mish_forward, A.mish_backward, 8, (0.057, 0.0108), (0.068, 0.0090)),
    "hardswish": (F.hardswish, A.hardswish_forward, A.hardswish_backward, 8, (0.084, 0.0070),
                  (0.084, 0.0105)),
    "hardsigmoid": (F.hardsigmoid, A.hardsigmoid_forward, A.hardsigmoid_backward, 8,
                    (0.084, 0.0105), (0.021, 0.0079)),
    "leaky_relu": (lambda x: F.leaky_relu(x, 0.01), lambda x: A.leaky_relu_forward(x, 0.01),
                   lambda dy, x: A.leaky_relu_backward(dy, x, 0.01), 8, (0.0064, 0.0011),
                   (1e-7, 1e-8)),
    "elu": (F.elu, A.elu_forward, lambda dy, x: A.elu_backward(dy, 1.0, 1.0, 1.0, False, x), 8,
            (0.073, 0.0065), (0.073, 0.0065)),
    "elu_from_result": (F.elu, A.elu_forward,
                        lambda dy, x: A.elu_backward(dy, 1.0, 1.0, 1.0, True, A.elu_forward(x)), 8,
                        (0.073, 0.0065), (0.073, 0.0065)),
    "celu_0.5": (lambda x: F.celu(x, 0.5), lambda x: A.elu_forward(x, 0.5, 1.0, 2.0),
                 lambda dy, x: A.elu_backward(dy, 0.5, 1.0, 2.0, False, x), 8, (0.037, 0.0017),
                 (0.073, 0.0033)),
    "selu": (F.selu, lambda x: A.elu_forward(x, *SELU),
             lambda dy, x: A.elu_backward(dy, *SELU, 1.0, False, x), 8, (0.193, 0.0512),
             (0.073, 0.0073)),
    "logsigmoid": (F.logsigmoid, lambda x: A.log_sigmoid_forward(x)[0], A.log_sigmoid_backward, 8,
                   (0.086, 0.0067), (0.050, 0.0081)),
    "prelu": (lambda x: F.prelu(x, torch.tensor([0.25], dtype=x.dtype)),
              lambda x: A.prelu_forward(x, torch.tensor(0.25)),
              lambda dy, x: A.prelu_backward(dy, x, torch.tensor(0.25))[0], 8, (1e-7, 1e-8),
              (1e-7, 1e-8)),
    "erf": (torch.erf, A.erf_forward, lambda dy, x: A._erf_backward(dy, x, None), 5,
            (0.046, 0.0060), (0.065, 0.0118)),
    "sin": (torch.sin, A.sin_forward, lambda dy, x: pamtorch.arith.pam(dy, A.cos_forward(x)), 100,
            (0.0006, 0.0001), (0.0006, 0.0001)),
    "cos": (torch.cos, A.cos_forward, lambda dy, x: -pamtorch.arith.pam(dy, A.sin_forward(x)), 100,
            (0.0006, 0.0001), (0.0006, 0.0001)),
}


def _errors(got, ref):
    e = (got.double() - ref).abs()
    assert torch.isfinite(e).all()
    return e.max().item(), e.mean().item()


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_approx_backward_within_the_documented_error(name):
    exact, fwd, bwd, r, (fmax, fmean), (bmax, bmean) = CASES[name]
    x = torch.linspace(-r, r, 160001)
    x64 = x.double().requires_grad_()
    ref = exact(x64)
    emax, emean = _errors(fwd(x), ref.detach())
    assert emax <= fmax and emean <= fmean, (emax, emean)
    ref.sum().backward()
    emax, emean = _errors(bwd(torch.ones_like(x), x), x64.grad)
    assert emax <= bmax and emean <= bmean, (emax, emean)


def test_glu_forward_and_backward_within_the_documented_error():
    """GLU is a ⊙̂ σ(b): its error scales with |a|, so it is bounded relative to |a|."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 6, generator=g) * 3
    a = x[:, :3].abs().double()
    x64 = x.double().requires_grad_()
    ref = F.glu(x64, 1)
    rel = (A.glu_forward(x, 1).double() - ref.detach()).abs() / a
    assert rel.max() <= 0.075 and rel.mean() <= 0.013, (rel.max(), rel.mean())
    dy = torch.ones(4000, 3)
    ref.backward(dy.double())
    d = (A.glu_backward(dy, x, 1).double() - x64.grad).abs()
    da, db = d[:, :3], d[:, 3:] / a.clamp_min(1.0)
    assert da.max() <= 0.075 and db.max() <= 0.05, (da.max(), db.max())
    with pytest.raises(RuntimeError, match="must be even"):
        A.glu_forward(torch.randn(3, 5), 1)


def test_prelu_per_channel_weight_and_its_gradient():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 4, generator=g)
    w = torch.tensor([0.25, 0.5, 2.0])          # powers of two: PAM by them is exact
    xr = x.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    y = A.prelu(xr, wr)
    torch.testing.assert_close(y, F.prelu(x, w), rtol=0, atol=0)
    dy = torch.randn(5, 3, 4, generator=g)
    y.backward(dy)
    xt = x.clone().requires_grad_()
    F.prelu(xt, w).backward(dy)
    torch.testing.assert_close(xr.grad, xt.grad, rtol=0, atol=0)
    # dweight = Σ over x <= 0 of x ⊙̂ dy, the products from tests/reference.py
    terms = R.pam(x.double().numpy(), dy.double().numpy(), torch.float32) * (x.numpy() <= 0)
    np.testing.assert_allclose(wr.grad.double().numpy(), terms.sum((0, 2)), rtol=1e-6, atol=1e-6)


def test_saturation_and_special_values():
    inf, nan = math.inf, math.nan
    x = torch.tensor([-inf, -1e4, -100.0, 0.0, 100.0, 1e4, inf])
    assert torch.equal(A.tanh_forward(x), torch.tensor([-1.0, -1, -1, 0, 1, 1, 1]))
    assert torch.equal(A.sigmoid_forward(x), torch.tensor([0.0, 0, 0, 0.5, 1, 1, 1]))
    assert torch.equal(A.erf_forward(x), torch.tensor([-1.0, -1, -1, 0, 1, 1, 1]))
    assert torch.equal(A.softplus_forward(x)[4:], x[4:])         # x beyond the threshold
    assert torch.equal(A.softplus_forward(x)[:3], torch.zeros(3))
    assert torch.equal(A.hardswish_forward(x)[1:6], torch.tensor([0.0, 0, 0, 100, 1e4]))
    for f in (A.silu_forward, A.mish_forward, A.elu_forward):
        assert f(x)[-1] == inf and f(x)[1].abs() <= 1.0
    for f in (A.tanh_forward, A.sigmoid_forward, A.silu_forward, A.erf_forward, A.sin_forward,
              A.cos_forward, A.mish_forward, A.softplus_forward, A.elu_forward):
        assert torch.isnan(f(torch.tensor([nan]))).all()
    assert torch.isnan(A.sin_forward(torch.tensor([inf, -inf]))).all()   # as torch.sin
    assert A.sin_forward(torch.zeros(1)).item() == 0.0 and A.cos_forward(torch.zeros(1)).item() == 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["tanh", "sigmoid", "silu", "softplus", "mish", "elu", "erf", "sin",
                                  "logsigmoid"])
def test_half_precision_stays_within_the_float32_bound_plus_rounding(name, dtype):
    exact, fwd, _, r, (fmax, _), _ = CASES[name]
    x = torch.linspace(-r, r, 4001).to(dtype)
    y = fwd(x)
    assert y.dtype == dtype
    eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    emax, _ = _errors(y, exact(x.double()))
    # the float32 construction's error, plus the half dtype's rounding of the intermediates
    assert emax <= 1.5 * fmax + 8 * eps * max(1.0, r if name in ("silu", "softplus", "mish", "elu") else 1.0)


# ---------------------------------------------------------------------------
# the constructions, written again from the math with tests/reference.py

def _r(v):
    return R.round_to(v, torch.float32).double().numpy()


def test_tanh_sigmoid_silu_are_the_documented_constructions_bit_for_bit():
    f32 = torch.float32
    x = torch.linspace(-12, 12, 30001)
    xn = x.double().numpy()
    t = np.clip(xn, -9, 9)
    a, b = _r(R.exp(t, f32)), _r(R.exp(-t, f32))
    assert np.array_equal(A.tanh_forward(x).double().numpy(), _r(R.pad(_r(a - b), _r(a + b), f32)))
    h = np.clip(_r(R.pam(xn, 0.5, f32)), -80, 80)
    a, b = _r(R.exp(h, f32)), _r(R.exp(-h, f32))
    assert np.array_equal(A.sigmoid_forward(x).double().numpy(), _r(R.pad(a, _r(a + b), f32)))
    e = _r(R.exp(np.minimum(-xn, 80), f32))
    assert np.array_equal(A.silu_forward(x).double().numpy(), _r(R.pad(xn, _r(1 + e), f32)))


def test_sin_is_table_interpolation_with_one_pam():
    """Phase by exact float64 multiplication here (the library shifts and adds), then
    S[j] + t ⊙̂ (S[j+1] - S[j]) on a 1024-entry table: equal to within one rounding."""
    f32, n = torch.float32, 1024
    y = torch.linspace(-3000, 3000, 60001)
    u = y.double().numpy() * (n / (2 * math.pi))
    fl = np.floor(u)
    j, t = fl.astype(np.int64) % n, _r(u - fl)
    s = np.sin(2 * np.pi * np.arange(n + 1) / n)
    s32, d32 = _r(s[:-1]), _r(s[1:] - s[:-1])
    ref = _r(s32[j] + _r(R.pam(t, d32[j], f32)))
    assert np.abs(A.sin_forward(y).double().numpy() - ref).max() <= 2.0 ** -23
    # the bound of the docstring: 1/9 of one segment's rise
    bound = (2 * math.pi / n) / 9 + (2 * math.pi / n) ** 2 / 8 + 2.0 ** -23
    assert (A.sin_forward(y).double() - torch.sin(y.double())).abs().max() <= bound


# ---------------------------------------------------------------------------
# the exact derivative: finite differences inside an affine piece

def _fd_tol(right, y0, h):
    """1% plus the float32 rounding of O(1) intermediates and of the output, seen through
    the step h (the exact derivative treats float additions as exact)."""
    return 1e-2 * right.abs() + 2.0 ** -22 * y0.abs().clamp_min(1.0) / h


def _fd_check(fn, raw, x0, h, min_kept=0.8):
    x = x0.clone().requires_grad_()
    fn(x, derivative="exact").sum().backward()
    g = x.grad.double()
    y0, yp, ym = (raw(v).double() for v in (x0, x0 + h, x0 - h))
    right, left = (yp - y0) / h, (y0 - ym) / h
    tol = _fd_tol(right, y0, h)
    inside = (right - left).abs() <= tol            # both sides agree: one affine piece
    assert inside.float().mean() >= min_kept
    bad = inside & ((g - right).abs() > tol)
    assert not bad.any(), (x0[bad][:3], g[bad][:3], right[bad][:3])
    # the exact derivative is not the float derivative: it sees the PA pieces
    return g


EXACT = {
    "tanh": (A.tanh, A.tanh_forward, 2.0 ** -12),
    "sigmoid": (A.sigmoid, A.sigmoid_forward, 2.0 ** -12),
    "silu": (A.silu, A.silu_forward, 2.0 ** -12),
    "mish": (A.mish, A.mish_forward, 2.0 ** -12),
    "hardswish": (A.hardswish, A.hardswish_forward, 2.0 ** -12),
    "hardsigmoid": (A.hardsigmoid, A.hardsigmoid_forward, 2.0 ** -12),
    "erf": (A.erf, A.erf_forward, 2.0 ** -12),
    "logsigmoid": (A.logsigmoid, lambda x: A.log_sigmoid_forward(x)[0], 2.0 ** -12),
    "selu": (A.selu, lambda x: A.elu_forward(x, *SELU), 2.0 ** -12),
    "softplus": (lambda x, derivative: A.softplus(x, 2.0, 20.0, derivative=derivative),
                 lambda x: A.softplus_forward(x, 2.0, 20.0), 2.0 ** -12),
    "leaky_relu": (lambda x, derivative: A.leaky_relu(x, negative_slope=0.1, derivative=derivative),
                   lambda x: A.leaky_relu_forward(x, 0.1), 2.0 ** -12),
    "elu": (lambda x, derivative: A.elu(x, 1.5, derivative=derivative),
            lambda x: A.elu_forward(x, 1.5), 2.0 ** -12),
    "celu": (lambda x, derivative: A.celu(x, alpha=0.7, derivative=derivative),
             lambda x: A.elu_forward(x, 0.7, 1.0, 1 / 0.7), 2.0 ** -12),
    "prelu": (lambda x, derivative: A.prelu(x, torch.tensor([0.3]), derivative=derivative),
              lambda x: A.prelu_forward(x, torch.tensor(0.3)), 2.0 ** -12),
    "sin": (A.sin, A.sin_forward, 2.0 ** -18),
    "cos": (A.cos, A.cos_forward, 2.0 ** -18),
}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_derivative_matches_finite_differences(name):
    fn, raw, h = EXACT[name]
    x0 = torch.randn(2000, generator=torch.Generator().manual_seed(3)) * 3
    # PAM pieces shrink geometrically as an operand goes to 0: a fixed step would straddle
    # many of them near x = 0, and near the start of each sin/cos table segment (t -> 0)
    x0 = x0[x0.abs() > 0.05]
    if name in ("sin", "cos"):
        x0 = x0[A._phase(x0)[1] > 1 / 16]
    g = _fd_check(fn, raw, x0, h)
    if name not in ("hardsigmoid", "leaky_relu", "prelu"):
        # somewhere the PA pieces' slopes differ from the approx derivative
        x = x0.clone().requires_grad_()
        fn(x, derivative="approx").sum().backward()
        assert not torch.equal(x.grad.double(), g)


def test_exact_derivative_of_glu_by_halves():
    x0 = torch.randn(1000, 2, generator=torch.Generator().manual_seed(4)) * 3
    x = x0.clone().requires_grad_()
    A.glu(x, 1, derivative="exact").sum().backward()
    h = 2.0 ** -12
    for col in (0, 1):
        step = torch.zeros(1, 2)
        step[0, col] = h
        y0, yp, ym = (A.glu_forward(v, 1)[:, 0].double() for v in (x0, x0 + step, x0 - step))
        right, left = (yp - y0) / h, (y0 - ym) / h
        tol = _fd_tol(right, y0, h)
        inside = (right - left).abs() <= tol
        assert inside.float().mean() > 0.8
        assert ((x.grad[:, col].double() - right).abs() <= tol)[inside].all()


def test_ste_kind_runs_and_functionals_check_their_input():
    x = torch.randn(50, requires_grad=True)
    A.tanh(x, derivative="ste").sum().backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(TypeError, match="dtype"):
        A.sigmoid(torch.randn(3, dtype=torch.float64))
    with pytest.raises(TypeError):
        A.softplus(torch.randn(3), 1.0, 20.0, 5.0)


# ---------------------------------------------------------------------------
# the dispatch mode

class _Spy(TorchDispatchMode):
    """Entered outside the mode: sees every aten op the mode runs (its PA implementations'
    insides included) and records the float ops not known to be multiplication-free."""

    def __init__(self):
        super().__init__()
        self.float_ops, self.unknown = set(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        if any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in leaves):
            self.float_ops.add(func.overloadpacket.__name__)
            if func.overloadpacket not in PASS_THROUGH:
                self.unknown.add(str(func))
        return func(*args, **(kwargs or {}))


_W = torch.tensor([0.25, 0.3, 0.5, 2.0, 0.1, 0.75])
MODE_CASES = {
    # name: (torch call, PA forward, approx backward (dy, x) -> dx)
    "tanh": (torch.tanh, A.tanh_forward, CASES["tanh"][2]),
    "sigmoid": (torch.sigmoid, A.sigmoid_forward, CASES["sigmoid"][2]),
    "silu": (F.silu, A.silu_forward, A.silu_backward),
    "softplus": (lambda x: F.softplus(x, 2.0, 5.0), CASES["softplus_b2_t5"][1], CASES["softplus_b2_t5"][2]),
    "mish": (F.mish, A.mish_forward, A.mish_backward),
    "hardswish": (F.hardswish, A.hardswish_forward, A.hardswish_backward),
    "hardsigmoid": (F.hardsigmoid, A.hardsigmoid_forward, A.hardsigmoid_backward),
    "leaky_relu": (lambda x: F.leaky_relu(x, 0.2), lambda x: A.leaky_relu_forward(x, 0.2),
                   lambda dy, x: A.leaky_relu_backward(dy, x, 0.2)),
    "elu": (lambda x: F.elu(x, 1.5), lambda x: A.elu_forward(x, 1.5),
            lambda dy, x: A.elu_backward(dy, 1.5, 1.0, 1.0, False, x)),
    "celu": (lambda x: F.celu(x, 0.5), CASES["celu_0.5"][1], CASES["celu_0.5"][2]),
    "selu": (F.selu, CASES["selu"][1], CASES["selu"][2]),
    "glu": (lambda x: F.glu(x, -1), lambda x: A.glu_forward(x, -1),
            lambda dy, x: A.glu_backward(dy[..., :3], x, -1)),
    "logsigmoid": (F.logsigmoid, CASES["logsigmoid"][1], A.log_sigmoid_backward),
    "prelu": (lambda x: F.prelu(x, _W), lambda x: A.prelu_forward(x, _W),
              lambda dy, x: A.prelu_backward(dy, x, _W)[0]),
    "erf": (torch.erf, A.erf_forward, CASES["erf"][2]),
    "sin": (torch.sin, A.sin_forward, CASES["sin"][2]),
    "cos": (torch.cos, A.cos_forward, CASES["cos"][2]),
    "hardtanh": (F.hardtanh, lambda x: x.clamp(-1, 1),
                 lambda dy, x: torch.where((x > -1) & (x < 1), dy, torch.zeros_like(dy))),
    "relu6": (F.relu6, lambda x: x.clamp(0, 6),
              lambda dy, x: torch.where((x > 0) & (x < 6), dy, torch.zeros_like(dy))),
}


@pytest.mark.parametrize("name", sorted(MODE_CASES))
def test_mode_routes_forward_and_backward_multiplication_free(name):
    call, fwd, bwd = MODE_CASES[name]
    x0 = torch.randn(5, 6, generator=torch.Generator().manual_seed(5)) * 3
    x = x0.clone().requires_grad_()
    spy = _Spy()
    with spy, pamtorch.mode(Config.full()):
        y = call(x)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(6))
        y.backward(dy)
    assert torch.equal(y.detach(), fwd(x0))
    dy_full = dy if y.shape == x.shape else torch.cat([dy, dy], -1)
    assert torch.equal(x.grad, bwd(dy_full, x0))
    assert spy.float_ops and not spy.unknown, sorted(spy.unknown)


INPLACE = {
    "tanh_": (torch.tanh_, A.tanh_forward), "sigmoid_": (torch.sigmoid_, A.sigmoid_forward),
    "silu_": (lambda t: F.silu(t, inplace=True), A.silu_forward),
    "mish_": (lambda t: F.mish(t, inplace=True), A.mish_forward),
    "hardswish_": (lambda t: F.hardswish(t, inplace=True), A.hardswish_forward),
    "hardsigmoid_": (lambda t: F.hardsigmoid(t, inplace=True), A.hardsigmoid_forward),
    "leaky_relu_": (lambda t: F.leaky_relu(t, 0.2, inplace=True), lambda x: A.leaky_relu_forward(x, 0.2)),
    "elu_": (lambda t: F.elu(t, inplace=True), A.elu_forward),
    "celu_": (lambda t: F.celu(t, 0.5, inplace=True), CASES["celu_0.5"][1]),
    "selu_": (lambda t: F.selu(t, inplace=True), CASES["selu"][1]),
    "erf_": (torch.erf_, A.erf_forward), "sin_": (torch.sin_, A.sin_forward),
    "cos_": (torch.cos_, A.cos_forward),
    "hardtanh_": (lambda t: F.hardtanh(t, inplace=True), lambda x: x.clamp(-1, 1)),
}


@pytest.mark.parametrize("name", sorted(INPLACE))
def test_inplace_forms_under_the_mode(name):
    call, fwd = INPLACE[name]
    x0 = torch.randn(4, 5, generator=torch.Generator().manual_seed(7)) * 3
    x = x0.clone()
    spy = _Spy()
    with spy, pamtorch.mode(Config.full()):
        out = call(x)
    assert out is x and torch.equal(x, fwd(x0))
    assert not spy.unknown, sorted(spy.unknown)


def test_nonlinear_kind_left_exact_runs_torch():
    x = torch.randn(20)
    with pamtorch.mode(Config.full().replace(nonlinear=OpConfig(pa=False))):
        y = torch.tanh(x)
    assert torch.equal(y, torch.tanh(x))


def test_modules_train_a_step_under_the_mode():
    """Stock activation modules in a small net: one step, finite and different from exact."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8),
                              torch.nn.SiLU(), torch.nn.Linear(8, 8), torch.nn.Mish(),
                              torch.nn.Linear(8, 8), torch.nn.Hardswish(), torch.nn.Linear(8, 8),
                              torch.nn.PReLU(), torch.nn.Linear(8, 8), torch.nn.ELU(),
                              torch.nn.Linear(8, 8), torch.nn.GLU(), torch.nn.Linear(4, 1),
                              torch.nn.Sigmoid())
    x = torch.randn(16, 6)
    exact = net(x)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    spy = _Spy()
    with spy, pamtorch.mode(Config.full()):
        y = net(x)
        y.sum().backward()
        opt.step()
    assert not spy.unknown, sorted(spy.unknown)
    assert (y - exact).abs().max() < 0.2 and not torch.equal(y, exact)
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_function_routes_take_torchs_arguments_and_inplace():
    """The routes the mode calls for a non-approx kind: torch's argument names, and an
    in-place call that writes back and still backpropagates."""
    x0 = torch.randn(4, 6, generator=torch.Generator().manual_seed(8)) * 2
    routes = A.FUNCTION_ROUTES
    x = x0.clone().requires_grad_()
    y = routes[F.softplus](input=x, beta=2.0, threshold=5.0, derivative="exact")
    assert torch.equal(y, A.softplus_forward(x0, 2.0, 5.0))
    assert torch.equal(routes[F.leaky_relu](x0, negative_slope=0.2, derivative="exact"),
                       A.leaky_relu_forward(x0, 0.2))
    assert torch.equal(routes[torch.Tensor.sigmoid](x0, derivative="exact"), A.sigmoid_forward(x0))
    x = x0.clone().requires_grad_()
    t = x * 1
    out = routes[F.silu](t, inplace=True, derivative="exact")
    assert out is t and torch.equal(t, A.silu_forward(x0))
    out.sum().backward()
    ref = x0.clone().requires_grad_()
    A.silu(ref, derivative="exact").sum().backward()
    assert torch.equal(x.grad, ref.grad)
    assert set(A.FUNCTION_OPS) == set(routes)


EXACT_UNDER_MODE = {
    "tanh": (torch.tanh, A.tanh),
    "sigmoid_method": (lambda t: t.sigmoid(), A.sigmoid),
    "silu": (F.silu, A.silu),
    "silu_inplace": (lambda t: F.silu(t * 1, inplace=True), A.silu),
    "softplus": (lambda t: F.softplus(t, beta=2.0), lambda t, derivative: A.softplus(t, 2.0, derivative=derivative)),
    "leaky_relu": (lambda t: F.leaky_relu(t, 0.2), lambda t, derivative: A.leaky_relu(t, 0.2, derivative=derivative)),
    "elu": (F.elu, A.elu), "selu": (F.selu, A.selu), "mish": (F.mish, A.mish),
    "glu": (F.glu, A.glu), "logsigmoid": (F.logsigmoid, A.logsigmoid), "erf": (torch.erf, A.erf),
    "sin": (torch.sin, A.sin), "cos": (lambda t: t.cos(), A.cos),
    "prelu": (lambda t: F.prelu(t, torch.tensor([0.3])),
              lambda t, derivative: A.prelu(t, torch.tensor([0.3]), derivative=derivative)),
}


@pytest.mark.parametrize("name", sorted(EXACT_UNDER_MODE))
def test_exact_kind_under_the_mode_takes_the_function_route(name):
    """Config(nonlinear=exact): the mode's function-level route gives the exact derivative
    of the PA function, not the approx one of the aten backward op."""
    call, functional = EXACT_UNDER_MODE[name]
    x0 = torch.randn(4, 6, generator=torch.Generator().manual_seed(9)) * 2
    x = x0.clone().requires_grad_()
    spy = _Spy()
    with spy, pamtorch.mode(Config.full().replace(nonlinear=OpConfig(derivative="exact"))):
        call(x).sum().backward()
    assert not spy.unknown, sorted(spy.unknown)
    grads = {}
    for kind in ("exact", "approx"):
        xr = x0.clone().requires_grad_()
        functional(xr, derivative=kind).sum().backward()
        grads[kind] = xr.grad
    assert torch.equal(x.grad, grads["exact"]) and not torch.equal(x.grad, grads["approx"])


def test_leave_exact_skips_the_route():
    x0 = torch.randn(20)
    x = x0.clone().requires_grad_()
    cfg = Config.full().replace(nonlinear=OpConfig(derivative="exact"))
    with pamtorch.mode(cfg, leave_exact=[torch.ops.aten.tanh_backward]):
        torch.tanh(x).sum().backward()
    # forward PA at the dispatch level, its backward exact by request
    assert torch.equal(x.grad, torch.ops.aten.tanh_backward(torch.ones(20), A.tanh_forward(x0)))


OUT_FORMS = {
    "tanh": (lambda x, o: torch.tanh(x, out=o), A.tanh_forward),
    "sigmoid": (lambda x, o: torch.sigmoid(x, out=o), A.sigmoid_forward),
    "erf": (lambda x, o: torch.erf(x, out=o), A.erf_forward),
    "sin": (lambda x, o: torch.sin(x, out=o), A.sin_forward),
    "cos": (lambda x, o: torch.cos(x, out=o), A.cos_forward),
    "silu": (lambda x, o: torch.ops.aten.silu.out(x, out=o), A.silu_forward),
    "mish": (lambda x, o: torch.ops.aten.mish.out(x, out=o), A.mish_forward),
    "softplus": (lambda x, o: torch._C._nn.softplus(x, 2.0, 5.0, out=o), CASES["softplus_b2_t5"][1]),
    "glu": (lambda x, o: torch._C._nn.glu(x, 1, out=o), lambda x: A.glu_forward(x, 1)),
    "elu": (lambda x, o: torch._C._nn.elu(x, 1.5, out=o), lambda x: A.elu_forward(x, 1.5)),
    "leaky_relu": (lambda x, o: torch._C._nn.leaky_relu(x, 0.2, out=o), lambda x: A.leaky_relu_forward(x, 0.2)),
    "hardswish": (lambda x, o: torch._C._nn.hardswish(x, out=o), A.hardswish_forward),
    "hardsigmoid": (lambda x, o: torch._C._nn.hardsigmoid(x, out=o), A.hardsigmoid_forward),
    "log_sigmoid": (lambda x, o: torch.ops.aten.log_sigmoid_forward.output(x, output=o, buffer=torch.empty(0))[0],
                    lambda x: A.log_sigmoid_forward(x)[0]),
}


@pytest.mark.parametrize("name", sorted(OUT_FORMS))
def test_out_forms_under_the_mode(name):
    call, fwd = OUT_FORMS[name]
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(10)) * 3
    out = torch.empty(0)
    spy = _Spy()
    with spy, pamtorch.mode(Config.full()):
        res = call(x, out)
    assert res is out and torch.equal(out, fwd(x))
    assert not spy.unknown, sorted(spy.unknown)
