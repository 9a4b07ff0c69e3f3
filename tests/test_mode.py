"""The dispatch-level mode, the PA optimizers and the audit on small stock models."""

import pytest
import torch
import torch.nn.functional as F

import pamtorch
from pamtorch import arith
from pamtorch.audit import MultiplicationFoundError, audit
from pamtorch.config import KINDS, Config, OpConfig
from pamtorch.mode import UnsupportedOpError, mode


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 8, generator=g)
    return x, x.sum(1, keepdim=True)


def test_elementwise_ops_are_routed_to_pa():
    a, b = torch.randn(50), torch.randn(50)
    with mode(Config.full()):
        prod, quot, root = a * b, a / b, b.abs().sqrt()
        ex = torch.exp(a)
    assert torch.equal(prod, arith.pam(a, b))
    assert torch.equal(quot, arith.pad(a, b))
    assert torch.equal(root, arith.pa_sqrt(b.abs()))
    assert torch.equal(ex, arith.pa_exp(a))


def test_matmul_under_mode_equals_pamtorch_matmul():
    a, b = torch.randn(7, 5), torch.randn(5, 3)
    with mode():
        c = a @ b
    assert torch.equal(c, pamtorch.matmul(a, b))


def test_integer_ops_and_additions_pass_through():
    i = torch.arange(10)
    x = torch.randn(10)
    with mode():
        assert torch.equal(i * 3, torch.arange(0, 30, 3))
        assert torch.equal(x + x, x + x)
        assert torch.equal(x.view(2, 5).t().contiguous(), x.view(2, 5).t().contiguous())


def test_kinds_left_exact_by_the_config_run_exact():
    a, b = torch.randn(20), torch.randn(20)
    exact = a * b
    with mode(Config.matmul_only()):
        left = a * b
    with mode(Config.full()):
        pa = a * b
    assert torch.equal(left, exact)
    assert torch.equal(pa, arith.pam(a, b)) and not torch.equal(pa, exact)


def test_unknown_multiply_like_op_is_an_error_naming_it():
    with mode():
        with pytest.raises(UnsupportedOpError, match="aten.cumprod"):
            torch.cumprod(torch.randn(5), 0)


