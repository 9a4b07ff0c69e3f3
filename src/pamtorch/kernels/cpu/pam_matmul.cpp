// pamtorch CPU kernels: matrix products with the piecewise affine multiplication (PAM,
// Mitchell's rule) and its exact piecewise-constant derivatives.
//
// One translation unit, built with plain -O3 -fopenmp (portable). The AVX2/FMA code lives
// in functions carrying __attribute__((target("avx2,fma"))) and is only called after
// __builtin_cpu_supports("avx2") && ("fma") said yes; everything else is portable C++.
//
// Emulation notes (all bit-identical to the integer rules of docs/numerics):
//  * The sign of a product is applied either by the integer add of the two bit patterns
//    (adding 2^31 modulo 2^32 flips bit 31 exactly like a XOR) or by a float multiply with
//    an exact +-1.0 / 0.0 table (a multiply by +-1 is bit-identical to a sign XOR, by 0.0
//    it gives the signed zero of a zero operand).
//  * Results whose pattern falls below the smallest normal are flushed: the kernels run
//    with FTZ+DAZ set in MXCSR (restored afterwards), so a subnormal product pattern is
//    read as zero by the float adder, and subnormal partial sums are flushed.
//  * In the exact-gradient kernels the power of two 2^(E+c) is applied to dC by a float
//    multiply with an exact power of two; under FTZ/DAZ that is bit-identical to adding
//    (E+c)<<23 to dC's pattern with flush to zero on underflow and inf on overflow.
//    The fused (FMA) variant is only used when the operand ranges prove that no term can
//    overflow or underflow; otherwise a separate multiply and add are used.
//  * Inf/NaN operands are packed as zeros; afterwards their terms (each +-inf or NaN) are
//    summed per entry with the exact scalar rule and added to the vector sum f. Their order
//    among themselves is irrelevant, but not their place in k order: when f overflowed to
//    the opposite inf, the k-order sum is that inf if it came before the overflow and NaN
//    otherwise. Only such entries are recomputed in k order (needs_k_order), so every
//    entry is the k-order sum and the finite fast path is untouched.
//  * An offset alpha (0.5 <= alpha <= 2) enters every term as the integer D = bits(alpha) -
//    bits(1.0), |D| <= 2^23, added to the product pattern; in the exact gradients it adds
//    E_alpha to the exponent and alpha's mantissa to the carry. Every entry takes D
//    (0: no offset).

#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if (defined(__x86_64__) || defined(_M_X64) || defined(__i386__)) && !defined(PAM_NO_X86)
#define PAM_X86 1
#include <immintrin.h>
#else
#define PAM_X86 0
#endif

namespace {

constexpr uint32_t BIAS = 0x3F800000u;     // pattern of 1.0f
constexpr uint32_t MINNORM = 0x00800000u;  // smallest normal pattern
constexpr uint32_t INFP = 0x7F800000u;
constexpr uint32_t QNAN = 0x7FC00000u;

std::atomic<int> g_last_mode{-1};

inline uint32_t fbits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bitsf(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Small products run on one thread: waking an OpenMP team costs more than the work, and
// far more (milliseconds) when another process holds a core.
thread_local int g_thread_cap = 1 << 30;
int num_threads() { return std::max(1, std::min(g_thread_cap, at::get_num_threads())); }
struct ThreadCap {
  int old;
  explicit ThreadCap(int64_t work) : old(g_thread_cap) {
    if (work < (int64_t(1) << 21)) g_thread_cap = 1;
  }
  ~ThreadCap() { g_thread_cap = old; }
};

// fn(i) for i in [0, n) on nt threads (static schedule). With nt <= 1 a plain loop: an
// OpenMP parallel region with if(false) still builds a team of one, which costs more than
// packing one small matrix of a batched product.
template <typename F>
void parallel_for(int nt, int64_t n, F&& fn) {
  if (nt <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < n; ++i) fn(i);
}

// Per-thread packing buffers, reused across calls: a batched product of many small
// matrices would otherwise allocate (and free) two tensors per matrix.
struct Scratch {
  int32_t* p = nullptr;
  size_t cap = 0;
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  ~Scratch() { std::free(p); }
  int32_t* get(size_t n) {
    if (n > cap) {
      std::free(p);
      cap = std::min(std::max(n, cap + cap / 2), std::max(n, size_t(1) << 23));
      p = static_cast<int32_t*>(std::aligned_alloc(64, (cap * 4 + 63) / 64 * 64));
      TORCH_CHECK(p != nullptr, "pamtorch: out of memory for a packing buffer of ", cap * 4, " bytes");
    }
    return p;
  }
};
thread_local Scratch g_scratch_b, g_scratch_a, g_scratch_c, g_scratch_s;

// A packing buffer of n int32: the thread's reused one up to 32 MiB, else a tensor held by the
// caller. A fresh buffer of several MiB costs its page faults on every call (a step's FFN weight
// gradient packs 16 MiB of B: a third of the product's time); the cap bounds what a thread
// keeps alive (two buffers).
int32_t* pack_buffer(Scratch& s, int64_t n, at::Tensor& hold) {
  if (n <= (int64_t(1) << 23)) return s.get((size_t)std::max<int64_t>(n, 1));
  hold = at::empty({n}, at::TensorOptions().dtype(at::kInt));
  return hold.data_ptr<int32_t>();
}

// ---------------------------------------------------------------- FTZ/DAZ guard
struct FtzGuard {
  FtzGuard(const FtzGuard&) = delete;
#if PAM_X86
  unsigned int old;
  FtzGuard() {
    old = _mm_getcsr();
    _mm_setcsr(old | 0x8040u);  // FTZ (bit 15) + DAZ (bit 6)
  }
  ~FtzGuard() { _mm_setcsr(old); }
#else
  FtzGuard() {}
#endif
};

bool cpu_has_avx2_fma() {
#if PAM_X86 && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

// ---------------------------------------------------------------- scalar exact rules
// PAM of two float32 patterns, offset D added to the product pattern.
inline float pam_scalar(uint32_t a, uint32_t b, int64_t D) {
  const uint32_t Pa = a & 0x7FFFFFFFu, Pb = b & 0x7FFFFFFFu;
  const uint32_t s = (a ^ b) & 0x80000000u;
  if (Pa > INFP || Pb > INFP) return bitsf(QNAN);
  const bool za = Pa < MINNORM, zb = Pb < MINNORM;
  if (Pa == INFP || Pb == INFP) return (za || zb) ? bitsf(QNAN) : bitsf(s | INFP);
  if (za || zb) return bitsf(s);
  const int64_t sum = (int64_t)Pa + (int64_t)Pb - (int64_t)BIAS + D;
  if (sum < (int64_t)MINNORM) return bitsf(s);
  if (sum >= (int64_t)INFP) return bitsf(s | INFP);
  return bitsf(s | (uint32_t)sum);
}

// mantissa field used by the carry: zero/subnormal counts as 0
inline uint32_t mant_of(uint32_t u) {
  return ((u & 0x7FFFFFFFu) >= MINNORM) ? (u & 0x7FFFFFu) : 0u;
}

// One term of an exact gradient: dC * sign(q) * 2^(E_q + floor((mant(q) + mo + D) / 2^23))
// (D = 0: 2^(E_q + c), c the carry of mant(q) + mo), by exponent arithmetic on dC's
// pattern. q inf/NaN -> PAM(q, dC). q zero -> dC*0.
inline float eterm(uint32_t d, uint32_t q, uint32_t mo, int64_t D) {
  const uint32_t Pq = q & 0x7FFFFFFFu, Pd = d & 0x7FFFFFFFu;
  if (Pq >= INFP) return pam_scalar(q, d, D);
  const uint32_t s = (d ^ q) & 0x80000000u;
  if (Pd > INFP) return bitsf(QNAN);
  if (Pq < MINNORM) return Pd == INFP ? bitsf(QNAN) : bitsf(s);
  if (Pd == INFP) return bitsf(s | INFP);
  if (Pd < MINNORM) return bitsf(s);
  const int64_t e = (int64_t)(Pq >> 23) - 127 + (((int64_t)(Pq & 0x7FFFFFu) + mo + D) >> 23);
  const int64_t t = (int64_t)Pd + e * (int64_t)MINNORM;
  if (t < (int64_t)MINNORM) return bitsf(s);
  if (t >= (int64_t)INFP) return bitsf(s | INFP);
  return bitsf(s | (uint32_t)t);
}

// ---------------------------------------------------------------- strided matrix view
// A float32 matrix as a pointer and strides, with the few Tensor methods the kernels use:
// the batched entries hand each small matrix over without creating a Tensor view for it.
struct Mat {
  float* p;
  int64_t n0, n1, st0, st1;
  Mat(float* p_, int64_t n0_, int64_t n1_, int64_t s0_, int64_t s1_)
      : p(p_), n0(n0_), n1(n1_), st0(s0_), st1(s1_) {}
  Mat(const at::Tensor& t)  // NOLINT: implicit, so that the 2-D entries pass their tensors
      : p(t.data_ptr<float>()), n0(t.size(0)), n1(t.size(1)), st0(t.stride(0)), st1(t.stride(1)) {}
  int64_t size(int d) const { return d == 0 ? n0 : n1; }
  int64_t stride(int d) const { return d == 0 ? st0 : st1; }
  template <typename T>
  T* data_ptr() const {
    static_assert(std::is_same<T, float>::value, "Mat holds float32");
    return p;
  }
  void zero_() {
    for (int64_t i = 0; i < n0; ++i)
      for (int64_t j = 0; j < n1; ++j) p[i * st0 + j * st1] = 0.f;
  }
};

// matrix i of a 3-D tensor
Mat mat_of(const at::Tensor& t, int64_t i) {
  return Mat(t.data_ptr<float>() + i * t.stride(0), t.size(1), t.size(2), t.stride(1), t.stride(2));
}

// ---------------------------------------------------------------- operand statistics
struct Stats {
  uint32_t minP = 0x7FFFFFFFu;  // over finite normal values
  uint32_t maxP = 0;
  int64_t nnorm = 0, nzero = 0, nspec = 0, ninf = 0;
  int emin() const { return (int)(minP >> 23) - 127; }
  int emax() const { return (int)(maxP >> 23) - 127; }
};

// From the operands' normal pattern ranges (each operand with a normal value):
// fast: every nonzero product pattern lies in [0, 0x7F800000), so the fast modes' integer add
//   gives it without clamps (F0's condition);
// skip: every product is at least 2^-103 in magnitude. Then every partial sum is a multiple of
//   2^-126, so zero (+0 under round to nearest, from +0) or normal, never flushed to -0, and
//   adding a zero term leaves it unchanged: the term may be skipped (FZ) or added as +-0 (SB).
struct ProductRange {
  bool fast, skip;
};
inline ProductRange product_range(uint32_t minPa, uint32_t maxPa, uint32_t minPb, uint32_t maxPb, int64_t D) {
  const int64_t lo = (int64_t)minPa + (int64_t)minPb - (int64_t)BIAS + D;
  const int64_t hi = (int64_t)maxPa + (int64_t)maxPb - (int64_t)BIAS + D;
  return {lo >= 0 && hi < (int64_t)INFP, lo >= (int64_t(24) << 23)};
}

template <bool dummy>
inline __attribute__((always_inline)) void stats_rows_body(const float* p, int64_t r0, int64_t r1,
                                                           int64_t cols, int64_t s0, int64_t s1,
                                                           Stats& st) {
  uint32_t mn = 0x7FFFFFFFu, mx = 0;
  int64_t nz = 0, ns = 0, ni = 0;
  for (int64_t i = r0; i < r1; ++i) {
    const float* row = p + i * s0;
    uint32_t lmn = 0x7FFFFFFFu, lmx = 0, lnz = 0, lns = 0, lni = 0;
    if (s1 == 1) {
      for (int64_t j = 0; j < cols; ++j) {
        uint32_t u;
        std::memcpy(&u, row + j, 4);
        u &= 0x7FFFFFFFu;
        const bool norm = (u - MINNORM) < (INFP - MINNORM);
        lmn = std::min(lmn, norm ? u : 0x7FFFFFFFu);
        lmx = std::max(lmx, norm ? u : 0u);
        lnz += (u < MINNORM);
        lns += (u >= INFP);
        lni += (u == INFP);
      }
    } else {
      for (int64_t j = 0; j < cols; ++j) {
        uint32_t u = fbits(row[j * s1]) & 0x7FFFFFFFu;
        const bool norm = (u - MINNORM) < (INFP - MINNORM);
        lmn = std::min(lmn, norm ? u : 0x7FFFFFFFu);
        lmx = std::max(lmx, norm ? u : 0u);
        lnz += (u < MINNORM);
        lns += (u >= INFP);
        lni += (u == INFP);
      }
    }
    mn = std::min(mn, lmn);
    mx = std::max(mx, lmx);
    nz += lnz;
    ns += lns;
    ni += lni;
  }
  st.minP = std::min(st.minP, mn);
  st.maxP = std::max(st.maxP, mx);
  st.nzero += nz;
  st.nspec += ns;
  st.ninf += ni;
}

#if PAM_X86
// all ones in the lanes l < n of a vector of 8 (masked loads, stores and gathers of a tail)
__attribute__((target("avx2,fma"))) inline __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)std::max<int64_t>(std::min<int64_t>(n, 8), -1)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// all ones in the lanes whose pattern u is a normal number (either sign); P = |u|
__attribute__((target("avx2,fma"))) inline __m256i normal_lanes(__m256i P) {
  const __m256i x = _mm256_sub_epi32(P, _mm256_set1_epi32((int)MINNORM));  // normal: 0 <= x < INFP - MINNORM
  return _mm256_and_si256(_mm256_cmpgt_epi32(x, _mm256_set1_epi32(-1)),
                          _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(INFP - MINNORM)), x));
}

