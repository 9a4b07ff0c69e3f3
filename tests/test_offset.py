"""The PAM offset α (issue 11, point 4): one integer added to each product pattern.

Checked against float64 math written from the definition (docs/numerics.md, "The offset"):
with a = 2^Ea (1+Ma), b = 2^Eb (1+Mb), α = 2^Eα (1+Mα),

    PAM(a, b; α) = 2^(Ea+Eb+Eα+c) (1 + s - c),  s = Ma + Mb + Mα, c = floor(s)
    PAD(a, b; α) = 2^(Ea-Eb-Eα+c) (1 + s - c),  s = Ma - Mb - Mα, c = floor(s)

(flush below the smallest normal, inf from 2^(emax+1)); exp and log take α in their inner
PAM / PAD. Every matrix-product kernel (compiled AVX2 and scalar, pure torch, Triton under
TRITON_INTERPRET=1) is bit-equal to the sequential float32 sum of the elementwise
``arith.pam(a, b, offset)`` terms, and its exact derivative to the sum of the elementwise
exact derivatives, which are the true slopes of the PA function (finite differences).
"""
import importlib.util
import math
import os
import pathlib
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pamtorch
import reference as R
from pamtorch import arith, kernels
from pamtorch.config import Config, OpConfig
from pamtorch.kernels import cpu, torch_fallback

OFFSETS = [0.5, 0.75, 1.0552, 1.9, 2.0]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------
# float64 reference

def _ref(a, b, alpha, dtype, sign):
    """PAM (sign=+1) or PAD (sign=-1) with offset α of float64 arrays of ``dtype`` values."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    tiny, emax, _ = R.FORMATS[dtype]
    ea_, ma_ = R.split(np.array([alpha]))
    with np.errstate(all="ignore"):
        normal = np.isfinite(a) & np.isfinite(b) & (np.abs(a) >= tiny) & (np.abs(b) >= tiny)
        ea, ma = R.split(np.where(normal, a, 1.0))
        eb, mb = R.split(np.where(normal, b, 1.0))
        s = ma + sign * mb + sign * ma_[0]
        c = np.floor(s)
        mag = np.ldexp(1.0 + s - c, (ea + sign * eb + sign * ea_[0] + c).astype(np.int64))
        mag = np.where(mag < tiny, 0.0, mag)
        mag = np.where(mag >= R._over(emax), np.inf, mag)
    base = R.pam(a, b, dtype) if sign > 0 else R.pad(a, b, dtype)  # zeros, inf, NaN, signs
    return np.where(normal, np.copysign(mag, base), base)


def _operands(dtype, n, seed):
    """Random values over the whole normal range (products under- and overflow), plus
    zeros, subnormals, infinities and NaN."""
    g = torch.Generator().manual_seed(seed)
    emax = R.FORMATS[dtype][1]
    e = torch.randint(-emax - 2, emax + 1, (n,), generator=g).double()
    x = torch.ldexp(1 + torch.rand(n, generator=g, dtype=torch.float64), e.long())
    x = torch.where(torch.rand(n, generator=g) < 0.5, -x, x)
    x[:6] = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1.0], dtype=torch.float64)
    return x.to(dtype)


def _same(got, want):
    """Bit-equal, NaN matching NaN."""
    got, want = got.double(), torch.as_tensor(want, dtype=torch.float64)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(torch.where(nan, 0.0, got), torch.where(nan, 0.0, want))
    assert torch.equal(torch.signbit(got[~nan]), torch.signbit(want[~nan]))


@pytest.mark.parametrize("alpha", OFFSETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pam_and_pad_with_offset_match_reference(dtype, alpha):
    a, b = _operands(dtype, 40_000, 1), _operands(dtype, 40_000, 2)
    a64, b64 = R.to_f64(a), R.to_f64(b)
    al = float(torch.tensor(alpha, dtype=dtype))  # α rounded to the operands' dtype
    for op, sign in ((arith.pam, 1), (arith.pad, -1)):
        want = R.round_to(_ref(a64, b64, al, dtype, sign), dtype)
        _same(op(a, b, alpha), want)
    _same(pamtorch.mul(a, b, offset=alpha), R.round_to(_ref(a64, b64, al, dtype, 1), dtype))
    _same(pamtorch.div(a, b, offset=alpha), R.round_to(_ref(a64, b64, al, dtype, -1), dtype))


@pytest.mark.parametrize("alpha", [0.75, 1.0552])
@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_and_log_take_the_offset_in_their_inner_product(dtype, alpha):
    g = torch.Generator().manual_seed(3)
    x = ((torch.rand(20_000, generator=g, dtype=torch.float64) - 0.5) * 20).to(dtype)
    pos = (torch.rand(20_000, generator=g, dtype=torch.float64) * 1e3).to(dtype)
    al = float(torch.tensor(alpha, dtype=dtype))
    x64, p64 = R.to_f64(x), R.to_f64(pos)
    y = _ref(R._zero_subnormals(x64, dtype), R.LOG2E, al, torch.float64, 1)
    _same(pamtorch.exp(x, offset=alpha), R.round_to(R.paexp2(y, dtype), dtype))
    want_log = R.round_to(_ref(R.palog2(p64, dtype), R.LOG2E, al, torch.float64, -1), dtype)
    _same(pamtorch.log(pos, offset=alpha), want_log)


def test_offset_centres_the_mean_error_per_term():
    """α = 1.0552 on each term brings PAM's mean relative error (-3.9%) to about 0."""
    g = torch.Generator().manual_seed(0)
    a, b = 1 + torch.rand(100_000, generator=g), 1 + torch.rand(100_000, generator=g)
    exact = a.double() * b.double()
    plain = (arith.pam(a, b).double() / exact - 1).mean()
    comp = (arith.pam(a, b, 1.0552).double() / exact - 1).mean()
    assert -0.045 < plain < -0.035 and abs(comp) < 0.005


