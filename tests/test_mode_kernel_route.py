"""pamtorch.mode's kernel route (the mode's routing done by boxed kernels on the
BackendSelect key instead of a Python dispatch mode) gives the dispatch route's bits and
refusals."""
import contextlib
import copy
import importlib
import threading

import pytest
import torch
from torch import nn

import pamtorch
from pamtorch.config import Config, OpConfig
from pamtorch.kernels import cpu as K
from pamtorch.ops import UnsupportedOpError
from pamtorch.ops.table import OPTIMIZER_STEP

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
    assert M.kernel_route_applies(Config.full())                   # auto: any config
    assert not M.kernel_route_applies(PM, leave_exact=(torch.ops.aten.cumprod,))
    with pamtorch.mode(Config.full()):
        assert M._KERNEL_ROUTE.dispatch is not None                # auto took the kernel route
    with pamtorch.mode(Config.full(), route="dispatch"):
        assert getattr(M._KERNEL_ROUTE, "dispatch", None) is None
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


# ---------------------------------------------------------------------------
# the calls the route answers in C++ (pa_route.cpp, "answers in C++")

def _specials(shape, g):
    x = torch.randn(shape, generator=g) * 10
    flat = x.view(-1)
    vals = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1.0, -1.0, 2.0 ** -130, 3e38, -2.5]
    flat[:len(vals)] = torch.tensor(vals)
    return x


def _in_step(fn):
    """``fn()`` as inside an ``Optimizer.step`` (a factor near 1 takes the optimizer's form)."""
    OPTIMIZER_STEP[0] += 1
    try:
        return fn()
    finally:
        OPTIMIZER_STEP[0] -= 1


def _itself(z):
    return z.mul_(z)


def _with_t(z):
    return z.mul_(z.t())


def _with_row(z):
    return z.div_(z[0])


def _answer_cases(dtype=torch.float32):
    g = torch.Generator().manual_seed(11)
    x, y = _specials((6, 5), g).to(dtype), _specials((6, 5), g).to(dtype)
    row, col = torch.randn(5, generator=g).to(dtype), torch.randn(6, 1, generator=g).to(dtype)
    a, b = torch.randn(6, 7, generator=g).to(dtype), torch.randn(7, 5, generator=g).to(dtype)
    if dtype is torch.float16:   # float16 subnormals, which a product's operands flush
        a[0, :3] = torch.tensor([2.0 ** -20, -(2.0 ** -15), 2.0 ** -14])
    bias = torch.randn(5, generator=g).to(dtype)
    pos = x.abs()
    ints = torch.arange(6)
    return {
        "mul": lambda: x * y, "mul broadcast": lambda: x * row, "mul transposed": lambda: x.t() * y.t(),
        "mul wrapped float": lambda: x * 3.0, "mul wrapped int": lambda: x * 3, "mul 0-d": lambda: x * torch.tensor(0.7),
        "mul_": lambda: x.clone().mul_(y), "mul_ broadcast": lambda: x.clone().mul_(col),
        "mul_ that does not fit": lambda: col.clone().mul_(x),
        "mul scalar near one": lambda: torch.ops.aten.mul.Scalar(x, 1.5),
        "mul scalar": lambda: torch.ops.aten.mul.Scalar(x, 2.75), "mul_ scalar": lambda: x.clone().mul_(-3),
        "div": lambda: x / y, "div wrapped": lambda: x / 7.0, "div_": lambda: x.clone().div_(row),
        "div scalar": lambda: torch.ops.aten.div.Scalar(x, 10), "div_ scalar": lambda: x.clone().div_(0.25),
        "div scalar near one": lambda: torch.ops.aten.div.Scalar(x, 1.25),
        "div_ scalar near one": lambda: x.clone().div_(0.9), "mul wrapped near one": lambda: x * 0.9,
        "div scalar near one in a step": lambda: _in_step(lambda: torch.ops.aten.div.Scalar(x, 1.25)),
        "mul_ scalar near one in a step": lambda: _in_step(lambda: x.clone().mul_(0.999)),
        "mul wrapped near one in a step": lambda: _in_step(lambda: x * 0.9),
        "mul_ itself": lambda: _itself(x.clone()), "mul_ its transpose": lambda: _with_t(x[:5].clone()),
        "div_ its row": lambda: _with_row(x.clone()), "mul_ expanded": lambda: row.expand(6, 5).mul_(2.5),
        "div_ non-contiguous": lambda: x.clone().t().div_(3.0),
        "mm": lambda: a @ b, "mm transposed": lambda: b.t() @ a.t(), "mm empty": lambda: a[:, :0] @ b[:0],
        "addmm": lambda: torch.addmm(bias, a, b), "addmm scaled": lambda: torch.addmm(bias, a, b, beta=0.5, alpha=2),
        "addmm 2-d bias": lambda: torch.addmm(x, a, b),
        "bmm": lambda: torch.bmm(a.expand(3, 6, 7), b.expand(3, 7, 5)),
        "pow 2": lambda: x ** 2, "pow 0": lambda: x ** 0, "pow -0.5": lambda: x.pow(-0.5), "pow 3": lambda: x.pow(3),
        "sqrt": lambda: pos.sqrt(), "rsqrt": lambda: torch.rsqrt(x), "exp": lambda: x.exp(), "log": lambda: x.log(),
        "mean": lambda: x.mean(), "mean dim": lambda: x.mean(1), "mean dims keepdim": lambda: x.mean((0, 1), keepdim=True),
        "mean -1": lambda: x.mean(-1), "mean dtype": lambda: x.mean(1, dtype=torch.float64),
        "add": lambda: x + y, "add alpha": lambda: torch.add(x, y, alpha=2), "sub_": lambda: x.clone().sub_(row),
        "int add float": lambda: ints + 0.5, "int add": lambda: ints + ints, "int add_": lambda: ints.clone().add_(1),
        "int add alpha": lambda: torch.add(ints, ints, alpha=3), "foreach add alpha": lambda: torch._foreach_add(
            [x, y], [y, x], alpha=0.5), "foreach add": lambda: torch._foreach_add([x, y], [y, x]),
        "sigmoid": lambda: x.sigmoid(), "tanh": lambda: torch.tanh(x), "silu": lambda: nn.functional.silu(x),
        "sigmoid_": lambda: x.clone().sigmoid_(), "tanh_": lambda: x.clone().tanh_(),
        "silu_": lambda: nn.functional.silu(x.clone(), inplace=True),
        "sigmoid_backward": lambda: torch.ops.aten.sigmoid_backward(y, x.sigmoid()),
        "tanh_backward": lambda: torch.ops.aten.tanh_backward(y, x), "silu_backward": lambda: torch.ops.aten.silu_backward(y, x),
        "sigmoid float64": lambda: x.double().sigmoid(),
    }


