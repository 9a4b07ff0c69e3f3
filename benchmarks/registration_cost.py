"""What the kernel route's registered kernels cost plain PyTorch (issue 12).

Once a kernel-route step has run, the ops it registered on the BackendSelect key stay
registered for the life of the process, and every call of them outside the mode pays a
boxed redispatch. This times the fp32 step of a recipe in two worker processes, one
without registrations and one with those of ``--config`` (default ``full``: the most ops),
interleaved block by block so that both see the same machine load:

    python benchmarks/registration_cost.py --recipe vit --threads 1 --blocks 8 --steps 5 \\
        --train-args --data-dir ../shared/data/fashion-mnist

It prints the median CPU time of a step in each process and their ratio (registered /
plain), and the per-block ratios' range.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def _worker(recipe: str, threads: int, register: str, train_args: list) -> None:
    import importlib

    import torch

    from pamtorch import bench as B
    from pamtorch.config import Config

    torch.set_num_threads(threads)
    task, hp = B._step_setup(recipe, train_args, 0)
    (model, opt), = B._copies(task, hp, 1)
    n = 0
    if register != "none":
        mode = importlib.import_module("pamtorch.mode")
        if not mode._KernelRoute.available():
            raise SystemExit("the compiled CPU kernels are not available")
        cfg = {"full": Config.full(), "matmul": Config.matmul_only()}[register]
        mode._KernelRoute.refresh(mode._route_mask(cfg))
        n = len(mode._KernelRoute.registered)
    print(json.dumps({"ready": n}), flush=True)
    step = 0
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            batch = task.batch(step % 4, hp.batch_size, 0)
            c0 = time.process_time()
            B._train_step(task, hp, model, opt, batch)
            times.append(time.process_time() - c0)
            step += 1
        print(json.dumps(times), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="vit")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="steps per block")
    p.add_argument("--config", default="full", choices=("full", "matmul"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[])
    args = p.parse_args()
    if args.worker:
        _worker(args.recipe, args.threads, args.worker, args.train_args)
        return
    procs = {}
    for name in ("none", args.config):
        cmd = [sys.executable, __file__, "--recipe", args.recipe, "--threads", str(args.threads),
               "--worker", name, "--train-args", *args.train_args]
        procs[name] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    registered = {k: json.loads(p.stdout.readline())["ready"] for k, p in procs.items()}

    def block(name, n):
        procs[name].stdin.write(f"{n}\n")
        procs[name].stdin.flush()
        return json.loads(procs[name].stdout.readline())

    for name in procs:   # warm-up
        block(name, 2)
    times = {k: [] for k in procs}
    ratios = []
    for b in range(args.blocks):
        order = list(procs) if b % 2 == 0 else list(reversed(procs))
        got = {name: block(name, args.steps) for name in order}
        for name, t in got.items():
            times[name] += t
        ratios.append(statistics.median(got[args.config]) / statistics.median(got["none"]))
    for p in procs.values():
        p.stdin.close()
        p.wait()
    plain, reg = statistics.median(times["none"]), statistics.median(times[args.config])
    import torch

    from pamtorch.bench import machine
    torch.set_num_threads(args.threads)   # what machine() reports
    print(f"{machine()}, recipe {args.recipe}, {args.threads} thread(s), fp32 step CPU ms, median of "
          f"{args.blocks * args.steps} interleaved steps each: plain {plain * 1e3:.2f}, with the "
          f"{registered[args.config]} registrations of a `{args.config}` route {reg * 1e3:.2f} "
          f"({reg / plain:.3f} x; per block {min(ratios):.3f}-{max(ratios):.3f} x)")


if __name__ == "__main__":
    main()