// add the per-lane counts to the totals and clear them
__attribute__((target("avx2,fma"))) inline void stats_flush(__m256i& cz, __m256i& cs, __m256i& ci,
                                                            int64_t& nz, int64_t& ns, int64_t& ni) {
  alignas(32) int32_t t[3][8];
  _mm256_store_si256((__m256i*)t[0], cz);
  _mm256_store_si256((__m256i*)t[1], cs);
  _mm256_store_si256((__m256i*)t[2], ci);
  for (int l = 0; l < 8; ++l) {
    nz += t[0][l];
    ns += t[1][l];
    ni += t[2][l];
  }
  cz = cs = ci = _mm256_setzero_si256();
}

__attribute__((target("avx2,fma"))) void stats_rows_avx2(const float* p, int64_t r0, int64_t r1,
                                                          int64_t cols, int64_t s0, int64_t s1,
                                                          Stats& st) {
  if (s1 != 1) {
    stats_rows_body<true>(p, r0, r1, cols, s0, s1, st);
    return;
  }
  const __m256i ABS = _mm256_set1_epi32(0x7FFFFFFF), MN = _mm256_set1_epi32((int)MINNORM),
                INF1 = _mm256_set1_epi32((int)INFP - 1), INF = _mm256_set1_epi32((int)INFP);
  __m256i vmn = ABS, vmx = _mm256_setzero_si256();
  int64_t nz = 0, ns = 0, ni = 0;
  const int64_t cv = cols / 8 * 8;
  // per-lane counts, summed into nz/ns/ni before a lane could reach 2^31 (and at the end)
  __m256i cz = _mm256_setzero_si256(), cs = cz, ci = cz;
  int64_t pending = 0;
  for (int64_t i = r0; i < r1; ++i) {
    const float* row = p + i * s0;
    if (pending + cv / 8 >= (int64_t(1) << 30)) {
      stats_flush(cz, cs, ci, nz, ns, ni);
      pending = 0;
    }
    pending += cv / 8;
    for (int64_t j = 0; j < cv; j += 8) {
      const __m256i u = _mm256_and_si256(_mm256_loadu_si256((const __m256i*)(row + j)), ABS);
      const __m256i isz = _mm256_cmpgt_epi32(MN, u);
      const __m256i iss = _mm256_cmpgt_epi32(u, INF1);
      const __m256i bad = _mm256_or_si256(isz, iss);
      vmn = _mm256_min_epi32(vmn, _mm256_or_si256(u, _mm256_and_si256(bad, ABS)));
      vmx = _mm256_max_epi32(vmx, _mm256_andnot_si256(bad, u));
      cz = _mm256_sub_epi32(cz, isz);
      cs = _mm256_sub_epi32(cs, iss);
      ci = _mm256_sub_epi32(ci, _mm256_cmpeq_epi32(u, INF));
    }
  }
  if (cv < cols) {  // tail columns: masked loads, the masked-off lanes count nowhere
    const __m256i tmask = first_lanes(cols - cv);
    const __m256i off = _mm256_andnot_si256(tmask, _mm256_set1_epi32(-1));
    for (int64_t i = r0; i < r1; ++i) {
      if (pending + 1 >= (int64_t(1) << 30)) {
        stats_flush(cz, cs, ci, nz, ns, ni);
        pending = 0;
      }
      ++pending;
      const __m256i u = _mm256_and_si256(_mm256_maskload_epi32((const int*)(p + i * s0 + cv), tmask), ABS);
      const __m256i isz = _mm256_and_si256(_mm256_cmpgt_epi32(MN, u), tmask);
      const __m256i iss = _mm256_and_si256(_mm256_cmpgt_epi32(u, INF1), tmask);
      const __m256i bad = _mm256_or_si256(_mm256_or_si256(isz, iss), off);
      vmn = _mm256_min_epi32(vmn, _mm256_or_si256(u, _mm256_and_si256(bad, ABS)));
      vmx = _mm256_max_epi32(vmx, _mm256_andnot_si256(bad, u));
      cz = _mm256_sub_epi32(cz, isz);
      cs = _mm256_sub_epi32(cs, iss);
      ci = _mm256_sub_epi32(ci, _mm256_and_si256(_mm256_cmpeq_epi32(u, INF), tmask));
    }
  }
  stats_flush(cz, cs, ci, nz, ns, ni);
  alignas(32) uint32_t a[8], b[8];
  _mm256_store_si256((__m256i*)a, vmn);
  _mm256_store_si256((__m256i*)b, vmx);
  for (int l = 0; l < 8; ++l) {
    st.minP = std::min(st.minP, a[l]);
    st.maxP = std::max(st.maxP, b[l]);
  }
  st.nzero += nz;
  st.nspec += ns;
  st.ninf += ni;
}
#endif
void stats_rows_generic(const float* p, int64_t r0, int64_t r1, int64_t cols, int64_t s0,
                        int64_t s1, Stats& st) {
  stats_rows_body<false>(p, r0, r1, cols, s0, s1, st);
}

Stats stats2d(const Mat& t) {
  const float* p = t.data_ptr<float>();
  int64_t rows = t.size(0), cols = t.size(1);
  int64_t s0 = t.stride(0), s1 = t.stride(1);
  if (s1 != 1 && (s0 == 1 || rows == 1)) {  // transposed view: same values, read row-wise
    std::swap(rows, cols);
    std::swap(s0, s1);
  }
  Stats total;
  if (rows == 0 || cols == 0) return total;
  if (s1 == 1 && s0 == cols) {  // contiguous: one row of all the values (short rows cost a tail each)
    cols *= rows;
    rows = 1;
  }
  const bool avx = cpu_has_avx2_fma();
  const int nt = num_threads();
  if (nt == 1) {  // no team and no per-thread parts for the small products
#if PAM_X86
    if (avx)
      stats_rows_avx2(p, 0, rows, cols, s0, s1, total);
    else
#endif
      stats_rows_generic(p, 0, rows, cols, s0, s1, total);
    total.nnorm = rows * cols - total.nzero - total.nspec;
    return total;
  }
  std::vector<Stats> part(nt);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int t_ = 0; t_ < nt; ++t_) {
    const int64_t r0 = rows * t_ / nt, r1 = rows * (t_ + 1) / nt;
    if (r0 >= r1) continue;
#if PAM_X86
    if (avx)
      stats_rows_avx2(p, r0, r1, cols, s0, s1, part[t_]);
    else
#endif
      stats_rows_generic(p, r0, r1, cols, s0, s1, part[t_]);
  }
  (void)avx;
  for (auto& s : part) {
    total.minP = std::min(total.minP, s.minP);
    total.maxP = std::max(total.maxP, s.maxP);
    total.nzero += s.nzero;
    total.nspec += s.nspec;
    total.ninf += s.ninf;
  }
  total.nnorm = rows * cols - total.nzero - total.nspec;
  return total;
}

// ---------------------------------------------------------------- scalar exact paths
// Portable path (and the exact route for rare special combinations). Summation is
// sequential over the reduction index, like the vector kernels.
void fwd_scalar(const Mat& a, const Mat& b, Mat& c, int64_t D) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  const float* A = a.data_ptr<float>();
  const float* B = b.data_ptr<float>();
  float* C = c.data_ptr<float>();
  const int64_t as0 = a.stride(0), as1 = a.stride(1), bs0 = b.stride(0), bs1 = b.stride(1);
  const int nt = num_threads();
#pragma omp parallel num_threads(nt)
  {
    FtzGuard g;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < M; ++i) {
      float* crow = C + i * N;
      for (int64_t j = 0; j < N; ++j) crow[j] = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const uint32_t ua = fbits(A[i * as0 + k * as1]);
        const float* brow = B + k * bs0;
        for (int64_t j = 0; j < N; ++j) crow[j] += pam_scalar(ua, fbits(brow[j * bs1]), D);
      }
    }
  }
}

// out[R, Cc] = sum_t eterm(X[r,t], Q[t,c], mant(Mo[r,c]))
// grad_a: X = dC (M,N), Q[t=j, c=k] = B[k,j], Mo = A            -> out = dA (M,K)
// grad_b: X = dC^T (N,M), Q[t=i, c=k] = A[i,k], Mo[j,k] = B[k,j] -> out = dB^T
void egrad_scalar(const float* X, int64_t xs0, int64_t xs1, const float* Q, int64_t qs0,
                  int64_t qs1, const float* Mo, int64_t ms0, int64_t ms1, float* O, int64_t os0,
                  int64_t os1, int64_t R, int64_t Cc, int64_t T, int64_t D) {
  const int nt = num_threads();
#pragma omp parallel num_threads(nt)
  {
    FtzGuard g;
    std::vector<float> acc(Cc);
    std::vector<uint32_t> mo(Cc);
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t c = 0; c < Cc; ++c) {
        acc[c] = 0.f;
        mo[c] = mant_of(fbits(Mo[r * ms0 + c * ms1]));
      }
      for (int64_t t = 0; t < T; ++t) {
        const uint32_t d = fbits(X[r * xs0 + t * xs1]);
        const float* qrow = Q + t * qs0;
        for (int64_t c = 0; c < Cc; ++c) acc[c] += eterm(d, fbits(qrow[c * qs1]), mo[c], D);
      }
      for (int64_t c = 0; c < Cc; ++c) O[r * os0 + c * os1] = acc[c];
    }
  }
}

// ---------------------------------------------------------------- deferred inf/NaN terms
// The vector kernels pack inf/NaN operands as zeros, so their pass leaves f, the k-order sum
// of the other terms, and the deferred terms (each +-inf or NaN, never finite) are summed
// separately into s (+0 when there are none), in any order: that sum is NaN if one is NaN or
// their signs differ, else the common inf. f + s is then the k-order sum, except when f and s
// are opposite infs: f overflowed (or has an overflowed product), and in k order the result
// is s when an inf of s's sign comes before that overflow and NaN otherwise. Only that rare
// entry needs the sequential sum, so this says whether to recompute it.
inline bool needs_k_order(float f, float s) { return std::isinf(f) && std::isinf(s) && f != s; }

// One entry by the definition: its terms summed in k order from +0 (called under FtzGuard).
// A NaN running sum stays NaN, so the loop stops there.
float fwd_entry(const float* a, int64_t as1, const float* b, int64_t bs0, int64_t K, int64_t D) {
  float acc = 0.f;
  for (int64_t k = 0; k < K && !std::isnan(acc); ++k) acc += pam_scalar(fbits(a[k * as1]), fbits(b[k * bs0]), D);
  return acc;
}
float egrad_entry(const float* x, int64_t xs1, const float* q, int64_t qs0, uint32_t mo, int64_t T,
                  int64_t D) {
  float acc = 0.f;
  for (int64_t t = 0; t < T && !std::isnan(acc); ++t) acc += eterm(fbits(x[t * xs1]), fbits(q[t * qs0]), mo, D);
  return acc;
}

#if PAM_X86
// ================================================================ AVX2 forward kernels
// Modes (chosen per call from operand statistics):
//  F0  : no zero/special anywhere, no product can underflow below 0 or overflow.
//        x = bits(a) + (bits(b) - 1.0 pattern + D)  (sign of the product lands in bit 31),
//        acc += x.                                                   [2 ops]
//  FB  : B has zeros: acc = fma(x, mB, acc), mB = 1.0 / a zero of b's sign  [2 ops]
//  FA  : A has zeros (B none): acc = fma(x, mA, acc), mA broadcast (1.0 / a zero of a's
//        sign); a zero a is packed as 1.0 pattern - D, so that its x is b itself (finite)
//        times the zero                                              [2 ops]
//  FAB : both: x &= maskA (broadcast), acc = fma(x, mB, acc); a zero a is packed as its
//        sign + 1.0 pattern - D and masked to the sign bit, so that x is the zero of
//        sign_a ^ sign_b                                             [3 ops]
//  G   : general finite inputs (underflow/overflow possible):
//        s = |a| + (|b| - 0x7F800000) (a non-normal b: |b| taken as 0);
//        s = min(max(s, LO), HI_a); x = s + OFF_a; acc = fma(x, sB, acc), sB = +-1 / a
//        zero of b's sign. LO = -2^30 - D (pattern 0), HI = 0x3F800000 - D (pattern inf)
//        or LO for a zero a, OFF = 2^30 + D + sign_a*2^31.            [5 ops]
// In all fast modes a product pattern in [0, 2^23) is a subnormal, read as 0 under DAZ.
// A zero term always has PA's sign, sign_a ^ sign_b: it shows when a partial sum flushed to
// -0 (FTZ) and a +0 term follows (-0 + +0 = +0). FZ and FZT (below) skip zero terms, which
// is exact only where no partial sum can flush (every product >= 2^-103 in magnitude).
enum FwdMode { F0 = 0, FB = 1, FA = 2, FAB = 3, FG = 4 };

constexpr int FNV = 2, FNR = 16;  // forward micro-tile width

template <int MODE>
struct FwdTraits {
  static constexpr int BS = (MODE == F0 || MODE == FA) ? 1 : 2;  // B planes per k
};

// vbroadcastss from memory is a pure load on AMD Zen (vpbroadcastd also uses an ALU pipe)
__attribute__((target("avx2,fma"))) inline __m256i bcast32(const int32_t* p) {
  return _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(p)));
}

template <int MODE>
struct FwdA {
  // A planes per k in packed strips ([strip][k][AS][MR]); F0/FB read raw rows instead, or
  // strips of the raw patterns (AS 1) packed per macro tile from a column-major A
  static constexpr bool PACKED = (MODE == FA || MODE == FAB || MODE == FG);
  static constexpr int AS = MODE == FG ? 3 : PACKED ? 2 : 1;
};

