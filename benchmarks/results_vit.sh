#!/usr/bin/env bash
# RESULTS.md, ViT on Fashion-MNIST: the seed-spread runs (fp32, pam-full, pam-matmul,
# paper-exact-loss x seeds 0, 1, 2) and the mantissa sweep (pam-full, --mantissa-bits
# 7, 5, 3, then 23, which equals no rounding bit for bit (tests/test_train.py), seed 0),
# then the derivative ablations (pam-full with --derivative matmul=exact, then softmax=exact,
# seeds 0, 1, 2), in that order, at most JOBS (default 2) at a time, one thread each.
# Usage (from the repository root): benchmarks/results_vit.sh [FIRST [LAST]] | summary
#   (entries: 1-12 seed spread, 13-16 mantissa sweep, 17-22 derivative ablations)
#   runs the list's entries FIRST..LAST (1-based, default all). A run whose metrics.json exists,
#   or that is running now (from an earlier call), is skipped, and running ones count against
#   JOBS, so the script can be started again while runs are in flight. Each run's output goes to
#   its --out folder's console.log; this script prints start/done lines with wall times.
#   `summary` prints RESULTS.md's two tables from the runs' metrics.json.
set -euo pipefail
PAMTORCH=${PAMTORCH:-.venv/bin/pamtorch}
JOBS=${JOBS:-2}
OUT=runs/results
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
common=(--data-dir ../shared/data/fashion-mnist --steps 1000 --eval-every 250 --no-progress --threads 1)

runs=()  # "name|extra arguments"
for arith in fp32 pam-full pam-matmul paper-exact-loss; do
  for seed in 0 1 2; do runs+=("vit-$arith-s$seed|--arith $arith --seed $seed"); done
done
for k in 7 5 3 23; do runs+=("vit-pam-full-m$k-s0|--arith pam-full --mantissa-bits $k --seed 0"); done
# the paper's derivative ablations: pam-full with the exact derivative for one kind
for kind in matmul softmax; do
  for seed in 0 1 2; do runs+=("vit-pam-full-d$kind-s$seed|--arith pam-full --derivative $kind=exact --seed $seed"); done
done

if [[ ${1:-} == summary ]]; then
  exec "${PYTHON:-.venv/bin/python}" - "$OUT" <<'PY'
import json, math, statistics as st, sys
from pathlib import Path

out = Path(sys.argv[1])


def acc(name):  # test accuracy in percent of a finished run, else None
    p = out / name / "metrics.json"
    m = json.loads(p.read_text()) if p.is_file() else {}
    return 100 * m["accuracy"] if m.get("completed") else None


seeds = {v: [acc(f"vit-{v}-s{s}") for s in range(3)] for v in ("fp32", "pam-matmul", "pam-full", "paper-exact-loss")}
done = [a for a in seeds.values() if None not in a]
sigma = math.sqrt(st.mean(st.variance(a) for a in done)) if done else math.nan
print(f"pooled per-run seed std sigma = {sigma:.3f} points ({len(done)} variants with 3 seeds)\n")
print("| variant | seed 0 | seed 1 | seed 2 | mean ± std | Δ vs fp32 (points) | Δ / σ | paired Δ per seed | paired Δ mean ± std |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
fp32 = seeds["fp32"]
for v, a in seeds.items():
    cells = " | ".join("—" if x is None else f"{x:.2f}%" for x in a)
    if None in a or None in fp32:
        print(f"| {v} | {cells} | — | — | — | — | — |")
        continue
    delta = st.mean(a) - st.mean(fp32)
    paired = [x - f for x, f in zip(a, fp32)]
    rest = ("— | — | —" if v == "fp32" else f"{delta / sigma:+.1f} | {', '.join(f'{p:+.2f}' for p in paired)} | "
            f"{st.mean(paired):+.2f} ± {st.stdev(paired):.2f}")
    print(f"| {v} | {cells} | {st.mean(a):.2f} ± {st.stdev(a):.2f}% | {delta:+.2f} | {rest} |")

print("\n| derivative | seed 0 | seed 1 | seed 2 | mean ± std | Δ vs pam-full (points) | Δ / σ | paired Δ vs pam-full | Δ vs fp32 |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
full = seeds["pam-full"]
for kind in ("matmul", "softmax"):
    a = [acc(f"vit-pam-full-d{kind}-s{s}") for s in range(3)]
    cells = " | ".join("—" if x is None else f"{x:.2f}%" for x in a)
    if None in a or None in full or None in fp32:
        print(f"| {kind} exact | {cells} | — | — | — | — | — |")
        continue
    delta = st.mean(a) - st.mean(full)
    paired = [x - f for x, f in zip(a, full)]
    print(f"| {kind} exact | {cells} | {st.mean(a):.2f} ± {st.stdev(a):.2f}% | {delta:+.2f} | {delta / sigma:+.1f} | "
          f"{', '.join(f'{p:+.2f}' for p in paired)} | {st.mean(a) - st.mean(fp32):+.2f} |")

print("\n| K | accuracy | Δ vs pam-full, seed 0 | Δ vs fp32, seed 0 | valid loss (own arithmetic) | wall time | step time |")
print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for k in (23, 7, 5, 3):
    p = out / f"vit-pam-full-m{k}-s0" / "metrics.json"
    m = json.loads(p.read_text()) if p.is_file() else {}
    if not m.get("completed") or None in (seeds["pam-full"][0], fp32[0]):
        print(f"| {k} | not run | | | | | |")
        continue
    a = 100 * m["accuracy"]
    print(f"| {k} | {a:.2f}% | {a - seeds['pam-full'][0]:+.2f} | {a - fp32[0]:+.2f} | {m['valid_loss']:.3f} | "
          f"{m['wall_time_s']:.0f} s | {m['step_time_s']:.3f} s |")
PY
fi

RECIPE=vit
# shellcheck source=benchmarks/results_runner.sh
source "$(dirname "$0")/results_runner.sh"
run_entries "${1:-1}" "${2:-${#runs[@]}}"
