"""Recurrent layers under the mode (pamtorch.ops.recurrent): the fused LSTM op as a PA cell
loop against torch's own decomposition of the LSTM run under the mode, and LSTM, GRU and RNN
models training a step multiplication-free, close to exact arithmetic."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import pamtorch
from pamtorch.config import Config, OpConfig
from pamtorch.mode import PASS_THROUGH, UnsupportedOpError

aten = torch.ops.aten

# torch.backends.mkldnn.flags() warns about Intel GPUs on every use
pytestmark = pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")


class _Spy(TorchDispatchMode):
    """Records aten ops: entered outside the mode it sees what the mode runs (the PA
    implementations' insides), entered inside it sees what reaches the mode."""

    def __init__(self):
        super().__init__()
        self.ops, self.unknown = set(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket)
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        if any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in leaves) \
                and func.overloadpacket not in PASS_THROUGH:
            self.unknown.add(str(func))
        return func(*args, **(kwargs or {}))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _run_lstm(m, x, state, cfg, fused=True):
    """Outputs and gradients (parameters, x, h0, c0) of one forward/backward under the mode."""
    m = copy.deepcopy(m)
    x = x.clone().requires_grad_()
    state = tuple(s.clone().requires_grad_() for s in state) if state else None
    with torch.backends.mkldnn.flags(enabled=fused), pamtorch.mode(cfg):
        y, (h, c) = m(x, state)
        (y.sum() + h.sum() + 2 * c.sum()).backward()
    grads = [p.grad for p in m.parameters()] + [x.grad] + ([s.grad for s in state] if state else [])
    return [y, h, c], grads


LSTMS = {
    "plain": (dict(), (6, 3, 5), False),
    "bidirectional_2_layers": (dict(bidirectional=True, num_layers=2), (6, 3, 5), True),
    "no_bias": (dict(bias=False), (6, 3, 5), False),
    "batch_first_with_state": (dict(batch_first=True, num_layers=2), (3, 6, 5), True),
    "unbatched": (dict(), (6, 5), False),
    "one_step": (dict(num_layers=2), (1, 2, 5), True),
}


@pytest.mark.parametrize("name", sorted(LSTMS))
def test_fused_lstm_equals_torchs_decomposition_under_the_mode(name):
    """The mkldnn LSTM op routed to the PA cell loop gives what torch's own LSTM
    decomposition (lstm_cell: addmm, sigmoid_, tanh, mul, all routed) gives under the mode,
    forward and backward, up to float32 summation order."""
    kw, shape, with_state = LSTMS[name]
    torch.manual_seed(0)
    m = nn.LSTM(5, 7, **kw)
    x = torch.randn(shape)
    state = None
    if with_state:
        d = m.num_layers * (2 if m.bidirectional else 1)
        b = shape[0] if kw.get("batch_first") else shape[1]
        state = (torch.randn(d, b, 7), torch.randn(d, b, 7))
    inner = _Spy()
    with inner:     # entered before the mode: the ops the mode's implementations run
        outs, grads = _run_lstm(m, x, state, Config.full())
    ref_outs, ref_grads = _run_lstm(m, x, state, Config.full(), fused=False)
    for a, b in zip(outs + grads, ref_outs + ref_grads):
        assert _rel(a, b) < 1e-5
    assert not inner.unknown, sorted(inner.unknown)


def test_fused_lstm_is_reached_and_routed():
    torch.manual_seed(1)
    m = nn.LSTM(4, 6)
    x = torch.randn(5, 2, 4, requires_grad=True)
    seen = _Spy()
    with pamtorch.mode(Config.full()), seen:   # entered after the mode: what reaches it
        m(x)[0].sum().backward()
    assert {aten.mkldnn_rnn_layer, aten.mkldnn_rnn_layer_backward} <= seen.ops


def test_backward_recomputes_the_forward_without_a_workspace():
    torch.manual_seed(2)
    T, B, I, H = 4, 3, 5, 6
    x, hx, cx = torch.randn(T, B, I), torch.randn(B, H), torch.randn(B, H)
    w_ih, w_hh, b_ih, b_hh = torch.randn(4 * H, I), torch.randn(4 * H, H), torch.randn(4 * H), torch.randn(4 * H)
    g = torch.randn(T, B, H)
    with pamtorch.mode(Config.full()):
        for reverse in (False, True):
            out, hy, cy, ws = aten.mkldnn_rnn_layer(x, w_ih, w_hh, b_ih, b_hh, hx, cx, reverse, [], 2, H,
                                                    1, True, False, False, True)
            grads = [aten.mkldnn_rnn_layer_backward(x, w_ih, w_hh, b_ih, b_hh, hx, cx, out, hy, cy, g,
                                                    None, None, reverse, 2, H, 1, True, True, False, [],
                                                    False, w) for w in (ws, torch.empty(0, dtype=torch.uint8))]
            for a, b in zip(*grads):
                assert torch.equal(a, b)
            assert ws.numel() == 5 * T * B * H


def test_unsupported_variants_name_the_op():
    x, h = torch.randn(2, 1, 3), torch.randn(1, 4)
    w_ih, w_hh, b = torch.randn(16, 3), torch.randn(16, 4), torch.randn(16)
    with pamtorch.mode(Config.full()):
        with pytest.raises(UnsupportedOpError, match="mkldnn_rnn_layer with mode=3"):
            aten.mkldnn_rnn_layer(x, w_ih, w_hh, b, b, h, h, False, [], 3, 4, 1, True, False, False, True)
        with pytest.raises(UnsupportedOpError, match="packed sequence"):
            aten.mkldnn_rnn_layer(x, w_ih, w_hh, b, b, h, h, False, [1, 1], 2, 4, 1, True, False, False, True)


