"""Chunked pure-torch versions of the PAM matrix-product kernels.

Slow but dependency-free: used when the compiled CPU extension is unavailable (no
compiler, failed build, or ``PAMTORCH_NO_EXTENSION=1``) and as a readable statement of
the integer rules. Everything is done on int64 copies of the float32 bit patterns with
integer adds, compares and masks; no float multiplication is used. The reduction is a
sequential float32 accumulation over the reduction index (``C += term_k``), the same
order as the compiled kernels, so both agree bit for bit except where the compiled
kernels flush a subnormal *partial sum* (FTZ), which this module does not emulate.

Temporaries are bounded: the reduction and the rows are processed in chunks so that
the live int64 intermediates stay under about 64 MiB, never M*N*K.
"""
from __future__ import annotations

import torch

from . import offset_d

__all__ = ["pam_mm", "pam_mm_exact_grad_a", "pam_mm_exact_grad_b", "pam_terms", "exact_grad_terms"]

_BIAS = 0x3F800000
_MINN = 0x00800000
_INF = 0x7F800000
_QNAN = 0x7FC00000
_SIGN = 0x80000000
_ABS = 0x7FFFFFFF
_BUDGET_BYTES = 64 << 20
_BYTES_PER_ELEM = 80  # generous estimate of live int64/bool temporaries per term


def _u32(x: torch.Tensor) -> torch.Tensor:
    """float32 tensor -> int64 tensor holding its unsigned 32-bit patterns."""
    return x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _to_f32(bits: torch.Tensor) -> torch.Tensor:
    """int64 tensor of unsigned 32-bit patterns -> float32 tensor."""
    signed = torch.where(bits >= _SIGN, bits - (1 << 32), bits)
    return signed.to(torch.int32).view(torch.float32)


def pam_terms(ua: torch.Tensor, ub: torch.Tensor, specials: bool = True, d: int = 0) -> torch.Tensor:
    """Elementwise PAM of two broadcastable int64 pattern tensors (from ``_u32``),
    returned as float32: pattern |a| + |b| - B + d, ``d`` the offset's P_α - B.
    ``specials=False`` skips the inf/NaN rules (faster) and is only valid when neither
    operand holds inf/NaN."""
    pa = ua & _ABS
    pb = ub & _ABS
    s = (ua ^ ub) & _SIGN
    za = pa < _MINN
    zb = pb < _MINN
    t = pa + pb - (_BIAS - d)
    zero = (t < _MINN) | za | zb
    mag = t.clamp_(max=_INF).masked_fill_(zero, 0)
    if specials:
        ia = pa == _INF
        ib = pb == _INF
        anyinf = ia | ib
        mag = torch.where(anyinf, torch.full_like(mag, _INF), mag)
        bits = mag | s
        nan = (pa > _INF) | (pb > _INF) | (anyinf & (za | zb))
        bits = bits.masked_fill_(nan, _QNAN)
    else:
        bits = mag | s
    return _to_f32(bits)


def exact_grad_terms(ud: torch.Tensor, uq: torch.Tensor, mo: torch.Tensor,
                     specials: bool = True, d: int = 0) -> torch.Tensor:
    """One term of an exact gradient, elementwise (int64 patterns, broadcastable):
    dC * sign(q) * 2^(E_q + floor((mant(q) + mo + d) / 2^23)) (without offset, d = 0:
    2^(E_q + carry)), by exponent arithmetic on dC's pattern (flush to 0 below the
    smallest normal, inf on overflow). q zero/subnormal gives dC*0 (NaN for an inf/NaN
    dC); q inf/NaN gives PAM(q, dC) with the offset."""
    pd = ud & _ABS
    pq = uq & _ABS
    s = (ud ^ uq) & _SIGN
    e = (pq >> 23) - 127 + (((pq & 0x7FFFFF) + mo + d) >> 23)  # arithmetic shift: floor
    t = pd + (e << 23)
    zero = (t < _MINN) | (pd < _MINN) | (pq < _MINN)
    mag = t.clamp_(max=_INF).masked_fill_(zero, 0)
    bits = mag | s
    if specials:
        dinf = pd == _INF
        bits = torch.where(dinf, s | _INF, bits)
        bits = bits.masked_fill_((dinf & (pq < _MINN)) | (pd > _INF), _QNAN)
        qspec = pq >= _INF
        if bool(qspec.any()):
            pamq = _u32(pam_terms(uq, ud, True, d))
            bits = torch.where(qspec, pamq, bits)
    return _to_f32(bits)


