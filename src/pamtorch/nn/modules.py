"""PA drop-in modules: subclasses of the torch modules with the same parameters and
``state_dict`` keys whose forward calls :mod:`pamtorch.nn.functional`.

Each takes ``config`` (a :class:`pamtorch.config.Config`, default ``Config.paper()``) and
uses one op kind's settings: ``matmul`` for Linear, Conv2d and the attention products,
``norm`` for LayerNorm and RMSNorm, ``nonlinear`` for GELU, ``softmax`` for Softmax (and
the attention softmax), ``elementwise`` for Dropout (the PAM by ``1/(1-p)``) and
``loss`` for the losses. Where that kind has ``pa=False`` the stock torch forward runs.
``offset`` and ``mantissa_bits`` are supported for the matmul kind only
(NotImplementedError elsewhere; the mode rounds every routed op, see docs/numerics.md).

``from_module(mod, config)`` turns a stock module into the PA one in place (its class is
swapped; the Parameter objects, buffers, hooks and state_dict keys stay), which is what
:func:`pamtorch.convert` uses.
"""
from __future__ import annotations

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
        for name in ("offset", "mantissa_bits"):
            if getattr(self.op, name) is not None:
                raise NotImplementedError(f"pamtorch.nn.{type(self).__name__}: {name} is implemented "
                                          f"for the 'matmul' kind's modules only, not '{self._pa_kind}' "
                                          "(pamtorch.mode applies it to every op)")

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
        return PF.linear(x, self.weight, self.bias, derivative=op.derivative, offset=op.offset,
                         mantissa_bits=op.mantissa_bits)


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
                         self.groups, derivative=op.derivative, offset=op.offset,
                         mantissa_bits=op.mantissa_bits)


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
    """``nn.CrossEntropyLoss`` as the PA cross entropy (loss kind): the same value, bit
    for bit, as ``F.cross_entropy`` under ``pamtorch.mode`` (see
    :func:`pamtorch.nn.functional.cross_entropy`). ``smoothing="fairseq"`` spreads
    ``label_smoothing`` ε over the other C-1 classes (``(1-ε-ε/(C-1)) ⊙̂ nll +
    ε/(C-1) ⊙̂ smooth``) instead of torch's ``(1-ε) ⊙̂ nll + ε/C ⊙̂ smooth``."""

    _pa_kind = "loss"
    _torch_base = nn.CrossEntropyLoss
    smoothing = "torch"   # what a converted stock module has

    def __init__(self, *args, config=None, smoothing: str = "torch", **kwargs):
        super().__init__(*args, **kwargs)
        PF._smoothing_weights(0.0, 2, smoothing)   # a bad name fails here, not at the first step
        self.smoothing = smoothing
        self._init_config(config)

    def forward(self, input, target):
        op = self.op
        if not op.pa and self.smoothing == "torch":
            return nn.CrossEntropyLoss.forward(self, input, target)
        self._no_offset()
        if not op.pa:
            raise NotImplementedError("pamtorch.nn.CrossEntropyLoss: smoothing='fairseq' is a PA "
                                      "loss; this config leaves the loss kind exact (pa=False)")
        return PF.cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                                self.label_smoothing, smoothing=self.smoothing, derivative=op.derivative)


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


class MultiheadAttention(PAModule, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with PAM projections and attention products (matmul kind)
    and the PA softmax (softmax kind); dropout on the weights by PAM (elementwise kind).
    Its forward is :func:`pamtorch.nn.functional.multi_head_attention_forward`, the
    function the mode routes the stock module's ``F.multi_head_attention_forward`` to, so
    this module, a converted ``nn.MultiheadAttention`` and the stock one under
    ``pamtorch.mode`` compute the same values and gradients, bit for bit, with one PAM by
    ``1/√(head dim)`` on the queries.

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
        batched = query.dim() == 3
        if attn_mask is None and is_causal:
            seq = 0 if batched and not self.batch_first else -2
            attn_mask = torch.ones(query.shape[seq], key.shape[seq], dtype=torch.bool,
                                   device=query.device).triu(1)
        if self.batch_first and batched:   # keep torch's identities: they pick the packing
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = PF.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight,
            self.out_proj.bias, training=self.training, key_padding_mask=key_padding_mask,
            need_weights=need_weights, attn_mask=attn_mask,
            use_separate_proj_weight=not self._qkv_same_embed_dim, q_proj_weight=self.q_proj_weight,
            k_proj_weight=self.k_proj_weight, v_proj_weight=self.v_proj_weight,
            average_attn_weights=average_attn_weights, is_causal=is_causal, config=cfg)
        if self.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights
