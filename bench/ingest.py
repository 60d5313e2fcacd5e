"""Getting events in: `holorec bench warm` -> bench/results/ingest.{json,md}; the stream fault scenario.

Sections:
  warm     users/s of `holorec warm` (one parallel forward per batch) on a Beauty-sized synthetic log (22,363
           users) and a 1M-user one, against posting the same users' events through POST /events in
           1,000-event batches.
  stream   events/s through a Redis Stream with 1 and 2 `holorec consume` processes, beside POST /events in
           100-event batches.
`stream_faults` (tests/test_consume.py runs it small): consumers SIGKILLed and Redis SIGKILLed and restarted
from its AOF while events are produced, plus replayed event ids; per user, applied == produced, applied in the
produced order, and the state equals a clean replay.

Everything runs on loopback against our own redis-server processes (bench/faults.py's harness); every process
started here is stopped on the way out. Random-weight models: these figures are about throughput, not accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import redis

from bench.faults import read_records
from bench.harness import ConsumerProcess, RedisServer, Service, make_checkpoint, wait_for


def make_events(n_users: int, n_events: int, n_items: int = 40, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"user_id": f"user-{rng.randrange(n_users)}", "item_id": f"item-{rng.randint(1, n_items)}", "event_id": f"e-{n}",
             "timestamp": str(1_700_000_000 + n)} for n in range(n_events)]


def produce(url: str, stream: str, events: list[dict[str, str]], *, chunk: int = 100, pause_s: float = 0.0) -> None:
    """XADD the events in pipelines of `chunk`, each chunk retried until Redis takes it (within 60 s): an XADD whose
    reply was lost is then in the stream twice, which the event ids make harmless."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    for start in range(0, len(events), chunk):
        deadline = time.monotonic() + 60
        while True:
            try:
                pipe = client.pipeline(transaction=False)
                for e in events[start : start + chunk]:
                    pipe.xadd(stream, e)
                pipe.execute()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        time.sleep(pause_s)


def drained(client: redis.Redis, stream: str, group: str) -> bool:
    """Every entry delivered to the group and acknowledged."""
    info = client.xinfo_stream(stream)
    g = next(x for x in client.xinfo_groups(stream) if x["name"] in (group, group.encode()))
    return g["pending"] == 0 and g["last-delivered-id"] == info["last-generated-id"]


def clean_replay_mismatches(checkpoint: Path, client: redis.Redis, namespace: str, events: list[dict[str, str]]) -> list[str]:
    """Users whose stored state and vector differ (beyond 1e-4) from applying their events once, in order, afresh."""
    import numpy as np
    import torch

    from model.checkpoint import load
    from model.state import unpack
    from service import record as rec
    from service.engine import Engine, Event
    from service.settings import Settings
    from service.store import MemoryStore

    clean = Engine(load(checkpoint), MemoryStore(), Settings(namespace=namespace, state_codec="float32"))
    clean.apply([[Event(e["user_id"], e["item_id"], e["event_id"]) for e in events]])
    bad = []
    for u in sorted({e["user_id"] for e in events}):
        a, b = (rec.decode(blob, clean.version, clean.d) for blob in (client.get(clean.key(u)), clean.store.get(clean.key(u))))
        sa, sb = (unpack([r.state], clean.template) for r in (a, b))
        if not (np.allclose(a.vector, b.vector, atol=1e-4) and all(torch.allclose(sa[k], sb[k], atol=1e-4) for k in sa)):
            bad.append(u)
    return bad


def order_mismatches(checkpoint: Path, client: redis.Redis, namespace: str, events: list[dict[str, str]]) -> dict[str, int]:
    """user -> the first position where the event ids the record remembers applying (its dedup ring, oldest first)
    depart from the user's produced order; empty when every user's events went in in order."""
    import numpy as np

    from model.checkpoint import load
    from service import record as rec
    from service.store import user_key

    ckpt = load(checkpoint)
    out = {}
    for u in sorted({e["user_id"] for e in events}):
        r = rec.decode(client.get(user_key(namespace, u)), ckpt.version, ckpt.model.config.d_model)
        ring = [int(h) for h in np.roll(r.dedup, -r.dedup_pos) if h]
        produced = [rec.event_hash(e["event_id"]) for e in events if e["user_id"] == u][-len(ring) :]
        if ring != produced:
            out[u] = next((i for i, (a, b) in enumerate(zip(ring, produced)) if a != b), min(len(ring), len(produced)))
    return out


