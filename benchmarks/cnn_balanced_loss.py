"""The experiment that preceded the loss kind's ``derivative="balanced"`` (``--derivative
loss=balanced``, ``pamtorch.nn.functional.balance_rows``), which computes the same: ``pamtorch
train`` with the PA log-softmax's approx derivative made to sum to zero along each row, to test
whether the rows' imbalance is what destabilises the CNN runs of RESULTS.md ("CNN"). Kept
because RESULTS.md's ``matmul+loss-balanced`` row was run with it.

    python benchmarks/cnn_balanced_loss.py train cnn ...   # pamtorch train's arguments

The approx derivative ``dx = dy − pa_exp(y) ⊙̂ Σdy`` (pamtorch.nn.functional.log_softmax_backward)
is kept, and each row's sum r = Σ dx (exactly 0 in exact arithmetic whenever Σ dy is what
the cross entropy gives) is subtracted from the entry of the row's largest y, where the
softmax is largest: additions only, so the step stays multiplication-free.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import torch  # noqa: E402

import pamtorch.nn.functional as PF  # noqa: E402
from pamtorch.cli import main  # noqa: E402

_approx = PF.log_softmax_backward


def balanced_log_softmax_backward(y: torch.Tensor, dy: torch.Tensor, dim: int) -> torch.Tensor:
    dx = _approx(y, dy, dim)
    if dx.numel() == 0:
        return dx
    residual = dx.sum(dim, keepdim=True)
    return dx.scatter_add(dim, y.argmax(dim, keepdim=True), -residual)


PF.log_softmax_backward = balanced_log_softmax_backward

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
