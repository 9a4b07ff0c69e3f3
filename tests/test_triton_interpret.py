"""The Triton PAM kernels run under the Triton interpreter (CPU tensors, no GPU).

A private copy of ``pamtorch/kernels/triton/matmul.py`` is loaded with
``TRITON_INTERPRET=1`` (Triton reads it when the kernels are decorated and when they
run); the variable is restored when this module's tests end, and the copy is not
registered as ``pamtorch.kernels.triton.matmul``, so on a GPU machine the rest of the
suite still gets compiled kernels. Every result is
compared with the float64 reference of ``pam_checks`` (shared with
benchmarks/gpu.py). Sizes are small: the interpreter runs numpy per tile.
"""
import os

_OLD_ENV = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before anything below can import triton

import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import pam_checks as pc  # noqa: E402
from reference import pam, to_f64  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: inf - inf etc.

_SRC = (pathlib.Path(__file__).resolve().parents[1] / "src" / "pamtorch" / "kernels"
        / "triton" / "matmul.py")


def _load_interpreted():
    # the variable must be set while the kernels are decorated and while they run (the
    # interpreter re-executes their source); the fixture below restores it afterwards
    os.environ["TRITON_INTERPRET"] = "1"
    spec = importlib.util.spec_from_file_location("_pamtorch_triton_interpreted", _SRC)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # the interpreter resolves helpers via sys.modules
    spec.loader.exec_module(mod)
    assert mod.INTERPRET
    return mod


@pytest.fixture(autouse=True, scope="module")
def _interpret_env():
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if _OLD_ENV is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _OLD_ENV


tk = _load_interpreted()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def check_mm(a, b):
    c = tk.pam_mm(a, b)
    assert c.dtype == torch.float32 and c.shape == (a.shape[0], b.shape[1])
    ref, mag = pc.mm_reference(a, b)
    pc.check_close(c, ref, mag, a.shape[1], what="pam_mm")
    return c


def check_grads(a, b, dc):
    ga = tk.pam_mm_exact_grad_a(a, b, dc)
    gb = tk.pam_mm_exact_grad_b(a, b, dc)
    assert ga.shape == a.shape and gb.shape == b.shape
    ref, mag = pc.exact_grad_a_reference(a, b, dc)
    pc.check_close(ga, ref, mag, b.shape[1], what="exact_grad_a")
    ref, mag = pc.exact_grad_b_reference(a, b, dc)
    pc.check_close(gb, ref, mag, a.shape[0], what="exact_grad_b")


SHAPES = [(1, 1, 1), (3, 5, 2), (17, 9, 33), (16, 16, 16), (20, 31, 7)]


@pytest.mark.parametrize("M,K,N", SHAPES)
def test_forward_random(M, K, N):
    g = gen(M * 100 + K * 10 + N)
    a = torch.randn(M, K, generator=g) * 4
    b = torch.randn(K, N, generator=g)
    check_mm(a, b)


def test_forward_single_products_bit_exact():
    """K = 1: the output is one PAM product, equal to the reference bit for bit,
    signed zeros included (sums start at -0.0)."""
    a = pc.special_matrix((23, 1), gen(1), frac=0.4)
    b = pc.special_matrix((1, 19), gen(2), frac=0.4)
    a[:4, 0] = torch.tensor([2.0 ** 100, -(2.0 ** -100), 3.0e38, -1.5e-38])
    b[0, :4] = torch.tensor([1.9 * 2.0 ** 27, 2.0 ** -30, -1.5, 1.75])
    c = tk.pam_mm(a, b)
    ref = pam(to_f64(a), to_f64(b), torch.float32)  # [23,1]x[1,19] broadcast
    r32 = torch.from_numpy(ref).float()
    assert torch.equal(torch.isnan(c), torch.isnan(r32))
    ok = ~torch.isnan(r32)
    assert torch.equal(c[ok], r32[ok])
    assert torch.equal(torch.signbit(c[ok]), torch.signbit(r32[ok]))


@pytest.mark.parametrize("maker", [pc.special_matrix, pc.sparse_specials])
def test_forward_specials(maker):
    g = gen(3)
    check_mm(maker((19, 23), g), maker((23, 21), g))


