"""pamtorch.compile: one graph per direction, the eager mode's bits, no float multiplication left.

The reference is the eager ``pamtorch.mode`` (or the eager converted model), whose numerics the
rest of the suite checks against float64 and tests/reference.py; here the compiled step must
reproduce it bit for bit."""
import importlib

import pytest
import torch
import torch._inductor.config
import torch.nn as nn
import torch.nn.functional as F

import pamtorch
from pamtorch import Config
from pamtorch.compile import exact_sum, float_multiplications, pa_backend, pam_bmm, pam_mm
from pamtorch.convert import ConvertedModule

aten = torch.ops.aten


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class _Block(nn.Module):
    """Pre-norm transformer block (causal SDPA, GELU MLP) with a cross-entropy head."""

    def __init__(self, d=16, heads=2, vocab=11):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, vocab)

    def forward(self, x, y):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        x = x + self.mlp(self.ln2(x))
        return F.cross_entropy(self.head(x).reshape(B * T, -1), y)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 5))

    def forward(self, x, y):
        return F.cross_entropy(self.net(x), y)


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters()]


def _eager(model, config, *inputs):
    with pamtorch.mode(config):
        return _grads(model, model(*inputs))


def _assert_bits(ref, got):
    assert len(ref) == len(got)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert torch.equal(a, b), f"tensor {i}: max |diff| {(a - b).abs().max().item()}"


def _compiled_like_eager(model, cfg, *inputs):
    """pamtorch.compile(model, cfg) with fullgraph: its gradients equal the eager mode's bit for
    bit, in one forward and one backward graph without a float multiplication; the compiled model."""
    ref = _eager(model, cfg, *inputs)
    compiled = pamtorch.compile(model, cfg, fullgraph=True)
    _assert_bits(ref, _grads(model, compiled(*inputs)))
    assert len(compiled.pamtorch_graphs) == 2
    assert all(float_multiplications(g) == [] for g in compiled.pamtorch_graphs)
    return compiled


def _targets(compiled):
    return {str(n.target) for g in compiled.pamtorch_graphs for n in g.graph.nodes if n.op == "call_function"}


def test_mlp_inductor_equals_eager_mode_bitwise():
    torch.manual_seed(0)
    model, x, y = _MLP(), torch.randn(6, 12), torch.randint(0, 5, (6,))
    cfg = Config.paper()
    # one forward and one backward graph, each PA: every multiply-like aten op is a node of
    # its PA implementation, the float sums are aten's own; no float multiplication is left
    compiled = _compiled_like_eager(model, cfg, x, y)
    targets = _targets(compiled)
    assert {"pamtorch_pa.addmm.default", "pamtorch_pa.mm.default", "pamtorch_pa.gelu.default",
            "pamtorch_pa.gelu_backward.default", "pamtorch.sum.default"} <= targets
    assert not targets & {"aten.mm.default", "aten.addmm.default", "aten.mul.Tensor", "aten.div.Tensor",
                          "aten.sum.dim_IntList", "aten.exp.default", "aten.gelu.default"}
    # the second step reuses the compiled graphs
    _assert_bits(_eager(model, cfg, x, y), _grads(model, compiled(x, y)))
    assert len(compiled.pamtorch_graphs) == 2


def test_transformer_block_one_graph_equals_eager_mode_bitwise():
    torch.manual_seed(1)
    model = _Block()
    x, y = torch.randn(2, 5, 16), torch.randint(0, 11, (10,))
    compiled = _compiled_like_eager(model, Config.paper(), x, y)
    # attention runs the mode's function-level route: PAM kernels and PA elementwise ops
    assert {"pamtorch.pam_bmm.default", "pamtorch.ew_pam.default", "pamtorch.ew_exp.default",
            "pamtorch_pa.native_layer_norm_backward.default"} <= _targets(compiled)


class _Translate(nn.Module):
    """The translate recipe's stock nn.Transformer (post-norm, padding masks, causal target
    mask) and a cross-entropy over the non-padded target tokens."""

    def __init__(self):
        super().__init__()
        from pamtorch.recipes.translate import Transformer, TranslateConfig
        cfg = TranslateConfig(vocab_size=13, d_model=16, enc_layers=1, dec_layers=1, heads=2, ffn=32,
                              dropout=0.0, max_len=8)
        self.model = Transformer(cfg)

    def forward(self, src, tgt_in, tgt_out):
        logits = self.model(src, tgt_in)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt_out.reshape(-1), ignore_index=0)


