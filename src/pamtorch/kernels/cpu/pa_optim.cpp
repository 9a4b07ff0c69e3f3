// pamtorch CPU kernels: fused PA optimizer updates (Adam/AdamW), one pass per parameter tensor.
// Bit-exact ports of the compositions they replace (see the functions' comments); no
// floating-point multiply or divide.
//
//   optim_adam_step(params, grads, exp_avgs, exp_avg_sqs, forms, adamw, maximize)
//       the per-tensor update of ops/optim.py's _pa_fused_adam (amsgrad excluded), in its
//       ops and order, in place, on float32 contiguous CPU tensors
//
// Each product with a Python number in that update is one "form", chosen in Python by the
// functions of ops/elementwise.py (scalar_mul / scalar_scale / scalar_div) and passed here
// as (kind, float32 bits of the constant):
//
//   IDENT      x                                   (scalar_scale by 1)
//   PAM        PAM(x, c)
//   PAD        PAD(x, c)
//   NEAR       x + PAM(x, |c| - 1) for finite nonzero x, else x   (the optimizer's form of a
//   NEAR_NEG   factor 1/2 <= |c| <= 2; NEAR_NEG for c < 0 negates the result, NaN included)
//   SKIP       no weight decay (only the first form)
//
// The float additions are IEEE additions with torch's NaN choice: aten.add / aten.sub on CPU
// (an FMA b * alpha + a) return the second operand's NaN (quieted) when both are NaN, and
// never flip a NaN's sign; ops/optim.py checks once that the running torch does so before it
// uses this kernel. Integer arithmetic, compares, selects and float adds only.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "pa_bits.h"

