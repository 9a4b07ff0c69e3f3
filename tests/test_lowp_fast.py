"""The compiled bfloat16/float16 paths of pamtorch.arith (kernels/cpu/pa_lowp.cpp: PAM and PAD on
16-bit patterns, every unary op as a lookup in a table of its 65536 results) against the
pure-torch definitions they replace, bit for bit, on every 16-bit pattern. The definitions run
with ``arith._LOWP = False``; test_arith checks them against the float64 reference. A bf16/f16
model step under the mode must give the same bits either way."""
import contextlib
import copy
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import pamtorch
from pamtorch import arith
from pamtorch.kernels import cpu

from kernel_checks import same_bits, spy

EXT = cpu.load_extension()
pytestmark = pytest.mark.skipif(EXT is None, reason="compiled CPU kernels unavailable")

LOWP = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def definition():
    """Every 16-bit PA op on its pure-torch definition (the path before the compiled one)."""
    old = arith._LOWP
    arith._LOWP = False
    try:
        yield
    finally:
        arith._LOWP = old


def patterns(dtype):
    """All 65536 bit patterns of a 16-bit dtype (every NaN payload and subnormal included)."""
    p = torch.arange(1 << 16, dtype=torch.int32)
    return torch.where(p >= 1 << 15, p - (1 << 16), p).to(torch.int16).view(dtype)


def boundaries(dtype):
    """Patterns next to every class boundary (zero, subnormal, smallest normal, 1.0, largest
    finite, inf, NaN) and both signs."""
    f = arith.fmt(dtype)
    mags = {0, 1, f.min_normal - 1, f.min_normal, f.min_normal + 1, f.bias - 1, f.bias, f.bias + 1,
            f.bias + f.min_normal, 2 * f.min_normal, f.inf - 1, f.inf, f.inf + 1, f.nan, 0x7FFF,
            f.inf - f.bias, f.inf - f.bias + 1, f.bias - f.min_normal}
    p = torch.tensor(sorted(mags), dtype=torch.int32)
    p = torch.cat([p, p - (1 << 16) + (1 << 15)])  # the same magnitudes with the sign bit
    return p.to(torch.int16).view(dtype)


# ---------------------------------------------------------------------------- PAM, PAD

@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("op", [arith.pam, arith.pad], ids=["pam", "pad"])
def test_binary_every_pattern(monkeypatch, dtype, op):
    """Every pattern against every boundary pattern, and against three random pairings."""
    calls = spy(monkeypatch, "lowp_" + op.__name__)
    a = patterns(dtype)
    g = torch.Generator().manual_seed(0)
    pairs = [(a[:, None], boundaries(dtype)[None, :])]
    pairs += [(a, a[torch.randperm(a.numel(), generator=g)]) for _ in range(3)]
    for x, y in pairs:
        fast = op(x, y)
        with definition():
            same_bits(fast, op(x, y))
        with definition():  # operands swapped
            ref = op(y, x)
        same_bits(op(y, x), ref)
    assert len(calls) == 2 * len(pairs)


def test_bf16_pam_pad_equal_float32_on_the_upcast():
    """bf16 -> f32 appends 16 zero bits to the pattern, so PAM/PAD's integer rules agree with
    float32's (pure-torch definition) and the result converts back exactly; NaN only as a
    value (torch's vectorized float32 -> bf16 conversion writes NaN as 0xFFFF, PA's NaN is
    the canonical 0x7FC0)."""
    a = patterns(torch.bfloat16)
    y = a[torch.randperm(a.numel(), generator=torch.Generator().manual_seed(1))]
    for x, z in ((a[:, None], boundaries(torch.bfloat16)[None, :]), (a, y)):
        for op in (arith.pam, arith.pad):
            old = arith._COMPILED
            arith._COMPILED = False
            try:
                ref = op(x.float(), z.float()).to(torch.bfloat16)
            finally:
                arith._COMPILED = old
            fast = op(x, z)
            nan = torch.isnan(ref)
            assert torch.equal(nan, torch.isnan(fast))
            assert fast.view(torch.int16)[nan].eq(0x7FC0).all()
            same_bits(fast.masked_fill(nan, 0), ref.masked_fill(nan, 0))


@pytest.mark.parametrize("dtype", LOWP)
def test_binary_layouts(dtype):
    """Broadcasting, 0-d and strided operands, empty tensors: the same bits and shapes."""
    g = torch.Generator().manual_seed(2)
    m = torch.randn(37, 53, generator=g).to(dtype)
    cases = [(m, m.t().contiguous().t()), (m.t(), torch.randn(53, 37, generator=g).to(dtype)),
             (m, torch.tensor(-1.5, dtype=dtype)), (torch.tensor(3.0, dtype=dtype), m),
             (m[:, :1], m[:1, :]), (m[1::2, 1::3], m[:36:2, ::3]), (m[:0], m[:0])]
    for op in (arith.pam, arith.pad):
        for x, y in cases:
            fast = op(x, y)
            with definition():
                same_bits(fast, op(x, y))


def test_kernel_argument_errors():
    b = torch.ones(3, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="one dtype"):
        EXT.lowp_pam(b, b.half())
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        EXT.lowp_pad(b.float(), b.float())
    with pytest.raises(RuntimeError, match="65536"):
        EXT.lowp_lookup(b, b)
    # mixed or float32 operands never reach the 16-bit kernels
    assert arith._lowp(b, b.half()) is None and arith._lowp(b.float()) is None
    assert arith._lowp(b, b) is EXT


