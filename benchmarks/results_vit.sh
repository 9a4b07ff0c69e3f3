#!/usr/bin/env bash
# RESULTS.md, ViT on Fashion-MNIST: the seed-spread runs (fp32, pam-full, pam-matmul,
# paper-exact-loss x seeds 0, 1, 2) and the mantissa sweep (pam-full, --mantissa-bits
# 7, 5, 3, then 23, which equals no rounding bit for bit (tests/test_train.py), seed 0),
# in that order, at most JOBS (default 2) at a time, one thread each.
# Usage (from the repository root): benchmarks/results_vit.sh [FIRST [LAST]]
#   runs the list's entries FIRST..LAST (1-based, default all). A run whose metrics.json exists,
#   or that is running now (from an earlier call), is skipped, and running ones count against
#   JOBS, so the script can be started again while runs are in flight. Each run's output goes to
#   its --out folder's console.log; this script prints start/done lines with wall times.
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

running() { pgrep -fc -- "train vit .*--out $OUT/${1:-}" || true; }

first=${1:-1}; last=${2:-${#runs[@]}}
for ((i = first - 1; i < last; i++)); do
  name=${runs[i]%%|*}; args=${runs[i]#*|}
  [[ -f $OUT/$name/metrics.json ]] && { echo "skip $name (done)"; continue; }
  (( $(running "$name\$") > 0 )) && { echo "skip $name (running)"; continue; }
  while (( $(running) >= JOBS )); do sleep 10; done
  mkdir -p "$OUT/$name"
  echo "$(date -u +%FT%TZ) start $name: pamtorch train vit ${common[*]} $args --out $OUT/$name"
  # shellcheck disable=SC2086
  ( start=$(date +%s)
    "$PAMTORCH" train vit "${common[@]}" $args --out "$OUT/$name" > "$OUT/$name/console.log" 2>&1 && rc=0 || rc=$?
    echo "$(date -u +%FT%TZ) done $name rc=$rc wall=$(( $(date +%s) - start ))s" ) &
  sleep 2  # the new run shows in the process list before the next slot check
done
wait
