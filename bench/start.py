"""How long a service process takes to get ready, compiled-step cache off against warm: `python -m bench.start [--rounds N] [--out F]`.

Every round starts one fresh process per case (order swapped every round, so drift hits both alike). Each imports the
app and runs its startup as uvicorn would (checkpoint load, the engine's compiled steps, the embedded store) and
reports its wall-clock and CPU seconds from its own start. The checkpoint is `holorec bench serve`'s: random-weight
HoloMambaRec over 3,706 items. "warm" reads a cache directory one unmeasured start filled (Settings.graph_cache_dir);
"off" exports the graphs every time, as every start did before the cache.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import ROOT
from bench.serve import N_ITEMS, make_checkpoint

CHILD = """
import asyncio, json, os, sys, time
from service.app import app_from_env
app = app_from_env().app
async def ready():
    async with app.router.lifespan_context(app):
        pass
asyncio.run(ready())
t = os.times()
print(json.dumps({"wall_s": time.time() - float(sys.argv[1]), "cpu_s": t.user + t.system, "onnx_imported": "onnx" in sys.modules}))
"""


def start(checkpoint: Path, cache: str) -> dict:
    env = {**os.environ, "HOLOREC_CHECKPOINT": str(checkpoint), "HOLOREC_GRAPH_CACHE_DIR": cache,
           "HOLOREC_THREADS": os.environ.get("HOLOREC_THREADS", "1")}
    env.pop("HOLOREC_REDIS_URL", None)  # the embedded store: the start itself, not a Redis round trip
    out = subprocess.run([sys.executable, "-c", CHILD, str(time.time())], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", help="write the result as JSON here too")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, cache = Path(tmp) / "ckpt", str(Path(tmp) / "graphs")
        make_checkpoint(ckpt, N_ITEMS)
        start(ckpt, cache)  # fills the cache
        runs: dict[str, list[dict]] = {"off": [], "warm": []}
        for r in range(args.rounds):
            for case in ("off", "warm") if r % 2 == 0 else ("warm", "off"):
                runs[case].append(start(ckpt, "" if case == "off" else cache))
    result = {"command": f"python -m bench.start --rounds {args.rounds}", "rounds": args.rounds,
              **{case: {k: round(statistics.median(x[k] for x in rs), 3) for k in ("wall_s", "cpu_s")} | {"onnx_imported": rs[0]["onnx_imported"]}
                 for case, rs in runs.items()}}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
