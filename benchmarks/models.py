"""The model matrix as a table: each stock model of tests/model_zoo.py trained N steps in
fp32 and under ``pamtorch.mode(Config.full())``, same seed and batch.

    python benchmarks/models.py [--steps 20] [--threads 1] [--route auto|kernel|dispatch]
                                [--out docs/models.md]

Columns: whether the model runs fully PA (or which ops had to be left exact, or the error),
the median PA step time as a ratio to the median fp32 step measured in the same run
(steps interleaved), and the loss after N steps evaluated in exact fp32 (eval mode) for
both runs, against the loss at step 0. ``--route``: ``pamtorch.mode``'s route for the PA
steps (default ``auto``: the kernel route where it can run, docs/training.md; ``dispatch``
forces the TorchDispatchMode). The audit runs the dispatch route whatever the route.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
try:
    import pamtorch  # noqa: F401
except ImportError:  # run from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

import torch  # noqa: E402

import pamtorch  # noqa: E402
from pamtorch.bench import machine  # noqa: E402
from pamtorch.config import Config  # noqa: E402
from pamtorch.mode import UnsupportedOpError  # noqa: E402

import model_zoo as Z  # noqa: E402


def run_case(case, steps: int, route: str = "auto") -> dict:
    ref, ref_batch, ref_opt = Z.make(case)
    pa, batch, opt = Z.make(case)
    start = Z.exact_loss(case, ref, ref_batch)
    cfg = Config.full()
    t_ref, t_pa = [], []
    try:
        for _ in range(steps):            # interleaved: fp32 step, then PA step
            t = time.perf_counter()
            Z.train_step(case, ref, ref_batch, ref_opt)
            t_ref.append(time.perf_counter() - t)
            t = time.perf_counter()
            with pamtorch.mode(cfg, route=route):
                Z.train_step(case, pa, batch, opt)
            t_pa.append(time.perf_counter() - t)
    except UnsupportedOpError as e:
        return {"status": "error: " + str(e).splitlines()[0][:120], "start": start}
    audit = pamtorch.audit(lambda: _step(case, pa, batch, opt, cfg), model=pa)
    status = "works" if audit.multiplication_free() else "NOT multiplication-free"
    return {"status": status, "start": start, "ratio": statistics.median(t_pa) / statistics.median(t_ref),
            "fp32": Z.exact_loss(case, ref, ref_batch), "pa": Z.exact_loss(case, pa, batch),
            "ms": 1e3 * statistics.median(t_ref)}


def _step(case, model, batch, opt, cfg):
    with pamtorch.mode(cfg):
        Z.train_step(case, model, batch, opt)


def table(rows, steps: int) -> str:
    out = [f"| model | status | PA step / fp32 step | fp32 step (ms) | loss at 0 | fp32 loss at {steps} "
           f"| PA loss at {steps} |", "|---|---|---:|---:|---:|---:|---:|"]
    for case, r in rows:
        if "ratio" in r:
            out.append(f"| {case.family} | {r['status']} | {r['ratio']:.2f}x | {r['ms']:.1f} | {r['start']:.3f} "
                       f"| {r['fp32']:.3f} | {r['pa']:.3f} |")
        else:
            out.append(f"| {case.family} | {r['status']} | | | {r['start']:.3f} | | |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="*", default=None, help="case names (default: all)")
    p.add_argument("--route", default="auto", choices=("auto", "kernel", "dispatch"),
                   help="pamtorch.mode's route for the PA steps")
    p.add_argument("--out", default=None, help="write the markdown table into this file "
                   "(between the MODELS-TABLE markers if present)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for case in Z.CASES:
        if args.only and case.name not in args.only:
            continue
        r = run_case(case, args.steps, args.route)
        print(case.name, r, flush=True)
        rows.append((case, r))
    cmd = "python benchmarks/models.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = f"Command: `{cmd.strip()}`\n\nMachine: {machine()}\n\n{table(rows, args.steps)}\n"
    print(text)
    if args.out:
        begin, end = "<!-- MODELS-TABLE -->", "<!-- /MODELS-TABLE -->"
        doc = open(args.out).read() if os.path.exists(args.out) else ""
        if begin in doc and end in doc:
            doc = doc[:doc.index(begin) + len(begin)] + "\n" + text + doc[doc.index(end):]
        else:
            doc += f"\n{begin}\n{text}{end}\n"
        with open(args.out, "w") as f:
            f.write(doc)


if __name__ == "__main__":
    main()