// NV vectors of 8 columns: 2 (a full 16-column strip), or 1 for a last strip of at most 8
// columns (the packed strip keeps its 16-column layout; only its first 8 lanes are read)
template <int MODE, int MR, int NV = FNV, bool PACKED = FwdA<MODE>::PACKED>
__attribute__((target("avx2,fma"))) inline void fwd_ukernel(int64_t kc, const int32_t* const* arow,
                                                            const int32_t* __restrict Ap,
                                                            const int32_t* __restrict Bp, float* C,
                                                            int64_t ldc, bool load, int32_t lo) {
  constexpr int BS = FwdTraits<MODE>::BS;
  constexpr int AS = FwdA<MODE>::AS;
  __m256 acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[r][v] = load ? _mm256_loadu_ps(C + r * ldc + v * 8) : _mm256_setzero_ps();
  const int32_t* ap[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) ap[r] = PACKED ? nullptr : arow[r];
  const __m256i LO = _mm256_set1_epi32(lo);
  for (int64_t k = 0; k < kc; ++k) {
    __m256i pb[NV];
    __m256 mb[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      pb[v] = _mm256_loadu_si256((const __m256i*)(Bp + v * 8));
      if (BS == 2) mb[v] = _mm256_loadu_ps((const float*)(Bp + FNR + v * 8));
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m256i pa = bcast32(PACKED ? Ap + r : ap[r] + k);
      if (MODE == F0) {
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v)
          acc[r][v] = _mm256_add_ps(acc[r][v], _mm256_castsi256_ps(_mm256_add_epi32(pa, pb[v])));
      } else if (MODE == FB) {
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v)
          acc[r][v] =
              _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_add_epi32(pa, pb[v])), mb[v], acc[r][v]);
      } else if (MODE == FA) {
        const __m256 ma = _mm256_castsi256_ps(bcast32(Ap + MR + r));
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v)
          acc[r][v] =
              _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_add_epi32(pa, pb[v])), ma, acc[r][v]);
      } else if (MODE == FAB) {
        const __m256i mk = bcast32(Ap + MR + r);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v)
          acc[r][v] = _mm256_fmadd_ps(
              _mm256_castsi256_ps(_mm256_and_si256(_mm256_add_epi32(pa, pb[v]), mk)), mb[v],
              acc[r][v]);
      } else {  // FG
        const __m256i hi = bcast32(Ap + MR + r);
        const __m256i off = bcast32(Ap + 2 * MR + r);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          __m256i s = _mm256_add_epi32(pa, pb[v]);
          s = _mm256_min_epi32(_mm256_max_epi32(s, LO), hi);
          s = _mm256_add_epi32(s, off);
          acc[r][v] = _mm256_fmadd_ps(_mm256_castsi256_ps(s), mb[v], acc[r][v]);
        }
      }
    }
    Bp += BS * FNR;
    if (PACKED) Ap += AS * MR;
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(C + r * ldc + v * 8, acc[r][v]);
}

struct FwdArgs {
  int64_t M, N, K;
  const int32_t* A0;  // raw bits of A (F0/FB), row stride lda
  int64_t lda;
  const int32_t* Ap;  // packed A strips [ceil(M/MR)][K][AS][MR] (FA/FAB/FG)
  const int32_t* Bp;  // [ceil(N/16)][K][BS][16]
  float* C;           // (M, N) contiguous
  int32_t lo;         // FG's lower clamp, -2^30 - D
  // packed modes with Ap == nullptr: each macro tile packs its own rows of A, one reduction
  // block at a time, from the raw operand (a long reduction, e.g. a weight gradient, whose
  // whole packed A would be several times the operand and is read by one tile only)
  const float* Araw = nullptr;
  int64_t as0 = 0, as1 = 0;
  int32_t D = 0;
};

thread_local Scratch g_scratch_lazy;

template <int MODE, int MR>
__attribute__((target("avx2,fma"))) void pack_a_strip_avx2(const float* A, int64_t i0, int64_t M,
                                                            int64_t K, int64_t s0, int64_t s1,
                                                            int32_t D, int32_t* o);
template <int MODE, int MR>
__attribute__((target("avx2,fma"))) int64_t pack_a_colmajor_block(const float* A, int64_t i0, int64_t i1,
                                                                 int64_t K, int64_t s1, int32_t D, int32_t* o);

template <int MODE, int MR, bool PACKED = FwdA<MODE>::PACKED>
__attribute__((target("avx2,fma"))) void fwd_macro(const FwdArgs& g, int64_t ic, int64_t jc,
                                                   int64_t MC, int64_t NC, int64_t KC) {
  constexpr int BS = FwdTraits<MODE>::BS;
  constexpr int AS = FwdA<MODE>::AS;
  const int64_t i0 = ic * MC, i1 = std::min(g.M, i0 + MC);
  const int64_t j0 = jc * NC, j1 = std::min(g.N, j0 + NC);
  alignas(32) float tmp[MR * FNR];
  const int32_t* ar[MR];
  const bool lazy = PACKED && g.Ap == nullptr;
  int32_t* lazy_buf = lazy ? g_scratch_lazy.get((size_t)((i1 - i0 + MR - 1) / MR * KC * AS * MR)) : nullptr;
  for (int64_t pc = 0; pc < g.K; pc += KC) {
    const int64_t kc = std::min(KC, g.K - pc);
    const bool load = pc > 0;
    if (lazy) {
      const int64_t from = g.as0 == 1 ? pack_a_colmajor_block<MODE, MR>(g.Araw + pc * g.as1, i0, i1, kc, g.as1,
                                                                         g.D, lazy_buf)
                                      : i0;
      for (int64_t ir = from; ir < i1; ir += MR)
        pack_a_strip_avx2<MODE, MR>(g.Araw + pc * g.as1, ir, g.M, kc, g.as0, g.as1, g.D,
                                    lazy_buf + (ir - i0) / MR * kc * AS * MR);
    }
    for (int64_t jr = j0; jr < j1; jr += FNR) {
      const int32_t* bstrip = g.Bp + (jr / FNR) * g.K * BS * FNR + pc * BS * FNR;
      const int64_t nr = std::min<int64_t>(FNR, j1 - jr);
      for (int64_t ir = i0; ir < i1; ir += MR) {
        const int64_t mr = std::min<int64_t>(MR, i1 - ir);
        const int32_t* astrip = nullptr;
        if (lazy) {
          astrip = lazy_buf + (ir - i0) / MR * kc * AS * MR;
        } else if (PACKED) {
          astrip = g.Ap + (ir / MR) * g.K * AS * MR + pc * AS * MR;
        } else {
          for (int r = 0; r < MR; ++r) ar[r] = g.A0 + std::min(ir + r, g.M - 1) * g.lda + pc;
        }
        float* cp = g.C + ir * g.N + jr;
        if (mr == MR && nr == FNR) {
          fwd_ukernel<MODE, MR, FNV, PACKED>(kc, ar, astrip, bstrip, cp, g.N, load, g.lo);
        } else {
          if (load)
            for (int64_t r = 0; r < mr; ++r)
              for (int64_t c = 0; c < nr; ++c) tmp[r * FNR + c] = cp[r * g.N + c];
          if (nr <= 8)
            fwd_ukernel<MODE, MR, 1, PACKED>(kc, ar, astrip, bstrip, tmp, FNR, load, g.lo);
          else
            fwd_ukernel<MODE, MR, FNV, PACKED>(kc, ar, astrip, bstrip, tmp, FNR, load, g.lo);
          for (int64_t r = 0; r < mr; ++r)
            for (int64_t c = 0; c < nr; ++c) cp[r * g.N + c] = tmp[r * FNR + c];
        }
      }
    }
  }
}

template <int MODE, int MR, bool PACKED = FwdA<MODE>::PACKED>
void fwd_run(const FwdArgs& g) {
#ifndef PAM_KC1
#define PAM_KC1 256
#endif
#ifndef PAM_KC2
#define PAM_KC2 256
#endif
#ifndef PAM_MCS
#define PAM_MCS 16
#endif
  // reduction block: the B micro-panel (KC x 16 x BS planes) should stay in L1
  const int64_t KC = FwdTraits<MODE>::BS == 1 ? PAM_KC1 : PAM_KC2;
  const int64_t MC = MR * PAM_MCS, NC = FNR * 8;
  const int64_t nI = (g.M + MC - 1) / MC, nJ = (g.N + NC - 1) / NC;
  const int64_t units = nI * nJ;
  const int nt = (int)std::min<int64_t>(num_threads(), units);
  if (nt <= 1) {  // no team (a nested one for each small matrix of a batched product)
    FtzGuard guard;
    for (int64_t u = 0; u < units; ++u) fwd_macro<MODE, MR, PACKED>(g, u % nI, u / nI, MC, NC, KC);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    FtzGuard guard;
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) fwd_macro<MODE, MR, PACKED>(g, u % nI, u / nI, MC, NC, KC);
  }
}

// in registers: r[t] lane l <- r[l] lane t
__attribute__((target("avx2,fma"), always_inline)) inline void transpose8(__m256 r[8]) {
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
    t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
  }
  for (int i = 0; i < 8; ++i) r[i] = t[i];
}

// out (8 rows of ldo) = the transpose of the 8x8 block at in (8 rows of ldi): bit patterns
__attribute__((target("avx2,fma"))) inline void transpose8x8(const float* in, int64_t ldi, int32_t* out,
                                                             int64_t ldo) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in + i * ldi);
  transpose8(r);
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(reinterpret_cast<float*>(out + i * ldo), r[i]);
}

// pack B (K, N) any strides -> [ceil(N/16)][K][BS][16], in AVX2-targeted functions.
// 8 columns h of a packed B row from their raw patterns u.
// GEN: a non-normal b counts as |b| = 0 (pb = -INFP), so that s stays below the clamps' HI
// and a zero a's x stays finite (its sB is 0); else pb = bits(b) - 1.0 pattern + D.
// The plane m: +-1.0 (GEN: b's sign) or 1.0 for a normal b, otherwise a zero of b's sign, so
// that the zero term x * m gets the sign of PA's zero product (x has a's sign there).
template <bool GEN, int BS>
__attribute__((target("avx2,fma"))) inline void pack_b_half(__m256i u, int32_t D, int32_t* ok, int h) {
  const __m256i ABS = _mm256_set1_epi32(0x7FFFFFFF), ONE = _mm256_set1_epi32(0x3F800000);
  const __m256i P = _mm256_and_si256(u, ABS);
  const __m256i norm = normal_lanes(P);
  __m256i pb, m;
  const __m256i sign = _mm256_andnot_si256(ABS, u);
  if (GEN) {
    pb = _mm256_sub_epi32(_mm256_and_si256(norm, P), _mm256_set1_epi32((int)INFP));
    m = _mm256_or_si256(_mm256_and_si256(norm, ONE), sign);
  } else {
    pb = _mm256_and_si256(norm, _mm256_add_epi32(u, _mm256_set1_epi32(D - (int32_t)BIAS)));
    m = _mm256_or_si256(_mm256_and_si256(norm, ONE), _mm256_andnot_si256(norm, sign));
  }
  _mm256_storeu_si256((__m256i*)(ok + 8 * h), pb);
  if (BS == 2) _mm256_storeu_si256((__m256i*)(ok + FNR + 8 * h), m);
}

// one packed row of a B strip from its 16 raw patterns v (zero patterns past the matrix)
template <bool GEN, int BS>
__attribute__((target("avx2,fma"))) inline void pack_b_row(const uint32_t* v, int32_t D, int32_t* ok) {
  for (int h = 0; h < FNR / 8; ++h) pack_b_half<GEN, BS>(_mm256_loadu_si256((const __m256i*)(v + 8 * h)), D, ok, h);
}

template <bool GEN, int BS>
__attribute__((target("avx2,fma"))) inline void pack_b_strip_body(const float* B, int64_t K, int64_t j0,
                                                              int64_t nr, int64_t s0, int64_t s1,
                                                              int32_t D, int32_t* o) {
  uint32_t v[FNR];
  if (s0 == 1 && s1 != 1) {
    // column-major B (a transposed view, like attention's k^T): read each column's run of
    // contiguous values into a block, instead of 16 far-apart values per row (whose lines
    // can all fall into one cache set)
    if (nr < FNR && s1 <= (int64_t(1) << 26)) {
      // a last strip of nr < 16 columns: each row gathered into registers (+0 past the
      // matrix); written to a buffer column by column and read back as rows, its values
      // would stall on store forwarding
      const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)s1));
      const __m256i lanes0 = first_lanes(nr), lanes1 = first_lanes(nr - 8);
      const __m256i z = _mm256_setzero_si256();
      for (int64_t k = 0; k < K; ++k) {
        const int* base = reinterpret_cast<const int*>(B + j0 * s1 + k);
        pack_b_half<GEN, BS>(_mm256_mask_i32gather_epi32(z, base, idx, lanes0, 4), D, o + k * BS * FNR, 0);
        const __m256i hi = nr > 8 ? _mm256_mask_i32gather_epi32(z, base + 8 * s1, idx, lanes1, 4) : z;
        pack_b_half<GEN, BS>(hi, D, o + k * BS * FNR, 1);
      }
      return;
    }
    constexpr int64_t KB = 64;
    uint32_t blk[KB * FNR];
    for (int64_t k0 = 0; k0 < K; k0 += KB) {
      const int64_t kb = std::min<int64_t>(KB, K - k0);
      const int64_t kv = nr == FNR ? kb / 8 * 8 : 0;  // a full strip: 8x8 transposes
      for (int64_t k = 0; k < kv; k += 8)
        for (int c = 0; c < FNR; c += 8)
          transpose8x8(B + (j0 + c) * s1 + k0 + k, s1, reinterpret_cast<int32_t*>(blk) + k * FNR + c, FNR);
      for (int c = 0; c < FNR; ++c) {
        const float* col = B + (j0 + c) * s1 + k0;
        if (c < nr)
          for (int64_t k = kv; k < kb; ++k) blk[k * FNR + c] = fbits(col[k]);
        else
          for (int64_t k = kv; k < kb; ++k) blk[k * FNR + c] = 0u;
      }
      for (int64_t k = 0; k < kb; ++k) pack_b_row<GEN, BS>(blk + k * FNR, D, o + (k0 + k) * BS * FNR);
    }
    return;
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* brow = B + k * s0 + j0 * s1;
    if (nr == FNR && s1 == 1) {
      pack_b_row<GEN, BS>(reinterpret_cast<const uint32_t*>(brow), D, o + k * BS * FNR);
      continue;
    }
    if (s1 == 1) {  // a last strip of nr < 16 columns: masked loads, +0 past the matrix
      for (int h = 0; h < FNR / 8; ++h)
        _mm256_storeu_si256((__m256i*)(v + 8 * h), _mm256_maskload_epi32(reinterpret_cast<const int*>(brow) + 8 * h,
                                                                          first_lanes(nr - 8 * h)));
      pack_b_row<GEN, BS>(v, D, o + k * BS * FNR);
      continue;
    }
    // strided, or a last strip padded with +0 (which packs like a missing column)
    for (int c = 0; c < FNR; ++c) v[c] = c < nr ? fbits(brow[c * s1]) : 0u;
    pack_b_row<GEN, BS>(v, D, o + k * BS * FNR);
  }
}

