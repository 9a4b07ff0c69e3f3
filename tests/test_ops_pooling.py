"""Pooling and resampling under pamtorch.mode: average/adaptive-average pooling, linear,
bilinear, bicubic and trilinear upsampling, _embedding_bag (PA), and the max pooling,
nearest upsampling and shuffles that pass through. Forward and backward are checked
against float64 references written from the definitions (tests/reference.py's PAM/PAD),
against Mitchell's error bound around torch's exact result, and bit for bit where an op
passes through."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from reference import pad as ref_pad, pam as ref_pam, to_f64

import pamtorch
from pamtorch import arith
from pamtorch.config import Config, OpConfig
from pamtorch.ops import PASS_THROUGH

F32 = torch.float32
EPS = 2.0 ** -23
MITCHELL = 1 / 9 + 1e-6   # largest relative error of one PAM (at mantissas 1/2, 1/2)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, grad=True):
    return torch.randn(*shape, generator=gen(seed)).requires_grad_(grad)


def cfg(derivative="approx"):
    return Config.full().replace(elementwise=OpConfig(derivative=derivative))


def under_mode(fn, x, gy_seed=1, config=None, extra=()):
    """(y, grads) of ``fn(x)`` under the mode, the upstream gradient seeded."""
    with pamtorch.mode(config or cfg()):
        y = fn(x)
        gy = torch.randn(y.shape, generator=gen(gy_seed))
        grads = torch.autograd.grad(y, (x, *extra), gy)
    return y, gy, grads


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------
# average pooling: window sums (additions) divided by the count with PAD

def windows(size, k, s, p, ceil_mode, include_pad, override=None):
    """Per output: (positions inside the input, divisor), from torch's documented rules."""
    n_out = (size + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (n_out - 1) * s >= size + p:
        n_out -= 1
    out = []
    for o in range(n_out):
        lo, hi = o * s - p, min(o * s - p + k, size + p)
        inside = [i for i in range(lo, hi) if 0 <= i < size]
        out.append((inside, hi - lo if include_pad else len(inside)))
    return out


def avg_pool_reference(x, per_dim, override, derivative_g=None, exact=False):
    """float64 PA reference over all spatial dims: y = PAD(sum of window, count); with
    ``derivative_g`` the approx (PAD(g, count)) or exact (sign·2^(-E_c-b)·g) input gradient."""
    x64 = to_f64(x)
    d = len(per_dim)
    lead = x64.shape[:-d]
    y = np.zeros(lead + tuple(len(w) for w in per_dim))
    gx = np.zeros_like(x64)
    for o in itertools.product(*[range(len(w)) for w in per_dim]):
        pos = [per_dim[i][o[i]][0] for i in range(d)]
        count = override or math.prod(per_dim[i][o[i]][1] for i in range(d))
        sel = (Ellipsis,) + np.ix_(*pos)
        s = x64[sel].reshape(*lead, -1).sum(-1)
        y[(Ellipsis,) + o] = ref_pad(np.float32(s), float(count), F32)
        if derivative_g is not None:
            g = to_f64(derivative_g)[(Ellipsis,) + o]
            if exact:   # d PAD(s, c)/ds = 2^(-E_c - b), borrow b = [M_s < M_c]
                mant = lambda v: np.where(v == 0, 0.0, 2 * np.frexp(np.abs(v))[0] - 1)   # noqa: E731
                borrow = mant(np.float32(s)) < mant(np.float32(count))
                e_c = np.frexp(np.float32(count))[1] - 1
                dg = g * np.ldexp(1.0, (-e_c - borrow).astype(np.int32))
            else:
                dg = ref_pad(g, float(count), F32)
            gx[sel] += dg.reshape(*lead, *[1] * d)
    return y, gx


AVG_CASES = {
    "1d": (1, (2, 3, 9), dict(kernel_size=3, stride=2, padding=1)),
    "1d-ceil-exclude-pad": (1, (2, 3, 10), dict(kernel_size=4, stride=3, padding=2, ceil_mode=True,
                                                count_include_pad=False)),
    "2d-ceil": (2, (2, 3, 8, 7), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    "2d-exclude-pad": (2, (2, 3, 8, 7), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1),
                                             count_include_pad=False)),
    "2d-divisor-override": (2, (1, 2, 6, 7), dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0),
                                                  divisor_override=5)),
    "2d-unbatched": (2, (3, 7, 6), dict(kernel_size=3, stride=2)),
    "3d": (3, (1, 2, 5, 6, 5), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True,
                                    count_include_pad=False)),
}
AVG_FN = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@pytest.mark.parametrize("derivative", ["approx", "exact"])
@pytest.mark.parametrize("name", list(AVG_CASES))
def test_avg_pool_equals_pad_of_the_window_sums(name, derivative):
    d, shape, kw = AVG_CASES[name]
    x = randn(*shape, seed=2)
    y, gy, (gx,) = under_mode(lambda t: AVG_FN[d](t, **kw), x, config=cfg(derivative))
    y_t = AVG_FN[d](x, **kw)
    assert y.shape == y_t.shape
    pick = lambda v, i: v[i] if isinstance(v, (tuple, list)) else v      # noqa: E731
    per_dim = [windows(shape[-d + i], pick(kw["kernel_size"], i), pick(kw.get("stride", kw["kernel_size"]), i),
                       pick(kw.get("padding", 0), i), kw.get("ceil_mode", False),
                       kw.get("count_include_pad", True)) for i in range(d)]
    ref, gref = avg_pool_reference(x, per_dim, kw.get("divisor_override"), gy, derivative == "exact")
    scale = np.abs(to_f64(x)).max()
    assert np.abs(to_f64(y) - ref).max() <= 64 * EPS * scale
    assert np.abs(to_f64(gx) - gref).max() <= 64 * EPS * np.abs(to_f64(gy)).max()
    if derivative == "approx":   # and the exact function's result within PAD's error
        gx_t, = torch.autograd.grad(y_t, x, gy)
        assert rel(y, y_t) < 0.12 and rel(gx, gx_t) < 0.12


