// pamtorch CPU kernels: fused PA layer norm, RMS norm and softmax, forward and backward.
// Bit-exact ports of the compositions of pamtorch/nn/functional.py they replace (which stay
// the definition and the fallback); no floating-point multiply or divide.
//
//   norm_forward(x, k, w, b, eps, centered)      layer_norm_forward (centered) / rms_norm_forward
//   norm_backward(dy, x, k, mean, rstd, w, dx, dw, centered)
//                                                layer_norm_backward / rms_norm_backward (dx, dw)
//   softmax_forward(x, safe), softmax_backward(y, dy)   softmax along the last dim
//
// All take float32 CPU tensors and work on rows: the last k dims (the normalized shape; the
// last dim for softmax), n elements, over the R indices of the leading dims. They apply where
// each row operand (x, dy, y) does not overlap itself and holds each row contiguously (any
// strides between rows: permuted or sliced leading dims), and return None otherwise.
//
// Where the composition sums (x.sum, e.sum, ...), these call torch's own at::sum on a tensor of
// the composition's shape and layout, so the summation order is the composition's. The layout
// of the composition's elementwise results is TensorIterator's: for a first operand that does
// not overlap itself, dense with the dims in the order of that operand's strides (its strides
// decide every pair of dims of size > 1); the kernels allocate theirs by a TensorIterator on
// that operand (dense_like). Every other step is the same float32 operation in the same order:
// an IEEE add or subtract, or a PA op on bit patterns (the integer rules of arith.py, as
// pa_elementwise.cpp ports them).
//
// The elementwise steps run on chunks of at most BLK elements (whole rows when n <= BLK and
// the rows of every operand lie one after another, else one row or a slice of one), one simple
// loop per step through buffers that stay in L1, with the per-row values (mean, rstd, ...)
// expanded to one per element and the per-column ones (w, b) tiled, so that GCC vectorizes
// every step (compiled twice: for AVX2, and portable).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <tuple>
#include <utility>
#include <vector>

#include "pa_bits.h"

namespace {

using namespace pa_bits;  // B32 ... ABS32, PA_INLINE, u32, f32, pam_bits, pad_bits (pa_bits.h)

constexpr int64_t BLK = 512;  // elements per chunk

PA_INLINE int64_t i64(double d) {
  int64_t u;
  std::memcpy(&u, &d, 8);
  return u;
}
PA_INLINE double f64(int64_t u) {
  double d;
  std::memcpy(&d, &u, 8);
  return d;
}

// arith.pa_rsqrt: pattern round((B - P) / 2) + B (ties to even); rsqrt(±0) = ±inf,
// rsqrt(inf) = 0, NaN for NaN and negative numbers. Only on the R per-row values.
inline uint32_t rsqrt_bits(uint32_t ux) {
  const bool neg = (ux & SIGN32) != 0;
  const int64_t m = ux & ABS32;
  const int64_t d = int64_t(B32) - m, h = d >> 1;  // arithmetic shift: floor(d / 2)
  int64_t r = (((d & 1) != 0) && ((h & 1) != 0) ? h + 1 : h) + B32;
  r = r < int64_t(MN32) ? 0 : (r > int64_t(INF32) ? int64_t(INF32) : r);
  r = m < MN32 ? INF32 : r;
  r = m == INF32 ? 0 : r;
  r = (m > INF32 || (neg && m >= MN32)) ? NAN32 : r;
  return static_cast<uint32_t>(r) | ((neg && m < MN32) ? SIGN32 : 0u);
}

// arith.pa_exp of a float32 z: exp_v_bits, round_bits, exp_out_bits (pa_bits.h)

// float32 patterns as int32 keys in the order of the values (-0 below +0; NaN not ordered)
PA_INLINE int32_t order_key(uint32_t u) { return static_cast<int32_t>(u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) >> 1)); }

// ---------------------------------------------------------------- rows in chunks

// Where rows go: n per row, and whether chunks may take several whole rows (every operand's rows
// one after another); each operand's row r starts at its off[r].
struct Geo {
  int64_t n;
  bool multi;
};
// The chunk that starts at row r, column c of rows [.., r1): its length.
// (whole rows: as many as fit, rounded down to a multiple of 8 / gcd(n, 8) where one fits, so
// that the chunk is a whole number of AVX2 vectors)
PA_INLINE int64_t chunk_len(int64_t r, int64_t c, Geo g, int64_t r1) {
  if (!g.multi || g.n > BLK) return std::min(BLK, g.n - c);
  const int64_t step = 8 / std::gcd(g.n, int64_t(8)), fit = BLK / g.n;
  return std::min(fit >= step ? fit - fit % step : fit, r1 - r) * g.n;
}
PA_INLINE void chunk_next(int64_t& r, int64_t& c, Geo g, int64_t m) {
  c += m;
  r += c / g.n;
  c %= g.n;
}
// buf[i] = v[row of element i] for the m elements of the chunk at row r, column c
PA_INLINE void expand(uint32_t* __restrict buf, const uint32_t* __restrict v, int64_t r, int64_t c, Geo g,
                      int64_t m) {
  for (int64_t i = 0; i < m; ++r) {
    const int64_t k = std::min(g.n - c, m - i);
    const uint32_t s = v[r];
    for (int64_t j = 0; j < k; ++j) buf[i + j] = s;
    i += k;
    c = 0;
  }
}
// where row r of an operand with row offsets off (nullptr: adjacent rows) starts
PA_INLINE int64_t row_at(const int64_t* off, int64_t r, int64_t n) { return off ? off[r] : r * n; }
// a per-column operand (w or b) for the chunk at column c: tiled BLK / n times when chunks take
// whole rows (they then start at column 0), else the slice itself
PA_INLINE const uint32_t* cols(const uint32_t* v, const uint32_t* tiled, int64_t c, Geo g) {
  return (g.multi && g.n <= BLK) ? tiled : v + c;
}

