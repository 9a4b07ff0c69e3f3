"""Recurrent layers: the fused RNN ops as PA cell loops.

On the CPU, ``nn.GRU`` and ``nn.RNN`` (tanh and relu), ``nn.LSTM`` with projections or a
packed sequence, and the ``*Cell`` modules decompose into ops the table already routes:
``addmm``/``mm`` (PAM products), ``sigmoid_``/``tanh_`` (:mod:`.activations`), ``mul`` and
additions. A plain ``nn.LSTM`` instead reaches ``aten.mkldnn_rnn_layer``, one direction of one
layer over the whole sequence, and its backward ``aten.mkldnn_rnn_layer_backward``; both are
implemented here as a loop over time steps (the RNN driver in C++ stacks layers and
directions, with dropout between layers, around them).

One step, gate order i, f, g, o as torch:

    G = x_t W_ihᵀ + b_ih + b_hh + h W_hhᵀ        (PAM products, float32 sums)
    i, f, o = σ(G_i), σ(G_f), σ(G_o);  g = tanh(G_g)        (PA sigmoid / tanh)
    c' = f ⊙̂ c + i ⊙̂ g;  h' = o ⊙̂ tanh(c')

The backward is the "approx" kind: backpropagation through time with the standard LSTM
derivative formulas evaluated with PA ops (σ' = y ⊙̂ (1 - y), tanh' = 1 - y ⊙̂ y). The op
runs as kind "matmul"; inside it the gate nonlinearities follow the config's "nonlinear"
kind and the gate products its "elementwise" kind (PA, or exact where the config leaves
that kind exact), as they do for the decomposed GRU and RNN.
"""
from __future__ import annotations

import torch

from . import activations as act
from .. import arith
from ..recording import RECORDERS
from .matmul import mm
from .table import ACTIVE, UnsupportedOpError, aten, implements, pam

__all__ = ["lstm_layer_forward", "lstm_layer_backward"]

_MKLDNN_LSTM = 2   # the mode code aten.mkldnn_rnn_layer uses for an LSTM (ideep's rnn_kind)


class _CellOps:
    """The gate arithmetic of one call: PA or exact per the active config's kinds."""

    def __init__(self):
        cfg = ACTIVE[-1]
        ew, nl = cfg.elementwise, cfg.nonlinear
        self.mat, self.ew, self.nl = cfg.matmul, ew, nl
        self.mul = (lambda a, b: pam(a, b, ew)) if ew.pa else torch.mul
        if nl.pa:
            self.sigmoid, self.tanh = act.sigmoid_forward, act.tanh_forward
            self.sigmoid_backward, self.tanh_backward = act.sigmoid_backward, act.tanh_backward
        else:
            self.sigmoid, self.tanh = torch.sigmoid, torch.tanh
            self.sigmoid_backward, self.tanh_backward = aten.sigmoid_backward, aten.tanh_backward

    def mm(self, a, b):
        return mm(a, b, self.mat)

    def compiled(self, *ts):
        """The compiled module when the loop can run in C++ (kernels/cpu/pa_rnn.cpp, the
        same steps on the same kernels): products, gate products and gate nonlinearities
        PA with no offset or mantissa bits, every operand a float32 CPU tensor, no audit
        recording; else None."""
        plain = all(k.pa and k.offset is None and k.mantissa_bits is None for k in (self.mat, self.ew, self.nl))
        if not plain or RECORDERS or not all(t is None or t.dtype == torch.float32 and t.device.type == "cpu"
                                            for t in ts):
            return None
        return arith._ext(*[t for t in ts if t is not None])


def _steps(n: int, reverse: bool):
    return range(n - 1, -1, -1) if reverse else range(n)


def lstm_layer_forward(x, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse: bool = False, ops=None):
    """One LSTM layer in one direction over a time-major ``x`` [T, B, I] from ``(h0, c0)``
    [B, H]: ``(out [T, B, H], hT, cT, gates [T, B, 4H] after their nonlinearity, c [T, B, H])``
    (``reverse``: time runs from T-1 down to 0; ``out[t]`` is still the state at step t).
    ``b_ih``/``b_hh`` may be None."""
    ops = ops or _CellOps()
    ext = ops.compiled(x, w_ih, w_hh, b_ih, b_hh, h0, c0)
    if ext is not None and x.dim() == 3 and x.numel():
        return tuple(ext.lstm_layer_forward(x, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse))
    T, B, I = x.shape
    H = h0.shape[-1]
    xg = ops.mm(x.reshape(T * B, I), w_ih.t()).reshape(T, B, 4 * H)
    if b_ih is not None:
        xg = xg + (b_ih + b_hh)
    out = x.new_empty(T, B, H)
    gates = x.new_empty(T, B, 4 * H)
    cs = x.new_empty(T, B, H)
    h, c = h0, c0
    whh_t = w_hh.t()
    for t in _steps(T, reverse):
        g = xg[t] + ops.mm(h, whh_t)
        i, f, gg, o = g.split(H, 1)
        i, f, gg, o = ops.sigmoid(i), ops.sigmoid(f), ops.tanh(gg), ops.sigmoid(o)
        c = ops.mul(f, c) + ops.mul(i, gg)
        h = ops.mul(o, ops.tanh(c))
        out[t], cs[t] = h, c
        gates[t] = torch.cat([i, f, gg, o], 1)
    return out, h, c, gates, cs


