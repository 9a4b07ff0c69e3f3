"""The fused float32 CPU kernels of the raw blocks (``fused_*`` in kernels/cpu/pa_elementwise.cpp)
against the compositions of pamtorch.nn.functional they replace, bit for bit. The composition
is run with the compiled kernels off (``arith._COMPILED = False``: every PA op on its pure-torch
definition), which test_arith and test_nn check against the float64 reference."""
import math

import pytest
import torch

import pamtorch.nn.functional as P
from pamtorch.kernels import cpu

from kernel_checks import composition, same_bits, spy

EXT = cpu.load_extension()
pytestmark = pytest.mark.skipif(EXT is None, reason="compiled CPU kernels unavailable")

SPECIALS = [0.0, -0.0, 1e-40, -1e-40, 2.0 ** -149, -(2.0 ** -126), math.inf, -math.inf, math.nan,
            3.4028234663852886e38, -3.4028234663852886e38, 1.0, -1.0, 10.0, -10.0, 10.000001,
            -10.000001, 4.0, -4.0, 0.5, 88.0, -88.0, 1e-20, -1e-20]


def values(n, seed):
    """Random bit patterns (every exponent, NaN payloads, subnormals), the special values, and
    a dense sweep of the range where GELU bends."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-2 ** 31, 2 ** 31, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    return torch.cat([bits.view(torch.float32), torch.tensor(SPECIALS + [-100.0], dtype=torch.float32),
                      torch.linspace(-14, 14, 30001, dtype=torch.float32)])


# ---------------------------------------------------------------------------- GELU

def test_gelu_forward_matches_composition(monkeypatch):
    calls = spy(monkeypatch, "fused_gelu_forward")
    x = values(400_000, 1)
    y = P.gelu_forward(x)
    assert calls, "the fused kernel did not run"
    same_bits(y, composition(P.gelu_forward, x))
    assert torch.isnan(y[torch.isnan(x)]).all()
    assert y[x == math.inf].eq(math.inf).all() and y[x == -100].eq(0).all()


def test_gelu_backward_matches_composition(monkeypatch):
    calls = spy(monkeypatch, "fused_gelu_backward")
    x = values(400_000, 2)
    g = torch.Generator().manual_seed(3)
    dy_bits = values(400_000, 4)[torch.randperm(x.numel(), generator=g)]
    for dy in (dy_bits, torch.randn(x.shape, generator=g)):
        same_bits(P.gelu_backward(dy, x), composition(P.gelu_backward, dy, x))
    # every special against every special
    s = torch.tensor(SPECIALS, dtype=torch.float32)
    dy, xs = torch.meshgrid(s, s, indexing="ij")
    same_bits(P.gelu_backward(dy, xs), composition(P.gelu_backward, dy, xs))
    assert len(calls) == 3


def test_gelu_shapes_strides_broadcast_and_empty():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 40, 3, generator=g) * 4
    dy = torch.randn(6, 40, 3, generator=g)
    for xx, gg in [(x.transpose(0, 2), dy.transpose(0, 2)), (x[:, ::3], dy[:, ::3]), (x, dy[:1]),
                   (x[0, 0, 0], dy[0, 0, 0]), (torch.empty(0, 3), torch.empty(0, 3))]:
        same_bits(P.gelu_forward(xx), composition(P.gelu_forward, xx))
        same_bits(P.gelu_backward(gg, xx), composition(P.gelu_backward, gg, xx))
    assert P.gelu_forward(x.transpose(0, 2)).shape == (3, 40, 6)


def test_gelu_other_dtypes_and_exact_derivative_use_the_composition(monkeypatch):
    calls = spy(monkeypatch, "fused_gelu_forward")
    xb = torch.randn(50, dtype=torch.bfloat16)
    assert P.gelu_forward(xb).dtype == torch.bfloat16
    x = torch.randn(64, requires_grad=True)
    y = P.gelu(x, derivative="exact")  # autograd over the PA ops: the composition, not the kernel
    assert y.grad_fn is not None and not calls
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    same_bits(y.detach(), P.gelu_forward(x.detach()))
    assert len(calls) == 1


# ---------------------------------------------------------------------------- log-softmax

def rows(shape, seed, scale=6.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


@pytest.mark.parametrize("shape,dim", [((64, 1000), -1), ((64, 1000), 0), ((7, 33, 5), 1), ((7, 33, 5), -1),
                                       ((3, 1), -1), ((2, 5000), -1)])
def test_log_softmax_matches_composition(monkeypatch, shape, dim):
    fwd, bwd = spy(monkeypatch, "fused_log_softmax_forward"), spy(monkeypatch, "fused_log_softmax_backward")
    x = rows(shape, 6)
    x.view(-1)[5::89] = x.view(-1)[5::89].abs() + 60  # a large max: other entries flush to 0
    if x.shape[dim] > 1:  # (a row of only -inf is NaN)
        x.view(-1)[::97] = -math.inf  # masked entries stay -inf
    y = P.log_softmax_forward(x, dim)
    same_bits(y, composition(P.log_softmax_forward, x, dim))
    for dy in (rows(shape, 7, 1.0), rows(shape, 8, 1e30)):
        same_bits(P.log_softmax_backward(y, dy, dim), composition(P.log_softmax_backward, y, dy, dim))
    assert len(fwd) == 1 and len(bwd) == 2, "the fused kernels did not run"
    assert torch.isinf(y.view(-1)[::97]).all() or x.shape[dim] == 1


def test_log_softmax_random_bits_nan_rows_and_strides():
    """Rows of random bit patterns (NaN, inf, subnormal entries): the kernel hands rows where a
    NaN arises back to the composition (None), so the NaN patterns are the composition's too."""
    g = torch.Generator().manual_seed(9)
    bits = torch.randint(-2 ** 31, 2 ** 31, (50, 300), generator=g, dtype=torch.int64).to(torch.int32)
    x = torch.cat([bits.view(torch.float32), rows((50, 300), 10)])
    assert EXT.fused_log_softmax_forward(x, -1) is None  # NaNs arise
    y = P.log_softmax_forward(x, -1)
    same_bits(y, composition(P.log_softmax_forward, x, -1))
    for dy in (rows((100, 300), 11, 1.0), x.flip(0)):
        same_bits(P.log_softmax_backward(y, dy, -1), composition(P.log_softmax_backward, y, dy, -1))
    xs = rows((40, 30, 6), 12)
    for xx, d in [(xs.transpose(0, 2), -1), (xs[:, ::3], 1), (xs.permute(2, 0, 1), 0)]:
        yy = P.log_softmax_forward(xx, d)
        same_bits(yy, composition(P.log_softmax_forward, xx, d))
        dy = rows(xx.shape, 13, 1.0).transpose(0, 1).contiguous().transpose(0, 1)
        same_bits(P.log_softmax_backward(yy, dy, d), composition(P.log_softmax_backward, yy, dy, d))


