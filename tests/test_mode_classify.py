"""How the mode classifies aten calls: by overload and arguments, not by name alone
(issue 9 "a sound audit", issue 10 item 7). Each case used to run exact under the mode."""
import numpy as np
import pytest
import torch

import reference as R
from pamtorch.config import Config
from pamtorch.mode import UnsupportedOpError, classify, mode

aten = torch.ops.aten
F32 = torch.float32


def ref(values):
    """A float64 reference array rounded to float32, as a tensor."""
    return R.round_to(np.asarray(values, np.float64), F32)


# -- float arithmetic on integer tensors --------------------------------------------

def test_float_ops_on_integer_tensors_are_pa():
    pos = torch.arange(1, 9)
    p64 = pos.double().numpy()
    with mode(Config.full()):
        quot = pos / 7.0
        ex = torch.exp(pos)
        scaled = pos * 1.1
        third = pos / 3
        img = torch.tensor([3, 128, 254], dtype=torch.uint8) / 255
    assert quot.dtype == ex.dtype == scaled.dtype == third.dtype == F32
    assert torch.equal(quot, ref(R.pad(p64, 7.0, F32)))
    assert torch.equal(ex, ref(R.exp(p64, F32)))
    assert torch.equal(scaled, ref(R.pam(p64, float(np.float32(1.1)), F32)))
    assert torch.equal(third, ref(R.pad(p64, 3.0, F32)))
    assert torch.equal(img, ref(R.pad([3.0, 128.0, 254.0], 255.0, F32)))
    # and PA really differs from the exact results torch would give
    assert not torch.equal(quot, pos / 7.0) and not torch.equal(ex, torch.exp(pos))


