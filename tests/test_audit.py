"""pamtorch.audit: sound classification, every PA product counted, leave_exact, and the
errors of the mode that name the op, its module and the way out (issue 9 items 2 and 3)."""
import pytest
import torch
from torch import nn

import pamtorch
from pamtorch.audit import MultiplicationFoundError, audit
from pamtorch.config import Config, OpConfig
from pamtorch.mode import UnsupportedOpError, mode

aten = torch.ops.aten
EXACT_MM = Config.full().replace(matmul=OpConfig(derivative="exact"))


# -- what ran exact is recorded, decided by arguments ------------------------------------

@pytest.mark.filterwarnings("ignore:The reduce argument of torch.scatter")
@pytest.mark.parametrize("op,call", [
    ("div", lambda: torch.arange(5) / 7.0),
    ("exp", lambda: torch.exp(torch.arange(5))),
    ("mul", lambda: torch.arange(5) * 1.1),
    ("rsub", lambda: torch.rsub(torch.randn(3), torch.randn(3), alpha=2)),
    ("index_add", lambda: torch.zeros(3).index_add(0, torch.tensor([0, 1]), torch.ones(2), alpha=0.5)),
    ("scatter", lambda: torch.ones(3).scatter(0, torch.tensor([0, 1]), torch.ones(2), reduce="multiply")),
    ("round", lambda: torch.round(torch.randn(3), decimals=2)),
    ("mul", lambda: torch.randn(3, dtype=torch.complex64) * torch.randn(3, dtype=torch.complex64)),
])
def test_audit_records_float_multiplications_that_the_name_alone_hides(op, call):
    report = audit(call)
    assert report.outside["forward"][op] == 1, dict(report.outside["forward"])
    with pytest.raises(MultiplicationFoundError, match=f"forward: {op} x1"):
        report.assert_multiplication_free()


def test_audit_records_the_by_frequency_embedding_backward():
    emb = nn.Embedding(5, 3, scale_grad_by_freq=True)
    report = audit(lambda: emb(torch.tensor([1, 1, 2])).sum().backward())
    assert report.outside["backward"]["embedding_dense_backward"] == 1
    plain = nn.Embedding(5, 3)
    assert audit(lambda: plain(torch.tensor([1, 1, 2])).sum().backward()).multiplication_free()


def test_masked_index_ops_pass_through_for_every_dtype():
    """_unsafe_masked_index (a gather with a fill value) and _unsafe_masked_index_put_accumulate
    (a masked scatter-add: what aot_autograd writes for an embedding's backward with a padding
    index; in eager it runs _index_put_impl_) select and add: free whatever their arguments
    (float or integer values, a float fill), run as they are under the mode (the same bits,
    the operands unchanged: both are functional, with no out= or in-place overload), and the
    audit records nothing. _index_put_impl (copy, or add with accumulate) likewise, in its
    functional, out= and in-place forms: out= and in place write and return the given tensor."""
    from pamtorch.mode import classify
    idx = [torch.tensor([0, 2, 2, 1])]
    mask = torch.tensor([True, False, True, True])
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        base = torch.arange(4).to(dtype)
        vals = (torch.arange(4) + 3).to(dtype)
        calls = [(aten._unsafe_masked_index.default, (base, mask, idx, 0.5 if dtype.is_floating_point else 7)),
                 (aten._unsafe_masked_index_put_accumulate.default, (base, mask, idx, vals))]
        for op, args in calls:
            assert op._schema.returns[0].alias_info is None  # a new tensor, no view of self
            assert classify(op, args, {}) == "free", (op, dtype)
            want = op(*args)
            before = base.clone()
            with mode(Config.full()):
                got = op(*args)
            assert torch.equal(got, want) and got.data_ptr() != base.data_ptr()
            assert torch.equal(base, before)
            report = audit(lambda: op(*args))
            assert report.multiplication_free(), (op, dtype)
        for accumulate in (False, True):
            args = (base, idx, vals, accumulate)
            want = aten._index_put_impl.default(*args)
            for form in ("functional", "out", "inplace"):
                target = base.clone()
                with mode(Config.full()):
                    if form == "functional":
                        got = aten._index_put_impl.default(*args)
                    elif form == "out":
                        got = aten._index_put_impl.out(*args, out=target)
                        assert got is target
                    else:
                        got = aten._index_put_impl_.default(target, idx, vals, accumulate)
                        assert got is target
                assert torch.equal(got, want), (dtype, accumulate, form)
                op = aten._index_put_impl_.default if form == "inplace" else aten._index_put_impl.default
                assert classify(op, (base.clone(), idx, vals, accumulate), {}) == "free"
            assert audit(lambda: aten._index_put_impl_.default(base.clone(), idx, vals, accumulate)).multiplication_free()