def test_avg_pool_with_power_of_two_windows_is_exact():
    """PAD by a power of two is exact, so a 2x2 average pooling equals torch's."""
    x = randn(2, 3, 6, 8, seed=3)
    y, gy, (gx,) = under_mode(lambda t: F.avg_pool2d(t, 2), x)
    assert torch.allclose(y, F.avg_pool2d(x, 2), rtol=1e-6, atol=1e-7)
    assert torch.equal(gx, torch.autograd.grad(F.avg_pool2d(x, 2), x, gy)[0])


@pytest.mark.parametrize("d, shape, out", [(1, (2, 3, 9), (4,)), (2, (2, 3, 8, 7), (3, 5)),
                                           (2, (2, 3, 5, 5), (7, 6)), (3, (1, 2, 5, 6, 5), (2, 3, 4))])
def test_adaptive_avg_pool_equals_pad_of_the_window_sums(d, shape, out):
    fn = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[d]
    x = randn(*shape, seed=4)
    y, gy, (gx,) = under_mode(lambda t: fn(t, out), x)
    per_dim = []
    for n, o in zip(shape[-d:], out):   # windows [floor(i·n/o), ceil((i+1)·n/o)), from the definition
        ws = [list(range(math.floor(i * n / o), math.ceil((i + 1) * n / o))) for i in range(o)]
        per_dim.append([(w, len(w)) for w in ws])
    ref, gref = avg_pool_reference(x, per_dim, None, gy)
    assert np.abs(to_f64(y) - ref).max() <= 64 * EPS * np.abs(to_f64(x)).max()
    assert np.abs(to_f64(gx) - gref).max() <= 64 * EPS * np.abs(to_f64(gy)).max()
    gx_t, = torch.autograd.grad(fn(x, out), x, gy)
    assert rel(y, fn(x, out)) < 0.12 and rel(gx, gx_t) < 0.12


def test_global_average_pool_is_the_mean_route():
    """AdaptiveAvgPool2d(1) reaches aten.mean: the same PAD of the sum."""
    x = randn(2, 3, 5, 7, seed=5, grad=False)
    with pamtorch.mode(cfg()):
        y = nn.AdaptiveAvgPool2d(1)(x)
    assert torch.equal(y, arith.pad(x.sum((2, 3), keepdim=True), torch.tensor(35.0)))


# ---------------------------------------------------------------------------
# interpolation: y = x_base + sum_t PAM(w_t, x_t - x_base)

def interpolation_matrix(n, out, mode, align_corners):
    """The exact weights M[o, i] (float64 torch on the unit vectors) of a 1-D resampling."""
    eye = torch.eye(n, dtype=torch.float64)
    if mode == "linear":
        m = F.interpolate(eye[:, None, :], size=out, mode="linear", align_corners=align_corners)[:, 0]
    else:   # bicubic along the last dim only (an unchanged dim is the identity)
        m = F.interpolate(eye[:, None, None, :].expand(n, 1, 4, n), size=(4, out), mode="bicubic",
                          align_corners=align_corners)[:, 0, 0]
    return m.t().numpy()   # [out, n]