@pytest.mark.parametrize("left_exact", ["nonlinear", "elementwise"])
def test_gate_kinds_follow_the_config(left_exact):
    """With the gate nonlinearities (or the gate products) left exact, the fused LSTM still
    matches the decomposition under the same config, and differs from the all-PA LSTM."""
    torch.manual_seed(3)
    m = nn.LSTM(5, 7)
    x = torch.randn(4, 2, 5)
    cfg = Config.full().replace(**{left_exact: OpConfig(pa=False)})
    outs, grads = _run_lstm(m, x, None, cfg)
    ref_outs, ref_grads = _run_lstm(m, x, None, cfg, fused=False)
    for a, b in zip(outs + grads, ref_outs + ref_grads):
        assert _rel(a, b) < 1e-5
    assert _rel(outs[0], _run_lstm(m, x, None, Config.full())[0][0]) > 1e-3


def test_bfloat16_lstm_runs_under_the_mode():
    torch.manual_seed(4)
    m = nn.LSTM(5, 7).bfloat16()
    x = torch.randn(4, 2, 5).bfloat16().requires_grad_()
    exact = m(x.detach())[0].float()
    with pamtorch.mode(Config.full()):
        y = m(x)[0]
        y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and _rel(y.float(), exact) < 0.25
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() for p in m.parameters())


class _Seq(nn.Module):
    def __init__(self, core):
        super().__init__()
        self.core = core
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.core(x)[0][:, -1])


CORES = {
    "lstm": lambda: nn.LSTM(8, 16, num_layers=2, batch_first=True),
    "gru": lambda: nn.GRU(8, 16, num_layers=2, batch_first=True),
    "rnn_tanh": lambda: nn.RNN(8, 16, num_layers=2, batch_first=True),
    "rnn_relu": lambda: nn.RNN(8, 16, num_layers=2, batch_first=True, nonlinearity="relu"),
}


@pytest.mark.parametrize("name", sorted(CORES))
def test_recurrent_model_trains_a_step_multiplication_free_close_to_exact(name):
    torch.manual_seed(5)
    model = _Seq(CORES[name]())
    for p in model.parameters():
        nn.init.uniform_(p, -0.25, 0.25)
    x, target = torch.randn(4, 10, 8), torch.tensor([0, 2, 1, 2])
    exact = copy.deepcopy(model)
    ye = exact(x)
    nn.functional.cross_entropy(ye, target).backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    spy = _Spy()
    with spy, pamtorch.mode(Config.full()):
        y = model(x)
        nn.functional.cross_entropy(y, target).backward()
        opt.step()
    assert not spy.unknown, sorted(spy.unknown)
    # PA arithmetic's error (Mitchell products underestimate by up to 11%, 4% on average),
    # compounded over 10 steps and two layers, the approx derivative through all of them;
    # measured: output 2-8%, gradients at most 28-56% off (small bias sums), cosine >= 0.92
    assert _rel(y, ye) < 0.15
    for (n, p), (_, pe) in zip(model.named_parameters(), exact.named_parameters()):
        assert _rel(p.grad, pe.grad) < 0.75, n
        assert nn.functional.cosine_similarity(p.grad.flatten(), pe.grad.flatten(), 0) > 0.85, n
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("name", sorted(LSTMS))
def test_compiled_lstm_loop_equals_the_python_loop(name, monkeypatch):
    """kernels/cpu/pa_rnn.cpp runs the LSTM layer's time loop (forward and backward) in C++:
    outputs and every gradient bit for bit as ops/recurrent.py's Python loop, for every
    variant above (directions, layers, no bias, given state, one step)."""
    from pamtorch.kernels import cpu
    from pamtorch.ops import recurrent as R
    if not cpu.available():
        pytest.skip("compiled CPU kernels unavailable")
    kw, shape, with_state = LSTMS[name]
    torch.manual_seed(3)
    m = nn.LSTM(5, 4, **kw)
    x = torch.randn(*shape)
    layers = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    batch = (shape[0] if kw.get("batch_first") else shape[1]) if len(shape) == 3 else None
    state = tuple(torch.randn(layers, *(() if batch is None else (batch,)), 4) for _ in range(2)) if with_state else None
    calls = []
    real = R._CellOps.compiled
    monkeypatch.setattr(R._CellOps, "compiled", lambda self, *ts: calls.append(real(self, *ts)) or calls[-1])
    compiled = _run_lstm(m, x, state, Config.full())
    assert calls and all(c is not None for c in calls)   # every layer's loop ran in C++
    monkeypatch.setattr(R._CellOps, "compiled", lambda self, *ts: None)
    python = _run_lstm(m, x, state, Config.full())
    for a, b in zip(compiled[0] + compiled[1], python[0] + python[1]):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_compiled_lstm_loop_is_used_only_for_plain_float32_configs():
    from pamtorch.ops import recurrent as R
    from pamtorch.ops.table import ACTIVE
    t = torch.ones(2, 2)
    for cfg, want in [(Config.full(), True), (Config.full().with_mantissa_bits(7), False),
                      (Config.full().replace(elementwise=OpConfig(pa=False)), False),
                      (Config.full().replace(matmul=OpConfig(offset=1.0552)), False)]:
        ACTIVE.append(cfg)
        try:
            ops = R._CellOps()
        finally:
            ACTIVE.pop()
        assert (ops.compiled(t, t) is not None) == (want and pamtorch.kernels.cpu.available())
        assert ops.compiled(t, t.double()) is None