namespace {

using namespace pa_bits;  // B32 ... ABS32, PA_INLINE, u32, f32, pam_bits, pad_bits (pa_bits.h)

// arith.pa_sqrt: pattern round((P - B) / 2) + B, ties to even; sqrt(±0) = ±0 (subnormals are
// zeros), sqrt(inf) = inf, NaN for NaN and negative nonzero x. (P - B) / 2 + B stays within
// the normal range, so no flush or overflow.
PA_INLINE uint32_t sqrt_bits(uint32_t ux) {
  const uint32_t m = ux & ABS32;
  const int32_t n = static_cast<int32_t>(m) - static_cast<int32_t>(B32);
  const int32_t h = n >> 1;  // arithmetic shift: floor(n / 2)
  const int32_t half = h + static_cast<int32_t>(n & h & 1);  // round half to even
  uint32_t r = static_cast<uint32_t>(half + static_cast<int32_t>(B32));
  const bool neg = (ux & SIGN32) != 0, zero = m < MN32;
  r = zero ? (ux & SIGN32) : r;
  r = m == INF32 ? INF32 : r;
  return (m > INF32) | (neg & !zero) ? NAN32 : r;
}

PA_INLINE bool is_nan(uint32_t u) { return (u & ABS32) > INF32; }

// torch's a + b and a - b on CPU: b's NaN (quieted) when b is NaN, else the IEEE result (which
// is a's NaN, quieted, when only a is NaN; the default NaN for inf - inf). A NaN b replaces a,
// so that the add sees one NaN (b + b, b - b: b quieted, sign kept) whichever operand order the
// compiler picks; selecting the operand rather than the result keeps the add unconditional,
// so that the loops vectorize.
PA_INLINE uint32_t add_bits(uint32_t a, uint32_t b) {
  return u32(f32(is_nan(b) ? b : a) + f32(b));
}
PA_INLINE uint32_t sub_bits(uint32_t a, uint32_t b) {
  return u32(f32(is_nan(b) ? b : a) - f32(b));
}

// the optimizer's form of x *^ c for 1/2 <= |c| <= 2 (ops/elementwise.scalar_mul):
// x + PAM(x, |c| - 1) where x is finite and nonzero (subnormals included), else x itself.
// Branch-free, so that the loops vectorize: elsewhere the term is -0, and x + -0 is x, but
// for a signalling NaN, which it quiets; in the update every form's result is an operand of
// a float add, which quiets it anyway, so the bits are the same.
PA_INLINE uint32_t near_bits(uint32_t ux, uint32_t cm1) {
  const uint32_t m = ux & ABS32;
  const uint32_t keep = 0u - static_cast<uint32_t>((m == 0u) | (m >= INF32));  // all ones or 0
  const uint32_t term = (pam_bits(ux, cm1) & ~keep) | (SIGN32 & keep);
  return u32(f32(ux) + f32(term));
}

enum Kind : int64_t { IDENT = 0, PAM = 1, PAD = 2, NEAR = 3, NEAR_NEG = 4, SKIP = 5 };
struct Form {
  int64_t kind;
  uint32_t c;
};

// the forms of one tensor's update, in the order of the Python arguments
struct Forms {
  Form decay;    // AdamW: p *^ (1 - lr wd); Adam: p *^ wd added to g; SKIP without decay
  Form beta1;    // (g - m) *^ (1 - beta1)
  Form beta2;    // v *^ beta2
  Form gg;       // (g *^ g) *^ (1 - beta2)
  Form bc2;      // pa_sqrt(v) /^ sqrt(1 - beta2^t)
  Form step;     // (m /^ denom) *^ (-lr / (1 - beta1^t))
  uint32_t eps;  // eps as float32
};

// y[i] = form(x[i]) over a block; the switch runs once per block, each case a simple loop
PA_INLINE void apply(const Form& f, uint32_t* __restrict y, const uint32_t* __restrict x, int64_t n) {
  const uint32_t c = f.c;
  switch (f.kind) {
    case PAM:
      for (int64_t i = 0; i < n; ++i) y[i] = pam_bits(x[i], c);
      break;
    case PAD:
      for (int64_t i = 0; i < n; ++i) y[i] = pad_bits(x[i], c);
      break;
    case NEAR:
      for (int64_t i = 0; i < n; ++i) y[i] = near_bits(x[i], c);
      break;
    case NEAR_NEG:
      for (int64_t i = 0; i < n; ++i) y[i] = near_bits(x[i], c) ^ SIGN32;
      break;
    default:  // IDENT
      for (int64_t i = 0; i < n; ++i) y[i] = x[i];
  }
}

// One block of _pa_fused_adam's per-tensor sequence (amsgrad off), in place on p, m, v:
//   g <- -g (maximize);  AdamW: p <- p *^ (1 - lr wd);  Adam: g <- g + p *^ wd
//   m <- m + (g - m) *^ (1 - beta1)
//   v <- v *^ beta2 + (g *^ g) *^ (1 - beta2)
//   p <- p + (m /^ (pa_sqrt(v) /^ sqrt(1 - beta2^t) + eps)) *^ (-lr / (1 - beta1^t))
// Each step is one loop over L1-resident buffers, which the compiler vectorizes.
constexpr int64_t BLOCK = 256;
PA_INLINE void adam_body(uint32_t* __restrict p, const uint32_t* __restrict g0, uint32_t* __restrict m,
                         uint32_t* __restrict v, int64_t n, const Forms& k, bool adamw, bool maximize) {
  alignas(64) uint32_t g[BLOCK], a[BLOCK], b[BLOCK];
  for (int64_t j = 0; j < n; j += BLOCK) {
    const int64_t len = n - j < BLOCK ? n - j : BLOCK;
    uint32_t* __restrict ps = p + j;
    uint32_t* __restrict ms = m + j;
    uint32_t* __restrict vs = v + j;
    const uint32_t* __restrict gs = g0 + j;
    const uint32_t flip = maximize ? SIGN32 : 0u;
    for (int64_t i = 0; i < len; ++i) g[i] = gs[i] ^ flip;
    if (k.decay.kind != SKIP) {
      if (adamw) {
        apply(k.decay, a, ps, len);
        for (int64_t i = 0; i < len; ++i) ps[i] = a[i];
      } else {
        apply(k.decay, a, ps, len);
        for (int64_t i = 0; i < len; ++i) g[i] = add_bits(g[i], a[i]);
      }
    }
    for (int64_t i = 0; i < len; ++i) a[i] = sub_bits(g[i], ms[i]);
    apply(k.beta1, b, a, len);
    for (int64_t i = 0; i < len; ++i) ms[i] = add_bits(ms[i], b[i]);
    for (int64_t i = 0; i < len; ++i) a[i] = pam_bits(g[i], g[i]);
    apply(k.gg, b, a, len);
    apply(k.beta2, a, vs, len);
    for (int64_t i = 0; i < len; ++i) vs[i] = add_bits(a[i], b[i]);
    for (int64_t i = 0; i < len; ++i) a[i] = sqrt_bits(vs[i]);
    apply(k.bc2, b, a, len);
    for (int64_t i = 0; i < len; ++i) b[i] = add_bits(b[i], k.eps);
    for (int64_t i = 0; i < len; ++i) a[i] = pad_bits(ms[i], b[i]);
    apply(k.step, b, a, len);
    for (int64_t i = 0; i < len; ++i) ps[i] = add_bits(ps[i], b[i]);
  }
}

void adam_portable(uint32_t* p, const uint32_t* g, uint32_t* m, uint32_t* v, int64_t n, const Forms& k,
                   bool adamw, bool maximize) {
  adam_body(p, g, m, v, n, k, adamw, maximize);
}
#if defined(__x86_64__) && !defined(PAM_NO_X86)
__attribute__((target("avx2"))) void adam_avx2(uint32_t* p, const uint32_t* g, uint32_t* m, uint32_t* v,
                                               int64_t n, const Forms& k, bool adamw, bool maximize) {
  adam_body(p, g, m, v, n, k, adamw, maximize);
}
inline bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#endif

void check_state(const at::Tensor& t, const at::Tensor& p, const char* name, size_t i) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous(),
              "pamtorch optim_adam_step: ", name, "[", i, "] must be a contiguous float32 CPU tensor, got ",
              t.scalar_type(), " on ", t.device(), t.is_contiguous() ? "" : " (non-contiguous)");
  TORCH_CHECK(t.numel() == p.numel(), "pamtorch optim_adam_step: ", name, "[", i, "] has ", t.numel(),
              " elements, params[", i, "] has ", p.numel());
}

