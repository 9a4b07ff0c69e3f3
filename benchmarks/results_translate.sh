#!/usr/bin/env bash
# RESULTS.md, translation on ../shared/data/de-en: the `small` preset (d 128, 3+3 layers), 3000
# steps, decoding in standard arithmetic (--eval-arith exact, as the paper's released code
# decodes), one thread per run, at most JOBS (default 1) at a time, in this order:
#   1-4  fp32, pam-full, pam-matmul, paper-exact-loss, seed 0
#   5-8  fp32 and pam-full, seeds 1 and 2
#   9-12 pam-matmul and paper-exact-loss, seeds 1 and 2
# Usage (from the repository root): benchmarks/results_translate.sh [FIRST [LAST]] | summary
#   Skips a run whose metrics.json exists or that is running; each run's output goes to its --out
#   folder's console.log. `summary` prints RESULTS.md's table from the runs' metrics.json.
set -euo pipefail
PAMTORCH=${PAMTORCH:-.venv/bin/pamtorch}
JOBS=${JOBS:-1}
OUT=runs/results
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
common=(--data-dir ../shared/data/de-en --preset small --steps 3000 --eval-every 1000 --ckpt-every 250
        --eval-sentences 1000 --eval-arith exact --no-progress --threads 1)

runs=()  # "name|extra arguments"
for arith in fp32 pam-full pam-matmul paper-exact-loss; do runs+=("tr-$arith-s0|--arith $arith --seed 0"); done
for seed in 1 2; do for arith in fp32 pam-full; do runs+=("tr-$arith-s$seed|--arith $arith --seed $seed"); done; done
for seed in 1 2; do for arith in pam-matmul paper-exact-loss; do runs+=("tr-$arith-s$seed|--arith $arith --seed $seed"); done; done

if [[ ${1:-} == summary ]]; then
  exec "${PYTHON:-.venv/bin/python}" - "$OUT" <<'PY'
import json, statistics as st, sys
from pathlib import Path

out = Path(sys.argv[1])
print("| variant | seeds | test BLEU | valid BLEU | test token accuracy | wall time per run |")
print("| --- | --- | ---: | ---: | ---: | ---: |")
for v in ("fp32", "pam-matmul", "pam-full", "paper-exact-loss"):
    ms = []
    for s in range(3):
        p = out / f"tr-{v}-s{s}" / "metrics.json"
        m = json.loads(p.read_text()) if p.is_file() else {}
        if m.get("completed"):
            ms.append((s, m))
    if not ms:
        print(f"| {v} | not run | | | | |")
        continue

    def col(key, scale=1.0, d=2):
        xs = [scale * m[key] for _, m in ms]
        cells = ", ".join(f"{x:.{d}f}" for x in xs)
        return cells + (f" ({st.mean(xs):.{d}f} ± {st.stdev(xs):.{d}f})" if len(xs) > 1 else "")

    walls = ", ".join(f"{m['wall_time_s'] / 60:.0f} min" for _, m in ms)
    print(f"| {v} | {', '.join(str(s) for s, _ in ms)} | {col('test_bleu')} | {col('bleu')} | "
          f"{col('test_accuracy', 100, 1)} | {walls} |")
PY
fi

RECIPE=translate
# shellcheck source=benchmarks/results_runner.sh
source "$(dirname "$0")/results_runner.sh"
run_entries "${1:-1}" "${2:-${#runs[@]}}"