def _run(fn, cfg, fast):
    was = M._KERNEL_FAST[0]
    M._KERNEL_FAST[0] = fast
    try:
        with pamtorch.mode(cfg, route="kernel"):
            return fn()
    except Exception as e:   # noqa: BLE001 - the same error both ways is the expectation
        return e
    finally:
        M._KERNEL_FAST[0] = was


def _same(p, q):
    if isinstance(p, (list, tuple)):
        assert isinstance(q, (list, tuple)) and len(p) == len(q)
        for a, b in zip(p, q):
            _same(a, b)
        return
    if isinstance(p, Exception):
        assert type(p) is type(q) and str(p) == str(q)
        return
    if p is None:   # an output the mask left out
        assert q is None
        return
    assert p.dtype == q.dtype and p.shape == q.shape and p.stride() == q.stride()
    if p.is_floating_point():
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[p.element_size()]
        assert torch.equal(p.view(ints), q.view(ints))
    else:
        assert torch.equal(p, q)


@pytest.mark.parametrize("cfg_name", ["full", "matmul_only", "offset", "mantissa"])
def test_answers_in_cpp_give_the_python_handlers_bits(cfg_name):
    """Every call of the C++ answers' ops, with broadcasting, strides, wrapped numbers,
    0-d operands, in-place forms, specials and the cases they leave to Python, gives
    bit for bit (values, shape, strides, errors) what the Python handler gives."""
    cfg = {"full": Config.full(), "matmul_only": PM,
           "offset": Config.full().replace(matmul=OpConfig(offset=1.0552), elementwise=OpConfig(offset=1.0552)),
           "mantissa": Config.full().with_mantissa_bits(7)}[cfg_name]
    for name, fn in _answer_cases().items():
        try:
            _same(_run(fn, cfg, True), _run(fn, cfg, False))
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from e


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("cfg_name", ["full", "offset"])
def test_16_bit_answers_give_the_python_handlers_bits(cfg_name, dtype):
    """The same calls on bfloat16 and float16 operands: mul/div (tensors, wrapped numbers,
    Scalars, in place) on the 16-bit PA kernels, and mm/addmm/bmm on float32 operands
    (float16 subnormals flushed) rounded back, answered in C++ with the Python handler's bits;
    mixed dtypes and the ops answered for float32 only go to Python, as before."""
    cfg = {"full": Config.full(),
           "offset": Config.full().replace(matmul=OpConfig(offset=1.0552), elementwise=OpConfig(offset=1.0552))}[cfg_name]
    for name, fn in _answer_cases(dtype).items():
        try:
            _same(_run(fn, cfg, True), _run(fn, cfg, False))
        except AssertionError as e:
            raise AssertionError(f"{dtype} {name}: {e}") from e


