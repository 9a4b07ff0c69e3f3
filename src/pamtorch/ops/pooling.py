"""Pooling and resampling: average and adaptive-average pooling (1-D, 2-D, 3-D), linear,
bilinear, bicubic and trilinear upsampling and ``_embedding_bag``, PA; max pooling,
nearest upsampling and pixel shuffles, which only compare, copy and add, pass through.

Pooling sums each window with ordinary additions and divides the sum by the window count
with one PAD: ``avg = PAD(sum, count)``. Interpolation weights multiply by PAM, in the
lerp form ``y = x_base + sum_t PAM(w_t, x_t - x_base)`` (see :class:`Taps`). The taps and
weights depend on the sizes alone, so they are computed in Python, like the learning-rate
scalars. Window sums
and interpolations are separable, so every op runs as 1-D gathers along one spatial
dimension after another (the last one first); the backward is the transpose, the same
taps scattered back with index_add in the reverse order of the dimensions. Half-precision
inputs are computed in float32 and rounded once, as the matrix products are.

Derivatives: the aten backward ops evaluate the exact function's derivative with PA ops
("approx": ``PAD(dy, count)``, ``PAM(w_t, dy)``). For the pooling backward ops, which
are given the input, ``derivative="exact"`` gives the exact piecewise-constant derivative
of ``PAD(sum, count)`` (a power of two); the upsampling and embedding-bag backward ops are
not given their input, so they give the approx derivative under either kind.
"""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch

from .. import arith
from ..matmul import _f32
from .table import implements, passes_through, aten, arg, pad, pam

# comparisons, copies and sums of copies: max pooling (and its backward, which puts each
# gradient at its argmax), nearest upsampling (the backward sums the copies), shuffles
passes_through("""
    max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool3d_with_indices
    max_pool3d_with_indices_backward adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d
    adaptive_max_pool2d_backward adaptive_max_pool3d_backward max_unpool2d max_unpool3d
    upsample_nearest1d upsample_nearest3d upsample_nearest1d_backward upsample_nearest2d_backward
    upsample_nearest3d_backward _upsample_nearest_exact1d _upsample_nearest_exact2d
    _upsample_nearest_exact3d _upsample_nearest_exact1d_backward _upsample_nearest_exact2d_backward
    _upsample_nearest_exact3d_backward pixel_shuffle pixel_unshuffle channel_shuffle native_channel_shuffle
""")


class Taps(NamedTuple):
    """A 1-D linear map along one dimension of size ``size``. Window sums (``weight`` None):
    output ``o`` is ``sum_t x[index[t][o]]``, index ``size`` reading a zero (overhang).
    Interpolations: the weights of each output sum to 1 and tap ``base`` carries the rest,
    ``y = x_base + sum_{t != base} PAM(weight[t], x_t - x_base)`` (the lerp form, as aten.lerp
    runs under the mode): exact for constant signals, and only the differences err."""

    size: int
    index: list
    weight: list | None = None
    base: int = 0


def _zero_extended(x, dim, taps):
    if any(i == taps.size for row in taps.index for i in row):
        shape = list(x.shape)
        shape[dim] = 1
        return torch.cat([x, x.new_zeros(shape)], dim)
    return x


def _weight(w, x, dim):
    """Python weights of one tap as a tensor broadcasting along ``dim`` of ``x``."""
    return torch.tensor(w, dtype=x.dtype, device=x.device).reshape(-1, *[1] * (x.dim() - 1 - dim))


def _take(x, dim, idx):
    return x.index_select(dim, torch.tensor(idx, device=x.device))


def gather(x, dim, taps: Taps, cfg):
    """Apply ``taps`` along ``dim`` (taps added in order)."""
    xz = _zero_extended(x, dim, taps)
    if taps.weight is None:
        out = _take(xz, dim, taps.index[0])
        for idx in taps.index[1:]:
            out = out + _take(xz, dim, idx)
        return out
    xb = _take(xz, dim, taps.index[taps.base])
    out = xb
    for t, idx in enumerate(taps.index):
        if t != taps.base:
            out = out + pam(_take(xz, dim, idx) - xb, _weight(taps.weight[t], x, dim), cfg)
    return out


