// pamtorch CPU kernels: fused PA layer norm, RMS norm and softmax, forward and backward.
// Bit-exact ports of the compositions of pamtorch/nn/functional.py they replace (which stay
// the definition and the fallback); no floating-point multiply or divide.
//
//   norm_forward(x, k, w, b, eps, centered)      layer_norm_forward (centered) / rms_norm_forward
//   norm_backward(dy, x, k, mean, rstd, w, dx, dw, centered)
//                                                layer_norm_backward / rms_norm_backward (dx, dw)
//   softmax_forward(x, safe), softmax_backward(y, dy)   softmax along the last dim
//
// All take float32 CPU tensors, contiguous, and work on rows: the last k dims (the normalized
// shape; the last dim for softmax) flattened to n, the leading dims to R rows. Where the
// composition sums (x.sum, e.sum, ...), these call torch's own at::sum on a tensor of the
// composition's shape and (contiguous) layout, so the summation order is the composition's;
// every other step is the same float32 operation in the same order: an IEEE add or subtract,
// or a PA op on bit patterns (the integer rules of arith.py, as pa_elementwise.cpp ports them).
//
// The elementwise steps run on chunks of at most BLK elements (whole rows when n <= BLK, else
// slices of one row), one simple loop per step through buffers that stay in L1, with the
// per-row values (mean, rstd, ...) expanded to one per element and the per-column ones (w, b)
// tiled, so that GCC vectorizes every step (compiled twice: for AVX2, and portable).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

constexpr uint32_t B32 = 0x3F800000u, MN32 = 0x00800000u, INF32 = 0x7F800000u, NAN32 = 0x7FC00000u,
                   SIGN32 = 0x80000000u, ABS32 = 0x7FFFFFFFu;
constexpr int64_t BLK = 256;  // elements per chunk

#define PA_INLINE __attribute__((always_inline)) inline

PA_INLINE uint32_t u32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
PA_INLINE float f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
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

// arith.pam on float32 patterns (pa_elementwise.cpp's pam_bits): |a| + |b| - B, sign xor, flush
// below the smallest normal, inf above; zero/inf/NaN operands by IEEE rules, NaN canonical.
// Branch-free, so that the loops vectorize; |a| + |b| < 2^32 cannot wrap.
PA_INLINE uint32_t pam_bits(uint32_t ux, uint32_t uy) {
  const uint32_t ma = ux & ABS32, mb = uy & ABS32;
  const uint32_t s = ma + mb;
  uint32_t r = s - B32;
  r = s < B32 + MN32 ? 0u : r;
  r = r > INF32 ? INF32 : r;
  const bool zero = (ma < MN32) | (mb < MN32);
  const bool inf = (ma == INF32) | (mb == INF32);
  const bool nan = (ma > INF32) | (mb > INF32) | (inf & zero);
  r = zero ? 0u : r;
  r = inf ? INF32 : r;
  return nan ? NAN32 : r | ((ux ^ uy) & SIGN32);
}