def check_mitchell_bound(y, x, gy, gx, m):
    """|y - M x| <= (1/9) sum_i |M[o,i]| range(x over the taps of o), and the transpose for
    the gradient: one PAM per tap, each within Mitchell's relative error."""
    x64, y64, g64, gx64 = to_f64(x), to_f64(y), to_f64(gy), to_f64(gx)
    taps = np.abs(m) > 0
    exact = x64 @ m.T
    spread = np.stack([np.ptp(x64[..., t], axis=-1) if t.sum() > 1 else np.zeros(x64.shape[:-1])
                       for t in taps], -1)
    bound = MITCHELL * np.abs(m).sum(1) * spread + 8 * EPS * np.abs(x64).max()
    assert (np.abs(y64 - exact) <= bound).all()
    gexact = g64 @ m
    gbound = MITCHELL * (np.abs(g64) * np.abs(m).sum(1)) @ taps + 8 * EPS * np.abs(g64).max()
    assert (np.abs(gx64 - gexact) <= gbound).all()


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("n, out", [(5, 11), (7, 3), (6, 6), (4, 9)])
def test_linear_upsampling_is_within_mitchell_error_of_the_exact_interpolation(n, out, align_corners):
    x = randn(2, 3, n, seed=6)
    fn = lambda t: F.interpolate(t, size=out, mode="linear", align_corners=align_corners)   # noqa: E731
    y, gy, (gx,) = under_mode(fn, x)
    check_mitchell_bound(y, x, gy, gx, interpolation_matrix(n, out, "linear", align_corners))


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("n, out", [(5, 11), (7, 4), (4, 9)])
def test_bicubic_upsampling_is_within_mitchell_error_of_the_exact_interpolation(n, out, align_corners):
    x = randn(2, 3, 4, n, seed=7)
    fn = lambda t: F.interpolate(t, size=(4, out), mode="bicubic", align_corners=align_corners)   # noqa: E731
    y, gy, (gx,) = under_mode(fn, x)
    check_mitchell_bound(y, x, gy, gx, interpolation_matrix(n, out, "bicubic", align_corners))


@pytest.mark.parametrize("mode, shape, size", [("bilinear", (2, 3, 4, 5), (7, 9)), ("bicubic", (2, 3, 4, 5), (9, 7)),
                                               ("trilinear", (1, 2, 3, 4, 3), (5, 7, 4))])
@pytest.mark.parametrize("align_corners", [False, True])
def test_2d_and_3d_interpolation_is_1d_interpolation_along_each_dimension(mode, shape, size, align_corners):
    """Separable: the last dimension first, then the others; forward and backward, bit for
    bit; close to torch; exact on constant inputs (the lerp form)."""
    x = randn(*shape, seed=8)
    fn = lambda t: F.interpolate(t, size=size, mode=mode, align_corners=align_corners)   # noqa: E731
    y, gy, (gx,) = under_mode(fn, x)
    d = len(size)

    def one_dim(t, dim):   # resample dimension ``dim`` only (the others keep their size)
        full = list(t.shape[2:])
        full[dim] = size[dim]
        return F.interpolate(t, size=full, mode=mode, align_corners=align_corners)

    with pamtorch.mode(cfg()):
        z = x
        for dim in reversed(range(d)):
            z = one_dim(z, dim)
        gz, = torch.autograd.grad(z, x, gy)
    assert torch.equal(y, z) and torch.equal(gx, gz)
    y_t = fn(x)
    gx_t, = torch.autograd.grad(y_t, x, gy)
    assert rel(y, y_t) < 0.1 and rel(gx, gx_t) < 0.1
    flat = torch.full(shape, 0.7)
    with pamtorch.mode(cfg()):
        assert torch.equal(fn(flat), torch.full(y.shape, 0.7))


def test_scale_factor_and_half_precision_upsampling():
    x = randn(1, 2, 3, 4, seed=9, grad=False)
    with pamtorch.mode(cfg()):
        a = F.interpolate(x, scale_factor=2.5, mode="bilinear")
        b = F.interpolate(x.bfloat16(), scale_factor=2.5, mode="bilinear")
    ref = F.interpolate(x, scale_factor=2.5, mode="bilinear")
    assert a.shape == ref.shape == b.shape and b.dtype == torch.bfloat16
    assert rel(a, ref) < 0.1 and rel(b.float(), a) < 0.01


