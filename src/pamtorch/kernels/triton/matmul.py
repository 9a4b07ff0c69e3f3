"""Triton kernels for piecewise affine (PAM) matrix products, float32 in, float32 out.

Three entry points, the same as the C++ CPU kernel and the pure-torch fallback:

* ``pam_mm(a[M,K], b[K,N]) -> [M,N]``: ``C[i,j] = sum_k PAM(A[i,k], B[k,j])``.
* ``pam_mm_exact_grad_a(a, b, dc[M,N]) -> [M,K]``: exact derivative w.r.t. ``a``.
* ``pam_mm_exact_grad_b(a, b, dc) -> [K,N]``: exact derivative w.r.t. ``b``.

Every entry takes ``offset`` (None, or α with 0.5 <= α <= 2): each term is then
``PAM(A[i,k], B[k,j], offset=α)``, the integer ``D = P_α - 0x3F800000`` added to its
pattern (``D`` is folded into ``T`` below), and the exact kernels differentiate those terms.

Batched versions ``pam_bmm``, ``pam_bmm_exact_grad_a``, ``pam_bmm_exact_grad_b`` take
``[B,M,K]``/``[B,K,N]`` operands (any strides, stride-0 broadcast batches included) and
run all batch entries in one launch (grid axis 1); the 2-D functions are batch 1.

The approximate backward products are ``pam_mm(dc, b.t())`` and ``pam_mm(a.t(), dc)``:
every kernel takes arbitrary strides, so transposed views are never copied.
``pam_mm_exact_grad_b`` is the ``grad_a`` kernel run on transposed views
(``dB^T = grad_a(B^T, A^T, dC^T)``, the carry is symmetric in the two mantissas).

Inner product. ``tl.dot`` multiplies, so it cannot be used. Each program owns a
``[BLOCK_M, BLOCK_N]`` tile of the output held in registers and walks the reduction
dimension one index at a time, adding a rank-1 "outer PAM product" of a column of A
and a row of B (the classic CUDA-core SGEMM structure: no cross-thread reductions,
the per-operand decoding is done once per loaded element and amortised over the
other tile dimension). The same code runs under ``TRITON_INTERPRET=1`` on CPU
tensors, where each loop step is a handful of numpy operations on a tile.

Integer formulation of one PAM product (all int32, see ``_decode_x``/``_decode_y``):
with magnitude patterns ``Pa``, ``Pb`` and ``T = Pa - 0x3F800000 + D`` the result pattern
is ``T + Pb``. Instead of forming it in a wider type, overflow and underflow are
tested against per-operand limits that cannot overflow,
``T >= 0x7F800000 - Pb`` (result >= inf pattern) and ``T < 0x00800000 - Pb`` (result
below the smallest normal). Zero/subnormal and infinite operands are encoded as
sentinel values of ``T`` and of the two limits chosen so that the same two comparisons
give: zero -> underflow, inf -> overflow, inf x zero -> both (NaN). NaN operands are
handled outside the inner loop: each program accumulates ``NaN`` (else ``-0.0``, the
exact additive identity) per row and per column and adds those vectors once at the end.
"""
import os

import torch
# Only Triton builtins are used inside the kernels (no ``tl.cdiv``/``tl.zeros``, which are
# themselves jit functions): the kernels then also run under TRITON_INTERPRET=1 when
# triton.language was imported before the variable was set.
import triton
import triton.language as tl

from pamtorch.kernels import offset_d  # absolute: tests load this file on its own

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# ---- bit-pattern constants (all fit in int32) ----------------------------------------
# Named here for the record; the kernels spell them as literals (int32 constants).
_BIAS = 0x3F800000        # pattern of 1.0
_MIN_NORMAL = 0x00800000  # smallest normal pattern; also 1 << 23
_INF = 0x7F800000
_QNAN = 0x7FC00000
_ABS = 0x7FFFFFFF
_MANT = 0x007FFFFF
_EXP = 0x7F800000
_INT_MIN = -2147483648
_INT_MAX = 2147483647

# sentinels of the "x" side (T, or the exponent shift of the exact kernel)
_X_ZERO = _INT_MIN        # below every lo limit, never >= a finite hi limit
_X_INF = 0x7F000000       # >= every normal hi limit and the zero-y hi, < the zero-y lo limit
# limits of the "y" side for zero and infinite y
_Y_ZERO_HI = 0x41000000   # above every normal x (T, shift <= 0x40800000 for |D| <= 2^23): no overflow ...
_Y_ZERO_LO = _INT_MAX     # ... always underflow (x_inf: both -> NaN)
_Y_INF_HI = _INT_MIN      # always overflow ...
_Y_INF_LO = _INT_MIN + 1  # ... underflow only for x_zero (-> NaN)


@triton.jit
def _bits(x):
    return x.to(tl.int32, bitcast=True)


