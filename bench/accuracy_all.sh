#!/usr/bin/env bash
# Every converged accuracy table, as one script: the lr x dropout grid on validation, then each model
# at its defaults, 3 seeds, to convergence (200 epochs, patience 10), on ML-100K and Amazon Beauty.
# Every run lands in bench/results/*.json as it ends and a rerun skips finished runs, so this script
# can be cut off and run again. JOBS processes at once, one torch thread each (HOLOREC_THREADS=1).
#   bash bench/accuracy_all.sh                         # CPU, 2 processes
#   DEVICE=cuda JOBS=8 bash bench/accuracy_all.sh      # a GPU machine
# The grid's chosen values become defaults only by a commit to model/train.py's TUNED.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
DEVICE=${DEVICE:-cpu}
JOBS=${JOBS:-2}
HOLOREC=${HOLOREC:-.venv/bin/holorec}
B="$HOLOREC bench accuracy --epochs 200 --patience 10 --device $DEVICE"
runs=()
for ds in "$DATA/ml-100k" "$DATA/beauty/Beauty.txt"; do
  for m in holomamba sasrec gru4rec elastic; do runs+=("$B --data $ds --models $m --grid"); done
done
for ds in "$DATA/ml-100k" "$DATA/beauty/Beauty.txt"; do
  for m in holomamba sasrec gru4rec elastic; do runs+=("$B --data $ds --models $m --seeds 3"); done
done
printf '%s\n' "${runs[@]}" | HOLOREC_THREADS=1 xargs -P "$JOBS" -I{} sh -c '{} > /dev/null 2>&1 || echo "failed: {}"'
ls -l bench/results/accuracy_*_200ep.md bench/results/tune_*_200ep.md || true