# ---------------------------------------------------------------------------
# _embedding_bag

def bag_reference(w, idx, offsets, mode, psw, pidx, include_last, gy, sgbf):
    """float64 reference from the definitions: bag sums (PAM by per-sample weights), means
    (PAD by the bag size, padding entries not counted), and their approx gradients."""
    w64, idx = to_f64(w), idx.tolist()
    starts = offsets.tolist()[:-1] if include_last else offsets.tolist()
    ends = starts[1:] + [len(idx)]
    y = np.zeros((len(starts), w64.shape[1]))
    gw = np.zeros_like(w64)
    gpsw = np.zeros(len(idx))
    g64 = to_f64(gy)
    counts = {v: sum(1 for u in idx if u == v and u != pidx) for v in set(idx)}
    for b, (lo, hi) in enumerate(zip(starts, ends)):
        members = [i for i in range(lo, hi) if idx[i] != pidx]
        for i in members:
            row = w64[idx[i]] if psw is None else ref_pam(w64[idx[i]], float(psw[i]), F32)
            y[b] += row
            grow = g64[b] if psw is None else ref_pam(g64[b], float(psw[i]), F32)
            if mode == "mean":
                grow = ref_pad(np.float32(g64[b]), float(len(members)), F32)
            if sgbf:
                grow = ref_pad(np.float32(grow), float(counts[idx[i]]), F32)
            gw[idx[i]] += grow
            if psw is not None:
                gpsw[i] = ref_pam(g64[b], w64[idx[i]], F32).sum()
        if mode == "mean" and members:
            y[b] = ref_pad(np.float32(y[b]), float(len(members)), F32)
    return y, gw, gpsw


BAG_CASES = [
    dict(mode="sum"), dict(mode="sum", per_sample_weights=True), dict(mode="mean"),
    dict(mode="mean", padding_idx=4), dict(mode="sum", per_sample_weights=True, padding_idx=4),
    dict(mode="mean", include_last_offset=True), dict(mode="sum", scale_grad_by_freq=True),
    dict(mode="mean", scale_grad_by_freq=True, padding_idx=2),
]