// arith.pad (pad_bits there): |a| - |b| + B computed as (|a| + B) - |b|
PA_INLINE uint32_t pad_bits(uint32_t ux, uint32_t uy) {
  const uint32_t ma = ux & ABS32, mb = uy & ABS32;
  const uint32_t s = ma + B32;
  uint32_t r = s - mb;
  r = s < mb + MN32 ? 0u : r;
  r = r > INF32 ? INF32 : r;
  const bool za = ma < MN32, zb = mb < MN32;
  const bool ia = ma == INF32, ib = mb == INF32;
  const bool nan = (ma > INF32) | (mb > INF32) | (za & zb) | (ia & ib);
  r = (za | ib) ? 0u : r;
  r = (zb | ia) ? INF32 : r;
  return nan ? NAN32 : r | ((ux ^ uy) & SIGN32);
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

// arith.pa_exp of a float32 z (pa_elementwise.cpp's exp32): paexp2(y) with y = z *^ log2 e the
// float64 PAM, i.e. pattern round(y * 2^23) + B, y clamped to +-512. In three vectorizable steps:
//  1. from the float64 pattern of z, the pattern of v = clamp(y) * 2^23: y's pattern is
//     |z| + log2e - B (z finite and nonzero: a float32 in float64 lies far inside the float64
//     range, so the PAM neither flushes nor overflows), times 2^23 by exponent-field addition,
//     clamped to 2^32 (also for z = inf), 0 for z = 0, z's sign;
//  2. round(v), ties to even, by the float64 add of 1.5 * 2^52 (|v| <= 2^32 < 2^51), read off
//     the pattern of the sum;
//  3. round(v) + B into the float32 range, NaN for NaN z.
constexpr int64_t EXP_C = 0x3FF71547652B82FELL - 0x3FF0000000000000LL + (23LL << 52);  // log2e - B, * 2^23
constexpr int64_t P2_32 = (1023LL + 32) << 52, MN64 = 1LL << 52, ABS64 = 0x7FFFFFFFFFFFFFFFLL;
constexpr double ROUNDER = 6755399441055744.0;  // 1.5 * 2^52
constexpr int64_t ROUNDER_BITS = 0x4338000000000000LL;
PA_INLINE int64_t exp_v_bits(int64_t u) {
  const int64_t ma = u & ABS64;
  int64_t p = ma > P2_32 - EXP_C ? P2_32 : ma + EXP_C;  // compared first: inf + EXP_C would wrap
  p = ma < MN64 ? 0 : p;
  return p | (u & ~ABS64);
}
PA_INLINE int64_t round_bits(int64_t v) { return i64(f64(v) + ROUNDER) - ROUNDER_BITS; }
PA_INLINE uint32_t exp_out_bits(int64_t t, uint32_t uz) {
  int64_t r = t + B32;
  r = r < int64_t(MN32) ? 0 : r;
  r = r > int64_t(INF32) ? int64_t(INF32) : r;
  return (uz & ABS32) > INF32 ? NAN32 : static_cast<uint32_t>(r);
}

// float32 patterns as int32 keys in the order of the values (-0 below +0; NaN not ordered)
PA_INLINE int32_t order_key(uint32_t u) { return static_cast<int32_t>(u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) >> 1)); }

// ---------------------------------------------------------------- rows in chunks

// The chunk that starts at row r, column c of rows [.., r1) of length n: its length.
PA_INLINE int64_t chunk_len(int64_t r, int64_t c, int64_t n, int64_t r1) {
  return n <= BLK ? std::min(BLK / n, r1 - r) * n : std::min(BLK, n - c);
}
PA_INLINE void chunk_next(int64_t& r, int64_t& c, int64_t n, int64_t m) {
  c += m;
  r += c / n;
  c %= n;
}
// buf[i] = v[row of element i] for the m elements of the chunk at row r, column c
PA_INLINE void expand(uint32_t* __restrict buf, const uint32_t* __restrict v, int64_t r, int64_t c, int64_t n,
                      int64_t m) {
  for (int64_t i = 0; i < m; ++r) {
    const int64_t k = std::min(n - c, m - i);
    const uint32_t s = v[r];
    for (int64_t j = 0; j < k; ++j) buf[i + j] = s;
    i += k;
    c = 0;
  }
}
// a per-column operand (w or b) for the chunk at column c: tiled BLK / n times when rows are
// whole (chunks then start at column 0), else the slice itself
PA_INLINE const uint32_t* cols(const uint32_t* v, const uint32_t* tiled, int64_t c, int64_t n) {
  return n <= BLK ? tiled : v + c;
}

// ---------------------------------------------------------------- the passes
// Each is a struct with one always-inlined run(): compiled into an AVX2 copy and a portable one.

// norm forward, first pass: q = (x - mean) *^ (x - mean), or x *^ x without centering
template <bool CENTER>
struct NormSquares {
  static PA_INLINE void run(const uint32_t* x, const uint32_t* mean, uint32_t* q, int64_t n, int64_t r0,
                            int64_t r1) {
    alignas(32) uint32_t me[BLK], t[BLK];
    for (int64_t r = r0, c = 0, m; r < r1; chunk_next(r, c, n, m)) {
      m = chunk_len(r, c, n, r1);
      const uint32_t* __restrict xs = x + r * n + c;
      uint32_t* __restrict qs = q + r * n + c;
      if (CENTER) {
        expand(me, mean, r, c, n, m);
        for (int64_t i = 0; i < m; ++i) t[i] = u32(f32(xs[i]) - f32(me[i]));
        for (int64_t i = 0; i < m; ++i) qs[i] = pam_bits(t[i], t[i]);
      } else {
        for (int64_t i = 0; i < m; ++i) qs[i] = pam_bits(xs[i], xs[i]);
      }
    }
  }
};