def lstm_layer_backward(x, w_ih, w_hh, h0, c0, out, gates, cs, d_out, d_hT, d_cT,
                        reverse: bool = False, ops=None):
    """Approx derivative of :func:`lstm_layer_forward` by backpropagation through time:
    ``(dx, dW_ih, dW_hh, db, dh0, dc0)`` (``db`` is the gradient of both biases). The
    upstream ``d_out``, ``d_hT``, ``d_cT`` may be None (zero)."""
    ops = ops or _CellOps()
    ext = ops.compiled(x, w_ih, w_hh, h0, c0, out, gates, cs, d_out, d_hT, d_cT)
    if ext is not None and x.numel():
        return tuple(ext.lstm_layer_backward(x, w_ih, w_hh, h0, c0, out, gates, cs, d_out, d_hT, d_cT, reverse))
    T, B, I = x.shape
    H = h0.shape[-1]
    # the state each step started from
    first, shift = (T - 1, 1) if reverse else (0, -1)
    h_prev, c_prev = torch.roll(out, -shift, 0), torch.roll(cs, -shift, 0)
    h_prev[first], c_prev[first] = h0, c0
    dh = torch.zeros_like(h0) if d_hT is None else d_hT.to(h0.dtype)
    dc = torch.zeros_like(c0) if d_cT is None else d_cT.to(c0.dtype)
    tc = ops.tanh(cs)
    dgates = torch.empty_like(gates)
    w_hh = w_hh.to(gates.dtype)
    for t in reversed(_steps(T, reverse)):
        if d_out is not None:
            dh = dh + d_out[t]
        i, f, g, o = gates[t].split(H, 1)
        do = ops.mul(dh, tc[t])
        dc = dc + ops.tanh_backward(ops.mul(dh, o), tc[t])
        di, dg, df = ops.mul(dc, g), ops.mul(dc, i), ops.mul(dc, c_prev[t])
        dc = ops.mul(dc, f)
        dgates[t] = torch.cat([ops.sigmoid_backward(di, i), ops.sigmoid_backward(df, f),
                               ops.tanh_backward(dg, g), ops.sigmoid_backward(do, o)], 1)
        dh = ops.mm(dgates[t], w_hh)
    dg2 = dgates.reshape(T * B, 4 * H)
    dx = ops.mm(dg2, w_ih.to(dg2.dtype)).reshape(T, B, I)
    dw_ih = ops.mm(dg2.t(), x.reshape(T * B, I))
    dw_hh = ops.mm(dg2.t(), h_prev.reshape(T * B, H))
    return dx, dw_ih, dw_hh, dg2.sum(0), dh, dc


def _check_lstm(mode, batch_sizes):
    if mode != _MKLDNN_LSTM:
        raise UnsupportedOpError(f"pamtorch.mode: aten.mkldnn_rnn_layer with mode={mode} has no PA "
                                 f"implementation (only the LSTM, mode {_MKLDNN_LSTM}, reaches it)")
    if len(batch_sizes):
        raise UnsupportedOpError("pamtorch.mode: aten.mkldnn_rnn_layer on a packed sequence has no PA "
                                 "implementation (nn.LSTM runs packed sequences through lstm_cell)")


@implements([aten.mkldnn_rnn_layer], "matmul")
def _pa_mkldnn_rnn_layer(func, args, kwargs, cfg):
    """(output, hy, cy, workspace): the workspace holds the gates and cell states for the
    backward (empty when no gradient can be asked for)."""
    x, w_ih, w_hh, b_ih, b_hh, hx, cx, reverse, batch_sizes, mode, hidden, _, has_biases = args[:13]
    train = args[15] if len(args) > 15 else kwargs["train"]
    _check_lstm(mode, batch_sizes)
    out, h, c, gates, cs = lstm_layer_forward(x, w_ih, w_hh, b_ih if has_biases else None,
                                              b_hh if has_biases else None, hx, cx, reverse)
    keep = train or torch.is_grad_enabled()
    ws = torch.cat([gates.reshape(-1), cs.reshape(-1)]) if keep else x.new_empty(0)
    return out, h, c, ws


@implements([aten.mkldnn_rnn_layer_backward], "matmul")
def _pa_mkldnn_rnn_layer_backward(func, args, kwargs, cfg):
    """(dx, dW_ih, dW_hh, db_ih, db_hh, dhx, dcx), recomputing the forward when the
    workspace is not the one :func:`_pa_mkldnn_rnn_layer` kept."""
    (x, w_ih, w_hh, b_ih, b_hh, hx, cx, out, _, _, d_out, d_hy, d_cy, reverse, mode, hidden, _,
     has_biases, _, _, batch_sizes, _, ws) = args[:23]
    _check_lstm(mode, batch_sizes)
    ops = _CellOps()
    T, B, _ = x.shape
    n_gates = T * B * 4 * hidden
    if ws.dtype == x.dtype and ws.numel() == n_gates + T * B * hidden:
        gates, cs = ws[:n_gates].reshape(T, B, 4 * hidden), ws[n_gates:].reshape(T, B, hidden)
    else:
        out, _, _, gates, cs = lstm_layer_forward(x, w_ih, w_hh, b_ih if has_biases else None,
                                                  b_hh if has_biases else None, hx, cx, reverse, ops)
    dx, dw_ih, dw_hh, db, dh, dc = lstm_layer_backward(x, w_ih, w_hh, hx, cx, out, gates, cs, d_out,
                                                       d_hy, d_cy, reverse, ops)
    if has_biases:
        db_ih, db_hh = db.to(b_ih.dtype), db.to(b_hh.dtype)
    else:   # the driver passes zero placeholders that need no gradient
        db_ih, db_hh = torch.zeros_like(b_ih), torch.zeros_like(b_hh)
    return (dx.to(x.dtype), dw_ih.to(w_ih.dtype), dw_hh.to(w_hh.dtype), db_ih, db_hh,
            dh.to(hx.dtype), dc.to(cx.dtype))
