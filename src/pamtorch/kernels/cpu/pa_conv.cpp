// pamtorch CPU kernels: the kernel route's C++ answers for convolution, batch norm and layer norm.
//
// A convolution or batch-norm call of a stock CNN costs the route's Python handler about a
// millisecond, most of it Python around tiny tensors (HF MobileNetV2 makes 52 of each per
// step, forward and backward). These functions are ops/conv.py's conv_forward/conv_backward
// (the per-sample and grouped im2col forms) and ops/norms.py's batch_norm_forward/
// batch_norm_backward written out in C++: the same aten calls (pad, as_strided, reshape,
// permute, col2im, sum) and the same PA kernels (the PAM products of pam_matmul.cpp, PAM/PAD/
// rsqrt of pa_elementwise.cpp) in the same order, so the results are the Python handler's
// bit for bit (tests/test_mode_kernel_route.py). Layer norm calls the fused kernels of
// pa_norm.cpp, as nn/functional.py does where they apply. Each returns false, before computing
// anything, for a call outside its narrow case: 1-D or 2-D, untransposed convolutions of
// float32 CPU tensors; float32 batch norms. Those, and every malformed call (whose error
// the Python handler words), go to Python.

#include <torch/extension.h>

#include <vector>

namespace pa_ew {   // pa_elementwise.cpp
at::Tensor pam(const at::Tensor& a, const at::Tensor& b);
at::Tensor pad(const at::Tensor& a, const at::Tensor& b);
at::Tensor rsqrt(const at::Tensor& x);
}  // namespace pa_ew
at::Tensor route_pam_mm(const at::Tensor& a, const at::Tensor& b);    // pam_matmul.cpp
at::Tensor route_pam_bmm(const at::Tensor& a, const at::Tensor& b);   // pam_matmul.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor> route_norm_forward(const at::Tensor& x, int64_t k,   // pa_norm.cpp
                                                                  const c10::optional<at::Tensor>& w,
                                                                  const c10::optional<at::Tensor>& b, double eps);
std::tuple<at::Tensor, at::Tensor> route_norm_backward(const at::Tensor& dy, const at::Tensor& x, int64_t k,
                                                       const at::Tensor& mean, const at::Tensor& rstd,
                                                       const c10::optional<at::Tensor>& w, bool want_dx,
                                                       bool want_dw);

