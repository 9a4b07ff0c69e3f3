"""Batch, group, instance and RMS norm in PA arithmetic (pamtorch.ops.norms): forward and
approx backward against torch in float64 within the bounds of docs/nn.md, the running
statistics, every aten spelling of batch norm, the exact derivative, and small CNNs
training under the mode."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import pamtorch
from pamtorch.config import Config
from pamtorch.mode import classify
from pamtorch.ops import OP_TABLE
from pamtorch.ops import norms as N

aten = torch.ops.aten


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def err(y, ref):
    d = (y.double() - ref.double()).abs()
    return d.max().item(), d.mean().item()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def d64(*ts):
    return [None if t is None else t.double() for t in ts]


# ---------------------------------------------------------------------------
# batch norm: raw forward and backward against aten in float64

SHAPES = [(16, 6), (8, 6, 10), (4, 6, 5, 7), (2, 6, 3, 4, 5)]   # BatchNorm1d/1d/2d/3d


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_training_forward_and_running_stats(shape, affine):
    x = torch.randn(shape) * 3 + 1
    w, b = (torch.randn(6), torch.randn(6)) if affine else (None, None)
    rm, rv = torch.randn(6) * 0.5, torch.rand(6) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    rm64, rv64 = rm.double(), rv.double()
    y, mean, invstd = N.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5)
    ry, rmean, rinvstd = aten.native_batch_norm(*d64(x, w, b), rm64, rv64, True, 0.1, 1e-5)
    assert mean.shape == rmean.shape == (6,) and invstd.shape == (6,) and y.dtype == x.dtype
    # the mean is one PAD (exact for n = 2^k); invstd adds PAM squares and PA rsqrt
    assert ((mean.double() - rmean).abs() <= 0.13 * rmean.abs() + 1e-5).all()
    assert ((invstd.double() - rinvstd).abs() / rinvstd).max() < 0.15
    mx, mn = err(y, ry)
    scale = 1 if w is None else 1 + w.abs().max().item()
    assert mx < 0.3 * scale and mn < 0.06
    # running statistics: torch's (1-m)·running + m·batch (unbiased var), here
    # running + m ⊙̂ (batch - running): within PAM/PAD error of the momentum term
    n = x.numel() // 6
    bvar = x.double().transpose(0, 1).reshape(6, -1).var(1)   # unbiased
    assert ((rm.double() - rm64).abs() <= 0.25 * 0.1 * (rmean.abs() + rm0.abs()) + 1e-6).all()
    assert ((rv.double() - rv64).abs() <= 0.4 * 0.1 * (bvar + rv0) + 1e-6).all()
    assert not torch.equal(rm, rm0) and not torch.equal(rv, rv0)
    assert n > 1


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_eval_forward_uses_running_stats(affine):
    x = torch.randn(8, 5, 6, 6) * 2
    w, b = (torch.randn(5), torch.randn(5)) if affine else (None, None)
    rm, rv = torch.randn(5), torch.rand(5) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y, sm, si = N.batch_norm_forward(x, w, b, rm, rv, False, 0.1, 1e-5)
    ry, rsm, rsi = aten.native_batch_norm(*d64(x, w, b, rm, rv), False, 0.1, 1e-5)
    assert sm.shape == rsm.shape == (0,) and si.shape == rsi.shape == (0,)   # aten's CPU convention
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    # PA rsqrt, one or two PAMs, then the bias: relative error of the normalised part
    yn = ry - (0 if b is None else b.double().view(1, 5, 1, 1))
    assert ((y.double() - ry).abs() <= 0.3 * yn.abs() + 1e-5).all()
    assert err(y, ry)[1] < 0.1
    with pytest.raises(ValueError, match="running_mean"):
        N.batch_norm_forward(x, w, b, None, None, False, 0.1, 1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_batch_norm_approx_backward_training(shape):
    x, dy = torch.randn(shape) * 2 + 0.5, torch.randn(shape)
    w = torch.randn(6)
    _, sm, si = N.batch_norm_forward(x, w, None, None, None, True, 0.1, 1e-5)
    dx, dw, db = N.batch_norm_backward(dy, x, w, None, None, sm, si, True, 1e-5, (True, True, True))
    _, rsm, rsi = aten.native_batch_norm(*d64(x, w), None, None, None, True, 0.1, 1e-5)
    rdx, rdw, rdb = aten.native_batch_norm_backward(*d64(dy, x, w), None, None, rsm, rsi, True, 1e-5,
                                                    [True, True, True])
    assert rel(dx, rdx) < 0.08 and rel(dw, rdw) < 0.15
    assert torch.allclose(db.double(), rdb, rtol=1e-5, atol=1e-4)   # a plain sum
    # the centred gradient sums to ~0 per channel, as the exact one does exactly
    dims = (0,) + tuple(range(2, x.dim()))
    assert (dx.double().sum(dims).abs() < 0.1 * dx.double().abs().sum(dims)).all()
    # masks and no weight
    dx2, dw2, db2 = N.batch_norm_backward(dy, x, None, None, None, sm, si, True, 1e-5, (True, False, False))
    assert dw2 is None and db2 is None and dx2.shape == x.shape
    rdx2 = aten.native_batch_norm_backward(*d64(dy, x), None, None, None, rsm, rsi, True, 1e-5,
                                           [True, False, False])[0]
    assert rel(dx2, rdx2) < 0.08


def test_batch_norm_approx_backward_eval():
    x, dy = torch.randn(6, 4, 5, 5), torch.randn(6, 4, 5, 5)
    w, rm, rv = torch.randn(4), torch.randn(4), torch.rand(4) + 0.5
    dx, dw, db = N.batch_norm_backward(dy, x, w, rm, rv, None, None, False, 1e-5, (True, True, True))
    rdx, rdw, rdb = aten.native_batch_norm_backward(*d64(dy, x, w, rm, rv), None, None, False, 1e-5,
                                                    [True, True, True])
    # dx = dy ⊙̂ (invstd ⊙̂ w): elementwise within two PAMs and a PA rsqrt
    assert ((dx.double() - rdx).abs() <= 0.3 * rdx.abs() + 1e-6).all() and rel(dx, rdx) < 0.15
    assert rel(dw, rdw) < 0.15 and torch.allclose(db.double(), rdb, atol=1e-4)


# ---------------------------------------------------------------------------
# group norm

@pytest.mark.parametrize("shape,groups", [((4, 6, 10, 5), 3), ((3, 8, 16), 8), ((5, 4, 2, 2, 3), 1)])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_forward_and_backward(shape, groups, affine):
    x, dy = torch.randn(shape) * 3 + 1, torch.randn(shape)
    n, c, hw = shape[0], shape[1], math.prod(shape[2:])
    w, b = (torch.randn(c), torch.randn(c)) if affine else (None, None)
    y, mean, rstd = N.group_norm_forward(x, w, b, n, c, hw, groups, 1e-5)
    ry, rmean, rrstd = aten.native_group_norm(*d64(x, w, b), n, c, hw, groups, 1e-5)
    assert mean.shape == rmean.shape == (n, groups) and rstd.shape == (n, groups)
    assert ((rstd.double() - rrstd).abs() / rrstd).max() < 0.15
    mx, mn = err(y, ry)
    assert mx < 0.3 * (1 if w is None else 1 + w.abs().max().item()) and mn < 0.06
    mask = [True, affine, affine]
    dx, dw, db = N.group_norm_backward(dy, x, mean, rstd, w, n, c, hw, groups, mask)
    rdx, rdw, rdb = aten.native_group_norm_backward(*d64(dy, x), rmean, rrstd, *d64(w), n, c, hw, groups, mask)
    assert rel(dx, rdx) < 0.08
    if affine:
        assert rel(dw, rdw) < 0.15 and torch.allclose(db.double(), rdb, atol=1e-4)
    else:
        assert dw is None and db is None


def test_group_norm_bad_arguments_are_named():
    x = torch.randn(2, 6, 4)
    with pytest.raises(ValueError, match="divisible"):
        N.group_norm_forward(x, None, None, 2, 6, 4, 4, 1e-5)
    with pytest.raises(ValueError, match="HxW"):
        N.group_norm_forward(x, None, None, 2, 6, 5, 3, 1e-5)
    with pytest.raises(ValueError, match="one per channel"):
        N.batch_norm_forward(x, torch.ones(5), None, None, None, True, 0.1, 1e-5)
    with pytest.raises(ValueError, match=r"\(N, C, \*\)"):
        N.batch_norm_forward(torch.randn(5), None, None, None, None, True, 0.1, 1e-5)


# ---------------------------------------------------------------------------
# under the mode: stock modules route to these functions

def _run(module, x, dy, config=Config.full()):
    x = x.clone().requires_grad_(True)
    with pamtorch.mode(config):
        y = module(x)
        y.backward(dy)
    return y.detach(), x.grad, [p.grad for p in module.parameters()]


@pytest.mark.parametrize("cls,shape", [(nn.BatchNorm1d, (16, 6)), (nn.BatchNorm1d, (8, 6, 10)),
                                       (nn.BatchNorm2d, (4, 6, 5, 7)), (nn.BatchNorm3d, (2, 6, 3, 4, 5))])
def test_batch_norm_modules_under_mode_are_the_raw_functions(cls, shape):
    x, dy = torch.randn(shape) * 2 + 1, torch.randn(shape)
    bn = cls(6)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    rm, rv = bn.running_mean, bn.running_var
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y, dx, (dw, db) = _run(bn, x, dy)
    w, b = bn.weight.detach(), bn.bias.detach()
    ry, sm, si = N.batch_norm_forward(x, w, b, rm_ref, rv_ref, True, 0.1, 1e-5)
    rdx, rdw, rdb = N.batch_norm_backward(dy, x, w, None, None, sm, si, True, 1e-5)
    assert torch.equal(y, ry) and torch.equal(dx, rdx) and torch.equal(dw, rdw) and torch.equal(db, rdb)
    # running statistics updated in place: the same tensor objects, PA values
    assert bn.running_mean is rm and bn.running_var is rv
    assert torch.equal(rm, rm_ref) and torch.equal(rv, rv_ref) and bn.num_batches_tracked.item() == 1
    # against stock torch in float64
    ref = cls(6).double()
    with torch.no_grad():
        ref.weight.copy_(w)
        ref.bias.copy_(b)
    x64 = x.double().requires_grad_(True)
    ry64 = ref(x64)
    ry64.backward(dy.double())
    mx, mn = err(y, ry64.detach())
    assert mx < 0.3 * (1 + w.abs().max().item()) and mn < 0.06
    assert rel(dx, x64.grad) < 0.08 and rel(dw, ref.weight.grad) < 0.15
    per_channel = x.double().transpose(0, 1).reshape(6, -1)
    assert ((rm.double() - ref.running_mean).abs() <= 0.25 * 0.1 * per_channel.mean(1).abs() + 1e-6).all()
    assert ((rv.double() - ref.running_var).abs() <= 0.4 * 0.1 * (per_channel.var(1) + 1)).all()
    # eval mode uses the running statistics, forward and backward
    bn.eval()
    ref.eval()
    ye, dxe, _ = _run(bn, x, dy)
    x64 = x.double().requires_grad_(True)
    rye = ref(x64)
    rye.backward(dy.double())
    assert rel(ye, rye.detach()) < 0.1 and rel(dxe, x64.grad) < 0.15
    assert torch.equal(bn.running_mean, rm_ref)   # not updated in eval


def test_group_and_instance_norm_modules_under_mode():
    x, dy = torch.randn(4, 6, 5, 5) * 2 + 1, torch.randn(4, 6, 5, 5)
    gn = nn.GroupNorm(3, 6)
    nn.init.normal_(gn.weight)
    y, dx, (dw, db) = _run(gn, x, dy)
    w, b = gn.weight.detach(), gn.bias.detach()
    ry, mean, rstd = N.group_norm_forward(x, w, b, 4, 6, 25, 3, 1e-5)
    assert torch.equal(y, ry)
    assert all(torch.equal(a, r) for a, r in zip((dx, dw, db), N.group_norm_backward(dy, x, mean, rstd, w, 4, 6, 25, 3)))
    # instance norm: torch runs batch norm on (1, N·C, H, W); the running statistics are
    # the batch mean (an exact aten.mean, routed to PAD) of the per-instance updates
    inorm = nn.InstanceNorm2d(6, affine=True, track_running_stats=True)
    nn.init.normal_(inorm.weight)
    ref = nn.InstanceNorm2d(6, affine=True, track_running_stats=True).double()
    ref.load_state_dict(inorm.state_dict())
    rm = inorm.running_mean
    y, dx, (dw, db) = _run(inorm, x, dy)
    x64 = x.double().requires_grad_(True)
    ry = ref(x64)
    ry.backward(dy.double())
    mx, mn = err(y, ry.detach())
    assert mx < 0.3 * (1 + inorm.weight.abs().max().item()) and mn < 0.06
    assert rel(dx, x64.grad) < 0.08 and rel(dw, ref.weight.grad) < 0.15
    assert inorm.running_mean is rm and not torch.equal(rm, torch.zeros(6))
    assert ((rm.double() - ref.running_mean).abs() <= 0.25 * 0.1 * x.double().mean((0, 2, 3)).abs().max() + 1e-6).all()
    assert ((inorm.running_var.double() - ref.running_var).abs() <= 0.05 * ref.running_var).all()
    # eval with running statistics, and the stateless InstanceNorm1d
    inorm.eval()
    ref.eval()
    ye, _, _ = _run(inorm, x, dy)
    assert rel(ye, ref(x.double()).detach()) < 0.1
    x1 = torch.randn(3, 4, 9)
    y1, dx1, _ = _run(nn.InstanceNorm1d(4), x1, torch.ones_like(x1))
    assert err(y1, F.instance_norm(x1.double()))[0] < 0.3
    assert dx1.abs().max() < 0.1   # a constant upstream gradient has exact derivative 0


# ---------------------------------------------------------------------------
# every aten spelling of batch norm routes to the same PA implementation

def _bn_variants(x, w, b):
    return {
        "native_batch_norm": (lambda rm, rv: aten.native_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5), True, 3),
        "_native_batch_norm_legit": (lambda rm, rv: aten._native_batch_norm_legit(x, w, b, rm, rv, True, 0.1, 1e-5), True, 3),
        "_native_batch_norm_legit.no_stats": (lambda rm, rv: aten._native_batch_norm_legit.no_stats(x, w, b, True, 0.1, 1e-5), True, 3),
        "_native_batch_norm_legit_no_training": (lambda rm, rv: aten._native_batch_norm_legit_no_training(x, w, b, rm, rv, 0.1, 1e-5), False, 3),
        "_native_batch_norm_legit_functional": (lambda rm, rv: aten._native_batch_norm_legit_functional(x, w, b, rm, rv, True, 0.1, 1e-5), True, 5),
        "_batch_norm_with_update": (lambda rm, rv: aten._batch_norm_with_update(x, w, b, rm, rv, 0.1, 1e-5), True, 4),
        "_batch_norm_with_update_functional": (lambda rm, rv: aten._batch_norm_with_update_functional(x, w, b, rm, rv, 0.1, 1e-5), True, 6),
        "_batch_norm_no_update": (lambda rm, rv: aten._batch_norm_no_update(x, w, b, rm, rv, 0.1, 1e-5), False, 4),
        "cudnn_batch_norm": (lambda rm, rv: aten.cudnn_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5), True, 4),
        "miopen_batch_norm": (lambda rm, rv: aten.miopen_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5), True, 3),
    }


@pytest.mark.parametrize("name", list(_bn_variants(None, None, None)))
def test_every_batch_norm_spelling_routes_to_pa(name):
    x, dy = torch.randn(4, 3, 5) * 2 + 1, torch.randn(4, 3, 5)
    w, b = torch.randn(3), torch.randn(3)
    xg, wg, bg = (t.clone().requires_grad_(True) for t in (x, w, b))
    fn, training, nout = _bn_variants(xg, wg, bg)[name]
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    with pamtorch.mode(Config.full()):
        out = fn(rm, rv)
        out[0].backward(dy)
    assert len(out) == nout
    stats = (None, None) if name.endswith("no_stats") else (rm0.clone(), rv0.clone())
    ry, sm, si = N.batch_norm_forward(x, w, b, *stats, training, 0.1, 1e-5)
    assert torch.equal(out[0], ry) and torch.equal(out[1], sm) and torch.equal(out[2], si)
    functional = name.endswith("functional")
    if training and not name.endswith("no_stats"):
        # in place, or as the two extra outputs of the functional forms
        new_rm, new_rv = (out[-2], out[-1]) if functional else (rm, rv)
        assert torch.equal(new_rm, stats[0]) and torch.equal(new_rv, stats[1])
        assert torch.equal(rm, rm0) == functional
    rdx, rdw, rdb = N.batch_norm_backward(dy, x, w, rm0, rv0, sm, si, training, 1e-5)
    assert torch.equal(xg.grad, rdx) and torch.equal(wg.grad, rdw) and torch.equal(bg.grad, rdb)


def test_out_forms_write_into_the_given_tensors():
    x, w, b = torch.randn(4, 3, 5), torch.randn(3), torch.randn(3)
    rm, rv = torch.zeros(3), torch.ones(3)
    outs = [torch.empty(0) for _ in range(3)]
    with pamtorch.mode(Config.full()):
        r = aten.native_batch_norm.out(x, w, b, rm, rv, True, 0.1, 1e-5,
                                       out=outs[0], save_mean=outs[1], save_invstd=outs[2])
    ref = N.batch_norm_forward(x, w, b, torch.zeros(3), torch.ones(3), True, 0.1, 1e-5)
    assert all(a is o and torch.equal(o, e) for a, o, e in zip(r, outs, ref))
    assert not torch.equal(rm, torch.zeros(3))
    outs = [torch.empty(0) for _ in range(3)]
    with pamtorch.mode(Config.full()):
        r = aten.native_group_norm.out(x, w, b, 4, 3, 5, 3, 1e-5, out0=outs[0], out1=outs[1], out2=outs[2])
    ref = N.group_norm_forward(x, w, b, 4, 3, 5, 3, 1e-5)
    assert all(a is o and torch.equal(o, e) for a, o, e in zip(r, outs, ref))


def test_fused_rms_norm_routes_to_pa():
    """``aten.rms_norm`` reaches ``_fused_rms_norm`` on CUDA only (on CPU it decomposes
    into routed pow/mean/rsqrt/mul), so the table entries are called directly here."""
    import pamtorch.nn.functional as PF
    x, dy, w = torch.randn(3, 4, 8), torch.randn(3, 4, 8), torch.randn(8)
    cfg = Config.full().norm
    y, rstd = OP_TABLE[aten._fused_rms_norm].impl(aten._fused_rms_norm.default, (x, [8], w, 1e-6), {}, cfg)
    ry, rrstd = PF.rms_norm_forward(x, (8,), w, 1e-6)
    assert torch.equal(y, ry) and torch.equal(rstd, rrstd) and rstd.shape == (3, 4, 1)
    assert err(y, F.rms_norm(x.double(), (8,), w.double(), 1e-6))[1] < 0.06
    dx, dw = OP_TABLE[aten._fused_rms_norm_backward].impl(
        aten._fused_rms_norm_backward.default, (dy, x, [8], rstd, w, [True, True]), {}, cfg)
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    F.rms_norm(x64, (8,), w64, 1e-6).backward(dy.double())
    assert rel(dx, x64.grad) < 0.08 and rel(dw, w64.grad) < 0.15
    # F.rms_norm under the mode (CPU decomposition) is multiplication-free too
    with pamtorch.mode(Config.full()):
        yr = F.rms_norm(x, (8,), w, 1e-6)
    assert err(yr, F.rms_norm(x.double(), (8,), w.double(), 1e-6))[1] < 0.06
    assert not torch.equal(yr, F.rms_norm(x, (8,), w, 1e-6))


# ---------------------------------------------------------------------------
# autograd functionals: approx = the raw backward, exact = the PA function's derivative

def test_functionals_approx_backward_is_the_raw_backward():
    x, dy = torch.randn(5, 4, 6), torch.randn(5, 4, 6)
    w, b = torch.randn(4), torch.randn(4)
    xg, wg, bg = (t.clone().requires_grad_(True) for t in (x, w, b))
    rm, rv = torch.zeros(4), torch.ones(4)
    N.batch_norm(xg, rm, rv, wg, bg, training=True).backward(dy)
    rm2, rv2 = torch.zeros(4), torch.ones(4)
    _, sm, si = N.batch_norm_forward(x, w, b, rm2, rv2, True, 0.1, 1e-5)
    assert torch.equal(rm, rm2) and torch.equal(rv, rv2)
    for g, r in zip((xg.grad, wg.grad, bg.grad), N.batch_norm_backward(dy, x, w, None, None, sm, si, True, 1e-5)):
        assert torch.equal(g, r)
    xg.grad = None
    N.group_norm(xg, 2, wg, bg).backward(dy)
    _, m, r = N.group_norm_forward(x, w, b, 5, 4, 6, 2, 1e-5)
    assert torch.equal(xg.grad, N.group_norm_backward(dy, x, m, r, w, 5, 4, 6, 2)[0])
    # instance norm: the torch formula, including the batch mean of the running statistics
    rmi, rvi = torch.randn(4), torch.rand(4) + 0.5
    rmi64, rvi64 = rmi.double(), rvi.double()
    y = N.instance_norm(x, rmi, rvi, w, b)
    ry = F.instance_norm(x.double(), rmi64, rvi64, w.double(), b.double())
    assert err(y, ry)[1] < 0.06
    # within PAM/PAD error of the momentum term 0.1·(batch - running), plus the PAD by N
    bound = 0.25 * 0.1 * (x.double().mean(-1).abs().amax(0) + rmi64.abs()) + 0.13 * rmi64.abs()
    assert ((rmi.double() - rmi64).abs() <= bound).all()
    assert ((rvi.double() - rvi64).abs() <= 0.2 * rvi64).all()
    with pytest.raises(ValueError, match="more than 1 value"):
        N.batch_norm(torch.randn(1, 4), None, None, training=True)


@pytest.mark.parametrize("which", ["batch", "group"])
def test_exact_derivative_is_the_derivative_of_the_pa_forward(which):
    """derivative="exact" agrees with central finite differences of the PA forward within
    a linear piece; the approx derivative (the float formula in PA arithmetic) does not."""
    torch.manual_seed(1)
    x, dy = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    w, b = torch.randn(4), torch.randn(4)

    def f(t, kind="approx"):
        if which == "batch":
            return (N.batch_norm(t, None, None, w, b, True, derivative=kind).double() * dy).sum()
        return (N.group_norm(t, 2, w, b, derivative=kind).double() * dy).sum()

    grads = {}
    for kind in ("exact", "approx", "ste"):
        xg = x.clone().requires_grad_(True)
        f(xg, kind).backward()
        grads[kind] = xg.grad.double()
    h, fd = 1e-3, torch.zeros(x.numel(), dtype=torch.float64)
    for i in range(x.numel()):
        xp, xm = x.clone().view(-1), x.clone().view(-1)
        xp[i] += h
        xm[i] -= h
        fd[i] = (f(xp.view_as(x)) - f(xm.view_as(x))) / (2 * h)
    fd = fd.view_as(x)

    def agree(g):
        return ((g - fd).abs() < 0.02 * (1 + fd.abs())).double().mean().item()

    assert agree(grads["exact"]) >= 0.9 and agree(grads["approx"]) < 0.7
    # all three kinds are close to the float derivative of the exact block
    x64 = x.double().requires_grad_(True)
    ref = F.batch_norm(x64, None, None, w.double(), b.double(), True) if which == "batch" \
        else F.group_norm(x64, 2, w.double(), b.double())
    (ref * dy.double()).sum().backward()
    assert rel(grads["approx"], x64.grad) < 0.1
    assert rel(grads["exact"], x64.grad) < 0.6 and rel(grads["ste"], x64.grad) < 0.6


# ---------------------------------------------------------------------------
# small CNNs: multiplication-free training steps under the mode

def _cnn(norm):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm, nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


NORMS = {"BatchNorm2d": lambda: nn.BatchNorm2d(8), "GroupNorm": lambda: nn.GroupNorm(4, 8),
         "InstanceNorm2d": lambda: nn.InstanceNorm2d(8, affine=True, track_running_stats=True)}

# aten ops that multiply or divide floats, whatever their arguments
_MULTIPLYING = {getattr(aten, n) for n in """mul mul_ div div_ addcmul addcmul_ addcdiv addcdiv_ pow pow_
    sqrt rsqrt exp log reciprocal square lerp lerp_ mean var var_mean std linalg_vector_norm
    native_batch_norm _native_batch_norm_legit native_batch_norm_backward native_group_norm
    native_group_norm_backward native_layer_norm _fused_rms_norm convolution mm addmm bmm
    _foreach_mul _foreach_mul_ _foreach_div _foreach_div_ _foreach_addcmul_ _foreach_addcdiv_
    _foreach_lerp_ _foreach_sqrt""".split() if hasattr(aten, n)}


class _Spy(TorchDispatchMode):
    """Outside the PA mode: sees every aten op that actually runs."""

    def __init__(self):
        super().__init__()
        self.bad = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        floats = [a for a in list(args) + list(kwargs.values())
                  if isinstance(a, torch.Tensor) and a.is_floating_point()]
        # a routable op reaching this mode ran exact (the PA mode hands those to OP_TABLE)
        if floats and (func.overloadpacket in _MULTIPLYING or classify(func, args, kwargs) == "routable"):
            self.bad.append(str(func))
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", list(NORMS))
def test_cnn_trains_multiplication_free_under_mode(name):
    model = _cnn(NORMS[name]())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)
    norm = model[1]
    stats = [b for b in (getattr(norm, "running_mean", None), getattr(norm, "running_var", None)) if b is not None]
    stats0 = [s.clone() for s in stats]
    params0 = [p.detach().clone() for p in model.parameters()]
    before = F.cross_entropy(model.eval()(x), t).item()   # exact fp32, running statistics
    model.train()
    control = _Spy()
    with control:   # without the PA mode the spy sees the norm run exact
        model(x)
    assert any("norm" in op for op in control.bad)
    for s, s0 in zip(stats, stats0):
        s.copy_(s0)
    spy = _Spy()
    with spy, pamtorch.mode(Config.full()):
        for _ in range(5):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), t)
            loss.backward()
            opt.step()
        model.eval()
        model(x)
    assert not spy.bad, sorted(set(spy.bad))
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), params0))
    # the running statistics are the same tensors, updated (and left alone in eval)
    assert all(b is s for b, s in zip((getattr(norm, "running_mean", None), getattr(norm, "running_var", None)), stats))
    assert all(not torch.equal(s, s0) for s, s0 in zip(stats, stats0))
    model.train()
    after = F.cross_entropy(model(x), t).item()
    assert math.isfinite(after) and after < 0.9 * before


def test_batch_norm_half_precision_under_mode():
    for dtype in (torch.bfloat16, torch.float16):
        bn = nn.BatchNorm2d(4).to(dtype)
        x = (torch.randn(6, 4, 5, 5) * 2 + 1).to(dtype).requires_grad_(True)
        with pamtorch.mode(Config.full()):
            y = bn(x)
            y.float().pow(2).sum().backward()
        assert y.dtype == dtype and x.grad.dtype == dtype and bn.weight.grad.dtype == dtype
        assert bn.running_mean.dtype == dtype and bn.num_batches_tracked.item() == 1
        ref = F.batch_norm(x.detach().double(), None, None, training=True)
        assert err(y, ref)[1] < 0.08


def test_raw_functions_and_derivative_kinds_run_no_float_multiplication():
    x, dy = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    w, b, rm, rv = torch.randn(3), torch.randn(3), torch.zeros(3), torch.ones(3)
    spy = _Spy()
    with spy:
        for training in (True, False):
            y, sm, si = N.batch_norm_forward(x, w, b, rm, rv, training, 0.1, 1e-5)
            N.batch_norm_backward(dy, x, w, rm, rv, sm, si, training, 1e-5)
        y, m, r = N.group_norm_forward(x, w, b, 4, 3, 5, 3, 1e-5)
        N.group_norm_backward(dy, x, m, r, w, 4, 3, 5, 3)
        for kind in ("approx", "exact"):
            xg = x.clone().requires_grad_(True)
            N.batch_norm(xg, rm, rv, w, b, True, derivative=kind).backward(dy)
            N.group_norm(xg, 3, w, b, derivative=kind).backward(dy)
            N.instance_norm(xg, derivative=kind).backward(dy)
    assert not spy.bad, sorted(set(spy.bad))
