"""The fused float32 CPU kernels of layer norm, RMS norm and softmax (``fused_norm_*``,
``fused_softmax_*`` in kernels/cpu/pa_norm.cpp) against the compositions of
pamtorch.nn.functional they replace, bit for bit. The composition is run with the compiled
kernels off (``arith._COMPILED = False``: every PA op on its pure-torch definition), which
test_arith and test_nn check against the float64 reference."""
import functools
import math

import pytest
import torch

import pamtorch
import pamtorch.nn.functional as P
from pamtorch.kernels import cpu

import kernel_checks
from kernel_checks import composition, spy

EXT = cpu.load_extension()
pytestmark = pytest.mark.skipif(EXT is None, reason="compiled CPU kernels unavailable")

SPECIALS = [0.0, -0.0, 1e-40, -1e-40, 2.0 ** -149, -(2.0 ** -126), math.inf, -math.inf, math.nan,
            3.4028234663852886e38, -3.4028234663852886e38, 1.0, -1.0, 1e30, -1e30, 1e-30, 88.0, -88.0]


# the layout too: later reductions over a result sum in its memory order
same_bits = functools.partial(kernel_checks.same_bits, layout=True)


def rows(shape, seed, k=1):
    """Rows over the last ``k`` dims: mostly normal values of one scale per row (every
    exponent from 2^-120 to 2^120), one in 8 rows random bit patterns (NaN payloads, inf,
    subnormals), one in 8 with a special value in some places."""
    g = torch.Generator().manual_seed(seed)
    nrows = math.prod(shape[:len(shape) - k])
    n = math.prod(shape[len(shape) - k:])
    scale = torch.ldexp(torch.ones(nrows, 1), torch.randint(-120, 121, (nrows, 1), generator=g))
    x = torch.randn(nrows, n, generator=g) * scale
    bits = torch.randint(-2 ** 31, 2 ** 31, (nrows, n), generator=g, dtype=torch.int64).to(torch.int32)
    x[3::8] = bits[3::8].view(torch.float32)
    sp = torch.tensor(SPECIALS)[torch.randint(len(SPECIALS), (nrows, n), generator=g)]
    put = torch.rand(nrows, n, generator=g) < 0.3
    x[5::8] = torch.where(put[5::8], sp[5::8], x[5::8])
    return x.reshape(shape)


def params(n_shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_shape, generator=g) * 2
    b = torch.randn(n_shape, generator=g)
    w.view(-1)[::11] = 0.0
    return w, b


# (shape, k): normalized over the last k dims; n = 1, odd, a multiple of 8, several rows per
# chunk, rows longer than a chunk (256), two normalized dims
NORM_SHAPES = [((40, 1), 1), ((9, 17), 1), ((33, 64), 1), ((5, 7, 33), 1), ((6, 600), 1), ((4, 5, 6), 2),
               ((3, 301), 1), ((64,), 1)]


@pytest.mark.parametrize("shape,k", NORM_SHAPES)
@pytest.mark.parametrize("affine", ["none", "w", "wb"])
def test_layer_norm_forward_and_backward_match_composition(monkeypatch, shape, k, affine):
    fwd, bwd = spy(monkeypatch, "fused_norm_forward"), spy(monkeypatch, "fused_norm_backward")
    x = rows(shape, 1, k)
    ns = shape[len(shape) - k:]
    w, b = params(ns, 2)
    w, b = (None, None) if affine == "none" else (w, None) if affine == "w" else (w, b)
    got = P.layer_norm_forward(x, ns, w, b, 1e-5)
    want = composition(P.layer_norm_forward, x, ns, w, b, 1e-5)
    same_bits(got, want)
    _, mean, rstd = want
    for seed in (3, 4):
        dy = rows(shape, seed, k)
        for mask in [(True, True, True), (False, True, True), (True, False, False)]:
            same_bits(P.layer_norm_backward(dy, x, ns, mean, rstd, w, b, mask),
                      composition(P.layer_norm_backward, dy, x, ns, mean, rstd, w, b, mask))
    assert fwd and len(bwd) == (6 if w is not None else 4), "the fused kernels did not run"  # no dx, no w: nothing to do