// ---------------------------------------------------------------- the passes
// Each is a struct with one always-inlined run(): compiled into an AVX2 copy and a portable one.
// Operands are bit patterns with their row offsets (ox for x, ...); per-row values (mean, rstd,
// a, b, the max, the sum) are arrays in row order.

// norm forward, first pass: q = (x - mean) *^ (x - mean), or x *^ x without centering
template <bool CENTER>
struct NormSquares {
  static PA_INLINE void run(const uint32_t* x, const int64_t* ox, const uint32_t* mean, uint32_t* q,
                            const int64_t* oq, Geo g, int64_t r0, int64_t r1) {
    alignas(32) uint32_t me[BLK], t[BLK];
    for (int64_t r = r0, c = 0, m; r < r1; chunk_next(r, c, g, m)) {
      m = chunk_len(r, c, g, r1);
      const uint32_t* __restrict xs = x + row_at(ox, r, g.n) + c;
      uint32_t* __restrict qs = q + row_at(oq, r, g.n) + c;
      if (CENTER) {
        expand(me, mean, r, c, g, m);
        for (int64_t i = 0; i < m; ++i) t[i] = u32(f32(xs[i]) - f32(me[i]));
        for (int64_t i = 0; i < m; ++i) qs[i] = pam_bits(t[i], t[i]);
      } else {
        for (int64_t i = 0; i < m; ++i) qs[i] = pam_bits(xs[i], xs[i]);
      }
    }
  }
};

// per-column operands of the forward's second pass
struct Affine {
  const uint32_t *w, *wt, *b, *bt;
};

// norm forward, second pass: y = ((x - mean) *^ rstd) *^ w + b (each part optional); returns
// whether a NaN arose in the bias add (the only float result that reaches y unchanged)
template <bool CENTER, bool HAS_W, bool HAS_B>
struct NormOut {
  static PA_INLINE bool run(const uint32_t* x, const int64_t* ox, const uint32_t* mean, const uint32_t* rstd,
                            Affine p, uint32_t* y, const int64_t* oy, Geo g, int64_t r0, int64_t r1) {
    alignas(32) uint32_t me[BLK], re[BLK], t[BLK];
    uint32_t nan = 0;
    for (int64_t r = r0, c = 0, m; r < r1; chunk_next(r, c, g, m)) {
      m = chunk_len(r, c, g, r1);
      const uint32_t* __restrict xs = x + row_at(ox, r, g.n) + c;
      uint32_t* __restrict ys = y + row_at(oy, r, g.n) + c;
      expand(re, rstd, r, c, g, m);
      if (CENTER) {
        expand(me, mean, r, c, g, m);
        for (int64_t i = 0; i < m; ++i) t[i] = u32(f32(xs[i]) - f32(me[i]));
        for (int64_t i = 0; i < m; ++i) t[i] = pam_bits(t[i], re[i]);
      } else {
        for (int64_t i = 0; i < m; ++i) t[i] = pam_bits(xs[i], re[i]);
      }
      if (HAS_W) {
        const uint32_t* __restrict ws = cols(p.w, p.wt, c, g);
        for (int64_t i = 0; i < m; ++i) t[i] = pam_bits(t[i], ws[i]);
      }
      if (HAS_B) {
        const uint32_t* __restrict bs = cols(p.b, p.bt, c, g);
        for (int64_t i = 0; i < m; ++i) {
          const uint32_t s = u32(f32(t[i]) + f32(bs[i]));
          ys[i] = s;
          nan |= (s & ABS32) > INF32 ? 1u : 0u;
        }
      } else {
        for (int64_t i = 0; i < m; ++i) ys[i] = t[i];
      }
    }
    return nan != 0;
  }
};

// the backward's operands: dy, x (with their row offsets), the forward's per-row mean and rstd,
// w (and its tiling), the buffers G, GX, DYX, which share the row offsets oi, and dx (odx)
struct GradArgs {
  const uint32_t *dy, *x, *mean, *rstd, *w, *wt;
  uint32_t *G, *GX, *DYX, *DX;
  const int64_t *ody, *ox, *oi, *odx;
};

