"""`holorec bench memory`: what a user costs in Redis, part by part, and what shrinking it costs in NDCG@10.

1. Redis `used_memory` per user (INFO memory on a fresh redis-server, no persistence): with the committed
   defaults, 100,000 users (2,000 with --quick) posted over HTTP through the service and as many written by
   `holorec warm`'s engine path; then every (model size, codec) of the frontier, 20,000 users each, written by
   the engine. Each row splits the record into its parts (header, window, dedup ring, seen filter, user
   vector, state) and Redis's own per-key overhead (key, dict entry, allocator rounding).
2. The accuracy-bytes frontier: NDCG@10 of each model size served through each codec, read from the results
   of `holorec bench accuracy --codecs ...` (bench/results/frontier/; see the README for the command), beside
   the record's bytes. Writes OUT/memory.json, OUT/memory.md and (`holorec bench plots` draws OUT/memory_frontier.png).

Weights are random here: bytes do not depend on them. MovieLens-1M's catalogue size (3,706 items, 18 genres).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from bench.harness import command, hardware
from bench.accuracy import row_overrides
from bench.harness import RedisServer, Service, make_checkpoint
from model import ModelConfig
from model.checkpoint import Checkpoint, load
from model.state import CODECS, packed_size
from model.train import set_threads
from service import record as rec
from service.engine import Engine, Event
from service.settings import Settings
from service.store import RedisStore, user_keys

N_ITEMS, N_ATTRS, MAX_ATTRS = 3706, 18, 3
FRONTIER = "frontier/accuracy_*.json"  # bench accuracy --codecs ... --out OUT/frontier: a table per dataset


def checkpoint(path: Path, **overrides: int) -> Path:
    """The bench's model: d_model 64 and the other ModelConfig defaults, but for `overrides`."""
    return make_checkpoint(path, n_items=N_ITEMS, n_attrs=N_ATTRS, max_attrs=MAX_ATTRS, d_model=64, max_len=50, **overrides)


def parts(ckpt: Checkpoint, s: Settings) -> dict[str, int]:
    """Bytes of each part of one record under these settings (service/record.py's layout)."""
    d = ckpt.model.config.d_model
    return {"header": rec.HEADER.size, "window": s.history_slots * (2 if len(ckpt.items) < 2**16 else 4),
            "dedup ring": 4 * s.dedup_slots, "seen filter": s.seen_filter_bytes,
            "user vector": d * (4 if s.state_codec == "float32" else 2), "state": packed_size(ckpt.model.init_state(1), s.state_codec)}


def used_per_user(server: RedisServer, write: Any, n: int) -> tuple[float, int]:
    """(Redis used_memory per user after `write(n)` on an empty server, one record's length)."""
    c = server.client()
    c.flushall()
    before = c.info("memory")["used_memory"]
    write(n)
    after = c.info("memory")["used_memory"]
    key = next(k for k in c.scan_iter(user_keys("mem"), count=1000))
    return (after - before) / n, c.strlen(key)


def engine_writer(ckpt_dir: Path, url: str, s: Settings, how: str):  # type: ignore[no-untyped-def]
    engine = Engine(load(ckpt_dir), RedisStore(url), s)

    def write(n: int) -> None:
        for start in tqdm(range(0, n, 1000), desc=f"{how} {n:,} users", unit="k users", leave=False):
            users = [f"user-{u}" for u in range(start, min(n, start + 1000))]
            if how == "warm":
                engine.warm(users, [[1 + u % N_ITEMS, 1 + (7 * u) % N_ITEMS] for u in range(len(users))], [time.time()] * len(users))
            else:
                engine.apply([[Event(u, f"item-{1 + i % N_ITEMS}", event_id=f"e{i}")] for i, u in enumerate(users)])
    return write


def http_writer(svc: Service):  # type: ignore[no-untyped-def]
    def write(n: int) -> None:
        with httpx.Client(base_url=svc.url, timeout=120) as c:
            for start in tqdm(range(0, n, 1000), desc=f"POST /events {n:,} users", unit="k users", leave=False):
                events = [{"user_id": f"user-{u}", "item_id": f"item-{1 + u % N_ITEMS}", "event_id": f"e{u}"} for u in range(start, min(n, start + 1000))]
                r = c.post("/events", json={"events": events})
                r.raise_for_status()
    return write


