"""Fidelity to the paper and between pamtorch's paths (issue 11 points 2, 3 and 7).

* One cross entropy: the mode's aten route (torch's decomposition), the exact-derivative
  route, ``pamtorch.nn.CrossEntropyLoss``, ``convert`` and ``PF.cross_entropy`` give one
  value, bit for bit, with torch's normalisation (checked against a float64 reference
  built from ``tests/reference.py``'s PAM and PAD); fairseq's ε/(V-1) smoothing on request.
* Honest presets: ``Config.paper()`` is the released fully-PA command (approx
  everywhere); ``Config.paper_exact_loss()`` keeps the exact loss derivative, and it
  reaches a ``log_softmax`` + ``nll_loss`` model.
* Attention: one PAM by the scale on q on every route (direct SDPA, the fused CPU op,
  ``nn.MultiheadAttention``), equal to ``pamtorch.nn`` bit for bit.
"""
import copy
import itertools
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import pamtorch
import pamtorch.nn as pnn
import pamtorch.nn.functional as PF
from pamtorch.config import KINDS, Config, OpConfig
from pamtorch.mode import PAMode

import reference as R

FULL = Config.full()
EXACT_LOSS = Config.paper_exact_loss()


def _f64(t):
    return t.detach().double().numpy()


# ---------------------------------------------------------------------------
# one cross entropy

def _ce_case(targets, g):
    """(logits, targets, class dim) for 2-D class indices with ignored entries, spatial
    (3-D) class indices, or probability targets."""
    if targets == "index":
        x = torch.randn(9, 6, generator=g) * 3
        t = torch.tensor([0, 5, -100, 2, -100, 1, 3, 4, -100])
    elif targets == "spatial":
        x = torch.randn(2, 6, 4, generator=g) * 2
        t = torch.tensor([[0, 1, -100, 5], [2, -100, 4, 1]])
    else:
        x = torch.randn(7, 6, generator=g) * 3
        t = torch.softmax(torch.randn(7, 6, generator=g), 1)
    return x, t


CE_CASES = list(itertools.product(["index", "spatial", "probs"], [False, True],
                                  ["mean", "sum", "none"], [0.0, 0.1]))


@pytest.mark.parametrize("targets,weighted,reduction,eps", CE_CASES)
def test_cross_entropy_is_one_value_on_every_path(targets, weighted, reduction, eps):
    g = torch.Generator().manual_seed(0)
    x, t = _ce_case(targets, g)
    w = torch.rand(6, generator=g) + 0.5 if weighted else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=eps)
    vals = {}
    with pamtorch.mode(FULL):   # aten route: torch's decomposition, op by op
        vals["mode"] = F.cross_entropy(x, t, **kw)
        vals["convert"] = pamtorch.convert(nn.CrossEntropyLoss(**kw), FULL)(x, t)
    with pamtorch.mode(EXACT_LOSS):   # function route: PF.cross_entropy, exact derivative
        vals["mode exact loss"] = F.cross_entropy(x, t, **kw)
    vals["convert exact loss"] = pamtorch.convert(nn.CrossEntropyLoss(**kw), EXACT_LOSS)(x, t)
    vals["pamtorch.nn"] = pnn.CrossEntropyLoss(config=FULL, **kw)(x, t)
    vals["pamtorch.nn exact loss"] = pnn.CrossEntropyLoss(config=EXACT_LOSS, **kw)(x, t)
    for kind in ("approx", "exact", "ste"):
        vals[f"PF {kind}"] = PF.cross_entropy(x, t, w, reduction=reduction, label_smoothing=eps,
                                              derivative=kind)
    if targets != "probs" and eps == 0.0:   # the same loss written as log_softmax + nll_loss
        for name, cfg in (("mode", FULL), ("mode exact loss", EXACT_LOSS)):
            with pamtorch.mode(cfg):
                vals[f"log_softmax+nll_loss {name}"] = F.nll_loss(F.log_softmax(x, 1), t, w,
                                                                  reduction=reduction)
    ref = vals["mode"]
    differ = {k: (v - ref).abs().max().item() for k, v in vals.items() if not torch.equal(v, ref)}
    assert not differ, differ