namespace pa_cnn {
namespace {

using Ints = std::vector<int64_t>;

bool f32(const at::Tensor& t) {
  return t.defined() && t.scalar_type() == at::kFloat && t.device().is_cpu() && t.layout() == at::kStrided &&
         !t.is_neg() && !t.is_conj() && !t.unsafeGetTensorImpl()->is_wrapped_number();
}

int64_t prod(const Ints& v) {
  int64_t p = 1;
  for (int64_t x : v) p *= x;
  return p;
}

// conv.py _expand: one value repeated, or d values, each >= low (else: Python words the error)
bool expand(const Ints& v, size_t d, int64_t low, Ints* out) {
  if (v.size() == 1) {
    out->assign(d, v[0]);
  } else if (v.size() == d) {
    *out = v;
  } else {
    return false;
  }
  for (int64_t x : *out)
    if (x < low) return false;
  return true;
}

struct Geometry {
  Ints stride, padding, dilation, ksize, size, out_size;
  int64_t groups = 1;
  size_t d = 0;
};

// conv.py conv_params + conv_output_size for an untransposed 1-D/2-D convolution of float32
// CPU tensors with at least one element each
bool geometry(const at::Tensor& x, const at::Tensor& w, const Ints& stride, const Ints& padding,
              const Ints& dilation, int64_t groups, Geometry* g) {
  if (!f32(x) || !f32(w) || (x.dim() != 3 && x.dim() != 4) || w.dim() != x.dim()) return false;
  if (x.numel() == 0 || w.numel() == 0 || x.size(0) == 0) return false;
  g->d = static_cast<size_t>(x.dim() - 2);
  if (!expand(stride, g->d, 1, &g->stride) || !expand(padding, g->d, 0, &g->padding) ||
      !expand(dilation, g->d, 1, &g->dilation))
    return false;
  if (groups < 1 || x.size(1) != w.size(1) * groups || w.size(0) % groups) return false;
  g->groups = groups;
  for (size_t i = 0; i < g->d; ++i) {
    g->ksize.push_back(w.size(2 + i));
    g->size.push_back(x.size(2 + i));
    const int64_t o = (g->size[i] + 2 * g->padding[i] - g->dilation[i] * (g->ksize[i] - 1) - 1) / g->stride[i] + 1;
    if (g->size[i] + 2 * g->padding[i] - g->dilation[i] * (g->ksize[i] - 1) - 1 < 0 || o <= 0) return false;
    g->out_size.push_back(o);
  }
  return true;
}

Ints reach(const Ints& out_size, const Ints& ksize, const Ints& stride, const Ints& dilation) {
  Ints r;
  for (size_t i = 0; i < out_size.size(); ++i) r.push_back((out_size[i] - 1) * stride[i] + dilation[i] * (ksize[i] - 1) + 1);
  return r;
}

// conv.py _pads: the F.pad list taking each dim from size to reach, padding in front
Ints pads(const Ints& size, const Ints& rch, const Ints& padding) {
  Ints out;
  for (size_t j = size.size(); j-- > 0;) {
    out.push_back(padding[j]);
    out.push_back(rch[j] - size[j] - padding[j]);
  }
  return out;
}

// conv.py patches: the [N, C, *K, *O] view of the zero-padded input
at::Tensor patches(const at::Tensor& x, const Geometry& g, const Ints& out_size) {
  const Ints rch = reach(out_size, g.ksize, g.stride, g.dilation);
  at::Tensor xp = at::constant_pad_nd(x, pads(g.size, rch, g.padding), 0).contiguous();
  const auto st = xp.strides();
  Ints sizes{xp.size(0), xp.size(1)}, strides{st[0], st[1]};
  for (size_t i = 0; i < g.d; ++i) {
    sizes.push_back(g.ksize[i]);
    strides.push_back(st[2 + i] * g.dilation[i]);
  }
  for (size_t i = 0; i < g.d; ++i) {
    sizes.push_back(out_size[i]);
    strides.push_back(st[2 + i] * g.stride[i]);
  }
  return xp.as_strided(sizes, strides);
}

// conv.py col2im for 1-D/2-D: F.fold (1-D lifted to 2-D), then the padding cropped
at::Tensor col2im(const at::Tensor& cols, const Geometry& g, const Ints& out_size) {
  const int64_t n = cols.size(0), c = cols.size(1);
  const Ints rch = reach(out_size, g.ksize, g.stride, g.dilation);
  Ints osz, ks, dil, st;
  for (size_t i = g.d; i < 2; ++i) {
    osz.push_back(1);
    ks.push_back(1);
    dil.push_back(1);
    st.push_back(1);
  }
  for (size_t i = 0; i < g.d; ++i) {
    osz.push_back(rch[i]);
    ks.push_back(g.ksize[i]);
    dil.push_back(g.dilation[i]);
    st.push_back(g.stride[i]);
  }
  at::Tensor canvas = at::col2im(cols.reshape({n, c * prod(g.ksize), prod(out_size)}), osz, ks, dil, {0, 0}, st);
  Ints shape{n, c};
  shape.insert(shape.end(), rch.begin(), rch.end());
  canvas = canvas.reshape(shape);
  Ints crop = pads(g.size, rch, g.padding);
  for (auto& v : crop) v = -v;
  return at::constant_pad_nd(canvas, crop, 0);
}

// conv.py _groups_cols: [N, C, *K, *O] -> [g, C/g·∏K, N·∏O]
at::Tensor groups_cols(const at::Tensor& cols6, int64_t groups, size_t d) {
  Ints perm{1};
  for (size_t i = 0; i < d; ++i) perm.push_back(2 + i);
  perm.push_back(0);
  for (size_t i = 0; i < d; ++i) perm.push_back(2 + d + i);
  int64_t o = 1;
  for (size_t i = 0; i < d; ++i) o *= cols6.size(2 + d + i);
  return cols6.permute(perm).reshape({groups, -1, cols6.size(0) * o});
}

// conv.py _ungroup_cols: [g, C/g·∏K, N·∏O] -> [N, C, *K, *O]
at::Tensor ungroup_cols(const at::Tensor& m, int64_t n, int64_t c, const Ints& ksize, const Ints& out_size) {
  const size_t d = ksize.size();
  Ints shape{c};
  shape.insert(shape.end(), ksize.begin(), ksize.end());
  shape.push_back(n);
  shape.insert(shape.end(), out_size.begin(), out_size.end());
  Ints perm{static_cast<int64_t>(1 + d), 0};
  for (size_t i = 1; i <= d; ++i) perm.push_back(i);
  for (size_t i = 0; i < d; ++i) perm.push_back(2 + d + i);
  return m.reshape(shape).permute(perm);
}

// conv.py _groups_x: [N, C, *S] -> [g, C/g, N·∏S]
at::Tensor groups_x(const at::Tensor& x, int64_t groups) {
  const int64_t n = x.size(0), c = x.size(1);
  return x.reshape({n, groups, c / groups, -1}).permute({1, 2, 0, 3}).reshape({groups, c / groups, -1});
}

Ints with_front(std::initializer_list<int64_t> front, const Ints& rest) {
  Ints v(front);
  v.insert(v.end(), rest.begin(), rest.end());
  return v;
}

at::Tensor add_bias(const at::Tensor& y, const c10::optional<at::Tensor>& bias, size_t d) {
  if (!bias.has_value() || !bias->defined()) return y.contiguous();
  Ints shape{1, -1};
  for (size_t i = 0; i < d; ++i) shape.push_back(1);
  return at::add(y, bias->reshape(shape)).contiguous();
}

}  // namespace

// conv.py conv_forward with the approx derivative kind (per-sample form when ungrouped)
bool conv_forward(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, const Ints& stride,
                  const Ints& padding, const Ints& dilation, int64_t groups, at::Tensor* out) {
  Geometry g;
  if (!geometry(x, w, stride, padding, dilation, groups, &g)) return false;
  if (bias.has_value() && bias->defined() && (!f32(*bias) || bias->numel() != w.size(0))) return false;
  const int64_t n = x.size(0), oc = w.size(0);
  at::Tensor y;
  if (groups == 1) {
    at::Tensor b = patches(x, g, g.out_size).reshape({n, -1, prod(g.out_size)});
    at::Tensor a = w.reshape({1, oc, -1}).expand({n, -1, -1});
    y = route_pam_bmm(a, b).reshape(with_front({n, oc}, g.out_size));
  } else {
    at::Tensor a = w.reshape({groups, oc / groups, -1});
    at::Tensor b = groups_cols(patches(x, g, g.out_size), groups, g.d);
    at::Tensor c = route_pam_bmm(a, b);
    y = c.reshape(with_front({c.size(0) * c.size(1), n}, g.out_size)).transpose(0, 1);
  }
  *out = add_bias(y, bias, g.d);
  return true;
}

// conv.py conv_backward with the approx derivative kind: (dx, dw, dbias), undefined where
// the mask is false
bool conv_backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& w, const Ints& stride,
                   const Ints& padding, const Ints& dilation, int64_t groups, const std::array<bool, 3>& mask,
                   at::Tensor out[3]) {
  Geometry g;
  if (!geometry(x, w, stride, padding, dilation, groups, &g)) return false;
  if (!f32(gy) || gy.numel() == 0 || gy.dim() != x.dim() || gy.size(0) != x.size(0) || gy.size(1) != w.size(0))
    return false;
  for (size_t i = 0; i < g.d; ++i)
    if (gy.size(2 + i) != g.out_size[i]) return false;
  const int64_t n = x.size(0), oc = w.size(0), so = prod(g.out_size);
  at::Tensor gx, gw, gb;
  if (mask[0] || mask[1]) {
    if (groups == 1) {
      if (mask[1]) {
        at::Tensor cols = groups_cols(patches(x, g, g.out_size), 1, g.d)[0];          // [C·∏K, N·∏O]
        at::Tensor dct = gy.reshape({n, oc, so}).transpose(1, 2).reshape({n * so, oc});   // dC^T
        gw = route_pam_mm(cols, dct).t().reshape(w.sizes()).contiguous();
      }
      if (mask[0]) {
        at::Tensor wt = w.reshape({1, oc, -1}).transpose(1, 2).expand({n, -1, -1});
        at::Tensor dcols = route_pam_bmm(wt, gy.reshape({n, oc, so}));
        Ints shape{n, x.size(1)};
        shape.insert(shape.end(), g.ksize.begin(), g.ksize.end());
        shape.insert(shape.end(), g.out_size.begin(), g.out_size.end());
        gx = col2im(dcols.reshape(shape), g, g.out_size).contiguous();
      }
    } else {
      at::Tensor a = w.reshape({groups, oc / groups, -1});
      at::Tensor b = groups_cols(patches(x, g, g.out_size), groups, g.d);
      at::Tensor dc = groups_x(gy, groups);
      if (mask[1]) gw = route_pam_bmm(dc, b.transpose(1, 2)).reshape(w.sizes()).contiguous();
      if (mask[0]) {
        at::Tensor db = route_pam_bmm(a.transpose(1, 2), dc);
        gx = col2im(ungroup_cols(db, n, x.size(1), g.ksize, g.out_size), g, g.out_size).contiguous();
      }
    }
  }
  if (mask[2]) {
    Ints dims{0};
    for (int64_t i = 2; i < gy.dim(); ++i) dims.push_back(i);
    gb = gy.sum(dims);
  }
  out[0] = gx;
  out[1] = gw;
  out[2] = gb;
  return true;
}

