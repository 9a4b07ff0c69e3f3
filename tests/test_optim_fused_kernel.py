"""The compiled Adam/AdamW update (``optim_adam_step`` in kernels/cpu/pa_optim.cpp) against the
Python loop of ``ops/optim.py``'s ``_pa_fused_adam`` it replaces, bit for bit, and the mode's
switch of stock Adam/AdamW to the fused path. The loop runs with the compiled kernels off
(``arith._COMPILED = False``: every PA op on its pure-torch definition, which test_arith checks
against the float64 reference), so the kernel is compared with an independent composition."""
import math

import pytest
import torch

import pamtorch
from pamtorch import Config, OpConfig, arith
from pamtorch.kernels import cpu
from pamtorch.ops import optim as O
from pamtorch.ops.table import OPTIMIZER_STEP
from pamtorch.recording import RECORDERS

EXT = cpu.load_extension()
pytestmark = pytest.mark.skipif(EXT is None, reason="compiled CPU kernels unavailable")
aten = torch.ops.aten

SPECIALS = [0.0, -0.0, 1e-40, -1e-40, 2.0 ** -149, -(2.0 ** -126), 2.0 ** -126, math.inf, -math.inf,
            math.nan, -math.nan, 3.4028234663852886e38, -3.4028234663852886e38, 1.0, -1.0, 1e-20, -1e-20,
            1e20, 0.5, 2.0, 1e-8, 1e-16]


def values(n, seed, positive=False):
    """Random bit patterns (every exponent, NaN payloads quiet and signalling, subnormals), the
    special values, and ordinary N(0, 1) values; ``positive``: the sign bit cleared but for
    the specials (a second moment)."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-2 ** 31, 2 ** 31, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    if positive:
        bits &= 0x7FFFFFFF
    normal = torch.randn(n, generator=g)
    x = torch.cat([bits.view(torch.float32), torch.tensor(SPECIALS, dtype=torch.float32),
                   normal.abs() if positive else normal])
    return x[torch.randperm(x.numel(), generator=g)]


def same_bits(x, y, what=""):
    assert x.dtype == y.dtype and x.shape == y.shape
    ints = torch.int32 if x.element_size() == 4 else torch.int16
    a, b = x.contiguous().view(ints), y.contiguous().view(ints)
    bad = a != b
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} differ, e.g. "
                           f"{[hex(int(v) & 0xFFFFFFFF) for v in a[bad][:4]]} vs "
                           f"{[hex(int(v) & 0xFFFFFFFF) for v in b[bad][:4]]}")


def _spy(monkeypatch, name):
    """The calls of the extension's kernel ``name``, each as the number of tensors it updated."""
    seen = []
    real = getattr(EXT, name)

    def spy(*a):
        seen.append(len(a[0]))
        return real(*a)
    monkeypatch.setattr(EXT, name, spy)
    return seen


@pytest.fixture
def calls(monkeypatch):
    """The calls of the float32 kernel."""
    return _spy(monkeypatch, "optim_adam_step")


def state(sizes, seed, nan_moments=True):
    """params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs (random bit patterns) per size."""
    out = [[], [], [], [], []]
    for j, n in enumerate(sizes):
        for k, lst in enumerate(out):
            positive = k >= 3 and not nan_moments
            lst.append(values(n, 1000 * seed + 10 * j + k, positive=positive)[:n].clone())
    return out


def fused_call(adamw, tensors, steps, cfg=OpConfig(), in_step=True, **hyper):
    """``_pa_fused_adam`` on copies of ``tensors``, as the mode calls it (inside an optimizer
    step unless ``in_step`` is False); returns the updated copies."""
    ts = [[torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t) for t in lst] for lst in tensors]
    kwargs = dict(amsgrad=False, maximize=False, grad_scale=None, found_inf=None)
    kwargs.update(hyper)
    func = aten._fused_adamw_.default if adamw else aten._fused_adam_.default
    OPTIMIZER_STEP[0] += in_step
    try:
        O._pa_fused_adam(func, (*ts, [torch.tensor(float(t)) for t in steps]), kwargs, cfg)
    finally:
        OPTIMIZER_STEP[0] -= in_step
    return ts


