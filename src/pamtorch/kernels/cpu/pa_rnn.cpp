// pamtorch: the LSTM layer of ops/recurrent.py (aten.mkldnn_rnn_layer and its backward under
// pamtorch.mode) as one C++ loop over the time steps, for float32 CPU operands and a config
// whose products, gate products and gate nonlinearities are PA with no offset and no
// mantissa bits. Every step is the Python loop's operation, in its order, on the same
// kernels: PAM products (pam_matmul.cpp), PAM (pa_elementwise.cpp), the fused sigmoid and tanh
// and their approx derivatives, and aten's own additions, copies, concatenations and sums;
// tests/test_ops_recurrent.py checks the two bit for bit.

#include <torch/extension.h>

#include <vector>

namespace pa_ew {   // pa_elementwise.cpp
at::Tensor pam(const at::Tensor& a, const at::Tensor& b);
at::Tensor act_forward(const at::Tensor& x, int64_t kind);
at::Tensor act_backward(const at::Tensor& dy, const at::Tensor& v, int64_t kind);
}  // namespace pa_ew
at::Tensor route_pam_mm(const at::Tensor& a, const at::Tensor& b);   // pam_matmul.cpp

namespace {

constexpr int64_t kSigmoid = 0, kTanh = 1;

at::Tensor pa_mm(const at::Tensor& a, const at::Tensor& b) {
  if (a.size(0) == 0 || a.size(1) == 0 || b.size(1) == 0)   // matmul._mm32's empty case
    return at::zeros({a.size(0), b.size(1)}, a.options());
  return route_pam_mm(a, b);
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined() && t.scalar_type() == at::kFloat && t.device().is_cpu(), "pamtorch lstm: '", name,
              "' must be a float32 CPU tensor");
}

// ops/recurrent.lstm_layer_forward: (out, hT, cT, gates, cs)
std::vector<at::Tensor> lstm_forward(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                     const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
                                     const at::Tensor& h0, const at::Tensor& c0, bool reverse) {
  check(x, "x");
  check(w_ih, "w_ih");
  check(w_hh, "w_hh");
  check(h0, "h0");
  check(c0, "c0");
  TORCH_CHECK(x.dim() == 3, "pamtorch lstm: x must be [T, B, I]");
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = h0.size(-1);
  at::Tensor xg = pa_mm(x.reshape({T * B, I}), w_ih.t()).reshape({T, B, 4 * H});
  if (b_ih.has_value() && b_ih->defined()) xg = at::add(xg, at::add(*b_ih, *b_hh));
  at::Tensor out = x.new_empty({T, B, H}), gates = x.new_empty({T, B, 4 * H}), cs = x.new_empty({T, B, H});
  at::Tensor h = h0, c = c0;
  const at::Tensor whh_t = w_hh.t();
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    const at::Tensor g = at::add(xg.select(0, t), pa_mm(h, whh_t));
    const auto parts = g.split(H, 1);
    const at::Tensor i = pa_ew::act_forward(parts[0], kSigmoid), f = pa_ew::act_forward(parts[1], kSigmoid),
                     gg = pa_ew::act_forward(parts[2], kTanh), o = pa_ew::act_forward(parts[3], kSigmoid);
    c = at::add(pa_ew::pam(f, c), pa_ew::pam(i, gg));
    h = pa_ew::pam(o, pa_ew::act_forward(c, kTanh));
    out.select(0, t).copy_(h);
    cs.select(0, t).copy_(c);
    gates.select(0, t).copy_(at::cat({i, f, gg, o}, 1));
  }
  return {out, h, c, gates, cs};
}

// ops/recurrent.lstm_layer_backward: (dx, dW_ih, dW_hh, db, dh0, dc0)
std::vector<at::Tensor> lstm_backward(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                      const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& out,
                                      const at::Tensor& gates, const at::Tensor& cs,
                                      const c10::optional<at::Tensor>& d_out, const c10::optional<at::Tensor>& d_hT,
                                      const c10::optional<at::Tensor>& d_cT, bool reverse) {
  for (const auto* t : {&x, &w_ih, &w_hh, &h0, &c0, &out, &gates, &cs}) check(*t, "operand");
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = h0.size(-1);
  const int64_t first = reverse ? T - 1 : 0, shift = reverse ? 1 : -1;
  at::Tensor h_prev = at::roll(out, {-shift}, {0}), c_prev = at::roll(cs, {-shift}, {0});
  h_prev.select(0, first).copy_(h0);
  c_prev.select(0, first).copy_(c0);
  const bool has_dout = d_out.has_value() && d_out->defined();
  at::Tensor dh = d_hT.has_value() && d_hT->defined() ? d_hT->to(h0.scalar_type()) : at::zeros_like(h0);
  at::Tensor dc = d_cT.has_value() && d_cT->defined() ? d_cT->to(c0.scalar_type()) : at::zeros_like(c0);
  const at::Tensor tc = pa_ew::act_forward(cs, kTanh);
  at::Tensor dgates = at::empty_like(gates);
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? s : T - 1 - s;   // reversed(_steps(T, reverse))
    if (has_dout) dh = at::add(dh, d_out->select(0, t));
    const auto parts = gates.select(0, t).split(H, 1);
    const at::Tensor &i = parts[0], &f = parts[1], &g = parts[2], &o = parts[3];
    const at::Tensor tct = tc.select(0, t);
    const at::Tensor d_o = pa_ew::pam(dh, tct);
    dc = at::add(dc, pa_ew::act_backward(pa_ew::pam(dh, o), tct, kTanh));
    const at::Tensor di = pa_ew::pam(dc, g), dg = pa_ew::pam(dc, i), df = pa_ew::pam(dc, c_prev.select(0, t));
    dc = pa_ew::pam(dc, f);
    dgates.select(0, t).copy_(at::cat({pa_ew::act_backward(di, i, kSigmoid), pa_ew::act_backward(df, f, kSigmoid),
                                       pa_ew::act_backward(dg, g, kTanh), pa_ew::act_backward(d_o, o, kSigmoid)},
                                      1));
    dh = pa_mm(dgates.select(0, t), w_hh);
  }
  const at::Tensor dg2 = dgates.reshape({T * B, 4 * H});
  const at::Tensor dx = pa_mm(dg2, w_ih).reshape({T, B, I});
  const at::Tensor dw_ih = pa_mm(dg2.t(), x.reshape({T * B, I}));
  const at::Tensor dw_hh = pa_mm(dg2.t(), h_prev.reshape({T * B, H}));
  return {dx, dw_ih, dw_hh, at::sum(dg2, {0}), dh, dc};
}

}  // namespace

void register_rnn(pybind11::module& m) {
  m.def("lstm_layer_forward", &lstm_forward, "ops/recurrent.lstm_layer_forward for float32, one C++ loop");
  m.def("lstm_layer_backward", &lstm_backward, "ops/recurrent.lstm_layer_backward for float32, one C++ loop");
}