def test_forward_overflow_underflow():
    g = gen(4)
    a = torch.randn(18, 12, generator=g)
    b = torch.randn(12, 17, generator=g)
    a[:6] *= 2.0 ** 90     # products overflow to inf in these rows ...
    b[:, :5] *= 2.0 ** 60  # ... where the columns are large too
    a[6:12] *= 2.0 ** -80  # and underflow (flush to zero) here
    b[:, 5:10] *= 2.0 ** -60
    c = check_mm(a, b)
    assert (~torch.isfinite(c[:6, :5])).all() and (c[6:12, 5:10] == 0).all()


def test_forward_noncontiguous():
    g = gen(5)
    base_a = torch.randn(40, 30, generator=g)
    base_b = torch.randn(21, 50, generator=g)
    a = base_a[1::2, ::3]            # [20, 10], strides (60, 3)
    b = base_b[:10, 1::2]            # [10, 25]
    check_mm(a, b)
    check_mm(base_b[:, :13].t(), base_a[:21, :9])   # transposed A view
    check_mm(a, base_b[:25, :10].t())               # transposed B view
    check_mm(torch.randn(1, 7, generator=g).expand(5, 7),
             torch.randn(7, 1, generator=g).expand(7, 6))  # stride-0 operands


def test_approx_backward_uses_transposed_views():
    """dA = dC @PAM B^T and dB = A^T @PAM dC, with the forward kernel on views."""
    g = gen(6)
    a = pc.sparse_specials((13, 9), g)
    b = pc.sparse_specials((9, 11), g)
    dc = torch.randn(13, 11, generator=g)
    (ra, ma), (rb, mb) = pc.approx_grad_references(a, b, dc)
    pc.check_close(tk.pam_mm(dc, b.t()), ra, ma, 11, what="approx dA")
    pc.check_close(tk.pam_mm(a.t(), dc), rb, mb, 13, what="approx dB")


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (17, 9, 20), (5, 18, 3)])
def test_exact_grads_random(M, K, N):
    g = gen(7 + M + K + N)
    check_grads(torch.randn(M, K, generator=g), torch.randn(K, N, generator=g) * 3,
                torch.randn(M, N, generator=g))


@pytest.mark.parametrize("maker", [pc.special_matrix, pc.sparse_specials])
def test_exact_grads_specials(maker):
    g = gen(8)
    check_grads(maker((11, 17), g), maker((17, 13), g), maker((11, 13), g))


def test_exact_grads_shift_range():
    """Exponent shifts that overflow (inf) and underflow (flush) the dC pattern."""
    g = gen(9)
    a = torch.randn(9, 7, generator=g)
    b = torch.randn(7, 10, generator=g)
    dc = torch.randn(9, 10, generator=g)
    b[:3] *= 2.0 ** 100
    dc[:, :4] *= 2.0 ** 60
    a[:, 3:5] *= 2.0 ** -110
    dc[4:] *= 2.0 ** -50
    b[5:] *= 2.0 ** 110
    a[6:] *= 2.0 ** 127   # the carry of E = 127 gives a shift of 128
    check_grads(a, b, dc)


def test_exact_grad_single_term_bit_exact():
    """N = 1 (for dA) / M = 1 (for dB): one term each, bit-exact against the formula."""
    g = gen(10)
    a = pc.special_matrix((1, 12), g, 0.3)
    b = pc.special_matrix((12, 1), g, 0.3)
    dc = torch.tensor([[-0.75]])
    ga = tk.pam_mm_exact_grad_a(a, b, dc)
    terms = pc.exact_grad_a_terms(to_f64(a), to_f64(b), to_f64(dc))  # [1, 12, 1]
    r32 = torch.from_numpy(terms[:, :, 0]).float()
    ok = ~torch.isnan(r32)
    assert torch.equal(torch.isnan(ga), ~ok)
    assert torch.equal(ga[ok], r32[ok]) and torch.equal(torch.signbit(ga[ok]), torch.signbit(r32[ok]))


def test_exact_grads_noncontiguous():
    g = gen(11)
    a = torch.randn(30, 20, generator=g)[::3, 1::2]      # [10, 10]
    b = torch.randn(12, 10, generator=g).t()             # [10, 12]
    dc = torch.randn(12, 10, generator=g).t()            # [10, 12]
    check_grads(a, b, dc)


def test_empty_and_k0():
    z = tk.pam_mm(torch.randn(4, 0), torch.randn(0, 3))
    assert z.shape == (4, 3) and (z == 0).all() and not torch.signbit(z).any()
    assert tk.pam_mm(torch.randn(0, 5), torch.randn(5, 3)).shape == (0, 3)
    assert tk.pam_mm(torch.randn(2, 5), torch.randn(5, 0)).shape == (2, 0)
    ga = tk.pam_mm_exact_grad_a(torch.randn(3, 2), torch.randn(2, 0), torch.randn(3, 0))
    assert ga.shape == (3, 2) and (ga == 0).all()
    gb = tk.pam_mm_exact_grad_b(torch.randn(0, 2), torch.randn(2, 4), torch.randn(0, 4))
    assert gb.shape == (2, 4) and (gb == 0).all()


def test_argument_errors():
    with pytest.raises(TypeError, match="float32"):
        tk.pam_mm(torch.ones(2, 2, dtype=torch.float64), torch.ones(2, 2))
    with pytest.raises(ValueError, match="2-D"):
        tk.pam_mm(torch.ones(2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="inner"):
        tk.pam_mm(torch.ones(2, 3), torch.ones(2, 2))
    with pytest.raises(ValueError, match="dc"):
        tk.pam_mm_exact_grad_a(torch.ones(2, 3), torch.ones(3, 2), torch.ones(3, 2))


def test_matches_cpu_backend():
    """The interpreted Triton kernels and the CPU backend meet the same reference on the
    same inputs (they may differ in summation order, not in the products)."""
    from pamtorch import kernels
    try:
        kernels.get_backend("cpu")
    except ImportError:
        pytest.skip("no CPU backend yet")
    g = gen(12)
    a = pc.sparse_specials((14, 19), g)
    b = pc.sparse_specials((19, 9), g)
    dc = torch.randn(14, 9, generator=g)
    refs = {"pam_mm": (pc.mm_reference(a, b), 19),
            "pam_mm_exact_grad_a": (pc.exact_grad_a_reference(a, b, dc), 9),
            "pam_mm_exact_grad_b": (pc.exact_grad_b_reference(a, b, dc), 14)}
    for name, ((ref, mag), n) in refs.items():
        args = (a, b) if name == "pam_mm" else (a, b, dc)
        for impl in (tk, kernels):
            pc.check_close(getattr(impl, name)(*args), ref, mag, n,
                           what=f"{name} ({impl.__name__})")


def test_batched_kernels_one_launch():
    """pam_bmm*: a batch grid axis; stride-0 (broadcast) and transposed batches."""
    g = gen(13)
    a = pc.sparse_specials((3, 9, 7), g)
    b = torch.randn(1, 11, 7, generator=g).expand(3, 11, 7).transpose(1, 2)  # [3,7,11]
    dc = torch.randn(3, 9, 11, generator=g)
    c = tk.pam_bmm(a, b)
    ga = tk.pam_bmm_exact_grad_a(a, b, dc)
    gb = tk.pam_bmm_exact_grad_b(a, b, dc)
    assert c.shape == (3, 9, 11) and ga.shape == a.shape and gb.shape == b.shape
    for i in range(3):
        r, m = pc.mm_reference(a[i], b[i])
        pc.check_close(c[i], r, m, 7, what=f"pam_bmm[{i}]")
        r, m = pc.exact_grad_a_reference(a[i], b[i], dc[i])
        pc.check_close(ga[i], r, m, 11, what=f"exact dA[{i}]")
        r, m = pc.exact_grad_b_reference(a[i], b[i], dc[i])
        pc.check_close(gb[i], r, m, 9, what=f"exact dB[{i}]")
    assert tk.pam_bmm(torch.randn(0, 2, 3), torch.randn(0, 3, 4)).shape == (0, 2, 4)
    with pytest.raises(ValueError, match="inner"):
        tk.pam_bmm(torch.randn(2, 2, 3), torch.randn(3, 3, 4))