# -- every PA product is counted ---------------------------------------------------------

M, K, N = 16, 8, 4


def _linear_step(model, x, cfg=None):
    with mode(cfg) if cfg is not None else torch.enable_grad():
        model(x).sum().backward()


@pytest.mark.parametrize("derivative", ["approx", "exact"])
def test_audit_counts_the_products_of_pamtorch_matmul(derivative):
    a = torch.randn(M, K, requires_grad=True)
    b = torch.randn(K, N, requires_grad=True)
    report = audit(lambda: pamtorch.matmul(a, b, derivative=derivative).sum().backward())
    report.assert_multiplication_free()
    assert report.pa["forward"]["pamtorch.pam_mm"] == 1
    assert report.mults_pa["forward"]["matmul"] == M * K * N
    assert report.mults_pa["backward"]["matmul"] == 2 * M * K * N
    grads = {"approx": "pamtorch.pam_mm", "exact": "pamtorch.pam_mm_exact_grad_a"}[derivative]
    assert report.pa["backward"][grads] >= 1
    en = report.energy_pj()
    assert en["as_run"] < 0.25 * en["exact"]


@pytest.mark.parametrize("cfg", [Config.full(), EXACT_MM], ids=["approx", "exact"])
def test_audit_of_a_converted_linear_counts_its_products(cfg):
    torch.manual_seed(0)
    model = pamtorch.convert(nn.Sequential(nn.Linear(K, N)), cfg)
    x = torch.randn(M, K, requires_grad=True)
    report = audit(_linear_step, model, x)
    report.assert_multiplication_free()
    assert report.mults_pa["forward"]["matmul"] == M * K * N
    assert report.mults_pa["backward"]["matmul"] == 2 * M * K * N
    assert report.mults_pa["forward"]["other"] == report.mults_exact["forward"]["matmul"] == 0


@pytest.mark.parametrize("cfg", [Config.full(), EXACT_MM], ids=["approx", "exact"])
def test_audit_under_the_mode_counts_linear_products(cfg):
    torch.manual_seed(0)
    model = nn.Linear(K, N)
    x = torch.randn(M, K, requires_grad=True)
    report = audit(_linear_step, model, x, cfg)
    report.assert_multiplication_free()
    assert report.mults_pa["forward"]["matmul"] == M * K * N
    assert report.mults_pa["backward"]["matmul"] == 2 * M * K * N


def test_audit_counts_the_products_of_pamtorch_nn_modules():
    torch.manual_seed(0)
    layer = pamtorch.nn.Linear(K, N)
    report = audit(_linear_step, layer, torch.randn(M, K))
    report.assert_multiplication_free()
    assert report.mults_pa["forward"]["matmul"] == M * K * N
    assert report.mults_pa["backward"]["matmul"] == M * K * N   # dW only: x needs no grad


def test_audit_counts_scaled_dot_product_attention_products():
    B, H, L, S, E = 2, 3, 5, 7, 4
    q = torch.randn(B, H, L, E, requires_grad=True)
    k, v = torch.randn(B, H, S, E), torch.randn(B, H, S, E)

    def step():
        with mode(Config.full()):
            torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
    report = audit(step)
    report.assert_multiplication_free()
    assert report.mults_pa["forward"]["matmul"] == 2 * B * H * L * S * E    # q·kᵀ and w·v
    assert report.mults_pa["forward"]["other"] >= B * H * L * E            # q ·̂ scale, softmax
    assert report.mults_pa["backward"]["matmul"] >= 2 * B * H * L * S * E


# -- leave_exact ---------------------------------------------------------------------------

class Inner(nn.Module):
    def forward(self, x):
        return torch.cumprod(x, -1)


def _cumprod_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Sequential(Inner()))


def test_leave_exact_runs_the_op_exact_and_the_audit_says_so():
    model, x = _cumprod_model(), torch.randn(3, 4)

    def step(model):
        with mode(Config.full(), leave_exact=[aten.cumprod]):
            return model(x)
    report = audit(step, model)
    with mode(Config.full(), leave_exact=[aten.cumprod]):
        h = model[0](x)
        y = model(x)
    assert torch.equal(y, torch.cumprod(h, -1))
    assert report.left_exact["forward"]["cumprod"] == 1
    assert not any(report.outside[p] for p in report.outside)
    assert not report.multiplication_free()
    assert "left exact by request" in str(report) and "NOT multiplication-free" in str(report)
    with pytest.raises(MultiplicationFoundError, match=r"left exact by request[^\n]*\n  forward: cumprod x1 in 1\.0"):
        report.assert_multiplication_free()