@contextlib.contextmanager
def _python_calls():
    """The names of the calls that reach the route's Python handler, in a list."""
    calls = []

    def spy(name, args, kwargs):
        calls.append(name)
        return M._kernel_call(name, args, kwargs)

    with pamtorch.mode(Config.full(), route="kernel"):
        pass   # registers the route's ops and its handler
    with M.kernel_route_handler(spy):
        yield calls


def test_answers_in_cpp_leave_python_out_and_in_place_forms_return_their_tensor():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    w = torch.randn(3, 2, generator=g)
    with _python_calls() as calls:
        with pamtorch.mode(Config.full(), route="kernel"):
            x * y, x / y, x @ w, torch.addmm(w[0], x, w), x ** 2, (x * 3.0), x.exp(), x.mean(0), x + y
            z = x.clone()
            assert z.mul_(y) is z
            assert z.div_(4.0) is z
        assert calls == []
        with pamtorch.mode(Config.full(), route="kernel"):
            torch.ops.aten.mul.Scalar(x, 1.5), x.clone().div_(0.9)   # a factor near 1 outside a step
        assert calls == []
        with pamtorch.mode(Config.full(), route="kernel"):
            torch.add(x, y, alpha=2)   # an alpha
            x.mean(0, dtype=torch.float64)
            _in_step(lambda: torch.ops.aten.mul.Scalar(x, 1.5))   # the optimizer's form
        assert calls == ["aten::add.Tensor", "aten::mean.dim", "aten::mul.Scalar"]
        calls.clear()
        for dtype in (torch.bfloat16, torch.float16):   # the 16-bit answers
            h, k, v = x.to(dtype), y.to(dtype), w.to(dtype)
            with pamtorch.mode(Config.full(), route="kernel"):
                h * k, h / k, h @ v, torch.addmm(v[0], h, v), h * 3.0, torch.bmm(h[None], v[None])
                z = h.clone()
                assert z.mul_(k) is z
                assert z.div_(4.0) is z
                h * x   # mixed dtypes: Python
            assert calls == ["aten::mul.Tensor"]
            calls.clear()


@pytest.mark.parametrize("opt_name", ["sgd", "adam_single", "adamw_foreach"])
def test_optimizer_steps_with_answers_in_cpp_match(opt_name):
    """Inside an optimizer step mul/div by a number near 1 take the optimizer's form in
    Python; the steps match bit for bit with the C++ answers on and off."""
    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))
        opt = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True),
               "adam_single": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False, weight_decay=0.1),
               "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True)}[opt_name](model.parameters())
        return model, opt

    x, t = torch.randn(5, 6), torch.randint(0, 3, (5,))
    out = []
    for fast in (True, False):
        model, opt = make()
        was = M._KERNEL_FAST[0]
        M._KERNEL_FAST[0] = fast
        try:
            for _ in range(3):
                with pamtorch.mode(Config.full(), route="kernel"):
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(x), t).backward()
                    opt.step()
        finally:
            M._KERNEL_FAST[0] = was
        out.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*out):
        assert torch.equal(p, q)