@pytest.mark.parametrize("targets,weighted,reduction", [c[:3] for c in CE_CASES if c[3] == 0.0])
def test_cross_entropy_approx_gradient_is_the_same_on_the_aten_and_function_paths(targets, weighted,
                                                                                    reduction):
    g = torch.Generator().manual_seed(1)
    x, t = _ce_case(targets, g)
    w = torch.rand(6, generator=g) + 0.5 if weighted else None
    grads = []
    for run in ("mode", "pamtorch.nn"):
        xg = x.clone().requires_grad_(True)
        if run == "mode":
            with pamtorch.mode(FULL):
                F.cross_entropy(xg, t, w, reduction=reduction, label_smoothing=0.1).sum().backward()
        else:
            pnn.CrossEntropyLoss(w, reduction=reduction, label_smoothing=0.1,
                                 config=FULL)(xg, t).sum().backward()
        grads.append(xg.grad)
    assert torch.equal(*grads)


def _reference_ce(logp, t, w, reduction, eps, smoothing):
    """torch's (or fairseq's) label-smoothed cross entropy in float64 on given PA
    log-probabilities [N, C]: sums exact, every product a PAM and every division a PAD
    (tests/reference.py), the coefficients rounded to float32 as the mode's scalars are."""
    f32 = torch.float32
    lp, C = _f64(logp), logp.shape[1]
    t = t.numpy()
    kept = t != -100
    ts = np.where(kept, t, 0)
    picked = lp[np.arange(len(t)), ts]
    wt = np.where(kept, w.double().numpy()[ts], 0.0) if w is not None else kept.astype(np.float64)
    nll = np.where(kept, -(R.pam(picked, wt, f32) if w is not None else picked), 0.0)
    smooth = -(R.pam(lp, w.double().numpy()[None, :], f32) if w is not None else lp).sum(1)
    smooth = np.where(kept, smooth, 0.0)
    if reduction == "mean":
        nll, smooth = R.pad(nll.sum(), wt.sum(), f32), R.pad(smooth.sum(), wt.sum(), f32)
    elif reduction == "sum":
        nll, smooth = nll.sum(), smooth.sum()
    a, b = (1 - eps, eps / C) if smoothing == "torch" else (1 - eps - eps / (C - 1), eps / (C - 1))
    a, b = float(np.float32(a)), float(np.float32(b))
    return R.pam(nll, a, f32) + R.pam(smooth, b, f32)


