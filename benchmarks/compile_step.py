"""Training-step time with torch.compile: fp32 and PA, eager and compiled, interleaved.

    python benchmarks/compile_step.py [--recipe vit] [--config pam-full] [--reps 7] [--threads 1]
        [--variants fp32,fp32-compiled,pa,pa-compiled] [--train-args --data-dir ../shared/data/fashion-mnist]

One step: forward, loss, backward, gradient clipping, AdamW, as ``pamtorch bench step``
runs it (the same model and batches; dropout set to 0 so the compiled and eager steps do
the same work). Variants, each on its own copy of the model:

* ``fp32``: eager torch; ``fp32-compiled``: ``torch.compile`` (inductor) of model + loss
  (the recipe's ``task.loss``);
* ``pa``: the whole step under ``pamtorch.mode(config)``;
* ``pa-compiled``: ``pamtorch.compile`` (inductor, ``fullgraph=False``) of model + loss,
  backward, clipping and AdamW under ``pamtorch.mode(config)``; ``pa-compiled-eager``: the same with backend="eager";
  ``pa-compiled-fused-sums``: inductor with ``exact_sums=False``.

The variants take turns step by step and the median step time (and the process's CPU
time per step, the steadier figure on a shared machine) is reported with its ratio to the
first variant. Compilation (minutes on a loaded 2-core machine) happens in the
warm-up steps and is reported apart.
"""
import argparse
import os
import statistics
import sys
import time

try:
    import pamtorch  # noqa: F401
except ImportError:  # run from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import torch

import pamtorch
from pamtorch import bench
from pamtorch.compile import compile as pa_compile

VARIANTS = ("fp32", "fp32-compiled", "pa", "pa-compiled", "pa-compiled-eager", "pa-compiled-fused-sums")


class _ModelAndLoss(torch.nn.Module):
    """The recipe's model and loss (``task.loss``): the part of the step that compiles."""

    def __init__(self, task, model):
        super().__init__()
        self.task, self.model = task, model

    def forward(self, *batch):
        return self.task.loss(self.model, batch)[0]


def _variant(name, task, hp, config):
    """(forward of model + loss, context of the rest of the step, optimizer) for one variant."""
    import copy
    import contextlib

    model = copy.deepcopy(task.model)
    opt = torch.optim.AdamW(model.parameters(), lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay)
    step = _ModelAndLoss(task, model)
    mode = (lambda: pamtorch.mode(config)) if name.startswith("pa") else contextlib.nullcontext
    if name == "fp32-compiled":
        return torch.compile(step, fullgraph=False), contextlib.nullcontext, model, opt
    if name.startswith("pa-compiled"):
        kwargs = {"pa-compiled": {}, "pa-compiled-eager": {"backend": "eager"},
                  "pa-compiled-fused-sums": {"exact_sums": False}}[name]
        # fullgraph=False: a recipe's graph breaks (translate's) leave code to eager torch, which
        # runs under the mode in the forward and, with the backward under the mode, backward
        return pa_compile(step, config, fullgraph=False, **kwargs), mode, model, opt
    return step, mode, model, opt


def run(recipe="vit", config="pam-full", variants=("fp32", "fp32-compiled", "pa", "pa-compiled"),
        reps=7, threads=1, train_args=(), seed=0):
    """Rows (dict) of median step times; ratios against the first variant."""
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"compile_step.py: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(threads)
    cfg = pamtorch.Config.from_name(config)
    task, hp = bench._step_setup(recipe, ["--dropout", "0", *train_args], seed)
    runs = {v: _variant(v, task, hp, cfg) for v in variants}
    times = {v: [] for v in variants}
    cpu = {v: [] for v in variants}   # this process's CPU time: steadier on a shared machine
    warm = {v: 0.0 for v in variants}
    for step in range(reps + 2):  # two warm-up steps: compilation, lazily built kernels
        batch = task.batch(step, hp.batch_size, seed)
        for v, (fwd, rest, model, opt) in runs.items():
            torch.manual_seed(step)
            t0, c0 = time.perf_counter(), time.process_time()
            if v == "pa":
                with rest():
                    loss = fwd(*batch)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), hp.clip or 1.0)
                    opt.step()
            else:
                loss = fwd(*batch)
                opt.zero_grad(set_to_none=True)
                with rest():  # the compiled graphs run outside the mode, code between them under it
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), hp.clip or 1.0)
                    opt.step()
            dt = time.perf_counter() - t0
            if step >= 2:
                times[v].append(dt)
                cpu[v].append(time.process_time() - c0)
            else:
                warm[v] += dt
    base, cbase = statistics.median(times[variants[0]]), statistics.median(cpu[variants[0]])
    return [{"recipe": recipe, "config": config, "variant": v, "threads": threads, "batch": hp.batch_size,
             "step_ms": statistics.median(times[v]) * 1e3, "x_first": statistics.median(times[v]) / base,
             "cpu_ms": statistics.median(cpu[v]) * 1e3, "x_first_cpu": statistics.median(cpu[v]) / cbase,
             "warmup_s": warm[v]} for v in variants]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="vit")
    p.add_argument("--config", default="pam-full", help="a Config.from_name preset")
    p.add_argument("--variants", default="fp32,fp32-compiled,pa,pa-compiled")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                   help="pamtorch train options for the recipe (e.g. --data-dir DIR)")
    args = p.parse_args(argv)
    rows = run(args.recipe, args.config, tuple(args.variants.split(",")), args.reps, args.threads,
               args.train_args)
    first = rows[0]["variant"]
    print(f"| recipe | config | batch | threads | variant | step ms (median) | x {first} | CPU ms (median) "
          f"| x {first} (CPU) | warm-up s |")
    print("|" + "---|" * 10)
    for r in rows:
        print(f"| {r['recipe']} | {r['config']} | {r['batch']} | {r['threads']} | {r['variant']} | "
              f"{r['step_ms']:.1f} | {r['x_first']:.2f} | {r['cpu_ms']:.1f} | {r['x_first_cpu']:.2f} | "
              f"{r['warmup_s']:.0f} |")


if __name__ == "__main__":
    main()