def test_a_replaced_op_table_entry_turns_the_answers_off(monkeypatch):
    """A user's own implementation in the op table is what runs, never the C++ answer of
    the built-in one."""
    from pamtorch.ops import OP_TABLE
    from pamtorch.ops.table import _Entry

    calls = []
    builtin = OP_TABLE[torch.ops.aten.mul]

    def mine(func, args, kwargs, cfg):
        calls.append(func)
        return builtin.impl(func, args, kwargs, cfg)
    x = torch.randn(3, 4)
    try:
        # the mode's per-overload cache follows the op table's version: a replaced entry
        # is found without clearing it
        monkeypatch.setitem(OP_TABLE, torch.ops.aten.mul, _Entry(builtin.kind, mine))
        with pamtorch.mode(Config.full(), route="kernel"):
            y = x * x
    finally:
        monkeypatch.undo()
        M._OVERLOADS.clear()
    assert calls and torch.equal(y, pamtorch.arith.pam(x, x))


@pytest.mark.parametrize("route", ["dispatch", "kernel"])
def test_ops_added_to_pass_through_run_as_torch_in_place_out_and_aliased(route):
    """is_same_size and the in-place rounding/sign forms a _foreach kernel calls per tensor
    (sign_ floor_ ceil_ trunc_ frac frac_) are free: classified so whatever their float
    arguments, and under the mode their in-place forms return self, out= writes out, and
    views alias, with torch's values."""
    g = torch.Generator().manual_seed(5)
    x = _specials((4, 5), g)
    for name in ("sign_", "floor_", "ceil_", "trunc_", "frac_"):
        op = getattr(torch.ops.aten, name).default
        assert M.classify(op, (x.clone(),), {}) == "free"
        want = getattr(x.clone(), name)()
        with pamtorch.mode(Config.full(), route=route):
            y = x.clone()
            v = y.t()                      # a view: written through
            r = getattr(y, name)()
        assert r is y and torch.equal(v.t().view(torch.int32), y.view(torch.int32))
        assert torch.equal(y.view(torch.int32), want.view(torch.int32))
    assert M.classify(torch.ops.aten.frac.default, (x,), {}) == "free"
    assert M.classify(torch.ops.aten.is_same_size.default, (x, x), {}) == "free"
    out = torch.empty(4, 5)
    with pamtorch.mode(Config.full(), route=route):
        got = torch.frac(x, out=out)
        same = x.is_same_size(x.t())
        lst = [x.clone(), x.clone()]
        torch._foreach_sign_(lst)
    assert got is out and torch.equal(out.view(torch.int32), torch.frac(x).view(torch.int32))
    assert same is False
    assert all(torch.equal(t.view(torch.int32), x.sign().view(torch.int32)) for t in lst)


@pytest.mark.parametrize("cfg_name", ["full", "matmul_only"])
def test_out_forms_of_the_answered_ops_take_python_and_write_out(cfg_name):
    """The out= overloads are not answered in C++: Python writes them, with the functional
    answer's bits (float32, and the 16-bit dtypes whose mul/div/products are answered)."""
    cfg = Config.full() if cfg_name == "full" else PM
    g = torch.Generator().manual_seed(6)
    x, y, w = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(4, 2, generator=g)
    cases = [(torch.mul, (x, y)), (torch.div, (x, y)), (torch.mm, (x, w)), (torch.exp, (x,)),
             (torch.sigmoid, (x,)), (torch.pow, (x, 2.0))]
    for dtype in (torch.bfloat16, torch.float16):
        h, k, v = x.to(dtype), y.to(dtype), w.to(dtype)
        cases += [(torch.mul, (h, k)), (torch.div, (h, 3.0)), (torch.mm, (h, v)), (torch.addmm, (v[0], h, v)),
                  (torch.bmm, (h[None], v[None]))]
    for fn, args in cases:
        out = torch.empty(0, dtype=args[0].dtype)
        with pamtorch.mode(cfg, route="kernel"):
            want = fn(*args)
            got = fn(*args, out=out)
        ints = torch.int32 if out.dtype == torch.float32 else torch.int16
        assert got is out and torch.equal(out.view(ints), want.view(ints)), (fn, out.dtype)


# ----------------------------------------------------------------------------- convolution and batch norm in C++

A = torch.ops.aten