def scatter(g, dim, taps: Taps, cfg):
    """Transpose of :func:`gather`: each output's gradient added back to its taps (the
    weighted ones PAM by their weight, the base tap the rest)."""
    shape = list(g.shape)
    shape[dim] = taps.size + 1
    out = g.new_zeros(shape)
    rest = g
    for t, idx in enumerate(taps.index):
        if taps.weight is None:
            out.index_add_(dim, torch.tensor(idx, device=g.device), g)
        elif t != taps.base:
            v = pam(g, _weight(taps.weight[t], g, dim), cfg)
            out.index_add_(dim, torch.tensor(idx, device=g.device), v)
            rest = rest - v
    if taps.weight is not None:
        out.index_add_(dim, torch.tensor(taps.index[taps.base], device=g.device), rest)
    return out.narrow(dim, 0, taps.size)


def _apply(x, taps_per_dim, cfg):
    """Gather along each spatial dimension, the last first."""
    lead = x.dim() - len(taps_per_dim)
    for i in reversed(range(len(taps_per_dim))):
        x = gather(x, lead + i, taps_per_dim[i], cfg)
    return x


def _apply_t(g, taps_per_dim, cfg):
    """Transpose of :func:`_apply`: scatter along the first spatial dimension first."""
    lead = g.dim() - len(taps_per_dim)
    for i in range(len(taps_per_dim)):
        g = scatter(g, lead + i, taps_per_dim[i], cfg)
    return g


def _half(fn):
    """Run ``fn`` on float32 values for half-precision inputs and round its result once."""
    def run(x, *rest):
        out = fn(_f32(x), *rest)
        return out.to(x.dtype)
    return run


def _ints(v, d, name, low, default=None):
    """``v`` as ``d`` ints >= ``low`` (one value repeats; an empty list takes ``default``)."""
    v = [v] if isinstance(v, int) else list(v)
    if not v and default is not None:
        v = list(default)
    if len(v) == 1:
        v = v * d
    if len(v) != d or any(int(i) < low for i in v):
        raise RuntimeError(f"pamtorch.mode: {name}={list(v)} must be one value or {d} values, each >= {low}")
    return [int(i) for i in v]


def _spatial(x, d, op):
    if x.dim() not in (d + 1, d + 2):
        raise RuntimeError(f"pamtorch.mode: {op} takes a {d + 1}-D or {d + 2}-D input ([N,] C, {d} spatial "
                           f"dimensions), got shape {tuple(x.shape)}")
    return list(x.shape[-d:])


def _exact_pad_grad(g, s, c):
    """Exact derivative of PAD(s, c) with respect to s, applied to g: sign(c)·2^(-E_c - b)·g
    with the borrow b = [M_s < M_c] (pamtorch.autograd's rule), or PAD(g, c) where c is
    zero, inf or NaN."""
    b = (arith.mantissa_field(s) < arith.mantissa_field(c)).to(torch.int32)
    e = arith.scale_pow2(g, -arith.exponent(c) - b, torch.signbit(c))
    return torch.where(arith.is_finite_nonzero(c), e, arith.pad(g, c))


def _div_grad(g, x, taps, divisor, cfg):
    """d/dsum of PAD(sum, divisor) applied to g, for the pooling backward ops."""
    c = _divisor_tensor(divisor, g)
    if cfg.derivative == "exact":
        return _exact_pad_grad(g, _apply(x, taps, cfg).expand_as(g), c.expand_as(g))
    return pad(g, c)


# ---------------------------------------------------------------------------
# average pooling

