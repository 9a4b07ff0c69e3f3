"""The ``pamtorch`` command: ``check``, ``bench`` and ``train``.

A user error (a bad argument, data file, checkpoint or output folder) prints one line,
``pamtorch: error: ...``, and exits with status 2; ``--debug`` shows the traceback instead."""
from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _check(args) -> int:
    from .check import run_check

    return run_check(args.n)


def _bench(args) -> int:
    import datetime
    import shlex

    from . import bench
    from .recipes.train import UserError

    if args.memory and args.what != "step":
        raise UserError(f"--memory: only bench step measures memory (got bench {args.what})")
    if args.device != "cpu" and (args.what != "step" or args.memory):
        raise UserError(f"--device {args.device}: only bench step (without --memory) runs on another device; "
                        f"bench {args.what}{' --memory' if args.memory else ''} measures the CPU")
    if args.route != "kernel" and args.what != "profile":
        raise UserError(f"--route {args.route}: only bench profile takes a route (got bench {args.what})")
    if args.what == "matmul":
        rows = bench.bench_matmul(tuple(args.sizes or (512, 1024, 2048)), reps=args.reps, threads=args.threads)
        table = bench.format_matmul_table(rows)
    elif args.what == "step" and args.memory:
        table = bench.format_memory_table(bench.bench_step_memory(
            args.recipe, tuple(args.variants.split(",")), steps=args.reps, threads=args.threads,
            train_args=tuple(args.train_args)))
    elif args.what == "step":
        rows = bench.bench_step(args.recipe, tuple(args.variants.split(",")), reps=args.reps,
                                threads=args.threads, train_args=tuple(args.train_args), device=args.device)
        table = bench.format_step_table(rows)
    elif args.what == "profile" and args.route == "kernel":
        table = bench.format_profile_kernel_table(bench.bench_profile_kernel(
            args.recipe, tuple(args.variants.split(",")), reps=args.reps, threads=args.threads,
            train_args=tuple(args.train_args)))
    elif args.what == "profile":
        table = bench.format_profile_table(bench.bench_profile(
            args.recipe, tuple(args.variants.split(",")), reps=args.reps, threads=args.threads,
            train_args=tuple(args.train_args)))
    else:
        rows = bench.bench_elementwise(tuple(args.sizes or (1 << 16, 1 << 20, 1 << 22)), reps=args.reps,
                                       threads=args.threads)
        table = bench.format_elementwise_table(rows)
    command = "pamtorch " + " ".join(shlex.quote(a) for a in args.argv)
    print(table)
    if not args.no_append:
        with open(args.output, "a") as f:
            f.write(f"\n### {datetime.date.today()}: `{command}`\n\nMachine: {bench.machine()}\n\n{table}\n")
        print(f"appended to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .recipes.train import POSITIVE_INT, RECIPES, ArgumentParser, add_debug_argument, add_train_parser

    p = ArgumentParser(prog="pamtorch", description="Multiplication-free training with "
                       "piecewise affine arithmetic.")
    add_debug_argument(p, default=False)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", help="print the measured error of every PA op and self-test the kernels")
    c.add_argument("-n", type=POSITIVE_INT, default=200_000, help="random inputs per op and dtype")
    add_debug_argument(c)
    c.set_defaults(func=_check)

    b = sub.add_parser("bench", help="time the kernels against PyTorch and append to BENCHMARKS.md")
    b.add_argument("what", choices=["matmul", "elementwise", "step", "profile"])
    b.add_argument("--recipe", default="translate", choices=(*RECIPES, "encoder"),
                   help="step, profile: the pamtorch train recipe whose training step is timed, or "
                        "encoder (a stock nn.TransformerEncoder)")
    b.add_argument("--variants", default="fp32,pam-matmul,pam-full,paper-exact-loss",
                   help="step: arithmetic variants, comma-separated, the first is the baseline; "
                        "ARITH@bfloat16 (@float16, @autocast) trains in that dtype")
    b.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                   help="step: everything after this goes to the recipe as pamtorch train options "
                        "(e.g. --train-args --data-dir ../shared/data/de-en)")
    b.add_argument("--sizes", type=POSITIVE_INT, nargs="+", default=None,
                   help="matmul: n of n x n x n (default 512 1024 2048); elementwise: number of "
                        "elements (default 65536 1048576 4194304)")
    b.add_argument("--reps", type=POSITIVE_INT, default=5)
    b.add_argument("--threads", type=POSITIVE_INT, default=None)
    b.add_argument("--device", default="cpu",
                   help="step: the device the model trains on (cpu, cuda, cuda:N or auto; default cpu)")
    b.add_argument("--memory", action="store_true",
                   help="step: measure each variant's peak memory (a fresh process each, --reps steps) "
                        "instead of its time")
    b.add_argument("--route", choices=["kernel", "dispatch"], default="kernel",
                   help="profile: the mode's route to profile: kernel (the default route, what pamtorch "
                        "train runs: aten ops' self time by op kind) or dispatch (the Python dispatch mode, "
                        "split into PA kernels, the ops' Python, exact ops and the mode's handler)")
    b.add_argument("--no-append", action="store_true", help="print only, don't append to BENCHMARKS.md")
    b.add_argument("--output", default="BENCHMARKS.md", help="the file the table is appended to")
    add_debug_argument(b)
    b.set_defaults(func=_bench)

    add_train_parser(sub)
    return p


def main(argv=None) -> int:
    from .recipes.train import report_errors

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return report_errors(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