// norm backward, first pass: with xh = (x - mean) *^ rstd (or x *^ rstd) and g = dy *^ w (or dy):
// G = g (with w), GX = g *^ xh (for dx), DYX = dy *^ xh (for dw)
template <bool CENTER, bool HAS_W, bool DX, bool DW>
struct NormGradTerms {
  static PA_INLINE void run(GradArgs a, Geo geo, int64_t r0, int64_t r1) {
    alignas(32) uint32_t me[BLK], re[BLK], xh[BLK], g[BLK];
    for (int64_t r = r0, c = 0, m; r < r1; chunk_next(r, c, geo, m)) {
      m = chunk_len(r, c, geo, r1);
      const int64_t oi = row_at(a.oi, r, geo.n) + c;
      const uint32_t* __restrict xs = a.x + row_at(a.ox, r, geo.n) + c;
      const uint32_t* __restrict dys = a.dy + row_at(a.ody, r, geo.n) + c;
      expand(re, a.rstd, r, c, geo, m);
      if (CENTER) {
        expand(me, a.mean, r, c, geo, m);
        for (int64_t i = 0; i < m; ++i) xh[i] = u32(f32(xs[i]) - f32(me[i]));
        for (int64_t i = 0; i < m; ++i) xh[i] = pam_bits(xh[i], re[i]);
      } else {
        for (int64_t i = 0; i < m; ++i) xh[i] = pam_bits(xs[i], re[i]);
      }
      if (DX) {
        uint32_t* __restrict gxs = a.GX + oi;
        if (HAS_W) {
          const uint32_t* __restrict ws = cols(a.w, a.wt, c, geo);
          uint32_t* __restrict gs = a.G + oi;
          for (int64_t i = 0; i < m; ++i) g[i] = pam_bits(dys[i], ws[i]);
          for (int64_t i = 0; i < m; ++i) gs[i] = g[i];
          for (int64_t i = 0; i < m; ++i) gxs[i] = pam_bits(g[i], xh[i]);
        } else {
          for (int64_t i = 0; i < m; ++i) gxs[i] = pam_bits(dys[i], xh[i]);
        }
      }
      if (DW) {
        uint32_t* __restrict ds = a.DYX + oi;
        for (int64_t i = 0; i < m; ++i) ds[i] = pam_bits(dys[i], xh[i]);
      }
    }
  }
};

// norm backward, second pass: dx = rstd *^ ((g - ga) - xh *^ gb), or rstd *^ (g - xh *^ gb)
// without centering, with ga = Σg /^ n and gb = Σ(g *^ xh) /^ n per row; g: G (with w) or dy
template <bool CENTER, bool HAS_W>
struct NormGradX {
  static PA_INLINE void run(GradArgs a, const uint32_t* ga, const uint32_t* gb, Geo geo, int64_t r0,
                            int64_t r1) {
    alignas(32) uint32_t me[BLK], re[BLK], ae[BLK], be[BLK], t[BLK];
    for (int64_t r = r0, c = 0, m; r < r1; chunk_next(r, c, geo, m)) {
      m = chunk_len(r, c, geo, r1);
      const uint32_t* __restrict xs = a.x + row_at(a.ox, r, geo.n) + c;
      const uint32_t* __restrict gs = HAS_W ? a.G + row_at(a.oi, r, geo.n) + c : a.dy + row_at(a.ody, r, geo.n) + c;
      uint32_t* __restrict os = a.DX + row_at(a.odx, r, geo.n) + c;
      expand(re, a.rstd, r, c, geo, m);
      expand(be, gb, r, c, geo, m);
      if (CENTER) {
        expand(me, a.mean, r, c, geo, m);
        for (int64_t i = 0; i < m; ++i) t[i] = u32(f32(xs[i]) - f32(me[i]));
        for (int64_t i = 0; i < m; ++i) t[i] = pam_bits(t[i], re[i]);
      } else {
        for (int64_t i = 0; i < m; ++i) t[i] = pam_bits(xs[i], re[i]);
      }
      for (int64_t i = 0; i < m; ++i) t[i] = pam_bits(t[i], be[i]);
      if (CENTER) {
        expand(ae, ga, r, c, geo, m);
        for (int64_t i = 0; i < m; ++i) t[i] = u32((f32(gs[i]) - f32(ae[i])) - f32(t[i]));
      } else {
        for (int64_t i = 0; i < m; ++i) t[i] = u32(f32(gs[i]) - f32(t[i]));
      }
      for (int64_t i = 0; i < m; ++i) os[i] = pam_bits(re[i], t[i]);
    }
  }
};