namespace {

// norms.py _per_channel for float32 tensors of c elements
bool per_channel(const c10::optional<at::Tensor>& t, int64_t c, const Ints& shape, at::Tensor* out) {
  if (!t.has_value() || !t->defined()) {
    *out = at::Tensor();
    return true;
  }
  if (!f32(*t) || t->numel() != c) return false;
  *out = t->reshape(shape);
  return true;
}

bool defined(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

at::Tensor constant(double v, const at::Tensor& like) { return at::scalar_tensor(v, like.options()); }

}  // namespace

// norms.py batch_norm_forward (raw PA ops): (y, save_mean, save_invstd); the running
// statistics, when given in training, updated in place
bool batch_norm_forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
                        const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
                        at::Tensor out[3]) {
  if (!f32(x) || x.dim() < 2 || x.numel() == 0) return false;
  const int64_t c = x.size(1), n = x.numel() / c;
  Ints dims{0}, shape{1, c};
  for (int64_t i = 2; i < x.dim(); ++i) {
    dims.push_back(i);
    shape.push_back(1);
  }
  at::Tensor w, b, rm, rv;
  if (!per_channel(weight, c, shape, &w) || !per_channel(bias, c, shape, &b) ||
      !per_channel(running_mean, c, shape, &rm) || !per_channel(running_var, c, shape, &rv))
    return false;
  at::Tensor mean, invstd, xc, save_mean, save_invstd;
  if (training) {
    // the running statistics are updated in place: only contiguous buffers (reshape views)
    if ((defined(running_mean) && !running_mean->is_contiguous()) ||
        (defined(running_var) && !running_var->is_contiguous()))
      return false;
    at::Tensor nt = constant(static_cast<double>(n), x);
    mean = pa_ew::pad(x.sum(dims, true), nt);
    xc = at::sub(x, mean);
    at::Tensor ssq = pa_ew::pam(xc, xc).sum(dims, true);
    invstd = pa_ew::rsqrt(at::add(pa_ew::pad(ssq, nt), eps));
    if (defined(running_mean)) {
      const at::Tensor& r = *running_mean;
      at::Tensor batch = mean.reshape(-1);
      r.add_(pa_ew::pam(constant(momentum, r), at::sub(batch, r)));
    }
    if (defined(running_var)) {
      const at::Tensor& r = *running_var;
      at::Tensor s = ssq.reshape(-1);
      at::Tensor batch = pa_ew::pad(s, constant(static_cast<double>(n - 1), s));
      r.add_(pa_ew::pam(constant(momentum, r), at::sub(batch, r)));
    }
    save_mean = mean.reshape(c);
    save_invstd = invstd.reshape(c);
  } else {
    if (!rm.defined() || !rv.defined()) return false;
    mean = rm;
    invstd = pa_ew::rsqrt(at::add(rv, eps));
    xc = at::sub(x, mean);
    save_mean = x.new_empty(0);
    save_invstd = x.new_empty(0);
  }
  at::Tensor y = pa_ew::pam(xc, w.defined() ? pa_ew::pam(invstd, w) : invstd);
  if (b.defined()) y = at::add(y, b);
  out[0] = y;
  out[1] = save_mean;
  out[2] = save_invstd;
  return true;
}