@pytest.mark.parametrize("smoothing", ["torch", "fairseq"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_normalises_as_torch_and_fairseq(smoothing, weighted, reduction):
    """The smoothing term is divided by the kept targets (their weight sum), as torch 2.13
    does, not by all of them; fairseq's variant spreads ε over the C-1 other classes."""
    g = torch.Generator().manual_seed(2)
    x, t = _ce_case("index", g)
    w = torch.rand(6, generator=g) + 0.5 if weighted else None
    got = PF.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1, smoothing=smoothing)
    logp = PF.log_softmax_forward(x, 1)
    ref = _reference_ce(logp, t, w, reduction, 0.1, smoothing)
    assert np.allclose(_f64(got), ref, rtol=1e-5, atol=1e-6), (got, ref)
    mod = pnn.CrossEntropyLoss(w, reduction=reduction, label_smoothing=0.1, smoothing=smoothing)
    assert torch.equal(mod(x, t), got)


def test_fairseq_smoothing_is_fairseq_label_smoothed_nll_loss():
    """reduction="sum" is fairseq's criterion value: (1-ε-ε_i)·nll + ε_i·smooth with
    ε_i = ε/(V-1), padding ignored (here in float arithmetic on the same log-probs)."""
    g = torch.Generator().manual_seed(3)
    x, t = _ce_case("index", g)
    eps = 0.1
    lp = PF.log_softmax_forward(x, 1).double()
    keep = t != -100
    nll = -lp[keep].gather(1, t[keep, None]).sum()
    smooth = -lp[keep].sum()
    ei = eps / (x.shape[1] - 1)
    fairseq = (1 - eps - ei) * nll + ei * smooth
    got = PF.cross_entropy(x, t, reduction="sum", label_smoothing=eps, smoothing="fairseq")
    # the two products are PAMs, each within 1/9 of the float product
    assert abs(got.item() - fairseq.item()) <= (abs((1 - eps - ei) * nll) + abs(ei * smooth)).item() / 9
    torch_style = PF.cross_entropy(x, t, reduction="sum", label_smoothing=eps)
    assert not torch.equal(got, torch_style)


@pytest.mark.parametrize("C", [2, 7, 1000])
@pytest.mark.parametrize("eps", [0.05, 0.1, 0.3])
@pytest.mark.parametrize("cfg", [FULL, Config.paper(), EXACT_LOSS], ids=["full", "paper", "exact-loss"])
def test_fairseq_smoothing_through_stock_cross_entropy(C, eps, cfg):
    """fairseq's smoothing for a stock model: ``F.cross_entropy`` with
    ``label_smoothing=torch_label_smoothing(ε, C)`` under the mode gives ``PF.cross_entropy(...,
    smoothing="fairseq")``'s value and input gradient bit for bit (both derivative kinds), and
    in float64 it is fairseq's formula."""
    g = torch.Generator().manual_seed(C + int(eps * 100))
    x = torch.randn(40, C, generator=g, requires_grad=True)
    t = torch.randint(0, C, (40,), generator=g)
    t[::6] = -100
    e2 = PF.torch_label_smoothing(eps, C)
    assert e2 == pytest.approx(eps * C / (C - 1), rel=1e-15) and e2 != eps
    for reduction in ("mean", "sum", "none"):
        with pamtorch.mode(cfg):
            got = F.cross_entropy(x, t, label_smoothing=e2, reduction=reduction)
            g_got, = torch.autograd.grad(got.sum(), x)
        want = PF.cross_entropy(x, t, label_smoothing=eps, reduction=reduction, smoothing="fairseq",
                                derivative=cfg.loss.derivative)
        g_want, = torch.autograd.grad(want.sum(), x)
        assert torch.equal(got, want) and torch.equal(g_got, g_want), reduction
    xd, keep = x.detach().double(), t != -100
    lp = xd.log_softmax(1)[keep]
    ei = eps / (C - 1)
    fairseq = ((1 - eps - ei) * -lp.gather(1, t[keep, None])[:, 0] + ei * -lp.sum(1)).mean()
    assert F.cross_entropy(xd, t, label_smoothing=e2).item() == pytest.approx(fairseq.item(), rel=1e-12)


def test_torch_label_smoothing_errors_and_identities():
    assert PF.torch_label_smoothing(0.1, 10, "torch") == 0.1 and PF.torch_label_smoothing(0.0, 10) == 0.0
    assert PF.torch_label_smoothing(0.5, 2) == 1.0  # the target's weight 1-ε-ε/(C-1) is 0
    with pytest.raises(ValueError, match="weight 1-ε-ε/\\(C-1\\) = -0.5 < 0; use label_smoothing <= \\(C-1\\)/C = 0.5"):
        PF.torch_label_smoothing(0.75, 2)
    with pytest.raises(ValueError, match="needs C >= 2"):
        PF.torch_label_smoothing(0.1, 1)
    with pytest.raises(ValueError, match="smoothing must be one of"):
        PF.torch_label_smoothing(0.1, 10, "uniform")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        PF.torch_label_smoothing(1.5, 10)


def test_smoothing_option_errors():
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="smoothing must be one of"):
        PF.cross_entropy(x, t, label_smoothing=0.1, smoothing="uniform")
    with pytest.raises(ValueError, match="smoothing must be one of"):
        pnn.CrossEntropyLoss(smoothing="uniform")
    with pytest.raises(ValueError, match="needs C >= 2"):
        PF.cross_entropy(torch.randn(3, 1), torch.zeros(3, dtype=torch.long), smoothing="fairseq")