// softmax forward, first pass: e = pa_exp(x - max) per row, the max read as 0 where it is -inf
// with SAFE. The max is this pass's own: it may differ from torch's amax only in the sign of a
// zero max or the payload of a NaN max, which leave x - max, read by pa_exp, the same or NaN.
template <bool SAFE>
struct SoftmaxExp {
  static PA_INLINE void run(const uint32_t* x, const int64_t* ox, uint32_t* mx, uint32_t* e, const int64_t* oe,
                            Geo g, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t* __restrict xs = x + row_at(ox, r, g.n);
      int32_t k = INT32_MIN;
      uint32_t mag = 0;
      for (int64_t i = 0; i < g.n; ++i) {
        const int32_t ki = order_key(xs[i]);
        k = ki > k ? ki : k;
        const uint32_t a = xs[i] & ABS32;
        mag = a > mag ? a : mag;
      }
      uint32_t v = static_cast<uint32_t>(order_key(static_cast<uint32_t>(k)));
      v = mag > INF32 ? NAN32 : v;
      mx[r] = (SAFE && v == (INF32 | SIGN32)) ? 0u : v;
    }
    alignas(32) uint32_t me[BLK], z[BLK];
    alignas(32) int64_t p[BLK];
    for (int64_t r = r0, c = 0, m; r < r1; chunk_next(r, c, g, m)) {
      m = chunk_len(r, c, g, r1);
      const uint32_t* __restrict xs = x + row_at(ox, r, g.n) + c;
      uint32_t* __restrict es = e + row_at(oe, r, g.n) + c;
      expand(me, mx, r, c, g, m);
      for (int64_t i = 0; i < m; ++i) z[i] = u32(f32(xs[i]) - f32(me[i]));
      for (int64_t i = 0; i < m; ++i) p[i] = i64(static_cast<double>(f32(z[i])));
      for (int64_t i = 0; i < m; ++i) p[i] = exp_v_bits(p[i]);
      for (int64_t i = 0; i < m; ++i) p[i] = round_bits(p[i]);
      for (int64_t i = 0; i < m; ++i) es[i] = exp_out_bits(p[i], z[i]);
    }
  }
};

// softmax forward, second pass, in place: e /^ s per row, s read as 1 where it is 0 with SAFE
template <bool SAFE>
struct SoftmaxDiv {
  static PA_INLINE void run(uint32_t* e, const int64_t* oe, const uint32_t* s, Geo g, int64_t r0, int64_t r1) {
    alignas(32) uint32_t se[BLK];
    for (int64_t r = r0, c = 0, m; r < r1; chunk_next(r, c, g, m)) {
      m = chunk_len(r, c, g, r1);
      uint32_t* __restrict es = e + row_at(oe, r, g.n) + c;
      expand(se, s, r, c, g, m);
      if (SAFE)
        for (int64_t i = 0; i < m; ++i) se[i] = (se[i] & ABS32) == 0 ? B32 : se[i];
      for (int64_t i = 0; i < m; ++i) es[i] = pad_bits(es[i], se[i]);
    }
  }
};

// softmax backward: p = dy *^ y, then y *^ (dy - Σp) per row
struct SoftmaxGradTerms {
  static PA_INLINE void run(const uint32_t* dy, const int64_t* ody, const uint32_t* y, const int64_t* oy,
                            uint32_t* p, const int64_t* op, Geo g, int64_t r0, int64_t r1) {
    for (int64_t r = r0, c = 0, m; r < r1; chunk_next(r, c, g, m)) {
      m = chunk_len(r, c, g, r1);
      const uint32_t* __restrict gs = dy + row_at(ody, r, g.n) + c;
      const uint32_t* __restrict ys = y + row_at(oy, r, g.n) + c;
      uint32_t* __restrict ps = p + row_at(op, r, g.n) + c;
      for (int64_t i = 0; i < m; ++i) ps[i] = pam_bits(gs[i], ys[i]);
    }
  }
};
struct SoftmaxGradX {
  static PA_INLINE void run(const uint32_t* dy, const int64_t* ody, const uint32_t* y, const int64_t* oy,
                            const uint32_t* s, uint32_t* out, const int64_t* oo, Geo g, int64_t r0, int64_t r1) {
    alignas(32) uint32_t se[BLK], t[BLK];
    for (int64_t r = r0, c = 0, m; r < r1; chunk_next(r, c, g, m)) {
      m = chunk_len(r, c, g, r1);
      const uint32_t* __restrict gs = dy + row_at(ody, r, g.n) + c;
      const uint32_t* __restrict ys = y + row_at(oy, r, g.n) + c;
      uint32_t* __restrict os = out + row_at(oo, r, g.n) + c;
      expand(se, s, r, c, g, m);
      for (int64_t i = 0; i < m; ++i) t[i] = u32(f32(gs[i]) - f32(se[i]));
      for (int64_t i = 0; i < m; ++i) os[i] = pam_bits(ys[i], t[i]);
    }
  }
};

// ---------------------------------------------------------------- dispatch and threads

#if defined(__x86_64__) && !defined(PAM_NO_X86)
template <class K, class... A>
__attribute__((target("avx2"))) auto run_avx2(A... a) {
  return K::run(a...);
}
bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#endif

template <class K, class... A>
auto run(A... a) {
#if defined(__x86_64__) && !defined(PAM_NO_X86)
  if (has_avx2()) return run_avx2<K>(a...);
#endif
  return K::run(a...);
}

// f(r0, r1) over the R rows, in parallel chunks of about 32k elements
template <class F>
void for_rows(int64_t R, int64_t n, const F& f) {
  at::parallel_for(0, R, std::max<int64_t>(1, 32768 / n), f);
}

void check(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "pamtorch ", op, ": '", name, "' must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "pamtorch ", op, ": '", name, "' must be a CPU tensor, got ", t.device());
}

const uint32_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint32_t*>(t.data_ptr<float>()); }
uint32_t* bits_mut(at::Tensor& t) { return reinterpret_cast<uint32_t*>(t.data_ptr<float>()); }