Form form(const std::vector<int64_t>& f, size_t at) {
  const int64_t kind = f[at];
  TORCH_CHECK(kind >= IDENT && kind <= SKIP, "pamtorch optim_adam_step: form kind must be 0..5, got ", kind);
  return Form{kind, static_cast<uint32_t>(f[at + 1])};
}

constexpr int64_t GRAIN = 1 << 16;  // elements per thread before a tensor is split

// forms: 13 integers per tensor, (kind, bits) for decay, beta1, beta2, gg, bc2, step, then eps's bits
void adam_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
               const std::vector<int64_t>& forms, bool adamw, bool maximize) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n,
              "pamtorch optim_adam_step: params, grads, exp_avgs and exp_avg_sqs must have one entry per "
              "parameter, got ", n, ", ", grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size());
  TORCH_CHECK(forms.size() == 13 * n, "pamtorch optim_adam_step: forms must hold 13 integers per tensor (",
              13 * n, "), got ", forms.size());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_state(p, p, "params", i);
    check_state(grads[i], p, "grads", i);
    check_state(exp_avgs[i], p, "exp_avgs", i);
    check_state(exp_avg_sqs[i], p, "exp_avg_sqs", i);
  }
  for (size_t i = 0; i < n; ++i) {
    const size_t o = 13 * i;
    const Forms k{form(forms, o), form(forms, o + 2), form(forms, o + 4), form(forms, o + 6),
                  form(forms, o + 8), form(forms, o + 10), static_cast<uint32_t>(forms[o + 12])};
    TORCH_CHECK(k.beta1.kind != SKIP && k.beta2.kind != SKIP && k.gg.kind != SKIP && k.bc2.kind != SKIP &&
                    k.step.kind != SKIP,
                "pamtorch optim_adam_step: only the weight-decay form may be SKIP (5)");
    auto* p = reinterpret_cast<uint32_t*>(params[i].data_ptr<float>());
    const auto* g = reinterpret_cast<const uint32_t*>(grads[i].data_ptr<float>());
    auto* m = reinterpret_cast<uint32_t*>(exp_avgs[i].data_ptr<float>());
    auto* v = reinterpret_cast<uint32_t*>(exp_avg_sqs[i].data_ptr<float>());
    at::parallel_for(0, params[i].numel(), GRAIN, [&](int64_t begin, int64_t end) {
      const int64_t len = end - begin;
#if defined(__x86_64__) && !defined(PAM_NO_X86)
      if (has_avx2()) return adam_avx2(p + begin, g + begin, m + begin, v + begin, len, k, adamw, maximize);
#endif
      adam_portable(p + begin, g + begin, m + begin, v + begin, len, k, adamw, maximize);
    });
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------
// The same update on bfloat16/float16 tensors: _pa_fused_adam's loop as it runs there, op for
// op, on ATen's own adds, negations and selects (their rounding to 16 bits and their NaNs are
// torch's, so they are called, not re-implemented) and the 16-bit PA kernels of pa_lowp.cpp
// (PAM, PAD, and pa_sqrt by table lookup). What it saves is the Python of the loop.

namespace pa_lowp {   // pa_lowp.cpp
at::Tensor pam(const at::Tensor& a, const at::Tensor& b);
at::Tensor pad(const at::Tensor& a, const at::Tensor& b);
at::Tensor lookup(const at::Tensor& x, const at::Tensor& table);
}  // namespace pa_lowp

namespace {

// scalar_mul / scalar_scale / scalar_div of ops/elementwise.py by the form (kind, c), c the
// constant as a 0-d tensor of x's dtype (promote()'s torch.tensor(float(c), dtype=...))
at::Tensor lowp_form(int64_t kind, const at::Tensor& x, const at::Tensor& c) {
  switch (kind) {
    case PAM:
      return pa_lowp::pam(x, c);
    case PAD:
      return pa_lowp::pad(x, c);
    case NEAR:
    case NEAR_NEG: {
      // torch.where(torch.isfinite(x) & (x != 0), x + pam(x, |c| - 1), x), negated for c < 0
      at::Tensor out = at::where(at::bitwise_and(at::isfinite(x), at::ne(x, 0)), at::add(x, pa_lowp::pam(x, c)), x);
      return kind == NEAR ? out : at::neg(out);
    }
    default:  // IDENT
      return x;
  }
}

// kinds: 6 per tensor (decay, beta1, beta2, gg, bc2, step; as in adam_step), consts: the 6
// matching constants (any 0-d tensor of the dtype where the kind takes none), eps the Python
// float added to the denominator, sqrt_table arith.pa_sqrt's table for the dtype
void adam_step_lowp(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                    const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                    const std::vector<int64_t>& kinds, const std::vector<at::Tensor>& consts, double eps,
                    const at::Tensor& sqrt_table, bool adamw, bool maximize) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n,
              "pamtorch optim_adam_step_lowp: params, grads, exp_avgs and exp_avg_sqs must have one entry per "
              "parameter, got ", n, ", ", grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size());
  TORCH_CHECK(kinds.size() == 6 * n && consts.size() == 6 * n,
              "pamtorch optim_adam_step_lowp: kinds and consts must hold 6 entries per tensor (", 6 * n,
              "), got ", kinds.size(), " and ", consts.size());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK((p.scalar_type() == at::kBFloat16 || p.scalar_type() == at::kHalf) && p.device().is_cpu(),
                "pamtorch optim_adam_step_lowp: params[", i, "] must be a bfloat16 or float16 CPU tensor, got ",
                p.scalar_type(), " on ", p.device());
    TORCH_CHECK(sqrt_table.scalar_type() == p.scalar_type() && sqrt_table.dim() == 1 &&
                    sqrt_table.numel() == 65536 && sqrt_table.is_contiguous() && sqrt_table.device().is_cpu(),
                "pamtorch optim_adam_step_lowp: 'sqrt_table' must be a contiguous CPU tensor of 65536 elements of "
                "the parameters' dtype, got ", sqrt_table.scalar_type(), " with shape ", sqrt_table.sizes());
    for (const auto* t : {&grads[i], &exp_avgs[i], &exp_avg_sqs[i]})
      TORCH_CHECK(t->scalar_type() == p.scalar_type() && t->device().is_cpu() && t->sizes() == p.sizes(),
                  "pamtorch optim_adam_step_lowp: the state of params[", i, "] must be CPU tensors of its dtype (",
                  p.scalar_type(), ") and shape ", p.sizes(), ", got ", t->scalar_type(), " ", t->sizes());
    for (size_t j = 0; j < 6; ++j) {
      const int64_t kind = kinds[6 * i + j];
      TORCH_CHECK(kind >= IDENT && kind <= (j == 0 ? SKIP : NEAR_NEG),
                  "pamtorch optim_adam_step_lowp: form kind must be 0..4 (0..5 for the decay), got ", kind);
      const at::Tensor& c = consts[6 * i + j];
      TORCH_CHECK(c.dim() == 0 && c.scalar_type() == p.scalar_type(),
                  "pamtorch optim_adam_step_lowp: consts must be 0-d tensors of the parameters' dtype");
    }
  }
  for (size_t i = 0; i < n; ++i) {
    const int64_t* k = kinds.data() + 6 * i;
    const at::Tensor* c = consts.data() + 6 * i;
    at::Tensor p = params[i], m = exp_avgs[i], v = exp_avg_sqs[i];
    at::Tensor g = maximize ? at::neg(grads[i]) : grads[i];
    if (k[0] != SKIP) {
      if (adamw) {
        p.copy_(lowp_form(k[0], p, c[0]));              // p <- p *^ (1 - lr wd)
      } else {
        g = at::add(g, lowp_form(k[0], p, c[0]));      // g <- g + p *^ wd
      }
    }
    m.copy_(at::add(m, lowp_form(k[1], at::sub(g, m), c[1])));
    v.copy_(at::add(lowp_form(k[2], v, c[2]), lowp_form(k[3], pa_lowp::pam(g, g), c[3])));
    at::Tensor denom = at::add(lowp_form(k[4], pa_lowp::lookup(v, sqrt_table), c[4]), eps);
    p.copy_(at::add(p, lowp_form(k[5], pa_lowp::pad(m, denom), c[5])));
  }
}

}  // namespace

void register_optim(pybind11::module& m) {
  m.def("optim_adam_step_lowp", &adam_step_lowp,
        "one PA Adam/AdamW update per bfloat16/float16 tensor, in place (ops/optim.py's _pa_fused_adam loop, "
        "amsgrad off); kinds: 6 per tensor, consts: 6 0-d tensors per tensor");
  m.def("optim_adam_step", &adam_step,
        "one PA Adam/AdamW update per float32 tensor, in place (ops/optim.py's _pa_fused_adam, amsgrad "
        "off); forms: 13 integers per tensor");
}