def loop(*args, **kwargs):
    """The Python loop on pure-torch PA ops (every compiled kernel off)."""
    old = arith._COMPILED
    arith._COMPILED = False
    try:
        return fused_call(*args, **kwargs)
    finally:
        arith._COMPILED = old


def check(adamw, tensors, steps, what, **hyper):
    want = loop(adamw, tensors, steps, **hyper)
    got = fused_call(adamw, tensors, steps, **hyper)
    for name, w, g in zip(("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), want, got):
        for i, (a, b) in enumerate(zip(g, w)):
            same_bits(a, b, f"{what} {name}[{i}]")
    return got


# hyperparameters that take every form: the weight decay PAM'd by ~1 (near form), by exactly
# 1.0 (lr·wd below the float64 epsilon), by a negative factor near -1; 1 - beta1 and beta2
# near 1 or not; 1 - beta2 = 1 (scale by 1: the tensor itself); the bias correction's square
# root a PAD (t = 1, beta2 = 0.999) or near 1; the step size near -1 (NEAR_NEG) or small
HYPER = {
    "default": dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8),
    "near": dict(lr=0.6, beta1=0.3, beta2=0.6, weight_decay=1.2, eps=1e-6),
    "neg-decay": dict(lr=1.0, beta1=0.5, beta2=0.75, weight_decay=2.5, eps=0.0),
    "tiny-decay": dict(lr=1e-9, beta1=0.0, beta2=0.0, weight_decay=1e-9, eps=1e-8),
    "no-decay": dict(lr=torch.tensor(3e-4), beta1=0.9, beta2=0.95, weight_decay=0.0, eps=1e-8),
}


@pytest.mark.parametrize("adamw", [True, False], ids=["adamw", "adam"])
@pytest.mark.parametrize("hyper", list(HYPER), ids=list(HYPER))
def test_kernel_matches_loop_bit_for_bit(calls, adamw, hyper):
    """Random bit patterns (NaN against NaN of other payloads, infinities, subnormals) in
    params, grads and moments, three steps in a row; the tensors' step counts differ (one
    row of forms per count)."""
    assert O._nan_rule(), "torch's CPU add picks NaNs otherwise than the kernel: it never runs"
    tensors = state([2000, 3, 1], seed=len(hyper) + adamw)
    for maximize in (False, True):
        ts = tensors
        for step in range(3):
            steps = [1 + step, 7 + step, 1000 + step]
            ts = check(adamw, ts, steps, f"{hyper} maximize={maximize} step {step}", maximize=maximize,
                       **HYPER[hyper])
            g = torch.Generator().manual_seed(step)
            ts[1] = [t[torch.randperm(t.numel(), generator=g)] for t in ts[1]]  # new grads
    assert calls == [3] * 6


def test_kernel_outside_an_optimizer_step_and_ordinary_values(calls):
    """Outside ``Optimizer.step`` every product with a number is a plain PAM/PAD; ordinary
    values over many steps (state from the kernel itself), one tensor split across threads."""
    tensors = state([70_000, 5], seed=3)
    check(True, tensors, [1, 1], "outside a step", in_step=False, **HYPER["near"])
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(70_000, generator=g), torch.randn(33, generator=g)]
    ts = [ps, [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
          [torch.zeros_like(p) for p in ps], []]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for t in range(1, 6):
            ts[1] = [torch.randn(p.shape, generator=g) for p in ps]
            ts = check(t % 2 == 0, ts, [t, t], f"step {t}", **HYPER["default"])
    finally:
        torch.set_num_threads(threads)
    assert torch.isfinite(torch.cat(ts[0])).all()
    assert calls == [2] * 6


def values16(n, seed, dtype, positive=False):
    """:func:`values` for a 16-bit dtype: random 16-bit patterns (every exponent, NaN payloads,
    subnormals), the special values rounded to the dtype, N(0, 1) values."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-2 ** 15, 2 ** 15, (n,), generator=g, dtype=torch.int32).to(torch.int16)
    if positive:
        bits &= 0x7FFF
    normal = torch.randn(n, generator=g)
    x = torch.cat([bits.view(dtype), torch.tensor(SPECIALS).to(dtype), (normal.abs() if positive else normal).to(dtype)])
    return x[torch.randperm(x.numel(), generator=g)][:n].clone()


@pytest.fixture
def lowp_calls(monkeypatch):
    """The calls of the 16-bit kernel."""
    return _spy(monkeypatch, "optim_adam_step_lowp")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("adamw", [True, False], ids=["adamw", "adam"])
@pytest.mark.parametrize("hyper", list(HYPER), ids=list(HYPER))
def test_lowp_kernel_matches_loop_bit_for_bit(lowp_calls, dtype, adamw, hyper):
    """The 16-bit update (``optim_adam_step_lowp``) against the Python loop on pure-torch PA
    ops: random 16-bit patterns in params, grads and moments, maximize or not, three steps
    with different step counts per tensor, inside an optimizer step and outside one."""
    tensors = [[values16(n, 100 * k + n, dtype, positive=k == 3) for n in (700, 3, 1)] for k in range(4)] + [[]]
    for maximize in (False, True):
        ts = tensors
        for step in range(3):
            steps = [1 + step, 7 + step, 1000 + step]
            ts = check(adamw, ts, steps, f"{dtype} {hyper} maximize={maximize} step {step}", maximize=maximize,
                       in_step=step != 1, **HYPER[hyper])
            g = torch.Generator().manual_seed(step)
            ts[1] = [t[torch.randperm(t.numel(), generator=g)] for t in ts[1]]  # new grads
    assert lowp_calls == [3] * 6


def test_mixed_dtypes_each_take_their_kernel(calls, lowp_calls):
    """One fused call over float32, bfloat16 and float16 tensors (torch groups by dtype, a
    direct call need not): each dtype's tensors take their kernel, with the loop's bits."""
    f32 = state([40, 5], seed=8, nan_moments=False)
    bf = [[values16(n, 7 * k + n, torch.bfloat16, positive=k == 3) for n in (30, 2)] for k in range(4)] + [[]]
    hf = [[values16(n, 9 * k + n, torch.float16, positive=k == 3) for n in (20,)] for k in range(4)] + [[]]
    mixed = [a + b + c for a, b, c in zip(f32, bf, hf)]
    check(True, mixed, [2, 3, 4, 5, 6], "mixed", **HYPER["default"])
    assert calls == [2] and lowp_calls == [2, 1]


def test_lowp_kernel_rejects_bad_arguments():
    p = torch.zeros(4, dtype=torch.bfloat16)
    c = [torch.tensor(0.5, dtype=torch.bfloat16)] * 6
    table = torch.zeros(1 << 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"params\[0\] must be a bfloat16 or float16 CPU tensor"):
        EXT.optim_adam_step_lowp([p.float()], [p], [p], [p], [1] * 6, c, 1e-8, table, True, False)
    with pytest.raises(RuntimeError, match=r"the state of params\[0\] must be CPU tensors of its dtype"):
        EXT.optim_adam_step_lowp([p], [p.half()], [p], [p], [1] * 6, c, 1e-8, table, True, False)
    with pytest.raises(RuntimeError, match="6 entries per tensor"):
        EXT.optim_adam_step_lowp([p], [p], [p], [p], [1] * 5, c, 1e-8, table, True, False)
    with pytest.raises(RuntimeError, match="form kind must be"):
        EXT.optim_adam_step_lowp([p], [p], [p], [p], [1, 5, 1, 1, 1, 1], c, 1e-8, table, True, False)
    with pytest.raises(RuntimeError, match="0-d tensors of the parameters' dtype"):
        EXT.optim_adam_step_lowp([p], [p], [p], [p], [1] * 6, [c[0].float()] * 6, 1e-8, table, True, False)
    with pytest.raises(RuntimeError, match="'sqrt_table' must be a contiguous CPU tensor of 65536"):
        EXT.optim_adam_step_lowp([p], [p], [p], [p], [1] * 6, c, 1e-8, table[:10], True, False)


def test_fallbacks(calls):
    """amsgrad, an offset, narrow mantissas and a listening audit recorder run the Python
    loop; a non-contiguous tensor goes to the loop, the others to the kernel; bfloat16
    tensors take the 16-bit kernel, not the float32 one."""
    tensors = state([50, 7], seed=5)
    ok = state([50, 7], seed=6, nan_moments=False)
    check(True, ok, [2, 2], "amsgrad", amsgrad=True, **HYPER["default"])
    for cfg in (OpConfig(offset=1.0552), OpConfig(mantissa_bits=10)):
        got = fused_call(True, tensors, [2, 2], cfg=cfg, **HYPER["default"])
        same_bits(torch.cat(got[0]), torch.cat(loop(True, tensors, [2, 2], cfg=cfg, **HYPER["default"])[0]), str(cfg))
    check(False, [[t.bfloat16() for t in lst] for lst in ok], [3, 3], "bfloat16", **HYPER["default"])

    class Listener:
        def kernel(self, *a):
            pass

        def routed(self, *a):
            pass
    RECORDERS.append(Listener())
    try:
        check(False, tensors, [1, 1], "recorder", **HYPER["default"])
    finally:
        RECORDERS.pop()
    assert calls == []
    strided = [[t.clone() for t in lst] for lst in tensors]
    strided[2][0] = torch.stack([strided[2][0], strided[2][0]], 1)[:, 0]  # exp_avg[0] strided
    assert not strided[2][0].is_contiguous()
    check(True, strided, [4, 4], "strided", **HYPER["default"])
    assert calls == [1]


def test_kernel_rejects_bad_arguments():
    p = torch.zeros(4)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] must be a contiguous float32 CPU tensor"):
        EXT.optim_adam_step([p], [p.clone()], [p.double()], [p.clone()], [1, 0] * 6 + [0], True, False)
    with pytest.raises(RuntimeError, match=r"grads\[0\] has 3 elements, params\[0\] has 4"):
        EXT.optim_adam_step([p], [torch.zeros(3)], [p.clone()], [p.clone()], [1, 0] * 6 + [0], True, False)
    with pytest.raises(RuntimeError, match="13 integers per tensor"):
        EXT.optim_adam_step([p], [p.clone()], [p.clone()], [p.clone()], [1, 0], True, False)
    with pytest.raises(RuntimeError, match="only the weight-decay form may be SKIP"):
        EXT.optim_adam_step([p], [p.clone()], [p.clone()], [p.clone()], [1, 0] + [5, 0] * 5 + [0], True, False)


# ---------------------------------------------------------------------------- stock optimizers

def train(cls, steps=4, config=None, leave_exact=(), mode=True, dtype=torch.float32, **kw):
    """A few steps of ``cls`` on three parameters (under the mode): params and moments."""
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in [(9, 5), (33,), (1,)]]
    ps[0].data[0, :3] = torch.tensor([0.0, 1e-40, -2.0 ** -126])
    opt = cls([{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}], lr=1e-2, weight_decay=0.1, **kw)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        if mode:
            with pamtorch.mode(config, leave_exact=leave_exact):
                opt.step()
        else:
            opt.step()
        assert [grp["fused"] for grp in opt.param_groups] == [kw.get("fused")] * 2  # the user's setting
    return torch.cat([p.detach().flatten() for p in ps] +
                     [opt.state[p][k].flatten() for p in ps for k in ("exp_avg", "exp_avg_sq")])


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam])
def test_stock_paths_agree_and_the_default_reaches_the_kernel(calls, cls):
    """Under the mode, foreach=None (switched to the fused path for the step, the kernel),
    foreach=False (single-tensor ops), foreach=True and fused=True give the same bits, as
    does ``pamtorch.optim``'s class; maximize too."""
    pa_cls = {torch.optim.AdamW: pamtorch.optim.AdamW, torch.optim.Adam: pamtorch.optim.Adam}[cls]
    for extra in ({}, {"maximize": True}):
        default = train(cls, **extra)
        assert calls == [2, 1] * 4
        for kw in ({"foreach": False}, {"foreach": True}, {"fused": True}):
            same_bits(train(cls, **kw, **extra), default, f"{cls.__name__} {kw} {extra}")
        calls.clear()
        # pamtorch.optim's class, stepped outside any mode, reaches the kernel too
        same_bits(train(pa_cls, mode=False, **extra), default, f"pamtorch.optim.{cls.__name__}")
        assert calls == [2, 1] * 4
        calls.clear()
        # and inside the user's mode (its step hook switches first; the class's own switch is a no-op)
        same_bits(train(pa_cls, **extra), default, f"pamtorch.optim.{cls.__name__} under the mode")
        assert calls == [2, 1] * 4
        calls.clear()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam])