# ---------------------------------------------------------------------------
# exact derivatives are the slopes of the offset functions

def _slopes(f, x, h):
    """(f(x+h) - f(x)) / h in float64 (exact for float32 values and h a power of two)."""
    return (f(x + h).double() - f(x).double()) / h.double()


@pytest.mark.parametrize("alpha", [0.75, 1.0552, 2.0])
def test_exact_derivatives_with_offset_are_the_piecewise_slopes(alpha):
    g = torch.Generator().manual_seed(5)
    a = (1 + torch.rand(4000, generator=g)) * torch.exp2(torch.randint(-4, 5, (4000,), generator=g).float())
    b = (1 + torch.rand(4000, generator=g)) * torch.exp2(torch.randint(-4, 5, (4000,), generator=g).float())
    b = torch.where(torch.rand(4000, generator=g) < 0.5, -b, b)
    h = torch.exp2(torch.floor(torch.log2(a)) - 14)  # 2^9 ulps of a: mostly the same piece
    checks = [
        ("mul", lambda x: arith.pam(x, b, alpha), lambda: pamtorch.mul),
        ("div a", lambda x: arith.pad(x, b, alpha), lambda: pamtorch.div),
    ]
    for name, f, _ in checks:
        x = a.clone().requires_grad_()
        op = pamtorch.mul if name == "mul" else pamtorch.div
        op(x, b, offset=alpha, derivative="exact").backward(torch.ones_like(a))
        fd = _slopes(f, a, h)
        left = _slopes(f, a - h, h)
        same_piece = fd == left            # no breakpoint within [a - h, a + h]
        assert same_piece.float().mean() > 0.9
        assert torch.equal(x.grad.double()[same_piece], fd[same_piece]), name
    # PAD w.r.t. its divisor
    y = b.abs().clone().requires_grad_()
    pamtorch.div(a, y, offset=alpha, derivative="exact").backward(torch.ones_like(a))
    hb = torch.exp2(torch.floor(torch.log2(b.abs())) - 14)
    f = lambda v: arith.pad(a, v, alpha)  # noqa: E731
    fd, left = _slopes(f, b.abs(), hb), _slopes(f, b.abs() - hb, hb)
    same_piece = fd == left
    assert same_piece.float().mean() > 0.9
    assert torch.equal(y.grad.double()[same_piece], fd[same_piece])


@pytest.mark.parametrize("op", ["exp", "log"])
def test_exp_log_exact_derivative_with_offset_is_the_slope(op):
    g = torch.Generator().manual_seed(6)
    x = (torch.rand(4000, generator=g) * 6 - 3) if op == "exp" else (torch.rand(4000, generator=g) * 50 + 0.1)
    alpha = 1.0552
    f = (lambda v: arith.pa_exp(v, alpha)) if op == "exp" else (lambda v: arith.pa_log(v, alpha))
    xr = x.clone().requires_grad_()
    getattr(pamtorch, op)(xr, offset=alpha, derivative="exact").backward(torch.ones_like(x))
    h = torch.exp2(torch.floor(torch.log2(x.abs())) - 16)
    fd, left = _slopes(f, x, h), _slopes(f, x - h, h)
    # pieces of the composite are short (the rounding of y to the output grid): compare
    # where the slope is the same on both sides, and the output moved
    ok = (fd == left) & (fd != 0)
    assert ok.float().mean() > 0.3
    assert torch.equal(xr.grad.double()[ok], fd[ok])


# ---------------------------------------------------------------------------
# matrix products: every kernel path, per term

