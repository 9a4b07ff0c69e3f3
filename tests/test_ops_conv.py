"""Convolutions under pamtorch.mode: 1-D/2-D/3-D, transposed, grouped, depthwise, dilated,
strided, every padding mode; forward and both derivative kinds, against a float64 PAM
reference written from the definition (a sum of shifted products), against torch, and
against pamtorch.conv2d (the module path) bit for bit."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import pam_checks as pc
from reference import pam, to_f64

import pamtorch
from pamtorch.config import Config, OpConfig
from pamtorch.ops import PASS_THROUGH

aten = torch.ops.aten
F32 = torch.float32


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, grad=True):
    return torch.randn(*shape, generator=gen(seed)).requires_grad_(grad)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def cfg(derivative="approx"):
    return Config.full().replace(matmul=OpConfig(derivative=derivative))


# ---------------------------------------------------------------------------
# float64 references: every output is a sum of PAM products of one weight tap and one input value

def _win(k, s, d, n):
    """Positions o·s + k·d, o < n, of one kernel offset, as a slice per dimension."""
    return tuple(slice(ki * di, ki * di + si * (ni - 1) + 1, si) for ki, si, di, ni in zip(k, s, d, n))


def conv_ref(x, w, s, p, d, groups, out=None):
    """y[n, oc, o] = sum_{c', k} PAM(w[oc, c', k], xpad[n, group(oc)·C/g + c', o·s + k·d])."""
    x64, w64 = to_f64(x), to_f64(w)
    D = x64.ndim - 2
    xp = np.pad(x64, [(0, 0), (0, 0)] + [(pi, pi) for pi in p])
    ks = w64.shape[2:]
    o = out or [(xp.shape[2 + i] - d[i] * (ks[i] - 1) - 1) // s[i] + 1 for i in range(D)]
    n = x64.shape[0]
    oc, cg = w64.shape[:2]
    og = oc // groups
    ref, mag = np.zeros((n, oc, *o)), np.zeros((n, oc, *o))
    for k in itertools.product(*map(range, ks)):
        xs = xp[(slice(None), slice(None)) + _win(k, s, d, o)].reshape(n, groups, 1, cg, *o)
        ws = w64[(slice(None), slice(None)) + k].reshape(1, groups, og, cg, *[1] * D)
        t = pam(xs, ws, F32)
        ref += t.sum(3).reshape(n, oc, *o)
        mag += np.abs(t).sum(3).reshape(n, oc, *o)
    return ref, mag, cg * math.prod(ks)


def conv_transpose_ref(x, w, s, p, d, op, groups):
    """y[n, j, q] = sum over (c, k, i) with q = i·s - p + k·d of PAM(w[c, j', k], x[n, c, i])."""
    x64, w64 = to_f64(x), to_f64(w)
    D = x64.ndim - 2
    n, cin = x64.shape[:2]
    size = x64.shape[2:]
    ks, cog = w64.shape[2:], w64.shape[1]
    ig = cin // groups
    out = [(size[i] - 1) * s[i] - 2 * p[i] + d[i] * (ks[i] - 1) + op[i] + 1 for i in range(D)]
    canvas = np.zeros((n, groups * cog, *[o + 2 * pi for o, pi in zip(out, p)]))
    cmag = np.zeros_like(canvas)
    for k in itertools.product(*map(range, ks)):
        xs = x64.reshape(n, groups, ig, 1, *size)
        ws = w64[(slice(None), slice(None)) + k].reshape(1, groups, ig, cog, *[1] * D)
        t = pam(xs, ws, F32)
        win = (slice(None), slice(None)) + _win(k, s, d, size)
        canvas[win] += t.sum(2).reshape(n, groups * cog, *size)
        cmag[win] += np.abs(t).sum(2).reshape(n, groups * cog, *size)
    crop = (slice(None), slice(None)) + tuple(slice(pi, pi + o) for pi, o in zip(p, out))
    return canvas[crop], cmag[crop], ig * math.prod(ks)


def wgrad_ref(x, gy, ks, s, p, d, groups):
    """dw[oc, c', k] = sum_{n, o} PAM(gy[n, oc, o], xpad[n, group(oc)·C/g + c', o·s + k·d])."""
    x64, g64 = to_f64(x), to_f64(gy)
    D = x64.ndim - 2
    xp = np.pad(x64, [(0, 0), (0, 0)] + [(pi, pi) for pi in p])
    n, c = x64.shape[:2]
    oc, o = g64.shape[1], g64.shape[2:]
    cg, og = c // groups, oc // groups
    ref, mag = np.zeros((oc, cg, *ks)), np.zeros((oc, cg, *ks))
    axes = (0, *range(4, 4 + D))
    for k in itertools.product(*map(range, ks)):
        xs = xp[(slice(None), slice(None)) + _win(k, s, d, o)].reshape(n, groups, 1, cg, *o)
        t = pam(g64.reshape(n, groups, og, 1, *o), xs, F32)
        ref[(slice(None), slice(None)) + k] = t.sum(axes).reshape(oc, cg)
        mag[(slice(None), slice(None)) + k] = np.abs(t).sum(axes).reshape(oc, cg)
    return ref, mag, n * math.prod(o)


# ---------------------------------------------------------------------------
# the cases: (dims, transposed, x shape, weight shape, stride, padding, dilation, output_padding, groups)

CASES = {
    "1d": (1, False, (2, 4, 11), (6, 4, 3), (2,), (1,), (1,), (0,), 1),
    "1d-grouped-dilated": (1, False, (2, 4, 11), (6, 2, 3), (1,), (2,), (2,), (0,), 2),
    "2d": (2, False, (2, 3, 7, 6), (4, 3, 3, 2), (1, 2), (1, 0), (1, 1), (0, 0), 1),
    "2d-depthwise-strided": (2, False, (2, 6, 9, 8), (6, 1, 3, 3), (2, 2), (1, 1), (1, 1), (0, 0), 6),
    "2d-dilated-grouped": (2, False, (1, 4, 9, 9), (6, 2, 3, 3), (2, 1), (2, 2), (2, 3), (0, 0), 2),
    "3d": (3, False, (2, 3, 5, 6, 5), (4, 3, 3, 2, 3), (1, 2, 1), (1, 1, 0), (1, 1, 1), (0, 0, 0), 1),
    "3d-grouped-dilated": (3, False, (1, 4, 7, 6, 6), (4, 2, 2, 3, 2), (2, 1, 1), (0, 1, 0), (2, 1, 2),
                           (0, 0, 0), 2),
    "transposed-1d": (1, True, (2, 4, 6), (4, 3, 3), (2,), (1,), (1,), (1,), 1),
    "transposed-2d": (2, True, (2, 4, 5, 4), (4, 3, 3, 2), (2, 3), (1, 0), (1, 1), (1, 2), 1),
    "transposed-2d-grouped-dilated": (2, True, (2, 4, 5, 4), (4, 3, 3, 3), (2, 2), (2, 2), (2, 2),
                                      (1, 1), 2),
    "transposed-2d-depthwise": (2, True, (1, 4, 4, 5), (4, 1, 3, 3), (2, 2), (1, 1), (1, 1), (0, 1), 4),
    "transposed-3d": (3, True, (1, 4, 3, 4, 3), (4, 2, 2, 3, 2), (2, 2, 1), (1, 0, 1), (1, 1, 1),
                      (1, 1, 0), 2),
}
FUNCS = {(1, False): F.conv1d, (2, False): F.conv2d, (3, False): F.conv3d,
         (1, True): F.conv_transpose1d, (2, True): F.conv_transpose2d, (3, True): F.conv_transpose3d}


def run_case(name, config, seed=0):
    dims, tr, xs, ws, s, p, d, op, g = CASES[name]
    x, w = randn(*xs, seed=seed), randn(*ws, seed=seed + 1)
    oc = ws[1] * g if tr else ws[0]
    b = randn(oc, seed=seed + 2)
    fn = FUNCS[(dims, tr)]
    kw = dict(stride=s, padding=p, dilation=d, groups=g, **(dict(output_padding=op) if tr else {}))
    with pamtorch.mode(config):
        y = fn(x, w, b, **kw)
        gy = torch.randn(y.shape, generator=gen(seed + 3))
        grads = torch.autograd.grad(y, (x, w, b), gy)
    return (x, w, b, gy, kw), y, grads


@pytest.mark.parametrize("name", list(CASES))
def test_conv_forward_and_approx_backward_equal_the_float64_pam_sums(name):
    dims, tr, xs, ws, s, p, d, op, g = CASES[name]
    (x, w, b, gy, kw), y, (gx, gw, gb) = run_case(name, cfg())
    fn = FUNCS[(dims, tr)]
    y_torch = fn(x, w, b, **kw)
    assert y.shape == y_torch.shape
    if tr:
        ref, mag, k = conv_transpose_ref(x, w, s, p, d, op, g)
        gx_ref = conv_ref(gy, w, s, p, d, g, out=list(x.shape[2:]))
        gw_ref = wgrad_ref(gy, x, ws[2:], s, p, d, g)
    else:
        ref, mag, k = conv_ref(x, w, s, p, d, g)
        natural = [(y.shape[2 + i] - 1) * s[i] - 2 * p[i] + d[i] * (ws[2 + i] - 1) + 1 for i in range(dims)]
        rest = [x.shape[2 + i] - natural[i] for i in range(dims)]
        gx_ref = conv_transpose_ref(gy, w, s, p, d, rest, g)
        gw_ref = wgrad_ref(x, gy, ws[2:], s, p, d, g)
    bias = to_f64(b).reshape(1, -1, *[1] * dims)
    pc.check_close(y, ref + bias, mag + np.abs(bias), k + 1, what=f"{name} forward")
    pc.check_close(gx, *gx_ref, what=f"{name} grad input")
    pc.check_close(gw, *gw_ref, what=f"{name} grad weight")
    assert torch.allclose(gb, gy.sum((0, *range(2, gy.dim()))), rtol=1e-6, atol=1e-6)
    # and close to torch's exact convolution (PAM products err by at most 11.1 %)
    gx_t, gw_t = torch.autograd.grad(y_torch, (x, w), gy)
    assert rel(y, y_torch) < 0.08 and rel(gx, gx_t) < 0.08 and rel(gw, gw_t) < 0.08


def _unfold_operands(x, w, kw, groups):
    """(A, B) per group of a 2-D convolution, built with F.unfold: y_g = A_g ·̂ B_g."""
    cols = F.unfold(x.detach(), w.shape[2:], **{k: v for k, v in kw.items() if k != "groups"})
    n, ck, L = cols.shape
    cols = cols.transpose(0, 1).reshape(groups, ck // groups, n * L)
    return w.detach().reshape(groups, w.shape[0] // groups, -1), cols


def test_exact_derivative_kind_is_the_exact_derivative_of_the_pam_products():
    """Config(matmul=exact): dW and the patch gradient are the exact piecewise-constant
    derivatives of the per-group PAM products (tests/pam_checks.py's formula)."""
    name = "2d-dilated-grouped"
    dims, tr, xs, ws, s, p, d, op, g = CASES[name]
    (x, w, b, gy, kw), y, (gx, gw, gb) = run_case(name, cfg("exact"))
    a, cols = _unfold_operands(x, w, dict(stride=s, padding=p, dilation=d), g)
    og = ws[0] // g
    dc = gy.transpose(0, 1).reshape(g, og, -1)
    for gi in range(g):
        ref, mag = pc.exact_grad_a_reference(a[gi], cols[gi], dc[gi])
        pc.check_close(gw.reshape(g, og, -1)[gi], ref, mag, dc.shape[2], what="exact grad weight")
    # the input gradient: exact grad of the patches, folded back (additions only)
    dcols = []
    for gi in range(g):
        ref, _ = pc.exact_grad_b_reference(a[gi], cols[gi], dc[gi])
        dcols.append(torch.from_numpy(ref).float())
    dcols = torch.cat(dcols).reshape(-1, x.shape[0], cols.shape[2]).transpose(0, 1)
    gx_ref = F.fold(dcols, x.shape[2:], ws[2:], stride=s, padding=p, dilation=d)
    assert rel(gx, gx_ref) < 1e-6
    # and it differs from the approx kind
    _, _, (gx_a, gw_a, _) = run_case(name, cfg("approx"))
    assert not torch.equal(gw, gw_a)


@pytest.mark.parametrize("derivative", ["approx", "exact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_2d_convolution_under_mode_is_bit_identical_to_pamtorch_conv2d(derivative, dtype):
    """The mode's 2-D path computes exactly what pamtorch.conv2d (the converted module's
    path, unfold + one PAM product per group) computes, forward and both gradients."""
    for kw in (dict(stride=2, padding=1), dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
               dict(stride=2, padding=1, groups=4)):
        cg = 4 // kw.get("groups", 1)
        x = randn(2, 4, 9, 8, seed=5).to(dtype).detach().requires_grad_()
        w = randn(8, cg, 3, 3, seed=6).to(dtype).detach().requires_grad_()
        b = randn(8, seed=7).to(dtype).detach().requires_grad_()
        gy = None
        with pamtorch.mode(cfg(derivative)):
            y = F.conv2d(x, w, b, **kw)
            gy = torch.randn(y.shape, generator=gen(8)).to(dtype)
            grads = torch.autograd.grad(y, (x, w, b), gy)
        y2 = pamtorch.conv2d(x, w, b, derivative=derivative, **kw)
        grads2 = torch.autograd.grad(y2, (x, w, b), gy)
        assert torch.equal(y, y2)
        for g1, g2 in zip(grads, grads2):
            assert torch.equal(g1, g2)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_per_sample_path_equals_the_grouped_product_bit_for_bit(monkeypatch, dims):
    """Ungrouped convolutions with the approx derivative run as one PAM product per sample
    (ops.conv._per_sample); it must give the bits of the one grouped product over all samples,
    forward and both gradients, with zeros, signed zeros, subnormals and infs in the input."""
    from pamtorch.ops import conv as C

    size = {1: (23,), 2: (9, 8), 3: (5, 6, 4)}[dims]
    x = randn(3, 4, *size, seed=11).detach()
    flat = x.view(-1)
    flat[:6] = torch.tensor([0.0, -0.0, 1e-40, float("inf"), -3e38, 2.0 ** -126])
    x.requires_grad_()
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dims - 1]
    results = []
    for per_sample in (True, False):
        monkeypatch.setattr(C, "_per_sample", lambda p, opcfg, on=per_sample: on and p.groups == 1
                            and not p.transposed and opcfg.derivative != "exact")
        torch.manual_seed(0)
        m = conv(4, 6, 3, stride=2, padding=1, dilation=1 + (dims == 1))
        with pamtorch.mode(cfg("approx")):
            y = m(x)
            grads = torch.autograd.grad(y, (x, m.weight, m.bias), torch.randn(y.shape, generator=gen(3)))
        results.append([y, *grads])
    for a, b in zip(*results):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        assert torch.equal(a.nan_to_num().view(torch.int32), b.nan_to_num().view(torch.int32))


def test_offset_applies_to_every_product():
    """A matmul offset enters every product term, PAM(w, x, offset=α), as for aten.mm (not
    one PAM per output)."""
    off = 1.0552
    x, w = randn(2, 4, 11, seed=3), randn(6, 2, 3, seed=4)
    with pamtorch.mode(Config.full().replace(matmul=OpConfig(offset=off))):
        y = F.conv1d(x, w, stride=2, groups=2)
    patches = x.unfold(2, 3, 2).reshape(2, 2, 1, 2, 5, 3)          # [n, g, 1, c/g, L, k]
    terms = pamtorch.arith.pam(w.reshape(1, 2, 3, 2, 1, 3), patches, off)  # [n, g, oc/g, c/g, L, k]
    want = terms.double().sum((3, 5)).reshape(2, 6, 5)
    assert torch.allclose(y.double(), want, rtol=0, atol=1e-5)
    with pamtorch.mode(cfg()):
        y0 = F.conv1d(x, w, stride=2, groups=2)
    assert not torch.equal(y, pamtorch.arith.pam(y0, torch.tensor(off)))


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_every_padding_mode_passes_through_unchanged(padding_mode, dims):
    """reflect/replicate/circular padding are copies (nn.ConvNd pads with F.pad before the
    convolution): under the mode the padded input is torch's, bit for bit, and the
    convolution equals the same convolution of torch's padded input."""
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    torch.manual_seed(0)
    m = conv_cls(2, 3, 3, padding=1, padding_mode=padding_mode)
    x = randn(1, 2, *[5] * dims, seed=9)
    with pamtorch.mode(cfg()):
        y = m(x)
        gx, = torch.autograd.grad(y.sum(), x)
    if padding_mode == "zeros":
        padded, conv_pad = x, 1
    else:
        padded, conv_pad = F.pad(x, [1] * (2 * dims), mode=padding_mode), 0
    with pamtorch.mode(cfg()):
        y2 = m._conv_forward(padded, m.weight, m.bias) if padding_mode == "zeros" else \
            {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims](padded, m.weight, m.bias, padding=conv_pad)
    assert torch.equal(y, y2)
    gx_t, = torch.autograd.grad(m(x).sum(), x)
    assert rel(gx, gx_t) < 0.08


class _SpyFloatOps(TorchDispatchMode):
    """Records every aten op that runs below pamtorch's mode, the PA implementations' own
    ops included: free when no float tensor is involved or the op is declared free of
    multiplication (pass-through, without an ``alpha``)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        floats = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
                  and t.is_floating_point()]
        free = func.overloadpacket in PASS_THROUGH and kwargs.get("alpha", 1) == 1
        self.seen.append((func, "free" if free or not floats else "may multiply"))
        return func(*args, **kwargs)


@pytest.mark.parametrize("derivative", ["approx", "exact"])
def test_no_float_multiplication_runs_inside_the_convolutions(derivative):
    """Every float op that runs, inside the PA implementations included, is free of
    multiplication (views, copies, pads, folds, sums): no mul/div/conv/mm aten op."""
    spy = _SpyFloatOps()
    with spy:
        for name in CASES:
            run_case(name, cfg(derivative))
    ops = {f.overloadpacket.__name__ for f, c in spy.seen}
    bad = sorted({str(f) for f, c in spy.seen if c != "free"})
    assert not bad, f"multiply-like ops ran: {bad}"
    assert {"col2im", "as_strided", "pad"} <= ops   # the spy does see inside the implementations
    assert not ops & {"mul", "div", "convolution", "mm", "bmm", "convolution_backward"}


def test_depthwise_strided_model_regression():
    """issue 9: a MobileNet-style block (depthwise 3x3 stride 2, groups=channels, stride
    given as a one-element list as dual 1-D/2-D code writes it) crashed with IndexError
    in the convolution shape code; now it trains, its gradients close to torch's."""

    class DepthwiseStrided(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.dw = nn.Parameter(torch.randn(c, 1, 3, 3) * 0.3)
            self.pw = nn.Conv2d(c, 2 * c, 1)
            self.head = nn.Linear(2 * c, 3)

        def forward(self, x):
            x = F.conv2d(x, self.dw, None, [2], [1], [1], self.dw.shape[0])   # depthwise, stride 2
            x = F.relu6(self.pw(x))
            return self.head(x.mean((2, 3)))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, groups=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), DepthwiseStrided(8))
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 1])
    ref = torch.autograd.grad(F.cross_entropy(model(x), t), list(model.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pamtorch.mode(Config.full()):
        loss = F.cross_entropy(model(x), t)
        opt.zero_grad()
        loss.backward()
    for p, r in zip(model.parameters(), ref):   # PA errors add up over the layers: compare directions
        assert p.grad.shape == r.shape and F.cosine_similarity(p.grad.flatten(), r.flatten(), 0) > 0.85
    with pamtorch.mode(Config.full()):
        opt.step()
    assert torch.isfinite(torch.cat([p.detach().flatten() for p in model.parameters()])).all()


def _train_step(model, x, loss_fn):
    ps = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pamtorch.mode(Config.full()):
        loss = loss_fn(model(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(not torch.equal(a, p.detach()) for a, p in zip(ps, model.parameters()))


def test_conv1d_conv3d_and_conv_transpose_models_train_one_step():
    torch.manual_seed(0)
    conv1d = nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, padding=1, padding_mode="reflect"), nn.ReLU(),
                           nn.Conv1d(4, 4, 3, groups=4, dilation=2), nn.Flatten(), nn.LazyLinear(1))
    conv1d(torch.randn(1, 2, 12))   # materialise the lazy layer outside the mode
    _train_step(conv1d, torch.randn(3, 2, 12), lambda y: (y ** 2).mean())
    conv3d = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                           nn.Conv3d(4, 2, (2, 3, 1), stride=(1, 2, 1)), nn.Flatten(), nn.LazyLinear(2))
    conv3d(torch.randn(1, 1, 4, 5, 4))
    _train_step(conv3d, torch.randn(2, 1, 4, 5, 4), lambda y: F.cross_entropy(y, torch.tensor([0, 1])))
    decoder = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(),
                            nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1),
                            nn.ReLU(), nn.ConvTranspose2d(2, 1, 3, padding=1, groups=1))
    x = torch.randn(2, 1, 8, 8)
    _train_step(decoder, x, lambda y: ((y - x) ** 2).mean())


def test_backend_convolution_ops_called_directly_are_routed():
    """The backend-specific convolution ops (what aten.convolution calls below the mode)
    are PA too when user code calls them directly, and their out= forms write out."""
    x, w, b = randn(1, 4, 6, 6, seed=11), randn(4, 2, 3, 3, seed=12), randn(4, seed=13)
    x3, w3 = randn(1, 2, 4, 4, 4, seed=14), randn(2, 2, 2, 2, 2, seed=15)
    wt = randn(4, 3, 3, 3, seed=16)
    with pamtorch.mode(cfg()):
        ref = aten.convolution(x, w, b, [2, 1], [1, 1], [1, 1], False, [0, 0], 2)
        ref1 = aten.convolution(x, w[:, :1].expand(4, 1, 3, 3).contiguous(), None, [1, 1], [0, 0], [2, 2],
                                False, [0, 0], 4)
        ref3 = aten.convolution(x3, w3, None, [1, 1, 1], [1, 1, 1], [1, 1, 1], False, [0, 0, 0], 1)
        reft = aten.convolution(x, wt, None, [2, 2], [1, 1], [1, 1], True, [1, 1], 1)
        w1 = w[:, :1].expand(4, 1, 3, 3).contiguous()
        same = [
            (ref, aten._convolution(x, w, b, [2, 1], [1, 1], [1, 1], False, [0, 0], 2, False, False, True, True)),
            (ref, aten.mkldnn_convolution(x, w, b, [1, 1], [2, 1], [1, 1], 2)),
            (ref, aten.miopen_convolution(x, w, b, [1, 1], [2, 1], [1, 1], 2, False, False)),
            (ref1, aten._conv_depthwise2d(x, w1, [3, 3], None, [1, 1], [0, 0], [2, 2])),
            (ref3, aten.slow_conv3d(x3, w3, [2, 2, 2], None, [1, 1, 1], [1, 1, 1])),
            (ref3, aten.slow_conv_dilated3d(x3, w3, [2, 2, 2], None, [1, 1, 1], [1, 1, 1], [1, 1, 1])),
            (reft, aten.slow_conv_transpose2d(x, wt, [3, 3], None, [2, 2], [1, 1], [1, 1], [1, 1])),
            (reft, aten.cudnn_convolution_transpose(x, wt, [1, 1], [1, 1], [2, 2], [1, 1], 1, False, False,
                                                    False)),
        ]
        out = torch.empty(0)
        aten.convolution.out(x, w, b, [2, 1], [1, 1], [1, 1], False, [0, 0], 2, out=out)
        same.append((ref, out))
        wg = w[:, :2].contiguous().reshape(4, 2, 3, 3)[:, :1].expand(4, 4, 3, 3).contiguous()
        y2 = aten._slow_conv2d_forward(x, wg, [3, 3], b, [1, 1], [1, 1])
        gi, gw, gb = aten._slow_conv2d_backward(torch.ones_like(y2), x, wg, [3, 3], [1, 1], [1, 1],
                                                [True, True, True])
        gi2, gw2, gb2 = aten.convolution_backward(torch.ones_like(y2), x, wg, [4], [1, 1], [1, 1], [1, 1],
                                                  False, [0, 0], 1, [True, True, True])
    for r, o in same:
        assert torch.equal(r, o)
    assert torch.equal(gi, gi2) and torch.equal(gw, gw2) and torch.equal(gb, gb2)
    assert rel(ref, F.conv2d(x, w, b, stride=(2, 1), padding=1, groups=2)) < 0.08


def test_conv_tbc_forward_and_backward():
    x, w, b = randn(7, 2, 3, seed=17), randn(3, 3, 4, seed=18), randn(4, seed=19)
    with pamtorch.mode(cfg()):
        y = torch.conv_tbc(x, w, b, 1)
        g = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    ref = F.conv1d(x.permute(1, 2, 0), w.permute(2, 1, 0), b, padding=1).permute(2, 0, 1)
    assert y.shape == ref.shape and rel(y, ref) < 0.08
    g_ref = torch.autograd.grad(ref, (x, w, b), torch.ones_like(ref))
    for a, r in zip(g, g_ref):
        assert a.shape == r.shape and rel(a, r) < 0.08


@pytest.mark.parametrize("call, match", [
    (lambda x, w: aten.convolution(x, w, None, [1, 1, 1], [0], [1], False, [0], 1), "stride"),
    (lambda x, w: aten.convolution(x, w, None, [1], [-1], [1], False, [0], 1), "padding"),
    (lambda x, w: aten.convolution(x, w, None, [1], [0], [1], False, [0], 3), "groups=3"),
    (lambda x, w: aten.convolution(x, w[:, :, 0], None, [1], [0], [1], False, [0], 1), "same rank"),
    (lambda x, w: aten.convolution(x, w, None, [1], [0], [1], True, [2], 1), "output_padding"),
    (lambda x, w: aten.convolution(x[:, :, :1, :1], w, None, [1], [0], [1], False, [0], 1), "larger than"),
])
def test_bad_convolution_arguments_name_the_argument(call, match):
    x, w = torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3)
    with pamtorch.mode(cfg()), pytest.raises(RuntimeError, match=match):
        call(x, w)