// norms.py batch_norm_backward (the approx derivative): (dx, dw, db), undefined where the
// mask is false
bool batch_norm_backward(const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
                         const c10::optional<at::Tensor>& save_mean, const c10::optional<at::Tensor>& save_invstd,
                         bool train, double eps, const std::array<bool, 3>& mask, at::Tensor out[3]) {
  if (!f32(x) || !f32(dy) || x.dim() < 2 || x.numel() == 0 || dy.sizes() != x.sizes()) return false;
  const int64_t c = x.size(1), n = x.numel() / c;
  Ints dims{0}, shape{1, c};
  for (int64_t i = 2; i < x.dim(); ++i) {
    dims.push_back(i);
    shape.push_back(1);
  }
  at::Tensor mean, invstd, w;
  if (!per_channel(weight, c, shape, &w)) return false;
  if (train) {
    if (!per_channel(save_mean, c, shape, &mean) || !per_channel(save_invstd, c, shape, &invstd)) return false;
  } else {
    at::Tensor rv;
    if (!per_channel(running_mean, c, shape, &mean) || !per_channel(running_var, c, shape, &rv)) return false;
    if (rv.defined()) invstd = pa_ew::rsqrt(at::add(rv, eps));
  }
  if (!mean.defined() || !invstd.defined()) return false;
  at::Tensor k = w.defined() ? pa_ew::pam(invstd, w) : invstd;
  const bool need_dx = mask[0], need_dw = mask[1], need_db = mask[2];
  at::Tensor xhat, s_dyx, s_dy, dx, dw, db;
  if (need_dw || (need_dx && train)) {
    xhat = pa_ew::pam(at::sub(x, mean), invstd);
    s_dyx = pa_ew::pam(dy, xhat).sum(dims, true);
  }
  if (need_db || (need_dx && train)) s_dy = dy.sum(dims, true);
  if (need_dx) {
    if (train) {
      at::Tensor nt = constant(static_cast<double>(n), x);
      dx = pa_ew::pam(k, at::sub(at::sub(dy, pa_ew::pad(s_dy, nt)), pa_ew::pam(xhat, pa_ew::pad(s_dyx, nt))));
    } else {
      dx = pa_ew::pam(dy, k);
    }
  }
  if (need_dw) dw = s_dyx.reshape(c);
  if (need_db) db = s_dy.reshape(c);
  out[0] = dx;
  out[1] = dw;
  out[2] = db;
  return true;
}