def _cnn_cases():
    """Convolution and batch-norm calls (forward and backward, as autograd makes them and
    directly) inside and outside the C++ answers' narrow case; each returns every tensor
    the call wrote, the running statistics included."""
    g = torch.Generator().manual_seed(12)

    def r(*shape):
        return torch.randn(*shape, generator=g)
    x, x1, x3 = _specials((2, 4, 7, 6), g), r(3, 4, 11), r(1, 2, 4, 4, 4)
    w, wdw, wg, w1, w11 = r(6, 4, 3, 3), r(4, 1, 3, 3), r(6, 2, 3, 2), r(5, 4, 3), r(8, 4, 1, 1)
    b6, b5 = r(6), r(5)
    gy = r(2, 6, 7, 6)

    def conv(*a):
        return lambda: A.convolution(*a)

    def conv_bwd(gy_, x_, w_, stride, padding, dilation, groups, mask, bias=True):
        return lambda: A.convolution_backward(gy_, x_, w_, [w_.shape[0]] if bias else None, stride, padding,
                                              dilation, False, [0] * len(stride), groups, mask)

    def bn(x_, affine=True, stats=True, training=True, momentum=0.1, eps=1e-5):
        def f():
            c = x_.shape[1]
            wt, bs = (r(c), r(c)) if affine else (None, None)
            rm, rv = (r(c), r(c).abs()) if stats else (None, None)
            out = A.native_batch_norm(x_, wt, bs, rm, rv, training, momentum, eps)
            return (*out, rm, rv) if stats else out
        return f

    def bn_bwd(x_, training=True, mask=(True, True, True), affine=True):
        def f():
            c = x_.shape[1]
            wt = r(c) if affine else None
            rm, rv = r(c), r(c).abs()
            _, sm, si = A.native_batch_norm(x_, wt, None, rm.clone(), rv.clone(), True, 0.1, 1e-5)
            if not training:
                sm = si = None
            return A.native_batch_norm_backward(torch.randn(x_.shape, generator=g), x_, wt, rm, rv, sm, si,
                                                training, 1e-5, list(mask))
        return f

    def module_step(model, inp):
        def f():
            m = copy.deepcopy(model)
            xi = inp.clone().requires_grad_(True)
            m(xi).square().sum().backward()
            return [xi.grad] + [p.grad for p in m.parameters()] + list(m.buffers())
        return f
    def ln(x_, k=1, affine=True, bias=True):
        def f():
            shape = list(x_.shape[x_.dim() - k:])
            wt = torch.randn(shape, generator=g) if affine else None
            bs = torch.randn(shape, generator=g) if bias else None
            return A.native_layer_norm(x_, shape, wt, bs, 1e-5)
        return f

    def ln_bwd(x_, k=1, mask=(True, True, True), affine=True, stat_shape=None):
        def f():
            shape = list(x_.shape[x_.dim() - k:])
            wt = torch.randn(shape, generator=g) if affine else None
            bs = torch.randn(shape, generator=g)
            _, mean, rstd = A.native_layer_norm(x_, shape, wt, bs, 1e-5)
            if stat_shape is not None:
                mean, rstd = mean.reshape(stat_shape), rstd.reshape(stat_shape)
            return A.native_layer_norm_backward(torch.randn(x_.shape, generator=g), x_, shape, mean, rstd, wt, bs,
                                                list(mask))
        return f

    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False), nn.BatchNorm2d(8),
                        nn.Conv2d(8, 3, 1))
    seq = nn.Sequential(nn.Conv1d(4, 6, 3, padding=2, dilation=2), nn.BatchNorm1d(6))
    return {
        "conv": conv(x, w, b6, [1, 1], [1, 1], [1, 1], False, [0, 0], 1),
        "conv stride dilation no bias": conv(x, w, None, [2, 1], [0, 2], [2, 1], False, [0, 0], 1),
        "conv one stride value": conv(x, w, b6, [2], [1], [1], False, [0], 1),
        "conv depthwise": conv(x, wdw, None, [2, 2], [1, 1], [1, 1], False, [0, 0], 4),
        "conv grouped": conv(x, wg, b6, [1, 1], [0, 1], [1, 1], False, [0, 0], 2),
        "conv 1x1": conv(x, w11, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1),
        "conv1d": conv(x1, w1, b5, [3], [2], [1], False, [0], 1),
        "conv channels_last": conv(x.contiguous(memory_format=torch.channels_last), w, b6, [1, 1], [1, 1], [1, 1],
                                   False, [0, 0], 1),
        "conv3d (Python)": conv(x3, r(3, 2, 2, 2, 2), None, [1, 1, 1], [0, 0, 0], [1, 1, 1], False, [0, 0, 0], 1),
        "conv transposed (Python)": conv(x, r(4, 3, 3, 3), None, [2, 2], [1, 1], [1, 1], True, [1, 1], 1),
        "conv float64 (Python)": conv(x.double(), w.double(), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1),
        "conv kernel too large": conv(x, r(6, 4, 9, 9), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1),
        "conv wrong channels": conv(x, r(6, 3, 3, 3), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1),
        "conv bias wrong size": conv(x, w, r(5), [1, 1], [1, 1], [1, 1], False, [0, 0], 1),
        "conv bad stride": conv(x, w, None, [0, 1], [1, 1], [1, 1], False, [0, 0], 1),
        "conv_bwd": conv_bwd(gy, x, w, [1, 1], [1, 1], [1, 1], 1, [True, True, True]),
        "conv_bwd dx only": conv_bwd(gy, x, w, [1, 1], [1, 1], [1, 1], 1, [True, False, False], bias=False),
        "conv_bwd dw db": conv_bwd(gy, x, w, [1, 1], [1, 1], [1, 1], 1, [False, True, True]),
        "conv_bwd db only": conv_bwd(gy, x, w, [1, 1], [1, 1], [1, 1], 1, [False, False, True]),
        "conv_bwd strided": conv_bwd(r(2, 6, 3, 3), x, w, [2, 2], [0, 1], [1, 2], 1, [True, True, True]),
        "conv_bwd depthwise": conv_bwd(r(2, 4, 4, 3), x, wdw, [2, 2], [1, 1], [1, 1], 4, [True, True, False]),
        "conv_bwd grouped": conv_bwd(r(2, 6, 5, 7), x, wg, [1, 1], [0, 1], [1, 1], 2, [True, True, True]),
        "conv1d_bwd": conv_bwd(r(3, 5, 5), x1, w1, [3], [2], [1], 1, [True, True, True]),
        "conv_bwd wrong grad shape": conv_bwd(r(2, 6, 5, 6), x, w, [1, 1], [1, 1], [1, 1], 1, [True, True, True]),
        "bn": bn(x), "bn no affine": bn(x, affine=False), "bn no stats": bn(x, stats=False),
        "bn eval": bn(x, training=False), "bn 2-d": bn(r(5, 3)), "bn 3-d momentum": bn(x1, momentum=0.003),
        "bn eval no stats": bn(x, stats=False, training=False), "bn one sample": bn(r(1, 3)),
        "bn float64 (Python)": bn(x.double(), affine=False, stats=False),
        "bn_bwd": bn_bwd(x), "bn_bwd eval": bn_bwd(x, training=False), "bn_bwd no affine": bn_bwd(x, affine=False),
        "bn_bwd dx only": bn_bwd(x1, mask=(True, False, False)), "bn_bwd dw db": bn_bwd(x, mask=(False, True, True)),
        "bn_bwd 2-d": bn_bwd(r(6, 3)),
        "ln": ln(x), "ln two dims": ln(x, k=2), "ln no affine": ln(x, affine=False, bias=False),
        "ln no bias": ln(x1, bias=False), "ln permuted": ln(x.permute(0, 2, 3, 1)), "ln 1-d": ln(r(7)),
        "ln float64 (Python)": ln(x.double()), "ln wrong shape": lambda: A.native_layer_norm(x, [5], None, None, 1e-5),
        "ln weight of another shape": lambda: A.native_layer_norm(x, [6], r(3, 2), None, 1e-5),
        "ln_bwd": ln_bwd(x), "ln_bwd two dims": ln_bwd(x, k=2), "ln_bwd no affine": ln_bwd(x1, affine=False),
        "ln_bwd permuted": ln_bwd(x.permute(0, 2, 3, 1)), "ln_bwd dx only": ln_bwd(x, mask=(True, False, False)),
        "ln_bwd dw db": ln_bwd(x, mask=(False, True, True)), "ln_bwd db only": ln_bwd(x, mask=(False, False, True)),
        "ln_bwd 1-d": ln_bwd(r(7)), "ln_bwd flat stats (Python)": ln_bwd(x1, stat_shape=(12,)),
        "transformer layer step": module_step(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                                              r(2, 5, 8)),
        "conv-bn-depthwise module step": module_step(cnn, r(2, 4, 8, 8)),
        "conv-bn module step, eval": module_step(copy.deepcopy(cnn).eval(), r(2, 4, 8, 8)),
        "conv1d-bn1d module step": module_step(seq, r(3, 4, 9)),
    }