def test_legacy_reduction_arguments_reach_the_exact_routes():
    """F.cross_entropy / F.nll_loss / F.mse_loss with the deprecated size_average/reduce
    take the reduction torch derives from them on the function routes too."""
    g = torch.Generator().manual_seed(4)
    x, t = _ce_case("index", g)
    y = torch.randn(9, 6, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pamtorch.mode(EXACT_LOSS):
            ce = F.cross_entropy(x, t, reduce=False)
            nll = F.nll_loss(F.log_softmax(x, 1), t, size_average=False)
            mse = F.mse_loss(x, y, reduce=False)
    assert torch.equal(ce, PF.cross_entropy(x, t, reduction="none"))
    assert torch.equal(nll, PF.cross_entropy(x, t, reduction="sum"))
    assert torch.equal(mse, PF.mse_loss(x, y, reduction="none"))


# ---------------------------------------------------------------------------
# honest presets

def test_paper_is_the_released_all_approx_command():
    paper = Config.paper()
    assert all(paper.kind(k).pa and paper.kind(k).derivative == "approx" and paper.kind(k).offset is None
               for k in KINDS)
    assert paper == Config.full() == Config() == Config.from_name("paper") == PAMode().config
    exact = Config.paper_exact_loss()
    assert exact == Config.from_name("paper-exact-loss") == paper.replace(loss=OpConfig(derivative="exact"))
    for preset in (Config.paper, Config.paper_exact_loss, Config.full, Config.matmul_only, Config.ablation):
        assert "paper" in preset.__doc__ or "pamtorch" in preset.__doc__, preset.__name__


class LogSoftmaxNLL(nn.Module):
    """A classifier whose loss is written as nn.LogSoftmax + nn.NLLLoss."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 4)
        self.logp = nn.LogSoftmax(1)
        self.nll = nn.NLLLoss(ignore_index=-100)

    def forward(self, x, t):
        return self.nll(self.logp(self.lin(x)), t)


def test_exact_loss_reaches_a_log_softmax_nll_loss_model():
    """Under paper_exact_loss, log_softmax + nll_loss gets the exact derivative of the
    composition, the same as F.cross_entropy's route (PF.cross_entropy, derivative exact,
    itself checked by finite differences in test_nn), and not the approx one."""
    torch.manual_seed(0)
    model = LogSoftmaxNLL()
    x, t = torch.randn(6, 5) * 2, torch.tensor([0, 3, -100, 1, 2, 3])

    def grads(cfg, loss):
        model.zero_grad()
        with pamtorch.mode(cfg):
            loss().backward()
        return [p.grad.clone() for p in model.parameters()]

    logits = lambda: model.lin(x)   # noqa: E731
    composed = grads(EXACT_LOSS, lambda: model(x, t))
    functional = grads(EXACT_LOSS, lambda: F.nll_loss(F.log_softmax(logits(), 1), t))
    ce = grads(EXACT_LOSS, lambda: F.cross_entropy(logits(), t))
    direct = grads(FULL, lambda: PF.cross_entropy(logits(), t, derivative="exact"))
    approx = grads(Config.paper(), lambda: model(x, t))
    for a, b, c, d, e in zip(composed, functional, ce, direct, approx):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
        assert not torch.equal(a, e)


# ---------------------------------------------------------------------------
# attention: one PAM by the scale on q

def _qkv(g, N=2, H=3, L=5, S=7, E=6):
    return (torch.randn(N, H, L, E, generator=g), torch.randn(N, H, S, E, generator=g),
            torch.randn(N, H, S, E, generator=g))


def _cotangent(shape):
    """A fixed, non-uniform output gradient (made before entering the mode)."""
    return torch.linspace(-1, 1, math.prod(shape)).reshape(shape)


def _grads(fn, tensors, cot):
    ts = [t.clone().requires_grad_(True) for t in tensors]
    out = fn(*ts)
    out.backward(cot)
    return out.detach(), [t.grad for t in ts]


SDPA_MASKS = ["none", "bool", "float", "causal"]


def _sdpa_kwargs(mask, g, L=5, S=7):
    if mask == "bool":
        m = torch.rand(L, S, generator=g) > 0.3
        m[:, 0] = True
        return dict(attn_mask=m)
    if mask == "float":
        return dict(attn_mask=torch.randn(L, S, generator=g))
    return dict(is_causal=mask == "causal")


@pytest.mark.parametrize("mask", SDPA_MASKS)
@pytest.mark.parametrize("backend", ["default", "math"])
def test_sdpa_under_mode_equals_pamtorch_sdpa(mask, backend):
    """F.scaled_dot_product_attention under the mode, with torch's backend choice left
    alone or forced to its math path (which would multiply q and k by √s each), is
    PF.scaled_dot_product_attention: outputs and gradients bit for bit."""
    g = torch.Generator().manual_seed(5)
    qkv = _qkv(g)
    kw = _sdpa_kwargs(mask, g)
    cot = _cotangent(qkv[0].shape)
    want = _grads(lambda q, k, v: PF.scaled_dot_product_attention(q, k, v, config=FULL, **kw), qkv, cot)

    def under_mode(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **kw)
    with pamtorch.mode(FULL):
        if backend == "math":
            with sdpa_kernel(SDPBackend.MATH):
                got = _grads(under_mode, qkv, cot)
        else:
            got = _grads(under_mode, qkv, cot)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1], want[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mask", ["none", "bool", "causal"])
def test_fused_cpu_attention_op_scales_q_once(mask):
    """aten._scaled_dot_product_flash_attention_for_cpu and its backward (what C++
    callers reach) under the mode equal pamtorch's attention, outputs and gradients."""
    g = torch.Generator().manual_seed(6)
    qkv = _qkv(g)
    kw = _sdpa_kwargs(mask, g)
    aten_kw = {"is_causal": True} if mask == "causal" else \
        ({"attn_mask": kw["attn_mask"]} if mask == "bool" else {})
    cot = _cotangent(qkv[0].shape)
    want = _grads(lambda q, k, v: PF.scaled_dot_product_attention(q, k, v, config=FULL, **kw), qkv, cot)
    with pamtorch.mode(FULL):
        got = _grads(lambda q, k, v: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, **aten_kw)[0], qkv, cot)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1], want[1]):
        assert torch.equal(a, b)