def pooling_output_size(size, k, s, p, ceil_mode):
    """torch's pooling output size (the last window starts inside the input or left padding)."""
    num = size + 2 * p - k + (s - 1 if ceil_mode else 0)
    out = num // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _avg_geometry(x, d, args, kwargs, base):
    """(taps per dim, divisors) of avg_pool{d}d, its arguments from position ``base`` on."""
    size = _spatial(x, d, f"avg_pool{d}d")
    k = _ints(arg(args, kwargs, base, "kernel_size"), d, "kernel_size", 1)
    s = _ints(arg(args, kwargs, base + 1, "stride", []), d, "stride", 1, default=k)
    p = _ints(arg(args, kwargs, base + 2, "padding", 0), d, "padding", 0)
    ceil_mode = bool(arg(args, kwargs, base + 3, "ceil_mode", False))
    include_pad = bool(arg(args, kwargs, base + 4, "count_include_pad", True))
    override = arg(args, kwargs, base + 5, "divisor_override")
    if any(2 * pi > ki for pi, ki in zip(p, k)):
        raise RuntimeError(f"pamtorch.mode: avg_pool{d}d padding={p} should be at most half of the kernel "
                           f"size {k}")
    if override is not None and override == 0:
        raise RuntimeError("pamtorch.mode: avg_pool divisor_override must be nonzero")
    taps, counts = [], []
    for n, ki, si, pi in zip(size, k, s, p):
        out = pooling_output_size(n, ki, si, pi, ceil_mode)
        if out < 1:
            raise RuntimeError(f"pamtorch.mode: avg_pool{d}d kernel {k} is larger than the padded input {size}")
        starts = [o * si - pi for o in range(out)]
        taps.append(Taps(n, [[st + t if 0 <= st + t < n else n for st in starts] for t in range(ki)]))
        if include_pad:
            counts.append([min(st + ki, n + pi) - st for st in starts])
        else:
            counts.append([min(st + ki, n) - max(st, 0) for st in starts])
    return taps, _divisor(counts, override)


def _divisor(counts, override=None):
    """(values, shape) of the divisors [*O]: ``override``, or the product of the per-dimension
    window counts (integers)."""
    shape = [len(c) for c in counts]
    if override is not None:
        return [int(override)] * math.prod(shape), shape
    return [math.prod(c) for c in itertools.product(*counts)], shape


def _divisor_tensor(divisor, like):
    values, shape = divisor
    return torch.tensor(values, dtype=like.dtype, device=like.device).reshape(shape)


def _avg_pool(x, taps, divisor, cfg):
    return pad(_apply(x, taps, cfg), _divisor_tensor(divisor, x))


def _avg_pool_backward(g, x, taps, divisor, cfg):
    return _apply_t(_div_grad(g, x, taps, divisor, cfg), taps, cfg)


@implements([aten.avg_pool2d, aten.avg_pool3d], "elementwise")
def _pa_avg_pool(func, args, kwargs, cfg):
    x, d = args[0], 2 if func.overloadpacket is aten.avg_pool2d else 3
    taps, divisor = _avg_geometry(x, d, args, kwargs, 1)
    return _half(_avg_pool)(x, taps, divisor, cfg)


@implements([aten.avg_pool2d_backward, aten.avg_pool3d_backward], "elementwise")
def _pa_avg_pool_backward(func, args, kwargs, cfg):
    g, x = args[0], args[1]
    d = 2 if func.overloadpacket is aten.avg_pool2d_backward else 3
    taps, divisor = _avg_geometry(x, d, args, kwargs, 2)
    return _half(lambda g32, x32: _avg_pool_backward(g32, x32, taps, divisor, cfg))(g, _f32(x))


# ---------------------------------------------------------------------------
# adaptive average pooling

