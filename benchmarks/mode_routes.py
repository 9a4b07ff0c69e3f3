"""What a Python mode costs a training step, and what the kernel route saves (issue 12).

One ``pamtorch train`` recipe's step (or the stock encoder's), interleaved, each variant on
its own copy of the same model and batches:

  fp32              stock PyTorch
  dispatch-noop     under a TorchDispatchMode that only calls each op
  function-noop     under a TorchFunctionMode that only calls each function
  both-noop         under both (what the dispatch route's modes cost before any PA work)
  pam-matmul-dispatch   pamtorch.mode(Config.matmul_only(), route="dispatch")
  pam-matmul-kernel     pamtorch.mode(Config.matmul_only(), route="kernel")

The fp32 rows run with the kernel route's kernels registered (they are registered once per
process, at the first kernel-route step, and stay): the ratio includes what an inactive
registered kernel costs fp32.

    python benchmarks/mode_routes.py --recipe vit --threads 1 --reps 10 \\
        --train-args --data-dir ../shared/data/fashion-mnist

``--registration``: instead, the fp32 step alone, ``4 * reps`` steps before the kernel
route's kernels for ``pam-matmul`` are registered and ``4 * reps`` after, in one process
(what a registered kernel off the route costs plain PyTorch).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import pamtorch
from pamtorch import bench as B
from pamtorch.config import Config


class _NoopDispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _NoopFunction(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _both():
    with _NoopFunction(), _NoopDispatch():
        yield


VARIANTS = {
    "fp32": contextlib.nullcontext,
    "dispatch-noop": _NoopDispatch,
    "function-noop": _NoopFunction,
    "both-noop": _both,
    "pam-matmul-dispatch": lambda: pamtorch.mode(Config.matmul_only(), route="dispatch"),
    "pam-matmul-kernel": lambda: pamtorch.mode(Config.matmul_only(), route="kernel"),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="vit")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--registration", action="store_true",
                   help="time fp32 steps before and after the kernel route's registrations")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    task, hp = B._step_setup(args.recipe, args.train_args, 0)
    if args.registration:
        return _registration(task, hp, args)
    runs = dict(zip(VARIANTS, B._copies(task, hp, len(VARIANTS))))
    wall = {v: [] for v in VARIANTS}
    cpu = {v: [] for v in VARIANTS}
    for step in range(args.reps + 2):   # two warm-up steps
        batch = task.batch(step, hp.batch_size, 0)
        for v, (model, opt) in runs.items():
            torch.manual_seed(step)
            t0, c0 = time.perf_counter(), time.process_time()
            with VARIANTS[v]():
                B._train_step(task, hp, model, opt, batch)
            if step >= 2:
                wall[v].append(time.perf_counter() - t0)
                cpu[v].append(time.process_time() - c0)
    # the two PA routes train the same bits
    (_, (m1, _)), (_, (m2, _)) = [(v, runs[v]) for v in ("pam-matmul-dispatch", "pam-matmul-kernel")]
    same = all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    base, cbase = statistics.median(wall["fp32"]), statistics.median(cpu["fp32"])
    print(f"{B.machine()}, {args.threads} thread(s), recipe {args.recipe}, {args.reps} steps, "
          f"pam-matmul routes bit-equal: {same}")
    print("| variant | step ms (median) | x fp32 | CPU ms (median) | x fp32 (CPU) |")
    print("|---|---|---|---|---|")
    for v in VARIANTS:
        w, c = statistics.median(wall[v]), statistics.median(cpu[v])
        print(f"| {v} | {w * 1e3:.1f} | {w / base:.2f} | {c * 1e3:.1f} | {c / cbase:.2f} |")
    if not same:
        raise SystemExit("the dispatch and kernel routes trained different parameters")


def _registration(task, hp, args):
    import importlib

    route = importlib.import_module("pamtorch.mode")._KernelRoute
    if route.registered:
        raise SystemExit("the kernel route's kernels are already registered in this process")
    (model, opt), = B._copies(task, hp, 1)

    def steps(n):
        ts = []
        for step in range(n):
            batch = task.batch(step % 4, hp.batch_size, 0)
            c0 = time.process_time()
            B._train_step(task, hp, model, opt, batch)
            ts.append(time.process_time() - c0)
        return statistics.median(ts)

    steps(3)   # warm-up
    before = steps(4 * args.reps)
    if not route.available():
        raise SystemExit("the compiled CPU kernels are not available")
    route.refresh(importlib.import_module("pamtorch.mode")._route_mask(Config.matmul_only()))
    after = steps(4 * args.reps)
    print(f"{B.machine()}, recipe {args.recipe}, fp32 step CPU ms (median of {4 * args.reps}): "
          f"{before * 1e3:.2f} before the registrations of {len(route.registered)} ops, "
          f"{after * 1e3:.2f} after ({after / before:.3f} x)")


if __name__ == "__main__":
    main()
