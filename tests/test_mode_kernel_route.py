"""pamtorch.mode's kernel route (the mode's routing done by boxed kernels on the
BackendSelect key instead of a Python dispatch mode) gives the dispatch route's bits and
refusals."""
import copy
import importlib
import threading

import pytest
import torch
from torch import nn

import pamtorch
from pamtorch.config import Config
from pamtorch.kernels import cpu as K
from pamtorch.ops import UnsupportedOpError

import model_zoo
from test_audit import _CumprodGrad   # identity forward, cumprod in backward

M = importlib.import_module("pamtorch.mode")   # the module (pamtorch.mode is the function)

pytestmark = pytest.mark.skipif(not K.available() or torch.cuda.is_available(),
                                reason="the kernel route needs the compiled CPU kernels and no CUDA device")

PM = Config.matmul_only()


def _steps(case, model, batch, opt, route, cfg, n=2):
    losses = []
    for step in range(n):
        torch.manual_seed(step)   # the same dropout masks on both routes
        with pamtorch.mode(cfg, route=route):
            losses.append(model_zoo.train_step(case, model, batch, opt))
    return losses


@pytest.mark.parametrize("cfg_name", ["matmul_only", "full", "paper_exact_loss"])
@pytest.mark.parametrize("case", model_zoo.CASES, ids=[c.name for c in model_zoo.CASES])
def test_stock_models_train_bit_for_bit_as_on_the_dispatch_route(case, cfg_name):
    if case.needs:
        pytest.importorskip(case.needs)
    cfg = getattr(Config, cfg_name)()
    model, batch, opt = model_zoo.make(case)
    model2 = copy.deepcopy(model)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=case.lr)
    a = _steps(case, model, batch, opt, "dispatch", cfg)
    b = _steps(case, model2, batch, opt2, "kernel", cfg)
    assert [x.item() for x in a] == [x.item() for x in b]
    for (name, p), q in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), name


def test_products_are_pa_forward_and_backward_and_the_rest_exact():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 5, generator=g, requires_grad=True)
    b = torch.randn(5, 4, generator=g, requires_grad=True)
    c = torch.randn(6, 4, generator=g)
    grads = {}
    for route in ("dispatch", "kernel"):
        a.grad = b.grad = None
        with pamtorch.mode(PM, route=route):
            y = a @ b
            z = y * c                     # elementwise: exact under pam-matmul
            z.sum().backward()
        grads[route] = (y.detach(), z.detach(), a.grad.clone(), b.grad.clone())
    for x, y in zip(grads["dispatch"], grads["kernel"]):
        assert torch.equal(x, y)
    y, z, ga, gb = grads["kernel"]
    assert torch.equal(y, pamtorch.matmul(a.detach(), b.detach()))
    assert not torch.equal(y, a.detach() @ b.detach())   # PA, not exact
    assert torch.equal(z, y * c)
    assert torch.equal(ga, pamtorch.matmul(c, b.detach().t()))   # approx: dA = dY ·̂ B^T


def test_out_variants_and_batched_products():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 4, 5, generator=g), torch.randn(3, 5, 2, generator=g)
    outs = {}
    for route in ("dispatch", "kernel"):
        o = torch.empty(3, 4, 2)
        with pamtorch.mode(PM, route=route):
            torch.bmm(a, b, out=o)
            r = torch.baddbmm(o, a, b)
            e = torch.einsum("bij,bjk->bik", a, b)
            c = torch.zeros(4, 2)
            c.addmm_(a[0], b.transpose(1, 2)[0].t())   # in place, on a transposed view
        outs[route] = (o, r, e, c)
    for x, y in zip(outs["dispatch"], outs["kernel"]):
        assert torch.equal(x, y)
    assert not torch.equal(outs["kernel"][0], torch.bmm(a, b))


def test_an_op_with_no_pa_implementation_is_refused_as_on_the_dispatch_route():
    x = torch.randn(5, dtype=torch.float64)
    for route in ("dispatch", "kernel"):
        with pytest.raises(UnsupportedOpError, match="cumprod"):
            with pamtorch.mode(PM, route=route):
                torch.cumprod(x, 0)
    # integer inputs with an integer result are free on both
    i = torch.arange(6)
    with pamtorch.mode(PM, route="kernel"):
        assert torch.equal(torch.cumprod(i, 0), torch.cumprod(torch.arange(6), 0))
        # a wrapped number passes on unconverted (aten::bitwise_and_.Tensor from C++)
        j = torch.tensor([7, 12], dtype=torch.int32)
        j &= 5
    assert j.tolist() == [5, 4] and j.dtype == torch.int32