def test_integer_results_stay_integer_and_free():
    i = torch.arange(10)
    with mode(Config.full()):
        assert torch.equal(i * 3, torch.arange(0, 30, 3))
        assert torch.equal(i // 4, torch.div(torch.arange(10), 4, rounding_mode="floor"))
        assert torch.equal(torch.cumprod(i[1:4], 0), torch.tensor([1, 2, 6]))   # integer products
    assert classify(aten.mul.Tensor, (i, 3), {}) == "free"
    assert classify(aten.div.Tensor_mode, (i, 2), {"rounding_mode": "floor"}) == "free"
    assert classify(aten.div.Tensor, (i, 7.0), {}) == "routable"
    assert classify(aten.exp.default, (i,), {}) == "routable"
    assert classify(aten.linspace.default, (0, 1, 5), {}) == "unknown"   # start + i·step
    # factories: no tensor inputs, a float result; eye only copies, linspace multiplies
    with mode(Config.full()):
        assert torch.equal(torch.eye(3), torch.diag(torch.ones(3)))
        with pytest.raises(UnsupportedOpError, match="aten.linspace"):
            torch.linspace(0, 1, 5)
    # the audit passes the result: the same decision without a meta run
    assert classify(aten.exp.default, (i,), {}, out=torch.exp(i)) == "routable"


@pytest.mark.parametrize("op", [lambda i: i.mul_(torch.full((3,), 1.5)), lambda i: i.mul_(1.5),
                                lambda i: i.div_(2), lambda i: i.exp_(),
                                lambda i: i.addcmul_(torch.ones(3), torch.ones(3))])
def test_inplace_float_result_into_integer_tensor_raises_as_torch_does(op):
    i = torch.arange(3)
    with pytest.raises(RuntimeError, match="can't be cast"):
        op(i.clone())
    with mode(Config.full()), pytest.raises(RuntimeError, match="can't be cast"):
        op(i)
    assert torch.equal(i, torch.arange(3))


# -- arguments that multiply ---------------------------------------------------------

def test_alpha_decides_whether_add_rsub_index_add_are_free():
    a, b = torch.randn(4), torch.randn(4)
    idx, src = torch.tensor([0, 1]), torch.randn(2)
    assert classify(aten.add.Tensor, (a, b), {}) == "free"
    assert classify(aten.add.Tensor, (a, b), {"alpha": 2}) == "routable"
    assert classify(aten.rsub.Tensor, (a, b), {}) == "free"
    assert classify(aten.rsub.Tensor, (a, b), {"alpha": 0.3}) == "routable"
    assert classify(aten.index_add.default, (a, 0, idx, src), {}) == "free"
    assert classify(aten.index_add.default, (a, 0, idx, src), {"alpha": 0.3}) == "routable"


def test_rsub_with_alpha_is_pa():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    with mode(Config.full()):
        out = torch.rsub(a, b, alpha=0.3)
        plain = torch.rsub(a, b)
    expect = ref(b.double().numpy() - R.pam(a.double().numpy(), float(np.float32(0.3)), F32)
                 .astype(np.float32).astype(np.float64))
    assert torch.equal(out, expect)
    assert not torch.equal(out, torch.rsub(a, b, alpha=0.3))
    assert torch.equal(plain, b - a)


@pytest.mark.parametrize("inplace", [False, True])
def test_index_add_with_alpha_is_pa(inplace):
    g = torch.Generator().manual_seed(1)
    base, src = torch.zeros(4), torch.randn(4, generator=g)
    idx = torch.tensor([0, 1, 2, 3])
    with mode(Config.full()):
        out = base.index_add_(0, idx, src, alpha=0.3) if inplace else base.index_add(0, idx, src, alpha=0.3)
    assert (out is base) == inplace
    assert torch.equal(out, ref(R.pam(src.double().numpy(), float(np.float32(0.3)), F32)))
    assert not torch.equal(out, torch.zeros(4).index_add(0, idx, src, alpha=0.3))


@pytest.mark.filterwarnings("ignore:The reduce argument of torch.scatter")
@pytest.mark.parametrize("call,why", [
    (lambda x, i, s: x.scatter(0, i, s, reduce="multiply"), "reduce='multiply'"),
    (lambda x, i, s: x.scatter_reduce(0, i, s, reduce="prod"), "reduce='prod'"),
    (lambda x, i, s: x.scatter_reduce(0, i, s, reduce="mean"), "reduce='mean'"),
    (lambda x, i, s: x.index_reduce(0, i, s, "prod"), "reduce='prod'"),
    (lambda x, i, s: torch.round(x, decimals=2), "decimals=2"),
    (lambda x, i, s: torch.cumprod(x, 0), "aten.cumprod"),
    (lambda x, i, s: torch.prod(x), "aten.prod"),
])
def test_multiplying_arguments_are_refused(call, why):
    x, i, s = torch.randn(3), torch.tensor([0, 1]), torch.randn(2)
    with mode(Config.full()), pytest.raises(UnsupportedOpError, match=why.replace("(", r"\(")):
        call(x, i, s)


@pytest.mark.filterwarnings("ignore:The reduce argument of torch.scatter")
def test_the_same_ops_with_free_arguments_run_as_torch():
    x, i, s = torch.randn(3), torch.tensor([0, 1]), torch.randn(2)
    with mode(Config.full()):
        got = [x.scatter(0, i, s, reduce="add"), x.scatter_reduce(0, i, s, reduce="amax"),
               x.scatter_reduce(0, i, s, reduce="sum"), torch.round(x), torch.round(x, decimals=0)]
    want = [x.scatter(0, i, s, reduce="add"), x.scatter_reduce(0, i, s, reduce="amax"),
            x.scatter_reduce(0, i, s, reduce="sum"), torch.round(x), torch.round(x)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert classify(aten.round.default, (x,), {}) == "free"
    assert classify(aten.round.decimals, (x,), {"decimals": 2}) == "unknown"


def test_embedding_scale_grad_by_freq_backward_is_pa():
    idx = torch.tensor([1, 2, 2, 3, 3, 3, 4, 4, 4, 4])   # counts 1, 2, 3, 4
    g = torch.randn(len(idx), 5, generator=torch.Generator().manual_seed(2))
    grads = {}
    for under in (False, True):
        emb = torch.nn.Embedding(6, 5, scale_grad_by_freq=True)
        with mode(Config.full()) if under else torch.enable_grad():
            emb(idx).backward(g)
        grads[under] = emb.weight.grad
    pa, exact = grads[True], grads[False]
    # counts that are powers of two divide exactly in both arithmetics
    assert torch.equal(pa[[0, 1, 2, 4, 5]], exact[[0, 1, 2, 4, 5]])
    # a count of 3: each row ÷̂ 3 (PAD), then summed
    rows = R.pad(g[3:6].double().numpy(), 3.0, F32).astype(np.float32)
    assert torch.allclose(pa[3], torch.from_numpy(rows.sum(0)), rtol=1e-6, atol=0)
    assert not torch.allclose(pa[3], exact[3], rtol=1e-4, atol=0)


# -- complex tensors -------------------------------------------------------------------

def test_complex_tensors_count_as_floating_point():
    a = torch.randn(3, dtype=torch.complex64)
    b = torch.randn(3, dtype=torch.complex64)
    assert classify(aten.div.Tensor, (a, b), {}) == "unknown"
    assert classify(aten.mul.Tensor, (a, b), {}) == "routable"   # complex PAM: four real PAMs
    assert classify(aten.add.Tensor, (a, b), {}) == "free"
    with mode(Config.full()):
        assert torch.equal(a + b, torch.add(a, b))
        prod = a * b
        with pytest.raises(UnsupportedOpError, match="aten.div.Tensor.*complex"):
            a / b
    assert prod.dtype == torch.complex64 and not torch.equal(prod, a * b)
    assert ((prod - a * b).abs().max() / (a * b).abs().max()).item() < 0.25


# -- integer inputs to an op with no meta kernel -----------------------------------------

_LIB = torch.library.Library("pamtorch_classify_test", "DEF")
_LIB.define("halve(Tensor x) -> Tensor")
_LIB.define("twice(Tensor x) -> Tensor")
_LIB.impl("halve", lambda x: x.to(F32) / 2, "CPU")
_LIB.impl("twice", lambda x: x + x, "CPU")


def test_an_op_without_meta_kernel_is_judged_by_its_result():
    """No meta run can tell the result dtype: the op runs, and a float result from integer
    inputs is refused rather than returned."""
    i = torch.arange(4)
    ops = torch.ops.pamtorch_classify_test
    assert classify(ops.halve.default, (i,), {}) == "unknown"
    assert classify(ops.halve.default, (i,), {}, out=i.to(F32) / 2) == "unknown"
    with mode(Config.full()):
        assert torch.equal(ops.twice(i), 2 * torch.arange(4))
        with pytest.raises(UnsupportedOpError, match="halve.*gave a torch.float32 result"):
            ops.halve(i)
    with mode(Config.full(), leave_exact=[ops.halve]):
        assert torch.equal(ops.halve(i), torch.arange(4) / 2)