template <bool GEN, int BS>
__attribute__((target("avx2,fma"))) void pack_b_strip_avx2(const float* B, int64_t K, int64_t j0,
                                                            int64_t nr, int64_t s0, int64_t s1,
                                                            int32_t D, int32_t* o) {
  pack_b_strip_body<GEN, BS>(B, K, j0, nr, s0, s1, D, o);
}

void pack_b_fwd(const float* B, int64_t K, int64_t N, int64_t s0, int64_t s1, int BS, bool general,
                int32_t D, int32_t* out) {
  const int64_t ns = (N + FNR - 1) / FNR;
  parallel_for(num_threads(), ns, [&](int64_t st) {
    int32_t* o = out + st * K * BS * FNR;
    const int64_t j0 = st * FNR, nr = std::min<int64_t>(FNR, N - j0);
    if (general)
      pack_b_strip_avx2<true, 2>(B, K, j0, nr, s0, s1, D, o);
    else if (BS == 2)
      pack_b_strip_avx2<false, 2>(B, K, j0, nr, s0, s1, D, o);
    else
      pack_b_strip_avx2<false, 1>(B, K, j0, nr, s0, s1, D, o);
  });
}

// one k of a strip from a column-major A: its MR adjacent values at v, packed into the AS
// planes at ok (F0/FB: the raw patterns)
template <int MODE, int MR>
__attribute__((target("avx2,fma"))) inline void pack_a_colmajor_k(const int* v, __m256i lanes, int32_t D,
                                                                 int32_t* ok) {
  constexpr int AS = FwdA<MODE>::AS;
  const __m256i ABS = _mm256_set1_epi32(0x7FFFFFFF);
  alignas(32) int32_t t[AS][8];
  const __m256i u = _mm256_maskload_epi32(v, lanes);
  if (MODE == F0 || MODE == FB) {   // the raw patterns
    _mm256_store_si256((__m256i*)t[0], u);
  } else {
    const __m256i P = _mm256_and_si256(u, ABS);
    const __m256i norm = normal_lanes(P);
    const __m256i sign = _mm256_andnot_si256(ABS, u);
    if (MODE == FA) {
      _mm256_store_si256((__m256i*)t[0], _mm256_blendv_epi8(_mm256_set1_epi32((int32_t)BIAS - D), u, norm));
      _mm256_store_si256((__m256i*)t[1], _mm256_blendv_epi8(sign, _mm256_set1_epi32(0x3F800000), norm));
    } else if (MODE == FAB) {
      _mm256_store_si256((__m256i*)t[0], _mm256_blendv_epi8(_mm256_add_epi32(sign, _mm256_set1_epi32((int32_t)BIAS - D)), u, norm));
      _mm256_store_si256((__m256i*)t[1], _mm256_or_si256(norm, _mm256_set1_epi32((int32_t)0x80000000u)));
    } else {  // FG
      _mm256_store_si256((__m256i*)t[0], _mm256_and_si256(norm, P));
      _mm256_store_si256((__m256i*)t[1], _mm256_blendv_epi8(_mm256_set1_epi32(-0x40000000 - D),
                                                           _mm256_set1_epi32(0x3F800000 - D), norm));
      _mm256_store_si256((__m256i*)t[2], _mm256_or_si256(_mm256_set1_epi32(0x40000000 + D),
                                                         _mm256_andnot_si256(ABS, u)));
    }
  }
  for (int p = 0; p < AS; ++p) std::memcpy(ok + p * MR, t[p], MR * sizeof(int32_t));
}

// the full strips of rows [i0, i1) of a column-major A (s0 == 1) for K values of k, into
// strips of K * AS * MR each: k outer, so that each k's rows are read as one run of adjacent
// values (a strip at a time would read each cache line of A for a few values and come back
// to it for the next strip), with the lines PF values of k ahead prefetched (the runs are
// s1 apart, too far for the hardware prefetcher to follow); returns the first row not packed
template <int MODE, int MR>
__attribute__((target("avx2,fma"))) int64_t pack_a_colmajor_block(const float* A, int64_t i0, int64_t i1,
                                                                 int64_t K, int64_t s1, int32_t D, int32_t* o) {
  constexpr int AS = FwdA<MODE>::AS;
  constexpr int64_t PF = 4;
  const int64_t ns = (i1 - i0) / MR;
  const __m256i lanes = first_lanes(MR);
  const int* base = reinterpret_cast<const int*>(A + i0);
  for (int64_t k = 0; k < K; ++k) {
    if (k + PF < K)
      for (int64_t r = 0; r < ns * MR; r += 16) _mm_prefetch(reinterpret_cast<const char*>(base + (k + PF) * s1 + r), _MM_HINT_T0);
    const int* col = base + k * s1;
    for (int64_t st = 0; st < ns; ++st) pack_a_colmajor_k<MODE, MR>(col + st * MR, lanes, D, o + (st * K + k) * AS * MR);
  }
  return i0 + ns * MR;
}

// A for the packed modes: strips [ceil(M/MR)][K][AS][MR] (rows past M padded as zeros)
template <int MODE, int MR>
__attribute__((target("avx2,fma"))) void pack_a_strip_avx2(const float* A, int64_t i0, int64_t M,
                                                            int64_t K, int64_t s0, int64_t s1,
                                                            int32_t D, int32_t* o) {
  constexpr int AS = FwdA<MODE>::AS;
  static_assert(MR <= 8, "a strip's rows fit one vector");
  if (s0 == 1 && i0 + MR <= M) {
    // column-major A (a transposed view, like the gradient in a weight gradient's g^T x):
    // the strip's MR values of each k are adjacent, so they are read and packed as one vector
    const __m256i lanes = first_lanes(MR);
    const int* col = reinterpret_cast<const int*>(A + i0);
    for (int64_t k = 0; k < K; ++k) pack_a_colmajor_k<MODE, MR>(col + k * s1, lanes, D, o + k * AS * MR);
    return;
  }
  const float* rows[MR];
  bool valid[MR];
  for (int r = 0; r < MR; ++r) {
    valid[r] = i0 + r < M;
    rows[r] = A + (valid[r] ? i0 + r : 0) * s0;
  }
  for (int64_t k = 0; k < K; ++k) {
    int32_t* ok = o + k * AS * MR;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      uint32_t u;
      std::memcpy(&u, rows[r] + k * s1, 4);
      u = valid[r] ? u : 0u;
      const uint32_t P = u & 0x7FFFFFFFu;
      const bool norm = (P - MINNORM) < (INFP - MINNORM);
      if (MODE == F0 || MODE == FB) {
        ok[r] = (int32_t)u;
      } else if (MODE == FA) {
        ok[r] = norm ? (int32_t)u : (int32_t)BIAS - D;
        ok[MR + r] = norm ? 0x3F800000 : (int32_t)(u & 0x80000000u);  // 1.0f / a zero of a's sign
      } else if (MODE == FAB) {
        ok[r] = norm ? (int32_t)u : (int32_t)((u & 0x80000000u) + (uint32_t)((int32_t)BIAS - D));
        ok[MR + r] = norm ? -1 : (int32_t)0x80000000u;
      } else {  // FG
        ok[r] = norm ? (int32_t)P : 0;
        ok[MR + r] = norm ? 0x3F800000 - D : -0x40000000 - D;
        ok[2 * MR + r] = (int32_t)((uint32_t)(0x40000000 + D) | (u & 0x80000000u));
      }
    }
  }
}

template <int MODE, int MR>
void pack_a_strips(const float* A, int64_t M, int64_t K, int64_t s0, int64_t s1, int32_t D,
                   int32_t* out) {
  constexpr int AS = FwdA<MODE>::AS;
  const int64_t ns = (M + MR - 1) / MR;
  parallel_for(num_threads(), ns, [&](int64_t st) {
    pack_a_strip_avx2<MODE, MR>(A, st * MR, M, K, s0, s1, D, out + st * K * AS * MR);
  });
}

// rows [i0, i1) of the contiguous copy of a column-major A (s0 == 1): 8x8 block transposes,
// so that each cache line of A is read whole instead of one value of it per row of the copy
__attribute__((target("avx2,fma"))) void copy_a_colmajor(const float* A, int64_t i0, int64_t i1,
                                                         int64_t K, int64_t s1, int32_t* out) {
  const int64_t kv = K / 8 * 8;
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) {
    for (int64_t k = 0; k < kv; k += 8) transpose8x8(A + i + k * s1, s1, out + i * K + k, K);
    for (int64_t r = i; r < i + 8; ++r)
      for (int64_t k = kv; k < K; ++k) out[r * K + k] = (int32_t)fbits(A[r + k * s1]);
  }
  for (; i < i1; ++i)
    for (int64_t k = 0; k < K; ++k) out[i * K + k] = (int32_t)fbits(A[i + k * s1]);
}

// contiguous copy of A's bits (F0/FB when A's rows are strided)
void copy_a(const float* A, int64_t M, int64_t K, int64_t s0, int64_t s1, int32_t* out) {
  const int nt = num_threads();
  if (s0 == 1) {  // a transposed operand, like the gradient in a weight gradient's g^T x
    parallel_for(nt, (M + 63) / 64, [&](int64_t b) {  // blocks of 64 rows of the copy
      copy_a_colmajor(A, b * 64, std::min(M, b * 64 + 64), K, s1, out);
    });
    return;
  }
  parallel_for(nt, M, [&](int64_t i) {
    for (int64_t k = 0; k < K; ++k) out[i * K + k] = (int32_t)fbits(A[i * s0 + k * s1]);
  });
}

// ================================================================ FZ: zeros of A skipped
// A term with a zero a (or a subnormal or special one, whose terms are deferred) is a signed
// zero, and adding a zero to a running sum that starts at +0 does not change it as long as the
// sum is not -0 (x + (+-0) is x then). Under round to nearest a sum is -0 only when both addends
// are, or when FTZ flushes a negative subnormal sum; with every product >= 2^-103 in magnitude
// no partial sum can be subnormal (pam_mm_into's `skip`). So with zeros in A (B without zeros,
// F0's range conditions and `skip`) each row of A is packed
// per reduction block as the list of its normal entries (k, pattern), and the row's sums run over
// that list in k order: F0's integer add and float add per term, with no 0/1 mask multiplied in
// as in FA (an FMA, which shares its pipes with the integer add) and no term for a zero at all
// (dropout's and ReLU's zeros, padded tokens of a gradient). One row at a time, against up to
// FZ_NS strips of 16 columns of B whose reduction block stays in L1.
constexpr int FZ = 5, FZT = 6;
constexpr int FZ_NS = 4;
constexpr int64_t FZ_KC = 64;              // 4 strips x 64 k x 64 B = 16 KiB of packed B
constexpr int64_t FZ_CAP = FZ_KC + 8;      // a list's room: the last compacting store writes 8 lanes
constexpr int64_t FZ_MC = 64;              // rows per work unit

// kCompact[m]: the lanes set in the 8-bit mask m, in order, first (a left-packing permutation)
struct CompactTable {
  alignas(32) int32_t idx[256][8];
  CompactTable() {
    for (int m = 0; m < 256; ++m) {
      int n = 0;
      for (int l = 0; l < 8; ++l)
        if (m >> l & 1) idx[m][n++] = l;
      for (; n < 8; ++n) idx[m][n] = 0;
    }
  }
};
const CompactTable kCompact;

struct FzArgs {
  int64_t M, N, K, nb;  // nb reduction blocks of FZ_KC
  const int32_t* ko;    // [nb][M][FZ_CAP]: k * 16, the entry's row in a packed B strip
  const int32_t* pa;    // [nb][M][FZ_CAP]: a's pattern
  const int32_t* cnt;   // [nb][M]: list lengths
  const int32_t* Bp;    // [ceil(N/16)][K][16], F0's packing
  float* C;             // (M, N) contiguous
};

// row i of a contiguous copy of A's patterns (K of them) -> its lists, one per reduction block
__attribute__((target("avx2,fma"))) void fz_pack_row(const int32_t* row, int64_t i, int64_t M, int64_t K,
                                                     int32_t* ko, int32_t* pa, int32_t* cnt) {
  const __m256i ABS = _mm256_set1_epi32(0x7FFFFFFF);
  for (int64_t b = 0, pc = 0; pc < K; ++b, pc += FZ_KC) {
    const int64_t kc = std::min(FZ_KC, K - pc);
    int32_t* ok = ko + (b * M + i) * FZ_CAP;
    int32_t* op = pa + (b * M + i) * FZ_CAP;
    __m256i kv = _mm256_slli_epi32(_mm256_add_epi32(_mm256_set1_epi32((int)pc), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), 4);
    int64_t n = 0;
    for (int64_t k = 0; k < kc; k += 8) {
      const __m256i u = _mm256_maskload_epi32(row + pc + k, first_lanes(kc - k));  // 0 past the block
      const int m = _mm256_movemask_ps(_mm256_castsi256_ps(normal_lanes(_mm256_and_si256(u, ABS))));
      const __m256i perm = _mm256_load_si256((const __m256i*)kCompact.idx[m]);
      _mm256_storeu_si256((__m256i*)(op + n), _mm256_permutevar8x32_epi32(u, perm));
      _mm256_storeu_si256((__m256i*)(ok + n), _mm256_permutevar8x32_epi32(kv, perm));
      n += __builtin_popcount((unsigned)m);
      kv = _mm256_add_epi32(kv, _mm256_set1_epi32(8 * 16));
    }
    cnt[b * M + i] = (int32_t)n;
  }
}