def test_translate_transformer_one_graph_equals_eager_mode_bitwise():
    # the decoder's causal mask is passed with tgt_is_causal=True: torch's own check of it
    # (a data-dependent branch) was a graph break, which left the code after it to Python dispatch
    torch.manual_seed(3)
    model = _Translate()
    src = torch.tensor([[5, 6, 7, 2, 0], [8, 9, 2, 0, 0]])
    tgt_in = torch.tensor([[1, 10, 11, 12], [1, 4, 0, 0]])
    tgt_out = torch.tensor([[10, 11, 12, 2], [4, 2, 0, 0]])
    compiled = _compiled_like_eager(model, Config.full(), src, tgt_in, tgt_out)
    assert "pamtorch.pam_bmm.default" in _targets(compiled)


def test_exact_derivative_kinds_equal_eager_mode():
    # function-level routes (exact matmul and loss derivatives) apply while aot_autograd traces
    torch.manual_seed(2)
    model, x, y = _MLP(), torch.randn(6, 12), torch.randint(0, 5, (6,))
    cfg = Config.paper().with_derivative("exact")
    ref = _eager(model, cfg, x, y)
    compiled = pamtorch.compile(model, cfg, backend="eager", fullgraph=True)
    _assert_bits(ref, _grads(model, compiled(x, y)))
    targets = _targets(compiled)
    assert {"pamtorch.pam_mm_exact_grad_a.default", "pamtorch.pam_mm_exact_grad_b.default"} <= targets
    # and they differ from the approx derivative's gradients
    approx = _eager(model, Config.paper(), x, y)
    assert not torch.equal(approx[1], ref[1])


class _Scaled(nn.Module):
    """A parameter-free module of no known family: its multiply stays exact under convert."""

    def forward(self, x):
        return x * 0.7


def test_converted_model_compiles_its_regions():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), _Scaled(), nn.GELU(), nn.Linear(16, 3))
    x = torch.randn(4, 8)
    pamtorch.convert(model, Config.paper())
    model.zero_grad()
    out = model(x)
    ref = _grads(model, out.square().sum())
    compiled = pamtorch.compile(model, fullgraph=True, backend="eager")
    got = _grads(model, compiled(x).square().sum())
    _assert_bits(ref, got)
    # the regions are converted modules again after the call
    assert all(isinstance(m, ConvertedModule) for m in model if m is not model[1])
    # the exact multiply outside the regions is the one float multiplication the graphs keep
    found = [f for g in compiled.pamtorch_graphs for f in float_multiplications(g)]
    assert found and all("aten.mul.Tensor" in f for f in found)
    with pytest.raises(ValueError, match="converted modules"):
        pamtorch.compile(model, Config.paper())
    # calls from several threads at once: each waits for the one before to restore the classes
    import threading

    with torch.no_grad():
        want = compiled(x)
    start, outs, errors = threading.Barrier(4), [], []

    def call():
        start.wait()
        try:
            for _ in range(5):
                with torch.no_grad():
                    outs.append(compiled(x))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(outs) == 20 and all(torch.equal(o, want) for o in outs)
    assert all(isinstance(m, ConvertedModule) for m in model if m is not model[1])


def test_transformer_encoder_inference_and_converted_training():
    torch.manual_seed(7)
    cfg = Config.paper()
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
                                  enable_nested_tensor=False)
    x = torch.randn(2, 5, 16)
    model.eval()
    with torch.no_grad():
        with pamtorch.mode(cfg):
            ref = model(x)
        # eval without grad: the fused fast path (no PA form) is off, as under the mode
        assert torch.equal(ref, pamtorch.compile(model, cfg, backend="eager", fullgraph=True)(x))
    torch._dynamo.reset()
    pamtorch.convert(model, cfg)
    model.train()
    ref = _grads(model, model(x).square().mean())
    compiled = pamtorch.compile(model, backend="eager", fullgraph=True)
    _assert_bits(ref, _grads(model, compiled(x).square().mean()))
    assert all(float_multiplications(g) == [] for g in compiled.pamtorch_graphs)
    model.eval()
    with torch.no_grad():
        ref, got = model(x), compiled(x)   # the inference graph knows the regions too
    assert torch.equal(ref, got)
    assert float_multiplications(compiled.pamtorch_graphs[-1]) == []