@triton.jit
def _nan_term(is_nan):
    """NaN where ``is_nan`` else -0.0 (the exact additive identity)."""
    return tl.where(is_nan, 0x7FC00000, -2147483648).to(tl.float32, bitcast=True)


@triton.jit
def _neg_zeros(n: tl.constexpr):
    return tl.full((n,), -2147483648, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _neg_zeros_2d(m: tl.constexpr, n: tl.constexpr):
    # sums start at -0.0, the exact additive identity: an all -0.0 sum stays -0.0
    return tl.full((m, n), -2147483648, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _decode_x_fwd(x, D):
    """Left operand of a forward PAM with offset D: (T code, sign bit, NaN-or--0.0 float)."""
    xi = _bits(x)
    p = xi & 0x7FFFFFFF
    s = xi ^ p
    t = tl.where(p < 0x00800000, -2147483648,
                 tl.where(p >= 0x7F800000, 0x7F000000, p - (0x3F800000 - D)))
    nan = _nan_term(p > 0x7F800000)
    return t, s, nan


@triton.jit
def _decode_y(y):
    """Right operand (the one whose pattern is added): (P, hi, lo, sign, NaN term)."""
    yi = _bits(y)
    p = yi & 0x7FFFFFFF
    s = yi ^ p
    zero = p < 0x00800000
    inf = p >= 0x7F800000
    hi = tl.where(zero, 0x41000000, tl.where(inf, -2147483648, 0x7F800000 - p))
    lo = tl.where(zero, 2147483647, tl.where(inf, -2147483647, 0x00800000 - p))
    nan = _nan_term(p > 0x7F800000)
    return p, hi, lo, s, nan


@triton.jit
def _combine(x, p, hi, lo, s):
    """Float result of pattern ``x + p`` with the range rules, sign bits ``s``."""
    ovf = x >= hi
    unf = x < lo
    r = tl.where(ovf, tl.where(unf, 0x7FC00000, 0x7F800000), tl.where(unf, 0, x + p))
    return (r | s).to(tl.float32, bitcast=True)


@triton.jit
def _pam_mm_kernel(a_ptr, b_ptr, c_ptr, M, N, K,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                   stride_ab, stride_bb, stride_cb, D, MB, NB, KB,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)  # one batch entry per grid row (2-D: batch 0)
    a_ptr += batch * stride_ab
    b_ptr += batch * stride_bb
    c_ptr += batch * stride_cb
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m.to(tl.int64) * stride_am
    b_ptrs = b_ptr + offs_n.to(tl.int64) * stride_bn

    acc = _neg_zeros_2d(BLOCK_M, BLOCK_N)
    nan_m = _neg_zeros(BLOCK_M)
    nan_n = _neg_zeros(BLOCK_N)
    for k in range(0, K):
        a = tl.load(a_ptrs, mask=mask_m, other=0.0)
        b = tl.load(b_ptrs, mask=mask_n, other=0.0)
        t, sa, na = _decode_x_fwd(a, D)
        pb, hi, lo, sb, nb = _decode_y(b)
        nan_m += na
        nan_n += nb
        acc += _combine(t[:, None], pb[None, :], hi[None, :], lo[None, :],
                        sa[:, None] ^ sb[None, :])
        a_ptrs += stride_ak
        b_ptrs += stride_bk
    acc = acc + nan_m[:, None] + nan_n[None, :]

    c_ptrs = (c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm
              + offs_n.to(tl.int64)[None, :] * stride_cn)
    tl.store(c_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _pam_mm_exact_grad_a_kernel(a_ptr, b_ptr, g_ptr, o_ptr, M, N, K,
                                stride_am, stride_ak, stride_bk, stride_bn,
                                stride_gm, stride_gn, stride_om, stride_ok,
                                stride_ab, stride_bb, stride_gb, stride_ob, D, MB, NB, KB,
                                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                                GROUP_M: tl.constexpr):
    """dA[i,k] = sum_j PAM-shift of dC[i,j] by sign(B[k,j]) 2^(E_B[k,j] + carry), with the
    offset D = E_α·2^23 + M_α: 2^(E_B + E_α + floor((M_A + M_B + M_α) / 2^23))."""
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    a_ptr += batch * stride_ab
    b_ptr += batch * stride_bb
    g_ptr += batch * stride_gb
    o_ptr += batch * stride_ob
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_k = (K + BLOCK_K - 1) // BLOCK_K
    num_pid_in_group = GROUP_M * num_pid_k
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_k = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    om = offs_m.to(tl.int64)
    ok = offs_k.to(tl.int64)

    # mantissa fields of the A tile; zero/subnormal count as 0 (inf has field 0)
    a = tl.load(a_ptr + om[:, None] * stride_am + ok[None, :] * stride_ak,
                mask=mask_m[:, None] & mask_k[None, :], other=0.0)
    pa = _bits(a) & 0x7FFFFFFF
    ma = tl.where(pa < 0x00800000, 0, pa & 0x007FFFFF)

    g_ptrs = g_ptr + om * stride_gm
    b_ptrs = b_ptr + ok * stride_bk
    acc = _neg_zeros_2d(BLOCK_M, BLOCK_K)
    nan_m = _neg_zeros(BLOCK_M)
    nan_k = _neg_zeros(BLOCK_K)
    for j in range(0, N):
        g = tl.load(g_ptrs, mask=mask_m, other=0.0)
        b = tl.load(b_ptrs, mask=mask_k, other=0.0)
        # dC is the "y" operand: its pattern gets the exponent shift added
        pg, hi, lo, sg, ng = _decode_y(g)
        # B gives the shift (E_B << 23) and the carry threshold on A's mantissa
        bi = _bits(b)
        pb = bi & 0x7FFFFFFF
        sb = bi ^ pb
        bnorm = (pb >= 0x00800000) & (pb < 0x7F800000)
        x0 = tl.where(pb < 0x00800000, -2147483648,
                      tl.where(pb >= 0x7F800000, 0x7F000000,
                               (pb & 0x7F800000) - 0x3F800000 + (D & -8388608)))
        # B's and α's mantissa (0 for a zero/special B, whose sentinel must stay exact):
        # adding A's and masking to whole binades gives floor(sum / 2^23) << 23
        mb = tl.where(bnorm, (pb & 0x007FFFFF) + (D & 0x007FFFFF), 0)
        nb = _nan_term(pb > 0x7F800000)
        nan_m += ng
        nan_k += nb
        x = x0[None, :] + ((ma + mb[None, :]) & -8388608)
        acc += _combine(x, pg[:, None], hi[:, None], lo[:, None], sg[:, None] ^ sb[None, :])
        g_ptrs += stride_gn
        b_ptrs += stride_bn
    acc = acc + nan_m[:, None] + nan_k[None, :]
    tl.store(o_ptr + om[:, None] * stride_om + ok[None, :] * stride_ok, acc,
             mask=mask_m[:, None] & mask_k[None, :])


# ---- launch configuration ------------------------------------------------------------

def _gpu_configs():
    # Outer-product tiles on CUDA cores: each thread keeps BM*BN/(32*warps) accumulators;
    # 64 per thread (128x128, 8 warps) is the largest that stays clear of spills.
    cfgs = []
    for bm, bn, warps, stages in ((128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 2),
                                  (64, 128, 4, 2), (64, 64, 4, 2), (64, 64, 2, 3),
                                  (32, 64, 2, 2)):
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8},
                                  num_warps=warps, num_stages=stages))
    return cfgs


