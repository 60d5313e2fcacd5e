#!/usr/bin/env bash
# Every accuracy table, as one script: each model at its defaults, 3 seeds, to convergence (200 epochs,
# patience 10), on Amazon Beauty and ML-100K, one process per (dataset, model, seed), the longest runs
# first; then a few HoloMambaRec ablations on Beauty; then the lr x dropout grid on validation; then the
# 10-epoch tables (the paper's budget), one process per (dataset, model).
# Every run lands in bench/results/*.json as it ends (and its record in its log, LOGS/<n>.log) and a
# rerun skips finished runs, so this script can be cut off and run again. JOBS processes at once, one
# torch thread each (HOLOREC_THREADS=1). ONLY: run only the commands matching this grep pattern.
# DEADLINE_S: every run is stopped that many seconds after the start (a run cut off keeps its last finished epoch
# in bench/results/partial/, untracked, and carries on from it when rerun, here or on another machine given that file).
# RUNS: a file of `holorec bench accuracy` argument lists, one run a line (DATA in it is expanded), in place of the list below.
#   bash bench/accuracy_all.sh                                        # CPU, 2 processes
#   DEVICE=cuda JOBS=12 DEADLINE_S=500 bash bench/accuracy_all.sh     # a GPU machine, inside a 10-minute call
#   RUNS=bench/runs/gpu-2026-12-04.txt DEVICE=cuda JOBS=16 DEADLINE_S=520 bash bench/accuracy_all.sh
# On a lent device, copy bench/results back in the same call: the next call re-sends the working tree,
# which overwrites the tracked results (bench/results/gpu-2026-12-01/README.md). The grid's chosen
# values become defaults only by a commit to model/train.py's TUNED.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
DEVICE=${DEVICE:-cpu}
JOBS=${JOBS:-2}
HOLOREC=${HOLOREC:-.venv/bin/holorec}
LOGS=${LOGS:-bench/results/logs}
ONLY=${ONLY:-.}
END=$(( $(date +%s) + ${DEADLINE_S:-1000000000} ))
mkdir -p "$LOGS"
B="$HOLOREC bench accuracy --epochs 200 --patience 10 --device $DEVICE"
runs=()
for ds in "$DATA/beauty/Beauty.txt" "$DATA/ml-100k"; do
  for m in holomamba sasrec gru4rec elastic; do
    for s in 0 1 2; do runs+=("$B --data $ds --models $m --seeds 3 --seed $s"); done
  done
done
for s in 1 2; do runs+=("$B --data $DATA/beauty/Beauty.txt --models holomamba:d_state=16 --seeds 3 --seed $s"); done
for m in holomamba:n_layers=3 holomamba:d_model=128 sasrec:d_model=128; do
  runs+=("$B --data $DATA/beauty/Beauty.txt --models $m --seeds 1 --seed 0")
done
for ds in "$DATA/ml-100k" "$DATA/beauty/Beauty.txt"; do
  for m in holomamba sasrec gru4rec elastic; do runs+=("$B --data $ds --models $m --grid"); done
done
for ds in "$DATA/beauty/Beauty.txt" "$DATA/ml-100k"; do
  for m in holomamba sasrec gru4rec elastic; do
    runs+=("$HOLOREC bench accuracy --epochs 10 --patience 10 --device $DEVICE --data $ds --models $m --seeds 3")
  done
done
if [ -n "${RUNS:-}" ]; then
  runs=()
  while read -r line; do [ -z "$line" ] || [ "${line:0:1}" = "#" ] || runs+=("$B ${line//\$DATA/$DATA}"); done < "$RUNS"
fi
n=0
for r in "${runs[@]}"; do n=$((n + 1)); printf '%s\t%s\n' "$n" "$r"; done | grep -e "$ONLY" \
  | HOLOREC_THREADS=1 END=$END LOGS=$LOGS xargs -P "$JOBS" -n 1 -d '\n' sh -c \
    'n=${0%%	*}; r=${0#*	}; left=$((END - $(date +%s))); [ "$left" -gt 0 ] || exit 0
     timeout "$left" $r > "$LOGS/$n.log" 2>&1 || echo "failed or cut off: $r"'
ls -l bench/results/accuracy_*ep.md bench/results/tune_*_200ep.md 2>/dev/null || true