def test_dynamic_shapes_one_graph_for_every_batch_size():
    torch.manual_seed(8)
    model, cfg = _MLP(), Config.paper()
    compiled = pamtorch.compile(model, cfg, backend="eager", dynamic=True, fullgraph=True)
    for n in (3, 7, 10):
        x, y = torch.randn(n, 12), torch.randint(0, 5, (n,))
        _assert_bits(_eager(model, cfg, x, y), _grads(model, compiled(x, y)))
    assert len(compiled.pamtorch_graphs) == 2   # symbolic batch size: no recompilation


class _Numbers(nn.Module):
    """Python numbers where aten takes tensors (``mul.Tensor(x, 8.0)``), an integer tensor
    times a float (the mode converts it), pow and div by numbers."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(10, 8), nn.Linear(8, 3)

    def forward(self, t, n):
        return self.lin(self.emb(t) * 8.0 + n * 0.5).pow(2) / 3 + (t * 1.5).sum()


def test_python_numbers_in_routed_ops():
    torch.manual_seed(9)
    model, cfg = _Numbers(), Config.paper()
    t, n = torch.randint(0, 10, (4, 5)), torch.randn(4, 5, 8)
    with pamtorch.mode(cfg):
        out = model(t, n)
        ref = torch.autograd.grad(out.sum(), list(model.parameters()))
    compiled = pamtorch.compile(model, cfg, backend="eager", fullgraph=True)
    out2 = compiled(t, n)
    _assert_bits([out, *ref], [out2, *torch.autograd.grad(out2.sum(), list(model.parameters()))])
    assert {"pamtorch_pa.mul__Tensor.default", "pamtorch_pa.pow__Tensor_Scalar.default",
            "pamtorch_pa.div__Tensor.default"} <= _targets(compiled)


@torch._dynamo.disable
def _eager_scale(h):
    return h * 0.3   # never compiled: runs as eager code between two graphs


class _Breaks(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = F.gelu(self.a(x))
        if h.sum().item() > -1e9:   # a graph break on data
            h = _eager_scale(h)
        return self.b(h)


def test_graph_breaks_refused_by_default_and_eager_code_between_graphs_runs_pa():
    torch.manual_seed(10)
    model, cfg, x = _Breaks(), Config.paper(), torch.randn(4, 8)
    with pytest.raises(Exception, match="item|graph break|Unsupported"):
        pamtorch.compile(model, cfg, backend="eager")(x)
    torch._dynamo.reset()
    with pamtorch.mode(cfg):
        out = model(x)
        ref = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    compiled = pamtorch.compile(model, cfg, backend="eager", fullgraph=False)
    out2 = compiled(x)
    with pamtorch.mode(cfg):   # the eager code's backward is PA under the mode
        got = torch.autograd.grad(out2.square().sum(), list(model.parameters()))
    _assert_bits([out, *ref], [out2, *got])
    # the multiply between the graphs ran PA: with the backend alone it runs exact, other bits
    torch._dynamo.reset()
    assert not torch.equal(out, torch.compile(model, backend=pa_backend(cfg, inductor=False))(x))
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="fullgraph=True only"):
        pamtorch.compile(pamtorch.convert(_Breaks(), cfg), fullgraph=False)


def test_exact_kind_left_in_graph_is_reported():
    # a kind the config leaves exact keeps torch's float product, and the check says so
    torch.manual_seed(4)
    model, x, y = _MLP(), torch.randn(6, 12), torch.randint(0, 5, (6,))
    cfg = Config.ablation("softmax", "norm", "loss", "optimizer", "elementwise", "nonlinear")
    compiled = pamtorch.compile(model, cfg, backend="eager", fullgraph=True)
    _assert_bits(_eager(model, cfg, x, y), _grads(model, compiled(x, y)))
    found = [f for g in compiled.pamtorch_graphs for f in float_multiplications(g)]
    assert any("aten.addmm" in f for f in found) and any("aten.mm" in f for f in found)


def test_backward_under_mode_runs_the_compiled_graph_once():
    # the compiled backward is PA already; under pamtorch.mode it must not be routed again
    torch.manual_seed(5)
    model, x, y = _MLP(), torch.randn(6, 12), torch.randint(0, 5, (6,))
    cfg = Config.paper()
    ref = _eager(model, cfg, x, y)
    compiled = pamtorch.compile(model, cfg, backend="eager", fullgraph=True)
    loss = compiled(x, y)
    model.zero_grad(set_to_none=True)
    with pamtorch.mode(cfg):
        loss.backward()
    _assert_bits(ref, [loss.detach()] + [p.grad for p in model.parameters()])


class _ClassToken(nn.Module):
    """A class token concatenated and selected (ViT's head): its backward graph holds a
    select_scatter, which inductor rewrites with fake-tensor calls while it compiles."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(12, 24), nn.Linear(24, 5)
        self.cls = nn.Parameter(torch.randn(1, 1, 24))

    def forward(self, x, y):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.a(x)], 1)
        return F.cross_entropy(self.b(h[:, 0]), y)


