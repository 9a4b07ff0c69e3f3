"""Reductions and losses under the mode: var/std, logsumexp, xlogy, BCE (probabilities and
logits), L1, smooth L1, Huber and KL divergence.

Each is checked against exact float64 torch (error bounds a little above the errors
docs/nn.md reports), the elementwise ones bit for bit against the float64 PA reference of
tests/reference.py, and every step is audited for float multiplications outside PA.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pamtorch
import reference as R
from pamtorch.audit import audit
from pamtorch.config import Config, OpConfig
from pamtorch.nn.functional import _GradOps
from pamtorch.ops import losses as L
from pamtorch.ops import reductions as RD

aten = torch.ops.aten
F32 = torch.float32
FULL = Config.full()


def _inputs(seed=0, shape=(16, 12)):
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(shape, generator=g)
    p = torch.rand(shape, generator=g) * 0.98 + 0.01
    t = torch.rand(shape, generator=g)
    w = torch.rand(shape, generator=g) + 0.5
    q = torch.softmax(torch.randn(shape, generator=g), 1)
    return x, p, t, w, q


X, P, T, W, Q = _inputs()
_g = torch.Generator().manual_seed(3)
PW = torch.rand(12, generator=_g) + 0.5
CW = torch.rand(12, generator=_g) + 0.5
SIGNS = (torch.randint(0, 2, (16, 12), generator=_g) * 2 - 1).float()
LABELS = torch.randint(0, 12, (16,), generator=_g)

# name -> (function of (a, b) with a the differentiated input, a, b, bound on the forward's
# max error relative to max |exact|, bound on the gradient's, or None for no gradient check)
CASES = {
    "var_dim": (lambda a, b: a.var(1), X, None, 0.12, 0.15),
    "var_all_c0": (lambda a, b: a.var(correction=0), X, None, 0.06, 0.15),
    "var_keepdim_c2": (lambda a, b: torch.var(a, [0, 1], correction=2, keepdim=True), X, None, 0.06, 0.15),
    "std_dim": (lambda a, b: a.std(1), X, None, 0.1, 0.12),
    "var_mean": (lambda a, b: sum(torch.var_mean(a, 0)), X, None, 0.1, 0.15),
    "std_mean": (lambda a, b: sum(torch.std_mean(a, 1, correction=0)), X, None, 0.1, 0.15),
    "logsumexp": (lambda a, b: torch.logsumexp(a, 1), X, None, 0.06, 0.08),
    "logsumexp_keepdim": (lambda a, b: torch.logsumexp(a, [0, 1], keepdim=True), X, None, 0.06, 0.08),
    "xlogy": (lambda a, b: torch.xlogy(a, b), P, T + 0.01, 0.12, 0.12),
    "bce_mean": (lambda a, b: F.binary_cross_entropy(a, b), P, T, 0.12, 0.2),
    "bce_sum_weight": (lambda a, b: F.binary_cross_entropy(a, b, weight=W.to(a.dtype), reduction="sum"),
                       P, T, 0.12, 0.12),
    "bce_none": (lambda a, b: F.binary_cross_entropy(a, b, reduction="none"), P, T, 0.12, 0.12),
    "bce_logits_mean": (lambda a, b: F.binary_cross_entropy_with_logits(a, b), X, T, 0.08, 0.2),
    "bce_logits_none_weights": (lambda a, b: F.binary_cross_entropy_with_logits(
        a, b, weight=W.to(a.dtype), pos_weight=PW.to(a.dtype), reduction="none"), X, T, 0.2, 0.2),
    "bce_logits_sum": (lambda a, b: F.binary_cross_entropy_with_logits(a, b, reduction="sum"), X, T, 0.08, 0.2),
    "l1_mean": (lambda a, b: F.l1_loss(a, b), X, T, 0.12, 0.15),
    "l1_none": (lambda a, b: F.l1_loss(a, b, reduction="none"), X, T, 0.0, 0.0),
    "smooth_l1_none": (lambda a, b: F.smooth_l1_loss(a, b, reduction="none"), X, T, 0.02, 1e-6),
    "smooth_l1_mean_beta": (lambda a, b: F.smooth_l1_loss(a, b, beta=0.5), X, T, 0.16, 0.15),
    "smooth_l1_sum_beta0": (lambda a, b: F.smooth_l1_loss(a, b, beta=0.0, reduction="sum"), X, T, 1e-6, 1e-6),
    "huber_none": (lambda a, b: F.huber_loss(a, b, reduction="none"), X, T, 0.02, 1e-6),
    "huber_sum_delta": (lambda a, b: F.huber_loss(a, b, reduction="sum", delta=0.7), X, T, 0.1, 1e-6),
    "huber_mean_weight": (lambda a, b: F.huber_loss(a, b, weight=W.to(a.dtype)), X, T, 0.12, 0.15),
    "kl_batchmean": (lambda a, b: F.kl_div(F.log_softmax(a, 1), b, reduction="batchmean"), X, Q, 0.15, 0.1),
    "kl_none": (lambda a, b: F.kl_div(F.log_softmax(a, 1), b, reduction="none"), X, Q, 0.12, 0.1),
    "kl_sum_log_target": (lambda a, b: F.kl_div(F.log_softmax(a, 1), b, reduction="sum", log_target=True),
                          X, Q.log(), 0.4, 0.4),
    "pairwise_distance": (lambda a, b: F.pairwise_distance(a, b), X, T, 0.05, 0.1),
    "pairwise_distance_p1": (lambda a, b: F.pairwise_distance(a, b, p=1.0), X, T, 1e-6, 1e-6),
    # pa_pow(|x|, 3) alone is off by up to ~25% (palog2, the PAM by 3, paexp2); the
    # backward divides by result.pow(2), which doubles that
    "pairwise_distance_p3": (lambda a, b: F.pairwise_distance(a, b, p=3.0), X, T, 0.25, 0.6),
    # the gradient is a difference of two unit vectors (a-p)/|a-p| - (a-n)/|a-n|
    "triplet_margin": (lambda a, b: F.triplet_margin_loss(a, b, b.flip(0)), X, T, 0.1, 0.3),
    "soft_margin_mean": (lambda a, b: F.soft_margin_loss(a, b), X, SIGNS, 0.12, 0.2),
    "soft_margin_none": (lambda a, b: F.soft_margin_loss(a, b, reduction="none"), X, SIGNS, 0.08, 0.12),
    "multi_margin_p1_mean": (lambda a, b: F.multi_margin_loss(a, b), X, LABELS, 0.12, 1e-6),
    "multi_margin_p2_none_weight": (lambda a, b: F.multi_margin_loss(
        a, b, p=2, margin=0.5, weight=CW.to(a.dtype), reduction="none"), X, LABELS, 0.08, 0.15),
    "multi_margin_1d_sum": (lambda a, b: F.multi_margin_loss(a[0], b[0], reduction="sum"), X, LABELS, 0.12, 1e-6),
    "xlog1py": (lambda a, b: torch.special.xlog1py(a, b), P, T, 0.12, 0.15),
    "entr": (lambda a, b: torch.special.entr(a), P, None, 0.15, 0.12),
    "nanmean": (lambda a, b: a.nanmean(1), X, None, 0.12, 0.15),
}


def _run(f, a, b, dtype, cfg):
    a = a.detach().to(dtype).clone().requires_grad_(True)
    if b is not None and b.is_floating_point():   # targets: labels stay integers
        b = b.to(dtype)
    if cfg is None:
        out = f(a, b)
        out.sum().backward()
    else:
        with pamtorch.mode(cfg):
            out = f(a, b)
            out.sum().backward()
    return out.detach().double(), a.grad.double()


@pytest.mark.parametrize("name", list(CASES))
def test_pa_loss_is_close_to_exact_and_not_exact(name):
    f, a, b, fwd_bound, grad_bound = CASES[name]
    out, grad = _run(f, a, b, F32, FULL)
    ref, gref = _run(f, a, b, torch.float64, None)
    exact32, gexact32 = _run(f, a, b, F32, None)
    assert out.shape == ref.shape and torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert (out - ref).abs().max() <= fwd_bound * ref.abs().max() + 1e-6
    assert (grad - gref).abs().max() <= grad_bound * gref.abs().max() + 1e-9
    if fwd_bound > 1e-6:   # PA really ran: not the float32 result
        assert not torch.equal(out, exact32)


@pytest.mark.parametrize("name", ["var_dim", "std_mean", "logsumexp", "xlogy", "bce_sum_weight",
                                  "bce_logits_none_weights", "l1_mean", "smooth_l1_mean_beta",
                                  "huber_sum_delta", "kl_batchmean", "kl_sum_log_target", "pairwise_distance_p3",
                                  "triplet_margin", "soft_margin_mean", "multi_margin_p2_none_weight",
                                  "xlog1py", "entr", "nanmean"])
def test_loss_step_is_multiplication_free(name):
    f, a, b, _, _ = CASES[name]
    a = a.clone().requires_grad_(True)

    def step():
        with pamtorch.mode(FULL):
            f(a, b).sum().backward()

    report = audit(step)
    report.assert_multiplication_free()
    assert sum(sum(c.values()) for c in report.pa.values()) > 0


# ---------------------------------------------------------------------------
# bit for bit against the float64 PA reference (tests/reference.py), elementwise forms

def _np(t):
    return t.detach().double().numpy()


def _r(v):
    return R.round_to(v, F32).double().numpy()


def test_smooth_l1_and_huber_equal_the_reference():
    x, t = X, T
    z = np.abs(_r(_np(x) - _np(t)))
    beta, delta = 0.5, 0.7
    sl1 = np.where(z < beta, R.pad(R.pam(z, z, F32), 2 * beta, F32), _r(z - 0.5 * beta))
    hub = np.where(z < delta, R.pam(R.pam(z, z, F32), 0.5, F32), R.pam(_r(z - _r(0.5 * delta)), _r(delta), F32))
    with pamtorch.mode(FULL):
        got_sl1 = F.smooth_l1_loss(x, t, beta=beta, reduction="none")
        got_hub = F.huber_loss(x, t, delta=delta, reduction="none")
    np.testing.assert_array_equal(_np(got_sl1), sl1)
    np.testing.assert_array_equal(_np(got_hub), hub)
    # and the approx derivatives: dy ⊙̂ (d ÷̂ β) inside, dy ⊙̂ clamp(d, ±δ) for Huber
    dy = W
    d = _r(_np(x) - _np(t))
    gs = np.where(d <= -beta, -_np(dy), np.where(d >= beta, _np(dy), R.pam(R.pad(d, beta, F32), _np(dy), F32)))
    gh = R.pam(np.clip(d, -_r(delta), _r(delta)), _np(dy), F32)
    np.testing.assert_array_equal(_np(L.smooth_l1_backward(dy, x, t, "none", beta)), gs)
    np.testing.assert_array_equal(_np(L.huber_backward(dy, x, t, "none", delta)), gh)


def test_bce_and_xlogy_equal_the_reference():
    p, t, w = P, T, W
    lo = -100.0
    l1p = np.maximum(_r(R.log(_r(1 - _np(p)), F32)), lo)
    lp = np.maximum(_r(R.log(_np(p), F32)), lo)
    ref = _r(R.pam(_r(_np(t) - 1), l1p, F32) - R.pam(_np(t), lp, F32))
    ref = R.pam(ref, _np(w), F32)
    with pamtorch.mode(FULL):
        got = F.binary_cross_entropy(p, t, weight=w, reduction="none")
        xl = torch.xlogy(p, t)
    np.testing.assert_array_equal(_np(got), ref)
    np.testing.assert_array_equal(_np(xl), R.pam(_np(p), _r(R.log(_np(t), F32)), F32))
    # approx derivative: (dy ⊙̂ (x - t)) ÷̂ max((1 - x) ⊙̂ x, 1e-12), ⊙̂ w, ÷̂ n for mean
    dy = torch.tensor(0.75)
    den = np.maximum(R.pam(_r(1 - _np(p)), _np(p), F32), _r(1e-12))
    g = R.pad(R.pam(0.75, _r(_np(p) - _np(t)), F32), den, F32)
    g = R.pad(R.pam(g, _np(w), F32), float(p.numel()), F32)
    np.testing.assert_array_equal(_np(L.bce_backward(dy, p, t, w, "mean")), g)


def test_var_equals_the_reference_up_to_summation_order():
    x = X
    n = x.shape[1]
    s = x.double().sum(1, keepdim=True).numpy()
    mean = R.pad(_r(s), float(n), F32)
    xc = _r(_np(x) - mean)
    var = R.pad(_r(R.pam(xc, xc, F32).sum(1)), float(n - 1), F32)
    with pamtorch.mode(FULL):
        got = x.var(1)
        got_std = x.std(1)
    np.testing.assert_allclose(_np(got), var, rtol=2e-6)
    np.testing.assert_array_equal(_np(got_std), _r(R.sqrt(_np(got), F32)))


def test_multi_margin_and_soft_margin_equal_the_reference():
    x, y, w = _np(X), LABELS.numpy(), _np(CW)
    n, c = x.shape
    z = _r(_r(0.5 - x[np.arange(n), y][:, None]) + x)
    keep = (z > 0) & (np.arange(c)[None, :] != y[:, None])
    h = R.pam(R.pam(z, z, F32), w[y][:, None], F32)
    per = R.pad(_r(np.where(keep, h, 0.0).sum(1)), float(c), F32)
    with pamtorch.mode(FULL):
        got = F.multi_margin_loss(X, LABELS, p=2, margin=0.5, weight=CW, reduction="none")
        soft = F.soft_margin_loss(X, SIGNS, reduction="none")
    np.testing.assert_allclose(_np(got), per, rtol=1e-6)
    e = _r(R.exp(-R.pam(_np(SIGNS), x, F32), F32))
    np.testing.assert_array_equal(_np(soft), _r(R.log(_r(1 + e), F32)))


# ---------------------------------------------------------------------------
# special values, overloads and errors

def test_var_std_edge_cases_follow_torch():
    x = torch.tensor([[1.0, 3.0, 5.0], [2.0, 2.0, 2.0]])
    with pamtorch.mode(FULL):
        one = torch.var(torch.tensor([4.0]))           # n - 1 = 0: 0/0
        big_c = torch.var(x, 1, correction=3)         # divisor max(0, 3 - 3) = 0
        empty = torch.var(torch.empty(0))
        scalar = torch.std(torch.tensor(2.0), correction=0)
        v, m = torch.var_mean(x, 1, keepdim=True)
        out = torch.empty(0)
        torch.var(x, 1, out=out)
        v1 = torch.var(x, 1)
    assert torch.isnan(one) and torch.isnan(empty) and scalar == 0
    assert big_c[0] == math.inf and torch.isnan(big_c[1])
    # 9 ÷̂ 3 = 2^(3-1) (1 + 0.125 - 0.5) = 3.25 (PAD's error), 6 ÷̂ 3 = 2 exactly
    assert v.shape == m.shape == (2, 1) and torch.equal(m, torch.tensor([[3.25], [2.0]]))
    assert torch.equal(v[1], torch.zeros(1))
    assert torch.equal(out, v1) and not torch.equal(v1, torch.var(x, 1))


def test_logsumexp_infinities_and_empty():
    x = torch.tensor([[-math.inf, -math.inf], [math.inf, 0.0], [0.0, 0.0], [-math.inf, 1.0]])
    with pamtorch.mode(FULL):
        got = torch.logsumexp(x, 1)
        empty = torch.logsumexp(torch.empty(2, 0), 1)
    assert got[0] == -math.inf and got[1] == math.inf
    assert got[2] == R.round_to(R.log(2.0, F32), F32)
    assert got[3] == 1.0   # pa_exp(0) = 1 and pa_exp(-inf) = 0: log(1) = 0 exactly
    assert torch.equal(empty, torch.full((2,), -math.inf))


def test_xlogy_special_values_and_overloads():
    x = torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0])
    y = torch.tensor([math.nan, 0.0, 0.0, 1.0, math.inf])
    with pamtorch.mode(FULL):
        got = torch.xlogy(x, y)
        s_self = torch.xlogy(2.0, torch.tensor([1.0, 4.0]))
        s_other = torch.special.xlogy(torch.tensor([0.0, 4.0]), 2.0)
        inplace = torch.tensor([1.5, 0.0]).xlogy_(torch.tensor([4.0, 9.0]))
        out = torch.empty(5)
        torch.xlogy(x, y, out=out)
    assert torch.isnan(got[0]) and got[1] == 0 and got[2] == -math.inf and got[3] == 0 and got[4] == math.inf
    assert torch.equal(out[1:], got[1:]) and torch.isnan(out[0])

    def pa_xlogy(a, b):
        return R.pam(a, _r(R.log(b, F32)), F32)
    assert s_self[0] == 0 and s_self[1] == pa_xlogy(2.0, 4.0)
    assert s_other[0] == 0 and s_other[1] == pa_xlogy(4.0, 2.0)
    assert inplace[1] == 0 and inplace[0] == pa_xlogy(1.5, 4.0)


@pytest.mark.xfail(strict=True, reason="torch 2.13's F.l1_loss drops weight= under any "
                   "TorchFunctionMode (its handle_torch_function call omits it), so under "
                   "pamtorch.mode the weight is silently ignored")
def test_weighted_l1_under_the_mode_keeps_its_weight():
    with pamtorch.mode(FULL):
        got = F.l1_loss(X, T, reduction="none", weight=W)
    assert not torch.equal(got, (X - T).abs())


def test_bce_rejects_inputs_outside_the_unit_interval():
    with pamtorch.mode(FULL):
        with pytest.raises(RuntimeError, match="input should be between 0 and 1"):
            F.binary_cross_entropy(torch.tensor([1.5]), torch.tensor([0.5]))
        with pytest.raises(RuntimeError, match="target should be between 0 and 1"):
            F.binary_cross_entropy(torch.tensor([0.5]), torch.tensor([2.0]))
        with pytest.raises(RuntimeError, match="non-positive values for delta"):
            torch.ops.aten.huber_loss(torch.zeros(2), torch.ones(2), 1, 0.0)
        with pytest.raises(RuntimeError, match="negative values for beta"):
            torch.ops.aten.smooth_l1_loss(torch.zeros(2), torch.ones(2), 1, -1.0)
        with pytest.raises(ValueError, match="reduction"):
            L.huber_forward(torch.zeros(2), torch.ones(2), "avg")


def test_margin_losses_reject_what_torch_rejects():
    with pamtorch.mode(FULL):
        with pytest.raises(RuntimeError, match="only p == 1 and p == 2"):
            torch.ops.aten.multi_margin_loss(X, LABELS, 3)
        with pytest.raises(RuntimeError, match="target out of range"):
            F.multi_margin_loss(X, LABELS + 12)


def test_entr_and_xlog1py_special_values():
    x = torch.tensor([0.0, -1.0, math.nan, 1.0, 0.5])
    with pamtorch.mode(FULL):
        e = torch.special.entr(x)
        xl = torch.special.xlog1py(torch.tensor([0.0, 0.0, 2.0]), torch.tensor([-1.0, math.nan, 0.0]))
    assert e[0] == 0 and e[1] == -math.inf and torch.isnan(e[2]) and e[3] == 0
    assert e[4] == -R.pam(0.5, _r(R.log(0.5, F32)), F32)
    assert xl[0] == 0 and torch.isnan(xl[1]) and xl[2] == 0


def test_bce_clamps_the_log_at_minus_100_like_torch():
    p = torch.tensor([0.0, 1.0, 0.0, 1.0])
    t = torch.tensor([0.0, 1.0, 1.0, 0.0])
    with pamtorch.mode(FULL):
        got = F.binary_cross_entropy(p, t, reduction="none")
    assert torch.equal(got, torch.tensor([0.0, 0.0, 100.0, 100.0]))


def test_loss_kind_left_exact_runs_torch():
    cfg = FULL.replace(loss=OpConfig(pa=False))
    with pamtorch.mode(cfg):
        got = F.binary_cross_entropy(P, T)
        hub = F.huber_loss(X, T, reduction="none")
    assert torch.equal(got, F.binary_cross_entropy(P, T))
    assert torch.equal(hub, F.huber_loss(X, T, reduction="none"))


def test_forwards_share_one_code_path_across_derivative_kinds():
    """The raw forwards take the ``_ops`` namespace: with autograd-aware exact-derivative PA
    ops they compute the same values bit for bit, and autograd then gives the derivative of
    the PA function itself (piecewise constant: in Huber's linear part the PAM by δ = 0.7
    has derivative 2^(E+c), 0.5 or 1, where the approx backward gives 0.7)."""
    ops = _GradOps("exact")
    x = X.clone().requires_grad_(True)
    for fwd, args in [(L.smooth_l1_forward, ("sum", 0.5)), (L.huber_forward, ("mean", 0.7)),
                      (L.bce_with_logits_forward, (W, PW, "sum")), (L.xlogy_forward, ()),
                      (RD.logsumexp_forward, (1,)), (lambda a, b: RD.var_forward(a, 1)[0], ())]:
        b = P if fwd is L.xlogy_forward else T
        a = x.abs() if fwd is L.xlogy_forward else x
        kw = {} if fwd.__name__ == "<lambda>" else {"_ops": ops}
        if fwd is RD.logsumexp_forward:
            exact, raw = fwd(a, *args, **kw), fwd(a.detach(), *args)
        elif kw:
            exact, raw = fwd(a, b, *args, **kw), fwd(a.detach(), b, *args)
        else:
            exact, raw = RD.var_forward(a, 1, _ops=ops)[0], RD.var_forward(a.detach(), 1)[0]
        assert torch.equal(exact.detach(), raw)
    x.grad = None
    L.huber_forward(x, T, "sum", 0.7, _ops=ops).backward()
    far = (X - T).abs() > 0.7
    assert set(x.grad[far].abs().unique().tolist()) <= {0.5, 1.0}
    assert torch.equal(L.huber_backward(torch.tensor(1.0), X, T, "sum", 0.7)[far].abs(),
                       torch.full((int(far.sum()),), 0.7))


# ---------------------------------------------------------------- the balanced loss derivative

BALANCED = FULL.replace(loss=OpConfig(derivative="balanced"))


def _ce_grad(cfg, fn, x, t):
    x = x.clone().requires_grad_(True)
    with pamtorch.mode(cfg):
        loss = fn(x, t)
        loss.backward()
    return loss.detach(), x.grad


def test_balanced_is_a_loss_only_derivative():
    assert BALANCED.loss.derivative == "balanced"
    with pytest.raises(ValueError, match="loss kind's log-softmax only"):
        FULL.replace(matmul=OpConfig(derivative="balanced"))
    with pytest.raises(ValueError, match="loss kind's log-softmax only"):
        FULL.with_derivative("balanced")
    with pytest.raises(ValueError, match="must be one of"):
        OpConfig(derivative="balance")


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_balanced_loss_derivative_sums_to_zero_per_row(smoothing):
    """The approx cross-entropy gradient with each row's sum taken off the row's largest
    logit: the same loss value, the same gradient everywhere else bit for bit, rows that sum
    to 0 up to float rounding where the approx rows do not; through F.cross_entropy, through
    F.log_softmax + F.nll_loss and through a converted nn.CrossEntropyLoss alike; and the
    step is multiplication-free."""
    g = torch.Generator().manual_seed(3)
    x = 3 * torch.randn(32, 10, generator=g)
    t = torch.randint(0, 10, (32,), generator=g)
    t[5] = -100  # an ignored row: its gradient row is 0 in both

    def ce(x, t):
        return F.cross_entropy(x, t, label_smoothing=smoothing)

    la, ga = _ce_grad(FULL, ce, x, t)
    lb, gb = _ce_grad(BALANCED, ce, x, t)
    assert torch.equal(la, lb)
    changed = ga != gb
    assert changed.sum(1).le(1).all() and changed.any()
    rows, cols = changed.nonzero(as_tuple=True)
    assert torch.equal(cols, x.argmax(1)[rows])
    pull = ga.abs().amax(1)
    assert (ga.sum(1).abs() > 1e-3 * pull).sum() >= 16  # the approx rows are off
    assert (gb.sum(1).abs() <= 1e-6 * pull + 1e-12).all()
    assert torch.equal(gb[5], torch.zeros(10))
    if smoothing == 0.0:  # the log_softmax + nll_loss model gets the same gradient
        _, gn = _ce_grad(BALANCED, lambda x, t: F.nll_loss(F.log_softmax(x, 1), t), x, t)
        assert torch.equal(gn, gb)
    conv = pamtorch.convert(torch.nn.CrossEntropyLoss(label_smoothing=smoothing), BALANCED)
    xc = x.clone().requires_grad_(True)
    conv(xc, t).backward()
    assert torch.equal(xc.grad, gb)

    def step():
        _ce_grad(BALANCED, ce, x, t)

    audit(step).assert_multiplication_free()
