# Sourced by benchmarks/results_*.sh: runs entries of their list of training runs.
# The caller sets RECIPE (pamtorch train's recipe), runs ("name|extra arguments" each), common
# (arguments every run takes), OUT (the runs' parent folder), JOBS and PAMTORCH, then calls
#   run_entries FIRST LAST
# which starts entries FIRST..LAST (1-based) at most JOBS at a time. A run whose metrics.json
# exists, or that is running now (from an earlier call), is skipped, and running ones count
# against JOBS, so a script can be started again while runs are in flight. Every run gets --resume:
# one that was stopped continues from its last checkpoint (exactly), a new one starts from scratch. Each run's output
# goes to its --out folder's console.log; start/done lines with wall times go to stdout.

running() { pgrep -fc -- "train $RECIPE .*--out $OUT/${1:-}" || true; }

run_entries() {
  local first=$1 last=$2 i name args
  for ((i = first - 1; i < last; i++)); do
    name=${runs[i]%%|*}; args=${runs[i]#*|}
    [[ -f $OUT/$name/metrics.json ]] && { echo "skip $name (done)"; continue; }
    (( $(running "$name\$") > 0 )) && { echo "skip $name (running)"; continue; }
    while (( $(running) >= JOBS )); do sleep 10; done
    mkdir -p "$OUT/$name"
    echo "$(date -u +%FT%TZ) start $name: pamtorch train $RECIPE ${common[*]} $args --out $OUT/$name --resume"
    # shellcheck disable=SC2086
    ( start=$(date +%s)
      "$PAMTORCH" train "$RECIPE" "${common[@]}" $args --out "$OUT/$name" --resume >> "$OUT/$name/console.log" 2>&1 && rc=0 || rc=$?
      echo "$(date -u +%FT%TZ) done $name rc=$rc wall=$(( $(date +%s) - start ))s" ) &
    sleep 2  # the new run shows in the process list before the next slot check
  done
  wait
}