@pytest.mark.parametrize("cfg_name", ["full", "matmul_only", "exact", "offset", "mantissa"])
def test_convolution_and_norm_answers_give_the_python_handlers_bits(cfg_name):
    """Convolutions (1-D/2-D, groups, strides, padding, dilation, masks), batch norms
    (training with and without running statistics, eval, masks) and layer norms (one or two
    normalized dims, permuted inputs, with and without weight and bias) answered in C++ give bit
    for bit what the Python handler gives: values, shapes, strides, updated running
    statistics and errors; calls outside the narrow case (3-D, transposed, float64, exact
    derivatives, offsets, mantissa bits) go to Python both ways."""
    cfg = {"full": Config.full(), "matmul_only": PM, "exact": Config.full().with_derivative("exact"),
           "offset": Config.full().replace(matmul=OpConfig(offset=1.0552)),   # (the norm kind takes none)
           "mantissa": Config.full().with_mantissa_bits(7)}[cfg_name]
    for name in _cnn_cases():
        if name == "bn eval no stats" and not cfg.norm.pa:
            continue   # torch's own CPU kernel crashes on it (the PA handler raises a ValueError)
        try:   # each run on a fresh set of cases: the same random inputs, drawn again
            _same(_run(_cnn_cases()[name], cfg, True), _run(_cnn_cases()[name], cfg, False))
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from e