def _adaptive_geometry(size, out_size, op):
    """Windows [floor(o·n/out), ceil((o+1)·n/out)) per dimension, and their counts."""
    taps, counts = [], []
    for n, out in zip(size, out_size):
        if out < 1 or n < 1:
            raise RuntimeError(f"pamtorch.mode: {op} output_size={list(out_size)} must be positive for an "
                               f"input of spatial size {size}")
        starts = [(o * n) // out for o in range(out)]
        ends = [-((-(o + 1) * n) // out) for o in range(out)]
        width = max(e - s for s, e in zip(starts, ends))
        taps.append(Taps(n, [[s + t if s + t < e else n for s, e in zip(starts, ends)] for t in range(width)]))
        counts.append([e - s for s, e in zip(starts, ends)])
    return taps, _divisor(counts)


@implements([aten._adaptive_avg_pool2d, aten._adaptive_avg_pool3d], "elementwise")
def _pa_adaptive_avg_pool(func, args, kwargs, cfg):
    x, d = args[0], 2 if func.overloadpacket is aten._adaptive_avg_pool2d else 3
    op = f"adaptive_avg_pool{d}d"
    taps, divisor = _adaptive_geometry(_spatial(x, d, op), _ints(args[1], d, "output_size", 0), op)
    return _half(_avg_pool)(x, taps, divisor, cfg)


@implements([aten._adaptive_avg_pool2d_backward, aten._adaptive_avg_pool3d_backward,
             aten.adaptive_avg_pool3d_backward], "elementwise")
def _pa_adaptive_avg_pool_backward(func, args, kwargs, cfg):
    g, x = args[0], args[1]
    d = 2 if func.overloadpacket is aten._adaptive_avg_pool2d_backward else 3
    op = f"adaptive_avg_pool{d}d"
    taps, divisor = _adaptive_geometry(_spatial(x, d, op), list(g.shape[-d:]), op)
    return _half(lambda g32, x32: _avg_pool_backward(g32, x32, taps, divisor, cfg))(g, _f32(x))


# ---------------------------------------------------------------------------
# linear, bilinear, trilinear and bicubic upsampling

def _source_scale(n, out, align_corners, scale):
    """Input step per output step, as torch's area_pixel_compute_scale."""
    if align_corners:
        return (n - 1) / (out - 1) if out > 1 else 0.0
    return 1.0 / scale if scale is not None and scale > 0 else n / out


def _linear_taps(n, out, align_corners, scale):
    """Two taps per output: the floor of the source position (the base) and the next one
    with weight λ: ``x_0 + PAM(λ, x_1 - x_0)``."""
    if n == out and not align_corners:
        ident = list(range(out))
        return Taps(n, [ident, ident], [None, [0.0] * out])
    r = _source_scale(n, out, align_corners, scale)
    i0, i1, w1 = [], [], []
    for o in range(out):
        src = r * o if align_corners else max(r * (o + 0.5) - 0.5, 0.0)
        i = min(int(src), n - 1)
        lam = min(max(src - i, 0.0), 1.0)
        i0.append(i)
        i1.append(i + (1 if i < n - 1 else 0))
        w1.append(lam)
    return Taps(n, [i0, i1], [None, w1])


def _cubic_taps(n, out, align_corners, scale, a=-0.75):
    """Four taps per output (indices clamped to the border) with Keys' cubic weights, a = -0.75;
    the tap at the floor of the source position is the base."""
    r = _source_scale(n, out, align_corners, scale)
    idx, wts = [[] for _ in range(4)], [[] for _ in range(4)]
    for o in range(out):
        src = r * o if align_corners else r * (o + 0.5) - 0.5
        i = math.floor(src)
        t = src - i
        ws = (((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
              ((a + 2) * t - (a + 3)) * t * t + 1,
              ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
              ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a)
        for k in range(4):
            idx[k].append(min(max(i - 1 + k, 0), n - 1))
            wts[k].append(ws[k])
    wts[1] = None
    return Taps(n, idx, wts, base=1)


_UPSAMPLE = {  # packet -> (spatial dims, taps of one dimension)
    aten.upsample_linear1d: (1, _linear_taps), aten.upsample_bilinear2d: (2, _linear_taps),
    aten.upsample_trilinear3d: (3, _linear_taps), aten.upsample_bicubic2d: (2, _cubic_taps),
}
_SCALE_NAMES = {1: ["scales"], 2: ["scales_h", "scales_w"], 3: ["scales_d", "scales_h", "scales_w"]}
_UPSAMPLE_BACKWARD = {aten.upsample_linear1d_backward: aten.upsample_linear1d,
                      aten.upsample_bilinear2d_backward: aten.upsample_bilinear2d,
                      aten.upsample_trilinear3d_backward: aten.upsample_trilinear3d,
                      aten.upsample_bicubic2d_backward: aten.upsample_bicubic2d}


def _upsample_taps(packet, size, out_size, align_corners, scales):
    d, make = _UPSAMPLE[packet]
    scales = list(scales) + [None] * (d - len(scales))
    return [make(n, o, bool(align_corners), sc) for n, o, sc in zip(size, out_size, scales)]


def _upsample_call(args, kwargs, packet):
    """(input, taps per dim) of an upsample call (the .vec overloads are composites that
    reach the mode as this one)."""
    d = _UPSAMPLE[packet][0]
    x = args[0]
    size = _spatial(x, d, packet.__name__)
    scales = [arg(args, kwargs, 3 + i, name) for i, name in enumerate(_SCALE_NAMES[d])]
    return x, _upsample_taps(packet, size, _ints(args[1], d, "output_size", 1), args[2], scales)


@implements(list(_UPSAMPLE), "elementwise")
def _pa_upsample(func, args, kwargs, cfg):
    x, taps = _upsample_call(args, kwargs, func.overloadpacket)
    return _half(_apply)(x, taps, cfg)


@implements(list(_UPSAMPLE_BACKWARD), "elementwise")
def _pa_upsample_backward(func, args, kwargs, cfg):
    g, out_size, in_size, align = args[:4]
    fwd = _UPSAMPLE_BACKWARD[func.overloadpacket]
    d = _UPSAMPLE[fwd][0]
    scales = [arg(args, kwargs, 4 + i, name) for i, name in enumerate(_SCALE_NAMES[d])]
    taps = _upsample_taps(fwd, list(in_size)[-d:], _ints(out_size, d, "output_size", 1), align, scales)
    return _half(_apply_t)(g, taps, cfg)


# ---------------------------------------------------------------------------
# _embedding_bag: sums (PAM by per-sample weights) and means (PAD by the bag sizes); max
# bags are comparisons

_SUM, _MEAN, _MAX = 0, 1, 2


def _bag_args(args, kwargs):
    names = ["scale_grad_by_freq", "mode", "sparse", "per_sample_weights", "include_last_offset", "padding_idx"]
    defaults = [False, _SUM, False, None, False, -1]
    return [arg(args, kwargs, 3 + i, n, dflt) for i, (n, dflt) in enumerate(zip(names, defaults))]


def _kept(indices, padding_idx):
    return indices != padding_idx if padding_idx is not None and padding_idx >= 0 else torch.ones_like(
        indices, dtype=torch.bool)


def _make_offset2bag(n, starts):
    """The bag of each of ``n`` indices from the bags' start offsets (torch's make_offset2bag:
    empty bags are skipped; indices past the last start belong to the last bag)."""
    o2b = torch.zeros(n + 1, dtype=torch.long, device=starts.device)
    o2b.index_add_(0, starts.long(), torch.ones_like(starts, dtype=torch.long))
    o2b[0] -= 1
    return o2b.cumsum(0)[:n]


def _bag_max(weight, indices, starts, n, keep):
    """Max bags by comparisons: each bag's members laid out [B, longest bag], the rest -inf;
    the maximum, and the index of its first member (0 for a bag with no kept member)."""
    ends = torch.cat([starts[1:], starts.new_tensor([n])]).long()
    width = max(int((ends - starts).max()), 1) if starts.numel() else 1
    pos = starts.long()[:, None] + torch.arange(width, device=starts.device)
    valid = pos < ends[:, None]
    pos = pos.clamp_max(max(n - 1, 0))
    member = indices.index_select(0, pos.reshape(-1)).reshape(pos.shape)
    valid = valid & keep.index_select(0, pos.reshape(-1)).reshape(pos.shape)
    vals = weight.index_select(0, member.reshape(-1)).reshape(*pos.shape, weight.shape[1])
    vals = torch.where(valid[..., None], vals, torch.full((), -math.inf, dtype=vals.dtype))
    best, at = vals.max(1)
    empty = ~valid.any(1)[:, None]
    out = torch.where(empty, torch.zeros((), dtype=best.dtype), best)
    return out, torch.where(empty, torch.zeros((), dtype=member.dtype), member.gather(1, at))


@implements([aten._embedding_bag, aten._embedding_bag_forward_only], "elementwise")
def _pa_embedding_bag(func, args, kwargs, cfg):
    """Returns (output, offset2bag, bag_size, max_indices) with torch's conventions per mode."""
    weight, indices, offsets = args[:3]
    _sgbf, mode, _sparse, psw, last, pidx = _bag_args(args, kwargs)
    if mode not in (_SUM, _MEAN, _MAX):
        raise RuntimeError(f"pamtorch.mode: embedding_bag mode={mode} must be 0 (sum), 1 (mean) or 2 (max)")
    if psw is not None and mode != _SUM:
        raise RuntimeError("pamtorch.mode: embedding_bag per_sample_weights are only supported for mode='sum'")
    n, nb = indices.numel(), offsets.numel() - (1 if last else 0)
    starts = offsets[:nb]
    o2b = _make_offset2bag(n, starts)
    keep = _kept(indices, pidx)
    bag_size = torch.bincount(o2b[keep], minlength=nb)[:nb].to(indices.dtype)
    o2b_out = o2b.to(indices.dtype)
    if mode == _MAX:
        out, max_indices = _bag_max(weight, indices, starts, n, keep)
        return out, o2b_out, bag_size, max_indices.to(indices.dtype)
    rows = _f32(weight).index_select(0, indices)
    if psw is not None:
        rows = pam(rows, _f32(psw)[:, None], cfg)
    total = rows.new_zeros((nb, weight.shape[1])).index_add_(0, o2b[keep], rows[keep])
    if mode == _MEAN:
        out = pad(total, bag_size.clamp_min(1).to(total.dtype)[:, None])
        return out.to(weight.dtype), o2b_out, bag_size, bag_size.clone()
    # torch's sum bags give offset2bag only with a padding_idx, and zero sizes and maxima
    if pidx is None or pidx < 0:
        o2b_out = o2b_out.new_empty(0)
    return total.to(weight.dtype), o2b_out, torch.zeros_like(bag_size), torch.zeros_like(bag_size)


def _offset2bag(indices, offsets, offset2bag, num_bags):
    """The bag of each index: ``offset2bag`` itself or, where torch left it empty (sum bags
    without padding_idx), rebuilt from the first ``num_bags`` offsets."""
    if offset2bag.numel():
        return offset2bag
    return _make_offset2bag(indices.numel(), offsets[:num_bags])


def _bag_grad_rows(grad, indices, o2b, bag_size, num_weights, sgbf, mode, psw, pidx, cfg):
    """Per-index gradient rows of sum/mean bags (zero at padding_idx), and the kept mask."""
    keep = _kept(indices, pidx)
    rows = _f32(grad).index_select(0, o2b)
    if mode == _MEAN:
        rows = pad(rows, bag_size.index_select(0, o2b).clamp_min(1).to(rows.dtype)[:, None])
    if psw is not None:
        rows = pam(rows, _f32(psw)[:, None], cfg)
    if sgbf:
        rows = pad(rows, _frequencies(indices, keep, num_weights).to(rows.dtype)[:, None])
    return torch.where(keep[:, None], rows, torch.zeros_like(rows)), keep


def _frequencies(indices, keep, num_weights):
    """How often each index's value occurs among the kept indices (scale_grad_by_freq)."""
    counts = torch.bincount(indices[keep], minlength=num_weights)
    return counts.index_select(0, indices).clamp_min(1)


def _bag_dense_grad(grad, indices, o2b, bag_size, max_indices, num_weights, sgbf, mode, psw, pidx, cfg):
    d = grad.shape[1]
    out = grad.new_zeros((num_weights, d), dtype=torch.float32)
    if mode == _MAX:
        if sgbf:
            raise RuntimeError("pamtorch.mode: embedding_bag mode='max' does not support scale_grad_by_freq "
                               "(as in torch)")
        full = bag_size > 0
        idx, vals = max_indices[full], _f32(grad)[full]
        flat = idx * d + torch.arange(d, device=idx.device)
        out.view(-1).index_add_(0, flat.reshape(-1), vals.reshape(-1))
    else:
        rows, _ = _bag_grad_rows(grad, indices, o2b, bag_size, num_weights, sgbf, mode, psw, pidx, cfg)
        out.index_add_(0, indices, rows)
    return out.to(grad.dtype)


@implements([aten._embedding_bag_backward], "elementwise")
def _pa_embedding_bag_backward(func, args, kwargs, cfg):
    grad, indices, offsets, offset2bag, bag_size, max_indices, num_weights, sgbf, mode, sparse, psw = args[:11]
    pidx = arg(args, kwargs, 11, "padding_idx", -1)
    o2b = _offset2bag(indices, offsets, offset2bag, grad.shape[0])
    if sparse:
        return _bag_sparse_grad(grad, indices, o2b, bag_size, num_weights, sgbf, mode, psw, pidx, cfg)
    return _bag_dense_grad(grad, indices, o2b, bag_size, max_indices, num_weights, sgbf, mode, psw, pidx, cfg)


@implements([aten._embedding_bag_dense_backward], "elementwise")
def _pa_embedding_bag_dense_backward(func, args, kwargs, cfg):
    grad, indices, offset2bag, bag_size, max_indices, num_weights, sgbf, mode, psw = args[:9]
    pidx = arg(args, kwargs, 9, "padding_idx", -1)
    return _bag_dense_grad(grad, indices, offset2bag, bag_size, max_indices, num_weights, sgbf, mode, psw,
                           pidx, cfg)


def _bag_sparse_grad(grad, indices, o2b, bag_size, num_weights, sgbf, mode, psw, pidx, cfg):
    if sgbf:
        raise RuntimeError("pamtorch.mode: embedding_bag scale_grad_by_freq is not supported with sparse "
                           "gradients (as in torch)")
    rows, keep = _bag_grad_rows(grad, indices, o2b, bag_size, num_weights, sgbf, mode, psw, pidx, cfg)
    return torch.sparse_coo_tensor(indices[keep][None], rows[keep].to(grad.dtype),
                                   (num_weights, grad.shape[1]), check_invariants=True)


@implements([aten._embedding_bag_sparse_backward], "elementwise")
def _pa_embedding_bag_sparse_backward(func, args, kwargs, cfg):
    grad, indices, offsets, offset2bag, bag_size, num_weights, sgbf, mode, psw = args[:9]
    pidx = arg(args, kwargs, 9, "padding_idx", -1)
    o2b = _offset2bag(indices, offsets, offset2bag, grad.shape[0])
    return _bag_sparse_grad(grad, indices, o2b, bag_size, num_weights, sgbf, mode, psw, pidx, cfg)


@implements([aten._embedding_bag_per_sample_weights_backward], "elementwise")
def _pa_embedding_bag_psw_backward(func, args, kwargs, cfg):
    """d/d psw[i] = sum_d PAM(grad[bag(i), d], weight[indices[i], d]) (0 at padding_idx)."""
    grad, weight, indices, offsets, offset2bag, mode = args[:6]
    pidx = arg(args, kwargs, 6, "padding_idx", -1)
    if mode != _SUM:
        raise RuntimeError("pamtorch.mode: embedding_bag per_sample_weights are only supported for mode='sum'")
    o2b = _offset2bag(indices, offsets, offset2bag, grad.shape[0])
    terms = pam(_f32(grad).index_select(0, o2b), _f32(weight).index_select(0, indices), cfg)
    out = torch.where(_kept(indices, pidx), terms.sum(1), torch.zeros((), device=grad.device))
    return out.to(grad.dtype)