def test_stock_model_trains_under_mode_with_stock_adamw():
    model, (x, y) = mlp(), data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        with mode(Config.full()):
            loss = ((model(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("name", ["AdamW", "Adam", "SGD"])
def test_pa_optimizer_equals_stock_optimizer_under_mode_bit_for_bit(name):
    kw = dict(lr=1e-2, weight_decay=0.1)
    if name == "SGD":
        kw.update(momentum=0.9, nesterov=True)
    m1, m2 = mlp(), mlp()
    x, y = data()
    o1 = getattr(pamtorch.optim, name)(m1.parameters(), config=Config.full(), **kw)
    o2 = getattr(torch.optim, name)(m2.parameters(), **kw)
    for _ in range(3):
        for m, o, under in ((m1, o1, False), (m2, o2, True)):
            with mode(Config.full()):
                loss = ((m(x) - y) ** 2).mean()
                o.zero_grad()
                loss.backward()
            if under:
                with mode(Config.full()):
                    o.step()
            else:
                o.step()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    # and PA really changed the step: exact AdamW gives other weights
    m3 = mlp()
    o3 = getattr(torch.optim, name)(m3.parameters(), **kw)
    for _ in range(3):
        with mode(Config.full()):
            loss = ((m3(x) - y) ** 2).mean()
            o3.zero_grad()
            loss.backward()
        o3.step()
    assert not all(torch.equal(p1, p3) for p1, p3 in zip(m1.parameters(), m3.parameters()))


def test_clip_grad_norm_is_pa():
    model, (x, y) = mlp(), data()
    ((model(x) - y) ** 2).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = pamtorch.optim.clip_grad_norm_(model.parameters(), 0.1)
    sq = sum(arith.pam(g, g).sum() for g in grads)
    assert torch.equal(norm, arith.pa_sqrt(sq))
    assert norm > 0.1
    assert torch.all(torch.stack([p.grad.abs().max() for p in model.parameters()]) <
                     torch.stack([g.abs().max() for g in grads]))


def _step(model, opt, x, y, cfg):
    with mode(cfg):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


def test_audit_of_a_step_under_mode_is_multiplication_free():
    model, (x, y) = mlp(), data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    report = audit(_step, model, opt, x, y, Config.full())
    report.assert_multiplication_free()
    for phase in ("forward", "backward", "optimizer"):
        assert sum(report.pa[phase].values()) > 0, phase
    assert report.pa["forward"]["addmm"] == 2
    assert report.pa["backward"]["mm"] >= 2
    assert report.pa["optimizer"]["lerp_"] == 4
    assert {"0", "2"} <= report.modules[("forward", "addmm")]
    en = report.energy_pj()
    assert 0 < en["as_run"] < en["exact"]
    text = str(report)
    assert "multiplication-free" in text and "optimizer" in text


def test_audit_finds_multiplications_outside_pa():
    model, (x, y) = mlp(), data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = Config.full().replace(optimizer=OpConfig(pa=False))
    report = audit(_step, model, opt, x, y, cfg)
    assert not report.multiplication_free()
    assert report.outside["optimizer"]["lerp_"] == 4
    assert sum(report.outside["forward"].values()) == 0
    with pytest.raises(MultiplicationFoundError, match="optimizer: lerp_"):
        report.assert_multiplication_free()
    plain = audit(lambda: torch.randn(3, 3) @ torch.randn(3, 3))
    assert plain.outside["forward"]["mm"] == 1
    assert plain.energy_pj()["ratio"] == pytest.approx(1.0)


def test_config_presets_and_ablation():
    # paper(): the released fully-PA command, approx everywhere (the kinds of full())
    assert Config.paper() == Config.full() == Config()
    assert all(Config.paper().kind(k).derivative == "approx" for k in KINDS)
    exact_loss = Config.paper_exact_loss()
    assert exact_loss.loss.derivative == "exact" and exact_loss.matmul.derivative == "approx"
    assert Config.from_name("paper-exact-loss") == exact_loss
    mo = Config.matmul_only()
    assert mo.matmul.pa and not mo.softmax.pa and not mo.optimizer.pa
    rows = [Config.ablation(*k) for k in (("matmul",), ("matmul", "softmax"), ("matmul", "softmax", "norm"),
                                          ("matmul", "softmax", "norm", "loss"),
                                          ("matmul", "softmax", "norm", "loss", "optimizer"))]
    assert [sum(getattr(r, k).pa for k in ("matmul", "softmax", "norm", "loss", "optimizer")) for r in rows] == [1, 2, 3, 4, 5]
    assert Config.from_name("pam-full", "exact").matmul.derivative == "exact"
    assert Config.from_name("matmul+softmax") == Config.ablation("matmul", "softmax")
    with pytest.raises(ValueError, match="unknown preset"):
        Config.from_name("matmul+sofmax")
    with pytest.raises(ValueError, match="unknown op kind"):
        Config.ablation("matmull")
    with pytest.raises(ValueError, match="derivative"):
        OpConfig(derivative="approximately")
    with pytest.raises(Exception):
        Config().matmul = OpConfig()  # frozen


def test_error_report_gives_finite_sqnr_per_layer():
    model, (x, _) = mlp(), data()
    rows = pamtorch.error_report(model, x, Config.full())
    names = [r["layer"] for r in rows]
    assert names == ["0", "1", "2", "(output)"]
    for r in rows:
        assert 5 < r["sqnr_db"] < 80, r   # PAM's few-percent error: tens of dB, never exact


@pytest.mark.parametrize("name,kw", [("AdamW", dict(foreach=True, weight_decay=0.1)),
                                     ("Adam", dict(foreach=True)),
                                     ("SGD", dict(foreach=True, momentum=0.9, weight_decay=0.01))])
def test_foreach_optimizers_are_routed(name, kw):
    model, (x, y) = mlp(), data()
    opt = getattr(torch.optim, name)(model.parameters(), lr=1e-2, **kw)
    report = audit(_step, model, opt, x, y, Config.full())
    report.assert_multiplication_free()
    assert any(op.startswith("_foreach_") for op in report.pa["optimizer"]), report.pa["optimizer"]
    before = [p.detach().clone() for p in model.parameters()]
    _step(model, opt, x, y, Config.full())
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_exact_matmul_derivative_reaches_bmm_and_linear_under_mode():
    """With matmul.derivative="exact" the function-level mode hands torch.bmm and F.linear
    to pamtorch's autograd functions, whose backward is the exact kernel."""
    cfg = Config.full().replace(matmul=OpConfig(derivative="exact"))
    a = torch.randn(3, 4, 5, requires_grad=True)
    b = torch.randn(3, 5, 2)
    with mode(cfg):
        torch.bmm(a, b).sum().backward()
    a2 = a.detach().clone().requires_grad_(True)
    pamtorch.bmm(a2, b, derivative="exact").sum().backward()
    assert torch.equal(a.grad, a2.grad)
    w = torch.randn(2, 5)
    x = torch.randn(4, 5, requires_grad=True)
    with mode(cfg):
        torch.nn.functional.linear(x, w).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    pamtorch.linear(x2, w, derivative="exact").sum().backward()
    assert torch.equal(x.grad, x2.grad)


@pytest.mark.parametrize("call", ["torch", "tensor"])
def test_exact_softmax_route_takes_torch_softmax_positional_dtype(call):
    """torch.softmax(x, dim, dtype) and x.softmax(dim, dtype): the third positional argument
    is the dtype (F.softmax's is _stacklevel)."""
    x = torch.randn(3, 4)
    cfg = Config.full().replace(softmax=OpConfig(derivative="exact"))
    with mode(cfg):
        y = torch.softmax(x, 1, torch.float16) if call == "torch" else x.softmax(1, torch.float16)
    assert y.dtype == torch.float16


def test_a_failing_optimizer_step_does_not_leave_later_ops_in_the_optimizer_kind():
    """The step's post hook never runs when step raises; leaving the mode restores the depth."""
    from pamtorch.ops.table import OPTIMIZER_STEP
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.SGD([p], lr=0.1)
    p.grad = torch.ones(3)

    def closure():
        raise RuntimeError("the closure fails inside the step")

    with pytest.raises(RuntimeError, match="closure fails"):
        with mode(Config.full()):
            opt.step(closure)
    assert OPTIMIZER_STEP[0] == 0


@pytest.mark.parametrize("fn", ["batch_norm", "group_norm", "instance_norm"])
def test_exact_norm_derivative_takes_the_function_route(fn):
    """A config asking the norm kind for exact derivatives gets them for batch, group and
    instance norm too: the gradient differs from the approx one, the forward does not."""
    torch.manual_seed(0)
    x = torch.randn(4, 4, 3, 3)
    w, b = torch.randn(4), torch.randn(4)
    calls = {"batch_norm": lambda t: F.batch_norm(t, None, None, w, b, training=True),
             "group_norm": lambda t: F.group_norm(t, 2, w, b),
             "instance_norm": lambda t: F.instance_norm(t, weight=w, bias=b)}
    outs, grads = [], []
    for kind in ("approx", "exact"):
        t = x.clone().requires_grad_()
        with mode(Config.full().replace(norm=OpConfig(derivative=kind))):
            y = calls[fn](t)
            (y * y).sum().backward()
        outs.append(y.detach())
        grads.append(t.grad)
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(grads[0], grads[1]) and torch.isfinite(grads[1]).all()