# ---------------------------------------------------------------------------- unary ops

UNARY = [
    ("exp", lambda x: arith.pa_exp(x)), ("exp_offset", lambda x: arith.pa_exp(x, 1.0552)),
    ("log", lambda x: arith.pa_log(x)), ("log_offset", lambda x: arith.pa_log(x, 0.75)),
    ("sqrt", arith.pa_sqrt), ("rsqrt", arith.pa_rsqrt), ("palog2", arith.palog2), ("paexp2", arith.paexp2),
    ("pow2", lambda x: arith.pa_pow(x, 2.0)), ("pow_half", lambda x: arith.pa_pow(x, 0.5)),
    ("pow_m3", lambda x: arith.pa_pow(x, -3.0)), ("pow_inf", lambda x: arith.pa_pow(x, math.inf)),
    ("pow_1.7", lambda x: arith.pa_pow(x, 1.7)), ("pow_nan", lambda x: arith.pa_pow(x, math.nan)),
    ("round3", lambda x: arith.round_mantissa(x, 3)), ("round1", lambda x: arith.round_mantissa(x, 1)),
]


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("name,fn", UNARY, ids=[n for n, _ in UNARY])
def test_unary_every_pattern(monkeypatch, dtype, name, fn):
    """Every pattern, in a shuffled, strided 2-D layout (the table is indexed by the pattern)."""
    arith._table.cache_clear()
    calls = spy(monkeypatch, "lowp_lookup")
    a = patterns(dtype)
    x = a[torch.randperm(a.numel(), generator=torch.Generator().manual_seed(3))].reshape(256, 256).t()
    fast = fn(x)
    assert calls, "the lookup kernel did not run"
    with definition():
        same_bits(fast, fn(x))


def test_pow_zero_and_unsupported_dtypes():
    x = patterns(torch.bfloat16)
    assert torch.equal(arith.pa_pow(x, 0.0), torch.ones_like(x))
    with pytest.raises(TypeError, match="unsupported dtype"):
        arith.pa_pow(torch.ones(2, dtype=torch.int32), 0.0)


# ---------------------------------------------------------------------------- model steps

class _Tiny(torch.nn.Module):
    """Embedding -> post-norm TransformerEncoderLayer (dropout) -> Linear, next-token loss."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.enc = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.out = torch.nn.Linear(16, 50)

    def forward(self, tokens):
        return self.out(self.enc(self.emb(tokens)))


def _train(model, autocast, steps=2):
    """Two AdamW steps with clipping under pamtorch.mode(Config.full()); the losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, eps=1e-3)  # eps > 0 in f16
    g = torch.Generator().manual_seed(4)
    losses = []
    with sdpa_kernel(SDPBackend.MATH), pamtorch.mode(pamtorch.Config.full()):
        for step in range(steps):
            tokens = torch.randint(0, 50, (4, 9), generator=g)
            torch.manual_seed(step)
            with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
                logits = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), tokens[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("case", ["bfloat16", "float16", "autocast"])
def test_model_step_same_as_definition(monkeypatch, case):
    """Two training steps of a small model in bf16 / f16 parameters, or float32 parameters under
    bf16 autocast, give the same loss and parameter bits with the compiled 16-bit paths as with
    the definitions (the tables built inside the mode for the first time)."""
    torch.manual_seed(0)
    base = _Tiny()
    if case != "autocast":
        base = base.to(getattr(torch, case))
    calls = spy(monkeypatch, "lowp_pam")
    arith._table.cache_clear()
    fast_model = copy.deepcopy(base)
    fast = _train(fast_model, case == "autocast")
    assert calls, "the 16-bit kernels did not run"
    n = len(calls)
    slow_model = copy.deepcopy(base)
    with definition():
        slow = _train(slow_model, case == "autocast")
    assert len(calls) == n
    assert torch.isfinite(fast).all() and fast.dtype == (torch.float16 if case == "float16" else torch.bfloat16)
    same_bits(fast, slow)
    for p, q in zip(fast_model.parameters(), slow_model.parameters()):
        same_bits(p.detach(), q.detach())
    assert not torch.equal(fast_model.out.weight, base.out.weight)  # the steps did train


def test_bench_step_dtype_variants():
    """``pamtorch bench step --variants pam-full@bfloat16``: the model and its floating inputs
    in bf16; ``@autocast`` runs under CPU autocast; anything else is one clear error."""
    from pamtorch import bench
    from pamtorch.recipes.train import UserError

    m = torch.nn.Linear(3, 2)
    w = m.weight
    with bench._step_variant("pam-full@bfloat16", m)():
        y = m(torch.ones(4, 3))
    assert m.weight is w and w.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    m32 = torch.nn.Linear(3, 2)
    with bench._step_variant("fp32@autocast", m32)():
        assert m32(torch.ones(4, 3)).dtype == torch.bfloat16
    assert m32.weight.dtype == torch.float32
    with pytest.raises(UserError, match="bfloat16, float16 or autocast, got 'int8'"):
        bench._step_variant("fp32@int8", m32)
