"""PA drop-in modules: subclasses of the torch modules with the same parameters and
``state_dict`` keys whose forward calls :mod:`pamtorch.nn.functional`.

Each takes ``config`` (a :class:`pamtorch.config.Config`, default ``Config.paper()``) and
uses one op kind's settings: ``matmul`` for Linear, Conv2d and the attention products,
``norm`` for LayerNorm and RMSNorm, ``nonlinear`` for GELU, ``softmax`` for Softmax (and
the attention softmax), ``elementwise`` for Dropout (the PAM by ``1/(1-p)``) and
``loss`` for the losses. Where that kind has ``pa=False`` the stock torch forward runs.
``offset`` is supported for the matmul kind only (NotImplementedError elsewhere).

``from_module(mod, config)`` turns a stock module into the PA one in place (its class is
swapped; the Parameter objects, buffers, hooks and state_dict keys stay), which is what
:func:`pamtorch.convert` uses.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from . import functional as PF

__all__ = ["Linear", "Conv2d", "LayerNorm", "RMSNorm", "GELU", "Dropout", "Softmax",
           "MultiheadAttention", "CrossEntropyLoss", "MSELoss", "PAModule"]


class PAModule:
    """Mixin: the ``config`` attribute, the op kind used, and in-place conversion."""

    _pa_kind = "matmul"
    _torch_base: type = nn.Module

    def _init_config(self, config: Optional[Config]):
        if config is not None and not isinstance(config, Config):
            raise TypeError(f"pamtorch.nn.{type(self).__name__}: config must be a pamtorch Config, "
                            f"got {type(config).__name__}")
        self.config = Config.paper() if config is None else config

    @property
    def op(self):
        """The OpConfig of this module's kind."""
        return self.config.kind(self._pa_kind)

    def _no_offset(self):
        if self.op.offset is not None:
            raise NotImplementedError(f"pamtorch.nn.{type(self).__name__}: a PAM offset is "
                                      f"implemented for the 'matmul' kind only, not '{self._pa_kind}'")

    @classmethod
    def from_module(cls, mod: nn.Module, config: Optional[Config] = None):
        """Make ``mod`` (an instance of the torch base class) this PA class, in place."""
        if not isinstance(mod, cls._torch_base):
            raise TypeError(f"pamtorch.nn.{cls.__name__}.from_module: expected a "
                            f"{cls._torch_base.__name__}, got {type(mod).__name__}")
        mod.__class__ = cls
        mod._init_config(config)
        return mod

    def extra_repr(self) -> str:
        base = super().extra_repr()
        op = self.op
        pa = f"pa={op.pa}, derivative={op.derivative!r}" + (f", offset={op.offset}" if op.offset else "")
        return f"{base}, {pa}" if base else pa


class Linear(PAModule, nn.Linear):
    """``nn.Linear`` with a PAM product (matmul kind)."""

    _torch_base = nn.Linear

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, config=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_config(config)

    def forward(self, x):
        op = self.op
        if not op.pa:
            return F.linear(x, self.weight, self.bias)
        return PF.linear(x, self.weight, self.bias, derivative=op.derivative, offset=op.offset)


class Conv2d(PAModule, nn.Conv2d):
    """``nn.Conv2d`` with PAM products (matmul kind); non-zero padding modes pad first."""

    _torch_base = nn.Conv2d

    def __init__(self, *args, config=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_config(config)

    def forward(self, x):
        op = self.op
        if not op.pa:
            return nn.Conv2d.forward(self, x)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return PF.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation,
                         self.groups, derivative=op.derivative, offset=op.offset)


class LayerNorm(PAModule, nn.LayerNorm):
    """``nn.LayerNorm`` computed with PA ops (norm kind)."""

    _pa_kind = "norm"
    _torch_base = nn.LayerNorm

    def __init__(self, *args, config=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_config(config)

    def forward(self, x):
        op = self.op
        if not op.pa:
            return nn.LayerNorm.forward(self, x)
        self._no_offset()
        return PF.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps,
                             derivative=op.derivative)


