#!/usr/bin/env bash
# bench/accuracy_all.sh on a lent GPU machine (the `device` tool), inside one call, bringing its results back.
# Here, before the call: copy the data beside the repository into an ignored .data/ and fetch the one wheel the
# machine lacks (redis-py, for bench/harness.py):
#   mkdir -p .data/beauty && cp -r ../shared/data/ml-100k .data/ && cp ../shared/data/beauty/* .data/beauty/
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 -d .whl redis
# and call `run` with carry [".data", ".whl"] and command `bash bench/accuracy_device.sh` (timeout_s 600).
# Every call re-sends the working tree, overwriting bench/results: so this script puts the results and every
# run's log into $OUT/results.tgz in the same call, and the runs stop at DEADLINE_S (default 500 s) by themselves.
# Runs cut off keep their last epoch in a partial/ folder: those come back as $OUT/partial.tar.* (15 MiB pieces; a call
# brings back 64 MiB at most, about three Beauty runs: PARTIALS, default 3, the highest on validation so far), to carry on here: `cat partial.tar.* | tar xf -` in the repository,
# then the same command on the CPU. RUNS (bench/accuracy_all.sh) passes through: `RUNS=bench/runs/gpu-2026-12-04.txt
# JOBS=16 DEADLINE_S=525 bash bench/accuracy_device.sh`.
# Throughput on one H200 (the runs are bound by kernel launches, not by the GPU's arithmetic): a Beauty run trains
# ~33,000 positions/s with 2 processes at once, ~23,000 each with 6 (138,000 in all) and ~6,500 each with 16 beside
# ML-100K runs (logs in bench/results/gpu-2026-12-04*): JOBS 6-8 finishes the most Beauty epochs, ~75 per run in 525 s.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
[ -e ../shared/data ] || { mkdir -p ../shared && ln -s "$PWD/.data" ../shared/data; }  # there, the data beside the repository is .data
nvidia-smi -L || true
DEVICE=cuda JOBS=${JOBS:-12} DEADLINE_S=${DEADLINE_S:-500} HOLOREC="python3 -m cli" LOGS=${LOGS:-/tmp/logs} bash bench/accuracy_all.sh
tar czf "$OUT/results.tgz" --exclude=partial bench/results "${LOGS:-/tmp/logs}"
python3 - <<'PY' | tar cf - -T - | split -b 15m - "$OUT/partial.tar."  # the PARTIALS (3) highest on validation so far
import glob, json, os
from safetensors import safe_open
best = {f: json.loads(safe_open(f, "pt").metadata()["progress"])["best"]["NDCG@10"] for f in glob.glob("bench/results/**/partial/*.safetensors", recursive=True)}
print("\n".join(sorted(best, key=best.get, reverse=True)[: int(os.environ.get("PARTIALS", "3"))]))
PY
grep -h "seed [0-9]: test" "${LOGS:-/tmp/logs}"/*.log
