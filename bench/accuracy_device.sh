#!/usr/bin/env bash
# bench/accuracy_all.sh on a lent GPU machine (the `device` tool), inside one call, bringing its results back.
# Here, before the call: copy the data beside the repository into an ignored .data/ and fetch the one wheel the
# machine lacks (redis-py, for bench/harness.py):
#   mkdir -p .data/beauty && cp -r ../shared/data/ml-100k .data/ && cp ../shared/data/beauty/* .data/beauty/
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 -d .whl redis
# and call `run` with carry [".data", ".whl"] and command `bash bench/accuracy_device.sh` (timeout_s 600).
# Every call re-sends the working tree, overwriting bench/results: so this script puts the results and every
# run's log into $OUT/results.tgz in the same call, and the runs stop at DEADLINE_S (default 500 s) by themselves.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
[ -e ../shared/data ] || { mkdir -p ../shared && ln -s "$PWD/.data" ../shared/data; }  # there, the data beside the repository is .data
nvidia-smi -L || true
DEVICE=cuda JOBS=${JOBS:-12} DEADLINE_S=${DEADLINE_S:-500} HOLOREC="python3 -m cli" LOGS=/tmp/logs bash bench/accuracy_all.sh
tar czf "$OUT/results.tgz" bench/results/*.json bench/results/*.md /tmp/logs
grep -h "seed [0-9]: test" /tmp/logs/*.log