def run(args: argparse.Namespace) -> dict[str, Any]:
    set_threads()  # the in-process warm runs torch as a service worker would (HOLOREC_THREADS)
    quick = getattr(args, "quick", False)
    n_defaults, n_each = (500, 200) if quick else (100_000, 20_000)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frontiers = [json.loads(p.read_text()) for p in sorted(out.glob(FRONTIER))]
    names = list(dict.fromkeys(n for acc in frontiers for n in acc["runs"])) or ["holomamba:d_state=16", "holomamba"]
    result: dict[str, Any] = {"bench": "memory", "command": command(), "hardware": hardware("cpu"), "items": N_ITEMS,
                              "defaults": Settings().model_dump(include={"state_codec", "history_slots", "dedup_slots", "seen_filter_bytes"}),
                              "model_defaults": {k: getattr(ModelConfig(), k) for k in ("d_model", "n_layers", "d_state", "expand", "d_conv")},
                              "rows": []}
    with tempfile.TemporaryDirectory(prefix="holorec-bench-memory-") as tmp:
        server = RedisServer(Path(tmp) / "redis")
        result["redis_version"] = server.client().info("server")["redis_version"]
        try:
            s = Settings(redis_url=server.url, namespace="mem")
            default_dir = checkpoint(Path(tmp) / "default")
            svc = Service(default_dir, server.url, "mem")
            try:
                for how, write in (("POST /events (service over HTTP)", http_writer(svc)),
                                   ("holorec warm (engine)", engine_writer(default_dir, server.url, s, "warm"))):
                    per_user, length = used_per_user(server, write, n_defaults)
                    result["rows"].append(_row("defaults", how, load(default_dir), s, n_defaults, per_user, length))
                    print(f"  defaults via {how}: record {length:,} B, used_memory {per_user:,.0f} B/user")
            finally:
                svc.stop()
            for name in names:
                ckpt_dir = checkpoint(Path(tmp) / name.replace(":", "_"), **row_overrides(name))
                for codec in CODECS:
                    sc = s.model_copy(update={"state_codec": codec})
                    per_user, length = used_per_user(server, engine_writer(ckpt_dir, server.url, sc, "apply"), n_each)
                    result["rows"].append(_row(name, codec, load(ckpt_dir), sc, n_each, per_user, length))
                    print(f"  {name} {codec}: record {length:,} B, used_memory {per_user:,.0f} B/user")
        finally:
            server.stop()
    result["frontier"] = [f | {"dataset": acc["dataset"]} for acc in frontiers for f in _frontier(acc, result["rows"])] or None
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    (out / "memory.json").write_text(json.dumps(result, indent=2))
    (out / "memory.md").write_text(_markdown(result, frontiers))
    print(f"wrote {out / 'memory.md'} and {out / 'memory.json'}")
    return result


def _row(name: str, how: str, ckpt: Checkpoint, s: Settings, n: int, per_user: float, length: int) -> dict[str, Any]:
    p = parts(ckpt, s)
    assert sum(p.values()) == length, (p, length)  # the layout above is the one written
    return {"model": name, "written_by": how, "codec": s.state_codec, "users": n, "record_bytes": length, "parts": p,
            "used_memory_per_user": round(per_user, 1), "redis_overhead_per_user": round(per_user - length, 1),
            "gb_per_million_users": round(per_user * 1e6 / 1e9, 2)}


def _frontier(acc: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model size, codec): served NDCG@10 mean and std over seeds, beside the record's bytes."""
    out = []
    for name, runs in acc["runs"].items():
        for codec in CODECS:
            xs = [r["test_served"][codec]["NDCG@10"] for r in runs if codec in r.get("test_served", {})]
            row = next((r for r in rows if r["model"] == name and r["codec"] == codec), None)
            if xs and row:
                mean = sum(xs) / len(xs)
                std = (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
                out.append({"model": name, "codec": codec, "seeds": len(xs), "ndcg10": mean, "ndcg10_std": std,
                            "state_bytes": row["parts"]["state"], "record_bytes": row["record_bytes"],
                            "used_memory_per_user": row["used_memory_per_user"]})
    return out


def _markdown(r: dict[str, Any], frontiers: list[dict[str, Any]]) -> str:
    hw = r["hardware"]
    lines = [
        "# Memory: what a user costs in Redis",
        "",
        f"Command: `{r['command']}`. Redis {r['redis_version']}, a fresh server without persistence; used_memory from "
        f"INFO memory before and after writing the users, divided by their number. Catalogue of {r['items']:,} items "
        f"(MovieLens-1M's), random weights (bytes do not depend on them). Service settings: {r['defaults']}; "
        f"model: {r['model_defaults']}. Machine: {hw['cpu']}, {hw['cores']} cores. Finished {r['finished']}.",
        "",
        "| model | written by / codec | users | header | window | dedup ring | seen filter | user vector | state | record | Redis per user | Redis overhead | GB per 1M users |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["rows"]:
        p = x["parts"]
        lines.append(f"| {x['model']} | {x['written_by']} | {x['users']:,} | " + " | ".join(f"{p[k]:,}" for k in
                     ("header", "window", "dedup ring", "seen filter", "user vector", "state"))
                     + f" | {x['record_bytes']:,} | {x['used_memory_per_user']:,.0f} | {x['redis_overhead_per_user']:,.0f} | {x['gb_per_million_users']:.2f} |")
    lines += ["", "Redis overhead: the key's string, its dict entry and object header, and the allocator rounding the value up "
              "to its size class (jemalloc's classes are a quarter of a power of two apart: 512 B steps from 2 to 4 KiB, "
              "1 KiB from 4 to 8, 2 KiB from 8 to 16).", ""]
    for acc in frontiers:
        rows = sorted((f for f in r["frontier"] or [] if f["dataset"] == acc["dataset"]), key=lambda f: f["record_bytes"])
        lines += [
            f"## The accuracy-bytes frontier: {acc['dataset']}",
            "",
            f"NDCG@10 on {acc['dataset']}'s test users, served as the service serves it: each user's whole history stepped "
            f"one event at a time, the state stored through the codec between two events (`evaluate_served`). Trained "
            f"{acc['epochs']} epochs, d_model {acc['d_model']}, lr and dropout per dataset; mean ± std over the seeds. "
            f"Bytes from the table above (MovieLens-1M's catalogue; any catalogue under 65,536 items gives the same record). "
            f"Results from `{'`; `'.join(acc['commands'])}`.",
            "",
            "| model | codec | seeds | NDCG@10 served | state bytes | record bytes | Redis per user |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for f in rows:
            lines.append(f"| {f['model']} | {f['codec']} | {f['seeds']} | {f['ndcg10']:.4f} ± {f['ndcg10_std']:.4f} | "
                         f"{f['state_bytes']:,} | {f['record_bytes']:,} | {f['used_memory_per_user']:,.0f} |")
        lines.append("")
    return "\n".join(lines)