// one row's sums over NS strips (16 NS columns at c) for the n entries of its list
template <int NS>
__attribute__((target("avx2,fma"))) inline void fz_row(const int32_t* __restrict ko, const int32_t* __restrict pa,
                                                       int64_t n, const int32_t* b0, int64_t sk, float* c,
                                                       bool load) {
  __m256 acc[NS][2];
  const int32_t* bs[NS];
#pragma GCC unroll 4
  for (int s = 0; s < NS; ++s) {
    bs[s] = b0 + s * sk;
    acc[s][0] = load ? _mm256_loadu_ps(c + 16 * s) : _mm256_setzero_ps();
    acc[s][1] = load ? _mm256_loadu_ps(c + 16 * s + 8) : _mm256_setzero_ps();
  }
  for (int64_t t = 0; t < n; ++t) {
    const __m256i x = bcast32(pa + t);
    const int64_t o = ko[t];
#pragma GCC unroll 4
    for (int s = 0; s < NS; ++s) {
      acc[s][0] = _mm256_add_ps(acc[s][0], _mm256_castsi256_ps(_mm256_add_epi32(x, _mm256_loadu_si256((const __m256i*)(bs[s] + o)))));
      acc[s][1] = _mm256_add_ps(acc[s][1], _mm256_castsi256_ps(_mm256_add_epi32(x, _mm256_loadu_si256((const __m256i*)(bs[s] + o + 8)))));
    }
  }
#pragma GCC unroll 4
  for (int s = 0; s < NS; ++s) {
    _mm256_storeu_ps(c + 16 * s, acc[s][0]);
    _mm256_storeu_ps(c + 16 * s + 8, acc[s][1]);
  }
}

// rows [i0, i1) against the strip group grp (FZ_NS strips from grp * FZ_NS), every block
__attribute__((target("avx2,fma"))) void fz_unit(const FzArgs& g, int64_t i0, int64_t i1, int64_t grp) {
  const int64_t nstrips = (g.N + FNR - 1) / FNR;
  const int64_t st0 = grp * FZ_NS, ns = std::min<int64_t>(FZ_NS, nstrips - st0);
  const int64_t j0 = st0 * FNR, nc = std::min<int64_t>(g.N - j0, ns * FNR);
  const bool direct = nc == ns * FNR;  // no partial strip: the sums go straight to C
  const int32_t* b0 = g.Bp + st0 * g.K * FNR;
  const int64_t sk = g.K * FNR;
  alignas(32) float tmp[FZ_NS * FNR];
  for (int64_t b = 0; b < g.nb; ++b) {
    const bool load = b > 0;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t l = b * g.M + i;
      const int32_t* ko = g.ko + l * FZ_CAP;
      const int32_t* pa = g.pa + l * FZ_CAP;
      const int64_t n = g.cnt[l];
      float* c = g.C + i * g.N + j0;
      float* dst = direct ? c : tmp;
      if (!direct && load) std::memcpy(tmp, c, nc * sizeof(float));
      switch (ns) {
        case 1: fz_row<1>(ko, pa, n, b0, sk, dst, load); break;
        case 2: fz_row<2>(ko, pa, n, b0, sk, dst, load); break;
        case 3: fz_row<3>(ko, pa, n, b0, sk, dst, load); break;
        default: fz_row<4>(ko, pa, n, b0, sk, dst, load); break;
      }
      if (!direct) std::memcpy(c, tmp, nc * sizeof(float));
    }
  }
}

void fz_run(const FzArgs& g) {
  const int64_t nI = (g.M + FZ_MC - 1) / FZ_MC;
  const int64_t nG = ((g.N + FNR - 1) / FNR + FZ_NS - 1) / FZ_NS;
  const int64_t units = nI * nG;
  const int nt = (int)std::min<int64_t>(num_threads(), units);
  auto unit = [&](int64_t u) {
    const int64_t ic = u % nI;
    fz_unit(g, ic * FZ_MC, std::min(g.M, ic * FZ_MC + FZ_MC), u / nI);
  };
  if (nt <= 1) {
    FtzGuard guard;
    for (int64_t u = 0; u < units; ++u) unit(u);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    FtzGuard guard;
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) unit(u);
  }
}

#ifndef PAM_MR_FB
#define PAM_MR_FB 5
#endif
#ifndef PAM_MR_FA
#define PAM_MR_FA 5
#endif
#ifndef PAM_MR_FAB
#define PAM_MR_FAB 4
#endif
#ifndef PAM_MR_FG
#define PAM_MR_FG 3
#endif
// rows per forward micro-tile (accumulators + operands within the 16 ymm registers)
constexpr int mr_of(int mode) {
  return mode == F0 ? 6 : mode == FB ? PAM_MR_FB : mode == FA ? PAM_MR_FA : mode == FAB ? PAM_MR_FAB : PAM_MR_FG;
}

// ================================================================ AVX2 exact-grad kernels
// out[r, c] = sum_t X[r,t] * w,  w = bits((Mo[r,c] + Q[t,c]) & 0xFF800000)
//   = sign(q) * 2^(E_q + c) with c the mantissa carry (Q holds the raw pattern of the
//   operand plus the offset's D, or 0 where it is zero/subnormal/special; Mo the other
//   operand's mantissa).
// EF: fused multiply-add (only when no term can overflow/underflow); EM: mul then add.
constexpr int GNV = 2, GNR = 16;

#ifndef PAM_EG_MR
#define PAM_EG_MR 5
#endif
#ifndef PAM_EG_MREG
#define PAM_EG_MREG 0
#endif
constexpr int EG_MR = PAM_EG_MR;       // rows per micro-tile
constexpr bool EG_MREG = PAM_EG_MREG;  // keep the mantissa tile in registers

template <bool FUSED, int MR>
__attribute__((target("avx2,fma"))) inline void eg_ukernel(int64_t T, const float* const* xr,
                                                           const int32_t* __restrict Qp,
                                                           const int32_t* Mo, int64_t ldm,
                                                           float* tmp) {
  __m256 acc[MR][GNV];
  __m256i mo[EG_MREG ? MR : 1][GNV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < GNV; ++v) {
      acc[r][v] = _mm256_setzero_ps();
      if (EG_MREG) mo[EG_MREG ? r : 0][v] = _mm256_loadu_si256((const __m256i*)(Mo + r * ldm + v * 8));
    }
  const float* xp[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) xp[r] = xr[r];
  const __m256i MASK = _mm256_set1_epi32((int32_t)0xFF800000u);
  for (int64_t t = 0; t < T; ++t) {
    __m256i q[GNV];
#pragma GCC unroll 4
    for (int v = 0; v < GNV; ++v) q[v] = _mm256_loadu_si256((const __m256i*)(Qp + v * 8));
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m256 xb = _mm256_broadcast_ss(xp[r] + t);
#pragma GCC unroll 4
      for (int v = 0; v < GNV; ++v) {
        const __m256i m = EG_MREG ? mo[EG_MREG ? r : 0][v]
                                  : _mm256_loadu_si256((const __m256i*)(Mo + r * ldm + v * 8));
        const __m256 w = _mm256_castsi256_ps(_mm256_and_si256(_mm256_add_epi32(m, q[v]), MASK));
        if (FUSED)
          acc[r][v] = _mm256_fmadd_ps(xb, w, acc[r][v]);
        else
          acc[r][v] = _mm256_add_ps(acc[r][v], _mm256_mul_ps(xb, w));
      }
    }
    Qp += GNR;
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < GNV; ++v) _mm256_storeu_ps(tmp + r * GNR + v * 8, acc[r][v]);
}

struct EgArgs {
  int64_t R, Cc, T;
  const float* X;  // (R, T) contiguous rows, ldx
  int64_t ldx;
  const int32_t* Qp;  // [ceil(Cc/16)][T][16]
  const int32_t* Mo;  // (Rpad, Cpad) row-major, ldm = Cpad
  int64_t ldm;
  float* O;
  int64_t os0, os1;
};

template <bool FUSED, int MR>
__attribute__((target("avx2,fma"))) void eg_macro(const EgArgs& g, int64_t ic, int64_t jc,
                                                  int64_t MC, int64_t NC) {
  const int64_t i0 = ic * MC, i1 = std::min(g.R, i0 + MC);
  const int64_t j0 = jc * NC, j1 = std::min(g.Cc, j0 + NC);
  alignas(32) float tmp[MR * GNR];
  const float* xr[MR];
  for (int64_t jr = j0; jr < j1; jr += GNR) {
    const int32_t* qstrip = g.Qp + (jr / GNR) * g.T * GNR;
    const int64_t nr = std::min<int64_t>(GNR, j1 - jr);
    for (int64_t ir = i0; ir < i1; ir += MR) {
      const int64_t mr = std::min<int64_t>(MR, i1 - ir);
      for (int r = 0; r < MR; ++r) xr[r] = g.X + std::min(ir + r, g.R - 1) * g.ldx;
      eg_ukernel<FUSED, MR>(g.T, xr, qstrip, g.Mo + ir * g.ldm + jr, g.ldm, tmp);
      if (g.os1 == 1 && nr == GNR) {
        for (int64_t r = 0; r < mr; ++r)
          std::memcpy(g.O + (ir + r) * g.os0 + jr, tmp + r * GNR, GNR * 4);
      } else {
        for (int64_t r = 0; r < mr; ++r)
          for (int64_t c = 0; c < nr; ++c) g.O[(ir + r) * g.os0 + (jr + c) * g.os1] = tmp[r * GNR + c];
      }
    }
  }
}

template <bool FUSED, int MR>
void eg_run(const EgArgs& g) {
  const int64_t MC = MR * 16, NC = GNR * 8;
  const int64_t nI = (g.R + MC - 1) / MC, nJ = (g.Cc + NC - 1) / NC;
  const int64_t units = nI * nJ;
  const int nt = (int)std::min<int64_t>(num_threads(), units);
  if (nt <= 1) {  // no team (a nested one for each small matrix of a batched product)
    FtzGuard guard;
    for (int64_t u = 0; u < units; ++u) eg_macro<FUSED, MR>(g, u % nI, u / nI, MC, NC);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    FtzGuard guard;
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) eg_macro<FUSED, MR>(g, u % nI, u / nI, MC, NC);
  }
}
#endif  // PAM_X86

#if PAM_X86
#define PAM_AVX2_FN __attribute__((target("avx2,fma")))
#else
#define PAM_AVX2_FN
#endif

// Q strips: Qp[strip][t][c] = q(Q[t, strip*16 + c]), q = raw pattern + D if normal, else 0
// (adding the mantissa of the other operand and masking to sign and exponent then gives
// sign(q) 2^(E_q + E_alpha + carry); the caller has checked that exponent is normal).
// (only used by the vector path, hence compiled for AVX2)
PAM_AVX2_FN void pack_q_strip(const float* Q, int64_t T, int64_t c0, int64_t nr, int64_t s0,
                              int64_t s1, int32_t D, int32_t* o) {
  if (s1 == 1 && s0 != 1) {  // rows of Q contiguous: read 16 consecutive values per t
    for (int64_t t = 0; t < T; ++t) {
      const float* src = Q + t * s0 + c0;
      int32_t q[16];
      if (nr == 16) {
        for (int c = 0; c < 16; ++c) {
          uint32_t u;
          std::memcpy(&u, src + c, 4);
          const uint32_t P = u & 0x7FFFFFFFu;
          q[c] = ((P - MINNORM) < (INFP - MINNORM)) ? (int32_t)(u + (uint32_t)D) : 0;
        }
      } else {
        for (int c = 0; c < 16; ++c) {
          const uint32_t u = c < nr ? fbits(src[c]) : 0u;
          const uint32_t P = u & 0x7FFFFFFFu;
          q[c] = ((P - MINNORM) < (INFP - MINNORM)) ? (int32_t)(u + (uint32_t)D) : 0;
        }
      }
      std::memcpy(o + t * 16, q, sizeof(q));
    }
    return;
  }
  for (int64_t c = 0; c < 16; ++c) {
    if (c >= nr) {
      for (int64_t t = 0; t < T; ++t) o[t * 16 + c] = 0;
      continue;
    }
    const float* src = Q + (c0 + c) * s1;
    for (int64_t t = 0; t < T; ++t) {
      const uint32_t u = fbits(src[t * s0]);
      const uint32_t P = u & 0x7FFFFFFFu;
      o[t * 16 + c] = ((P - MINNORM) < (INFP - MINNORM)) ? (int32_t)(u + (uint32_t)D) : 0;
    }
  }
}

void pack_q(const float* Q, int64_t T, int64_t Cc, int64_t s0, int64_t s1, int32_t D, int32_t* out) {
  const int64_t ns = (Cc + 15) / 16;
  parallel_for(num_threads(), ns, [&](int64_t st) {
    pack_q_strip(Q, T, st * 16, std::min<int64_t>(16, Cc - st * 16), s0, s1, D, out + st * T * 16);
  });
}

// mantissas of Mo (R, Cc) -> (Rpad, Cpad) row-major, zero padded
PAM_AVX2_FN void pack_mant_row(const float* row, int64_t Cc, int64_t s1, int64_t Cpad,
                               int32_t* o) {
  if (s1 == 1) {
    for (int64_t c = 0; c < Cc; ++c) {
      uint32_t u;
      std::memcpy(&u, row + c, 4);
      o[c] = ((u & 0x7FFFFFFFu) >= MINNORM) ? (int32_t)(u & 0x7FFFFFu) : 0;
    }
  } else {
    for (int64_t c = 0; c < Cc; ++c) o[c] = (int32_t)mant_of(fbits(row[c * s1]));
  }
  for (int64_t c = Cc; c < Cpad; ++c) o[c] = 0;
}