// The rows of a tensor over its last k dims: where the row of leading index r (in row-major
// order) starts, in elements: off[r], or r * n when the rows lie one after another (adjacent, off
// empty); ok when each row is contiguous (the last k dims of size > 1 strided as a row-major
// block) and no element is reached twice (sorted by stride, each leading dim of size > 1 steps
// past everything the smaller ones span).
struct RowMap {
  std::vector<int64_t> off;
  bool ok = true, adjacent = true;
  RowMap(const at::Tensor& t, int64_t k) {
    const int64_t nd = t.dim(), nl = nd - k;
    const auto size = t.sizes(), stride = t.strides();
    int64_t n = 1;
    for (int64_t d = nd - 1; d >= nl; --d) {
      if (size[d] != 1 && stride[d] != n) ok = false;
      n *= size[d];
    }
    std::vector<std::pair<int64_t, int64_t>> lead;  // (stride, size) of the leading dims of size > 1
    int64_t dense = n;
    for (int64_t d = nl - 1; d >= 0; --d) {
      if (size[d] == 1) continue;
      lead.emplace_back(stride[d], size[d]);
      adjacent = adjacent && stride[d] == dense;
      dense *= size[d];
    }
    std::sort(lead.begin(), lead.end());
    int64_t span = n;  // elements spanned by a row and the smaller dims so far
    for (const auto& [st, sz] : lead) {
      if (st < span) ok = false;
      span = st * (sz - 1) + span;
    }
    if (!ok || adjacent) return;
    const int64_t R = t.numel() / n;
    off.resize(R);
    std::vector<int64_t> idx(nl, 0);
    int64_t o = 0;
    for (int64_t r = 0; r < R; ++r) {
      off[r] = o;
      for (int64_t d = nl - 1; d >= 0; --d) {  // the next leading index, row-major
        o += stride[d];
        if (++idx[d] < size[d]) break;
        o -= stride[d] * size[d];
        idx[d] = 0;
      }
    }
  }
  const int64_t* ptr() const { return adjacent ? nullptr : off.data(); }
};

// A new tensor in the layout TensorIterator gives an elementwise result whose first operand is
// t (for a t that does not overlap itself, whatever the other operands: see the top).
at::Tensor dense_like(const at::Tensor& t) {
  at::Tensor out;
  auto iter = at::TensorIteratorConfig().add_output(out).add_const_input(t).build();
  return iter.output();
}
// A new tensor in the layout of TensorIterator's result of the operands a and b (broadcast).
at::Tensor layout_of(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out;
  auto iter = at::TensorIteratorConfig().add_output(out).add_const_input(a).add_const_input(b).build();
  return iter.output();
}

// n and R of x's last k dims, or n = -1 where these kernels do not apply
struct Shape {
  std::vector<int64_t> dims;
  int64_t n = 1, R = 0;
  Shape(const at::Tensor& x, int64_t k, const char* op) {
    TORCH_CHECK(k >= 1 && k <= x.dim(), "pamtorch ", op, ": k must be in [1, ", x.dim(), "], got ", k);
    for (int64_t d = x.dim() - k; d < x.dim(); ++d) {
      dims.push_back(d);
      n *= x.size(d);
    }
    TORCH_CHECK(x.numel() > 0, "pamtorch ", op, ": 'x' must not be empty");
    R = x.numel() / n;
  }
};

// A per-column operand (w or b; None: undefined) as contiguous float32 with n elements, and
// its tiling to whole chunks.
struct Cols {
  at::Tensor t;
  std::vector<uint32_t> tiled;
  Cols(const c10::optional<at::Tensor>& v, int64_t n, const char* op, const char* name) {
    if (!v.has_value() || !v->defined()) return;
    t = v->contiguous();
    check(t, op, name);
    TORCH_CHECK(t.numel() == n, "pamtorch ", op, ": '", name, "' must have ", n, " elements, got ", t.numel());
    if (n <= BLK) {
      const uint32_t* p = bits(t);
      for (int64_t i = 0; i < (BLK / n) * n; ++i) tiled.push_back(p[i % n]);
    }
  }
  bool has() const { return t.defined(); }
  const uint32_t* ptr() const { return has() ? bits(t) : nullptr; }
  const uint32_t* tile() const { return tiled.empty() ? nullptr : tiled.data(); }
};

// The R per-row values of a statistic of shape lead + (1,)*k (any strides), in row order.
std::vector<uint32_t> row_values(const at::Tensor& s, int64_t k, int64_t R, const char* op, const char* name) {
  check(s, op, name);
  TORCH_CHECK(s.numel() == R, "pamtorch ", op, ": '", name, "' must have ", R, " elements, got ", s.numel());
  const RowMap m(s, k);
  TORCH_CHECK(m.ok, "pamtorch ", op, ": '", name, "' overlaps itself");
  const uint32_t* p = bits(s);
  std::vector<uint32_t> v(R);
  for (int64_t r = 0; r < R; ++r) v[r] = p[row_at(m.ptr(), r, 1)];
  return v;
}