def test_a_refusal_in_backward_reaches_the_caller_through_the_autograd_engine():
    x = torch.randn(4, requires_grad=True)
    for route in ("dispatch", "kernel"):
        with pytest.raises(UnsupportedOpError, match="cumprod.*in backward"):
            with pamtorch.mode(PM, route=route):
                _CumprodGrad.apply(x).sum().backward()


def test_refusals_name_the_same_reason_a_dtype_argument_included():
    """A dtype travels as an int in the boxed call; the route hands Python torch.float64,
    so the classification (a meta run with dtype=) finds the same result type."""
    i = torch.arange(1, 6)
    msgs = {}
    for route in ("dispatch", "kernel"):
        with pytest.raises(UnsupportedOpError) as e:
            with pamtorch.mode(PM, route=route):
                torch.cumprod(i, 0, dtype=torch.float64)
        msgs[route] = str(e.value)
    assert "integer inputs give a torch.float64 result" in msgs["kernel"]
    assert msgs["dispatch"] == msgs["kernel"]


def test_the_route_is_off_outside_the_mode_and_on_other_threads():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    exact = a @ b
    seen = {}
    ready, done = threading.Event(), threading.Event()

    def other():
        ready.wait()
        seen["other"] = a @ b
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with pamtorch.mode(PM, route="kernel"):
        ready.set()
        done.wait(30)
        inside = a @ b
    t.join()
    assert torch.equal(seen["other"], exact)
    assert torch.equal(a @ b, exact)
    assert torch.equal(inside, pamtorch.matmul(a, b))


def test_nesting():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    with pamtorch.mode(PM, route="kernel"):
        with pamtorch.mode(Config.full(), route="dispatch"):   # a dispatch mode inside: its config applies
            inner = a * b
        with pamtorch.mode(Config.full(), route="kernel"):     # a kernel route inside: its config applies
            inner2 = a * b
        with pamtorch.mode(PM, route="kernel"):
            nested = a @ b
        after = a @ b
        outer = a * b
    assert torch.equal(inner, pamtorch.mul(a, b)) and not torch.equal(inner, a * b)
    assert torch.equal(inner2, inner)
    assert torch.equal(outer, a * b)
    assert torch.equal(nested, after) and torch.equal(after, pamtorch.matmul(a, b))
    assert torch.equal(a @ b, torch.mm(a, b)) and not torch.equal(a @ b, after)


def test_which_route_runs():
    assert M.kernel_route_applies(PM)
    assert not M.kernel_route_applies(Config.full())               # auto: pam-matmul only
    assert M.kernel_route_applies(Config.full(), asked=True)       # route="kernel": any config
    assert not M.kernel_route_applies(PM, leave_exact=(torch.ops.aten.cumprod,))
    with pamtorch.mode(Config.full(), route="dispatch"):
        assert not M.kernel_route_applies(PM)   # inside a PA dispatch mode

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Spy():
        assert not M.kernel_route_applies(PM)   # a mode that must see what the PA mode passes on
    with pytest.raises(ValueError, match="needs no leave_exact"):
        with pamtorch.mode(Config.full(), route="kernel", leave_exact=["optimizer"]):
            pass
    with pytest.raises(ValueError, match="route must be"):
        with pamtorch.mode(PM, route="fast"):
            pass


def test_the_audit_runs_the_dispatch_route_and_passes():
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step():
        with pamtorch.mode(PM):   # auto: the dispatch route while the audit records
            assert isinstance(torch.utils._python_dispatch._get_current_dispatch_mode(), M.PAMode)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
        opt.step()

    report = pamtorch.audit(step, model=model)
    assert sum(report.pa["forward"].values()) > 0 and sum(report.pa["backward"].values()) > 0
    for phase in ("forward", "backward"):   # the products PA; what pam-matmul leaves exact is listed
        assert report.mults_exact[phase]["matmul"] == 0
        assert not {"mm", "addmm", "bmm"} & set(report.outside[phase])
    assert "gelu" in report.outside["forward"]