void pack_mant(const float* Mo, int64_t R, int64_t Cc, int64_t s0, int64_t s1, int64_t Rpad,
               int64_t Cpad, int32_t* out) {
  parallel_for(num_threads(), Rpad, [&](int64_t r) {
    int32_t* o = out + r * Cpad;
    if (r >= R) {
      for (int64_t c = 0; c < Cpad; ++c) o[c] = 0;
      return;
    }
    pack_mant_row(Mo + r * s0, Cc, s1, Cpad, o);
  });
}

void check_offset(int64_t D) {
  TORCH_CHECK(D >= -(int64_t)MINNORM && D <= (int64_t)MINNORM,
              "offset D = bits(alpha) - bits(1.0) must lie in [-2^23, 2^23] (0.5 <= alpha <= 2), got ", D);
}

void check2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

#if PAM_X86
// inf/NaN operands were packed as zeros: sum their terms per entry (exact scalar rule) and add
// them, or recompute the entry in k order where that differs (see needs_k_order).
void fix_deferred(const Mat& a, const Mat& b, Mat& c, const Stats& sa, const Stats& sb, int64_t D) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (sa.nspec + sb.nspec > 0) {
    const float* A = a.data_ptr<float>();
    const float* B = b.data_ptr<float>();
    const int64_t as0 = a.stride(0), as1 = a.stride(1), bs0 = b.stride(0), bs1 = b.stride(1);
    float* C = c.data_ptr<float>();
    std::vector<int64_t> bspec;  // (k, j) of special B entries
    if (sb.nspec > 0)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < N; ++j)
          if ((fbits(B[k * bs0 + j * bs1]) & 0x7FFFFFFFu) >= INFP) {
            bspec.push_back(k);
            bspec.push_back(j);
          }
    const int nt = num_threads();
#pragma omp parallel num_threads(nt)
    {
      FtzGuard g;
      std::vector<float> S(N);  // row i's sums of deferred terms
#pragma omp for schedule(dynamic, 16)
      for (int64_t i = 0; i < M; ++i) {
        bool any = !bspec.empty();
        std::fill(S.begin(), S.end(), 0.f);
        if (sa.nspec > 0)
          for (int64_t k = 0; k < K; ++k) {
            const uint32_t ua = fbits(A[i * as0 + k * as1]);
            if ((ua & 0x7FFFFFFFu) >= INFP) {
              any = true;
              for (int64_t j = 0; j < N; ++j) S[j] += pam_scalar(ua, fbits(B[k * bs0 + j * bs1]), D);
            }
          }
        for (size_t s = 0; s < bspec.size(); s += 2) {
          const int64_t k = bspec[s], j = bspec[s + 1];
          const uint32_t ua = fbits(A[i * as0 + k * as1]);
          if ((ua & 0x7FFFFFFFu) < INFP) S[j] += pam_scalar(ua, fbits(B[k * bs0 + j * bs1]), D);
        }
        if (!any) continue;
        for (int64_t j = 0; j < N; ++j) {
          if (S[j] == 0.f) continue;  // no deferred term: leave the entry (and its zero's sign)
          float& cij = C[i * N + j];
          cij = needs_k_order(cij, S[j]) ? fwd_entry(A + i * as0, as1, B + j * bs1, bs0, K, D) : cij + S[j];
        }
      }
    }
  }
}

// Whether FZ's row lists of R rows stay within 4 MiB (cache-sized). Larger ones cost more in
// memory traffic than FA's masks, which pack per tile and block: translate's vocabulary
// weight gradient, 8000 x 2000 (2.3 times A's 64 MB, plus a transposed copy of a column-major
// A: 2.4 -> 4.5 x torch.mm on a 2-core AMD EPYC), and the stock encoder's FFN down product,
// 1024 x 2048 x 128 with dropout's zeros (19 MB of lists: FA 1.33, FZ 1.53 x torch.mm on a
// Zen 4 EPYC, where FA's FMA costs little; vit's 1088 x 128 x 64: FA 1.59, FZ 1.37).
bool fz_fits(int64_t R, int64_t K) {
  return (K + FZ_KC - 1) / FZ_KC * R * (2 * FZ_CAP + 1) <= (int64_t(1) << 20);
}

// FZ: C = A B with the zeros of A skipped; FZT: the zeros of B skipped, on the transposed
// product C^T = B^T A^T (into a buffer, then transposed into C). The operand with zeros becomes
// the row lists, the other F0's packed B.
void fz_product(const Mat& a, const Mat& b, Mat& c, bool tr, int32_t D) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  const int64_t R = tr ? N : M, Cc = tr ? M : N;  // the product run: (R, K) x (K, Cc)
  const float* X = tr ? b.data_ptr<float>() : a.data_ptr<float>();
  const int64_t xs0 = tr ? b.stride(1) : a.stride(0), xs1 = tr ? b.stride(0) : a.stride(1);
  const float* Y = tr ? a.data_ptr<float>() : b.data_ptr<float>();
  const int64_t ys0 = tr ? a.stride(1) : b.stride(0), ys1 = tr ? a.stride(0) : b.stride(1);
  at::Tensor bhold, ahold, chold, thold;
  int32_t* bp = pack_buffer(g_scratch_b, (Cc + FNR - 1) / FNR * K * FNR, bhold);
  pack_b_fwd(Y, K, Cc, ys0, ys1, 1, false, D, bp);
  // the rows as lists of their normal entries per reduction block, from a contiguous copy of
  // their patterns where they are strided
  const int32_t* rows = reinterpret_cast<const int32_t*>(X);
  int64_t ld = xs0;
  if (xs1 != 1) {
    int32_t* cp = pack_buffer(g_scratch_c, R * K, chold);
    copy_a(X, R, K, xs0, xs1, cp);
    rows = cp;
    ld = K;
  }
  const int64_t nb = (K + FZ_KC - 1) / FZ_KC;
  int32_t* lists = pack_buffer(g_scratch_a, nb * R * (2 * FZ_CAP + 1), ahold);
  int32_t* ko = lists;
  int32_t* pa = lists + nb * R * FZ_CAP;
  int32_t* cnt = lists + 2 * nb * R * FZ_CAP;
  parallel_for(num_threads(), R, [&](int64_t i) { fz_pack_row(rows + i * ld, i, R, K, ko, pa, cnt); });
  if (!tr) {
    fz_run(FzArgs{R, Cc, K, nb, ko, pa, cnt, bp, c.data_ptr<float>()});
    return;
  }
  // C^T into a buffer (the row copy's, free again), then its transpose into C
  float* ct = reinterpret_cast<float*>(pack_buffer(g_scratch_c, R * Cc, thold));
  fz_run(FzArgs{R, Cc, K, nb, ko, pa, cnt, bp, ct});
  copy_a(ct, M, N, 1, M, reinterpret_cast<int32_t*>(c.data_ptr<float>()));
}
#endif  // PAM_X86

// ---------------------------------------------------------------- forward entry
// C = sum_k PAM(A[i,k], B[k,j]) into c, a contiguous (M, N) float32 tensor (checked by the
// callers); every element is written.
void pam_mm_into(const Mat& a, const Mat& b, Mat c, int64_t path, int64_t D) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    c.zero_();
    return;
  }
  ThreadCap cap(M * N * K);
  const bool vec = cpu_has_avx2_fma() && path != 0;
  if (!vec) {
    g_last_mode = 100;
    fwd_scalar(a, b, c, D);
    return;
  }
#if PAM_X86
  const Stats sa = stats2d(a), sb = stats2d(b);
  // no normal value in an operand: every product is a zero, so both conditions hold
  const ProductRange pr = sa.nnorm > 0 && sb.nnorm > 0 ? product_range(sa.minP, sa.maxP, sb.minP, sb.maxP, D)
                                                       : ProductRange{true, true};
  const bool p1 = pr.fast, skip = pr.skip;
  const bool za = sa.nzero + sa.nspec > 0, zb = sb.nzero + sb.nspec > 0;
  int mode;
  if (!p1 || path == 1)
    mode = FG;
  else if (za && zb)
    mode = FAB;
  else if (za)
    mode = path == 2 || !skip || !fz_fits(M, K) ? FA : FZ;  // path 2: the masked modes (tests)
  else if (zb)
    mode = path == 2 || !skip || !fz_fits(N, K) ? FB : FZT;
  else
    mode = F0;
  g_last_mode = mode;

  const int32_t D32 = (int32_t)D;
  if (mode == FZ || mode == FZT) {
    fz_product(a, b, c, mode == FZT, D32);
    fix_deferred(a, b, c, sa, sb, D);
    return;
  }
  const int BS = (mode == F0 || mode == FA) ? 1 : 2;
  const int64_t ns = (N + FNR - 1) / FNR;
  at::Tensor bhold, ahold;
  int32_t* bp = pack_buffer(g_scratch_b, ns * K * BS * FNR, bhold);
  pack_b_fwd(b.data_ptr<float>(), K, N, b.stride(0), b.stride(1), BS, mode == FG, D32, bp);
  FwdArgs g{M, N, K, nullptr, 0, nullptr, bp, c.data_ptr<float>(), -0x40000000 - D32};
  bool strips = false;   // F0/FB reading strips of A packed per macro tile
  if (mode == F0 || mode == FB) {
    if (a.stride(1) == 1) {
      g.A0 = reinterpret_cast<const int32_t*>(a.data_ptr<float>());
      g.lda = a.stride(0);
    } else if (a.stride(0) == 1 && N <= FNR * 8 && M * K > (int64_t(1) << 20)) {
      // a large column-major A (a weight gradient's g^T x) and one column of macro tiles:
      // each tile packs its rows per reduction block (MR adjacent values per k, a
      // cache-resident strip) instead of a transposed copy of all of A, which costs as much
      // as the product (translate's vocabulary dW, 8000 x 2000 x 64, one thread: 2.6 x
      // torch.mm -> 1.8 x); a small A (vit's 128 x 1088) is faster copied, as it fits in L2
      strips = true;
      g.Araw = a.data_ptr<float>();
      g.as0 = a.stride(0);
      g.as1 = a.stride(1);
      g.D = D32;
    } else {
      int32_t* ap = pack_buffer(g_scratch_a, M * K, ahold);
      copy_a(a.data_ptr<float>(), M, K, a.stride(0), a.stride(1), ap);
      g.A0 = ap;
      g.lda = K;
    }
  } else {
    const int MR = mr_of(mode), AS = mode == FG ? 3 : 2;
    const float* A = a.data_ptr<float>();
    // one column of macro tiles (N <= 128) and a large A: every tile packs its own rows per
    // reduction block (fwd_macro), instead of packing all of A up front
    if (N <= FNR * 8 && M * K * AS > (int64_t(1) << 20)) {
      g.Araw = A;
      g.as0 = a.stride(0);
      g.as1 = a.stride(1);
      g.D = D32;
    } else {
      int32_t* P = pack_buffer(g_scratch_a, (M + MR - 1) / MR * MR * K * AS, ahold);
      if (mode == FA)
        pack_a_strips<FA, mr_of(FA)>(A, M, K, a.stride(0), a.stride(1), D32, P);
      else if (mode == FAB)
        pack_a_strips<FAB, mr_of(FAB)>(A, M, K, a.stride(0), a.stride(1), D32, P);
      else
        pack_a_strips<FG, mr_of(FG)>(A, M, K, a.stride(0), a.stride(1), D32, P);
      g.Ap = P;
    }
  }
  switch (mode) {
    case F0: strips ? fwd_run<F0, mr_of(F0), true>(g) : fwd_run<F0, mr_of(F0)>(g); break;
    case FB: strips ? fwd_run<FB, mr_of(FB), true>(g) : fwd_run<FB, mr_of(FB)>(g); break;
    case FA: fwd_run<FA, mr_of(FA)>(g); break;
    case FAB: fwd_run<FAB, mr_of(FAB)>(g); break;
    default: fwd_run<FG, mr_of(FG)>(g); break;
  }
  fix_deferred(a, b, c, sa, sb, D);
#endif
}

at::Tensor pam_mm(at::Tensor a, at::Tensor b, int64_t path, int64_t D) {
  check2d(a, "a");
  check2d(b, "b");
  TORCH_CHECK(a.size(1) == b.size(0), "pam_mm: shapes ", a.sizes(), " and ", b.sizes(),
              " cannot be multiplied");
  check_offset(D);
  at::Tensor c = at::empty({a.size(0), b.size(1)}, a.options());
  pam_mm_into(a, b, c, path, D);
  return c;
}