// out[r] = f(in[r]) over the R values of a (keepdim) sum, and the tensor of them that the
// composition's elementwise op on the sum returns (dense_like)
struct PerRow {
  at::Tensor t;
  std::vector<uint32_t> v;
  template <class F>
  PerRow(const at::Tensor& sum, int64_t k, F f) {
    v = row_values(sum, k, sum.numel(), "per_row", "sum");
    for (auto& x : v) x = f(x);
    t = dense_like(sum);
    const RowMap m(t, k);
    uint32_t* p = bits_mut(t);
    for (int64_t r = 0; r < static_cast<int64_t>(v.size()); ++r) p[row_at(m.ptr(), r, 1)] = v[r];
  }
};

// ---------------------------------------------------------------- entry points

// layer_norm_forward (centered) / rms_norm_forward over the last k dims: (y, mean, rstd), mean
// undefined without centering; all undefined (None: the caller runs the composition) where x
// is not laid out as the kernels need, y undefined where a NaN arose in the bias add, whose NaN
// pattern is torch's add kernel's choice.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_forward(const at::Tensor& x, int64_t k,
                                                            const c10::optional<at::Tensor>& w,
                                                            const c10::optional<at::Tensor>& b, double eps,
                                                            bool centered) {
  const char* op = "norm_forward";
  check(x, op, "x");
  const Shape sh(x, k, op);
  const int64_t n = sh.n;
  const RowMap mx(x, k);
  if (!mx.ok) return {};
  at::Tensor q = dense_like(x);  // the layout of the composition's (x - mean) *^ (x - mean)
  const RowMap mq(q, k);
  TORCH_CHECK(mq.ok, "pamtorch ", op, ": internal error: unexpected layout of the squares");
  const Cols cw(w, n, op, "w"), cb(b, n, op, "b");
  const uint32_t nt = u32(static_cast<float>(n));
  at::Tensor mean_t;
  std::vector<uint32_t> mean;
  if (centered) {
    PerRow pr(at::sum(x, sh.dims, true), k, [nt](uint32_t s) { return pad_bits(s, nt); });
    mean_t = pr.t;
    mean = std::move(pr.v);
  }
  const Geo g{n, mx.adjacent && mq.adjacent};
  const uint32_t* xp = bits(x);
  const uint32_t* mp = centered ? mean.data() : nullptr;
  uint32_t* qp = bits_mut(q);
  for_rows(sh.R, n, [&](int64_t r0, int64_t r1) {
    if (centered) run<NormSquares<true>>(xp, mx.ptr(), mp, qp, mq.ptr(), g, r0, r1);
    else run<NormSquares<false>>(xp, mx.ptr(), mp, qp, mq.ptr(), g, r0, r1);
  });
  const float epsf = static_cast<float>(eps);
  const PerRow rstd(at::sum(q, sh.dims, true), k, [nt, epsf](uint32_t s) {
    return rsqrt_bits(u32(f32(pad_bits(s, nt)) + epsf));
  });
  const uint32_t* rp = rstd.v.data();
  const Affine p{cw.ptr(), cw.tile(), cb.ptr(), cb.tile()};
  const int key = (centered ? 4 : 0) + (cw.has() ? 2 : 0) + (cb.has() ? 1 : 0);
  std::atomic<bool> nan{false};
  for_rows(sh.R, n, [&](int64_t r0, int64_t r1) {  // y into q's memory
    const int64_t *ox = mx.ptr(), *oq = mq.ptr();
    bool any = false;
    switch (key) {
      case 0: any = run<NormOut<false, false, false>>(xp, ox, mp, rp, p, qp, oq, g, r0, r1); break;
      case 1: any = run<NormOut<false, false, true>>(xp, ox, mp, rp, p, qp, oq, g, r0, r1); break;
      case 2: any = run<NormOut<false, true, false>>(xp, ox, mp, rp, p, qp, oq, g, r0, r1); break;
      case 3: any = run<NormOut<false, true, true>>(xp, ox, mp, rp, p, qp, oq, g, r0, r1); break;
      case 4: any = run<NormOut<true, false, false>>(xp, ox, mp, rp, p, qp, oq, g, r0, r1); break;
      case 5: any = run<NormOut<true, false, true>>(xp, ox, mp, rp, p, qp, oq, g, r0, r1); break;
      case 6: any = run<NormOut<true, true, false>>(xp, ox, mp, rp, p, qp, oq, g, r0, r1); break;
      default: any = run<NormOut<true, true, true>>(xp, ox, mp, rp, p, qp, oq, g, r0, r1); break;
    }
    if (any) nan.store(true, std::memory_order_relaxed);
  });
  return {nan.load() ? at::Tensor() : q, mean_t, rstd.t};
}

template <bool CENTER, bool HAS_W>
void grad_terms(bool dx, bool dw, const GradArgs& a, Geo g, int64_t r0, int64_t r1) {
  if (dx && dw) run<NormGradTerms<CENTER, HAS_W, true, HAS_W>>(a, g, r0, r1);
  else if (dx) run<NormGradTerms<CENTER, HAS_W, true, false>>(a, g, r0, r1);
  else run<NormGradTerms<CENTER, HAS_W, false, HAS_W>>(a, g, r0, r1);
}