@pytest.mark.parametrize("shape,k", NORM_SHAPES)
@pytest.mark.parametrize("affine", [False, True])
def test_rms_norm_forward_and_backward_match_composition(monkeypatch, shape, k, affine):
    fwd, bwd = spy(monkeypatch, "fused_norm_forward"), spy(monkeypatch, "fused_norm_backward")
    x = rows(shape, 5, k)
    ns = shape[len(shape) - k:]
    w = params(ns, 6)[0] if affine else None
    for eps in (None, 1e-6):
        got = P.rms_norm_forward(x, ns, w, eps)
        want = composition(P.rms_norm_forward, x, ns, w, eps)
        same_bits(got, want)
        dy = rows(shape, 7, k)
        for mask in [(True, True), (False, True), (True, False)]:
            same_bits(P.rms_norm_backward(dy, x, ns, want[1], w, mask),
                      composition(P.rms_norm_backward, dy, x, ns, want[1], w, mask))
    assert len(fwd) == 2 and len(bwd) == (6 if affine else 4), "the fused kernels did not run"


def test_layer_norm_nan_in_the_bias_add_falls_back(monkeypatch):
    """A NaN from the float add of the bias (NaN operands, inf - inf) has the pattern torch's
    add kernel picks: the kernel returns None and the composition runs."""
    x = torch.tensor([[1.0, 2.0, 4.0], [1.0, 2.0, 4.0]])  # x - mean: -1.5, -0.5, 1.5
    w = torch.tensor([1.0, math.inf, 1.0])  # y[:, 1] = -inf before the bias
    b = torch.tensor([float.fromhex("0x1.5p0"), math.inf, 0.0])  # -inf + inf
    b_nan = torch.tensor([1.0, 0.0, 0.0]).view(torch.int32)
    b_nan[0] = 0x7FA00001  # a signalling NaN with a payload
    for bias in (b, b_nan.view(torch.float32)):
        y, mean, rstd = EXT.fused_norm_forward(x, 1, w, bias, 1e-5, True)
        assert y is None and mean is not None and rstd is not None
        same_bits(P.layer_norm_forward(x, (3,), w, bias), composition(P.layer_norm_forward, x, (3,), w, bias))
    y, _, _ = EXT.fused_norm_forward(x, 1, w, torch.zeros(3), 1e-5, True)  # -inf + 0: no NaN
    assert y is not None and (y[:, 1] == -math.inf).all()
    same_bits(y, composition(P.layer_norm_forward, x, (3,), w, torch.zeros(3))[0])


def test_norms_strides_dtypes_and_exact_derivative_use_the_composition(monkeypatch):
    fwd, bwd = spy(monkeypatch, "fused_norm_forward"), spy(monkeypatch, "fused_norm_backward")
    x = rows((12, 40), 8)
    w, b = params((12,), 9)
    xt = x.t()  # rows not contiguous: the composition
    dy = rows((40, 12), 10)
    y, mean, rstd = P.layer_norm_forward(xt, (12,), w, b)
    same_bits((y, mean, rstd), composition(P.layer_norm_forward, xt, (12,), w, b))
    same_bits(P.layer_norm_backward(dy, xt, (12,), mean, rstd, w, b),
              composition(P.layer_norm_backward, dy, xt, (12,), mean, rstd, w, b))
    xc = xt.contiguous()  # contiguous x, dy's rows not contiguous: the composition again
    _, mean, rstd = P.layer_norm_forward(xc, (12,), w, b)
    same_bits(P.layer_norm_backward(dy.t().contiguous().t(), xc, (12,), mean, rstd, w, b),
              composition(P.layer_norm_backward, dy.t().contiguous().t(), xc, (12,), mean, rstd, w, b))
    y2, r2 = P.rms_norm_forward(x[:, ::3], (14,))
    same_bits((y2, r2), composition(P.rms_norm_forward, x[:, ::3], (14,)))
    assert len(fwd) == 1 and len(bwd) == 0
    # other dtypes, broadcasting parameters and empty inputs
    assert P.layer_norm_forward(xc.bfloat16(), (12,), w, b)[0].dtype == torch.bfloat16
    same_bits(P.layer_norm_forward(xc, (12,), torch.tensor([2.0]))[0],
              composition(P.layer_norm_forward, xc, (12,), torch.tensor([2.0]))[0])
    assert P.layer_norm_forward(torch.empty(0, 12), (12,))[0].shape == (0, 12)
    # the exact derivative runs autograd over the composition, and computes the same forward
    xg = xc.clone().requires_grad_()
    ye = P.layer_norm(xg, (12,), w, b, derivative="exact")
    assert ye.grad_fn is not None and len(fwd) == 1
    same_bits(ye.detach(), P.layer_norm_forward(xc, (12,), w, b)[0])
    assert len(fwd) == 2