@pytest.mark.parametrize("kw", BAG_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_embedding_bag_sums_and_means_equal_the_float64_reference(kw):
    """Note scale_grad_by_freq: torch 2.13's CPU backward divides some rows by another
    index's count (pytorch/pytorch#190063); the reference here is the documented rule, which
    CUDA follows: each index's row gradient divided by that index's frequency."""
    kw = dict(kw)
    idx = torch.tensor([1, 2, 4, 5, 4, 3, 7, 4, 2])
    offsets = torch.tensor([0, 2, 2, 5] + ([9] if kw.get("include_last_offset") else []))
    w = randn(10, 3, seed=10)
    psw = randn(9, seed=11) if kw.pop("per_sample_weights", False) else None
    extra = (psw,) if psw is not None else ()
    fn = lambda t: F.embedding_bag(idx, t, offsets, per_sample_weights=psw, **kw)   # noqa: E731
    y, gy, grads = under_mode(fn, w, extra=extra)
    ref, gw_ref, gpsw_ref = bag_reference(w, idx, offsets, kw["mode"], None if psw is None else to_f64(psw),
                                          kw.get("padding_idx", -1), kw.get("include_last_offset", False),
                                          gy, kw.get("scale_grad_by_freq", False))
    tol = 16 * EPS * (np.abs(ref).max() + 1)
    assert np.abs(to_f64(y) - ref).max() <= tol
    assert np.abs(to_f64(grads[0]) - gw_ref).max() <= 16 * EPS * (np.abs(gw_ref).max() + 1)
    if psw is not None:
        assert np.abs(to_f64(grads[1]) - gpsw_ref).max() <= 16 * EPS * (np.abs(gpsw_ref).max() + 1)
    y_t = fn(w)
    assert y.shape == y_t.shape and rel(y, y_t) < 0.1
    if kw["mode"] == "sum" and psw is None:   # plain sums are additions only: torch's own op, bit for bit
        assert torch.equal(y, y_t)


def test_embedding_bag_auxiliary_outputs_max_mode_and_sparse_gradients():
    aten = torch.ops.aten
    w = randn(10, 3, seed=12)
    idx, offsets = torch.tensor([1, 2, 4, 5, 4, 3, 7]), torch.tensor([0, 2, 2, 5])
    for mode, pidx, psw in [(1, -1, None), (1, 4, None), (0, -1, torch.rand(7)), (0, 4, torch.rand(7))]:
        with pamtorch.mode(cfg()):
            ours = aten._embedding_bag(w, idx, offsets, False, mode, False, psw, False, pidx)
        theirs = aten._embedding_bag(w, idx, offsets, False, mode, False, psw, False, pidx)
        for a, b in zip(ours[1:], theirs[1:]):
            assert torch.equal(a, b)
    # max bags compare only: forward and backward are torch's, bit for bit
    fn = lambda t: F.embedding_bag(idx, t, offsets, mode="max")   # noqa: E731
    y, gy, (gw,) = under_mode(fn, w)
    assert torch.equal(y, fn(w)) and torch.equal(gw, torch.autograd.grad(fn(w), w, gy)[0])
    # sparse gradients hold the same rows as the dense ones
    for mode in ("sum", "mean"):
        dense = under_mode(lambda t: F.embedding_bag(idx, t, offsets, mode=mode), w)[2][0]
        sparse = under_mode(lambda t: F.embedding_bag(idx, t, offsets, mode=mode, sparse=True), w)[2][0]
        assert sparse.is_sparse and torch.equal(sparse.to_dense(), dense)


# ---------------------------------------------------------------------------
# pass-through ops: exactly torch's results

PASS = {
    "max_pool1d": (lambda t: F.max_pool1d(t, 3, 2, 1), (2, 3, 9)),
    "max_pool3d": (lambda t: F.max_pool3d(t, 2, 2, ceil_mode=True), (1, 2, 5, 4, 5)),
    "adaptive_max_pool1d": (lambda t: F.adaptive_max_pool1d(t, 4), (2, 3, 9)),
    "adaptive_max_pool2d": (lambda t: F.adaptive_max_pool2d(t, (3, 2)), (2, 3, 7, 5)),
    "adaptive_max_pool3d": (lambda t: F.adaptive_max_pool3d(t, 2), (1, 2, 5, 4, 5)),
    "upsample_nearest1d": (lambda t: F.interpolate(t, scale_factor=2, mode="nearest"), (2, 3, 5)),
    "upsample_nearest2d": (lambda t: F.interpolate(t, size=(7, 3), mode="nearest"), (2, 3, 4, 5)),
    "upsample_nearest3d": (lambda t: F.interpolate(t, scale_factor=2, mode="nearest"), (1, 2, 3, 2, 3)),
    "nearest_exact": (lambda t: F.interpolate(t, size=(7, 3), mode="nearest-exact"), (2, 3, 4, 5)),
    "pixel_shuffle": (lambda t: F.pixel_unshuffle(F.pixel_shuffle(t, 2), 2), (1, 8, 3, 3)),
    "channel_shuffle": (lambda t: F.channel_shuffle(t, 2), (1, 4, 3, 3)),
    "max_unpool2d": (lambda t: F.max_unpool2d(*F.max_pool2d(t, 2, return_indices=True), 2), (1, 2, 4, 6)),
}


@pytest.mark.parametrize("name", list(PASS))
def test_max_pooling_nearest_upsampling_and_shuffles_pass_through_bit_for_bit(name):
    fn, shape = PASS[name]
    x = randn(*shape, seed=13)
    y, gy, (gx,) = under_mode(fn, x)
    y_t = fn(x)
    assert torch.equal(y, y_t) and torch.equal(gx, torch.autograd.grad(y_t, x, gy)[0])


# ---------------------------------------------------------------------------
# no float multiplication, and models

class _Spy(TorchDispatchMode):
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
def test_no_float_multiplication_runs_inside_pooling_and_resampling(derivative):
    spy = _Spy()
    with spy:
        for name, (d, shape, kw) in AVG_CASES.items():
            under_mode(lambda t: AVG_FN[d](t, **kw), randn(*shape), config=cfg(derivative))
        under_mode(lambda t: F.adaptive_avg_pool3d(t, (2, 3, 4)), randn(1, 2, 5, 6, 5), config=cfg(derivative))
        for mode, shape in [("linear", (1, 2, 5)), ("bilinear", (1, 2, 4, 5)), ("bicubic", (1, 2, 4, 5)),
                            ("trilinear", (1, 1, 3, 4, 3))]:
            for ac in (False, True):
                under_mode(lambda t: F.interpolate(t, scale_factor=2, mode=mode, align_corners=ac),
                           randn(*shape), config=cfg(derivative))
        idx, off = torch.tensor([1, 2, 4, 5, 4]), torch.tensor([0, 2])
        psw = randn(5)
        under_mode(lambda t: F.embedding_bag(idx, t, off, mode="mean"), randn(6, 3), config=cfg(derivative))
        under_mode(lambda t: F.embedding_bag(idx, t, off, mode="sum", per_sample_weights=psw), randn(6, 3),
                   config=cfg(derivative), extra=(psw,))
    bad = sorted({str(f) for f, c in spy.seen if c != "free"})
    assert not bad, f"multiply-like ops ran: {bad}"
    names = {f.overloadpacket.__name__ for f, c in spy.seen}
    assert {"index_select", "index_add_"} <= names   # the spy sees inside the implementations
    assert not names & {"mul", "div", "avg_pool2d", "upsample_bilinear2d", "_embedding_bag_backward"}


class EncoderDecoder(nn.Module):
    """Conv encoder, adaptive average pooling to a fixed grid, bilinear and bicubic
    upsampling back, and a pooled classifier head."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((3, 3))
        self.avg = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.dec = nn.Conv2d(6, 3, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = F.relu(self.enc(x))
        z = self.pool(h)
        up = F.interpolate(z, size=x.shape[2:], mode="bilinear", align_corners=False)
        up = up + F.interpolate(self.avg(h), size=x.shape[2:], mode="bicubic")
        return self.dec(up), self.head(z.mean((2, 3)))


def _train_one_step(model, x, loss_fn):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]

    def step():
        with pamtorch.mode(Config.full()):
            loss = loss_fn(model(x))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss

    report = pamtorch.audit(step, model=model)
    report.assert_multiplication_free()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    return report


def test_encoder_decoder_with_adaptive_pooling_and_upsampling_trains_one_step():
    torch.manual_seed(0)
    model = EncoderDecoder()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 3])
    report = _train_one_step(model, x, lambda out: F.mse_loss(out[0], x) + F.cross_entropy(out[1], t))
    forward, backward = report.pa["forward"], report.pa["backward"]
    assert forward["_adaptive_avg_pool2d"] and forward["upsample_bilinear2d"] and forward["upsample_bicubic2d"]
    assert backward["_adaptive_avg_pool2d_backward"] and backward["upsample_bilinear2d_backward"]
    assert backward["avg_pool2d_backward"]


def test_embedding_bag_and_1d_3d_pooling_models_train_one_step():
    torch.manual_seed(0)
    bag = nn.Sequential(nn.EmbeddingBag(20, 8, mode="mean"), nn.Linear(8, 2))
    idx = torch.randint(0, 20, (3, 5))
    _train_one_step(bag, idx, lambda y: F.cross_entropy(y, torch.tensor([0, 1, 1])))
    seq = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.AvgPool1d(2), nn.MaxPool1d(2), nn.Upsample(scale_factor=3,
                        mode="linear"), nn.AdaptiveAvgPool1d(3), nn.Flatten(), nn.Linear(12, 1))
    _train_one_step(seq, torch.randn(2, 2, 16), lambda y: (y ** 2).mean())
    vol = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.AvgPool3d(2), nn.Upsample(scale_factor=2, mode="trilinear"),
                        nn.MaxPool3d(2), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(2, 1))
    _train_one_step(vol, torch.randn(2, 1, 4, 6, 4), lambda y: (y ** 2).mean())


@pytest.mark.parametrize("call, match", [
    (lambda x: F.avg_pool2d(x, 3, padding=2), "at most half"),
    (lambda x: torch.ops.aten.avg_pool2d(x, [2, 2], [1, 1], [0, 0], False, True, 0), "divisor_override"),
    (lambda x: torch.ops.aten._adaptive_avg_pool2d(x, [0, 2]), "output_size"),
    (lambda x: torch.ops.aten.avg_pool3d(x[0], [2, 2, 2]), "4-D or 5-D"),
    (lambda x: torch.ops.aten._embedding_bag(x[0, 0], torch.tensor([1]), torch.tensor([0]), False, 3), "mode=3"),
])
def test_bad_pooling_arguments_name_the_argument(call, match):
    with pamtorch.mode(cfg()), pytest.raises(RuntimeError, match=match):
        call(torch.randn(1, 2, 5, 5))