def test_backward_compiled_by_inductor_under_the_mode():
    # inductor compiles the backward graph at the first backward: under pamtorch.mode its
    # kernel route must not catch inductor's own calls (it refused prims.clone)
    torch.manual_seed(7)
    model, x, y = _ClassToken(), torch.randn(3, 4, 12), torch.randint(0, 5, (3,))
    cfg = Config.paper()
    ref = _eager(model, cfg, x, y)
    compiled = pamtorch.compile(model, cfg, fullgraph=True)
    # inductor's graph cache would skip the compilation this test is about
    with torch._inductor.config.patch(fx_graph_cache=False):
        loss = compiled(x, y)
        model.zero_grad(set_to_none=True)
        with pamtorch.mode(cfg):
            loss.backward()
    _assert_bits(ref, [loss.detach()] + [p.grad for p in model.parameters()])
    assert len(compiled.pamtorch_graphs) == 2


def test_routed_nodes_run_the_kernel_routes_answers_and_see_a_replaced_entry(monkeypatch):
    # a routed node with a C++ answer on the kernel route (mm, addmm, layer norm...) runs it,
    # not the Python handler, with the same bits; an op-table entry replaced after the
    # compilation is still what runs
    from pamtorch.ops.table import OP_TABLE, _Entry

    M = importlib.import_module("pamtorch.mode")
    torch.manual_seed(8)
    model, x, y = _MLP(), torch.randn(6, 12), torch.randint(0, 5, (6,))
    cfg = Config.full()
    ref = _eager(model, cfg, x, y)
    compiled = pamtorch.compile(model, cfg, backend="eager", fullgraph=True)
    _assert_bits(ref, _grads(model, compiled(x, y)))
    calls = []

    def spy(name, args, kwargs):
        calls.append(name)
        return M._kernel_call(name, args, kwargs)

    with M.kernel_route_handler(spy):
        _assert_bits(ref, _grads(model, compiled(x, y)))
        assert not [c for c in calls if c.split("::")[1].split(".")[0] in ("mm", "addmm")], calls
        builtin = OP_TABLE[torch.ops.aten.mm]
        seen = []

        def mine(func, args, kwargs, opcfg):
            seen.append(func)
            return builtin.impl(func, args, kwargs, opcfg)
        monkeypatch.setitem(OP_TABLE, torch.ops.aten.mm, _Entry(builtin.kind, mine))
        _assert_bits(ref, _grads(model, compiled(x, y)))
        assert seen, "the replaced mm entry did not run"


def test_custom_ops_match_the_kernels_and_the_approx_derivative():
    torch.manual_seed(6)
    a, b = torch.randn(5, 7, requires_grad=True), torch.randn(7, 3, requires_grad=True)
    g = torch.randn(5, 3)
    ref = pamtorch.matmul(a, b, derivative="approx")
    ra, rb = torch.autograd.grad(ref, (a, b), g)
    out = pam_mm(a, b)
    ga, gb = torch.autograd.grad(out, (a, b), g)
    for x, y in [(ref, out), (ra, ga), (rb, gb)]:
        assert torch.equal(x, y)
    a3, b3 = torch.randn(2, 5, 7, requires_grad=True), torch.randn(2, 7, 3, requires_grad=True)
    ref3 = pamtorch.bmm(a3, b3, offset=1.0552, derivative="approx")
    out3 = pam_bmm(a3, b3, 1.0552)
    g3 = torch.randn(2, 5, 3)
    assert torch.equal(ref3, out3)
    for x, y in zip(torch.autograd.grad(ref3, (a3, b3), g3), torch.autograd.grad(out3, (a3, b3), g3)):
        assert torch.equal(x, y)
    torch.library.opcheck(torch.ops.pamtorch.pam_mm.default, (a.detach(), b.detach(), None),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    t = torch.randn(4, 6)
    assert torch.equal(exact_sum(t, [0], True), t.sum(0, keepdim=True))


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend must be one of"):
        pamtorch.compile(_MLP(), backend="cudagraphs")
    with pytest.raises(TypeError, match="must be a pamtorch Config"):
        pamtorch.compile(_MLP(), "paper")
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        pamtorch.compile(lambda x: x)
