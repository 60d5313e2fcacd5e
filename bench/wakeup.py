"""What a blocking wait costs the work after it: `python -m bench.wakeup [--rounds N] [--out FILE]`.

An event's parts cost more inside the service than alone in a loop (README: Serving over HTTP). The process waits
twice per event, for the request and for Redis's reply to the compare-and-set, and on a virtual machine an idle
wait can leave the CPU's caches to others and take long to wake from. Three measurements, medians over `rounds`:
- the packed step the service runs (model/fast_step.py, on `holorec bench serve`'s random-weight checkpoint) back
  to back, and right after each of: pure Python work (record decode and encode), a Redis PING, a 0.2 ms sleep, a
  pass over 2 MB of memory;
- a Redis PING round trip with the other CPUs free to idle, and with one busy loop per CPU at nice 19 keeping them
  awake (they yield to this process and to Redis);
- one event at concurrency 1 through the service (uvicorn, one worker, as `holorec bench serve`'s load section
  measures it, with the same breakdown from the service's own histograms), idle and awake taking turns;
- the event's own pieces of Python work warm, back to back (`parts_us`: a record at the default settings decoded
  and encoded, the window's push and the seen filter's update, the body parsed and validated, the answer's JSON, one
  turn of the event loop): what trimming them could save at most, against the app's own time in the service.
Nothing else should run meanwhile. Redis at 127.0.0.1:6379 (or --redis).
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
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3000)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--out", type=Path, help="write the figures here as JSON too")
    args = ap.parse_args()
    res = run(args.rounds, args.redis)
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))


def run(rounds: int, redis_url: str, repeats: int = 3) -> dict[str, Any]:
    """`repeats`: rounds of the service's idle and awake event runs (the smoke test runs one)."""
    import torch

    from bench.serve import N_ITEMS, make_checkpoint

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ck"
        model = make_checkpoint(ckpt, N_ITEMS).model.eval()
        out = _step_and_ping(model, rounds, redis_url)
        out["parts_us"] = _parts(model, rounds)
        out["parts_sum_us"] = sum(out["parts_us"].values())
        out["event_c1"] = _event_c1(ckpt, redis_url, max(1, rounds // 3), repeats)
    return out


def _step_and_ping(model: Any, rounds: int, redis_url: str) -> dict[str, Any]:
    import redis

    from bench.serve import _median_ms
    from model.fast_step import packed_step
    from model.state import pack
    from service import record as rec

    step = packed_step(model, "int8")
    if step is None:
        raise SystemExit("no packed step for this model (ONNX Runtime missing?)")
    blob, items = pack(model.init_state(1), "int8")[0], np.array([5], np.int64)
    conn = redis.Redis.from_url(redis_url).connection_pool.get_connection()
    record = rec.empty("v", "int8", 50, 256, 384, 64, blob)
    encoded = rec.encode(record)
    scratch = bytearray(2 << 20)

    def ping() -> None:
        conn.send_command("PING")
        conn.read_response()

    def python_work() -> None:
        for _ in range(6):
            rec.encode(rec.decode(encoded, "v", 64))

    def memory_pass() -> None:
        scratch[::64] = bytes(len(scratch) // 64)

    before: dict[str, Callable[[], Any]] = {"another step (back to back)": lambda: step(items, [blob]), "pure Python work": python_work,
                                            "a Redis PING": ping, "a 0.2 ms sleep": lambda: time.sleep(0.0002),
                                            "a pass over 2 MB": memory_pass}
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in before}
    for _ in range(rounds):  # the cases take turns, so drift hits each alike; each timed step follows its own case
        for name, other in before.items():
            t0 = time.perf_counter_ns()
            other()
            t1 = time.perf_counter_ns()
            step(items, [blob])
            times[name][0].append(t1 - t0)
            times[name][1].append(time.perf_counter_ns() - t1)
    out: dict[str, Any] = {"rounds": rounds, "cpus": os.cpu_count(), "step_after_us": {}, "before_us": {}}
    for name, (o, s) in times.items():
        out["before_us"][name] = statistics.median(o) / 1e3
        out["step_after_us"][name] = statistics.median(s) / 1e3
    out["ping_us"] = {"other CPUs free to idle": _median_ms(ping, rounds) * 1e3}
    with awake():
        out["ping_us"]["one nice-19 busy loop per CPU"] = _median_ms(ping, rounds) * 1e3
    return out


def _parts(model: Any, rounds: int) -> dict[str, float]:
    """Median µs of each piece of an event's own Python work, warm, the pieces taking turns (ten calls a round)."""
    import asyncio

    import uvloop

    from model.seen import SeenFilter
    from model.state import pack
    from service import record as rec
    from service.api import EVENTS_IN, json_bytes, parse_body
    from service.settings import Settings

    s = Settings.model_fields
    slots, dedup, seen_bytes = (s[k].default for k in ("history_slots", "dedup_slots", "seen_filter_bytes"))
    record = rec.empty("v", "int8", slots, dedup, seen_bytes, model.config.d_model, pack(model.init_state(1), "int8")[0])
    blob, seen = rec.encode(record), SeenFilter([f"item-{i}" for i in range(1, model.config.n_items + 1)], seen_bytes)
    body = json.dumps({"events": [{"user_id": "u1", "item_id": "item-5"}]}).encode()
    answer = {"applied": 1, "duplicate": 0, "unknown": 0, "unknown_items": []}

    async def turns(n: int) -> None:
        for _ in range(n):
            await asyncio.sleep(0)

    loop = uvloop.new_event_loop()
    parts: dict[str, tuple[Callable[[], Any], int]] = {  # (a call, the pieces it does)
        "record decode": (lambda: [rec.decode(blob, "v", model.config.d_model) for _ in range(10)], 10),
        "record encode": (lambda: [rec.encode(record) for _ in range(10)], 10),
        "window push": (lambda: [record.push(7) for _ in range(10)], 10),
        "seen filter update": (lambda: [seen.add(record.seen_filter, [7]) for _ in range(10)], 10),
        "body parsed and validated": (lambda: [EVENTS_IN.validate_python(parse_body(body)) for _ in range(10)], 10),
        "answer JSON": (lambda: [json_bytes(answer) for _ in range(10)], 10),
        # starting a coroutine on the loop costs tens of turns: enough turns per call to make it small
        "a turn of the event loop (uvloop)": (lambda: loop.run_until_complete(turns(500)), 500)}
    times: dict[str, list[float]] = {k: [] for k in parts}
    try:
        for _ in range(rounds):
            for name, (fn, n) in parts.items():
                t0 = time.perf_counter_ns()
                fn()
                times[name].append((time.perf_counter_ns() - t0) / n)
    finally:
        loop.close()
    return {k: statistics.median(v) / 1e3 for k, v in times.items()}


@contextmanager
def awake() -> Iterator[None]:
    """One busy loop per CPU at nice 19: no CPU goes idle, and any other process takes the CPU from them at once."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=lambda: os.nice(19))
                for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.5)
        yield
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def _event_c1(ckpt: Path, redis_url: str, requests: int, repeats: int = 3) -> dict[str, Any]:
    """One-event POSTs at concurrency 1, idle and awake in turn: per condition the median p50 and the breakdown
    of all its requests (client mean, and from the service's histograms Redis, step and the rest), as ms."""
    from bench.harness import Service
    from bench.serve import HISTORY_USERS, N_ITEMS, _breakdown, _server_sums, clear_namespace, loadgen, prefill

    ns = f"bench-wakeup-{uuid.uuid4().hex[:8]}"
    runs: dict[str, list[dict[str, Any]]] = {"idle": [], "awake": []}
    sums: dict[str, list[tuple[dict, dict]]] = {"idle": [], "awake": []}
    try:
        with Service(ckpt, redis_url, ns) as srv:
            loadgen(prefill(srv.port, 40))  # users with history, as section_load's
            for rep in range(repeats):
                for cond in ("idle", "awake"):
                    with awake() if cond == "awake" else nullcontext():
                        before = _server_sums(srv.port)
                        res = loadgen({"kind": "event", "concurrency": 1, "port": srv.port, "n_items": N_ITEMS, "n_users": HISTORY_USERS,
                                       "seed": 2 * rep + (cond == "awake"), "seconds": 30, "requests": requests})
                        sums[cond].append((before, _server_sums(srv.port)))
                    runs[cond].append(res)
    finally:
        clear_namespace(redis_url, ns)
    out: dict[str, Any] = {"requests_each": requests, "repeats": repeats}
    for cond in ("idle", "awake"):
        parts = [_breakdown(b, a, [r]) for (b, a), r in zip(sums[cond], runs[cond])]
        n = [r["requests"] for r in runs[cond]]
        mean = {k: sum(p[k] * w for p, w in zip(parts, n)) / sum(n) for k in parts[0] if k.endswith("_ms")}
        mean["app_own_ms"] = mean["client_mean_ms"] - mean["redis_get_ms"] - mean["redis_cas_ms"] - mean["model_step_ms"]
        out[cond] = {"p50_ms": statistics.median(r["p50_ms"] for r in runs[cond]), **mean}
    return out


if __name__ == "__main__":
    main()
