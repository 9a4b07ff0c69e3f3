"""The ``pamtorch`` command: ``check``, ``bench`` and ``train``."""
from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _check(args) -> int:
    from .check import run_check

    return run_check(args.n)


def _bench(args) -> int:
    from . import bench

    if args.what == "matmul":
        return bench.main_matmul(args)
    raise SystemExit(f"pamtorch bench: unknown benchmark {args.what!r}; choose from: matmul")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pamtorch", description="Multiplication-free training with "
                                "piecewise affine arithmetic.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", help="print the measured error of every PA op and self-test the kernels")
    c.add_argument("-n", type=int, default=200_000, help="random inputs per op and dtype")
    c.set_defaults(func=_check)

    b = sub.add_parser("bench", help="time the kernels against PyTorch and append to BENCHMARKS.md")
    b.add_argument("what", choices=["matmul"])
    b.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    b.add_argument("--reps", type=int, default=5)
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--no-append", action="store_true", help="print only, don't append to BENCHMARKS.md")
    b.set_defaults(func=_bench)

    from .recipes.train import add_train_parser

    add_train_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