// layer_norm_backward (centered) / rms_norm_backward over the last k dims: (dx, dw), each
// undefined unless asked for (dw needs w), both undefined where dy or x is not laid out as the
// kernels need; dw is Σ over the leading dims of dy *^ xh, not converted to w's dtype. mean and
// rstd: the forward's, of shape lead + (1,)*k (mean ignored without centering).
std::tuple<at::Tensor, at::Tensor> norm_backward(const at::Tensor& dy, const at::Tensor& x, int64_t k,
                                                 const c10::optional<at::Tensor>& mean, const at::Tensor& rstd,
                                                 const c10::optional<at::Tensor>& w, bool want_dx, bool want_dw,
                                                 bool centered) {
  const char* op = "norm_backward";
  check(x, op, "x");
  check(dy, op, "dy");
  TORCH_CHECK(dy.sizes() == x.sizes(), "pamtorch ", op, ": 'dy' must have the shape of 'x', ", x.sizes(),
              ", got ", dy.sizes());
  const Shape sh(x, k, op);
  const int64_t n = sh.n, R = sh.R;
  const Cols cw(w, n, op, "w");
  want_dw = want_dw && cw.has();
  const RowMap mx(x, k), mdy(dy, k);
  if ((!want_dx && !want_dw) || !mx.ok || !mdy.ok) return {};
  const std::vector<uint32_t> rs = row_values(rstd, k, R, op, "rstd");
  std::vector<uint32_t> mv;
  if (centered) {
    TORCH_CHECK(mean.has_value() && mean->defined(), "pamtorch ", op, ": 'mean' is needed with centered=True");
    mv = row_values(*mean, k, R, op, "mean");
  }
  // the composition's g = dy *^ w, g *^ xh and dy *^ xh: dy's (and g's) layout
  at::Tensor G, GX, DYX;
  if (want_dx && cw.has()) G = dense_like(dy);
  if (want_dx) GX = dense_like(dy);
  if (want_dw) DYX = dense_like(dy);
  const RowMap mi(G.defined() ? G : (GX.defined() ? GX : DYX), k);
  TORCH_CHECK(mi.ok, "pamtorch ", op, ": internal error: unexpected layout of the gradient terms");
  // dx = rstd *^ t, t (in dy's layout, as GX): TensorIterator's result of (rstd, t), where rstd's
  // strides order the leading dims; into GX's memory where that is the same layout
  at::Tensor DX;
  if (want_dx) {
    DX = layout_of(rstd, GX);
    if (DX.strides() == GX.strides()) DX = GX;
  }
  const RowMap mdx(DX.defined() ? DX : x, k);
  TORCH_CHECK(mdx.ok, "pamtorch ", op, ": internal error: unexpected layout of dx");
  const Geo geo{n, mx.adjacent && mdy.adjacent && mi.adjacent && mdx.adjacent};
  const GradArgs a{bits(dy),
                   bits(x),
                   centered ? mv.data() : nullptr,
                   rs.data(),
                   cw.ptr(),
                   cw.tile(),
                   G.defined() ? bits_mut(G) : nullptr,
                   GX.defined() ? bits_mut(GX) : nullptr,
                   DYX.defined() ? bits_mut(DYX) : nullptr,
                   DX.defined() ? bits_mut(DX) : nullptr,
                   mdy.ptr(),
                   mx.ptr(),
                   mi.ptr(),
                   mdx.ptr()};
  for_rows(R, n, [&](int64_t r0, int64_t r1) {
    if (centered && cw.has()) grad_terms<true, true>(want_dx, want_dw, a, geo, r0, r1);
    else if (centered) grad_terms<true, false>(want_dx, false, a, geo, r0, r1);
    else if (cw.has()) grad_terms<false, true>(want_dx, want_dw, a, geo, r0, r1);
    else grad_terms<false, false>(want_dx, false, a, geo, r0, r1);
  });
  at::Tensor dw;
  if (want_dw) {
    std::vector<int64_t> lead;
    for (int64_t d = 0; d < x.dim() - k; ++d) lead.push_back(d);
    dw = lead.empty() ? DYX : at::sum(DYX, lead);
  }
  if (!want_dx) return {at::Tensor(), dw};
  const uint32_t nt = u32(static_cast<float>(n));
  const auto by_n = [nt](uint32_t s) { return pad_bits(s, nt); };
  std::vector<uint32_t> ga;
  if (centered) ga = PerRow(at::sum(cw.has() ? G : dy, sh.dims, true), k, by_n).v;
  const std::vector<uint32_t> gb = PerRow(at::sum(GX, sh.dims, true), k, by_n).v;
  const uint32_t *gap = centered ? ga.data() : nullptr, *gbp = gb.data();
  for_rows(R, n, [&](int64_t r0, int64_t r1) {
    if (centered && cw.has()) run<NormGradX<true, true>>(a, gap, gbp, geo, r0, r1);
    else if (centered) run<NormGradX<true, false>>(a, gap, gbp, geo, r0, r1);
    else if (cw.has()) run<NormGradX<false, true>>(a, gap, gbp, geo, r0, r1);
    else run<NormGradX<false, false>>(a, gap, gbp, geo, r0, r1);
  });
  return {DX, dw};
}