// norm forward, second pass: y = ((x - mean) *^ rstd) *^ w + b (each part optional); returns
// whether a NaN arose in the bias add (the only float result that reaches y unchanged)
template <bool CENTER, bool HAS_W, bool HAS_B>
struct NormOut {
  static PA_INLINE bool run(const uint32_t* x, const uint32_t* mean, const uint32_t* rstd, const uint32_t* w,
                            const uint32_t* wt, const uint32_t* b, const uint32_t* bt, uint32_t* y, int64_t n,
                            int64_t r0, int64_t r1) {
    alignas(32) uint32_t me[BLK], re[BLK], t[BLK];
    uint32_t nan = 0;
    for (int64_t r = r0, c = 0, m; r < r1; chunk_next(r, c, n, m)) {
      m = chunk_len(r, c, n, r1);
      const uint32_t* __restrict xs = x + r * n + c;
      uint32_t* __restrict ys = y + r * n + c;
      expand(re, rstd, r, c, n, m);
      if (CENTER) {
        expand(me, mean, r, c, n, m);
        for (int64_t i = 0; i < m; ++i) t[i] = u32(f32(xs[i]) - f32(me[i]));
        for (int64_t i = 0; i < m; ++i) t[i] = pam_bits(t[i], re[i]);
      } else {
        for (int64_t i = 0; i < m; ++i) t[i] = pam_bits(xs[i], re[i]);
      }
      if (HAS_W) {
        const uint32_t* __restrict ws = cols(w, wt, c, n);
        for (int64_t i = 0; i < m; ++i) t[i] = pam_bits(t[i], ws[i]);
      }
      if (HAS_B) {
        const uint32_t* __restrict bs = cols(b, bt, c, n);
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

// norm backward, first pass: with xh = (x - mean) *^ rstd (or x *^ rstd) and g = dy *^ w (or dy):
// G = g (with w), GX = g *^ xh (for dx), DYX = dy *^ xh (for dw)
template <bool CENTER, bool HAS_W, bool DX, bool DW>
struct NormGradTerms {
  static PA_INLINE void run(const uint32_t* dy, const uint32_t* x, const uint32_t* mean, const uint32_t* rstd,
                            const uint32_t* w, const uint32_t* wt, uint32_t* G, uint32_t* GX, uint32_t* DYX,
                            int64_t n, int64_t r0, int64_t r1) {
    alignas(32) uint32_t me[BLK], re[BLK], xh[BLK], g[BLK];
    for (int64_t r = r0, c = 0, m; r < r1; chunk_next(r, c, n, m)) {
      m = chunk_len(r, c, n, r1);
      const int64_t off = r * n + c;
      const uint32_t* __restrict xs = x + off;
      const uint32_t* __restrict dys = dy + off;
      expand(re, rstd, r, c, n, m);
      if (CENTER) {
        expand(me, mean, r, c, n, m);
        for (int64_t i = 0; i < m; ++i) xh[i] = u32(f32(xs[i]) - f32(me[i]));
        for (int64_t i = 0; i < m; ++i) xh[i] = pam_bits(xh[i], re[i]);
      } else {
        for (int64_t i = 0; i < m; ++i) xh[i] = pam_bits(xs[i], re[i]);
      }
      if (DX) {
        uint32_t* __restrict gxs = GX + off;
        if (HAS_W) {
          const uint32_t* __restrict ws = cols(w, wt, c, n);
          uint32_t* __restrict gs = G + off;
          for (int64_t i = 0; i < m; ++i) g[i] = pam_bits(dys[i], ws[i]);
          for (int64_t i = 0; i < m; ++i) gs[i] = g[i];
          for (int64_t i = 0; i < m; ++i) gxs[i] = pam_bits(g[i], xh[i]);
        } else {
          for (int64_t i = 0; i < m; ++i) gxs[i] = pam_bits(dys[i], xh[i]);
        }
      }
      if (DW) {
        uint32_t* __restrict ds = DYX + off;
        for (int64_t i = 0; i < m; ++i) ds[i] = pam_bits(dys[i], xh[i]);
      }
    }
  }
};

// norm backward, second pass: dx = rstd *^ ((g - a) - xh *^ b), or rstd *^ (g - xh *^ b)
// without centering; a = Σg /^ n and b = Σ(g *^ xh) /^ n per row
template <bool CENTER>
struct NormGradX {
  static PA_INLINE void run(const uint32_t* g, const uint32_t* x, const uint32_t* mean, const uint32_t* rstd,
                            const uint32_t* a, const uint32_t* b, uint32_t* dx, int64_t n, int64_t r0,
                            int64_t r1) {
    alignas(32) uint32_t me[BLK], re[BLK], ae[BLK], be[BLK], t[BLK];
    for (int64_t r = r0, c = 0, m; r < r1; chunk_next(r, c, n, m)) {
      m = chunk_len(r, c, n, r1);
      const int64_t off = r * n + c;
      const uint32_t* __restrict xs = x + off;
      const uint32_t* __restrict gs = g + off;
      uint32_t* __restrict os = dx + off;
      expand(re, rstd, r, c, n, m);
      expand(be, b, r, c, n, m);
      if (CENTER) {
        expand(me, mean, r, c, n, m);
        for (int64_t i = 0; i < m; ++i) t[i] = u32(f32(xs[i]) - f32(me[i]));
        for (int64_t i = 0; i < m; ++i) t[i] = pam_bits(t[i], re[i]);
      } else {
        for (int64_t i = 0; i < m; ++i) t[i] = pam_bits(xs[i], re[i]);
      }
      for (int64_t i = 0; i < m; ++i) t[i] = pam_bits(t[i], be[i]);
      if (CENTER) {
        expand(ae, a, r, c, n, m);
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
  static PA_INLINE void run(const uint32_t* x, uint32_t* mx, uint32_t* e, int64_t n, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t* __restrict xs = x + r * n;
      int32_t k = INT32_MIN;
      uint32_t mag = 0;
      for (int64_t i = 0; i < n; ++i) {
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
    for (int64_t r = r0, c = 0, m; r < r1; chunk_next(r, c, n, m)) {
      m = chunk_len(r, c, n, r1);
      const uint32_t* __restrict xs = x + r * n + c;
      uint32_t* __restrict es = e + r * n + c;
      expand(me, mx, r, c, n, m);
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
  static PA_INLINE void run(uint32_t* e, const uint32_t* s, int64_t n, int64_t r0, int64_t r1) {
    alignas(32) uint32_t se[BLK];
    for (int64_t r = r0, c = 0, m; r < r1; chunk_next(r, c, n, m)) {
      m = chunk_len(r, c, n, r1);
      uint32_t* __restrict es = e + r * n + c;
      expand(se, s, r, c, n, m);
      if (SAFE)
        for (int64_t i = 0; i < m; ++i) se[i] = (se[i] & ABS32) == 0 ? B32 : se[i];
      for (int64_t i = 0; i < m; ++i) es[i] = pad_bits(es[i], se[i]);
    }
  }
};

// softmax backward: p = dy *^ y, then (in place) y *^ (dy - Σp) per row
struct SoftmaxGradTerms {
  static PA_INLINE void run(const uint32_t* dy, const uint32_t* y, uint32_t* p, int64_t n, int64_t r0,
                            int64_t r1) {
    const int64_t i0 = r0 * n, i1 = r1 * n;
    const uint32_t* __restrict g = dy;
    const uint32_t* __restrict ys = y;
    uint32_t* __restrict ps = p;
    for (int64_t i = i0; i < i1; ++i) ps[i] = pam_bits(g[i], ys[i]);
  }
};
struct SoftmaxGradX {
  static PA_INLINE void run(const uint32_t* dy, const uint32_t* y, const uint32_t* s, uint32_t* out, int64_t n,
                            int64_t r0, int64_t r1) {
    alignas(32) uint32_t se[BLK], t[BLK];
    for (int64_t r = r0, c = 0, m; r < r1; chunk_next(r, c, n, m)) {
      m = chunk_len(r, c, n, r1);
      const int64_t off = r * n + c;
      const uint32_t* __restrict gs = dy + off;
      const uint32_t* __restrict ys = y + off;
      uint32_t* __restrict os = out + off;
      expand(se, s, r, c, n, m);
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
  TORCH_CHECK(t.is_contiguous(), "pamtorch ", op, ": '", name, "' must be contiguous");
}

const uint32_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint32_t*>(t.data_ptr<float>()); }
uint32_t* bits_mut(at::Tensor& t) { return reinterpret_cast<uint32_t*>(t.data_ptr<float>()); }

// The rows of x: (dims, n, R) for its last k dims.
struct Rows {
  std::vector<int64_t> dims;
  int64_t n = 1, R = 1;
  Rows(const at::Tensor& x, int64_t k, const char* op) {
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

// per-row op on the R values of a (keepdim) reduction: out[r] = f(in[r]), a new tensor
template <class F>
at::Tensor per_row(const at::Tensor& in, F f) {
  const at::Tensor s = in.contiguous();
  at::Tensor out = at::empty_like(s);
  const uint32_t* p = bits(s);
  uint32_t* o = bits_mut(out);
  for (int64_t r = 0; r < s.numel(); ++r) o[r] = f(p[r]);
  return out;
}

// ---------------------------------------------------------------- entry points

// layer_norm_forward (centered) / rms_norm_forward over the last k dims: (y, mean, rstd), mean
// undefined without centering; y undefined (None: the caller runs the composition) where a NaN
// arose in the bias add, whose NaN pattern is torch's add kernel's choice.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_forward(const at::Tensor& x, int64_t k,
                                                            const c10::optional<at::Tensor>& w,
                                                            const c10::optional<at::Tensor>& b, double eps,
                                                            bool centered) {
  const char* op = "norm_forward";
  check(x, op, "x");
  const Rows rows(x, k, op);
  const int64_t n = rows.n;
  const Cols cw(w, n, op, "w"), cb(b, n, op, "b");
  const uint32_t nt = u32(static_cast<float>(n));
  at::Tensor mean;
  if (centered) mean = per_row(at::sum(x, rows.dims, true), [nt](uint32_t s) { return pad_bits(s, nt); });
  const uint32_t* xp = bits(x);
  const uint32_t* mp = centered ? bits(mean) : nullptr;
  at::Tensor q = at::empty_like(x);
  uint32_t* qp = bits_mut(q);
  for_rows(rows.R, n, [&](int64_t r0, int64_t r1) {
    if (centered) run<NormSquares<true>>(xp, mp, qp, n, r0, r1);
    else run<NormSquares<false>>(xp, mp, qp, n, r0, r1);
  });
  const float epsf = static_cast<float>(eps);
  const at::Tensor rstd = per_row(at::sum(q, rows.dims, true), [nt, epsf](uint32_t s) {
    return rsqrt_bits(u32(f32(pad_bits(s, nt)) + epsf));
  });
  const uint32_t* rp = bits(rstd);
  const uint32_t *wp = cw.ptr(), *wt = cw.tile(), *bp = cb.ptr(), *bt = cb.tile();
  std::atomic<bool> nan{false};
  for_rows(rows.R, n, [&](int64_t r0, int64_t r1) {  // y into q's memory
    const int key = (centered ? 4 : 0) + (cw.has() ? 2 : 0) + (cb.has() ? 1 : 0);
    bool any = false;
    switch (key) {
      case 0: any = run<NormOut<false, false, false>>(xp, mp, rp, wp, wt, bp, bt, qp, n, r0, r1); break;
      case 1: any = run<NormOut<false, false, true>>(xp, mp, rp, wp, wt, bp, bt, qp, n, r0, r1); break;
      case 2: any = run<NormOut<false, true, false>>(xp, mp, rp, wp, wt, bp, bt, qp, n, r0, r1); break;
      case 3: any = run<NormOut<false, true, true>>(xp, mp, rp, wp, wt, bp, bt, qp, n, r0, r1); break;
      case 4: any = run<NormOut<true, false, false>>(xp, mp, rp, wp, wt, bp, bt, qp, n, r0, r1); break;
      case 5: any = run<NormOut<true, false, true>>(xp, mp, rp, wp, wt, bp, bt, qp, n, r0, r1); break;
      case 6: any = run<NormOut<true, true, false>>(xp, mp, rp, wp, wt, bp, bt, qp, n, r0, r1); break;
      default: any = run<NormOut<true, true, true>>(xp, mp, rp, wp, wt, bp, bt, qp, n, r0, r1); break;
    }
    if (any) nan.store(true, std::memory_order_relaxed);
  });
  return {nan.load() ? at::Tensor() : q, mean, rstd};
}

// layer_norm_backward (centered) / rms_norm_backward over the last k dims: (dx, dw), each
// undefined unless asked for (dw needs w); dw is Σ over the leading dims of dy *^ xh, not
// converted to w's dtype. mean and rstd: the forward's R values (mean ignored without centering).
template <bool CENTER, bool HAS_W>
void grad_terms(bool dx, bool dw, const uint32_t* dyp, const uint32_t* xp, const uint32_t* mp, const uint32_t* rp,
                const uint32_t* wp, const uint32_t* wt, uint32_t* G, uint32_t* GX, uint32_t* DYX, int64_t n,
                int64_t r0, int64_t r1) {
  if (dx && dw) run<NormGradTerms<CENTER, HAS_W, true, HAS_W>>(dyp, xp, mp, rp, wp, wt, G, GX, DYX, n, r0, r1);
  else if (dx) run<NormGradTerms<CENTER, HAS_W, true, false>>(dyp, xp, mp, rp, wp, wt, G, GX, DYX, n, r0, r1);
  else run<NormGradTerms<CENTER, HAS_W, false, HAS_W>>(dyp, xp, mp, rp, wp, wt, G, GX, DYX, n, r0, r1);
}

std::tuple<at::Tensor, at::Tensor> norm_backward(const at::Tensor& dy, const at::Tensor& x, int64_t k,
                                                 const c10::optional<at::Tensor>& mean, const at::Tensor& rstd,
                                                 const c10::optional<at::Tensor>& w, bool want_dx, bool want_dw,
                                                 bool centered) {
  const char* op = "norm_backward";
  check(x, op, "x");
  check(dy, op, "dy");
  TORCH_CHECK(dy.sizes() == x.sizes(), "pamtorch ", op, ": 'dy' must have the shape of 'x', ", x.sizes(),
              ", got ", dy.sizes());
  const Rows rows(x, k, op);
  const int64_t n = rows.n, R = rows.R;
  const Cols cw(w, n, op, "w");
  want_dw = want_dw && cw.has();
  if (!want_dx && !want_dw) return {at::Tensor(), at::Tensor()};
  const at::Tensor rs = rstd.contiguous();
  check(rs, op, "rstd");
  TORCH_CHECK(rs.numel() == R, "pamtorch ", op, ": 'rstd' must have ", R, " elements, got ", rs.numel());
  at::Tensor mc;
  if (centered) {
    TORCH_CHECK(mean.has_value() && mean->defined(), "pamtorch ", op, ": 'mean' is needed with centered=True");
    mc = mean->contiguous();
    check(mc, op, "mean");
    TORCH_CHECK(mc.numel() == R, "pamtorch ", op, ": 'mean' must have ", R, " elements, got ", mc.numel());
  }
  const uint32_t *dyp = bits(dy), *xp = bits(x), *mp = centered ? bits(mc) : nullptr, *rp = bits(rs);
  const uint32_t *wp = cw.ptr(), *wt = cw.tile();
  at::Tensor G, GX, DYX;
  if (want_dx && cw.has()) G = at::empty_like(x);
  if (want_dx) GX = at::empty_like(x);
  if (want_dw) DYX = at::empty_like(x);
  uint32_t* Gp = G.defined() ? bits_mut(G) : nullptr;
  uint32_t* GXp = GX.defined() ? bits_mut(GX) : nullptr;
  uint32_t* DYXp = DYX.defined() ? bits_mut(DYX) : nullptr;
  for_rows(R, n, [&](int64_t r0, int64_t r1) {
    if (centered && cw.has()) grad_terms<true, true>(want_dx, want_dw, dyp, xp, mp, rp, wp, wt, Gp, GXp, DYXp, n, r0, r1);
    else if (centered) grad_terms<true, false>(want_dx, false, dyp, xp, mp, rp, wp, wt, Gp, GXp, DYXp, n, r0, r1);
    else if (cw.has()) grad_terms<false, true>(want_dx, want_dw, dyp, xp, mp, rp, wp, wt, Gp, GXp, DYXp, n, r0, r1);
    else grad_terms<false, false>(want_dx, false, dyp, xp, mp, rp, wp, wt, Gp, GXp, DYXp, n, r0, r1);
  });
  at::Tensor dw;
  if (want_dw) {
    const int64_t nlead = x.dim() - k;
    std::vector<int64_t> lead;
    for (int64_t d = 0; d < nlead; ++d) lead.push_back(d);
    dw = nlead == 0 ? DYX : at::sum(DYX, lead);
  }
  if (!want_dx) return {at::Tensor(), dw};
  const uint32_t nt = u32(static_cast<float>(n));
  const at::Tensor& g = cw.has() ? G : dy;
  at::Tensor a;
  if (centered) a = per_row(at::sum(g, rows.dims, true), [nt](uint32_t s) { return pad_bits(s, nt); });
  const at::Tensor bb = per_row(at::sum(GX, rows.dims, true), [nt](uint32_t s) { return pad_bits(s, nt); });
  const uint32_t *gp = bits(g), *ap = centered ? bits(a) : nullptr, *bp = bits(bb);
  for_rows(R, n, [&](int64_t r0, int64_t r1) {  // dx into GX's memory
    if (centered) run<NormGradX<true>>(gp, xp, mp, rp, ap, bp, GXp, n, r0, r1);
    else run<NormGradX<false>>(gp, xp, mp, rp, ap, bp, GXp, n, r0, r1);
  });
  return {GX, dw};
}

// softmax_forward along the last dim (safe: as aten._safe_softmax)
at::Tensor softmax_forward(const at::Tensor& x, bool safe) {
  const char* op = "softmax_forward";
  check(x, op, "x");
  const Rows rows(x, 1, op);
  const int64_t n = rows.n;
  std::vector<uint32_t> mx(rows.R);
  at::Tensor e = at::empty_like(x);
  const uint32_t* xp = bits(x);
  uint32_t* ep = bits_mut(e);
  uint32_t* mp = mx.data();
  for_rows(rows.R, n, [&](int64_t r0, int64_t r1) {
    if (safe) run<SoftmaxExp<true>>(xp, mp, ep, n, r0, r1);
    else run<SoftmaxExp<false>>(xp, mp, ep, n, r0, r1);
  });
  const at::Tensor s = at::sum(e, {-1}, true).contiguous();
  const uint32_t* sp = bits(s);
  for_rows(rows.R, n, [&](int64_t r0, int64_t r1) {
    if (safe) run<SoftmaxDiv<true>>(ep, sp, n, r0, r1);
    else run<SoftmaxDiv<false>>(ep, sp, n, r0, r1);
  });
  return e;
}

// softmax_backward along the last dim: y *^ (dy - Σ(dy *^ y))
at::Tensor softmax_backward(const at::Tensor& y, const at::Tensor& dy) {
  const char* op = "softmax_backward";
  check(y, op, "y");
  check(dy, op, "dy");
  TORCH_CHECK(dy.sizes() == y.sizes(), "pamtorch ", op, ": 'dy' must have the shape of 'y', ", y.sizes(),
              ", got ", dy.sizes());
  const Rows rows(y, 1, op);
  const int64_t n = rows.n;
  at::Tensor p = at::empty_like(y);
  const uint32_t *yp = bits(y), *dyp = bits(dy);
  uint32_t* pp = bits_mut(p);
  for_rows(rows.R, n, [&](int64_t r0, int64_t r1) { run<SoftmaxGradTerms>(dyp, yp, pp, n, r0, r1); });
  const at::Tensor s = at::sum(p, {-1}, true).contiguous();
  const uint32_t* sp = bits(s);
  for_rows(rows.R, n, [&](int64_t r0, int64_t r1) { run<SoftmaxGradX>(dyp, yp, sp, pp, n, r0, r1); });
  return p;
}

}  // namespace

void register_norm(pybind11::module& m) {
  m.def("fused_norm_forward", &norm_forward,
        "PA layer norm (centered) / RMS norm over the last k dims: (y, mean, rstd); y None where a NaN "
        "arose in the bias add (then the composition runs)");
  m.def("fused_norm_backward", &norm_backward,
        "approx PA layer-norm (centered) / RMS-norm derivative: (dx, dw), dw summed over the leading dims");
  m.def("fused_softmax_forward", &softmax_forward, "PA softmax along the last dim (safe: as _safe_softmax)");
  m.def("fused_softmax_backward", &softmax_backward, "approx PA softmax derivative along the last dim");
}
