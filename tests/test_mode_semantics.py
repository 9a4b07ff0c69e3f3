"""Semantics of the ops the mode routes, in the spirit of PyTorch's OpInfo tests.

Two parts:

* generic, for every op in ``OP_TABLE`` at test time: stock torch code (``SAMPLES``) runs
  under the mode and every routed aten call is recorded; each recorded call is replayed
  and checked against torch's own semantics: the result's structure, shapes and dtypes
  are torch's; no output aliases an input unless torch's does; non-contiguous inputs give
  the same bits; the ``.out`` overload writes the same bits into ``out`` (resized from
  empty) and returns it; the in-place overload writes them into its first argument and
  returns it. An op that no sample reaches is skipped, naming it; the ops the mode routed
  before issue 10 must all be reached.
* specific: results against the float64 PA reference (``tests/reference.py``,
  ``tests/pam_checks.py``) with broadcasting, non-contiguous and empty inputs and dtype
  promotion; torch's errors for bad shapes and dtypes; and the regressions of issue 10.
"""
import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import reference as R
from pam_checks import check_close, mm_reference
from pamtorch import arith
from pamtorch.config import Config
from pamtorch.mode import RECORDERS, mode
from pamtorch.ops import OP_TABLE
from pamtorch.ops.table import out_names

aten = torch.ops.aten
CFG = Config.full()