def _rename(cfgs, old, new):
    out = []
    for c in cfgs:
        kw = dict(c.kwargs)
        kw[new] = kw.pop(old)
        out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


if INTERPRET:
    # fixed small tiles: the interpreter runs numpy per tile, and tests use odd shapes
    _INTERP_BLOCK = 16
    _mm = _pam_mm_kernel
    _grad_kernel = _pam_mm_exact_grad_a_kernel
else:
    # Tuned per power-of-two bucket of the sizes (MB, NB, KB; unused by the kernels), not per
    # exact size: a training run with variable sequence lengths would otherwise re-tune (time
    # every config) at each new length.
    _mm = triton.autotune(configs=_gpu_configs(), key=["MB", "NB", "KB"])(_pam_mm_kernel)
    _grad_kernel = triton.autotune(configs=_rename(_gpu_configs(), "BLOCK_N", "BLOCK_K"),
                                   key=["MB", "NB", "KB"])(_pam_mm_exact_grad_a_kernel)


def _interp_meta(*names):
    meta = {n: _INTERP_BLOCK for n in names}
    meta["GROUP_M"] = 4
    return meta


# ---- host wrappers -------------------------------------------------------------------

_MAX_GRID_Y = 65535  # CUDA limit of the second grid dimension (the batch)


def _check(name, t, ndim=2):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name}: expected dtype torch.float32, got {t.dtype}")
    if not (t.is_cuda or INTERPRET):
        raise ValueError(f"{name}: the Triton kernels need a CUDA tensor (or "
                         f"TRITON_INTERPRET=1 set before import), got device {t.device}")


def _bucket(n: int) -> int:
    """The autotuning key of a size: the next power of two, at least 16."""
    return 1 << max(4, (int(n) - 1).bit_length())


