"""How much weight decay, β1 and β2 a PA Adam(W) step applies, against what was asked.

    python benchmarks/optim_fidelity.py            # 2^20 random bit patterns per row
    python benchmarks/optim_fidelity.py --n 65536

Each row applies one form of an optimizer's product with a constant to random float32
bit patterns (random sign, exponent 2^-20..2^4, all 23 mantissa bits random; the
ratios depend only on the mantissas) and prints, as a markdown table, the ratio of the
part that is applied to the part that was asked for, over all patterns (mean, min, max):

- decay: the amount removed from p, ``p - new p``, over ``lr·wd·p``;
- β1, β2: the forgetting rate, the share of the old moment that is replaced, over
  ``1 - β`` (the part a decay or a β changes, so the part an error in it matters for);
  and the weight the new input gets, over ``1 - β``;
- bias correction: the increase ``x / √(1 - β2^t) - x`` over its exact value.

The last column gives the same ratio for the kept factor (``1 - lr·wd``, β,
``1 / √(1 - β2^t)``): a form can keep 0.99999 of p where 0.99995 was asked, which looks
close, and still remove twice the decay. Everything is measured in exact arithmetic on
the float32 values the PA ops produce, before the final rounding of the stored result to
float32 (which every form, exact float32 included, adds: at most 2^-24 / (lr·wd) of the
decay, see docs/training.md).

The forms: "before" is stock torch AdamW under ``pamtorch.mode`` until issue 11 (every
product a PAM); "now" is what it runs since (a product with a Python number 1/2 <= |c| <= 2
inside ``Optimizer.step`` is ``x ± PAM(x, |c| - 1)``); "released" is epfml/pam's fairseq
Adam (``--opt-functional-cfg pam``).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import torch  # noqa: E402

from pamtorch import arith  # noqa: E402


def patterns(n: int, seed: int, signed: bool = True) -> torch.Tensor:
    """n float32 values with random mantissa bits, exponents 2^-20..2^4 and (if signed) sign."""
    g = torch.Generator().manual_seed(seed)
    mant = torch.randint(0, 2 ** 23, (n,), generator=g, dtype=torch.int32)
    exp = torch.randint(127 - 20, 127 + 5, (n,), generator=g, dtype=torch.int32)
    x = ((exp << 23) | mant).view(torch.float32)
    if signed:
        x = torch.where(torch.randint(0, 2, (n,), generator=g, dtype=torch.bool), -x, x)
    return x


def f32(v: float) -> torch.Tensor:
    """A Python float as the float32 operand a PA op receives."""
    return torch.tensor(v, dtype=torch.float32)


def pam(a, b):
    return arith.pam(a, b if isinstance(b, torch.Tensor) else f32(b)).double()


def stats(r: torch.Tensor) -> tuple[float, float, float]:
    return r.mean().item(), r.min().item(), r.max().item()


def rows(n: int):
    """(quantity, setting, form, ratio of the changed part, ratio of the kept factor)."""
    p = patterns(n, 0)
    p64 = p.double()
    for lr in (1e-3, 5e-4):
        for wd in (0.05, 0.01):
            d = lr * wd
            c = 1 - d
            setting = f"lr {lr:g}, wd {wd:g}"
            for form, new in [
                ("p · (1 − lr·wd), exact float32", p64 * f32(c).double()),
                ("PAM(p, 1 − lr·wd): before", pam(p, c)),
                ("p − PAM(p, lr·wd): released, now", p64 - pam(p, d)),
            ]:
                yield "decay", setting, form, (p64 - new) / (d * p64), new / (c * p64)

    m, g = patterns(n, 1), patterns(n, 2)
    m64, g64 = m.double(), g.double()
    b1 = 0.9
    w = 1 - b1
    delta = g - m                   # the float32 difference lerp's PAM receives
    forget = pam(delta, w) / delta.double()
    yield "β1 forgetting", "β1 0.9", "m + PAM(g − m, 1 − β1): torch's lerp, before and now", forget / w, \
        (1 - forget) / b1
    kept = pam(m, b1) / m64
    yield "β1 forgetting", "β1 0.9", "PAM(m, β1) + …: released", (1 - kept) / w, kept / b1
    kept = (m64 - pam(m, w)) / m64
    yield "β1 forgetting", "β1 0.9", "m − PAM(m, 1 − β1) + …: now, for m.mul_(β1)", (1 - kept) / w, kept / b1
    weight = pam(g, w) / g64
    yield "β1 input weight", "β1 0.9", "… + PAM(g, 1 − β1): released; now for add(alpha=1 − β1)", weight / w, \
        (1 - weight) / b1

    v = patterns(n, 3, signed=False)
    v64 = v.double()
    s = arith.pam(g, g)             # the PA square the β2 update adds
    for b2 in (0.999, 0.98):
        w = 1 - b2
        setting = f"β2 {b2:g}"
        kept = pam(v, b2) / v64
        yield "β2 forgetting", setting, "PAM(v, β2): before, released", (1 - kept) / w, kept / b2
        kept = (v64 - pam(v, w)) / v64
        yield "β2 forgetting", setting, "v − PAM(v, 1 − β2): now", (1 - kept) / w, kept / b2
        weight = pam(s, w) / s.double()
        yield "β2 input weight", setting, "PAM(g ⊙̂ g, 1 − β2): before, now, released", weight / w, \
            (1 - weight) / b2

    x = patterns(n, 4, signed=False)
    x64 = x.double()
    for t in (10, 1000, 10000):
        root = (1 - 0.999 ** t) ** 0.5
        k = 1 / root
        setting = f"β2 0.999, t {t}"
        before = arith.pad(x, f32(root)).double()
        now = x64 + pam(x, k - 1) if root >= 0.5 else before
        for form, out in [("PAD(x, √(1 − β2^t)): before", before),
                          ("x + PAM(x, 1/√(1 − β2^t) − 1): now" if root >= 0.5 else
                           "PAD(x, √(1 − β2^t)): now (√ < 1/2)", now)]:
            yield "bias correction 1/√(1 − β2^t)", setting, form, (out / x64 - 1) / (k - 1), out / (x64 * k)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1 << 20, help="random bit patterns per row")
    args = ap.parse_args(argv)
    print(f"{args.n} random float32 bit patterns per row; applied / intended\n")
    print("| quantity | setting | form | changed part: mean | min | max | kept factor: min – max |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for quantity, setting, form, changed, kept in rows(args.n):
        mean, lo, hi = stats(changed)
        _, klo, khi = stats(kept)
        print(f"| {quantity} | {setting} | {form} | {mean:.3f} | {lo:.3f} | {hi:.3f} | {klo:.6f} – {khi:.6f} |")


if __name__ == "__main__":
    main()