// softmax_forward along the last dim (safe: as aten._safe_softmax); None where x is not laid out
// as the kernels need
at::Tensor softmax_forward(const at::Tensor& x, bool safe) {
  const char* op = "softmax_forward";
  check(x, op, "x");
  const Shape sh(x, 1, op);
  const RowMap mx(x, 1);
  if (!mx.ok) return at::Tensor();
  at::Tensor e = dense_like(x);  // the layout of the composition's pa_exp(x - max)
  const RowMap me(e, 1);
  TORCH_CHECK(me.ok, "pamtorch ", op, ": internal error: unexpected layout of the exponentials");
  const Geo g{sh.n, mx.adjacent && me.adjacent};
  std::vector<uint32_t> mxv(sh.R);
  const uint32_t* xp = bits(x);
  uint32_t* ep = bits_mut(e);
  uint32_t* mp = mxv.data();
  for_rows(sh.R, sh.n, [&](int64_t r0, int64_t r1) {
    if (safe) run<SoftmaxExp<true>>(xp, mx.ptr(), mp, ep, me.ptr(), g, r0, r1);
    else run<SoftmaxExp<false>>(xp, mx.ptr(), mp, ep, me.ptr(), g, r0, r1);
  });
  const std::vector<uint32_t> s = row_values(at::sum(e, {-1}, true), 1, sh.R, op, "sum");
  const uint32_t* sp = s.data();
  for_rows(sh.R, sh.n, [&](int64_t r0, int64_t r1) {
    if (safe) run<SoftmaxDiv<true>>(ep, me.ptr(), sp, g, r0, r1);
    else run<SoftmaxDiv<false>>(ep, me.ptr(), sp, g, r0, r1);
  });
  return e;
}

// softmax_backward along the last dim: y *^ (dy - Σ(dy *^ y)); None where y or dy is not laid
// out as the kernels need
at::Tensor softmax_backward(const at::Tensor& y, const at::Tensor& dy) {
  const char* op = "softmax_backward";
  check(y, op, "y");
  check(dy, op, "dy");
  TORCH_CHECK(dy.sizes() == y.sizes(), "pamtorch ", op, ": 'dy' must have the shape of 'y', ", y.sizes(),
              ", got ", dy.sizes());
  const Shape sh(y, 1, op);
  const RowMap my(y, 1), mdy(dy, 1);
  if (!my.ok || !mdy.ok) return at::Tensor();
  at::Tensor p = dense_like(dy);  // the layout of the composition's dy *^ y
  // the result y *^ (dy - Σp), dy - Σp in dy's layout (as p): TensorIterator's result of (y, p);
  // into p's memory where that is the same layout
  at::Tensor out = layout_of(y, p);
  if (out.strides() == p.strides()) out = p;
  const RowMap mp(p, 1), mo(out, 1);
  TORCH_CHECK(mp.ok && mo.ok, "pamtorch ", op, ": internal error: unexpected layout of the products");
  const Geo g{sh.n, my.adjacent && mdy.adjacent && mp.adjacent && mo.adjacent};
  const uint32_t *yp = bits(y), *dyp = bits(dy);
  uint32_t* pp = bits_mut(p);
  uint32_t* op_ = bits_mut(out);
  for_rows(sh.R, sh.n, [&](int64_t r0, int64_t r1) {
    run<SoftmaxGradTerms>(dyp, mdy.ptr(), yp, my.ptr(), pp, mp.ptr(), g, r0, r1);
  });
  const std::vector<uint32_t> s = row_values(at::sum(p, {-1}, true), 1, sh.R, op, "sum");
  const uint32_t* sp = s.data();
  for_rows(sh.R, sh.n, [&](int64_t r0, int64_t r1) {
    run<SoftmaxGradX>(dyp, mdy.ptr(), yp, my.ptr(), sp, op_, mo.ptr(), g, r0, r1);
  });
  return out;
}

}  // namespace

// for the kernel route's layer-norm answers (pa_conv.cpp)
std::tuple<at::Tensor, at::Tensor, at::Tensor> route_norm_forward(const at::Tensor& x, int64_t k,
                                                                  const c10::optional<at::Tensor>& w,
                                                                  const c10::optional<at::Tensor>& b, double eps) {
  return norm_forward(x, k, w, b, eps, true);
}
std::tuple<at::Tensor, at::Tensor> route_norm_backward(const at::Tensor& dy, const at::Tensor& x, int64_t k,
                                                       const at::Tensor& mean, const at::Tensor& rstd,
                                                       const c10::optional<at::Tensor>& w, bool want_dx,
                                                       bool want_dw) {
  return norm_backward(dy, x, k, mean, rstd, w, want_dx, want_dw, true);
}

void register_norm(pybind11::module& m) {
  m.def("fused_norm_forward", &norm_forward,
        "PA layer norm (centered) / RMS norm over the last k dims: (y, mean, rstd); all None where x's "
        "layout does not fit, y None where a NaN arose in the bias add (then the composition runs)");
  m.def("fused_norm_backward", &norm_backward,
        "approx PA layer-norm (centered) / RMS-norm derivative: (dx, dw), dw summed over the leading "
        "dims; None where the layouts do not fit");
  m.def("fused_softmax_forward", &softmax_forward,
        "PA softmax along the last dim (safe: as _safe_softmax); None where x's layout does not fit");
  m.def("fused_softmax_backward", &softmax_backward,
        "approx PA softmax derivative along the last dim; None where the layouts do not fit");
}
