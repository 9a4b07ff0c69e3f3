"""Convert a stock PyTorch model to piecewise affine modules, in place.

    model = pamtorch.convert(model, Config.paper())
    model = pamtorch.convert(model, module_filter_fn=lambda mod, fqn: fqn != "head")
    print(model.pamtorch_conversion)          # what was swapped, what was left and why

Each module of a known family (found by ``isinstance``, or by known third-party class)
becomes a **mode region**: it keeps its own forward, which runs inside
``pamtorch.mode(config)``, and its backward runs inside the mode too. So a converted
module computes exactly what the stock module computes under the mode: the same op table
(:mod:`pamtorch.ops`), bit for bit, forward and backward, with the config's derivative
kinds. (The hand-written modules of :mod:`pamtorch.nn` are for writing PA models directly.)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from .config import Config
from .mode import mode

__all__ = ["convert", "make_region", "ConvertedModule", "REGION_FAMILIES", "ConversionReport"]

log = logging.getLogger("pamtorch.convert")

# module families (isinstance) that become mode regions
REGION_FAMILIES = (
    nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase,
    nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.LocalResponseNorm, nn.RNNBase, nn.RNNCellBase,
    nn.MultiheadAttention, nn.EmbeddingBag,
    nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GLU, nn.LogSigmoid, nn.PReLU, nn.Softmax,
    nn.LogSoftmax, nn.Softmin, nn.Tanhshrink, nn.Softsign,
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd, nn.Upsample,
    nn.modules.dropout._DropoutNd, nn.modules.loss._Loss,
)

# third-party classes by (module prefix, class-name test): HF GPT-2's Conv1D, the RMS and
# layer norms of HF and timm models, HF activation modules
_THIRD_PARTY = (
    ("transformers.", lambda n: n == "Conv1D"),
    ("transformers.", lambda n: n.endswith(("RMSNorm", "LayerNorm", "LayerNorm2d"))),
    ("transformers.activations", lambda n: True),
    ("timm.", lambda n: n.endswith(("RMSNorm", "LayerNorm", "LayerNorm2d", "GroupNorm", "GroupNorm1"))),
)

_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


@dataclass
class ConversionReport:
    """``converted[fqn]``: the PA class or "mode region" a module became; ``left[fqn]``: why a
    module that holds parameters of its own, or a known family, was left as it is."""

    converted: dict = field(default_factory=dict)
    left: dict = field(default_factory=dict)

    def __str__(self) -> str:
        rows = [f"converted {len(self.converted)} modules, left {len(self.left)}"]
        rows += [f"  left {fqn or '(root)'}: {why}" for fqn, why in self.left.items()]
        return "\n".join(rows)


def _third_party(mod: nn.Module) -> bool:
    cls = type(mod)
    return any(cls.__module__.startswith(prefix) and test(cls.__name__)
               for prefix, test in _THIRD_PARTY)


class _Region(torch.autograd.Function):
    """``run(inputs)`` under the PA mode, with its backward under the PA mode too.

    The inner forward builds its own graph (grad enabled, on detached inputs and the
    module's own parameters); backward differentiates that graph with
    ``torch.autograd.grad`` inside the mode, so the routed backward ops are PA as well."""

    @staticmethod
    def forward(ctx, run, config, n_in, *tensors):
        # one detached tensor per distinct argument, so `query is key is value` stays true
        # inside (self-attention packs its projections then); a repeat gets no gradient of
        # its own, the first position carries it
        first: dict = {}
        inputs, ctx.repeat = [], []
        for t in tensors[:n_in]:
            ctx.repeat.append(id(t) in first)
            if id(t) not in first:
                first[id(t)] = t.detach().requires_grad_(t.requires_grad)
            inputs.append(first[id(t)])
        with torch.enable_grad():
            outs = run(inputs)
        ctx.outs, ctx.wrt, ctx.config = outs, list(inputs) + list(tensors[n_in:]), config
        res = tuple(o.detach() for o in outs)
        ctx.mark_non_differentiable(*[o for o in res if not (o.is_floating_point() or o.is_complex())])
        return res

    @staticmethod
    def backward(ctx, *grads):
        pairs = [(o, g) for o, g in zip(ctx.outs, grads) if o.requires_grad and g is not None]
        repeat = ctx.repeat + [False] * (len(ctx.wrt) - len(ctx.repeat))
        wanted = [t.requires_grad and not r for t, r in zip(ctx.wrt, repeat)]
        wrt = [t for t, w in zip(ctx.wrt, wanted) if w]
        got = [None] * len(wrt)
        if pairs and wrt:
            with mode(ctx.config):
                got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                          allow_unused=True)
        it = iter(got)
        return (None, None, None, *[next(it) if w else None for w in wanted])


class ConvertedModule:
    """Mixin of the mode-region classes: the original forward, run by :class:`_Region`."""

    _pa_base: type = nn.Module

    def forward(self, *args, **kwargs):
        base, config = self._pa_base.forward, self.pamtorch_config
        params = [p for p in self.parameters() if p.requires_grad]
        flat, spec = pytree.tree_flatten((args, kwargs))
        where = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
        if not torch.is_grad_enabled() or not (params or any(flat[i].requires_grad for i in where)):
            with mode(config):
                return base(self, *args, **kwargs)
        box = {}

        def run(tensors):
            leaves = list(flat)
            for i, t in zip(where, tensors):
                leaves[i] = t
            a, k = pytree.tree_unflatten(leaves, spec)
            with mode(config):
                out = base(self, *a, **k)
            box["flat"], box["spec"] = pytree.tree_flatten(out)
            return [x for x in box["flat"] if isinstance(x, torch.Tensor)]

        outs = iter(_Region.apply(run, config, len(where), *[flat[i] for i in where], *params))
        leaves = [next(outs) if isinstance(x, torch.Tensor) else x for x in box["flat"]]
        return pytree.tree_unflatten(leaves, box["spec"])

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return f"{base}, pamtorch mode region" if base else "pamtorch mode region"


_REGION_CLASSES: dict = {}


def _region_class(cls: type) -> type:
    if cls not in _REGION_CLASSES:
        _REGION_CLASSES[cls] = type(f"PA{cls.__name__}", (ConvertedModule, cls),
                                    {"_pa_base": cls, "__module__": __name__})
    return _REGION_CLASSES[cls]


def make_region(mod: nn.Module, config: Config) -> nn.Module:
    """Make ``mod`` a mode region in place: its own forward, run under ``pamtorch.mode(config)``
    forward and backward (class swapped; parameters, buffers, hooks and state_dict stay)."""
    if isinstance(mod, ConvertedModule):
        mod.pamtorch_config = config
        return mod
    mod.__class__ = _region_class(type(mod))
    mod.pamtorch_config = config
    return mod


def convert(model: nn.Module, config: Optional[Config] = None, *,
            module_filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> nn.Module:
    """Make the modules of ``model`` piecewise affine, in place; returns ``model`` (the root
    is converted too when it is itself a supported module), with a :class:`ConversionReport`
    as ``model.pamtorch_conversion`` (also logged at INFO on the ``pamtorch.convert`` logger).

    Converted (by ``isinstance``, see ``REGION_FAMILIES``): linear and bilinear layers,
    convolutions of any dimension and transposed, layer/RMS/batch/instance/group/local
    response norms, ``nn.MultiheadAttention`` (its ``out_proj`` is used through it), RNNs
    and RNN cells, embedding bags, activations, softmax, pooling and upsampling, dropout,
    losses; and known third-party classes: HF ``Conv1D`` (GPT-2's projections), HF and timm
    RMS/layer norm classes, HF activation modules. Each becomes a mode region that runs
    its own forward, and its backward, under ``pamtorch.mode(config)`` (default
    ``Config.paper()``), so a kind with ``pa=False`` keeps torch's arithmetic.

    The module's class is swapped, so the Parameter objects, buffers, hooks and
    ``state_dict`` keys stay, and a converted model loads a stock checkpoint and vice
    versa. A converted module is not descended into.

    ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``: their submodules are
    converted as above; a functional ``F.gelu`` activation (``activation="gelu"``) is
    replaced by a converted ``nn.GELU`` module (no parameters, so the ``state_dict``
    is unchanged), and ``activation_relu_or_gelu`` is set to 0 so the eval/no-grad fast
    path (``torch._transformer_encoder_layer_fwd``, which would bypass every module) is
    never taken. ``F.relu`` activations stay (ReLU has no multiplication).

    ``module_filter_fn(module, fqn) -> bool``: a module is converted only where it returns
    True (``fqn`` is its dotted name, "" for the root). Children of a skipped module are
    still visited, except those of ``nn.MultiheadAttention`` (whose ``out_proj`` is read
    by the attention and never called as a module).

    Left alone, and listed in the report with the reason: modules the filter refused, and
    modules of unknown classes that hold parameters of their own (their arithmetic runs
    exact unless the model also runs under ``pamtorch.mode``). Parameter-free modules of
    unknown classes that compute (say ``x * torch.sigmoid(x)`` in a custom forward) cannot
    be told apart from containers: run under ``pamtorch.mode`` to cover them.
    """
    config = Config.paper() if config is None else config
    if not isinstance(config, Config):
        raise TypeError(f"pamtorch.convert: config must be a pamtorch Config, got {type(config).__name__}")
    report = ConversionReport()

    def wanted(mod, fqn):
        return module_filter_fn is None or bool(module_filter_fn(mod, fqn))

    def visit(mod: nn.Module, fqn: str):
        family = isinstance(mod, REGION_FAMILIES) or _third_party(mod) or isinstance(mod, ConvertedModule)
        if family and wanted(mod, fqn):
            make_region(mod, config)
            report.converted[fqn] = type(mod).__name__
            return
        if isinstance(mod, nn.MultiheadAttention):
            report.left[fqn] = "module_filter_fn returned False"
            return
        for name, child in mod.named_children():
            visit(child, f"{fqn}.{name}" if fqn else name)
        if isinstance(mod, _LAYERS) and wanted(mod, fqn):
            if mod.activation is F.gelu and wanted(mod, f"{fqn}.activation" if fqn else "activation"):
                mod.activation = make_region(nn.GELU(), config)
            if isinstance(mod, nn.TransformerEncoderLayer):
                mod.activation_relu_or_gelu = 0   # never take the fused fast path
        if family:
            report.left[fqn] = "module_filter_fn returned False"
        elif any(p is not None for p in mod._parameters.values()):
            report.left[fqn] = (f"{type(mod).__module__}.{type(mod).__qualname__} is not a known module "
                                "family and has parameters of its own; its forward runs exact unless "
                                "under pamtorch.mode")

    visit(model, "")
    model.pamtorch_conversion = report
    if report.left:
        log.info("pamtorch.convert: %s", report)
    return model
