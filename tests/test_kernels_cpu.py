"""CPU PAM matmul kernels (compiled extension and pure-torch fallback) against the
independent float64 reference in tests/reference.py."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_SRC = os.path.join(os.path.dirname(_HERE), "src")
try:
    import pamtorch.kernels.cpu  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, _SRC)
sys.path.insert(0, _HERE)

from reference import pam, split  # noqa: E402

from pamtorch.kernels import cpu, torch_fallback as fb  # noqa: E402

F32 = torch.float32
EPS = 2.0 ** -23
TINY = 2.0 ** -126
EXT = cpu.load_extension()
needs_ext = pytest.mark.skipif(EXT is None, reason="compiled CPU kernels unavailable")

# forward modes reported by the extension's last_mode()
F0, FB, FA, FAB, FG, FZ, FZT, SB, SCALAR = 0, 1, 2, 3, 4, 5, 6, 7, 100
# the path argument that takes FA/FB (zeros of one operand masked) instead of FZ/FZT (skipped)
MASKED = 2


# ---------------------------------------------------------------- data
def rand_vals(shape, gen, emin=-20, emax=20, zeros=0.0):
    """Random float32 values with uniformly random bit-level mantissas, exponents in
    [emin, emax], random signs, and a fraction of (signed) zeros."""
    e = torch.randint(emin, emax + 1, shape, generator=gen)
    mant = torch.randint(0, 1 << 23, shape, generator=gen)
    sign = torch.randint(0, 2, shape, generator=gen)
    bits = (sign << 31) | ((e + 127) << 23) | mant
    x = _bits_to_f32(bits)
    if zeros:
        x = torch.where(torch.rand(shape, generator=gen) < zeros, x * 0.0, x)
    return x


def _bits_to_f32(bits):
    bits = bits.to(torch.int64)
    bits = torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits)
    return bits.to(torch.int32).view(F32)


SPECIALS = [0.0, -0.0, 1e-40, -1e-42, float("inf"), float("-inf"), float("nan"),
            2.0 ** -126, 3e38, -3e38, 2.0 ** -70, 2.0 ** 70, 1.0, -1.5]


def with_specials(x, gen, frac=0.05):
    s = torch.tensor(SPECIALS, dtype=F32)
    idx = torch.randint(0, len(SPECIALS), x.shape, generator=gen)
    return torch.where(torch.rand(x.shape, generator=gen) < frac, s[idx], x)


# ---------------------------------------------------------------- references
def ref_mm(a, b):
    """float64 sum of the reference products, and the tolerance of a float32 sum."""
    A = a.double().numpy()
    B = b.double().numpy()
    P = pam(A[:, :, None], B[None, :, :], F32)  # (M, K, N)
    K = A.shape[1]
    with np.errstate(invalid="ignore"):
        ref = P.sum(axis=1)
        tol = K * EPS * np.abs(P).sum(axis=1) + 4 * TINY
    return ref, tol


def ref_grad_terms(d, q, other):
    """float64 exact-gradient terms dC * sign(q) * 2^(E_q + c) (broadcasting), with the
    flush/overflow rules, written from the formula with frexp."""
    d, q, other = np.broadcast_arrays(d, q, other)
    with np.errstate(all="ignore"):
        qnorm = np.isfinite(q) & (np.abs(q) >= TINY)
        onorm = np.isfinite(other) & (np.abs(other) >= TINY)
        eq, mq = split(np.where(qnorm, q, 1.0))
        _, mo = split(np.where(onorm, other, 1.0))
        mo = np.where(onorm, mo, 0.0)
        mo = np.where(np.isfinite(other), mo, 0.0)
        # inf other: mantissa field 0; NaN other: not exercised with finite q mantissa sums
        c = (mq + mo >= 1.0).astype(np.float64)
        dz = np.abs(d) < TINY
        t = np.ldexp(np.where(dz, 0.0, d), (eq + c).astype(np.int64))
        t = np.where(np.abs(t) < TINY, np.copysign(0.0, t), t)
        t = np.where(np.abs(t) >= 2.0 ** 128, np.copysign(np.inf, t), t)
        t = np.where(np.signbit(q), -t, t)
        t = np.where(qnorm, t, np.where(np.isfinite(d), 0.0, np.nan))  # q zero -> dC*0
        t = np.where(np.isfinite(q), t, pam(q, d, F32))
    return t


def ref_grad_a(a, b, dc):
    A, B, D = a.double().numpy(), b.double().numpy(), dc.double().numpy()
    # terms[i, k, j] = term(D[i,j], B[k,j], A[i,k])
    T = ref_grad_terms(D[:, None, :], B[None, :, :], A[:, :, None])
    with np.errstate(invalid="ignore"):
        return T.sum(axis=2), D.shape[1] * EPS * np.abs(T).sum(axis=2) + 4 * TINY


def ref_grad_b(a, b, dc):
    A, B, D = a.double().numpy(), b.double().numpy(), dc.double().numpy()
    # terms[k, j, i] = term(D[i,j], A[i,k], B[k,j])
    T = ref_grad_terms(D.T[None, :, :], A.T[:, None, :], B[:, :, None])
    with np.errstate(invalid="ignore"):
        return T.sum(axis=2), D.shape[0] * EPS * np.abs(T).sum(axis=2) + 4 * TINY


def assert_close(out, ref, tol):
    o = out.double().numpy()
    assert o.shape == ref.shape
    fin = np.isfinite(ref)
    assert np.array_equal(np.isnan(o), np.isnan(ref)), "NaN positions differ"
    inf = np.isinf(ref)
    assert np.array_equal(o[inf], ref[inf]), "inf entries differ"
    err = np.abs(o[fin] - ref[fin])
    assert np.all(err <= tol[fin]), f"max excess {np.max(err - tol[fin])}"


def both_impls():
    impls = [("fallback", fb)]
    if EXT is not None:
        impls.insert(0, ("ext", cpu))
    return impls


IMPLS = [pytest.param(m, id=n) for n, m in both_impls()]


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (7, 33, 65), (33, 7, 1), (1, 65, 17),
                                   (65, 130, 33), (6, 257, 16)])
def test_forward_random(impl, M, K, N):
    g = torch.Generator().manual_seed(M * 1000 + K * 10 + N)
    a = rand_vals((M, K), g, zeros=0.1)
    b = rand_vals((K, N), g, zeros=0.1)
    out = impl.pam_mm(a, b)
    assert out.dtype == F32 and out.shape == (M, N) and out.is_contiguous()
    assert_close(out, *ref_mm(a, b))


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_specials(impl):
    g = torch.Generator().manual_seed(1)
    a = with_specials(rand_vals((9, 40), g, -60, 60), g, 0.08)
    b = with_specials(rand_vals((40, 21), g, -60, 60), g, 0.08)
    assert_close(impl.pam_mm(a, b), *ref_mm(a, b))
    # one special operand at a time (typical: a single NaN/inf)
    a2 = rand_vals((5, 7), g)
    b2 = rand_vals((7, 18), g)
    for v in (float("inf"), float("-inf"), float("nan"), 0.0):
        for which in "ab":
            x, y = a2.clone(), b2.clone()
            (x if which == "a" else y)[2, 3] = v
            if which == "a":
                y[3, 5] = 0.0  # inf * 0 -> NaN in one place
            else:
                x[1, 2] = 0.0
            assert_close(impl.pam_mm(x, y), *ref_mm(x, y))


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_range_edges(impl):
    """Products near underflow (flush) and overflow (inf), subnormal inputs."""
    g = torch.Generator().manual_seed(2)
    a = rand_vals((8, 24), g, -126, 127)
    b = rand_vals((24, 19), g, -126, 127)
    b[0, :] = 1e-40  # subnormal -> zero
    a[:, 1] = 2.0 ** -64
    b[1, :] = 2.0 ** -63 * 1.0000001  # products right at the smallest normal
    assert_close(impl.pam_mm(a, b), *ref_mm(a, b))
    # exactly representable single products: bit-exact checks
    x = torch.tensor([[2.0 ** -63, 2.0 ** -64, 2.0 ** 64, 1.5 * 2 ** 63, -3.0]], dtype=F32)
    y = torch.tensor([[2.0 ** -63], [2.0 ** -63], [2.0 ** 64], [1.5 * 2 ** 64], [0.75]], dtype=F32)
    for k in range(5):
        got = impl.pam_mm(x[:, k:k + 1], y[k:k + 1]).item()
        want = pam(np.float64(x[0, k].item()), np.float64(y[k, 0].item()), F32)
        assert got == want or (np.isinf(got) and got == want), (k, got, want)


@needs_ext
def test_forward_modes_and_paths_agree():
    """Every vector mode is exercised and agrees bit for bit with the scalar path, the
    forced general path and the pure-torch fallback (same summation order)."""
    g = torch.Generator().manual_seed(3)
    za = rand_vals((13, 70), g, zeros=0.3), rand_vals((70, 37), g)
    zb = rand_vals((13, 70), g), rand_vals((70, 37), g, zeros=0.3)
    cases = {
        F0: (rand_vals((13, 70), g), rand_vals((70, 37), g), -1),
        FZT: (*zb, -1),
        FB: (*zb, MASKED),
        FZ: (*za, -1),
        FA: (*za, MASKED),
        FAB: (rand_vals((13, 70), g, zeros=0.3), rand_vals((70, 37), g, zeros=0.3), -1),
        FG: (rand_vals((13, 70), g, -90, 30, 0.2), rand_vals((70, 37), g, -90, 30, 0.2), -1),
    }
    for mode, (a, b, path) in cases.items():
        out = EXT.pam_mm(a, b, path)
        assert EXT.last_mode() == mode
        assert_close(out, *ref_mm(a, b))
        assert torch.equal(out, EXT.pam_mm(a, b, 0))
        assert torch.equal(out, EXT.pam_mm(a, b, 1))
        assert torch.equal(out, fb.pam_mm(a, b))


@needs_ext
def test_column_major_b_packs_by_columns():
    """A column-major B (a transposed view) is packed column by column in blocks of 64
    reduction rows: several blocks, a partial one, a partial last strip, zeros and specials,
    in every B-packing mode, bit for bit against the scalar path."""
    g = torch.Generator().manual_seed(13)
    for zeros, lo, hi in ((0.0, -20, 20), (0.2, -20, 20), (0.1, -90, 30)):
        a = rand_vals((9, 150), g, lo, hi, zeros)
        b = with_specials(rand_vals((37, 150), g, lo, hi, zeros), g).t()  # (150, 37), strides (1, 150)
        assert b.stride() == (1, 150)
        assert same_bits(EXT.pam_mm(a, b, -1), EXT.pam_mm(a, b, 0))
        assert same_bits(EXT.pam_mm(a, b, -1), EXT.pam_mm(a, b.contiguous(), -1))
        # last strips of 1-15 columns are gathered row by row; full strips of short
        # reductions (attention's head size) are transposed 8x8 with a scalar remainder
        for N, K in ((1, 3), (7, 16), (9, 21), (17, 16), (31, 8)):
            a = rand_vals((5, K), g, lo, hi, zeros)
            b = with_specials(rand_vals((N, K), g, lo, hi, zeros), g).t()
            assert b.stride() == (1, K)
            assert same_bits(EXT.pam_mm(a, b, -1), EXT.pam_mm(a, b, 0)), (N, K)
            assert same_bits(EXT.pam_mm(a, b, -1), EXT.pam_mm(a, b.contiguous(), -1)), (N, K)


@needs_ext
@pytest.mark.parametrize("threads", [1, 2])
def test_column_major_a(threads):
    """A column-major A (a transposed view: the gradient in a weight gradient's g^T x). The
    modes that read A's rows raw (F0, FB) copy it by 8x8 block transposes, or, for a large A
    and N <= 128 (one column of tiles), pack strips of its raw patterns per macro tile and
    reduction block; the packed modes (FA, FAB, FG) pack each full row strip as one vector per
    k. Partial row and column blocks, partial strips, a reduction longer than one block,
    several 64-row parts on two threads: bit for bit against the contiguous A, the scalar
    path and the reference."""
    g = torch.Generator().manual_seed(14)
    old = torch.get_num_threads()
    cases = ((F0, (-20, 20, 0.0), 0.0), (FB, (-20, 20, 0.0), 0.2), (FZT, (-20, 20, 0.0), 0.2),
             (FZ, (-20, 20, 0.2), 0.0), (FA, (-20, 20, 0.2), 0.0), (FAB, (-20, 20, 0.2), 0.2),
             (FG, (-90, 30, 0.2), 0.2))
    try:
        torch.set_num_threads(threads)
        for mode, (lo, hi, zeros_a), zeros_b in cases:
            path = MASKED if mode in (FA, FB) else -1
            for M, K, N in ((150, 29, 19), (7, 5, 19), (64, 8, 19), (9, 300, 19), (150, 29, 200), (13, 600, 131)):
                a = rand_vals((K, M), g, lo, hi, zeros_a).t()  # (M, K), strides (1, M)
                assert a.stride() == (1, M)
                b = rand_vals((K, N), g, lo, hi, zeros_b)
                out = EXT.pam_mm(a, b, path)
                assert EXT.last_mode() == mode, (mode, M, K)
                assert same_bits(out, EXT.pam_mm(a.contiguous(), b, path))
                assert same_bits(out, EXT.pam_mm(a, b, 0))
                assert_close(out, *ref_mm(a, b))
        # a large A: strips packed per tile (M * K > 2^20); FZT skips B's zeros instead
        for mode, zeros_b, path in ((F0, 0.0, -1), (FB, 0.2, MASKED), (FZT, 0.2, -1)):
            a = rand_vals((1100, 1003), g).t()   # (1003, 1100), strides (1, 1003)
            b = rand_vals((1100, 21), g, zeros=zeros_b)
            out = EXT.pam_mm(a, b, path)
            assert EXT.last_mode() == mode
            assert same_bits(out, EXT.pam_mm(a.contiguous(), b, path))
            assert same_bits(out, EXT.pam_mm(a, b, 0))
    finally:
        torch.set_num_threads(old)


@needs_ext
@pytest.mark.parametrize("threads", [1, 2])
def test_long_reduction_packs_a_per_block(threads):
    """A packed mode with N <= 128 and a large A (a weight gradient's long reduction) packs A
    per tile and reduction block instead of up front: every mode that packs A, strided A
    rows, a partial last block and partial row strips, bit for bit against the scalar path."""
    g = torch.Generator().manual_seed(12)
    K = 9000  # 2 x 9000 x 2 ints > 2^20 per 60 rows: the per-block packing runs; K % 256 != 0
    cases = {
        FA: (rand_vals((61, K), g, zeros=0.2), rand_vals((K, 24), g)),
        FAB: (rand_vals((61, K), g, zeros=0.2), rand_vals((K, 24), g, zeros=0.2)),
        FG: (rand_vals((61, K), g, -90, 30, 0.2), rand_vals((K, 24), g, -90, 30, 0.2)),
    }
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for mode, (a, b) in cases.items():
            for x in (a, a.t().contiguous().t()):
                out = EXT.pam_mm(x, b, MASKED)
                assert EXT.last_mode() == mode
                assert torch.equal(out, EXT.pam_mm(x, b, 0)), mode
                if mode == FA:  # by default: FA for these 61 rows (FZ's lists > 4 MiB), FZ for 7
                    assert torch.equal(out, EXT.pam_mm(x, b, -1))
                    assert EXT.last_mode() == FA
                    assert torch.equal(out[:7], EXT.pam_mm(x[:7], b, -1))
                    assert EXT.last_mode() == FZ
        a, b = cases[FA]
        assert_close(EXT.pam_mm(a[:7], b), *ref_mm(a[:7], b))  # below the threshold: the packed-up-front path
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_strides_and_empty(impl):
    g = torch.Generator().manual_seed(4)
    a = rand_vals((40, 30), g, zeros=0.1)
    b = rand_vals((50, 40), g)
    at = a.t()  # (30, 40) non-contiguous
    bt = b.t()  # (40, 50)
    want = impl.pam_mm(at.contiguous(), bt.contiguous())
    assert torch.equal(impl.pam_mm(at, bt), want)
    b2 = rand_vals((30, 20), g, zeros=0.1)
    x, y = a[::2, ::3], b2[::3, ::2]  # (20, 10) @ (10, 10), both strided
    assert torch.equal(impl.pam_mm(x, y), impl.pam_mm(x.contiguous(), y.contiguous()))
    dc = rand_vals((20, 10), g)
    for fn in (impl.pam_mm_exact_grad_a, impl.pam_mm_exact_grad_b):
        assert torch.equal(fn(x, y, dc.t().contiguous().t()),
                           fn(x.contiguous(), y.contiguous(), dc))
    z = impl.pam_mm(torch.empty(3, 0), torch.empty(0, 4))
    assert z.shape == (3, 4) and torch.all(z == 0)
    assert impl.pam_mm(torch.empty(0, 5), torch.ones(5, 2)).shape == (0, 2)
    assert impl.pam_mm(torch.ones(2, 5), torch.ones(5, 0)).shape == (2, 0)


def same_bits(x, y):
    """Equal bit patterns (signed zeros told apart), any NaN equal to any NaN."""
    both_nan = torch.isnan(x) & torch.isnan(y)
    return x.shape == y.shape and bool(torch.all(both_nan | (x.view(torch.int32) == y.view(torch.int32))))


@needs_ext
@pytest.mark.parametrize("threads", [1, 2])
def test_zeros_of_a_skipped(threads):
    """FZ (zeros in A, none in B) packs each row of A per reduction block of 64 as the list of
    its normal entries and sums over that list: a zero term adds nothing to a sum that starts
    at +0. Every shape class the driver splits on: partial blocks and partial 16-column strips,
    groups of four strips and a partial group, rows past one 64-row unit, rows and whole blocks
    of zeros (the sum stays +0 whatever the zeros' signs), subnormal and special entries of A
    (skipped, their terms deferred), strided and column-major A, an offset, two threads; bit
    for bit against the masked mode (FA), the scalar path and the reference. FZT: zeros in B
    (none in A) skipped on the transposed product C^T = B^T A^T, against FB likewise."""
    g = torch.Generator().manual_seed(21)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for M, K, N, zeros in ((1, 1, 1, 0.5), (5, 7, 3, 0.3), (13, 64, 16, 0.1), (70, 65, 17, 0.2),
                               (9, 200, 64, 0.5), (130, 129, 65, 0.1), (3, 300, 200, 0.9), (66, 70, 131, 0.2)):
            a = rand_vals((M, K), g, zeros=zeros)
            a[0] = -0.0          # a row of zeros: +0 sums
            a[-1, :K // 2] = 0.0  # whole reduction blocks of zeros in a row
            a.view(torch.int32)[M // 2, ::3] = 5  # subnormals
            b = rand_vals((K, N), g)
            for x in (a, a.t().contiguous().t(), torch.cat([a, a], 0)[::2], torch.cat([a, a], 1)[:, ::2]):
                out = EXT.pam_mm(x, b, -1)
                assert EXT.last_mode() == FZ, (M, K, N)
                assert same_bits(out, EXT.pam_mm(x, b, MASKED)), (M, K, N)
                assert EXT.last_mode() == FA
                assert same_bits(out, EXT.pam_mm(x, b, 0)), (M, K, N)
            assert (out[0].view(torch.int32) == 0).all()  # +0, never -0
            assert_close(out, *ref_mm(x, b))
            s = with_specials(a, g, 0.02)
            s[0, 0] = float("inf")
            out = EXT.pam_mm(s, b, -1)
            assert EXT.last_mode() in (FZ, FG)
            assert same_bits(out, EXT.pam_mm(s, b, 0)), (M, K, N)
            for D in (0x200000, -0x400000):  # offsets alpha = 1.25, 0.75
                out = EXT.pam_mm(a, b, -1, D)
                assert EXT.last_mode() == FZ
                assert same_bits(out, EXT.pam_mm(a, b, 0, D)), (M, K, N, D)
            # FZT: the zeros in B, skipped on the transposed product (B^T's rows), C transposed back
            bt = a.t()   # (K, M), column-major
            x = rand_vals((N, K), g)
            for y, modes in ((bt, (FZT,)), (bt.contiguous(), (FZT,)), (s.t(), (FZT, FG))):
                out = EXT.pam_mm(x, y, -1)
                assert EXT.last_mode() in modes
                assert same_bits(out, EXT.pam_mm(x, y, MASKED)), (M, K, N)
                assert same_bits(out, EXT.pam_mm(x, y, 0)), (M, K, N)
            out = EXT.pam_mm(x, bt, -1, 0x200000)
            assert EXT.last_mode() == FZT
            assert same_bits(out, EXT.pam_mm(x, bt, 0, 0x200000))
            assert (out[:, 0].view(torch.int32) == 0).all()  # B's column of zeros: +0
            assert_close(EXT.pam_mm(x, bt, -1), *ref_mm(x, bt))
        a = rand_vals((2100, 2000), g, zeros=0.001)  # lists past 4 MiB: FA
        b = rand_vals((2000, 3), g)
        out = EXT.pam_mm(a, b, -1)
        assert EXT.last_mode() == FA
        assert same_bits(out, EXT.pam_mm(a, b, 0))
        a = rand_vals((256, 17, 17), g, zeros=0.1)  # attention weights after dropout, batched
        b = rand_vals((256, 17, 16), g)
        out = EXT.pam_bmm(a, b, -1)
        for i in (0, 100, 255):
            assert same_bits(out[i], EXT.pam_mm(a[i], b[i], 0))
    finally:
        torch.set_num_threads(old)


@needs_ext
def test_zero_terms_after_a_flush_to_minus_zero():
    """A partial sum can flush to -0 (FTZ: 1.5 2^-126 - 1.75 2^-126 is subnormal), and then the
    sign of a following zero term shows: -0 + +0 = +0, -0 + -0 = -0. Every vector mode gives
    zero terms PA's sign, sign_a ^ sign_b, and FZ/FZT, which skip zero terms, are not taken
    where a product can be below 2^-103: every path equals the scalar k-order sum, for both
    signs of the zero and of the other operand, zeros in A, in B and in both, and on random
    operands whose sums flush often and end in runs of zero terms."""
    t = 2.0 ** -63
    for z in (0.0, -0.0):
        for s in (1.0, -1.0):
            cases = (([[1.5 * t, -1.75 * t, z]], [[t], [t], [s]]),              # zero in A
                     ([[1.5 * t, -1.75 * t, s]], [[t], [t], [z]]),              # zero in B
                     ([[1.5 * t, -1.75 * t, z, s]], [[t], [t], [s], [-z]]))     # in both
            for a, b in cases:
                a, b = torch.tensor(a), torch.tensor(b)
                want = EXT.pam_mm(a, b, 0)
                assert EXT.last_mode() == SCALAR
                # -0 after the flush, then the zero term(s): -0 only if every one is -0
                neg = all(math.copysign(1, x) * math.copysign(1, y) < 0 for x, y in zip(a[0].tolist(), b[:, 0].tolist())
                          if x * y == 0)
                assert want.item() == 0 and (math.copysign(1, want.item()) < 0) == neg
                for path in (-1, 1, 2):
                    assert same_bits(EXT.pam_mm(a, b, path), want), (a, b, path)
                    assert EXT.last_mode() not in (FZ, FZT, SCALAR)
    g = torch.Generator().manual_seed(22)
    for zeros_a, zeros_b in ((0.9, 0.0), (0.0, 0.9), (0.9, 0.9)):
        a = rand_vals((48, 16), g, -63, -63)   # products in [2^-126, 2^-124): their sums flush
        b = rand_vals((16, 40), g, -63, -63)
        # after three terms mostly zero terms, so that a flushed -0 often stays
        a[:, 3:] = torch.where(torch.rand(48, 13, generator=g) < zeros_a, a[:, 3:] * 0, a[:, 3:])
        b[3:] = torch.where(torch.rand(13, 40, generator=g) < zeros_b, b[3:] * 0, b[3:])
        want = EXT.pam_mm(a, b, 0)
        bits = want.view(torch.int32)
        assert (bits == -(2 ** 31)).sum() > 0 and (bits == 0).sum() > 0  # both zeros occur
        for path in (-1, 1, 2):
            assert same_bits(EXT.pam_mm(a, b, path), want), (zeros_a, zeros_b, path)
        for x, y in ((a, b), (a.t().contiguous().t(), b.t().contiguous().t())):
            assert same_bits(EXT.pam_bmm(x[None], y[None], -1)[0], want)


@needs_ext
@pytest.mark.parametrize("threads", [1, 2])
def test_batched_small_matrices(threads):
    """The batched entries run many small matrices one per thread, each with its own mode
    (specials in some, none in others), views instead of copies and reused packing buffers:
    every matrix must equal the 2-D kernel on it and the reference. Shapes leave partial
    8-lane (statistics) and 16-column (packing) tails; the operands are also transposed views."""
    g = torch.Generator().manual_seed(11)
    nb, M, K, N = 24, 7, 13, 21
    a = rand_vals((nb, M, K), g, zeros=0.05)
    b = rand_vals((nb, K, N), g)
    dc = rand_vals((nb, M, N), g)
    for i in (1, 5, 9):  # specials in the tail columns of some matrices only
        a[i, :, K - 1] = torch.tensor(SPECIALS[:M], dtype=F32)
        b[i + 1, :, N - 1] = torch.tensor(SPECIALS[:K], dtype=F32)
    a[13] = a[13] * 1e-30  # one matrix whose products underflow (general mode)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for x, y in ((a, b), (a.transpose(1, 2).contiguous().transpose(1, 2),
                              b.transpose(1, 2).contiguous().transpose(1, 2))):
            c = cpu.pam_bmm(x, y)
            ga = cpu.pam_bmm_exact_grad_a(x, y, dc)
            gb = cpu.pam_bmm_exact_grad_b(x, y, dc)
            for i in range(nb):
                assert same_bits(c[i], cpu.pam_mm(x[i], y[i])), i
                assert same_bits(ga[i], cpu.pam_mm_exact_grad_a(x[i], y[i], dc[i])), i
                assert same_bits(gb[i], cpu.pam_mm_exact_grad_b(x[i], y[i], dc[i])), i
            for i in (0, 1, 2, 13):
                assert_close(c[i], *ref_mm(x[i], y[i]))
            # the gradient reference does not model a NaN in the operand whose mantissa is
            # added (a for dA: matrix 1; b for dB: matrix 2)
            for i in (0, 2, 13):
                assert_close(ga[i], *ref_grad_a(x[i], y[i], dc[i]))
            for i in (0, 1, 13):
                assert_close(gb[i], *ref_grad_b(x[i], y[i], dc[i]))
        z = cpu.pam_bmm(torch.ones(3, 2, 0), torch.ones(3, 0, 4))
        assert z.shape == (3, 2, 4) and torch.all(z == 0)
        z = cpu.pam_bmm_exact_grad_b(torch.ones(3, 0, 2), torch.ones(3, 2, 4), torch.ones(3, 0, 4))
        assert z.shape == (3, 2, 4) and torch.all(z == 0)
    finally:
        torch.set_num_threads(old)


def _scalar_bmm(x, y, D=0):
    return torch.stack([EXT.pam_mm(x[i], y[i], 0, D) for i in range(x.shape[0])])


@needs_ext
@pytest.mark.parametrize("threads", [1, 2])
def test_small_batches_in_lanes(threads):
    """SB: a batch of at least 8 small matrices (M N K <= 2^15) runs with 8 matrices in the
    vector lanes, every entry one accumulator in k order. Shapes with partial 8-column blocks
    and 8-value runs, batches with a partial group of 8, zeros in A, in B, in both, rows of
    zeros, subnormals, transposed and strided views (batch, rows and columns), offsets, the
    size limit, and two threads: bit for bit against the scalar k-order path, matrix by matrix,
    and close to the reference. A group whose statistics rule the lanes out (an inf, products
    that can underflow or overflow, zeros with products below 2^-103, an operand of only zeros)
    goes through the 2-D kernels; the other groups of the same batch still run in lanes."""
    g = torch.Generator().manual_seed(31)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for nb, M, K, N in ((8, 1, 1, 1), (13, 3, 5, 9), (256, 17, 16, 17), (256, 17, 17, 16),
                            (20, 9, 31, 10), (16, 64, 8, 64), (9, 2, 100, 3), (512, 17, 16, 17)):
            for za, zb in ((0.0, 0.0), (0.1, 0.0), (0.0, 0.1), (0.2, 0.2)):
                a = rand_vals((nb, M, K), g, zeros=za)
                b = rand_vals((nb, K, N), g, zeros=zb)
                if za:
                    a[0, 0] = -0.0                          # a row of zeros
                    a.view(torch.int32)[nb - 1, M - 1, 0] = 3  # a subnormal
                want = _scalar_bmm(a, b)
                for x, y in ((a, b), (a.transpose(1, 2).contiguous().transpose(1, 2), b),
                             (a, b.transpose(1, 2).contiguous().transpose(1, 2))):
                    out = EXT.pam_bmm(x, y, -1)
                    assert EXT.last_mode() == SB, (nb, M, K, N, za, zb)
                    assert same_bits(out, want), (nb, M, K, N, za, zb)
                if za:
                    assert (want[0, 0].view(torch.int32) == 0).all()  # +0, never -0
                for i in (0, nb - 1):
                    assert_close(want[i], *ref_mm(a[i], b[i]))
            # strided views: every other matrix and column of A; every other row of B
            xx = torch.stack([a, a], 1).flatten(0, 1)[::2]
            xx = torch.cat([xx, xx], 2)[:, :, ::2]
            y = torch.cat([b, b], 1)[:, ::2]
            out = EXT.pam_bmm(xx, y, -1)
            assert EXT.last_mode() == SB
            assert same_bits(out, _scalar_bmm(xx, y))
            for D in (0x200000, -0x400000):  # offsets alpha = 1.25, 0.75
                out = EXT.pam_bmm(a, b, -1, D)
                assert EXT.last_mode() == SB
                assert same_bits(out, _scalar_bmm(a, b, D))
        # groups the lanes rule out, beside groups they take
        nb, M, K, N = 40, 17, 16, 17
        a = rand_vals((nb, M, K), g, zeros=0.1)
        b = rand_vals((nb, K, N), g)
        a[3, 2, 5] = float("inf")                      # group 0
        b[9, 0, 0] = float("nan")                      # group 1
        a[17] = rand_vals((M, K), g, -63, -62, 0.3)    # group 2: zeros, products near 2^-126
        b[17] = rand_vals((K, N), g, -63, -62)
        a[27] *= 2.0 ** 100                            # group 3: products can overflow
        a[32:40] = 0.0                                 # group 4: an operand of only zeros
        out = EXT.pam_bmm(a, b, -1)
        assert EXT.last_mode() != SB
        assert same_bits(out, _scalar_bmm(a, b))
        assert (out[32:].view(torch.int32) == 0).all()
        a[3, 2, 5] = 1.0
        b[9, 0, 0] = 1.0
        a[17], b[17], a[27], a[32:] = 1.0, 1.0, 1.0, 1.0
        out = EXT.pam_bmm(a, b, -1)
        assert EXT.last_mode() == SB
        assert same_bits(out, _scalar_bmm(a, b))
        # no zeros, products near 2^-126: F0's arithmetic, partial sums flushed (FTZ) in lanes
        a = rand_vals((16, 17, 16), g, -63, -62)
        b = rand_vals((16, 16, 17), g, -63, -62)
        out = EXT.pam_bmm(a, b, -1)
        assert EXT.last_mode() == SB
        assert same_bits(out, _scalar_bmm(a, b))
        assert (out.view(torch.int32) == -(2 ** 31)).any()  # a sum flushed to -0
    finally:
        torch.set_num_threads(old)


@needs_ext
def test_threads_agree():
    g = torch.Generator().manual_seed(5)
    a = rand_vals((70, 90), g, zeros=0.1)
    b = rand_vals((90, 150), g)
    dc = rand_vals((70, 150), g)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        r1 = (cpu.pam_mm(a, b), cpu.pam_mm_exact_grad_a(a, b, dc), cpu.pam_mm_exact_grad_b(a, b, dc))
        torch.set_num_threads(2)
        r2 = (cpu.pam_mm(a, b), cpu.pam_mm_exact_grad_a(a, b, dc), cpu.pam_mm_exact_grad_b(a, b, dc))
    finally:
        torch.set_num_threads(old)
    for x, y in zip(r1, r2):
        assert torch.equal(x, y)


def test_validation():
    for impl in (cpu, fb):
        with pytest.raises(ValueError, match="cannot be multiplied"):
            impl.pam_mm(torch.ones(2, 3), torch.ones(4, 5))
        with pytest.raises(ValueError, match="2-D"):
            impl.pam_mm(torch.ones(2, 3, 1), torch.ones(3, 5))
        with pytest.raises(TypeError, match="float32"):
            impl.pam_mm(torch.ones(2, 3, dtype=torch.float64), torch.ones(3, 5))
        with pytest.raises(ValueError, match="dc must have shape"):
            impl.pam_mm_exact_grad_a(torch.ones(2, 3), torch.ones(3, 5), torch.ones(2, 4))
        with pytest.raises(ValueError, match="dc must have shape"):
            impl.pam_mm_exact_grad_b(torch.ones(2, 3), torch.ones(3, 5), torch.ones(5, 2))


# ---------------------------------------------------------------- exact gradients
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (7, 33, 65), (33, 17, 5), (20, 9, 40)])
def test_grads_random(impl, M, K, N):
    g = torch.Generator().manual_seed(M + 7 * K + 31 * N)
    a = rand_vals((M, K), g, zeros=0.1)
    b = rand_vals((K, N), g, zeros=0.1)
    dc = rand_vals((M, N), g, zeros=0.1)
    ga = impl.pam_mm_exact_grad_a(a, b, dc)
    gb = impl.pam_mm_exact_grad_b(a, b, dc)
    assert ga.shape == (M, K) and gb.shape == (K, N)
    assert ga.is_contiguous() and gb.is_contiguous()
    assert_close(ga, *ref_grad_a(a, b, dc))
    assert_close(gb, *ref_grad_b(a, b, dc))


@pytest.mark.parametrize("impl", IMPLS)
def test_grads_specials_and_ranges(impl):
    g = torch.Generator().manual_seed(11)
    a = with_specials(rand_vals((9, 20), g, -100, 100), g, 0.06)
    b = with_specials(rand_vals((20, 11), g, -100, 100), g, 0.06)
    dc = rand_vals((9, 11), g, -60, 60, zeros=0.1)
    dc[0, 0] = 1e-41  # subnormal dC -> zero
    assert_close(impl.pam_mm_exact_grad_a(a, b, dc), *ref_grad_a(a, b, dc))
    assert_close(impl.pam_mm_exact_grad_b(a, b, dc), *ref_grad_b(a, b, dc))
    # huge operands (2^(E+c) = 2^128 possible) and inf/NaN in dC
    a2 = rand_vals((4, 6), g, 100, 127)
    b2 = rand_vals((6, 5), g, 100, 127)
    dc2 = rand_vals((4, 5), g, -130, -100)
    dc2[1, 1] = float("inf")
    dc2[2, 3] = float("nan")
    b2[2, 1] = 0.0
    b2[3, 3] = float("inf")
    a2[1, 2] = float("-inf")
    assert_close(impl.pam_mm_exact_grad_a(a2, b2, dc2), *ref_grad_a(a2, b2, dc2))
    assert_close(impl.pam_mm_exact_grad_b(a2, b2, dc2), *ref_grad_b(a2, b2, dc2))


@pytest.mark.parametrize("impl", IMPLS)
def test_grads_overflowing_terms_keep_their_inf(impl):
    """Terms that overflow are inf before they are added: -inf + inf = NaN (a fused
    multiply-add would keep the huge product exact and return -inf)."""
    a = torch.tensor([[1.0]])
    b = torch.tensor([[2.0 ** 100, 2.0 ** 100, 1.0]])
    dc = torch.tensor([[-2.0 ** 100, 2.0 ** 100, 1.0]])
    ga = impl.pam_mm_exact_grad_a(a, b, dc)
    assert torch.isnan(ga).all(), ga
    assert_close(ga, *ref_grad_a(a, b, dc))
    a2 = torch.tensor([[2.0 ** 100], [2.0 ** 100], [1.0]])
    dc2 = torch.tensor([[-2.0 ** 100], [2.0 ** 100], [1.0]])
    gb = impl.pam_mm_exact_grad_b(a2, torch.tensor([[1.0]]), dc2)
    assert torch.isnan(gb).all(), gb
    big = rand_vals((13, 40), torch.Generator().manual_seed(5), 60, 120)
    bb = rand_vals((40, 17), torch.Generator().manual_seed(6), 60, 120)
    dd = rand_vals((13, 17), torch.Generator().manual_seed(7), 60, 120)
    assert_close(impl.pam_mm_exact_grad_a(big, bb, dd), *ref_grad_a(big, bb, dd))
    assert_close(impl.pam_mm_exact_grad_b(big, bb, dd), *ref_grad_b(big, bb, dd))


def same(x, y):
    """Bitwise-equal values, NaN == NaN."""
    return torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num())


@needs_ext
def test_grad_paths_agree():
    g = torch.Generator().manual_seed(12)
    for lo, hi in ((-20, 20), (-100, 60), (-120, 120)):
        a = rand_vals((19, 45), g, lo, hi, zeros=0.1)
        b = rand_vals((45, 23), g, lo, hi, zeros=0.1)
        dc = rand_vals((19, 23), g, lo, hi, zeros=0.1)
        for fn, ffn in ((EXT.pam_mm_exact_grad_a, fb.pam_mm_exact_grad_a),
                        (EXT.pam_mm_exact_grad_b, fb.pam_mm_exact_grad_b)):
            out = fn(a, b, dc, -1)
            assert same(out, fn(a, b, dc, 0))
            assert same(out, fn(a, b, dc, 1))
            assert same(out, ffn(a, b, dc))


def _piece_safe(shape, gen, lo, hi, low_mant):
    """Values whose mantissa fraction lies in [lo, hi) (bit-level), random exponents."""
    e = torch.randint(-8, 9, shape, generator=gen)
    m = torch.randint(int(lo * 2 ** 23), int(hi * 2 ** 23), shape, generator=gen)
    if low_mant is not None:  # half the entries in [0, 0.2), half in [0.7, 0.95)
        m2 = torch.randint(int(0.7 * 2 ** 23), int(0.95 * 2 ** 23), shape, generator=gen)
        m = torch.where(torch.rand(shape, generator=gen) < 0.5, m, m2)
    s = torch.randint(0, 2, shape, generator=gen)
    return _bits_to_f32((s << 31) | ((e + 127) << 23) | m)


@pytest.mark.parametrize("impl", IMPLS)
def test_grads_finite_differences(impl):
    """Inside one affine piece PAM is affine in each operand: a central difference with a
    power-of-two step is exact and must equal the exact gradient."""
    g = torch.Generator().manual_seed(13)
    M, K, N = 3, 4, 50
    a = _piece_safe((M, K), g, 0.40, 0.45, None)
    b = _piece_safe((K, N), g, 0.0, 0.2, True)
    dc = rand_vals((M, N), g, -4, 4)
    ga = impl.pam_mm_exact_grad_a(a, b, dc).double().numpy()
    gb = impl.pam_mm_exact_grad_b(a, b, dc).double().numpy()
    A, B, D = a.double().numpy(), b.double().numpy(), dc.double().numpy()
    for i in range(M):
        for k in range(K):
            h = 2.0 ** (np.frexp(abs(A[i, k]))[1] - 1 - 12)  # 2^(E_a - 12)
            # kernel forward with K=1: single products, exact
            row_p = impl.pam_mm(torch.tensor([[A[i, k] + h]], dtype=F32), b[k:k + 1]).double().numpy()[0]
            row_m = impl.pam_mm(torch.tensor([[A[i, k] - h]], dtype=F32), b[k:k + 1]).double().numpy()[0]
            fd = np.sum(D[i] * (row_p - row_m) / (2 * h))
            assert abs(fd - ga[i, k]) <= N * EPS * np.sum(np.abs(D[i] * (row_p - row_m) / (2 * h))) + 1e-30
    for k in range(K):
        for j in range(N):
            h = 2.0 ** (np.frexp(abs(B[k, j]))[1] - 1 - 12)
            col_p = pam(A[:, k], B[k, j] + h, F32)
            col_m = pam(A[:, k], B[k, j] - h, F32)
            fdt = D[:, j] * (col_p - col_m) / (2 * h)
            assert abs(fdt.sum() - gb[k, j]) <= M * EPS * np.abs(fdt).sum() + 1e-30


# ---------------------------------------------------------------- fallback
@needs_ext
def test_fallback_bit_identical_larger():
    g = torch.Generator().manual_seed(21)
    a = rand_vals((40, 300), g, zeros=0.2)
    b = rand_vals((300, 24), g, zeros=0.05)
    dc = rand_vals((40, 24), g)
    assert torch.equal(cpu.pam_mm(a, b), fb.pam_mm(a, b))
    assert torch.equal(cpu.pam_mm_exact_grad_a(a, b, dc), fb.pam_mm_exact_grad_a(a, b, dc))
    assert torch.equal(cpu.pam_mm_exact_grad_b(a, b, dc), fb.pam_mm_exact_grad_b(a, b, dc))


def test_no_extension_env_forces_fallback():
    code = (
        "import torch\n"
        "from pamtorch.kernels import cpu\n"
        "assert not cpu.available() and cpu.backend() == 'torch'\n"
        "a = torch.randn(5, 6); b = torch.randn(6, 7)\n"
        "from pamtorch.kernels import torch_fallback as fb\n"
        "assert torch.equal(cpu.pam_mm(a, b), fb.pam_mm(a, b))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PAMTORCH_NO_EXTENSION="1",
               PYTHONPATH=_SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


@needs_ext
def test_block_edges_match_scalar_path():
    """Sizes crossing the cache blocks (rows 80/64, columns 128, reduction 256) and the
    micro-tile edges: vector modes equal the scalar path bit for bit."""
    g = torch.Generator().manual_seed(31)
    M, K, N = 171, 520, 150
    for za, zb, lo in ((0, 0, -20), (0, 0.2, -20), (0.3, 0, -20), (0.3, 0.2, -20), (0.1, 0.1, -90)):
        a = rand_vals((M, K), g, lo, 20, zeros=za)
        b = rand_vals((K, N), g, lo, 20, zeros=zb)
        assert torch.equal(EXT.pam_mm(a, b, -1), EXT.pam_mm(a, b, 0))
    a = rand_vals((170, 140), g, zeros=0.1)
    b = rand_vals((140, 133), g, zeros=0.1)
    dc = rand_vals((170, 133), g, zeros=0.1)
    for fn in (EXT.pam_mm_exact_grad_a, EXT.pam_mm_exact_grad_b):
        assert torch.equal(fn(a, b, dc, -1), fn(a, b, dc, 0))


def test_bench_smoke():
    from pamtorch.bench import bench_matmul, format_matmul_table

    rows = bench_matmul(sizes=(24,), reps=1, naive_max=24)
    assert rows[0]["n"] == 24 and rows[0]["fwd_ratio"] > 0
    assert "| 24 |" in format_matmul_table(rows)


def test_failed_build_warns_and_falls_back(tmp_path):
    """No working compiler: one clear warning, then the pure-torch fallback."""
    code = (
        "import warnings, torch\n"
        "from pamtorch.kernels import cpu\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    out = cpu.pam_mm(torch.ones(2, 3), torch.ones(3, 2))\n"
        "    cpu.pam_mm(torch.ones(2, 3), torch.ones(3, 2))\n"
        "assert torch.equal(out, torch.full((2, 2), 3.0))\n"
        "msgs = [str(x.message) for x in w if 'could not build' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert not cpu.available()\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), CXX="/bin/false",
               PYTHONPATH=_SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PAMTORCH_NO_EXTENSION", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
    assert "compiling" in r.stderr
