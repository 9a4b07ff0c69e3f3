#!/usr/bin/env bash
# RESULTS.md, CNN rows: pre-activation ResNet-20 on Fashion-MNIST (../shared/data/fashion-mnist),
# batch 64: fp32, pam-conv (the paper's CNN variant: PA convolutions and linear layers,
# BatchNorm and the rest exact) and pam-full (or ARITHS), for SEEDS (default 0), one after
# another, one thread each; EXTRA: more pamtorch train options, e.g. --derivative loss=exact
# (then give NAME, a suffix for the run folders). PAMTORCH: the pamtorch command.
# Usage (from the repository root):
#   benchmarks/results_cnn.sh          # the 200-step smoke rows (all in the preset's warmup)
#   STEPS=1000 WARMUP=100 benchmarks/results_cnn.sh   # the longer rows: 100 warmup steps, then cosine
#   STEPS=1000 WARMUP=100 SEEDS="1 2" ARITHS="fp32 pam-conv" benchmarks/results_cnn.sh   # their seeds
#   STEPS=1000 WARMUP=100 ARITHS="matmul+norm matmul+optimizer matmul+loss" benchmarks/results_cnn.sh
#   STEPS=1000 WARMUP=100 ARITHS=matmul+loss EXTRA="--derivative loss=exact" NAME=-dloss benchmarks/results_cnn.sh
#   STEPS=1000 WARMUP=100 ARITHS="matmul+loss pam-full" EXTRA="--derivative loss=balanced" NAME=-balanced \
#     benchmarks/results_cnn.sh   # the loss derivative balanced to sum to zero per row
#   STEPS=1000 WARMUP=100 PRESET=vgg benchmarks/results_cnn.sh   # the VGG-style net (runs cnn-vgg-ARITH-...)
#   benchmarks/results_cnn.sh summary   # RESULTS.md's 1000-step tables from the runs' metrics.json
# A finished run (its metrics.json exists) is skipped.
set -euo pipefail
if [[ ${1:-} == summary ]]; then
  exec "${PYTHON:-.venv/bin/python}" - <<'PY'
import json, statistics as st
from pathlib import Path

out = Path("runs/results")


def run(name):
    p = out / name / "metrics.json"
    m = json.loads(p.read_text()) if p.is_file() else {}
    return m if m.get("completed") else None


def train_loss(name, lo, hi):  # mean training loss over steps lo < step <= hi
    rows = [json.loads(l) for l in (out / name / "train_log.jsonl").open()]
    return st.mean(r["loss"] for r in rows if lo < r["step"] <= hi)


def table(prefix, variants):
    print("| variant | seeds | test accuracy | mean ± std | train loss, steps 401-500 / 901-1000 | step time |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for v in variants:
        done = [(s, run(f"{prefix}{v}-1000-s{s}")) for s in range(3)]
        done = [(s, m) for s, m in done if m]
        if not done:
            print(f"| {v} | not run | | | | |")
            continue
        accs = [100 * m["accuracy"] for _, m in done]
        names = [f"{prefix}{v}-1000-s{s}" for s, _ in done]
        spread = f"{st.mean(accs):.2f} ± {st.stdev(accs):.2f}%" if len(accs) > 1 else "—"
        losses = ", ".join(f"{train_loss(n, 400, 500):.2f} / {train_loss(n, 900, 1000):.2f}" for n in names)
        print(f"| {v} | {', '.join(str(s) for s, _ in done)} | {', '.join(f'{a:.2f}%' for a in accs)} | {spread} | "
              f"{losses} | {st.median(m['step_time_s'] for _, m in done):.2f} s |")


print("resnet20")
table("cnn-", ("fp32", "pam-conv", "pam-full", "pam-full-balanced", "matmul+norm", "matmul+optimizer",
               "matmul+loss", "matmul+loss-dloss", "matmul+loss-balanced"))
print("\nvgg")
table("cnn-vgg-", ("fp32", "pam-conv", "pam-full", "pam-full-balanced"))
PY
fi
PAMTORCH=${PAMTORCH:-.venv/bin/pamtorch}
STEPS=${STEPS:-200}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
extra=(); suffix=""
if [[ -n ${WARMUP:-} ]]; then extra=(--warmup "$WARMUP"); fi
if [[ $STEPS != 200 ]]; then suffix="-${STEPS}"; fi
# shellcheck disable=SC2206
extra+=(${EXTRA:-})
PRESET=${PRESET:-resnet20}
net=""; [[ $PRESET != resnet20 ]] && net="$PRESET-"
for seed in ${SEEDS:-0}; do
for arith in ${ARITHS:-fp32 pam-conv pam-full}; do
  out=runs/results/cnn-$net$arith${NAME:-}$suffix-s$seed
  [[ -f $out/metrics.json ]] && { echo "skip $out (done)"; continue; }
  mkdir -p "$out"
  echo "$(date -u +%FT%TZ) start $out"
  start=$(date +%s)
  # shellcheck disable=SC2086  # PAMTORCH may be a command with arguments
  $PAMTORCH train cnn --data-dir ../shared/data/fashion-mnist --preset "$PRESET" --batch-size 64 --steps "$STEPS" \
    "${extra[@]}" --eval-every $((STEPS / 2)) --threads 1 --no-progress --arith "$arith" --seed "$seed" --out "$out" \
    > "$out/console.log" 2>&1
  echo "$(date -u +%FT%TZ) done $out wall=$(( $(date +%s) - start ))s"
done
done
