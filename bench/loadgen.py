"""The load generator of `holorec bench serve`: `python -m bench.loadgen SPEC` in its own process.

asyncio (+ uvloop when installed) over raw keep-alive HTTP/1.1 connections, bounded by a request
count and a deadline; latency measured per request from write to the last body byte. It imports
no torch, so it starts in a fraction of a second even on a busy machine. It prints "started" when
its load begins and, at the end, one JSON line of figures.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _request_maker(spec: dict[str, Any]):
    """A function returning the next request's bytes and its (first) user, per spec["kind"]: event | batch | recommend | livez."""
    rng = random.Random(spec.get("seed", 0))
    host = f"127.0.0.1:{spec['port']}"
    users, n_users, n_items = spec.get("users"), spec.get("n_users", 10_000), spec["n_items"]
    counter = [0]

    def user() -> str:
        if users:
            counter[0] += 1
            return users[counter[0] % len(users)]
        return f"lu{rng.randrange(n_users)}"

    def post(events: list[dict[str, str]]) -> tuple[bytes, str]:
        body = json.dumps({"events": events}).encode()
        return (f"POST /events HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body, events[0]["user_id"]

    def get(path: str, u: str = "") -> tuple[bytes, str]:
        return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(), u

    kind = spec["kind"]
    if kind == "event":
        return lambda: post([{"user_id": user(), "item_id": f"item-{rng.randrange(1, n_items + 1)}"}])
    if kind == "batch":
        return lambda: post([{"user_id": user(), "item_id": f"item-{rng.randrange(1, n_items + 1)}"} for _ in range(spec["batch"])])
    if kind == "recommend":
        def recommend() -> tuple[bytes, str]:
            u = user()
            return get(f"/recommend/{u}?k=10", u)
        return recommend
    if kind == "livez":  # the floor: uvicorn + FastAPI answering a route that does nothing
        return lambda: get("/livez")
    raise ValueError(kind)


async def _load(spec: dict[str, Any]) -> dict[str, Any]:
    make = _request_maker(spec)
    lat: list[float] = []
    split = bool(spec.get("by_user"))
    by_user: dict[str, tuple[list[float], dict[str, int]]] = {}  # when split: latencies, errors by the request's user
    errors: dict[str, int] = {}
    left = [spec["requests"]]
    deadline = time.perf_counter() + spec["seconds"]  # counted from here: after start-up, before the connections open

    async def conn() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", spec["port"])
        try:
            while left[0] > 0 and time.perf_counter() < deadline:
                left[0] -= 1
                req, tag = make()
                t0 = time.perf_counter()
                writer.write(req)
                status = int((await reader.readline()).split()[1])
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                lat.append(time.perf_counter() - t0)
                if status != 200:
                    errors[str(status)] = errors.get(str(status), 0) + 1
                if split:
                    mine = by_user.setdefault(tag, ([], {}))
                    mine[0].append(lat[-1])
                    if status != 200:
                        mine[1][str(status)] = mine[1].get(str(status), 0) + 1
        finally:
            writer.close()

    print("started", flush=True)
    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(conn() for _ in range(spec["concurrency"]))), spec["seconds"] + 30)
    wall = time.perf_counter() - t0
    out = {"requests": len(lat), "seconds": wall, "errors": errors, **_percentiles(lat), "per_s": len(lat) / wall}
    if split:
        out["by_user"] = {u: {"requests": len(v), "errors": e, **_percentiles(v)} for u, (v, e) in by_user.items()}
    return out


def _percentiles(lat: list[float]) -> dict[str, float]:
    if not lat:
        return {"p50_ms": math.nan, "p95_ms": math.nan, "p99_ms": math.nan, "mean_ms": math.nan}
    q = np.percentile(np.array(lat) * 1e3, [50, 95, 99])
    return {"p50_ms": float(q[0]), "p95_ms": float(q[1]), "p99_ms": float(q[2]), "mean_ms": float(np.mean(lat) * 1e3)}


def start(spec: dict[str, Any]) -> subprocess.Popen[str]:
    """Start the load generator in a fresh process; returns when it is about to open its connections
    and send (it prints "started"), so a sampler can be timed to the load rather than to start-up."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.loadgen", json.dumps(spec)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline() if proc.stdout else ""
    if first.strip() != "started":
        _, err = proc.communicate(timeout=60)
        raise RuntimeError(f"load generator failed to start: {first}{err[-2000:]}")
    return proc


def finish(proc: subprocess.Popen[str], spec: dict[str, Any]) -> dict[str, Any]:
    """Wait for a started load generator and return its figures."""
    out, err = proc.communicate(timeout=spec["seconds"] + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the load generator in a fresh process and return its figures."""
    return finish(start(spec), spec)


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(_load(json.loads(sys.argv[1])))))
