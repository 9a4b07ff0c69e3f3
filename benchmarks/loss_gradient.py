"""How far the PA cross entropy's gradient is from the exact one, per logit scale.

    python benchmarks/loss_gradient.py [--rows 4096] [--classes 10]

For N(0, scale²) logits and random targets, the mean cross entropy and its gradient with
respect to the logits, exact (stock PyTorch) and under ``pamtorch.mode`` with only the loss
kind PA (``Config.ablation("loss")``: log-softmax and NLL, approx derivative, as in
``pam-full``), or with its exact derivative (``--derivative loss=exact``'s). Printed per scale:
the loss both ways, the gradient's relative error ||g_PA - g|| / ||g||, and its rows' sums
times N. The exact gradient's rows sum to 0 (softmax sums to 1); a PA row sum is the share
of the target's unit pull that is not balanced across the classes: every logit of the row
is pushed the same way.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import torch  # noqa: E402

import pamtorch  # noqa: E402


def measure(rows: int, classes: int, scale: float, derivative: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, classes, generator=g) * scale).requires_grad_()
    y = torch.randint(0, classes, (rows,), generator=g)
    exact = torch.nn.functional.cross_entropy(x, y)
    (ge,) = torch.autograd.grad(exact, x)
    with pamtorch.mode(pamtorch.Config.ablation("loss", derivative=derivative)):
        pa = torch.nn.functional.cross_entropy(x, y)
        (gp,) = torch.autograd.grad(pa, x)
    sums = gp.sum(1) * rows
    return {"scale": scale, "derivative": derivative, "loss": exact.item(), "loss_pa": pa.item(),
            "rel_err": ((gp - ge).norm() / ge.norm()).item(), "sum_mean": sums.mean().item(),
            "sum_min": sums.min().item(), "sum_max": sums.max().item(),
            "exact_sum_max": (ge.sum(1) * rows).abs().max().item()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--classes", type=int, default=10)
    args = p.parse_args(argv)
    print(f"{args.rows} rows of {args.classes} classes, N(0, scale²) logits, random targets\n")
    print("| scale | derivative | loss exact | loss PA | gradient relative error | PA row sum × N: mean | min | max | exact: max abs |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for scale in (1.0, 3.0, 10.0, 30.0):
        for d in ("approx", "exact"):
            r = measure(args.rows, args.classes, scale, d)
            print(f"| {scale:g} | {d} | {r['loss']:.4f} | {r['loss_pa']:.4f} | {r['rel_err']:.3f} | "
                  f"{r['sum_mean']:+.3f} | {r['sum_min']:+.3f} | {r['sum_max']:+.3f} | {r['exact_sum_max']:.1e} |")


if __name__ == "__main__":
    main()