def _mat(m, n, seed, spread=3, zeros=0.0, specials=False):
    g = torch.Generator().manual_seed(seed)
    e = torch.randint(-spread, spread + 1, (m, n), generator=g)
    x = torch.ldexp(1 + torch.rand(m, n, generator=g), e)
    x = torch.where(torch.rand(m, n, generator=g) < 0.5, -x, x)
    x = torch.where(torch.rand(m, n, generator=g) < zeros, torch.zeros_like(x), x)
    if specials:
        x[0, 0], x[-1, -1] = math.inf, math.nan
    return x


def _seq_sum(terms, dim):
    """float32 sum over ``dim`` in index order (the kernels' accumulation order)."""
    terms = terms.movedim(dim, 0)
    acc = torch.zeros_like(terms[0])
    for t in terms:
        acc += t
    return acc


def _ref_mm(a, b, alpha):
    return _seq_sum(arith.pam(a[:, :, None], b[None], alpha), 1)


def _ref_exact_grads(a, b, dc, alpha):
    """Sequential sums of the elementwise exact derivative terms of PAM(a, b, offset)."""
    M, K = a.shape
    N = b.shape[1]
    A = a[:, :, None].expand(M, K, N).clone().requires_grad_()
    B = b[None].expand(M, K, N).clone().requires_grad_()
    pamtorch.mul(A, B, offset=alpha, derivative="exact").backward(dc[:, None, :].expand(M, K, N))
    return _seq_sum(A.grad, 2), _seq_sum(B.grad, 0)


# operand sets: plain (the 2-op AVX2 mode), zeros in a / b / both, a wide exponent range
# (under- and overflowing terms: the general mode), inf and NaN operands
CASES = [dict(), dict(zeros=0.2), dict(spread=70), dict(spread=130, zeros=0.1), dict(specials=True),
         dict(spread=126, zeros=0.3, specials=True)]


def _paths():
    ext = cpu.load_extension()
    paths = [("fallback", lambda f, *t, off: getattr(torch_fallback, f)(*t, off))]
    if ext is not None:
        for p, name in ((-1, "compiled"), (0, "scalar"), (1, "avx2-general")):
            paths.append((name, lambda f, *t, off, p=p: getattr(ext, f)(*t, p, kernels.offset_d(off))))
    return paths


@pytest.mark.parametrize("alpha", [None, 0.5, 1.0552, 2.0])
def test_matmul_offset_is_per_term_in_every_cpu_kernel(alpha):
    for ci, case in enumerate(CASES):
        for za, zb in ((True, False), (False, True), (True, True)):
            a = _mat(9, 33, 10 + ci, **{k: v for k, v in case.items() if za or k == "spread"})
            b = _mat(33, 19, 20 + ci, **{k: v for k, v in case.items() if zb or k == "spread"})
            want = _ref_mm(a, b, alpha)
            for name, run in _paths():
                _same(run("pam_mm", a, b, off=alpha), want)
            _same(kernels.pam_bmm(torch.stack([a, a]), torch.stack([b, b]), alpha)[1], want)


@pytest.mark.parametrize("alpha", [None, 0.5, 1.0552, 2.0])
def test_matmul_exact_derivative_with_offset_is_per_term_in_every_cpu_kernel(alpha):
    for ci, case in enumerate(CASES[:5]):
        a, b, dc = _mat(7, 21, 30 + ci, **case), _mat(21, 13, 40 + ci, **case), _mat(7, 13, 50 + ci, 3)
        want_a, want_b = _ref_exact_grads(a, b, dc, alpha)
        for name, run in _paths():
            _same(run("pam_mm_exact_grad_a", a, b, dc, off=alpha), want_a)
            _same(run("pam_mm_exact_grad_b", a, b, dc, off=alpha), want_b)


@pytest.fixture(scope="module")
def triton_interpreted():
    """The Triton kernels' module loaded and run under TRITON_INTERPRET=1 (CPU tensors)."""
    pytest.importorskip("triton")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    src = pathlib.Path(pamtorch.__file__).parent / "kernels" / "triton" / "matmul.py"
    spec = importlib.util.spec_from_file_location("_pamtorch_triton_offset_test", src)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # the interpreter resolves helpers via sys.modules
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("alpha", [None, 0.5, 1.0552, 2.0])
def test_triton_offset_is_per_term(triton_interpreted, alpha):
    tk = triton_interpreted
    for ci, case in enumerate([dict(zeros=0.1), dict(spread=126, zeros=0.1, specials=True)]):
        a, b, dc = _mat(9, 19, 60 + ci, **case), _mat(19, 17, 70 + ci, **case), _mat(9, 17, 80 + ci, 3)
        _same(tk.pam_mm(a, b, alpha), _ref_mm(a, b, alpha))
        want_a, want_b = _ref_exact_grads(a, b, dc, alpha)
        _same(tk.pam_mm_exact_grad_a(a, b, dc, alpha), want_a)
        _same(tk.pam_mm_exact_grad_b(a, b, dc, alpha), want_b)