class RMSNorm(PAModule, nn.RMSNorm):
    """``nn.RMSNorm`` computed with PA ops (norm kind)."""

    _pa_kind = "norm"
    _torch_base = nn.RMSNorm

    def __init__(self, *args, config=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_config(config)

    def forward(self, x):
        op = self.op
        if not op.pa:
            return nn.RMSNorm.forward(self, x)
        self._no_offset()
        return PF.rms_norm(x, self.normalized_shape, self.weight, self.eps, derivative=op.derivative)


class GELU(PAModule, nn.GELU):
    """``nn.GELU`` as the PA GELU (nonlinear kind); ``approximate`` is kept but the PA
    function is the same for both settings (see ``functional.gelu_forward``)."""

    _pa_kind = "nonlinear"
    _torch_base = nn.GELU

    def __init__(self, approximate: str = "none", *, config=None):
        super().__init__(approximate)
        self._init_config(config)

    def forward(self, x):
        op = self.op
        if not op.pa:
            return nn.GELU.forward(self, x)
        self._no_offset()
        return PF.gelu(x, derivative=op.derivative)


class Dropout(PAModule, nn.Dropout):
    """``nn.Dropout`` with the kept values scaled by PAM (elementwise kind)."""

    _pa_kind = "elementwise"
    _torch_base = nn.Dropout

    def __init__(self, p: float = 0.5, inplace: bool = False, *, config=None):
        super().__init__(p, inplace)
        self._init_config(config)

    def forward(self, x):
        op = self.op
        if not op.pa:
            return nn.Dropout.forward(self, x)
        self._no_offset()
        return PF.dropout(x, self.p, self.training, derivative=op.derivative)


class Softmax(PAModule, nn.Softmax):
    """``nn.Softmax`` as the PA softmax (softmax kind)."""

    _pa_kind = "softmax"
    _torch_base = nn.Softmax

    def __init__(self, dim: Optional[int] = None, *, config=None):
        super().__init__(dim)
        self._init_config(config)

    def forward(self, x):
        op = self.op
        if not op.pa:
            return nn.Softmax.forward(self, x)
        self._no_offset()
        dim = self.dim
        if dim is None:
            dim = F._get_softmax_dim("softmax", x.dim(), 3)
        return PF.softmax(x, dim, derivative=op.derivative)


class CrossEntropyLoss(PAModule, nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` as the PA cross entropy (loss kind)."""

    _pa_kind = "loss"
    _torch_base = nn.CrossEntropyLoss

    def __init__(self, *args, config=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_config(config)

    def forward(self, input, target):
        op = self.op
        if not op.pa:
            return nn.CrossEntropyLoss.forward(self, input, target)
        self._no_offset()
        return PF.cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                                self.label_smoothing, derivative=op.derivative)


class MSELoss(PAModule, nn.MSELoss):
    """``nn.MSELoss`` as the PA MSE (loss kind)."""

    _pa_kind = "loss"
    _torch_base = nn.MSELoss

    def __init__(self, *args, config=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_config(config)

    def forward(self, input, target):
        op = self.op
        if not op.pa:
            return nn.MSELoss.forward(self, input, target)
        self._no_offset()
        return PF.mse_loss(input, target, self.reduction, derivative=op.derivative)


def _float_mask(mask, dtype, name):
    """Bool (True = masked out, nn.MultiheadAttention's convention) or float additive mask
    as an additive float mask of ``dtype``."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)
    if not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")
    return mask.to(dtype)


class MultiheadAttention(PAModule, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with PAM projections and attention products (matmul kind)
    and the PA softmax (softmax kind); dropout on the weights by PAM (elementwise kind).

    Same arguments, parameters and ``forward`` signature as torch: ``key_padding_mask``
    and ``attn_mask`` (bool: True = not attended; or additive float; 2-D ``[L, S]`` or 3-D
    ``[N*H, L, S]``), ``is_causal`` (with ``attn_mask=None`` a causal mask is built rather
    than raising as torch does), ``need_weights``/``average_attn_weights`` (head average
    by PA division), ``batch_first``, ``add_bias_kv``, ``add_zero_attn``, separate q/k/v
    projection weights, unbatched inputs. Fully masked rows give zero attention (torch's
    SDPA path gives 0 too; its ``need_weights`` path gives NaN).
    """

    _torch_base = nn.MultiheadAttention

    def __init__(self, *args, config=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_config(config)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        cfg = self.config
        if not (cfg.matmul.pa or cfg.softmax.pa):
            return nn.MultiheadAttention.forward(self, query, key, value, key_padding_mask,
                                                 need_weights, attn_mask, average_attn_weights,
                                                 is_causal)
        mop = cfg.matmul
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        N, L, E = query.shape
        H, D = self.num_heads, self.head_dim
        if E != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {E}")

        def lin(x, w, b):
            if not mop.pa:
                return F.linear(x, w, b)
            return PF.linear(x, w, b, derivative=mop.derivative, offset=mop.offset)

        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq = bk = bv = None
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.chunk(3)
        q, k, v = lin(query, wq, bq), lin(key, wk, bk), lin(value, wv, bv)

        dtype = q.dtype
        if attn_mask is None and is_causal:
            S0 = k.shape[1]
            attn_mask = torch.ones(L, S0, dtype=torch.bool, device=q.device).triu(1)
        amask = _float_mask(attn_mask, dtype, "attn_mask")
        kpm = _float_mask(key_padding_mask, dtype, "key_padding_mask")

        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.reshape(1, 1, E).expand(N, 1, E)], 1)
            v = torch.cat([v, self.bias_v.reshape(1, 1, E).expand(N, 1, E)], 1)
            amask = None if amask is None else F.pad(amask, (0, 1))
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
        S = k.shape[1]
        q = q.reshape(N, L, H, D).transpose(1, 2)
        k = k.reshape(N, S, H, D).transpose(1, 2)
        v = v.reshape(N, S, H, D).transpose(1, 2)
        if self.add_zero_attn:
            z = torch.zeros(N, H, 1, D, dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, z], 2), torch.cat([v, z], 2)
            amask = None if amask is None else F.pad(amask, (0, 1))
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
            S += 1

        mask = None
        if amask is not None:
            if amask.dim() == 2:
                if tuple(amask.shape) != (L, S):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {tuple(amask.shape)}, "
                                       f"but should be {(L, S)}.")
                mask = amask.reshape(1, 1, L, S)
            elif amask.dim() == 3:
                if tuple(amask.shape) != (N * H, L, S):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {tuple(amask.shape)}, "
                                       f"but should be {(N * H, L, S)}.")
                mask = amask.reshape(N, H, L, S)
            else:
                raise RuntimeError(f"attn_mask's dimension {amask.dim()} is not supported")
        if kpm is not None:
            kpm = kpm.reshape(N, 1, 1, S)
            mask = kpm if mask is None else mask + kpm

        p = self.dropout if self.training else 0.0
        out, w = PF.attention_forward(q, k, v, mask, p, None, config=cfg)
        out = out.transpose(1, 2).reshape(N, L, E)
        out = lin(out, self.out_proj.weight, self.out_proj.bias)
        if batched and not self.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(0)
        weights = None
        if need_weights:
            if average_attn_weights:
                wsum = w.sum(1)
                weights = (PF._ag.div(wsum, float(H), derivative=cfg.softmax.derivative)
                           if cfg.softmax.pa else wsum / H)
            else:
                weights = w
            if not batched:
                weights = weights.squeeze(0)
        return out, weights