// ---------------------------------------------------------------- exact-gradient entry
// which = 0: dA = grad_a(a, b, dc) (M, K);  which = 1: dB = grad_b (K, N)
// out: a contiguous (M, K) (which = 0) or (K, N) float32 tensor; every element is written.
void pam_exact_grad_into(const at::Tensor& a, const at::Tensor& b, const at::Tensor& dc, int64_t which,
                         int64_t path, int64_t D, Mat out) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  ThreadCap cap(M * N * K);
  // Generic form: out[R, Cc] = sum_t eterm(X[r,t], Q[t,c], mant(Mo[r,c])), see egrad_scalar.
  at::Tensor X, Q, Mo;
  int64_t R, Cc, T;
  if (which == 0) {
    R = M; Cc = K; T = N;
    X = dc; Q = b.t(); Mo = a;
  } else {
    R = N; Cc = K; T = M;
    X = dc.t(); Q = a; Mo = b.t();
  }
  // out element (r, c) lives at out[r*os0 + c*os1]
  const int64_t os0 = which == 0 ? K : 1, os1 = which == 0 ? 1 : N;
  if (R == 0 || Cc == 0) return;
  if (T == 0) {
    out.zero_();
    return;
  }
  const bool vec = cpu_has_avx2_fma() && path != 0;
  const Stats sq = stats2d(Q), sx = stats2d(X);
  bool fused = false, ok = vec;
  if (vec) {
    // the weight is 2^(E_q + E_alpha + c), c in [0, cmax]: it must be a normal float
    const int ea = (int)(D >> 23), cmax = (D & 0x7FFFFF) ? 2 : 1;
    const int qmax = sq.nnorm ? sq.emax() : -1000;
    if (sq.nnorm && (qmax + ea + cmax > 127 || sq.emin() + ea < -126)) ok = false;
    if (sq.ninf > 0 && sx.ninf > 0) ok = false;    // inf*inf terms: exact scalar route
    if (sq.nnorm == 0 || sx.nnorm == 0) {
      fused = true;
    } else {
      fused = sx.emax() + qmax + ea + cmax <= 127 && sx.emin() + sq.emin() + ea >= -126;
    }
    if (path == 1) fused = false;
  }
  (void)fused;
  if (!ok) {
    g_last_mode = 100;
    egrad_scalar(X.data_ptr<float>(), X.stride(0), X.stride(1), Q.data_ptr<float>(), Q.stride(0),
                 Q.stride(1), Mo.data_ptr<float>(), Mo.stride(0), Mo.stride(1),
                 out.data_ptr<float>(), os0, os1, R, Cc, T, D);
    return;
  }
#if PAM_X86
  g_last_mode = fused ? 10 : 11;
  at::Tensor Xc = X.contiguous();
  const int64_t ns = (Cc + GNR - 1) / GNR;
  const int64_t MRP = EG_MR;
  const int64_t Rpad = (R + MRP - 1) / MRP * MRP, Cpad = ns * GNR;
  at::Tensor qhold, mhold;
  int32_t* qp = pack_buffer(g_scratch_b, ns * T * GNR, qhold);
  int32_t* mp = pack_buffer(g_scratch_a, Rpad * Cpad, mhold);
  pack_q(Q.data_ptr<float>(), T, Cc, Q.stride(0), Q.stride(1), (int32_t)D, qp);
  // read the mantissa operand row-wise (grad_b's is B transposed: let torch's blocked
  // transpose do the strided part)
  at::Tensor Moc = Mo.stride(1) == 1 ? Mo : Mo.contiguous();
  pack_mant(Moc.data_ptr<float>(), R, Cc, Moc.stride(0), Moc.stride(1), Rpad, Cpad,
            mp);
  EgArgs g{R, Cc, T, Xc.data_ptr<float>(), Xc.stride(0), qp, mp, Cpad, out.data_ptr<float>(), os0, os1};
  if (fused)
    eg_run<true, EG_MR>(g);
  else
    eg_run<false, EG_MR>(g);
  if (sq.nspec > 0) {
    // special Q entries were packed as 0: sum their PAM(q, dC) terms per entry (exact scalar
    // rule) and add them, or recompute the entry in k order where that differs (needs_k_order).
    const float* Xp = X.data_ptr<float>();
    const float* Qd = Q.data_ptr<float>();
    const int64_t xs0 = X.stride(0), xs1 = X.stride(1), qs0 = Q.stride(0), qs1 = Q.stride(1);
    float* O = out.data_ptr<float>();
    std::vector<int64_t> qspec;  // (t, c)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t cc = 0; cc < Cc; ++cc)
        if ((fbits(Qd[t * qs0 + cc * qs1]) & 0x7FFFFFFFu) >= INFP) {
          qspec.push_back(t);
          qspec.push_back(cc);
        }
    const float* Mp = Mo.data_ptr<float>();
    const int64_t ms0 = Mo.stride(0), ms1 = Mo.stride(1);
    const int nt = num_threads();
#pragma omp parallel num_threads(nt)
    {
      FtzGuard g;
      std::vector<float> S(Cc);  // row r's sums of deferred terms
#pragma omp for schedule(dynamic, 16)
      for (int64_t r = 0; r < R; ++r) {
        std::fill(S.begin(), S.end(), 0.f);
        for (size_t s = 0; s < qspec.size(); s += 2) {
          const int64_t t = qspec[s], cc = qspec[s + 1];
          S[cc] += pam_scalar(fbits(Qd[t * qs0 + cc * qs1]), fbits(Xp[r * xs0 + t * xs1]), D);
        }
        for (int64_t cc = 0; cc < Cc; ++cc) {
          if (S[cc] == 0.f) continue;  // no deferred term in this column
          float& o = O[r * os0 + cc * os1];
          o = needs_k_order(o, S[cc]) ? egrad_entry(Xp + r * xs0, xs1, Qd + cc * qs1, qs0,
                                                    mant_of(fbits(Mp[r * ms0 + cc * ms1])), T, D)
                                      : o + S[cc];
        }
      }
    }
  }
#endif
}

at::Tensor pam_exact_grad(at::Tensor a, at::Tensor b, at::Tensor dc, int64_t which, int64_t path,
                          int64_t D) {
  check2d(a, "a");
  check2d(b, "b");
  check2d(dc, "dc");
  TORCH_CHECK(a.size(1) == b.size(0), "shapes ", a.sizes(), " and ", b.sizes(),
              " cannot be multiplied");
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  TORCH_CHECK(dc.size(0) == M && dc.size(1) == N, "dc must have shape (", M, ", ", N, "), got ",
              dc.sizes());
  check_offset(D);
  at::Tensor out = which == 0 ? at::empty({M, K}, a.options()) : at::empty({K, N}, a.options());
  pam_exact_grad_into(a, b, dc, which, path, D, out);
  return out;
}

at::Tensor pam_mm_exact_grad_a(at::Tensor a, at::Tensor b, at::Tensor dc, int64_t path, int64_t D) {
  return pam_exact_grad(a, b, dc, 0, path, D);
}
at::Tensor pam_mm_exact_grad_b(at::Tensor a, at::Tensor b, at::Tensor dc, int64_t path, int64_t D) {
  return pam_exact_grad(a, b, dc, 1, path, D);
}

#if PAM_X86
// ================================================================ SB: many small matrices
// A batch of small products (a transformer's attention: 17 x 16 x 17 per head on vit) runs
// with the batch in the vector lanes: 8 matrices at a time are packed as [row][col][8]
// (8x8 register transposes), and every entry C[i, j] of the 8 is one accumulator that adds
// its PAM terms in k order, F0's integer add and float add per term (the same additions as
// pam_mm_into, in the same order), with no padding of 17 columns to 32 and no per-matrix
// packing, statistics and mode choice. Each group of 8 takes its own statistics while it is
// packed and runs here only where F0's conditions hold (with zeros: FZ's, so that zero terms
// may be +0); otherwise its matrices go through pam_mm_into one by one.
constexpr int64_t SB_WORK = int64_t(1) << 15;  // M N K per matrix up to which the batch runs here
constexpr int SB = 7;                           // last_mode() of a batch run here

// Per lane: the minimum of P - MINNORM as unsigned (the smallest normal pattern, or a special;
// zeros and subnormals wrap to the top), and the minimum and maximum of P.
struct SbStats {
  __m256i mn, lo, hi;
};

__attribute__((target("avx2,fma"))) inline void sb_stats_init(SbStats& s) {
  s.mn = _mm256_set1_epi32(-1);
  s.lo = _mm256_set1_epi32(0x7FFFFFFF);
  s.hi = _mm256_setzero_si256();
}

__attribute__((target("avx2,fma"), always_inline)) inline void sb_stats_add(SbStats& s, __m256i v) {
  const __m256i P = _mm256_and_si256(v, _mm256_set1_epi32(0x7FFFFFFF));
  s.mn = _mm256_min_epu32(s.mn, _mm256_sub_epi32(P, _mm256_set1_epi32((int)MINNORM)));
  s.lo = _mm256_min_epi32(s.lo, P);
  s.hi = _mm256_max_epi32(s.hi, P);
}

struct SbSummary {
  uint32_t minP, maxP;  // over normal values (with no special: maxP is the maximum of all)
  bool non, spec;       // a zero or subnormal; an inf or NaN
};

__attribute__((target("avx2,fma"))) inline SbSummary sb_stats_done(const SbStats& s) {
  alignas(32) uint32_t mn[8], lo[8], hi[8];
  _mm256_store_si256((__m256i*)mn, s.mn);
  _mm256_store_si256((__m256i*)lo, s.lo);
  _mm256_store_si256((__m256i*)hi, s.hi);
  uint32_t m = 0xFFFFFFFFu, l = 0x7FFFFFFFu, h = 0;
  for (int i = 0; i < 8; ++i) {
    m = std::min(m, mn[i]);
    l = std::min(l, lo[i]);
    h = std::max(h, hi[i]);
  }
  SbSummary r;
  r.non = l < MINNORM;
  r.spec = h >= INFP;
  r.minP = m < INFP - MINNORM ? m + MINNORM : 0x7FFFFFFFu;  // no normal value: 0x7FFFFFFF
  r.maxP = h >= MINNORM ? h : 0;                             // no normal value: 0
  return r;
}

// dst[(o * dso + i * dsi) * 8 + l] = bits(p[l][o * so + i * si]), o < O, i < I; unit si
// (contiguous runs of 8 transposed in registers) or any (one value at a time)
__attribute__((target("avx2,fma"))) void sb_pack(const float* const p[8], int64_t O, int64_t I, int64_t so,
                                                 int64_t si, int64_t dso, int64_t dsi, int32_t* __restrict dst,
                                                 SbStats& stats) {
  SbStats st = stats;  // in registers (the stores to dst could alias a reference)
  if (si == 1) {
    for (int64_t o = 0; o < O; ++o)
      for (int64_t i0 = 0; i0 < I; i0 += 8) {
        const int64_t n = std::min<int64_t>(8, I - i0);
        if (n == 1) {  // one value: gathered, cheaper than a transpose
          const __m256i v = _mm256_castps_si256(_mm256_setr_ps(p[0][o * so + i0], p[1][o * so + i0], p[2][o * so + i0],
                                                               p[3][o * so + i0], p[4][o * so + i0], p[5][o * so + i0],
                                                               p[6][o * so + i0], p[7][o * so + i0]));
          sb_stats_add(st, v);
          _mm256_store_si256((__m256i*)(dst + (o * dso + i0 * dsi) * 8), v);
          continue;
        }
        const __m256i m = first_lanes(n);
        __m256 r[8];
        for (int l = 0; l < 8; ++l) r[l] = _mm256_maskload_ps(p[l] + o * so + i0, m);
        transpose8(r);
        for (int64_t t = 0; t < n; ++t) {
          const __m256i v = _mm256_castps_si256(r[t]);
          sb_stats_add(st, v);
          _mm256_store_si256((__m256i*)(dst + (o * dso + (i0 + t) * dsi) * 8), v);
        }
      }
  } else {
    alignas(32) int32_t tmp[8];
    for (int64_t o = 0; o < O; ++o)
      for (int64_t i = 0; i < I; ++i) {
        for (int l = 0; l < 8; ++l) tmp[l] = (int32_t)fbits(p[l][o * so + i * si]);
        const __m256i v = _mm256_load_si256((const __m256i*)tmp);
        sb_stats_add(st, v);
        _mm256_store_si256((__m256i*)(dst + (o * dso + i * dsi) * 8), v);
      }
  }
  stats = st;
}

// Pack matrix (R, C) with strides (s0, s1) of 8 lanes as [r][c][8]: the unit-stride dimension inner
__attribute__((target("avx2,fma"))) void sb_pack_mat(const float* const p[8], int64_t R, int64_t C, int64_t s0,
                                                     int64_t s1, int32_t* dst, SbStats& st) {
  if ((s1 == 1 || C == 1) && (s0 == C || R == 1))  // contiguous: one run of R C values
    sb_pack(p, 1, R * C, 0, 1, 0, 1, dst, st);
  else if (s1 == 1 || C == 1)
    sb_pack(p, R, C, s0, 1, C, 1, dst, st);
  else if (s0 == 1 || R == 1)
    sb_pack(p, C, R, s1, 1, 1, C, dst, st);
  else
    sb_pack(p, R, C, s0, s1, C, 1, dst, st);
}

// the first n values of v to p, in plain stores (a masked store costs several on AMD)
template <int n>
__attribute__((target("avx2,fma"), always_inline)) inline void sb_store(float* p, __m256 v) {
  if (n == 8) {
    _mm256_storeu_ps(p, v);
    return;
  }
  __m128 h = _mm256_castps256_ps128(v);
  int o = 0;
  if (n >= 4) {
    _mm_storeu_ps(p, h);
    h = _mm256_extractf128_ps(v, 1);
    o = 4;
  }
  if (n - o >= 2) {
    _mm_storel_pi(reinterpret_cast<__m64*>(p + o), h);
    h = _mm_movehl_ps(h, h);
    o += 2;
  }
  if (n - o == 1) _mm_store_ss(p + o, h);
}