def test_16_bit_default_path_reaches_the_16_bit_kernel_with_the_users_bits(lowp_calls, calls, cls, dtype):
    """bfloat16/float16 parameters on torch's default path are switched to the fused op
    too, whose update is the 16-bit kernel; foreach=False, foreach=True and fused=True give
    the same bits under the mode, maximize too."""
    for extra in ({}, {"maximize": True}):
        default = train(cls, dtype=dtype, **extra)
        assert lowp_calls == [2, 1] * 4 and calls == []
        for kw in ({"foreach": False}, {"foreach": True}, {"fused": True}):
            same_bits(train(cls, dtype=dtype, **kw, **extra), default, f"{cls.__name__} {dtype} {kw} {extra}")
        lowp_calls.clear()


def test_switch_only_where_the_fused_path_is_the_kernel(calls):
    """Not switched (the user's path runs): explicit foreach, amsgrad, an exact optimizer
    kind (torch's own fused kernel would round otherwise), an offset, anything left exact,
    float64 parameters, a tensor lr, other optimizers, an audit listening."""
    exact = train(torch.optim.AdamW, mode=False)
    same_bits(train(torch.optim.AdamW, config=Config(optimizer=OpConfig(pa=False))), exact, "exact kind")
    assert not torch.equal(exact, train(torch.optim.AdamW, mode=False, fused=True))  # what a switch would do
    train(torch.optim.AdamW, amsgrad=True)
    train(torch.optim.AdamW, foreach=False)
    train(torch.optim.AdamW, config=Config(optimizer=OpConfig(offset=1.0552)))
    train(torch.optim.AdamW, leave_exact=("softmax",))
    assert calls == []
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    for opt in (torch.optim.AdamW([p]), torch.optim.SGD([p], lr=0.1)):
        assert O.fused_adam_groups(opt, Config.paper()) == []
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=torch.tensor(0.1))
    assert O.fused_adam_groups(opt, Config.paper()) == []
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    RECORDERS.append(object())  # an audit listens: it reports the user's path
    try:
        assert O.fused_adam_groups(opt, Config.paper()) == []
    finally:
        RECORDERS.pop()
    assert O.fused_adam_groups(opt, Config.paper()) == opt.param_groups and opt.param_groups[0]["fused"]
    O.restore_groups(opt.param_groups)
    assert opt.param_groups[0]["fused"] is None


def test_a_raising_step_leaves_the_users_setting(calls):
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = torch.optim.AdamW([p])

    def boom(opt, args, kwargs):
        assert opt.param_groups[0]["fused"] is True  # the mode's pre hook ran first
        raise RuntimeError("boom")
    h = opt.register_step_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        with pamtorch.mode():
            opt.step()
    h.remove()
    assert opt.param_groups[0]["fused"] is None and calls == []


def test_pamtorch_optim_alone_reaches_the_kernel():
    """In a process that never built a stock Adam/AdamW, torch has wrapped only
    ``pamtorch.optim``'s own ``step`` with the step hooks, which so fire before the class
    enters its mode: the class switches to the fused path itself."""
    import subprocess
    import sys

    code = """
import torch, pamtorch
from pamtorch.kernels import cpu
ext, seen = cpu.load_extension(), []
real = ext.optim_adam_step
ext.optim_adam_step = lambda *a: seen.append(len(a[0])) or real(*a)
for cls in (pamtorch.optim.AdamW, pamtorch.optim.Adam):
    ps = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = cls(ps, lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(p.shape)
        opt.step()
    assert [g["fused"] for g in opt.param_groups] == [None]
print(seen)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[2, 2, 2, 2]"
