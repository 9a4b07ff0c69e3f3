"""PA optimizers: torch's own AdamW, Adam and SGD with every tensor operation of the step
run through the PA op table, and ``clip_grad_norm_``.

Each class is the torch optimizer of the same name (same arguments, same state_dict)
whose ``step`` runs under ``pamtorch.mode(config)``: the moment updates (``lerp_``,
``mul_``, ``addcmul_``), ``sqrt``, the division by the denominator, eps, the weight decay
and the learning-rate scaling are PAM/PAD/PA-sqrt. The scalars computed in Python (the
schedule, Adam's bias corrections 1 - beta^t and their square root) are exact Python
floats, as in the paper; applying them to tensors is PA. A product with a Python number
near 1 (1 - lr·wd, β2, a momentum) runs as ``x ± PAM(x, |c| - 1)``, so the decay and the
β's forgetting applied are 0.89-1.0 times the intended ones (docs/training.md, "PA AdamW").
A stock ``torch.optim.AdamW`` stepped under ``pamtorch.mode`` with the same config gives
the same result bit for bit, since it is the same code routed through the same table in
the same op kind (``optimizer``).

With ``foreach=True`` or ``fused=True`` the ``_foreach_*`` ops or torch's fused kernels
are routed too; for SGD, Adam and AdamW all three paths give the same bits, as torch runs
the same ops in the same order on each.
"""
from __future__ import annotations

import torch

from ..config import Config
from ..mode import mode
from ..ops.optim import fused_adam_groups, restore_groups
from ..ops.table import OPTIMIZER_STEP

__all__ = ["AdamW", "Adam", "SGD", "clip_grad_norm_"]


def _pa_step(cls):
    class PA(cls):
        __doc__ = f"``torch.optim.{cls.__name__}`` whose step is multiplication-free. Takes the same " \
                  "arguments plus ``config`` (a ``pamtorch.Config``; the ``optimizer`` kind applies)."

        def __init__(self, params, *args, config: Config | None = None, **kwargs):
            super().__init__(params, *args, **kwargs)
            self.pa_config = config or Config.paper()

        def step(self, closure=None):
            # torch runs the step hooks (which tell the mode an optimizer step runs) before
            # this method enters the mode, and the parent's step has hooks only once a stock
            # instance was built: count the step here, so the optimizer kind always applies
            OPTIMIZER_STEP[0] += 1
            try:
                with mode(self.pa_config):
                    # Adam/AdamW on torch's default path: the fused path for this step (the
                    # compiled PA update, the same bits), as the mode's step hook does for a
                    # stock instance; here, because those hooks fired before this mode was entered
                    groups = fused_adam_groups(self, self.pa_config)
                    try:
                        return super().step(closure)
                    finally:
                        restore_groups(groups)
            finally:
                OPTIMIZER_STEP[0] -= 1

    PA.__name__ = PA.__qualname__ = cls.__name__
    return PA


AdamW = _pa_step(torch.optim.AdamW)
Adam = _pa_step(torch.optim.Adam)
SGD = _pa_step(torch.optim.SGD)


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, *, config: Config | None = None,
                    error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` with the norm (PA squares, sum, PA sqrt), the
    clip coefficient (PAD) and the scaling of the gradients (PAM) all piecewise affine."""
    if norm_type != 2.0:
        raise ValueError(f"pamtorch.clip_grad_norm_: only norm_type=2.0 is piecewise affine, got {norm_type}")
    with mode(config or Config.paper()):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type,
                                              error_if_nonfinite=error_if_nonfinite, foreach=foreach)