def rnd(*shape, seed=0, lo=None):
    """Seeded float32 values in [-2, 2) (or [lo, lo + 4) when lo is given)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=g) * 4
    return x + lo if lo is not None else x - 2


def param(*shape, seed=0):
    return rnd(*shape, seed=seed).requires_grad_(True)


# ---------------------------------------------------------------------------
# samples: stock torch code that reaches the routed aten ops, forward and backward

def _elementwise():
    a, b, p = rnd(3, 4), rnd(3, 4, seed=1), rnd(3, 4, seed=2, lo=0.25)
    outs = [a * b, a * 2.5, a / b, a / 3.0, torch.div(a, b, rounding_mode="floor"), p.sqrt(), p.rsqrt(),
            a.exp(), p.log(), a.exp2(), p.log2(), p.reciprocal(), p ** 2.5, 2.0 ** a,
            torch.addcmul(a, b, p, value=0.5), torch.addcdiv(a, b, p, value=2.0), torch.lerp(a, b, 0.25),
            torch.lerp(a, b, p), a.mean(), a.mean(1, keepdim=True), torch.linalg.vector_norm(a),
            torch.add(a, b, alpha=0.5), torch.sub(a, b, alpha=3.0), torch.rsub(a, b, alpha=2.0),
            torch.xlogy(p, b), torch.sgn(a), torch.index_add(a, 0, torch.tensor([2, 0]), b[:2], alpha=0.5)]
    for name, arg in [("mul_", b), ("div_", p), ("sqrt_", None), ("rsqrt_", None), ("exp_", None),
                      ("exp2_", None), ("log_", None), ("log2_", None), ("reciprocal_", None), ("pow_", 2.0),
                      ("xlogy_", p), ("sgn_", None), ("sigmoid_", None), ("tanh_", None), ("sin_", None),
                      ("cos_", None), ("erf_", None)]:
        x = p.clone()
        outs.append(getattr(x, name)(*([] if arg is None else [arg])))
    x = p.clone()
    outs += [x.addcmul_(a, b, value=0.5), x.addcdiv_(a, p), x.lerp_(b, 0.5), x.add_(a, alpha=0.5),
             x.sub_(b, alpha=0.25), x.index_add_(0, torch.tensor([1]), a[:1], alpha=2.0)]
    return outs


def _dropout():
    torch.manual_seed(0)
    x = param(3, 4)
    y, _ = torch.native_dropout(x, 0.5, True)
    y.sum().backward()
    return [y]


def _products():
    a, b, v = param(3, 4), param(4, 5, seed=1), param(4, seed=2)
    c = param(5, seed=3)
    outs = [torch.mm(a, b), torch.addmm(c, a, b, beta=0.5, alpha=2.0), torch.mv(a, v), torch.dot(v, v),
            torch.bmm(a[None], b[None]), torch.baddbmm(c[None, None], a[None], b[None], alpha=0.5),
            F.linear(a, b.t(), c)]
    sum(o.sum() for o in outs).backward()
    x = rnd(3, 5)
    x.addmm_(a.detach(), b.detach(), beta=0.5)
    y = rnd(1, 3, 5)
    y.baddbmm_(a.detach()[None], b.detach()[None])
    return outs


def _activations():
    h = param(2, 4, 3, 3)
    acts = [F.gelu, F.silu, torch.sigmoid, torch.tanh, F.elu, F.celu, F.leaky_relu, F.hardswish,
            F.hardsigmoid, F.mish, F.softplus, F.logsigmoid, torch.sin, torch.cos, torch.erf,
            lambda t: F.glu(t, 1), lambda t: F.prelu(t, torch.full((4,), 0.25))]
    out = sum(act(h).sum() for act in acts)
    out.backward()
    inplace = [F.elu, F.celu, F.leaky_relu, F.hardswish, F.hardsigmoid, F.mish, F.silu]
    return [out] + [act(h.detach().clone(), inplace=True) for act in inplace]


def _convolutions():
    x = param(2, 4, 6, 6)
    ws = [(F.conv2d, param(3, 4, 3, 3), dict(padding=1)), (F.conv2d, param(4, 1, 3, 3), dict(groups=4)),
          (F.conv2d, param(3, 4, 2, 2), dict(dilation=2, stride=2)),
          (F.conv_transpose2d, param(4, 3, 3, 3), dict(stride=2)),
          (lambda t, w, **k: F.conv1d(t[:, :, 0], w, **k), param(3, 4, 3), {}),
          (lambda t, w, **k: F.conv3d(t[:, :, None], w, **k), param(3, 4, 1, 3, 3), {})]
    outs = [conv(x, w, **kw) for conv, w, kw in ws]
    sum(o.sum() for o in outs).backward()
    return outs


def _norms_and_pooling():
    torch.manual_seed(0)
    x = param(2, 4, 6, 6)
    bn, gn, ln = torch.nn.BatchNorm2d(4), torch.nn.GroupNorm(2, 4), torch.nn.LayerNorm(6)
    outs = [bn(x), gn(x), ln(x), F.rms_norm(x, (6,), torch.ones(6)), F.avg_pool2d(x, 2),
            F.adaptive_avg_pool2d(x, 4), F.interpolate(x, scale_factor=2, mode="bilinear"),
            F.interpolate(x, size=(5, 5), mode="bicubic"), F.interpolate(x[:, :, 0], scale_factor=2, mode="linear"),
            F.avg_pool3d(x[:, None], 2), F.adaptive_avg_pool3d(x[:, None], 2),
            F.interpolate(x[:, None], scale_factor=2, mode="trilinear")]
    sum(o.sum() for o in outs).backward()
    bn.eval()
    outs.append(bn(x.detach()))
    outs += list(torch.var_mean(x.detach(), 1)) + list(torch.std_mean(x.detach(), (2, 3)))
    return outs


def _attention_and_losses():
    torch.manual_seed(0)
    seq = param(2, 3, 4)
    attn = torch.nn.MultiheadAttention(4, 2, batch_first=True)
    y, _ = attn(seq, seq, seq, need_weights=False)
    q = y.reshape(2, 3, 2, 2).transpose(1, 2)
    z = F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(2, 3, 4)
    # the fused CPU attention as C++ callers reach it (nn.MultiheadAttention is routed above it)
    z = z + torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q)[0].transpose(1, 2).reshape(2, 3, 4)
    logits = torch.nn.Linear(4, 5)(z + y).reshape(6, 5)
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = (F.cross_entropy(logits, target) + F.mse_loss(logits, logits.detach() * 0.5)
            + F.smooth_l1_loss(logits, logits.detach().flip(0)) + F.huber_loss(logits, logits.detach().flip(1))
            + F.binary_cross_entropy_with_logits(logits, torch.rand(6, 5))
            + F.binary_cross_entropy(torch.sigmoid(logits), torch.rand(6, 5))
            + F.nll_loss(F.log_softmax(logits, 1), target) + F.softmax(logits, 1).var()
            + torch.logsumexp(logits, 1).std()
            + F.cross_entropy(logits.reshape(1, 5, 2, 3), target.reshape(1, 2, 3)))
    loss.backward()
    return [loss]


def _embeddings():
    w = param(10, 4)
    idx, offsets = torch.tensor([1, 2, 4, 5, 4, 9]), torch.tensor([0, 3])
    outs = [F.embedding_bag(idx, w, offsets, mode="mean"),
            F.embedding_bag(idx, w, offsets, mode="sum", per_sample_weights=rnd(6, seed=1)),
            F.embedding(idx, w, scale_grad_by_freq=False)]
    sum(o.sum() for o in outs).backward()
    return outs


FOREACH = [("mul", lambda xs, ys: (ys,), {}), ("mul", lambda xs, ys: (1.5,), {}), ("div", lambda xs, ys: (ys,), {}),
           ("div", lambda xs, ys: (2.0,), {}), ("add", lambda xs, ys: (ys,), dict(alpha=0.5)),
           ("sub", lambda xs, ys: (ys,), dict(alpha=0.5)), ("pow", lambda xs, ys: (2.0,), {}),
           ("lerp", lambda xs, ys: (ys, 0.25), {}), ("addcmul", lambda xs, ys: (ys, ys), dict(value=0.5)),
           ("addcdiv", lambda xs, ys: (ys, ys), dict(value=0.5))] + \
    [(name, lambda xs, ys: (), {}) for name in ("sqrt", "rsqrt", "reciprocal", "exp", "log", "log2")]


def _foreach():
    xs, ys = [rnd(3, lo=0.25), rnd(2, 2, seed=1, lo=0.25)], [rnd(3, seed=2, lo=0.25), rnd(2, 2, seed=3, lo=0.25)]
    outs = [torch._foreach_norm(xs), torch._foreach_pow(2.0, xs)]
    for name, extra, kw in FOREACH:
        for suffix in ("", "_"):
            fn = getattr(torch, f"_foreach_{name}{suffix}")
            mine = [x.clone() for x in xs]
            r = fn(mine, *extra(xs, ys), **kw)
            outs += mine if r is None else r
    return outs


def _optimizers():
    outs = []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
                 lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, foreach=True),
                 lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False),
                 lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
                 lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
                 lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True),
                 lambda ps: torch.optim.Adagrad(ps, lr=1e-2, fused=True)):
        ps = [param(3, 4), param(4)]
        opt = make(ps)
        for _ in range(2):
            opt.zero_grad()
            (ps[0].sum() * 2.0 + (ps[1] ** 2).sum()).backward()
            torch.nn.utils.clip_grad_norm_(ps, 0.5)
            opt.step()
        outs += ps
    return outs


SAMPLES = {f.__name__[1:]: f for f in (_elementwise, _dropout, _products, _activations, _convolutions,
                                        _norms_and_pooling, _attention_and_losses, _embeddings, _foreach,
                                        _optimizers)}

# the ops the mode routed before issue 10: each must be reached by a sample
CORE = [aten.mul, aten.mul_, aten.div, aten.div_, aten.addcmul, aten.addcmul_, aten.addcdiv,
        aten.addcdiv_, aten.lerp, aten.lerp_, aten.sqrt, aten.sqrt_, aten.rsqrt, aten.exp, aten.exp_,
        aten.log, aten.exp2, aten.log2, aten.reciprocal, aten.pow, aten.pow_, aten.add,
        aten.add_, aten.sub, aten.mean, aten.linalg_vector_norm, aten.native_dropout,
        aten.native_dropout_backward, aten._foreach_norm, aten._foreach_mul, aten._foreach_mul_,
        aten._foreach_div_, aten._foreach_addcmul_, aten._foreach_addcdiv_, aten._foreach_lerp_,
        aten._foreach_sqrt, aten._foreach_add_, aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.mv,
        aten.dot, aten.convolution, aten.convolution_backward, aten.gelu, aten.gelu_backward,
        aten.native_layer_norm, aten.native_layer_norm_backward, aten._log_softmax,
        aten._log_softmax_backward_data, aten.nll_loss_forward, aten.nll_loss_backward, aten.mse_loss,
        aten.mse_loss_backward, aten._softmax, aten._softmax_backward_data,
        aten._scaled_dot_product_flash_attention_for_cpu]

PER_OVERLOAD = 2  # recorded calls kept per aten overload


def _detached(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_detached(y) for y in x)
    return x


class _Recorder:
    def __init__(self):
        self.calls = {}

    def routed(self, func, args, kwargs, out):
        kept = self.calls.setdefault(func, [])
        if len(kept) < PER_OVERLOAD:
            kept.append((_detached(args), _detached(kwargs)))

    def kernel(self, name, kind, n, inside):
        """PA entry points report here too; only the routed aten calls matter here."""


@functools.lru_cache(maxsize=None)
def recorded():
    """({aten overload: [(args, kwargs)]} of every routed call the samples make,
    {sample: the error it raised under the mode})."""
    rec, errors = _Recorder(), {}
    RECORDERS.append(rec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, sample in SAMPLES.items():
                try:
                    with mode(CFG):
                        sample()
                except Exception as e:  # reported by test_every_sample_runs_under_the_mode
                    errors[name] = f"{type(e).__name__}: {e}"
    finally:
        RECORDERS.remove(rec)
    return rec.calls, errors


# ---------------------------------------------------------------------------
# the generic checks of one recorded call

def tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in tensors(y)]
    if isinstance(x, dict):
        return [t for y in x.values() for t in tensors(y)]
    return []


def same_values(a, b, what, sums=False):
    """Equal bit for bit (NaN equal); with ``sums``, up to float32 reassociation of the
    sums inside (torch's own reductions depend on the memory layout): 2^-16 of the
    tensor's largest magnitude."""
    ta, tb = tensors(a), tensors(b)
    assert len(ta) == len(tb), what
    for x, y in zip(ta, tb):
        assert x.shape == y.shape and x.dtype == y.dtype, f"{what}: {x.shape}/{x.dtype} vs {y.shape}/{y.dtype}"
        atol = 0.0
        if sums and x.is_floating_point() and torch.isfinite(y).any():
            atol = 2.0 ** -16 * float(y[torch.isfinite(y)].abs().max())
        torch.testing.assert_close(x, y, rtol=0, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def fresh(args, kwargs):
    return _detached(args), _detached(kwargs)


def noncontiguous(x):
    """The same values in a layout with gaps (every float tensor of rank >= 1 with elements;
    index tensors stay, some torch kernels read them as contiguous)."""
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 1 and x.numel() > 0:
        wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)[..., ::2]
        return wide.copy_(x)
    if isinstance(x, (list, tuple)):
        return type(x)(noncontiguous(y) for y in x)
    if isinstance(x, dict):
        return {k: noncontiguous(v) for k, v in x.items()}
    return x


def run(func, args, kwargs, under_mode=True):
    torch.manual_seed(0)  # dropout draws the same mask every time
    if not under_mode:
        return func(*args, **kwargs)
    with mode(CFG):
        return func(*args, **kwargs)


def aliases(out, args, kwargs):
    """For each output tensor, the set of input tensor positions it shares memory with."""
    ins = [t.untyped_storage().data_ptr() if t.numel() else None for t in tensors((args, kwargs))]
    return [{i for i, p in enumerate(ins) if p is not None and t.numel() and p == t.untyped_storage().data_ptr()}
            for t in tensors(out)]


def out_overload(func):
    """The ``.out`` overload with the same non-out arguments as ``func``, or None."""
    sig = [(a.name, str(a.type)) for a in func._schema.arguments]
    packet = func.overloadpacket
    for name in packet.overloads():
        g = getattr(packet, name)
        if out_names(g) and [(a.name, str(a.type)) for a in g._schema.arguments if not a.is_out] == sig:
            return g
    return None


def inplace_overload(func):
    """The in-place variant (``mul_.Tensor`` for ``mul.Tensor``) if the mode routes it."""
    packet = getattr(aten, func.overloadpacket.__name__ + "_", None)
    if packet is None or packet not in OP_TABLE:
        return None
    return getattr(packet, func._overloadname, None)


def check_call(func, args, kwargs) -> bool:
    """Check one recorded call against torch's semantics; False when eager CPU torch
    cannot run it (there is nothing to compare with)."""
    what = str(func)
    a, k = fresh(args, kwargs)
    try:
        want = run(func, a, k, under_mode=False)
    except (RuntimeError, NotImplementedError):
        return False
    eager_alias = aliases(want, a, k)
    a, k = fresh(args, kwargs)
    got = run(func, a, k)
    # torch's structure, shapes and dtypes
    wt, gt = tensors(want), tensors(got)
    assert len(wt) == len(gt), what
    for w, g in zip(wt, gt):
        assert (g.shape, g.dtype) == (w.shape, w.dtype), f"{what}: got {g.shape}/{g.dtype}, torch {w.shape}/{w.dtype}"
    # a new tensor unless torch aliases an input
    assert aliases(got, a, k) == eager_alias, f"{what}: output aliasing differs from torch"
    inplace = func._schema.is_mutable
    # non-contiguous inputs: the same bits
    if not inplace:
        a, k = fresh(args, kwargs)
        same_values(run(func, noncontiguous(a), noncontiguous(k)), got, f"{what} non-contiguous", sums=True)
    # the .out overload writes the same bits into out (resized from empty) and returns it
    g_out = None if inplace else out_overload(func)
    if g_out is not None:
        a, k = fresh(args, kwargs)
        names = out_names(g_out)
        slots = list(got) if isinstance(got, (list, tuple)) else [got]  # None: not computed
        empty = [torch.empty(0, dtype=t.dtype if t is not None else torch.float32) for t in slots]
        listed = str(next(x.type for x in g_out._schema.arguments if x.is_out)).startswith("List")
        outs = {names[0]: empty} if listed else dict(zip(names, empty))
        ret = run(g_out, a, {**k, **outs})
        written = [o for o, t in zip(empty, slots) if t is not None]
        same_values(written, gt, f"{g_out} writes out")
        if ret is not None:
            assert all(r is o for r, o in zip(tensors(ret), empty)), f"{g_out} must return its out tensors"
    # the in-place variant writes the same bits into its first argument and returns it
    g_in = None if inplace else inplace_overload(func)
    if g_in is not None and isinstance(args[0], torch.Tensor) and gt[0].shape == args[0].shape \
            and gt[0].dtype == args[0].dtype:
        a, k = fresh(args, kwargs)
        ret = run(g_in, a, k)
        assert ret is a[0], f"{g_in} must return its first argument"
        same_values(a[0], gt[0], f"{g_in} in place")
    return True


ROUTED = sorted(OP_TABLE, key=str)


def test_every_sample_runs_under_the_mode():
    assert recorded()[1] == {}


@pytest.mark.parametrize("packet", ROUTED, ids=str)
def test_routed_op_follows_torch_semantics(packet):
    calls = [(f, c) for f, cs in recorded()[0].items() if f.overloadpacket is packet for c in cs]
    if not calls:
        pytest.skip(f"no sample in SAMPLES reaches {packet}")
    checked = [check_call(func, args, kwargs) for func, (args, kwargs) in calls]
    if not any(checked):
        pytest.skip(f"eager CPU torch does not run the recorded calls of {packet}")


def test_every_op_routed_before_issue_10_is_reached_by_a_sample():
    reached = {f.overloadpacket for f in recorded()[0]}
    missing = [str(p) for p in CORE if p not in reached]
    assert not missing, f"no sample reaches {missing}"


# ---------------------------------------------------------------------------
# results against the float64 PA reference: broadcasting, non-contiguous and empty inputs,
# dtype promotion

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def pa(fn):
    with mode(CFG):
        return fn()


def want_binary(ref, a, b):
    """The reference of ``a op b`` in torch's result dtype; a Python scalar is first
    rounded to that dtype, as the mode's promotion does."""
    dtype = torch.result_type(a, b)
    a64, b64 = (R.to_f64(t) if torch.is_tensor(t) else float(torch.tensor(t, dtype=dtype)) for t in (a, b))
    return R.round_to(ref(a64, b64, dtype), dtype)


def exact(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def layouts(dtype):
    """Operand pairs: same shape, broadcast, non-contiguous (transposed, strided), empty,
    0-d with a tensor, tensor with a Python scalar."""
    a, b = rnd(4, 6).to(dtype), rnd(4, 6, seed=1).to(dtype)
    at, bs = rnd(6, 4, seed=2).to(dtype).t(), rnd(4, 12, seed=3).to(dtype)[:, ::2]
    return [(a, b), (a[:, :1], b[:1]), (at, bs), (a[:0], b[:0]), (a[0, 0], b), (a, 2.75)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,ref", [(torch.mul, R.pam), (torch.div, R.pad)], ids=["mul", "div"])
def test_binary_ops_match_the_reference(op, ref, dtype):
    for a, b in layouts(dtype):
        exact(pa(lambda: op(a, b)), want_binary(ref, a, b))


@pytest.mark.parametrize("a,b,dtype", [
    (torch.arange(1, 5), rnd(4), torch.float32),                          # int tensor, float tensor
    (rnd(4).half(), torch.tensor(3.0), torch.float16),                   # 0-d float32 doesn't promote
    (rnd(4).bfloat16(), 1.5, torch.bfloat16),                            # Python float
    (rnd(4).bfloat16(), rnd(4, seed=1), torch.float32),                  # bfloat16 with float32
    (rnd(4).half(), torch.tensor([2], dtype=torch.int32), torch.float16),  # int tensor joins float16
], ids=["int*float", "half*0d-float", "bf16*scalar", "bf16*float", "half*int"])
def test_dtype_promotion_is_torchs(a, b, dtype):
    assert torch.result_type(a, b) == dtype
    got = pa(lambda: a * b)
    assert got.dtype == dtype
    fa = a.to(dtype) if isinstance(a, torch.Tensor) else a
    fb = b.to(dtype) if isinstance(b, torch.Tensor) else b
    exact(got, want_binary(R.pam, fa, fb))


UNARY = [(torch.exp, R.exp, 1), (torch.log, R.log, 1), (torch.sqrt, R.sqrt, 1), (torch.rsqrt, R.rsqrt, 1),
         (torch.exp2, R.paexp2, 1), (torch.log2, R.palog2, 1), (torch.reciprocal, R.pad, 0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,ref,ulps", UNARY, ids=[u[0].__name__ for u in UNARY])
def test_unary_ops_match_the_reference(op, ref, ulps, dtype):
    x = rnd(5, 6, lo=0.1).to(dtype) if op not in (torch.exp, torch.exp2) else rnd(5, 6).to(dtype)
    for arg in (x, x.t(), x[:0], x[1, 1]):
        got = pa(lambda: op(arg))
        x64 = R.to_f64(arg)
        want = R.round_to(R.pad(1.0, x64, dtype) if ref is R.pad else ref(x64, dtype), dtype)
        assert got.dtype == want.dtype and got.shape == want.shape
        d = (got.to(torch.float64) - want.to(torch.float64)).abs()
        ulp = torch.finfo(dtype).eps * want.to(torch.float64).abs()
        assert bool((d <= ulps * ulp).all()), (op, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pow_matches_the_reference(dtype):
    x = rnd(3, 5, lo=0.1).to(dtype)
    for p in (2, 3, 0.5, -1.5):
        got = pa(lambda: x ** p)
        want = R.round_to(R.pow(R.to_f64(x), p, dtype), dtype)
        d = (got.to(torch.float64) - want.to(torch.float64)).abs()
        assert bool((d <= torch.finfo(dtype).eps * want.to(torch.float64).abs()).all())


def test_composite_elementwise_ops_match_the_reference():
    a, b, c = rnd(4, 5), rnd(4, 5, seed=1), rnd(4, 5, seed=2, lo=0.25)
    f32 = torch.float32
    pam = lambda x, y: R.round_to(R.pam(R.to_f64(x) if torch.is_tensor(x) else x, R.to_f64(y), f32), f32)  # noqa: E731
    pad = lambda x, y: R.round_to(R.pad(R.to_f64(x), R.to_f64(y) if torch.is_tensor(y) else y, f32), f32)  # noqa: E731
    exact(pa(lambda: torch.addcmul(a, b, c, value=0.5)), a + pam(0.5, pam(b, c)))
    exact(pa(lambda: torch.addcdiv(a, b, c)), a + pad(b, c))
    exact(pa(lambda: torch.lerp(a, b, 0.25)), a + pam(0.25, b - a))
    exact(pa(lambda: torch.add(a, b, alpha=3.0)), a + pam(3.0, b))
    exact(pa(lambda: a.mean(1)), pad(a.sum(1), 5.0))
    norm = R.round_to(R.sqrt(R.to_f64(pam(a, a).sum()), f32), f32)
    got = pa(lambda: torch.linalg.vector_norm(a))
    assert abs(got.item() - norm.item()) <= torch.finfo(f32).eps * norm.item()  # sqrt: 1 ulp


MATMULS = [
    ("mm", lambda a, b, c: torch.mm(a, b), lambda a, b: (a, b)),
    ("matmul", lambda a, b, c: a @ b, lambda a, b: (a, b)),
    ("addmm", lambda a, b, c: torch.addmm(c, a, b), lambda a, b: (a, b)),
    ("mv", lambda a, b, c: torch.mv(a, b[:, 0]), lambda a, b: (a, b[:, :1])),
    ("bmm", lambda a, b, c: torch.bmm(a[None], b[None])[0], lambda a, b: (a, b)),
    ("linear", lambda a, b, c: F.linear(a, b.t()), lambda a, b: (a, b)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,call,operands", MATMULS, ids=[m[0] for m in MATMULS])
def test_products_match_the_reference(name, call, operands, dtype):
    a, b = rnd(5, 7).to(dtype), rnd(7, 3, seed=1).to(dtype)
    c = torch.zeros(3, dtype=dtype)
    for x, y in ((a, b), (a.t().contiguous().t(), b.t().contiguous().t()), (a[:0], b), (a[:, :0], b[:0])):
        got = pa(lambda: call(x, y, c))
        ra, rb = operands(x, y)
        ref, mag = mm_reference(ra.float(), rb.float())
        check_close(got.reshape(ref.shape), ref, mag, x.shape[1], dtype, name)
        assert got.dtype == dtype


# ---------------------------------------------------------------------------
# torch's errors

ERRORS = [
    ("mul", lambda: torch.mul(rnd(3), rnd(4))),
    ("mm-shapes", lambda: torch.mm(rnd(2, 3), rnd(4, 5))),
    ("mm-1d", lambda: torch.mm(rnd(3), rnd(3, 5))),
    ("mm-dtype", lambda: torch.mm(rnd(2, 2), rnd(2, 2).bfloat16())),
    ("matmul-dtype", lambda: torch.matmul(rnd(2, 2), rnd(2, 2).bfloat16())),
    ("linear-dtype", lambda: F.linear(rnd(2, 2), rnd(2, 2).bfloat16())),
    ("bmm-shapes", lambda: torch.bmm(rnd(1, 2, 3), rnd(1, 4, 5))),
    ("bmm-batch", lambda: torch.bmm(rnd(1, 2, 3), rnd(2, 3, 5))),
    ("bmm-2d", lambda: torch.bmm(rnd(2, 3), rnd(3, 4))),
    ("bmm-dtype", lambda: torch.bmm(rnd(1, 2, 2), rnd(1, 2, 2).bfloat16())),
    ("addmm-dtype", lambda: torch.addmm(rnd(2, 2), rnd(2, 2).bfloat16(), rnd(2, 2).bfloat16())),
    ("addmm-shapes", lambda: torch.addmm(rnd(3, 3), rnd(2, 3), rnd(3, 5))),
    ("baddbmm-dtype", lambda: torch.baddbmm(rnd(1, 2, 2), rnd(1, 2, 2).bfloat16(), rnd(1, 2, 2).bfloat16())),
    ("mv", lambda: torch.mv(rnd(2, 3), rnd(4))),
    ("mv-dtype", lambda: torch.mv(rnd(2, 2), rnd(2).bfloat16())),
    ("dot", lambda: torch.dot(rnd(2), rnd(3))),
    ("dot-2d", lambda: torch.dot(rnd(2, 2), rnd(2, 2))),
    ("dot-dtype", lambda: torch.dot(rnd(2), rnd(2).bfloat16())),
    ("mul_-broadcast", lambda: rnd(3).mul_(rnd(2, 3))),
    ("mul_-int", lambda: torch.arange(3).mul_(rnd(3))),
    ("mul-out-int", lambda: torch.mul(rnd(3), rnd(3), out=torch.empty(3, dtype=torch.long))),
    ("mm-out-dtype", lambda: torch.mm(rnd(2, 2), rnd(2, 2), out=torch.empty(2, 2, dtype=torch.float64))),
]


@pytest.mark.parametrize("name,call", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_are_torchs(name, call):
    with pytest.raises(Exception) as want:
        call()
    with pytest.raises(type(want.value)) as got:
        pa(call)
    assert str(got.value).splitlines()[0] == str(want.value).splitlines()[0]


# ---------------------------------------------------------------------------
# issue 10, item 1: out= is written, under the dispatch routes and the function routes

OUT_CALLS = [
    ("mul", lambda o: torch.mul(rnd(3, 4), rnd(3, 4, seed=1), out=o)),
    ("mul-scalar", lambda o: torch.mul(rnd(3, 4), 2.5, out=o)),
    ("div", lambda o: torch.div(rnd(3, 4), rnd(3, 4, seed=1), out=o)),
    ("exp", lambda o: torch.exp(rnd(3, 4), out=o)),
    ("sqrt", lambda o: torch.sqrt(rnd(3, 4, lo=0.1), out=o)),
    ("pow", lambda o: torch.pow(rnd(3, 4, lo=0.1), 2.5, out=o)),
    ("pow-scalar-base", lambda o: torch.pow(2.0, rnd(3, 4), out=o)),
    ("mean", lambda o: torch.mean(rnd(3, 4), 1, out=o)),
    ("mm", lambda o: torch.mm(rnd(3, 5), rnd(5, 4), out=o)),
    ("matmul", lambda o: torch.matmul(rnd(3, 5), rnd(5, 4), out=o)),
    ("addmm", lambda o: torch.addmm(rnd(4), rnd(3, 5), rnd(5, 4), out=o)),
    ("bmm", lambda o: torch.bmm(rnd(2, 3, 5), rnd(2, 5, 4), out=o)),
    ("baddbmm", lambda o: torch.baddbmm(rnd(4), rnd(2, 3, 5), rnd(2, 5, 4), alpha=0.5, out=o)),
    ("mv", lambda o: torch.mv(rnd(3, 5), rnd(5), out=o)),
    ("dot", lambda o: torch.dot(rnd(5), rnd(5, seed=1), out=o)),
]


@pytest.mark.parametrize("derivative", ["approx", "exact"])
@pytest.mark.parametrize("name,call", OUT_CALLS, ids=[c[0] for c in OUT_CALLS])
def test_out_is_written_and_returned(name, call, derivative):
    cfg = CFG.with_derivative(derivative)
    with mode(cfg):
        want = call(None)
        out = torch.full((1,), math.nan)  # the wrong shape: resized, with torch's warning
        with pytest.warns(UserWarning, match="was resized"):
            got = call(out)
        empty = torch.empty(0)
        got2 = call(empty)
    assert got is out and got2 is empty
    exact(out, want)
    exact(empty, want)


def test_out_of_another_float_dtype_gets_the_cast_result():
    a, b = rnd(3), rnd(3, seed=1)
    out = torch.empty(3, dtype=torch.float64)
    with mode(CFG):
        torch.mul(a, b, out=out)
    exact(out, arith.pam(a, b).double())


# ---------------------------------------------------------------------------
# item 2: x * 1 and x / 1 are new tensors

@pytest.mark.parametrize("call", [lambda x: x * 1, lambda x: x / 1, lambda x: 1 * x, lambda x: x.mul(1.0),
                                  lambda x: torch.addcmul(x, x, x, value=1) - x],
                         ids=["x*1", "x/1", "1*x", "mul(1.0)", "addcmul"])
def test_multiplying_by_one_returns_a_new_tensor(call):
    x = rnd(5)
    before = x.clone()
    with mode(CFG):
        y = call(x)
        y += 10
    assert y is not x and y.data_ptr() != x.data_ptr()
    assert torch.equal(x, before)


def test_parameter_times_one_keeps_the_parameter_a_leaf():
    p = torch.nn.Parameter(rnd(4))
    for _ in range(2):  # a second backward works: p is still a leaf
        with mode(CFG):
            (p * 1.0).sum().backward()
    assert p.is_leaf and torch.equal(p.grad, torch.full((4,), 2.0))


# ---------------------------------------------------------------------------
# item 15

@pytest.mark.parametrize("base", [0.0, -0.0, -2.0, -0.5, -1.0, 1.0, 2.0, math.inf, -math.inf, math.nan])
def test_pow_of_a_scalar_base_follows_torch(base):
    p = torch.tensor([2.0, 3.0, 0.5, 0.0, -1.0, -2.0, 1.5, math.inf, -math.inf, math.nan, -3.0])
    want = torch.pow(base, p)
    got = pa(lambda: torch.pow(base, p))
    assert got.dtype == want.dtype
    same = torch.isnan(got) == torch.isnan(want)
    assert bool(same.all()), (got, want)
    special = ~torch.isfinite(want) | (want == 0) | (want.abs() == 1)
    assert torch.equal(got[special & ~torch.isnan(want)], want[special & ~torch.isnan(want)])
    num = ~torch.isnan(want)  # a NaN's sign means nothing
    assert torch.equal(torch.signbit(got[num]), torch.signbit(want[num]))
    fin = torch.isfinite(want) & (want != 0)
    assert bool(((got[fin] / want[fin] - 1).abs() < 0.13).all())  # PA pow's error band


def test_foreach_pow_of_a_scalar_base_is_pow_of_each():
    xs = [rnd(3), rnd(2, 2, seed=1)]
    with mode(CFG):
        got = torch._foreach_pow(2.0, xs)
        want = [torch.pow(2.0, x) for x in xs]
    for g, w in zip(got, want):
        exact(g, w)


def test_keyword_calls_under_exact_derivatives():
    cfg = Config.full().with_derivative("exact")
    x, w, b = param(4, 3), param(5, 3, seed=1), param(5, seed=2)
    with mode(cfg):
        pairs = [(F.linear(input=x, weight=w, bias=b), F.linear(x, w, b)),
                 (F.gelu(input=x), F.gelu(x)),
                 (F.gelu(input=x, approximate="tanh"), F.gelu(x, approximate="tanh")),
                 (F.softmax(input=x, dim=1), F.softmax(x, 1)),
                 (F.log_softmax(input=x, dim=1), F.log_softmax(x, 1)),
                 (F.layer_norm(input=x, normalized_shape=(3,)), F.layer_norm(x, (3,)))]
    for kw, pos in pairs:
        exact(kw, pos)
    sum(kw.sum() for kw, _ in pairs).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_mean_with_a_dtype_returns_that_dtype():
    x = rnd(4, 6)
    with mode(CFG):
        m, m1 = x.mean(dtype=torch.float64), x.mean(1, dtype=torch.float64)
        h = x.mean(dtype=torch.float16)
    assert (m.dtype, m1.dtype, h.dtype) == (torch.float64, torch.float64, torch.float16)
    s = x.double().sum()
    assert m.item() == R.pad(s.item(), 24.0, torch.float64)
    torch.testing.assert_close(m1, torch.from_numpy(R.pad(R.to_f64(x.double().sum(1)), 6.0, torch.float64)),
                               rtol=0, atol=0)


@pytest.mark.parametrize("inp", [math.nan, math.inf])
def test_beta_zero_ignores_the_input(inp):
    a, b = rnd(3, 4), rnd(4, 5, seed=1)
    bias = torch.full((3, 5), inp)
    with mode(CFG):
        out = torch.addmm(bias, a, b, beta=0)
        out2 = torch.addmm(bias, a, b, beta=0, alpha=2.0)
        bout = torch.baddbmm(bias[None], a[None], b[None], beta=0)
        prod = torch.mm(a, b)
    exact(out, prod)
    exact(out2, arith.pam(prod, torch.tensor(2.0)))
    exact(bout[0], prod)