// Row i of the 8 lanes' C, columns [j0, j0 + JB): c[l] + i N + j0 (lanes l < nl). With
// zeros, the mask planes ma (per a) and mb (per b) hold 1.0 or 0.0 and multiply the term in an
// FMA (x 1.0: the plain sum; x 0.0: a +-0 term, which leaves a sum that is never -0 unchanged).
// (Two rows per block, 4 columns each, was faster from 64 x 64 x 64 on, slower below 2^15.)
template <int JB, bool ZA, bool ZB>
__attribute__((target("avx2,fma"))) inline void sb_block(const int32_t* __restrict ap, const int32_t* __restrict ma,
                                                         const int32_t* __restrict bp, const int32_t* __restrict mb,
                                                         int64_t i, int64_t K, int64_t N, int64_t j0, int32_t off,
                                                         float* const c[8], int nl) {
  __m256 acc[8];
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  const __m256i OFF = _mm256_set1_epi32(off);
  const int32_t* ai = ap + i * K * 8;
  const int32_t* mi = ma + i * K * 8;
  for (int64_t k = 0; k < K; ++k) {
    const __m256i a = _mm256_add_epi32(_mm256_load_si256((const __m256i*)(ai + k * 8)), OFF);
    const __m256 mak = ZA ? _mm256_load_ps((const float*)(mi + k * 8)) : _mm256_setzero_ps();
    const int64_t kb = (k * N + j0) * 8;
#pragma GCC unroll 8
    for (int j = 0; j < JB; ++j) {
      const __m256 x = _mm256_castsi256_ps(_mm256_add_epi32(a, _mm256_load_si256((const __m256i*)(bp + kb + j * 8))));
      if (ZA && ZB)
        acc[j] = _mm256_fmadd_ps(x, _mm256_and_ps(mak, _mm256_load_ps((const float*)(mb + kb + j * 8))), acc[j]);
      else if (ZA)
        acc[j] = _mm256_fmadd_ps(x, mak, acc[j]);
      else if (ZB)
        acc[j] = _mm256_fmadd_ps(x, _mm256_load_ps((const float*)(mb + kb + j * 8)), acc[j]);
      else
        acc[j] = _mm256_add_ps(acc[j], x);
    }
  }
  transpose8(acc);
  for (int l = 0; l < nl; ++l) sb_store<JB>(c[l] + i * N + j0, acc[l]);
}

template <bool ZA, bool ZB>
__attribute__((target("avx2,fma"))) void sb_compute(const int32_t* ap, const int32_t* ma, const int32_t* bp,
                                                    const int32_t* mb, int64_t M, int64_t K, int64_t N,
                                                    int32_t off, float* const c[8], int nl) {
  FtzGuard guard;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j0 = 0; j0 < N;) {
      const int64_t jb = std::min<int64_t>(8, N - j0);
      switch (jb) {
        case 8: sb_block<8, ZA, ZB>(ap, ma, bp, mb, i, K, N, j0, off, c, nl); break;
        case 7: sb_block<7, ZA, ZB>(ap, ma, bp, mb, i, K, N, j0, off, c, nl); break;
        case 6: sb_block<6, ZA, ZB>(ap, ma, bp, mb, i, K, N, j0, off, c, nl); break;
        case 5: sb_block<5, ZA, ZB>(ap, ma, bp, mb, i, K, N, j0, off, c, nl); break;
        case 4: sb_block<4, ZA, ZB>(ap, ma, bp, mb, i, K, N, j0, off, c, nl); break;
        case 3: sb_block<3, ZA, ZB>(ap, ma, bp, mb, i, K, N, j0, off, c, nl); break;
        case 2: sb_block<2, ZA, ZB>(ap, ma, bp, mb, i, K, N, j0, off, c, nl); break;
        default: sb_block<1, ZA, ZB>(ap, ma, bp, mb, i, K, N, j0, off, c, nl); break;
      }
      j0 += jb;
    }
}

// the zeros of a packed operand (and its subnormals) -> fill, the operand's smallest normal
// pattern, so that every x = a + b + D - 1.0 pattern stays in [0, inf) (the lanes' range
// condition), and its mask plane: 1.0 for a normal value, 0.0 otherwise
__attribute__((target("avx2,fma"))) void sb_mask(int32_t* __restrict p, int32_t* __restrict m, int64_t n,
                                                 uint32_t fill) {
  const __m256i ABS = _mm256_set1_epi32(0x7FFFFFFF), ONE = _mm256_set1_epi32((int32_t)BIAS);
  const __m256i F = _mm256_set1_epi32((int32_t)fill);
  for (int64_t t = 0; t < n; t += 8) {
    const __m256i u = _mm256_load_si256((const __m256i*)(p + t));
    const __m256i norm = normal_lanes(_mm256_and_si256(u, ABS));
    _mm256_store_si256((__m256i*)(p + t), _mm256_blendv_epi8(F, u, norm));
    _mm256_store_si256((__m256i*)(m + t), _mm256_and_si256(norm, ONE));
  }
}

// C[i] = A[i] B[i] for the batch (nb, M, K) x (nb, K, N) into out (nb, M, N), contiguous.
// Returns the number of groups of 8 that went through pam_mm_into instead.
int64_t sb_run(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, int32_t D) {
  const int64_t nb = a.size(0), M = a.size(1), K = a.size(2), N = b.size(2);
  const int64_t ng = (nb + 7) / 8;
  const float* A = a.data_ptr<float>();
  const float* B = b.data_ptr<float>();
  float* C = out.data_ptr<float>();
  std::atomic<int64_t> fallback{0};
  auto group = [&](int64_t g) {
    const int64_t na = M * K * 8, nbk = K * N * 8;
    int32_t* ap = g_scratch_s.get((size_t)(2 * na + 2 * nbk));  // at most 4 MiB (M N K <= SB_WORK)
    int32_t* ma = ap + na;
    int32_t* bp = ma + na;
    int32_t* mb = bp + nbk;
    const int nl = (int)std::min<int64_t>(8, nb - g * 8);
    const float* pa[8];
    const float* pb[8];
    float* pc[8];
    for (int l = 0; l < 8; ++l) {
      const int64_t i = g * 8 + std::min(l, nl - 1);  // missing lanes repeat the last matrix
      pa[l] = A + i * a.stride(0);
      pb[l] = B + i * b.stride(0);
      pc[l] = C + i * M * N;
    }
    SbStats sta, stb;
    sb_stats_init(sta);
    sb_stats_init(stb);
    sb_pack_mat(pa, M, K, a.stride(1), a.stride(2), ap, sta);
    sb_pack_mat(pb, K, N, b.stride(1), b.stride(2), bp, stb);
    const SbSummary sa = sb_stats_done(sta), sb = sb_stats_done(stb);
    bool ok = !sa.spec && !sb.spec && sa.maxP > 0 && sb.maxP > 0;
    if (ok) {
      const ProductRange pr = product_range(sa.minP, sa.maxP, sb.minP, sb.maxP, D);
      ok = pr.fast && (pr.skip || !(sa.non || sb.non));
    }
    if (!ok) {
      fallback += 1;
      ThreadCap inner(0);
      for (int l = 0; l < nl; ++l) {
        const int64_t i = g * 8 + l;
        pam_mm_into(mat_of(a, i), mat_of(b, i), mat_of(out, i), -1, D);
      }
      return;
    }
    const int32_t off = D - (int32_t)BIAS;
    if (sa.non) sb_mask(ap, ma, na, sa.minP);
    if (sb.non) sb_mask(bp, mb, nbk, sb.minP);
    if (sa.non && sb.non)
      sb_compute<true, true>(ap, ma, bp, mb, M, K, N, off, pc, nl);
    else if (sa.non)
      sb_compute<true, false>(ap, ma, bp, mb, M, K, N, off, pc, nl);
    else if (sb.non)
      sb_compute<false, true>(ap, ma, bp, mb, M, K, N, off, pc, nl);
    else
      sb_compute<false, false>(ap, ma, bp, mb, M, K, N, off, pc, nl);
  };
  ThreadCap cap(nb * M * N * K);
  parallel_for(num_threads(), ng, group);
  return fallback.load();
}
#endif  // PAM_X86

// ---------------------------------------------------------------- batched entries
// out[i] = fn(a[i], b[i](, dc[i])). Small problems (the attention products of a transformer:
// many matrices of a few thousand MACs each) run one matrix per thread, each single-threaded,
// instead of paying a Python round trip and an OpenMP team per matrix.
template <typename F>
at::Tensor batched(int64_t nb, at::IntArrayRef out_shape, const at::TensorOptions& opt, int64_t work,
                   F fn) {
  at::Tensor out = at::empty(out_shape, opt);  // contiguous, so each mat_of(out, i) is
  if (nb == 0) return out;
  if (work >= (int64_t(1) << 21) || nb == 1) {
    for (int64_t i = 0; i < nb; ++i) fn(i, mat_of(out, i));
    return out;
  }
  ThreadCap cap(nb * work);
  const int nt = num_threads();
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t i = 0; i < nb; ++i) {
    ThreadCap inner(0);  // each matrix on its own thread
    fn(i, mat_of(out, i));
  }
  return out;
}

void check3(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3, op, ": a and b must be 3-D, got ", a.sizes(), " and ",
              b.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, op,
              ": a and b must be float32");
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), op, ": a and b must be CPU tensors");
  TORCH_CHECK(a.size(0) == b.size(0) && a.size(2) == b.size(1), op, ": shapes ", a.sizes(), " and ",
              b.sizes(), " cannot be batch-multiplied");
}

void check_dc3(const at::Tensor& a, const at::Tensor& b, const at::Tensor& dc, const char* op) {
  TORCH_CHECK(dc.dim() == 3 && dc.scalar_type() == at::kFloat && dc.device().is_cpu(), op,
              ": dc must be a 3-D float32 CPU tensor");
  TORCH_CHECK(dc.size(0) == a.size(0) && dc.size(1) == a.size(1) && dc.size(2) == b.size(2), op,
              ": dc must have shape (", a.size(0), ", ", a.size(1), ", ", b.size(2), "), got ", dc.sizes());
}

at::Tensor pam_bmm(at::Tensor a, at::Tensor b, int64_t path, int64_t D) {
  check3(a, b, "pam_bmm");
  check_offset(D);
  const int64_t M = a.size(1), K = a.size(2), N = b.size(2);
#if PAM_X86
  // path 3: the lanes for any size (tests, benchmarks)
  if (cpu_has_avx2_fma() && M * N * K > 0 &&
      ((path == -1 && a.size(0) >= 8 && M * N * K <= SB_WORK) || path == 3)) {
    at::Tensor out = at::empty({a.size(0), M, N}, a.options());
    if (sb_run(a, b, out, (int32_t)D) == 0) g_last_mode = SB;
    return out;
  }
#endif
  return batched(a.size(0), {a.size(0), M, N}, a.options(), M * N * K,
                 [&](int64_t i, Mat o) { pam_mm_into(mat_of(a, i), mat_of(b, i), o, path, D); });
}
at::Tensor pam_bmm_exact_grad_a(at::Tensor a, at::Tensor b, at::Tensor dc, int64_t path, int64_t D) {
  check3(a, b, "pam_bmm_exact_grad_a");
  check_dc3(a, b, dc, "pam_bmm_exact_grad_a");
  check_offset(D);
  const int64_t M = a.size(1), K = a.size(2), N = b.size(2);
  return batched(a.size(0), {a.size(0), M, K}, a.options(), M * N * K, [&](int64_t i, Mat o) {
    pam_exact_grad_into(a.select(0, i), b.select(0, i), dc.select(0, i), 0, path, D, o);
  });
}
at::Tensor pam_bmm_exact_grad_b(at::Tensor a, at::Tensor b, at::Tensor dc, int64_t path, int64_t D) {
  check3(a, b, "pam_bmm_exact_grad_b");
  check_dc3(a, b, dc, "pam_bmm_exact_grad_b");
  check_offset(D);
  const int64_t M = a.size(1), K = a.size(2), N = b.size(2);
  return batched(a.size(0), {a.size(0), K, N}, a.options(), M * N * K, [&](int64_t i, Mat o) {
    pam_exact_grad_into(a.select(0, i), b.select(0, i), dc.select(0, i), 1, path, D, o);
  });
}

std::string cpu_path() { return cpu_has_avx2_fma() ? "avx2+fma" : "scalar"; }
int64_t last_mode() { return g_last_mode.load(); }

}  // namespace

// the kernel route's C++ answers (pa_route.cpp): the products without an offset
at::Tensor route_pam_mm(const at::Tensor& a, const at::Tensor& b) { return pam_mm(a, b, -1, 0); }
at::Tensor route_pam_bmm(const at::Tensor& a, const at::Tensor& b) { return pam_bmm(a, b, -1, 0); }

void register_elementwise(pybind11::module& m);  // pa_elementwise.cpp
void register_optim(pybind11::module& m);        // pa_optim.cpp
void register_norm(pybind11::module& m);         // pa_norm.cpp
void register_lowp(pybind11::module& m);         // pa_lowp.cpp
void register_route(pybind11::module& m);        // pa_route.cpp
void register_rnn(pybind11::module& m);          // pa_rnn.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_elementwise(m);
  register_optim(m);
  register_norm(m);
  register_lowp(m);
  register_route(m);
  register_rnn(m);
  // path: -1 automatic, 0 portable scalar, 1 AVX2 general modes; D: the offset's bits(alpha) - bits(1.0)
  m.def("pam_mm", &pam_mm, "C = sum_k PAM(A[i,k], B[k,j])", py::arg("a"), py::arg("b"),
        py::arg("path") = -1, py::arg("D") = 0);
  m.def("pam_mm_exact_grad_a", &pam_mm_exact_grad_a, "exact dA", py::arg("a"), py::arg("b"),
        py::arg("dc"), py::arg("path") = -1, py::arg("D") = 0);
  m.def("pam_mm_exact_grad_b", &pam_mm_exact_grad_b, "exact dB", py::arg("a"), py::arg("b"),
        py::arg("dc"), py::arg("path") = -1, py::arg("D") = 0);
  m.def("pam_bmm", &pam_bmm, "C[i] = pam_mm(A[i], B[i])", py::arg("a"), py::arg("b"),
        py::arg("path") = -1, py::arg("D") = 0);
  m.def("pam_bmm_exact_grad_a", &pam_bmm_exact_grad_a, "batched exact dA", py::arg("a"),
        py::arg("b"), py::arg("dc"), py::arg("path") = -1, py::arg("D") = 0);
  m.def("pam_bmm_exact_grad_b", &pam_bmm_exact_grad_b, "batched exact dB", py::arg("a"),
        py::arg("b"), py::arg("dc"), py::arg("path") = -1, py::arg("D") = 0);
  m.def("cpu_path", &cpu_path);
  m.def("last_mode", &last_mode);
}