def strided_rows():
    """(x, dy) pairs whose rows are contiguous but not one after another: permuted leading dims
    (as MultiheadAttention's gradients), slices, and both."""
    base = rows((9, 40, 64), 20)
    g = rows((40, 12, 64), 21)
    return [(base.transpose(0, 1), torch.randn(40, 9, 64)), (base.transpose(0, 1), g[:, :9]),
            (base, g[:, :9].transpose(0, 1)), (base[:, 0], g[0, :9]), (base[:, 0], g[:9, 0]),
            (base[::2, 3:33:3], g[:5, 2:12])]


def test_strided_rows_match_composition(monkeypatch):
    """Rows at any offsets: the intermediates that torch sums have the composition's layout
    (TensorIterator's, from the first operand), so the sums, and the results, are the same; so do
    the results (a later reduction over them sums in their memory order)."""
    fwd, bwd = spy(monkeypatch, "fused_norm_forward"), spy(monkeypatch, "fused_norm_backward")
    sfwd, sbwd = spy(monkeypatch, "fused_softmax_forward"), spy(monkeypatch, "fused_softmax_backward")
    w, b = params((64,), 22)
    for x, dy in strided_rows():
        got = P.layer_norm_forward(x, (64,), w, b)
        want = composition(P.layer_norm_forward, x, (64,), w, b)
        same_bits(got, want)  # (strides included)
        same_bits(P.layer_norm_backward(dy, x, (64,), want[1], want[2], w, b),
                  composition(P.layer_norm_backward, dy, x, (64,), want[1], want[2], w, b))
        yr, rr = composition(P.rms_norm_forward, x, (64,), w)
        same_bits(P.rms_norm_forward(x, (64,), w), (yr, rr))
        same_bits(P.rms_norm_backward(dy, x, (64,), rr, w), composition(P.rms_norm_backward, dy, x, (64,), rr, w))
        y = P.softmax_forward(x, -1)
        same_bits(y, composition(P.softmax_forward, x, -1))
        same_bits(P.softmax_backward(y, dy, -1), composition(P.softmax_backward, y, dy, -1))
    assert (len(fwd), len(bwd), len(sfwd), len(sbwd)) == (12, 12, 6, 6), "the fused kernels did not run"


def softmax_rows(shape, seed):
    x = rows(shape, seed)
    g = torch.Generator().manual_seed(seed + 100)
    small = torch.randn(shape, generator=g) * 8  # the usual case: a spread of a few dozen
    small.view(-1)[::13] = -math.inf  # masked entries
    return torch.cat([x, small], 0)


@pytest.mark.parametrize("shape", [(30, 1), (40, 17), (8, 3, 65), (6, 300), (4, 1000), (50,)])
@pytest.mark.parametrize("safe", [False, True])
def test_softmax_forward_and_backward_match_composition(monkeypatch, shape, safe):
    fwd, bwd = spy(monkeypatch, "fused_softmax_forward"), spy(monkeypatch, "fused_softmax_backward")
    x = softmax_rows(shape, 11)
    if x.dim() > 1:
        x[-1] = -math.inf  # rows of only -inf: NaN, or 0 when safe
    y = P.softmax_forward(x, -1, safe)
    same_bits(y, composition(P.softmax_forward, x, -1, safe))
    if x.dim() > 1:
        assert (torch.isnan(y[-1]) if not safe else y[-1] == 0).all()
    for dy in (softmax_rows(shape, 12), torch.randn(x.shape)):
        same_bits(P.softmax_backward(y, dy, x.dim() - 1), composition(P.softmax_backward, y, dy, -1))
    assert len(fwd) == 1 and len(bwd) == 2, "the fused kernels did not run"


