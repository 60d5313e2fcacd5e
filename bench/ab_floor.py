"""Two checkouts' section 0 side by side, in one run: `python -m bench.ab_floor DIR_A DIR_B [--rounds N]`.

What `holorec bench serve`'s floor section measures (one event, a new user's first event and one recommendation at concurrency 1 against
GET /livez and a bare Redis GET and SET of a record-sized value), for both checkouts at once: both services run
side by side (1 uvicorn worker each, the same Redis, random-weight HoloMambaRec over 3,706 items built by each
checkout in its own format, 500 users warmed), and every round sends each service its requests in turn (the
order swapped every round), so drift over the run hits both alike; both services on one CPU and this client on
another, where there are two, so neither side shares the client's CPU by chance (harness.split_cpus). Separate
runs of section 0 on this machine differed by more than the changes being judged
(bench/results/cpu-2026-12-05b/floor_ab_packed/README.md). A checkout is a
directory holding this repository at some revision (`git worktree add DIR REV`); its own service code runs.
`--set a|b NAME=VALUE` gives one side a setting (HOLOREC_NAME) the other lacks: `. . --set a access_log=true` compares
two settings of one checkout.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.harness import Service, on_cpus, side_settings, split_cpus
from bench.serve import N_ITEMS, RawHTTP, clear_namespace, floor_adds

REDIS = "redis://127.0.0.1:6379/0"
USERS = 500
CHECKPOINT = """
import sys
from pathlib import Path
from bench.serve import make_checkpoint, N_ITEMS
make_checkpoint(Path(sys.argv[1]), N_ITEMS)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs=2, type=Path)
    ap.add_argument("--rounds", type=int, default=3000)
    ap.add_argument("--out", type=Path, help="write the figures here as JSON too")
    ap.add_argument("--set", nargs=2, action="append", default=[], metavar=("SIDE", "NAME=VALUE"), help="a setting for side a or b alone")
    args = ap.parse_args()
    print(json.dumps(run(args.dirs, args.rounds, args.out, side_settings(args.set)), indent=1))


def run(dirs: list[Path], rounds: int, out: Path | None = None, settings: list[dict[str, str]] | None = None) -> dict[str, Any]:
    import httpx
    import redis

    from service.store import user_key

    tmp = Path(tempfile.mkdtemp(prefix="holorec-abfloor-"))
    names = [f"{'ab'[i]}-{uuid.uuid4().hex[:8]}" for i in range(2)]
    r = redis.Redis.from_url(REDIS)
    labels = ["a", "b"]  # dirs[0], dirs[1]
    placement = split_cpus()  # both services on one CPU, this client on another: the same for both sides
    times: dict[str, dict[str, list[float]]] = {k: {} for k in labels}
    try:
        with ExitStack() as stack:
            clients = []
            for d, ns, extra in zip(dirs, names, settings or [{}, {}]):
                ckpt = tmp / ns
                subprocess.run([sys.executable, "-c", CHECKPOINT, str(ckpt)], cwd=d, check=True)
                srv = stack.enter_context(Service(ckpt, REDIS, ns, log=tmp / f"{ns}.log", root=d, cpus=placement[0] if placement else None, **extra))
                with httpx.Client(base_url=srv.url, timeout=30) as c:
                    for u in range(USERS):
                        events = [{"user_id": f"f{u}", "item_id": f"item-{1 + j}"} for j in range(20)]
                        assert c.post("/events", json={"events": events}).status_code == 200
                http = RawHTTP(srv.url)
                stack.callback(http.close)
                clients.append(http)
            stack.enter_context(on_cpus(placement[1] if placement else None))
            record = r.get(user_key(names[0], "f0"))
            assert record is not None, "no record written"
            probe = f"holorec:{names[0]}:floor-probe"
            r.set(probe, record)
            rng = random.Random(0)
            for i in range(rounds):
                user, item = f"f{rng.randrange(USERS)}", f"item-{rng.randrange(1, N_ITEMS + 1)}"
                body = json.dumps({"events": [{"user_id": user, "item_id": item}]}).encode()
                first = json.dumps({"events": [{"user_id": f"n{i}", "item_id": item}]}).encode()  # a user with no record yet
                for k in ((0, 1) if i % 2 == 0 else (1, 0)):
                    http, t = clients[k], times[labels[k]]
                    for name, request in (("livez", http.encode("GET", "/livez")), ("event", http.encode("POST", "/events", body)),
                                          ("recommend", http.encode("GET", f"/recommend/{user}")),
                                          ("first_event", http.encode("POST", "/events", first))):
                        t0 = time.perf_counter()
                        http.send(request)
                        t.setdefault(name, []).append((time.perf_counter() - t0) * 1000)
                for name, fn in (("redis_get", lambda: r.get(probe)), ("redis_set", lambda: r.set(probe, record))):
                    t0 = time.perf_counter()
                    fn()
                    for t in times.values():
                        t.setdefault(name, []).append((time.perf_counter() - t0) * 1000)
    finally:
        for ns in names:
            clear_namespace(REDIS, ns)
    result: dict[str, Any] = {"rounds": rounds, "record_bytes": len(record), "dirs": [str(d) for d in dirs], "settings": settings or [{}, {}],
                              "cpus": {"services": sorted(placement[0]), "client": sorted(placement[1])} if placement else None}
    for label, t in times.items():
        p50 = {k: statistics.median(v) for k, v in t.items()}
        result[label] = {"p50_ms": p50, **floor_adds(p50)}
    if out:
        out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