def _mant(u: torch.Tensor) -> torch.Tensor:
    p = u & _ABS
    return torch.where(p >= _MINN, u & 0x7FFFFF, torch.zeros_like(u))


def _check(a: torch.Tensor, name: str) -> None:
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(a).__name__}")
    if a.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(a.shape)}")
    if a.dtype != torch.float32:
        raise TypeError(f"{name} must be float32 (upcast bf16/f16 first), got {a.dtype}")


def _has_special(*us: torch.Tensor) -> bool:
    return any(bool(((u & _ABS) >= _INF).any()) for u in us if u.numel())


def _chunks(rows: int, cols: int, red: int):
    """(row block, reduction block) sizes so that red_block*row_block*cols temporaries
    stay under the budget."""
    budget = max(1, _BUDGET_BYTES // _BYTES_PER_ELEM)
    rb = max(1, min(rows, budget // max(1, cols)))
    kb = max(1, min(red, budget // max(1, rb * cols)))
    return rb, kb


def _reduce_generic(X, Q, Mo, term_fn) -> torch.Tensor:
    """out[r, c] = sum_t term(X[r,t], Q[t,c], Mo[r,c]) accumulated sequentially over t."""
    R, T = X.shape
    Cc = Q.shape[1]
    out = torch.zeros(R, Cc, dtype=torch.float32)
    if R == 0 or Cc == 0 or T == 0:
        return out
    ux = _u32(X)
    uq = _u32(Q)
    um = _u32(Mo) if Mo is not None else None
    spec = _has_special(ux, uq) or (um is not None and False)
    rb, tb = _chunks(R, Cc, T)
    for r0 in range(0, R, rb):
        r1 = min(R, r0 + rb)
        acc = out[r0:r1]
        mo = _mant(um[r0:r1]).unsqueeze(0) if um is not None else None
        for t0 in range(0, T, tb):
            t1 = min(T, t0 + tb)
            xs = ux[r0:r1, t0:t1].t().unsqueeze(2)  # (t, r, 1)
            qs = uq[t0:t1].unsqueeze(1)  # (t, 1, c)
            terms = term_fn(xs, qs, mo, spec)  # (t, r, c)
            for t in range(t1 - t0):
                acc += terms[t]
    return out


def pam_mm(a: torch.Tensor, b: torch.Tensor, offset: float | None = None) -> torch.Tensor:
    """C[i,j] = sum_k PAM(a[i,k], b[k,j]) (float32, sequential accumulation over k); with
    ``offset`` α each term is PAM(a[i,k], b[k,j], offset=α)."""
    _check(a, "a")
    _check(b, "b")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"pam_mm: shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be multiplied")
    a = a.detach().cpu()
    b = b.detach().cpu()
    d = offset_d(offset)
    return _reduce_generic(a, b, None, lambda xs, qs, mo, spec: pam_terms(xs, qs, spec, d))


def _grad_terms(offset):
    d = offset_d(offset)
    return lambda xs, qs, mo, spec: exact_grad_terms(xs, qs, mo, spec, d)


def pam_mm_exact_grad_a(a: torch.Tensor, b: torch.Tensor, dc: torch.Tensor,
                        offset: float | None = None) -> torch.Tensor:
    """dA[i,k] = sum_j dC[i,j] * sign(B[k,j]) * 2^(E_B[k,j] + c(A[i,k], B[k,j])); with an
    offset α the exponent also gets E_α and the carry counts α's mantissa too."""
    a, b, dc = _check3(a, b, dc)
    return _reduce_generic(dc, b.t(), a, _grad_terms(offset))


def pam_mm_exact_grad_b(a: torch.Tensor, b: torch.Tensor, dc: torch.Tensor,
                        offset: float | None = None) -> torch.Tensor:
    """dB[k,j] = sum_i dC[i,j] * sign(A[i,k]) * 2^(E_A[i,k] + c(A[i,k], B[k,j])) (offset as
    in :func:`pam_mm_exact_grad_a`)."""
    a, b, dc = _check3(a, b, dc)
    return _reduce_generic(dc.t(), a, b.t(), _grad_terms(offset)).t().contiguous()


def _check3(a, b, dc):
    _check(a, "a")
    _check(b, "b")
    _check(dc, "dc")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be multiplied")
    if tuple(dc.shape) != (a.shape[0], b.shape[1]):
        raise ValueError(f"dc must have shape {(a.shape[0], b.shape[1])}, got {tuple(dc.shape)}")
    return a.detach().cpu(), b.detach().cpu(), dc.detach().cpu()