def stream_faults(workdir: Path, checkpoint: Path, *, n_users: int = 20, n_events: int = 4000, replays: int = 200,
                  claim_idle_ms: int = 1000, log_dir: Path | None = None) -> dict:
    """Two consumers in one group; one SIGKILLed mid-stream and another started; Redis SIGKILLed and restarted from
    its AOF; then `replays` entries re-sent with earlier event ids. -> per user produced vs applied, and states."""
    server = RedisServer(Path(workdir) / "redis", "--appendonly", "yes", "--appendfsync", "everysec")
    stream, group, ns = "holorec:faults:events", "holorec", "faults"
    events = make_events(n_users, n_events)
    consumers: list[ConsumerProcess] = []

    def start(name: str) -> None:
        consumers.append(ConsumerProcess(checkpoint, server.url, ns, stream, group, name, stream_batch=50,
                                         state_codec="float32",  # lossless: an event applied twice shows in the state
                                         stream_block_ms=200, stream_claim_idle_ms=claim_idle_ms,
                                         log=log_dir / f"{name}.log" if log_dir else None))

    try:
        client = server.client()
        start("a")
        start("b")
        wait_for("both consumers in the group", lambda: len(client.xinfo_consumers(stream, group)) == 2, 90)
        entries_read = lambda: client.xinfo_groups(stream)[0].get("entries-read") or 0  # noqa: E731
        producer = threading.Thread(target=produce, args=(server.url, stream, events), kwargs={"pause_s": 0.02})
        producer.start()
        wait_for("a quarter of the events read", lambda: entries_read() >= n_events // 4, 60, 0.002)
        consumers[0].kill()  # SIGKILL, most likely with a batch in hand: its entries stay pending
        start("c")
        wait_for("half of the events read", lambda: entries_read() >= n_events // 2, 60, 0.002)
        server.kill()  # SIGKILL Redis while events are produced and applied
        time.sleep(0.5)
        server.start()  # the same directory: Redis replays its AOF before answering
        producer.join(120)
        again = random.Random(1).sample(events, replays)  # the same event ids once more
        produce(server.url, stream, again)
        wait_for("the stream drained", lambda: drained(client, stream, group), 120, 0.1)
        records = read_records(client, checkpoint, ns, sorted({e["user_id"] for e in events}))
        produced: dict[str, int] = {}
        for e in events:
            produced[e["user_id"]] = produced.get(e["user_id"], 0) + 1
        return {"events": n_events, "replayed": replays, "users": len(produced),
                "users_applied_ne_produced": {u: (n, records[u][0]) for u, n in produced.items() if records[u][0] != n},
                "users_order_ne_produced": order_mismatches(checkpoint, client, ns, events),
                "users_state_ne_clean_replay": clean_replay_mismatches(checkpoint, client, ns, events),
                "dead_letters": client.xlen(stream + ":dead") if client.exists(stream + ":dead") else 0}
    finally:
        for c in consumers:
            c.stop()
        server.kill()


# --- holorec bench warm -----------------------------------------------------------------------------
def _post(url: str, events: list[dict], per_request: int, clients: int = 4) -> float:
    """POST /events in requests of `per_request` events from `clients` threads; -> seconds. Any non-200 raises."""
    events = [{**e, "timestamp": float(e["timestamp"])} if "timestamp" in e else e for e in events]
    chunks = [events[i : i + per_request] for i in range(0, len(events), per_request)]
    t0 = time.perf_counter()

    def send(part: list[list[dict]]) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            for body in part:
                c.post("/events", json={"events": body}).raise_for_status()

    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(send, chunks[i::clients]) for i in range(clients)]:
            f.result()
    return time.perf_counter() - t0


def bench_warm(work: Path, name: str, n_users: int, sample_users: int) -> dict:
    from model.checkpoint import load
    from model.synthetic import synthetic
    from service.engine import Engine
    from service.settings import Settings
    from service.store import RedisStore
    from service.warm import warm

    ds = synthetic(n_users=n_users, n_items=12101, n_attrs=12, seq_len=(5, 13))  # Beauty: 8.9 items per user
    ckpt = make_checkpoint(work / f"ckpt-{name}", items=ds.items, n_attrs=0, d_model=64)  # the served size, random weights
    server = RedisServer(work / f"redis-{name}")
    try:
        s = Settings(redis_url=server.url, namespace="warm")
        res = warm(Engine(load(ckpt), RedisStore(server.url), s), ds, progress=False)
        svc = Service(ckpt, server.url, "post")
        try:
            sample = [{"user_id": ds.users[u], "item_id": ds.items[i - 1]} for u in range(min(sample_users, n_users)) for i in ds.sequences[u]]
            seconds = _post(svc.url, sample, 1000)
        finally:
            svc.stop()
        post_rate = min(sample_users, n_users) / seconds
        return {"users": n_users, "events": ds.n_interactions, "warm_users_per_s": res["users_per_s"],
                "warm_seconds": res["seconds"], "post_users_per_s": round(post_rate, 1), "post_sample_users": min(sample_users, n_users),
                "speedup": round(res["users_per_s"] / post_rate, 1)}
    finally:
        server.kill()


def bench_stream(work: Path, n_events: int, n_users: int = 1000) -> dict:
    ckpt = make_checkpoint(work / "ckpt-stream", n_items=1000, n_attrs=0, d_model=64)
    out: dict = {"events": n_events, "users": n_users}
    events = make_events(n_users, n_events, n_items=1000)
    for n in (1, 2):
        server = RedisServer(work / f"redis-stream{n}")
        stream, consumers = "holorec:bench:events", []
        try:
            consumers = [ConsumerProcess(ckpt, server.url, "bench", stream, "g", f"c{i}") for i in range(n)]
            client = server.client()
            wait_for("consumers in the group", lambda: client.exists(stream) and len(client.xinfo_consumers(stream, "g")) == n, 120)
            t0 = time.perf_counter()
            produce(server.url, stream, events, chunk=1000)
            wait_for("the stream drained", lambda: drained(client, stream, "g"), 600, 0.02)
            out[f"consumers_{n}_events_per_s"] = round(n_events / (time.perf_counter() - t0), 1)
        finally:
            for c in consumers:
                c.stop()
            server.kill()
    server = RedisServer(work / "redis-post")
    try:
        svc = Service(ckpt, server.url, "bench")
        try:
            out["post_100_events_per_s"] = round(n_events / _post(svc.url, events, 100), 1)
        finally:
            svc.stop()
    finally:
        server.kill()
    return out


def run(args: argparse.Namespace) -> dict:
    from model.train import set_threads

    set_threads()  # the in-process warm runs torch as a service worker would (HOLOREC_THREADS)
    out = Path(getattr(args, "out", "bench/results"))
    out.mkdir(parents=True, exist_ok=True)
    quick = getattr(args, "quick", False)
    results: dict = {"machine": f"{os.cpu_count()} cores", "command": "holorec bench warm" + (" --quick" if quick else ""),
                     "load_avg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="holorec-ingest-") as tmp:
        work = Path(tmp)
        sizes = {"beauty": (2000, 500), "1m": (20000, 500)} if quick else {"beauty": (22363, 22363), "1m": (1_000_000, 20000)}
        results["warm"] = {k: bench_warm(work, k, n, sample) for k, (n, sample) in sizes.items()}
        results["stream"] = bench_stream(work, 2000 if quick else 50000)
    results["load_avg_end"] = os.getloadavg()
    (out / "ingest.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "ingest.md").write_text(_markdown(results))
    print((out / "ingest.md").read_text())
    return results


def _markdown(r: dict) -> str:
    lines = [f"# Getting events in (`{r['command']}`, {r['machine']}, load {r['load_avg_start']})", "",
             "## holorec warm vs POST /events (1,000-event batches)", "",
             "| log | users | events | warm users/s | POST users/s (sample) | speedup |", "|---|---:|---:|---:|---:|---:|"]
    for k, v in r["warm"].items():
        lines.append(f"| {k} | {v['users']:,} | {v['events']:,} | {v['warm_users_per_s']:,} | {v['post_users_per_s']:,} "
                     f"({v['post_sample_users']:,}) | {v['speedup']}x |")
    s = r["stream"]
    lines += ["", f"## Redis Stream vs POST /events (100-event batches): {s['events']:,} events, {s['users']:,} users", "",
              "| path | events/s |", "|---|---:|",
              f"| holorec consume, 1 process | {s['consumers_1_events_per_s']:,} |",
              f"| holorec consume, 2 processes | {s['consumers_2_events_per_s']:,} |",
              f"| POST /events, 100 per request, 4 clients | {s['post_100_events_per_s']:,} |", ""]
    return "\n".join(lines)