@pytest.mark.parametrize("derivative", ["approx", "exact", "ste"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_matmul_with_offset(derivative, dtype):
    """pamtorch.matmul(offset=α): the per-term forward, and each derivative kind of those
    terms (approx: α·b per term, i.e. PAM(dC, b, α); exact: the kernels' exact grads)."""
    a, b, g = _mat(6, 10, 1).to(dtype), _mat(10, 5, 2).to(dtype), _mat(6, 5, 3).to(dtype)
    alpha = 1.0552
    al = float(torch.tensor(alpha, dtype=dtype))
    x, w = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = pamtorch.matmul(x, w, offset=alpha, derivative=derivative)
    a32, b32, g32 = a.float(), b.float(), g.float()
    assert torch.equal(out, _ref_mm(a32, b32, al).to(dtype))
    out.backward(g)
    if derivative == "approx":
        want = (kernels.pam_mm(g32, b32.t(), al), kernels.pam_mm(a32.t(), g32, al))
    elif derivative == "exact":
        want = _ref_exact_grads(a32, b32, g32, al)
    else:
        want = ((g32 @ b32.t()) * al, (a32.t() @ g32) * al)
    assert torch.allclose(x.grad.float(), want[0].to(dtype).float(), rtol=1e-6, atol=0)
    assert torch.allclose(w.grad.float(), want[1].to(dtype).float(), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------
# under the mode

def test_mode_applies_the_offset_per_term_and_exact_with_offset_is_exact():
    alpha = 1.0552
    x, w, gy = _mat(5, 12, 1), _mat(7, 12, 2), _mat(5, 7, 3)
    for derivative in ("approx", "exact"):
        cfg = Config.matmul_only().replace(matmul=OpConfig(derivative=derivative, offset=alpha))
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        with pamtorch.mode(cfg):
            y = F.linear(xr, wr)
            y.backward(gy)
        assert torch.equal(y, _ref_mm(x, w.t(), alpha))
        xe, we = x.clone().requires_grad_(), w.clone().requires_grad_()
        pamtorch.linear(xe, we, offset=alpha, derivative=derivative).backward(gy)
        assert torch.equal(xr.grad, xe.grad) and torch.equal(wr.grad, we.grad)
        if derivative == "exact":  # the exact kind really ran (not approx with the offset)
            assert torch.equal(xr.grad, _ref_exact_grads(x, w.t(), gy, alpha)[0])


def test_mode_elementwise_offset_reaches_mul_div_exp_log():
    alpha = 1.0552
    a, b = _mat(4, 6, 1), _mat(4, 6, 2).abs()
    with pamtorch.mode(Config.full().replace(elementwise=OpConfig(offset=alpha))):
        got = (a * b, a / b, torch.exp(a), torch.log(b))
    want = (arith.pam(a, b, alpha), arith.pad(a, b, alpha), arith.pa_exp(a, alpha), arith.pa_log(b, alpha))
    for g_, w_ in zip(got, want):
        assert torch.equal(g_, w_)


# ---------------------------------------------------------------------------
# errors

@pytest.mark.parametrize("kind", ["softmax", "norm", "loss", "nonlinear"])
def test_kinds_that_cannot_take_an_offset_refuse_it(kind):
    with pytest.raises(ValueError, match=f"'{kind}' kind cannot take a PAM offset"):
        Config.full().replace(**{kind: OpConfig(offset=1.0552)})
    with pytest.raises(ValueError, match=f"'{kind}' kind cannot take a PAM offset"):
        Config(**{kind: OpConfig(offset=1.0552)})


def test_offset_errors_name_the_argument():
    a = torch.ones(3)
    for bad in (3.0, 0.25, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"offset must be in \[0.5, 2\]"):
            pamtorch.mul(a, a, offset=bad)
    with pytest.raises(ValueError, match="offset must be in"):
        pamtorch.matmul(torch.ones(2, 2), torch.ones(2, 2), offset=4)
    with pytest.raises(ValueError, match="offset must be in"):
        kernels.pam_mm(torch.ones(2, 2), torch.ones(2, 2), 0.1)
    with pytest.raises(TypeError, match="offset must be a Python number"):
        pamtorch.div(a, a, offset="1.05")
    with pytest.raises(TypeError, match="offset must be a Python number"):
        OpConfig(offset=True)
    with pytest.raises(ValueError, match="need pa=True"):
        OpConfig(pa=False, offset=1.0552)
    with pytest.raises(TypeError):
        pamtorch.sqrt(a, offset=1.05)  # no offset for sqrt: an unknown argument, not ignored
    ext = cpu.load_extension()
    if ext is not None:
        with pytest.raises(RuntimeError, match="offset D"):
            ext.pam_mm(torch.ones(2, 2), torch.ones(2, 2), -1, 1 << 24)