// nn/functional.py layer_norm_forward where its fused kernel (pa_norm.cpp) applies: (y, mean,
// rstd); false where the composition would run (a layout the kernel does not take, a NaN
// from the bias add, a weight or bias of another shape)
bool layer_norm_forward(const at::Tensor& x, const Ints& shape, const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, double eps, at::Tensor out[3]) {
  const int64_t k = static_cast<int64_t>(shape.size());
  if (!f32(x) || k == 0 || x.dim() < k || x.numel() == 0) return false;
  for (int64_t i = 0; i < k; ++i)
    if (x.size(x.dim() - k + i) != shape[i]) return false;
  for (const auto* t : {&weight, &bias})
    if (defined(*t) && (!f32(**t) || (*t)->sizes() != c10::IntArrayRef(shape))) return false;
  auto r = route_norm_forward(x, k, weight, bias, eps);
  if (!std::get<0>(r).defined()) return false;
  out[0] = std::get<0>(r);
  out[1] = std::get<1>(r);
  out[2] = std::get<2>(r);
  return true;
}

// nn/functional.py layer_norm_backward where its fused kernel applies: (dx, dw, db)
bool layer_norm_backward(const at::Tensor& dy, const at::Tensor& x, const Ints& shape, const at::Tensor& mean,
                         const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& bias, const std::array<bool, 3>& mask, at::Tensor out[3]) {
  const int64_t k = static_cast<int64_t>(shape.size());
  if (!f32(x) || !f32(dy) || !f32(mean) || !f32(rstd) || k == 0 || x.dim() < k || x.numel() == 0 ||
      dy.sizes() != x.sizes())
    return false;
  for (int64_t i = 0; i < k; ++i)
    if (x.size(x.dim() - k + i) != shape[i]) return false;
  if (defined(weight) && (!f32(*weight) || weight->sizes() != c10::IntArrayRef(shape))) return false;
  if (defined(bias) && !f32(*bias)) return false;
  Ints stat(x.sizes().begin(), x.sizes().end() - k);
  stat.insert(stat.end(), k, 1);
  if (rstd.sizes() != c10::IntArrayRef(stat) || mean.sizes() != c10::IntArrayRef(stat)) return false;
  const bool want_dx = mask[0], want_dw = mask[1] && defined(weight);
  if (!want_dx && !want_dw) return false;
  auto r = route_norm_backward(dy, x, k, mean, rstd, weight, want_dx, want_dw);
  if ((want_dx && !std::get<0>(r).defined()) || (want_dw && !std::get<1>(r).defined())) return false;
  at::Tensor db;
  if (mask[2] && defined(bias)) {
    const int64_t nlead = x.dim() - k;
    if (nlead == 0) {
      db = dy;
    } else {
      Ints lead;
      for (int64_t i = 0; i < nlead; ++i) lead.push_back(i);
      db = dy.sum(lead);
    }
  }
  out[0] = std::get<0>(r);
  out[1] = std::get<1>(r);
  out[2] = db;
  return true;
}

}  // namespace pa_cnn
