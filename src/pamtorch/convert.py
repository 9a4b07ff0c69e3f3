"""Convert a stock PyTorch model to piecewise affine modules, in place.

    model = pamtorch.convert(model, Config.paper())
    model = pamtorch.convert(model, module_filter_fn=lambda mod, fqn: fqn != "head")
"""
from __future__ import annotations

from typing import Callable, Optional

import torch.nn.functional as F
from torch import nn

from .config import Config
from .nn import modules as M

__all__ = ["convert", "SWAPS"]

# stock class -> PA class. Exact types only: a user subclass may override forward, which
# the class swap would discard. NonDynamicallyQuantizableLinear (the out_proj of
# nn.MultiheadAttention) is only reached through its attention module.
SWAPS = {
    nn.Linear: M.Linear,
    nn.Conv2d: M.Conv2d,
    nn.LayerNorm: M.LayerNorm,
    nn.RMSNorm: M.RMSNorm,
    nn.MultiheadAttention: M.MultiheadAttention,
    nn.GELU: M.GELU,
    nn.Dropout: M.Dropout,
    nn.Softmax: M.Softmax,
}

_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def convert(model: nn.Module, config: Optional[Config] = None, *,
            module_filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> nn.Module:
    """Swap the supported modules of ``model`` for their PA versions, in place; returns
    ``model`` (the root is converted too when it is itself a supported module).

    Swapped (exact types): ``nn.Linear`` → :class:`pamtorch.nn.Linear`, ``nn.Conv2d``,
    ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.MultiheadAttention`` (projections, attention
    products, softmax, masks and dropout all PA; its ``out_proj`` is used through it),
    ``nn.GELU``, ``nn.Dropout``, ``nn.Softmax``. Modules are converted by swapping their
    class, so the Parameter objects, buffers, hooks and ``state_dict`` keys stay, and a
    converted model loads a stock checkpoint and vice versa. Each converted module uses
    ``config`` (default ``Config.paper()``) for its kind; a kind with ``pa=False`` keeps
    the torch forward.

    ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``: their submodules are
    converted as above; a functional ``F.gelu`` activation (``activation="gelu"``) is
    replaced by a :class:`pamtorch.nn.GELU` module (no parameters, so the ``state_dict``
    is unchanged), and ``activation_relu_or_gelu`` is set to 0 so the eval/no-grad fast
    path (``torch._transformer_encoder_layer_fwd``, which would bypass every module) is
    never taken. ``F.relu`` activations stay (ReLU has no multiplication).

    ``module_filter_fn(module, fqn) -> bool``: a module is converted only where it returns
    True (``fqn`` is its dotted name, "" for the root). Children of a skipped module are
    still visited, except those of ``nn.MultiheadAttention`` (whose ``out_proj`` is read
    by the attention and never called as a module).
    """
    config = Config.paper() if config is None else config
    if not isinstance(config, Config):
        raise TypeError(f"pamtorch.convert: config must be a pamtorch Config, got {type(config).__name__}")

    def wanted(mod, fqn):
        return module_filter_fn is None or bool(module_filter_fn(mod, fqn))

    def visit(mod: nn.Module, fqn: str):
        if isinstance(mod, nn.MultiheadAttention):
            if type(mod) in SWAPS and wanted(mod, fqn):
                SWAPS[type(mod)].from_module(mod, config)
            return
        for name, child in mod.named_children():
            visit(child, f"{fqn}.{name}" if fqn else name)
        if isinstance(mod, _LAYERS) and wanted(mod, fqn):
            if mod.activation is F.gelu and wanted(mod, f"{fqn}.activation" if fqn else "activation"):
                mod.activation = M.GELU(config=config)
            if isinstance(mod, nn.TransformerEncoderLayer):
                mod.activation_relu_or_gelu = 0   # never take the fused fast path
        cls = SWAPS.get(type(mod))
        if cls is not None and wanted(mod, fqn):
            cls.from_module(mod, config)

    visit(model, "")
    return model