def test_log_softmax_exact_derivative_and_other_dtypes_use_the_composition(monkeypatch):
    calls = spy(monkeypatch, "fused_log_softmax_forward")
    x = rows((8, 50), 14).requires_grad_()
    y = P.log_softmax(x, -1, derivative="exact")
    assert y.grad_fn is not None and not calls
    y[:, 0].sum().backward()
    assert torch.isfinite(x.grad).all()
    same_bits(y.detach(), P.log_softmax_forward(x.detach(), -1))
    assert len(calls) == 1
    assert P.log_softmax_forward(x.detach().bfloat16(), -1).dtype == torch.bfloat16
    assert P.log_softmax_forward(torch.empty(0, 4), -1).shape == (0, 4)


# ---------------------------------------------------------------- sigmoid, tanh, SiLU

@pytest.mark.parametrize("name", ["sigmoid", "tanh", "silu"])
def test_activation_forward_and_backward_match_composition(monkeypatch, name):
    """The fused PA sigmoid, tanh and SiLU (ops/activations.py) against their compositions on
    pure-torch PA ops: random bit patterns over every exponent, NaN payloads, the specials and
    a dense sweep, forward and the approx derivative (sigmoid and tanh from the output, SiLU
    from the input, as the aten backward ops take them), strided and broadcast operands."""
    from pamtorch.ops import activations as A
    fwd, bwd = getattr(A, name + "_forward"), getattr(A, name + "_backward")
    fcalls, bcalls = spy(monkeypatch, "fused_act_forward"), spy(monkeypatch, "fused_act_backward")
    x = values(200_000, 21)
    same_bits(fwd(x), composition(fwd, x))
    dy = values(200_000, 22)
    v = fwd(x) if name != "silu" else x
    same_bits(bwd(dy, v), composition(bwd, dy, v))
    same_bits(bwd(dy, x), composition(bwd, dy, x))   # any values, NaN payloads included
    xs = x[:230_000].view(460, 500).t()[::3]
    same_bits(fwd(xs), composition(fwd, xs), layout=True)
    row = x[:500].view(1, 500)
    same_bits(bwd(dy[:230_000].view(460, 500), row), composition(bwd, dy[:230_000].view(460, 500), row))
    same_bits(fwd(x[:0]), composition(fwd, x[:0]))
    assert len(fcalls) >= 2 and len(bcalls) >= 2


def test_activation_kernels_refuse_other_dtypes_and_kinds():
    with pytest.raises(RuntimeError, match="must be float32"):
        EXT.fused_act_forward(torch.ones(2, dtype=torch.float64), 0)
    with pytest.raises(RuntimeError, match="kind must be"):
        EXT.fused_act_backward(torch.ones(2), torch.ones(2), 3)
