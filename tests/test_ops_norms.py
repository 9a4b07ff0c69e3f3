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
