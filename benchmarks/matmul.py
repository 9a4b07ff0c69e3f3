"""CPU PAM matmul speed vs torch.matmul (thin wrapper over pamtorch.bench).

    python benchmarks/matmul.py [--sizes 512 1024 2048] [--reps 7] [--threads N]

Prints a markdown table; ratios are t_torch / t_pam ("x of torch.matmul").
"""
import argparse
import os
import sys

try:
    import pamtorch.bench  # noqa: F401
except ImportError:  # run from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from pamtorch.bench import bench_matmul, format_matmul_table


def run(sizes=(512, 1024, 2048), threads=None, reps=7, naive_max=512):
    """Rows of measurements (list of dict), see pamtorch.bench.bench_matmul."""
    return bench_matmul(sizes=sizes, reps=reps, threads=threads, naive_max=naive_max)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--naive-max", type=int, default=512)
    args = p.parse_args(argv)
    rows = run(args.sizes, args.threads, args.reps, args.naive_max)
    print(format_matmul_table(rows))


if __name__ == "__main__":
    main()