def _launch(kernel, names, rows, cols, tensors, sizes, strides, D):
    """Launch over batches (leading dim of every tensor in ``tensors``), in chunks of
    the grid's y limit. ``strides``: the per-matrix strides (batch stride is dim 0);
    ``D``: the offset's integer."""
    nb = tensors[0].shape[0]
    for b0 in range(0, nb, _MAX_GRID_Y):
        part = [t[b0:b0 + _MAX_GRID_Y] for t in tensors]
        bstrides = [t.stride(0) for t in part]
        args = (*part, *sizes, *strides, *bstrides, D, *(_bucket(x) for x in sizes))
        n = part[0].shape[0]
        if INTERPRET:
            meta = _interp_meta(*names)
            grid = (triton.cdiv(rows, meta[names[0]]) * triton.cdiv(cols, meta[names[1]]), n)
            kernel[grid](*args, **meta)
        else:
            def grid(meta, n=n):
                return (triton.cdiv(rows, meta[names[0]]) * triton.cdiv(cols, meta[names[1]]), n)
            kernel[grid](*args)


def _bmm(a, b, offset):
    """c[B,M,N] = a[B,M,K] @PAM b[B,K,N] (validated float32 3-D tensors)."""
    nb, M, K = a.shape
    N = b.shape[2]
    if nb == 0 or M == 0 or N == 0 or K == 0:  # an empty sum is +0.0, as in torch.matmul
        return torch.zeros((nb, M, N), dtype=torch.float32, device=a.device)
    c = torch.empty((nb, M, N), dtype=torch.float32, device=a.device)
    _launch(_mm, ("BLOCK_M", "BLOCK_N"), M, N, (a, b, c), (M, N, K),
            (a.stride(1), a.stride(2), b.stride(1), b.stride(2), c.stride(1), c.stride(2)),
            offset_d(offset))
    return c


def _grad(x, y, g, out, offset):
    """out[B,M,K] = exact grad w.r.t. x of (x[B,M,K] @PAM y[B,K,N]) for upstream g[B,M,N]."""
    nb, M, K = x.shape
    N = y.shape[2]
    if nb == 0 or M == 0 or K == 0:
        return out
    if N == 0:
        return out.zero_()
    _launch(_grad_kernel, ("BLOCK_M", "BLOCK_K"), M, K, (x, y, g, out), (M, N, K),
            (x.stride(1), x.stride(2), y.stride(1), y.stride(2),
             g.stride(1), g.stride(2), out.stride(1), out.stride(2)), offset_d(offset))
    return out


def _check_ab(a, b, ndim):
    _check("a", a, ndim)
    _check("b", b, ndim)
    if a.shape[-1] != b.shape[-2] or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"inner dimensions differ: a is {tuple(a.shape)}, "
                         f"b is {tuple(b.shape)}")


def _check_grad_args(a, b, dc, ndim=2):
    _check_ab(a, b, ndim)
    _check("dc", dc, ndim)
    want = (*a.shape[:-1], b.shape[-1])
    if tuple(dc.shape) != want:
        raise ValueError(f"dc: expected shape {want}, got {tuple(dc.shape)}")


def pam_mm(a, b, offset=None):
    """``C = A @PAM B`` for float32 ``a[M,K]``, ``b[K,N]`` (any strides)."""
    _check_ab(a, b, 2)
    return _bmm(a[None], b[None], offset)[0]


def pam_mm_exact_grad_a(a, b, dc, offset=None):
    """Exact derivative of ``a @PAM b`` w.r.t. ``a`` for upstream ``dc``: ``[M,K]``."""
    _check_grad_args(a, b, dc)
    return pam_bmm_exact_grad_a(a[None], b[None], dc[None], offset)[0]


def pam_mm_exact_grad_b(a, b, dc, offset=None):
    """Exact derivative of ``a @PAM b`` w.r.t. ``b`` for upstream ``dc``: ``[K,N]``."""
    _check_grad_args(a, b, dc)
    return pam_bmm_exact_grad_b(a[None], b[None], dc[None], offset)[0]


def pam_bmm(a, b, offset=None):
    """Batched ``a[B,M,K] @PAM b[B,K,N]`` in one launch (any strides, stride-0 batches too)."""
    _check_ab(a, b, 3)
    return _bmm(a, b, offset)


def pam_bmm_exact_grad_a(a, b, dc, offset=None):
    """Batched exact derivative w.r.t. ``a``: ``[B,M,K]``."""
    _check_grad_args(a, b, dc, 3)
    out = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    return _grad(a, b, dc, out, offset)


def pam_bmm_exact_grad_b(a, b, dc, offset=None):
    """Batched exact derivative w.r.t. ``b``: ``[B,K,N]``."""
    _check_grad_args(a, b, dc, 3)
    out = torch.empty(b.shape, dtype=torch.float32, device=b.device)
    # dB^T = grad_a(B^T, A^T, dC^T): views only, the output written through its strides
    # (the carry, and the offset's share of it, are symmetric in the two mantissas)
    _grad(b.transpose(1, 2), a.transpose(1, 2), dc.transpose(1, 2), out.transpose(1, 2), offset)
    return out