def test_softmax_other_dims_strides_and_dtypes_use_the_composition(monkeypatch):
    fwd, bwd = spy(monkeypatch, "fused_softmax_forward"), spy(monkeypatch, "fused_softmax_backward")
    x = softmax_rows((10, 20, 7), 13)
    for xx, d in [(x, 1), (x, 0), (x.transpose(1, 2), -1)]:  # not along contiguous rows
        y = P.softmax_forward(xx, d)
        same_bits(y, composition(P.softmax_forward, xx, d))
        dy = torch.randn(xx.shape)
        same_bits(P.softmax_backward(y, dy, d), composition(P.softmax_backward, y, dy, d))
    assert not fwd and not bwd
    y = P.softmax_forward(x, -1)  # a transposed dy: the composition
    dy = torch.randn(7, 20, 20).transpose(0, 2)
    same_bits(P.softmax_backward(y, dy, -1), composition(P.softmax_backward, y, dy, -1))
    assert len(fwd) == 1 and not bwd
    assert P.softmax_forward(x.bfloat16(), -1).dtype == torch.bfloat16
    same_bits(P.softmax_forward(torch.tensor(3.0), 0), torch.tensor(1.0))
    with pytest.raises(IndexError):
        P.softmax_forward(x, 3)
    xg = x.clone().requires_grad_()
    ye = P.softmax(xg, -1, derivative="exact")
    assert ye.grad_fn is not None and len(fwd) == 1
    same_bits(ye.detach(), P.softmax_forward(x, -1))
    assert len(fwd) == 2


def test_softmax_exp_on_every_float32_exponent():
    """pa_exp inside the softmax kernel (float64 PAM, rounding by 1.5 * 2^52) on x - max for
    every exponent: rows [-|v|, 0] and [v, -v]."""
    g = torch.Generator().manual_seed(14)
    e = torch.arange(-149, 128).repeat_interleave(40)
    m = torch.rand(e.numel(), generator=g) + 1.0
    v = torch.ldexp(m, e)
    v = torch.cat([v, -v, torch.tensor([2.0 ** 32, -(2.0 ** 32), 354.9, -354.9, 0.5, -0.5])])
    x = torch.stack([-v.abs(), torch.zeros_like(v)], 1)  # max 0: x - max = -|v|
    x2 = torch.stack([v, -v], 1)  # x - max: 0 and -2|v|
    for xx in (x, x2):
        same_bits(P.softmax_forward(xx, -1), composition(P.softmax_forward, xx, -1))


@pytest.mark.parametrize("route", ["dispatch", "kernel"])
def test_mode_models_give_the_same_bits(monkeypatch, route):
    """Under pamtorch.mode(Config.full()), nn.LayerNorm and F.softmax in a small model: forward and
    gradients are the same with the kernels and without (on the kernel route the layer norm's
    kernels are called from C++, where the Python spies do not see them)."""
    fwd, sm = spy(monkeypatch, "fused_norm_forward"), spy(monkeypatch, "fused_softmax_forward")
    bwd, smb = spy(monkeypatch, "fused_norm_backward"), spy(monkeypatch, "fused_softmax_backward")
    torch.manual_seed(15)
    ln = torch.nn.LayerNorm(24)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x0 = torch.randn(6, 5, 24) * 3
    g0 = torch.randn(6, 5, 24)

    def step():
        ln.zero_grad()
        x = x0.clone().requires_grad_()
        with pamtorch.mode(pamtorch.Config.full(), route=route):
            h = ln(x)
            y = torch.nn.functional.softmax(h, dim=-1)
            (y * g0).sum().backward()
        return [y.detach(), x.grad, ln.weight.grad, ln.bias.grad]

    got = step()
    assert sm and smb and (route == "kernel" or (fwd and bwd)), "the fused kernels did not run under the mode"
    same_bits(got, composition(step))