def test_leave_exact_takes_overloads_and_op_kinds():
    x = torch.randn(5)
    a, b = torch.randn(3, dtype=torch.complex64), torch.randn(3, dtype=torch.complex64)
    with mode(Config.full(), leave_exact=[aten.round.decimals, aten.div.Tensor]):
        assert torch.equal(torch.round(x, decimals=2), torch.round(x.clone(), decimals=2))
        assert torch.equal(a / b, torch.div(a.clone(), b))   # complex division: no PA version
        with pytest.raises(UnsupportedOpError, match="aten.div_.Tensor"):
            a.clone().div_(b)                     # another overload packet: not left exact
    model = nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def step():
        with mode(Config.full(), leave_exact=["optimizer"]):
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
    report = audit(step)
    assert report.left_exact["optimizer"]["lerp_"] == 2
    assert not any(report.outside[p] for p in report.outside)
    assert sum(report.pa["forward"].values()) > 0 and not report.left_exact["forward"]


def test_leave_exact_reaches_the_function_level_routes():
    a = torch.randn(5, 3, requires_grad=True)
    b = torch.randn(3, 2)

    def step():
        with mode(EXACT_MM, leave_exact=[aten.mm]):
            (a @ b).sum().backward()
    report = audit(step)
    assert report.left_exact["forward"]["mm"] == 1 and report.left_exact["backward"]["mm"] == 1
    assert not report.pa["forward"]


def test_leave_exact_rejects_what_it_does_not_know():
    for bad in ("matmull", 42, torch.cumprod):
        with pytest.raises(ValueError, match="leave_exact takes aten ops"):
            with mode(leave_exact=[bad]):
                pass


# -- the error names the op, where it ran and the way out -----------------------------------

def test_unsupported_error_names_op_module_path_and_way_out():
    model = _cumprod_model()
    before = len(torch.nn.modules.module._global_forward_pre_hooks)
    with mode(Config.full()):
        with pytest.raises(UnsupportedOpError) as e:
            model(torch.randn(3, 4))
        with pytest.raises(UnsupportedOpError, match="outside any module"):
            torch.cumprod(torch.randn(3), 0)      # the failed forward left the module stack clean
    msg = str(e.value)
    assert "aten.cumprod.default" in msg
    assert "module '1.0' (Inner) of Sequential" in msg
    assert "leave_exact=[torch.ops.aten.cumprod]" in msg
    assert len(torch.nn.modules.module._global_forward_pre_hooks) == before


class _CumprodGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.cumprod(g, 0)


def test_unsupported_error_in_backward_names_the_autograd_node():
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(UnsupportedOpError, match=r"in backward \(autograd node _CumprodGradBackward\)"):
        with mode(Config.full()):
            _CumprodGrad.apply(x).sum().backward()


def test_an_implementation_that_refuses_is_named_too():
    """The way out also covers calls that a PA implementation refuses (float64 here)."""
    x = torch.randn(4, dtype=torch.float64)
    with pytest.raises(UnsupportedOpError, match=r"aten.mul.Tensor ran outside any module: .*float64.*leave_exact"):
        with mode(Config.full()):
            x * 3.0
    with mode(Config.full(), leave_exact=[aten.mul]):
        assert torch.equal(x * 3.0, torch.mul(x.clone(), 3.0))


@pytest.mark.parametrize("transposed", [False, True])
def test_convolution_multiplications_count_products_for_each_requested_gradient(transposed):
    """Forward: one product per (output, C_in/groups·k) for a convolution, per (input,
    C_out/groups·k) for a transposed one; backward: the same again for each gradient asked."""
    torch.manual_seed(0)
    conv = (torch.nn.ConvTranspose1d(4, 6, 3, stride=2) if transposed else torch.nn.Conv1d(4, 6, 3, stride=2))
    x = torch.randn(2, 4, 9)

    def step():
        with pamtorch.mode(pamtorch.Config.full()):
            conv(x).sum().backward()     # x needs no gradient: only the weight's is computed

    report = pamtorch.audit(step, model=conv)
    out = conv(x)
    products = x.numel() * 6 * 3 if transposed else out.numel() * 4 * 3
    assert report.mults_pa["forward"]["matmul"] == products
    assert report.mults_pa["backward"]["matmul"] == products
