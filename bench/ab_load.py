"""Two checkouts' throughput side by side: `python -m bench.ab_load DIR_A DIR_B [--rounds N]`.

A change to the served path is judged as a ratio measured in one run, since this machine's speed drifts: each round
starts the service of each checkout in turn (order swapped every round), 2 uvicorn workers on the same Redis, and
measures 100-event batches, single events, GET /recommend and GET /livez at concurrency 32 as `holorec bench serve`'s load section does
(random-weight HoloMambaRec, 3,706 items, built by each checkout in its own format; users warmed first). A checkout is a directory holding this repository
at some revision (`git worktree add DIR REV`); its own service code runs, this file's load generator drives it.
`--set a|b NAME=VALUE` gives one side a setting (HOLOREC_NAME) the other lacks, as in bench/ab_floor.py.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

N_ITEMS = 3706
ONE = """
import json, sys
from pathlib import Path
from bench.harness import Service, make_checkpoint
from bench.loadgen import loadgen
tmp, ns, seconds, settings = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), json.loads(sys.argv[4])
ckpt = make_checkpoint(tmp / "ckpt", n_items=%d, n_attrs=18, max_attrs=3, d_model=64, max_len=200)  # this checkout's format
with Service(ckpt, "redis://127.0.0.1:6379/0", ns, workers=2, log=tmp / "service.log", **settings) as srv:
    common = {"port": srv.port, "n_items": %d, "seconds": seconds}
    loadgen({**common, "kind": "batch", "batch": 100, "n_users": 2000, "concurrency": 4, "requests": 40, "seconds": 60})
    b = loadgen({**common, "kind": "batch", "batch": 100, "concurrency": 32, "requests": 800})
    e = loadgen({**common, "kind": "event", "concurrency": 32, "requests": 12000})
    r = loadgen({**common, "kind": "recommend", "concurrency": 32, "n_users": 2000, "requests": 12000})
    z = loadgen({**common, "kind": "livez", "concurrency": 32, "requests": 12000})
print(json.dumps({"batch_events_per_s": b["per_s"] * 100, "events_per_s": e["per_s"], "recommend_per_s": r["per_s"],
                  "livez_per_s": z["per_s"], "recommend_pct_of_livez": 100 * r["per_s"] / z["per_s"]}))
""" % (N_ITEMS, N_ITEMS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs=2, type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--set", nargs=2, action="append", default=[], metavar=("SIDE", "NAME=VALUE"), help="a setting for side a or b alone")
    args = ap.parse_args()
    from bench.harness import side_settings
    from bench.serve import clear_namespace

    sides = list(zip("ab", args.dirs, side_settings(args.set)))
    got: dict[str, list[dict[str, float]]] = {side: [] for side, _, _ in sides}
    for rnd in range(args.rounds):
        for side, d, settings in sides if rnd % 2 == 0 else sides[::-1]:
            ns, tmp = f"bench-ab-{uuid.uuid4().hex[:8]}", Path(tempfile.mkdtemp(prefix="holorec-ab-"))
            try:
                run = subprocess.run([sys.executable, "-c", ONE, str(tmp), ns, str(args.seconds), json.dumps(settings)], cwd=d,
                                     capture_output=True, text=True)
            finally:
                clear_namespace("redis://127.0.0.1:6379/0", ns)
            log = (tmp / "service.log").read_text()[-3000:] if (tmp / "service.log").exists() else ""
            shutil.rmtree(tmp, ignore_errors=True)
            if run.returncode:
                raise SystemExit(f"{d}: the run failed:\n{run.stderr[-3000:]}\nthe service's log:\n{log}")
            got[side].append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(f"round {rnd + 1}, {side} ({d}, {settings}): {got[side][-1]}", flush=True)
    for (side, d, settings), runs in zip(sides, got.values()):
        print(f"{side} ({d}, {settings}): median of {len(runs)}: " + ", ".join(f"{k} {statistics.median(r[k] for r in runs):,.0f}" for k in runs[0]))


if __name__ == "__main__":
    main()
