"""Two builds of the compiled kernels side by side: the PAM products of the recipes' shapes
(weight gradients ``g^T x`` with a column-major A; operands with dropout's zeros; batched
attention products) timed with
each build's ``pam_mm`` on the same operands, in one process, interleaved, against ``torch.mm``.

    python benchmarks/matmul_ab.py OLD.so NEW.so [--threads 1] [--reps 9]

An ``.so`` is the compiled module that ``pamtorch.kernels.cpu.load_extension()`` builds and
loads (its ``__file__``; for an older commit, load it from a worktree of that commit with
``PYTHONPATH=<worktree>/src``). Sequential runs of ``benchmarks/matmul_shapes.py`` on a
shared machine drift by more than a kernel change; this compares the builds within one run.
Each row also checks that the two builds give the same bits. CPU time per call, median of
``--reps`` rounds; ratios to ``torch.mm``.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

import torch


_MODES = "F0 FB FA FAB FG FZ FZT SB".split()   # the extension's last_mode() numbers


def _load(path):
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cases():
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    def dropped(x, p=0.1):  # dropout's zeros (and the zeros they leave in gradients)
        return x * (torch.rand(x.shape, generator=g) >= p)

    with_zero = r(2000, 8000)
    with_zero[5, 7] = 0.0  # one zero in A: the FA mode (FZ since 2026-12-05)
    return [
        ("translate vocabulary dW = g^T x", r(2000, 8000).t(), r(2000, 64)),
        ("the same with one zero in g", with_zero.t(), r(2000, 64)),
        ("vit dW fc1 = g^T x", r(1088, 128).t(), r(1088, 64)),
        ("encoder in-proj dW = g^T x", r(1024, 384).t(), r(1024, 128)),
        # dropout 0.1 (vit, the stock encoder, translate): zeros in A, in B, or both
        ("vit fc2 x W^T, zeros in x", dropped(r(1088, 128)), r(64, 128).t()),
        ("vit fc1 dX = g W, zeros in g", dropped(r(1088, 128)), r(128, 64)),
        ("vit dW fc1 = g^T x, zeros in g", dropped(r(1088, 128)).t(), r(1088, 64)),
        ("vit dW out-proj = g^T x, zeros in x", r(1088, 64).t(), dropped(r(1088, 64))),
        ("vit dW fc2 = g^T h, zeros in both", dropped(r(1088, 64)).t(), dropped(r(1088, 128))),
        ("encoder FFN down, zeros in h", dropped(r(1024, 2048)), r(128, 2048).t()),
        # vit's attention (batched: 64 images x 4 heads, 17 tokens, head size 16)
        ("vit scores q k^T", r(256, 17, 16), r(256, 17, 16).transpose(1, 2)),
        ("vit P V, dropout's zeros in P", dropped(r(256, 17, 17)), r(256, 17, 16)),
        ("vit dV = P^T dO, zeros in P", dropped(r(256, 17, 17)).transpose(1, 2), r(256, 17, 16)),
        # translate's (64 sentences x 4 heads, head size 16, about 30 tokens)
        ("translate P V, zeros in P", dropped(r(256, 30, 30)), r(256, 30, 16)),
        # the stock encoder's (16 x 4 heads, 64 tokens, head size 32): above the lanes' size
        ("encoder P V, zeros in P", dropped(r(64, 64, 64)), r(64, 64, 32)),
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=9)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    old, new = _load(args.old), _load(args.new)
    print(f"threads {args.threads}, torch {torch.__version__}, CPU time per call, median of {args.reps}")
    print("| product | shape (M x K x N) | mode old / new | torch ms | old ms (x torch) | new ms (x torch) |")
    print("|---|---|---|---|---|---|")
    for name, a, b in _cases():
        bmm = a.dim() == 3
        tmm = torch.bmm if bmm else torch.mm
        omm, nmm = (old.pam_bmm, new.pam_bmm) if bmm else (old.pam_mm, new.pam_mm)
        got_old = omm(a, b, -1, 0)
        mode_old = old.last_mode()
        if not torch.equal(got_old.view(torch.int32), nmm(a, b, -1, 0).view(torch.int32)):
            raise SystemExit(f"{name}: the two builds give different bits")
        modes = [_MODES[m] if 0 <= m < len(_MODES) else str(m) for m in (mode_old, new.last_mode())]
        n = max(1, int(2e8 / (a.numel() * b.shape[-1])))
        fns = {"torch": lambda: tmm(a, b), "old": lambda: omm(a, b, -1, 0),
               "new": lambda: nmm(a, b, -1, 0)}
        times = {k: [] for k in fns}
        for _ in range(args.reps + 1):
            for k, fn in fns.items():
                t = time.process_time()
                for _ in range(n):
                    fn()
                times[k].append((time.process_time() - t) / n)
        ms = {k: statistics.median(v[1:]) * 1e3 for k, v in times.items()}
        shape = ("%d x " % a.shape[0] if bmm else "") + "%d x %d x %d" % (a.shape[-2], a.shape[-1], b.shape[-1])
        print(f"| {name} | {shape} | {' / '.join(modes)} | "
              f"{ms['torch']:.2f} | {ms['old']:.2f} ({ms['old'] / ms['torch']:.2f}) | "
              f"{ms['new']:.2f} ({ms['new'] / ms['torch']:.2f}) |")


if __name__ == "__main__":
    main()