def test_attention_scores_carry_one_pam_by_the_scale_on_q():
    """The attention weights are the PA softmax of Σ_k PAM(PAM(q, s), k), s = 1/√E
    (float64 reference from tests/reference.py), not of Σ_k PAM(PAM(q, √s), PAM(k, √s))."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (t[0, 0] for t in _qkv(g))
    E = q.shape[-1]
    f32 = torch.float32

    def weights(scores64):
        return PF.softmax_forward(torch.from_numpy(scores64).float(), -1, safe=True)

    s = float(np.float32(1 / math.sqrt(E)))
    qs = R.pam(_f64(q), s, f32)
    one = weights(R.pam(qs[:, None, :], _f64(k)[None, :, :], f32).sum(-1))
    r = float(np.float32(math.sqrt(1 / math.sqrt(E))))
    split = weights(R.pam(R.pam(_f64(q), r, f32)[:, None, :], R.pam(_f64(k), r, f32)[None, :, :], f32).sum(-1))
    _, w = PF.attention_forward(q, k, v, config=FULL)
    assert torch.allclose(w, one, rtol=1e-5, atol=1e-7)
    assert (w - split).abs().max() > 100 * (w - one).abs().max() + 1e-5   # the test can tell them apart


def _mha_pair(batch_first, kdim=None, dropout=0.0, bias_kv=False, zero_attn=False):
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(12, 3, batch_first=batch_first, kdim=kdim, vdim=kdim,
                                  dropout=dropout, add_bias_kv=bias_kv, add_zero_attn=zero_attn)
    pa = pnn.MultiheadAttention.from_module(copy.deepcopy(stock), FULL)
    return stock, pa


# (inputs: self / kv (key is value) / cross, need_weights, mask, batch_first, dropout)
MHA_CASES = [
    pytest.param("self", True, None, True, 0.0, id="self-weights"),
    pytest.param("self", False, None, True, 0.0, id="self-sdpa"),
    pytest.param("kv", True, "kpm", False, 0.0, id="kv-weights-kpm-seqfirst"),
    pytest.param("cross", False, "attn", True, 0.0, id="cross-sdpa-mask"),
    pytest.param("cross", True, "both", True, 0.0, id="cross-weights-masks"),
    pytest.param("self", False, None, True, 0.2, id="self-sdpa-dropout"),
    pytest.param("self", True, "attn", False, 0.2, id="self-weights-dropout-seqfirst"),
]
CONVERT_CASES = [
    pytest.param("self", True, None, True, 0.0, id="self-weights"),
    pytest.param("self", False, None, True, 0.0, id="self-sdpa"),
    pytest.param("kv", True, "kpm", False, 0.0, id="kv-weights-kpm-seqfirst"),
    pytest.param("cross", False, "attn", True, 0.0, id="cross-sdpa-mask"),
    pytest.param("cross", True, "both", True, 0.0, id="cross-weights-masks"),
]


def _mha_inputs(kind, batch_first, g, L=5, S=6, N=2, E=12):
    def seq(n):
        return torch.randn((N, n, E) if batch_first else (n, N, E), generator=g)
    q = seq(L)
    if kind == "self":
        return q, None, None
    if kind == "kv":
        return q, seq(S), "same"
    return q, seq(S), seq(S)


def _run_mha(mod, kind, inputs, need_weights, mask, g_mask, cfg=None):
    q0, k0, v0 = inputs
    q = q0.clone().requires_grad_(True)
    k = q if kind == "self" else k0.clone().requires_grad_(True)
    v = k if kind in ("self", "kv") else v0.clone().requires_grad_(True)
    L, S = 5, (5 if kind == "self" else 6)
    kw = {}
    if mask in ("kpm", "both"):
        kpm = torch.zeros(2, S, dtype=torch.bool)
        kpm[0, -2:] = True
        kw["key_padding_mask"] = kpm
    if mask in ("attn", "both"):
        kw["attn_mask"] = torch.randn(L, S, generator=g_mask)
    cot = _cotangent(q.shape)
    mod.zero_grad()
    torch.manual_seed(3)   # the same dropout draws on both paths
    if cfg is None:
        out, w = mod(q, k, v, need_weights=need_weights, **kw)
        out.backward(cot)
    else:
        with pamtorch.mode(cfg):
            out, w = mod(q, k, v, need_weights=need_weights, **kw)
            out.backward(cot)
    grads = [t.grad for t in {id(t): t for t in (q, k, v)}.values()] + [p.grad for p in mod.parameters()]
    return out.detach(), (None if w is None else w.detach()), grads


@pytest.mark.parametrize("kind,need_weights,mask,batch_first,dropout", MHA_CASES)
def test_multihead_attention_under_mode_equals_pamtorch_nn(kind, need_weights, mask, batch_first, dropout):
    """Stock nn.MultiheadAttention under the mode (every path: need_weights, SDPA, torch's
    math SDPA in training with dropout) equals pamtorch.nn.MultiheadAttention: outputs,
    weights, input and parameter gradients, bit for bit."""
    g = torch.Generator().manual_seed(8)
    stock, pa = _mha_pair(batch_first, dropout=dropout)
    inputs = _mha_inputs(kind, batch_first, g)
    got = _run_mha(stock, kind, inputs, need_weights, mask, torch.Generator().manual_seed(9), FULL)
    want = _run_mha(pa, kind, inputs, need_weights, mask, torch.Generator().manual_seed(9))
    assert torch.equal(got[0], want[0])
    assert (got[1] is None) == (want[1] is None) and (got[1] is None or torch.equal(got[1], want[1]))
    assert len(got[2]) == len(want[2])
    for a, b in zip(got[2], want[2]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind,need_weights,mask,batch_first,dropout", CONVERT_CASES)
def test_converted_multihead_attention_equals_stock_under_mode(kind, need_weights, mask, batch_first,
                                                              dropout):
    g = torch.Generator().manual_seed(10)
    stock, _ = _mha_pair(batch_first)
    conv = pamtorch.convert(copy.deepcopy(stock), FULL)
    inputs = _mha_inputs(kind, batch_first, g)
    got = _run_mha(conv, kind, inputs, need_weights, mask, torch.Generator().manual_seed(11))
    want = _run_mha(stock, kind, inputs, need_weights, mask, torch.Generator().manual_seed(11), FULL)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[2], want[2]):
        assert torch.equal(a, b)


def test_pamtorch_mha_options_share_the_function_the_mode_routes():
    """pamtorch.nn.MultiheadAttention with bias_kv, zero_attn and separate k/v dims is
    PF.multi_head_attention_forward on the module's tensors (sequence first)."""
    g = torch.Generator().manual_seed(12)
    _, pa = _mha_pair(False, kdim=7, bias_kv=True, zero_attn=True)
    q, k = torch.randn(5, 2, 12, generator=g), torch.randn(6, 2, 7, generator=g)
    out, w = pa(q, k, k, average_attn_weights=False)
    ref = PF.multi_head_attention_forward(
        q, k, k, 12, 3, None, pa.in_proj_bias, pa.bias_k, pa.bias_v, True, 0.0, pa.out_proj.weight,
        pa.out_proj.bias, use_separate_proj_weight=True, q_proj_weight=pa.q_proj_weight,
        k_proj_weight=pa.k_proj_weight, v_proj_weight=pa.v_proj_weight, average_attn_weights=False,
        config=FULL)
    assert torch.equal(out, ref[0]) and torch.equal(w, ref[1]) and w.shape == (2, 3, 5, 8)


def test_aten_math_sdpa_called_directly_scales_q_once():
    g = torch.Generator().manual_seed(13)
    q, k, v = _qkv(g)
    want = PF.scaled_dot_product_attention_math(q, k, v, config=FULL)
    with pamtorch.mode(FULL):
        got = torch.ops.aten._scaled_dot_product_attention_math(q, k, v)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
