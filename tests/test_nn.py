"""pamtorch.nn.functional and pamtorch.nn modules against their exact torch counterparts."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pamtorch.nn as pnn
import pamtorch.nn.functional as P
from pamtorch.config import Config, OpConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def err(y, ref):
    d = (y.double() - ref.double()).abs()
    return d.max().item(), d.mean().item()


# ---------------------------------------------------------------------------
# forward accuracy (bounds as documented in docs/nn.md)

def test_softmax_forward_accuracy_and_masks():
    x = torch.randn(64, 50) * 3
    y = P.softmax_forward(x, -1)
    mx, mean = err(y, torch.softmax(x.double(), -1))
    assert mx < 0.07 and mean < 0.003
    assert (y.double().sum(-1) - 1).abs().max() < 0.15
    # -inf entries give exactly 0, the max entry's exp is exactly 1
    x[:, :10] = -math.inf
    y = P.softmax_forward(x, 1)
    assert (y[:, :10] == 0).all() and torch.isfinite(y).all()
    # all -inf row: NaN like torch, 0 when safe
    z = torch.full((2, 3), -math.inf)
    z[1] = torch.tensor([0.0, 1.0, 2.0])
    assert torch.isnan(P.softmax_forward(z, -1)[0]).all()
    ys = P.softmax_forward(z, -1, safe=True)
    assert (ys[0] == 0).all() and torch.allclose(ys[1].sum(), torch.tensor(1.0), atol=0.15)
    # other dims, empty
    x3 = torch.randn(3, 4, 5)
    assert err(P.softmax_forward(x3, 0), torch.softmax(x3, 0))[0] < 0.07
    assert P.softmax_forward(torch.randn(0, 5), -1).shape == (0, 5)
    assert P.softmax_forward(torch.randn(4, 0), -1).shape == (4, 0)


def test_log_softmax_forward_accuracy():
    x = torch.randn(64, 50) * 3
    ref = torch.log_softmax(x.double(), -1)
    y = P.log_softmax_forward(x, -1)
    d = (y.double() - ref).abs()
    # x - max is exact: the error is that of the PA log-sum-exp, one value per row
    assert (d - d[:, :1]).abs().max() < 1e-5
    assert d.max() < 0.3 and d.mean() < 0.12
    x[0, :3] = -math.inf
    assert (P.log_softmax_forward(x, -1)[0, :3] == -math.inf).all()


@pytest.mark.parametrize("shape,ns", [((8, 6, 32), (32,)), ((5, 4, 6), (4, 6)), ((32,), (32,))])
def test_layer_norm_forward_accuracy_and_shapes(shape, ns):
    x = torch.randn(shape) * 2 + 1
    w, b = torch.randn(ns), torch.randn(ns)
    y, mean, rstd = P.layer_norm_forward(x, ns, w, b, 1e-5)
    ry, rmean, rrstd = torch.ops.aten.native_layer_norm(x.double(), list(ns), w.double(), b.double(), 1e-5)
    assert mean.shape == rmean.shape and rstd.shape == rrstd.shape
    n = math.prod(ns)
    # PAD by n: exact for n = 2^k, else within PAD's relative error
    tol = 1e-5 if n & (n - 1) == 0 else 0.13
    assert ((mean.double() - rmean).abs() <= tol * rmean.abs() + 1e-5).all()
    assert ((rstd.double() - rrstd).abs() / rrstd).max() < 0.15        # PAM squares + PA rsqrt
    mx, mn = err(y, ry)
    assert mx < 0.25 * (1 + w.abs().max().item()) and mn < 0.06
    # without affine parameters
    y2 = P.layer_norm_forward(x, ns)[0]
    assert err(y2, F.layer_norm(x, ns))[1] < 0.06


def test_rms_norm_forward_accuracy():
    x = torch.randn(8, 6, 32)
    w = torch.randn(32)
    y, rstd = P.rms_norm_forward(x, (32,), w)
    assert rstd.shape == (8, 6, 1)
    mx, mn = err(y, F.rms_norm(x.double(), (32,), w.double(), eps=torch.finfo(torch.float32).eps))
    assert mx < 0.3 * (1 + w.abs().max().item()) and mn < 0.06


def test_gelu_forward_accuracy():
    x = torch.linspace(-8, 8, 20001)
    mx, mn = err(P.gelu_forward(x), F.gelu(x.double()))
    assert mx < 0.06 and mn < 0.004     # documented: 0.059 / 0.0034
    big = torch.tensor([-1e30, -50.0, 50.0, 1e30, math.inf, -math.inf, math.nan])
    g = P.gelu_forward(big)
    # saturation: -0 for x -> -inf, x for x -> inf (torch gives NaN at ±inf; here inf -> inf)
    assert g[0] == 0 and g[1] == 0 and g[2] == 50 and g[3] == 1e30 and g[4] == math.inf
    assert torch.isnan(g[6])
    assert P.gelu_forward(torch.randn(3, 5).bfloat16()).dtype == torch.bfloat16


# ---------------------------------------------------------------------------
# approx gradients: the autograd result is the raw backward, which is close to the float
# derivative of the exact block

def _grad(fn, x, dy):
    x = x.clone().requires_grad_(True)
    fn(x).backward(dy)
    return x.grad


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_softmax_grads():
    x, dy = torch.randn(16, 20) * 2, torch.randn(16, 20)
    g = _grad(lambda t: P.softmax(t, -1), x, dy)
    assert torch.equal(g, P.softmax_backward(P.softmax_forward(x, -1), dy, -1))
    y64 = torch.softmax(x.double(), -1)
    ref = y64 * (dy.double() - (dy.double() * y64).sum(-1, keepdim=True))
    assert _rel(g, ref) < 0.2
    gl = _grad(lambda t: P.log_softmax(t, -1), x, dy)
    assert torch.equal(gl, P.log_softmax_backward(P.log_softmax_forward(x, -1), dy, -1))
    refl = dy.double() - y64 * dy.double().sum(-1, keepdim=True)
    assert _rel(gl, refl) < 0.2
    for kind in ("exact", "ste"):
        ge = _grad(lambda t: P.softmax(t, -1, derivative=kind), x, dy)
        assert torch.isfinite(ge).all() and _rel(ge, ref) < 0.5


def test_layer_norm_grads():
    x, dy = torch.randn(6, 5, 16), torch.randn(6, 5, 16)
    w = torch.randn(16, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    xg = x.clone().requires_grad_(True)
    P.layer_norm(xg, (16,), w, b).backward(dy)
    _, mean, rstd = P.layer_norm_forward(x, (16,), w.detach(), b.detach())
    dx, dw, db = P.layer_norm_backward(dy, x, (16,), mean, rstd, w.detach(), b.detach())
    assert torch.equal(xg.grad, dx) and torch.equal(w.grad, dw) and torch.equal(b.grad, db)
    # float64 standard formula
    x64, w64, b64 = x.double().requires_grad_(True), w.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    F.layer_norm(x64, (16,), w64, b64).backward(dy.double())
    assert _rel(dx, x64.grad) < 0.25 and _rel(dw, w64.grad) < 0.15 and torch.allclose(db, b64.grad.float(), atol=1e-4)
    # output mask / no weight
    dx2, dw2, db2 = P.layer_norm_backward(dy, x, (16,), mean, rstd, None, None, (True, False, False))
    assert dw2 is None and db2 is None and dx2.shape == x.shape
    ge = _grad(lambda t: P.layer_norm(t, (16,), w.detach(), b.detach(), derivative="exact"), x, dy)
    assert torch.isfinite(ge).all() and _rel(ge, x64.grad) < 0.6


def test_rms_norm_grads():
    x, dy, w = torch.randn(6, 16), torch.randn(6, 16), torch.randn(16)
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    P.rms_norm(xg, (16,), wg).backward(dy)
    _, rstd = P.rms_norm_forward(x, (16,), w)
    dx, dw = P.rms_norm_backward(dy, x, (16,), rstd, w)
    assert torch.equal(xg.grad, dx) and torch.equal(wg.grad, dw)
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    F.rms_norm(x64, (16,), w64, eps=torch.finfo(torch.float32).eps).backward(dy.double())
    assert _rel(dx, x64.grad) < 0.25 and _rel(dw, w64.grad) < 0.15


def test_gelu_grads():
    x = torch.linspace(-12, 12, 4001)
    dy = torch.ones_like(x)
    g = _grad(P.gelu, x, dy)
    assert torch.equal(g, P.gelu_backward(dy, x))
    x64 = x.double().requires_grad_(True)
    F.gelu(x64).backward(dy.double())
    assert (g.double() - x64.grad).abs().max() < 0.2
    assert (g.double() - x64.grad).abs().mean() < 0.02
    assert g[0] == 0 and g[-1] == 1 and torch.isfinite(g).all()
    ge = _grad(lambda t: P.gelu(t, derivative="exact"), torch.linspace(-4, 4, 101), torch.ones(101))
    assert torch.isfinite(ge).all()


# ---------------------------------------------------------------------------
# losses

def test_nll_matches_aten_conventions():
    logp = torch.log_softmax(torch.randn(8, 5), 1)
    t = torch.tensor([0, 1, 2, 3, 4, -100, 1, 2])
    for red in (0, 1, 2):
        loss, tw = P.nll_loss_forward(logp, t, None, red, -100)
        rl, rtw = torch.ops.aten.nll_loss_forward(logp, t, None, red, -100)
        assert loss.shape == rl.shape and tw.shape == rtw.shape
        assert torch.allclose(loss, rl, rtol=0.13) and torch.equal(tw, rtw)
        dy = torch.randn(8) if red == 0 else torch.tensor(1.5)
        g = P.nll_loss_backward(dy, logp, t, None, red, -100, tw)
        rg = torch.ops.aten.nll_loss_backward(dy, logp, t, None, red, -100, rtw)
        assert torch.allclose(g, rg, rtol=0.13)
    # sum without weight is exact (no PA op)
    assert torch.equal(P.nll_loss_forward(logp, t, None, "sum", -100)[0],
                       torch.ops.aten.nll_loss_forward(logp, t, None, 2, -100)[0])
    # weights; all ignored -> NaN like torch
    w = torch.rand(5) + 0.5
    l, tw = P.nll_loss_forward(logp, t, w, "mean", -100)
    rl, rtw = torch.ops.aten.nll_loss_forward(logp, t, w, 1, -100)
    assert torch.allclose(l, rl, rtol=0.25) and torch.allclose(tw, rtw)
    assert torch.isnan(P.nll_loss_forward(logp, torch.full((8,), -100), None, "mean", -100)[0])
    # spatial (nll_loss2d layout) and 1-D input
    lp4 = torch.log_softmax(torch.randn(2, 3, 4, 5), 1)
    t4 = torch.randint(0, 3, (2, 4, 5))
    assert torch.allclose(P.nll_loss_forward(lp4, t4, None, "sum")[0], F.nll_loss(lp4, t4, reduction="sum"))
    assert P.nll_loss_forward(logp[0], t[0], None, "none")[0].shape == ()


@pytest.mark.parametrize("kw", [dict(), dict(label_smoothing=0.1), dict(ignore_index=2),
                                dict(reduction="sum"), dict(reduction="none", label_smoothing=0.2),
                                dict(weight=True, label_smoothing=0.1, ignore_index=1)])
def test_cross_entropy_against_torch(kw):
    kw = dict(kw)
    if kw.get("weight"):
        kw["weight"] = torch.rand(6) + 0.5
    x = torch.randn(12, 6) * 2
    t = torch.randint(0, 6, (12,))
    ref = F.cross_entropy(x.double(), t, **{k: (v.double() if k == "weight" else v) for k, v in kw.items()})
    for kind in ("approx", "exact"):
        xg = x.clone().requires_grad_(True)
        loss = P.cross_entropy(xg, t, derivative=kind, **kw)
        assert loss.shape == ref.shape
        assert ((loss.double() - ref).abs() <= 0.1 * ref.abs() + 0.1).all()
        loss.sum().backward()
        x64 = x.double().requires_grad_(True)
        F.cross_entropy(x64, t, **{k: (v.double() if k == "weight" else v) for k, v in kw.items()}).sum().backward()
        # the exact derivative of the PA loss is piecewise constant (powers of two per op):
        # it departs from the float gradient much more than the approx one does
        assert torch.isfinite(xg.grad).all() and _rel(xg.grad, x64.grad) < (0.2 if kind == "approx" else 1.5)


def test_cross_entropy_exact_derivative_is_the_pa_loss_derivative():
    """derivative="exact" is the true derivative of the PA loss: central finite
    differences of the forward agree within a linear piece."""
    torch.manual_seed(1)
    x, t = torch.randn(4, 6) * 2, torch.randint(0, 6, (4,))
    xg = x.clone().requires_grad_(True)
    P.cross_entropy(xg, t, reduction="sum", derivative="exact").backward()
    h, fd = 2e-3, torch.zeros(4, 6, dtype=torch.float64)
    for i in range(4):
        for j in range(6):
            xp, xm = x.clone(), x.clone()
            xp[i, j] += h
            xm[i, j] -= h
            fd[i, j] = (P.cross_entropy(xp, t, reduction="sum").double()
                        - P.cross_entropy(xm, t, reduction="sum").double()) / (2 * h)
    assert ((xg.grad.double() - fd).abs() < 0.02).float().mean() >= 0.9
    # ... and the approx derivative is not (it is the float formula in PA arithmetic)
    xa = x.clone().requires_grad_(True)
    P.cross_entropy(xa, t, reduction="sum").backward()
    assert not torch.allclose(xa.grad, xg.grad)


def test_cross_entropy_probability_targets_and_spatial():
    x = torch.randn(4, 5, 3)
    t = torch.softmax(torch.randn(4, 5, 3), 1)
    ref = F.cross_entropy(x, t, label_smoothing=0.1)
    assert abs(P.cross_entropy(x, t, label_smoothing=0.1) - ref) < 0.15 * ref + 0.05
    ti = torch.randint(0, 5, (4, 3))
    ref = F.cross_entropy(x, ti, reduction="none")
    assert torch.allclose(P.cross_entropy(x, ti, reduction="none"), ref, rtol=0.15, atol=0.1)


def test_mse_loss():
    x, t = torch.randn(10, 4), torch.randn(10, 4)
    for red in ("mean", "sum", "none"):
        ref = F.mse_loss(x, t, reduction=red)
        assert torch.allclose(P.mse_loss(x, t, red), ref, rtol=0.13, atol=1e-6)
    xg = x.clone().requires_grad_(True)
    P.mse_loss(xg, t).backward()
    assert torch.equal(xg.grad, P.mse_loss_backward(torch.tensor(1.0), x, t, "mean"))
    assert _rel(xg.grad, 2 * (x - t) / x.numel()) < 0.1


# ---------------------------------------------------------------------------
# dropout

def test_dropout():
    x = torch.randn(200, 50)
    y, mask = P.dropout_forward(x, 0.5, True)
    assert mask.dtype == torch.bool and 0.4 < mask.float().mean() < 0.6
    assert torch.equal(y, torch.where(mask, x * 2, torch.zeros_like(x)))  # PAM by 2 is exact
    g = P.dropout_backward(torch.ones_like(x), mask, 2.0)
    assert torch.equal(g, mask.float() * 2)
    y, mask = P.dropout_forward(x, 0.3, False)
    assert torch.equal(y, x) and mask.all()
    xg = x.clone().requires_grad_(True)
    out = P.dropout(xg, 0.25)
    out.sum().backward()
    kept = out != 0
    assert torch.allclose(out[kept], x[kept] / 0.75, rtol=0.12)
    assert torch.equal(xg.grad != 0, kept)
    assert (P.dropout(xg, 1.0) == 0).all() and P.dropout(x, 0.5, training=False) is x
    m = pnn.Dropout(0.5)
    m.eval()
    assert torch.equal(m(x), x)


# ---------------------------------------------------------------------------
# attention

def _sdpa_inputs(N=2, H=2, L=5, S=6, E=8):
    return torch.randn(N, H, L, E), torch.randn(N, H, S, E), torch.randn(N, H, S, E)


def test_sdpa_against_torch_with_masks():
    q, k, v = _sdpa_inputs()
    bool_mask = torch.rand(5, 6) > 0.3
    bool_mask[:, 0] = True
    bool_mask[2] = False  # a fully masked row -> 0 like torch's safe softmax
    float_mask = torch.randn(5, 6)
    for kw in (dict(), dict(attn_mask=bool_mask), dict(attn_mask=float_mask), dict(scale=0.3)):
        ref = F.scaled_dot_product_attention(q, k, v, **kw)
        out = P.scaled_dot_product_attention(q, k, v, **kw)
        assert out.shape == ref.shape
        assert _rel(out, ref) < 0.15
    out = P.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask)
    assert (out[:, :, 2] == 0).all()
    qc, kc, vc = _sdpa_inputs(S=5)
    ref = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True)
    out = P.scaled_dot_product_attention(qc, kc, vc, is_causal=True)
    assert _rel(out, ref) < 0.15 and torch.allclose(out[:, :, 0], vc[:, :, 0], rtol=0.15, atol=0.02)
    # gradients flow to q, k, v
    qs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    P.scaled_dot_product_attention(*qs, attn_mask=bool_mask).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in qs)
    # exact arithmetic config: matches torch closely
    cfg = Config.ablation()
    assert torch.allclose(P.scaled_dot_product_attention(q, k, v, config=cfg),
                          F.scaled_dot_product_attention(q, k, v), atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_against_torch(batch_first):
    E, H, N, L, S = 8, 2, 3, 4, 5
    ref = nn.MultiheadAttention(E, H, batch_first=batch_first)
    pa = pnn.MultiheadAttention(E, H, batch_first=batch_first)
    pa.load_state_dict(ref.state_dict())
    shape_q = (N, L, E) if batch_first else (L, N, E)
    shape_k = (N, S, E) if batch_first else (S, N, E)
    q, k = torch.randn(shape_q), torch.randn(shape_k)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[0, -2:] = True
    amask = torch.rand(L, S) > 0.8
    amask[:, 0] = False
    famask = torch.randn(L, S)
    for kw in (dict(), dict(key_padding_mask=kpm), dict(attn_mask=amask),
               dict(attn_mask=famask, key_padding_mask=kpm), dict(average_attn_weights=False)):
        o_ref, w_ref = ref(q, k, k, **kw)
        o, w = pa(q, k, k, **kw)
        assert o.shape == o_ref.shape and w.shape == w_ref.shape
        assert _rel(o, o_ref) < 0.2 and _rel(w, w_ref) < 0.2
    # causal self-attention, need_weights=False
    qq = torch.randn(shape_q)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    o_ref = ref(qq, qq, qq, attn_mask=causal, need_weights=False, is_causal=True)[0]
    o, w = pa(qq, qq, qq, attn_mask=causal, need_weights=False, is_causal=True)
    assert w is None and _rel(o, o_ref) < 0.2
    o2 = pa(qq, qq, qq, need_weights=False, is_causal=True)[0]  # mask built when omitted
    assert torch.equal(o, o2)
    # unbatched input, backward
    ou, wu = pa(q[0] if batch_first else q[:, 0], k[0] if batch_first else k[:, 0],
                k[0] if batch_first else k[:, 0])
    assert ou.shape == (L, E) and wu.shape == (L, S)
    pa(q, k, k)[0].sum().backward()
    assert pa.in_proj_weight.grad is not None and pa.out_proj.weight.grad is not None


def test_multihead_attention_options():
    E, H = 8, 2
    ref = nn.MultiheadAttention(E, H, add_bias_kv=True, add_zero_attn=True, kdim=6, vdim=5)
    pa = pnn.MultiheadAttention(E, H, add_bias_kv=True, add_zero_attn=True, kdim=6, vdim=5)
    pa.load_state_dict(ref.state_dict())
    q, k, v = torch.randn(4, 2, E), torch.randn(3, 2, 6), torch.randn(3, 2, 5)
    kpm = torch.tensor([[False, False, True], [False, False, False]])
    o_ref, w_ref = ref(q, k, v, key_padding_mask=kpm)
    o, w = pa(q, k, v, key_padding_mask=kpm)
    assert _rel(o, o_ref) < 0.2 and _rel(w, w_ref) < 0.2


# ---------------------------------------------------------------------------
# modules

def test_modules_close_to_torch_and_config_fallback():
    x = torch.randn(4, 10)
    lin = nn.Linear(10, 7)
    plin = pnn.Linear(10, 7)
    plin.load_state_dict(lin.state_dict())
    assert _rel(plin(x), lin(x)) < 0.1
    img = torch.randn(2, 3, 8, 8)
    for kw in (dict(padding=1), dict(padding=1, padding_mode="reflect", stride=2, groups=1)):
        conv = nn.Conv2d(3, 4, 3, **kw)
        pconv = pnn.Conv2d(3, 4, 3, **kw)
        pconv.load_state_dict(conv.state_dict())
        assert _rel(pconv(img), conv(img)) < 0.1
    ln, pln = nn.LayerNorm(10), pnn.LayerNorm(10)
    assert _rel(pln(x), ln(x)) < 0.1
    rms, prms = nn.RMSNorm(10), pnn.RMSNorm(10)
    assert _rel(prms(x), rms(x)) < 0.1
    assert _rel(pnn.GELU()(x), F.gelu(x)) < 0.05
    assert _rel(pnn.Softmax(dim=1)(x), torch.softmax(x, 1)) < 0.1
    t = torch.randint(0, 10, (4,))
    assert abs(pnn.CrossEntropyLoss()(x, t) - F.cross_entropy(x, t)) < 0.15
    # a kind with pa=False runs the stock forward, bit for bit
    cfg = Config.matmul_only()
    assert torch.equal(pnn.LayerNorm(10, config=cfg)(x), ln(x))
    assert torch.equal(pnn.GELU(config=cfg)(x), F.gelu(x))
    lin_exact = pnn.Linear(10, 7, config=Config.ablation("norm"))
    lin_exact.load_state_dict(lin.state_dict())
    assert torch.equal(lin_exact(x), lin(x))
    # offsets: matmul only
    off = Config.paper().replace(matmul=OpConfig(offset=1.0552))
    lo = pnn.Linear(10, 7, config=off)
    lo.load_state_dict(lin.state_dict())
    assert _rel(lo(x), lin(x)) < 0.15
    with pytest.raises(ValueError, match="'norm' kind cannot take a PAM offset"):
        Config.paper().replace(norm=OpConfig(offset=1.05))
    with pytest.raises(NotImplementedError, match="mantissa_bits"):
        pnn.LayerNorm(10, config=Config.paper().with_mantissa_bits(7))(x)


def test_empty_odd_shapes_and_dtypes():
    assert P.layer_norm(torch.randn(0, 4), (4,)).shape == (0, 4)
    assert P.softmax(torch.randn(0, 3), 1).shape == (0, 3)
    x = torch.randn(3, 1)
    assert torch.equal(P.softmax(x, 1), torch.ones(3, 1))
    assert P.gelu(torch.tensor(0.5)).shape == ()
    xb = torch.randn(4, 8).bfloat16()
    assert P.layer_norm(xb, (8,)).dtype == torch.bfloat16
    assert P.softmax(xb.half(), -1).dtype == torch.float16
    with pytest.raises(TypeError):
        P.softmax(torch.randn(3, dtype=torch.float64), 0)
    with pytest.raises(RuntimeError):
        P.layer_norm(torch.randn(3, 4), (5,))


def test_raw_functions_run_no_float_multiplication():
    """The raw blocks call no aten mul/div on floats (the dispatch mode relies on this)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    banned = {torch.ops.aten.mul.Tensor, torch.ops.aten.div.Tensor, torch.ops.aten.mul.Scalar,
              torch.ops.aten.div.Scalar, torch.ops.aten.exp.default, torch.ops.aten.log.default,
              torch.ops.aten.rsqrt.default, torch.ops.aten.sqrt.default, torch.ops.aten.mean.dim,
              torch.ops.aten._softmax.default, torch.ops.aten.native_layer_norm.default}
    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in banned and any(isinstance(a, torch.Tensor) and a.is_floating_point()
                                      and a.dtype != torch.float64 for a in args):
                seen.append(func)
            return func(*args, **(kwargs or {}))

    x, dy = torch.randn(4, 6), torch.randn(4, 6)
    w, b = torch.randn(6), torch.randn(6)
    t = torch.tensor([0, 1, 5, -100])
    with Spy():
        y = P.softmax_forward(x, 1); P.softmax_backward(y, dy, 1)
        y = P.log_softmax_forward(x, 1); P.log_softmax_backward(y, dy, 1)
        y, m, r = P.layer_norm_forward(x, (6,), w, b); P.layer_norm_backward(dy, x, (6,), m, r, w, b)
        y, r = P.rms_norm_forward(x, (6,), w); P.rms_norm_backward(dy, x, (6,), r, w)
        P.gelu_forward(x); P.gelu_backward(dy, x)
        l, tw = P.nll_loss_forward(y, t, w, 1, -100); P.nll_loss_backward(torch.tensor(1.0), y, t, w, 1, -100, tw)
        P.mse_loss_forward(x, dy); P.mse_loss_backward(torch.tensor(1.0), x, dy)
        y, m = P.dropout_forward(x, 0.3); P.dropout_backward(dy, m, 1 / 0.7)
    assert not seen, seen
