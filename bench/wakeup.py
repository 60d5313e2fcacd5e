"""What a blocking wait costs the work after it: `python -m bench.wakeup [--rounds N] [--out FILE]`.

An event's parts cost more inside the service than alone in a loop (README: Serving over HTTP). The process waits
twice per event, for the request and for Redis's reply to the compare-and-set, and on a virtual machine an idle
wait can leave the CPU's caches to others and take long to wake from. Two measurements, medians over `rounds`:
- the packed step the service runs (model/fast_step.py, on `holorec bench serve`'s random-weight checkpoint) back
  to back, and right after each of: pure Python work (record decode and encode), a Redis PING, a 0.2 ms sleep, a
  pass over 2 MB of memory;
- a Redis PING round trip with the other CPUs free to idle, and with one busy loop per CPU at nice 19 keeping them
  awake (they yield to this process and to Redis).
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
from collections.abc import Callable
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


def run(rounds: int, redis_url: str) -> dict[str, Any]:
    import redis
    import torch

    from bench.serve import N_ITEMS, make_checkpoint
    from model.checkpoint import load
    from model.fast_step import packed_step
    from model.state import pack
    from service import record as rec

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(Path(tmp) / "ck", N_ITEMS)
        model = load(str(Path(tmp) / "ck")).model.eval()
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
    out["ping_us"] = {"other CPUs free to idle": _median_us(ping, rounds)}
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=lambda: os.nice(19))
                for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.5)
        out["ping_us"]["one nice-19 busy loop per CPU"] = _median_us(ping, rounds)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    return out


def _median_us(fn: Callable[[], None], n: int) -> float:
    xs = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        xs.append(time.perf_counter_ns() - t0)
    return statistics.median(xs) / 1e3


if __name__ == "__main__":
    main()