def test_convolution_and_norm_answers_leave_python_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                          nn.Conv2d(8, 8, 3, groups=8, bias=False), nn.BatchNorm2d(8), nn.Conv1d(8, 4, 1))
    model[4] = nn.Identity()
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with _python_calls() as calls:
        with pamtorch.mode(Config.full(), route="kernel"):
            model(x).sum().backward()
        assert not [c for c in calls if "conv" in c or "batch_norm" in c], calls
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        with pamtorch.mode(Config.full(), route="kernel"):
            layer(torch.randn(2, 5, 8)).square().sum().backward()   # (.sum()'s stride-0 gradient: Python)
        assert not [c for c in calls if "layer_norm" in c], calls
        calls.clear()
        with pamtorch.mode(Config.full().with_derivative("exact"), route="kernel"):
            torch.ops.aten.convolution(x.detach(), model[0].weight.detach(), None, [1, 1], [1, 1], [1, 1], False,
                                       [0, 0], 1)
        assert calls == ["aten::convolution"]


@pytest.mark.parametrize("route", ["dispatch", "kernel"])
def test_out_forms_of_the_convolution_and_norm_ops_write_out(route):
    """convolution.out, native_batch_norm.out and native_layer_norm.out are not answered in C++:
    Python writes the given tensors (returned as themselves) with the functional answer's bits,
    and the batch norm's running statistics are updated in place as by the functional form."""
    g = torch.Generator().manual_seed(7)
    x, w, b = torch.randn(2, 3, 5, 5, generator=g), torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, generator=g)
    bw, bb = torch.randn(3, generator=g), torch.randn(3, generator=g)
    rm, rv = torch.randn(3, generator=g), torch.rand(3, generator=g)
    conv_args = (x, w, b, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    with pamtorch.mode(Config.full(), route=route):
        want = A.convolution(*conv_args)
        out = torch.empty(0)
        assert A.convolution.out(*conv_args, out=out) is out and torch.equal(out, want)
        r1, r2, s1, s2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
        want = A.native_batch_norm(x, bw, bb, r1, r2, True, 0.1, 1e-5)
        outs = (torch.empty(0), torch.empty(0), torch.empty(0))
        got = A.native_batch_norm.out(x, bw, bb, s1, s2, True, 0.1, 1e-5, out=outs[0], save_mean=outs[1],
                                      save_invstd=outs[2])
        assert all(p is q and torch.equal(q, r) for p, q, r in zip(got, outs, want))
        assert torch.equal(s1, r1) and torch.equal(s2, r2)
        want = A.native_layer_norm(x, [5], None, None, 1e-5)
        outs = (torch.empty(0), torch.empty(0), torch.empty(0))
        got = A.native_layer_norm.out(x, [5], None, None, 1e-5, out0=outs[0], out1=outs[1], out2=outs[2])
        assert all(p is q and torch.equal(q, r) for p, q, r in zip(got, outs, want))
