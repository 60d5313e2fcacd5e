"""`holorec bench serve`: what serving costs, over real HTTP and a real Redis.

Sections (each a key of the result JSON, a table in OUT/serve.md):
    o1         POST /events latency and stored record bytes for users whose history already holds
               10 .. 100,000 events: constant-size state means constant cost
    replay     the naive design (raw history in a Redis list, the model re-run over the last max_len
               items per GET) against the stored-state path (through the app's client-side record cache); in-process
    load       events/s and recommendations/s at concurrency 32 (and one event at concurrency 1),
               1 and 2 uvicorn workers, micro-batching on and off, p50/p95/p99
    catalogue  GET /recommend latency at 3.7k, 100k and 1M items: exact top-k by matrix product, and the IVF index
    codec      bytes per user for float32/float16/int8 state packing and the NDCG@10 each costs,
               stepping ML-100K test users with a pack/unpack round trip after every step
    profile    where the time goes: py-spy samples of the service under GET /recommend and 1-event
               POST /events at concurrency 32, by part (HTTP stack, Redis client, model, ...) and function
    floor      what the service adds to the floor: one event and one recommendation at concurrency 1,
               interleaved on one keep-alive connection with GET /livez and a bare Redis GET and SET of a
               record-sized value; event - livez - (GET + SET), recommend - livez - GET

The service runs as uvicorn subprocesses (service.app:app_from_env) on 127.0.0.1; the load
generator is another process (bench/loadgen.py, which imports no torch). Checkpoints are random-weight HoloMambaRec models built
on the spot (d_model 64, 2 layers, MovieLens-1M's 3,706 items and 18 genres) except the codec
section, which needs a trained one: HOLOREC_BENCH_ML100K=DIR names a checkpoint trained by
`holorec train --data ML100K_DIR`; unset, one is trained here (--epochs) on `--data` (default
../shared/data/ml-100k, beside the repository).
All Redis keys live under holorec:bench-serve-<random>-<section>:* and are deleted at the end.
Figures are medians over repeats where repeated; the host and its load average are recorded.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from bench import harness
from bench.harness import ROOT, Service
from bench.loadgen import finish as finish_load, loadgen, start as start_load
from bench.serve_report import markdown

N_ITEMS, N_GENRES, MAX_GENRES = 3706, 18, 3  # MovieLens-1M's catalogue; genres per item drawn at random
D_MODEL, N_LAYERS, MAX_LEN = 64, 2, 200


# --- checkpoints ---------------------------------------------------------------------------------
def make_checkpoint(path: Path, n_items: int, *, genres: bool = True, max_len: int = MAX_LEN, model: str = "holomamba", seed: int = 0):  # type: ignore[no-untyped-def]
    """This bench's random-weight model (d_model 64, 2 layers, up to 3 of 18 genres per item) over items item-1..item-N."""
    from model.checkpoint import load

    return load(harness.make_checkpoint(path, n_items=n_items, n_attrs=N_GENRES if genres else 0, max_attrs=MAX_GENRES, model=model,
                                        d_model=D_MODEL, n_layers=N_LAYERS, max_len=max_len, seed=seed))


# --- sections ------------------------------------------------------------------------------------
def section_o1(ckpt_dir: Path, redis_url: str, ns: str, quick: bool) -> dict[str, Any]:
    """Cost of one more event for users with 10 .. 100,000 events behind them."""
    import httpx
    import redis

    from service.store import user_key

    levels = [10, 300] if quick else [10, 1000, 10_000, 100_000]
    rounds, per_round = (1, 10) if quick else (5, 200)
    rng = random.Random(1)
    r = redis.Redis.from_url(redis_url)
    out: dict[str, Any] = {"levels": {}, "rounds": rounds}
    with Service(ckpt_dir, redis_url, ns) as srv, httpx.Client(base_url=f"http://127.0.0.1:{srv.port}", timeout=600) as c:
        t0 = time.perf_counter()
        for lvl in levels:  # 1000-event requests; the longest history dominates
            user, done = f"hist{lvl}", 0
            while done < lvl:
                n = min(1000, lvl - done)
                resp = c.post("/events", json={"events": [{"user_id": user, "item_id": f"item-{rng.randrange(1, N_ITEMS + 1)}"} for _ in range(n)]})
                resp.raise_for_status()
                done += n
        out["prefill_s"] = time.perf_counter() - t0
        out["prefill_events"] = sum(levels)
        lat: dict[int, list[dict[str, Any]]] = {lvl: [] for lvl in levels}
        for rnd in range(rounds):  # the levels take turns request by request, so the machine's drifts hit each alike
            res = loadgen({"kind": "event", "port": srv.port, "n_items": N_ITEMS, "users": [f"hist{lvl}" for lvl in levels],
                           "concurrency": 1, "requests": per_round * len(levels), "seconds": 60, "seed": rnd, "by_user": True})
            for lvl in levels:
                lat[lvl].append(res["by_user"][f"hist{lvl}"])
        for lvl in levels:
            key = user_key(ns, f"hist{lvl}")
            meta = c.get(f"/users/hist{lvl}").json()
            out["levels"][str(lvl)] = {
                "p50_ms": statistics.median(x["p50_ms"] for x in lat[lvl]),
                "p99_ms": statistics.median(x["p99_ms"] for x in lat[lvl]),
                "requests": sum(x["requests"] for x in lat[lvl]),
                "errors": sum(sum(x["errors"].values()) for x in lat[lvl]),
                "record_bytes": r.strlen(key),
                "events_applied": meta["events_applied"],
            }
    lo, hi = out["levels"][str(levels[0])], out["levels"][str(levels[-1])]
    out["p50_ratio_longest_to_shortest"] = hi["p50_ms"] / lo["p50_ms"]
    out["record_bytes_constant"] = len({v["record_bytes"] for v in out["levels"].values()}) == 1
    return out


def section_replay(tmp: Path, redis_url: str, ns: str, quick: bool) -> dict[str, Any]:
    """The naive design vs the stored-state path, per GET, in-process. The naive design reads its list from Redis
    every time; the stored-state path reads through the serving app's client-side record cache, so a repeat read of
    an unchanged user costs no round trip (a write by any replica invalidates it: service/cache.py)."""
    import redis

    from model.checkpoint import load
    from service.engine import Engine, Event, RecQuery
    from service.settings import Settings
    from service.app import make_store

    lens = [50] if quick else [50, 200, 1000]
    n_req = 5 if quick else 200
    models = ["holomamba", "sasrec"]
    r = redis.Redis.from_url(redis_url)
    rng = random.Random(2)
    threads = Settings.model_fields["threads"].default  # both designs get what a service worker runs with
    torch.set_num_threads(threads)  # the driver puts the default back after each section
    out: dict[str, Any] = {"max_len": {}, "models": models, "requests": n_req, "torch_threads": threads}
    for L in lens:
        row: dict[str, Any] = {}
        history = [rng.randrange(1, N_ITEMS + 1) for _ in range(L)]
        # holorec: the stored-state path through the real Engine and Redis store
        ckpt_dir = tmp / f"replay-holomamba-{L}"
        make_checkpoint(ckpt_dir, N_ITEMS, max_len=L)
        settings = Settings(checkpoint=str(ckpt_dir), redis_url=redis_url, namespace=ns)
        engine = Engine(load(ckpt_dir), make_store(settings, serving=True), settings)  # as the app builds it: with its record cache
        user = f"replay{L}"
        for s in range(0, L, 1000):
            engine.apply([[Event(user, f"item-{i}") for i in history[s : s + 1000]]])
        engine.recommend([RecQuery(user)])  # warm
        row["stored_state_ms"] = _median_ms(lambda: engine.recommend([RecQuery(user)]), n_req)
        row["redis_get_ms"] = _median_ms(lambda: engine.store.get_many([engine.key(user)]), n_req)  # the floor of both designs
        state_items = [x for x, _ in engine.recommend([RecQuery(user)])[0].items]
        # the naive design: a Redis list of item indices, the model re-run over it per request
        key = f"holorec:{ns}:naive:{L}"
        r.delete(key)
        r.rpush(key, *history)
        r.ltrim(key, -L, -1)
        for name in models:
            if name == "holomamba":
                net = engine.model
            else:
                from model import ModelConfig, build_model

                net = build_model(ModelConfig(model=name, n_items=N_ITEMS, d_model=D_MODEL, n_layers=N_LAYERS, max_len=L, dropout=0.0)).eval()
            table = net.item_table().detach().clone()

            def naive(net=net, table=table) -> list[int]:
                items = [int(x) for x in r.lrange(key, -L, -1)]
                with torch.inference_mode():
                    h = net.user_vector(torch.tensor([items]))  # (1, d): the whole window, every request
                    scores = h @ table.T
                    scores[0, 0] = -math.inf
                    scores[0, torch.tensor(items)] = -math.inf
                    return torch.topk(scores, 10, dim=1).indices[0].tolist()

            got = naive()
            if name == "holomamba":
                row["holomamba_top10_overlap"] = len({f"item-{j}" for j in got} & set(state_items)) / 10  # the state is stored int8
            naive()
            row[f"naive_{name}_ms"] = _median_ms(naive, max(n_req // (4 if L >= 1000 else 1), 10))
            row[f"ratio_{name}"] = row[f"naive_{name}_ms"] / row["stored_state_ms"]
        out["max_len"][str(L)] = row
    return out


def _median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def clear_namespace(redis_url: str, ns: str) -> None:
    """Delete every key under holorec:<ns>*."""
    import redis

    r = redis.Redis.from_url(redis_url)
    keys = list(r.scan_iter(f"holorec:{ns}*", count=1000))
    for i in range(0, len(keys), 1000):
        r.delete(*keys[i : i + 1000])


HISTORY_USERS = 2000  # users lu0.. the load section's prefill gives a record; its c=1 events and GET /recommend pick among them


def prefill(port: int, requests: int) -> dict[str, Any]:
    """A loadgen spec: 100-event batches at c=4 going round the HISTORY_USERS users, so each has history (40 requests: two events each)."""
    return {"kind": "batch", "batch": 100, "port": port, "n_items": N_ITEMS, "users": [f"lu{i}" for i in range(HISTORY_USERS)],
            "concurrency": 4, "requests": requests, "seconds": 60}


def section_load(ckpt_dir: Path, redis_url: str, ns: str, quick: bool) -> dict[str, Any]:
    """Throughput and latency under load; each figure the median of `repeats` runs."""
    repeats, seconds = (1, 2) if quick else (3, 6)
    n = {"event": 100, "batch": 10, "recommend": 100, "event_c1": 20, "livez": 100, "livez_c1": 20} if quick else \
        {"event": 12_000, "batch": 800, "recommend": 12_000, "event_c1": 1000, "livez": 12_000, "livez_c1": 1000}
    out: dict[str, Any] = {"concurrency": 32, "batch_events": 100, "repeats": repeats, "seconds_cap": seconds, "runs": {}}
    for workers in (1,) if quick else (1, 2):
        for batching in (True,) if quick else (True, False):
            env = {} if batching else {"max_batch": "1"}
            name = f"w{workers}_{'batch' if batching else 'nobatch'}"
            res: dict[str, Any] = {}
            # Every configuration starts from the same Redis: left to the earlier ones, the first alone would create the
            # users the others find, and its c=1 events cost a user's creation (seen: 0.1-0.25 ms more app time there)
            clear_namespace(redis_url, ns)
            with Service(ckpt_dir, redis_url, ns, workers=workers, **env) as srv:
                loadgen(prefill(srv.port, 10 if quick else 40))
                cases = [("livez_c1", {"kind": "livez", "concurrency": 1}),
                         ("event_c1", {"kind": "event", "concurrency": 1, "n_users": HISTORY_USERS}),  # users with a record
                         ("livez", {"kind": "livez", "concurrency": 32}),
                         ("event", {"kind": "event", "concurrency": 32}),
                         ("batch100", {"kind": "batch", "batch": 100, "concurrency": 32}),
                         ("recommend", {"kind": "recommend", "concurrency": 32, "n_users": HISTORY_USERS})]
                for case, spec in cases:
                    before = _server_sums(srv.port)
                    runs = [loadgen({**spec, "port": srv.port, "n_items": N_ITEMS, "seed": rep, "seconds": seconds,
                                     "requests": n["batch" if case == "batch100" else case]}) for rep in range(repeats)]
                    res[case] = _median_of(runs)
                    if case == "event_c1":
                        res[case]["breakdown"] = _breakdown(before, _server_sums(srv.port), runs)
                    if case == "batch100":
                        res[case]["events_per_s"] = res[case]["per_s"] * 100
            out["runs"][name] = res
    return out


# (metric, labels) whose per-request mean the c=1 event breakdown reports; sums and counts are scraped from /metrics
SERVER_PARTS = {"server": ("holorec_http_request_duration_seconds", {"route": "/events", "method": "POST", "status": "200"}),
                "redis_get": ("holorec_redis_duration_seconds", {"op": "get"}),
                "redis_cas": ("holorec_redis_duration_seconds", {"op": "cas"}),
                "model_step": ("holorec_model_step_duration_seconds", {})}


def _server_sums(port: int) -> dict[str, tuple[float, float]]:
    """part -> (sum of seconds, count) from the service's own histograms (all workers, when multiprocess)."""
    samples = harness.metrics(f"http://127.0.0.1:{port}")
    got = {part: [0.0, 0.0] for part in SERVER_PARTS}
    for (sample, labels), value in samples.items():
        for part, (name, want) in SERVER_PARTS.items():
            if sample in (f"{name}_sum", f"{name}_count") and set(want.items()) <= set(labels):
                got[part][sample.endswith("_count")] += value
    return {k: (v[0], v[1]) for k, v in got.items()}


def _breakdown(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], runs: list[dict[str, Any]]) -> dict[str, float]:
    """Mean ms per request of each part over `runs` (one event per request, so one GET, CAS and step each)."""
    n = sum(r["requests"] for r in runs)
    out = {"client_mean_ms": sum(r["mean_ms"] * r["requests"] for r in runs) / n}
    for part in SERVER_PARTS:
        out[f"{part}_ms"] = (after[part][0] - before[part][0]) / n * 1e3
        out[f"{part}_count"] = after[part][1] - before[part][1]
    out["app_rest_ms"] = out["server_ms"] - out["redis_get_ms"] - out["redis_cas_ms"] - out["model_step_ms"]
    out["outside_app_ms"] = out["client_mean_ms"] - out["server_ms"]
    return out


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        **{k: statistics.median(r[k] for r in runs) for k in ("per_s", "p50_ms", "p95_ms", "p99_ms")},
        "requests": sum(r["requests"] for r in runs),
        "errors": sum(sum(r["errors"].values()) for r in runs),
    }


def section_catalogue(tmp: Path, redis_url: str, ns: str, quick: bool) -> dict[str, Any]:
    """GET /recommend latency as the catalogue grows: exact scoring (one matmul + top-k), and from
    100k items the IVF index (HOLOREC_ANN_LISTS, about sqrt(items) lists) with its recall@10 against exact."""
    from service.settings import Settings

    sizes = [2000] if quick else [3706, 100_000, 1_000_000]
    n_req = {1: 20, 32: 64} if quick else {1: 400, 32: 2000}
    out: dict[str, Any] = {"sizes": {}}
    for size in sizes:
        ckpt_dir = tmp / f"cat-{size}"
        ckpt = make_checkpoint(ckpt_dir, size, genres=False)
        lists = int(math.sqrt(size)) if quick or size >= 100_000 else 0

        def timed(**env: str) -> dict[str, Any]:
            res: dict[str, Any] = {}
            with Service(ckpt_dir, redis_url, f"{ns}-{size}", **env) as srv:  # each catalogue is another checkpoint
                loadgen({"kind": "batch", "batch": 100, "port": srv.port, "n_items": size, "n_users": 500,
                         "concurrency": 2, "requests": 5 if quick else 20, "seconds": 60})
                for conc in (1, 32):
                    res[f"c{conc}"] = loadgen({"kind": "recommend", "port": srv.port, "n_items": size, "n_users": 500,
                                              "concurrency": conc, "requests": n_req[conc], "seconds": 20 if quick else 30})
            return res

        out["sizes"][str(size)] = timed()
        if lists:
            probe = Settings.model_fields["ann_probe"].default
            out["sizes"][str(size)]["ivf"] = {"lists": lists, "probe": probe, **timed(ann_lists=str(lists)),
                                              "recall@10": _ivf_recall(ckpt.model, lists, probe, 50 if quick else 500)}
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return out


def _ivf_recall(net: torch.nn.Module, lists: int, probe: int, users: int) -> float:
    """Mean |IVF top-10 & exact top-10| / 10 over user vectors of random 20-item histories."""
    from service.index import IVFIndex

    with torch.inference_mode():
        table = net.item_table()  # (v, d)
        index = IVFIndex(table, lists, probe)
        g = torch.Generator().manual_seed(3)
        hs = net.user_vector(torch.randint(1, len(table), (users, 20), generator=g))  # (users, d)
        exact = torch.topk(hs @ table[1:].T, 10).indices + 1  # (users, 10)
        hits = 0
        for h, want in zip(hs, exact.tolist()):
            ids, scores = index.search(h)
            hits += len(set(ids[torch.topk(scores, 10).indices].tolist()) & set(want))
    return hits / (10 * users)


def section_codec(tmp: Path, quick: bool, epochs: int, data: str) -> dict[str, Any]:
    """Bytes per user per state codec, and NDCG@10 when every step goes through pack/unpack."""
    from model.checkpoint import load
    from model.evaluate import evaluate, evaluate_served
    from model.state import CODECS, pack, packed_size
    from service import record as rec

    if quick:
        from model.split import split
        from model.synthetic import synthetic

        ds = synthetic(n_users=60, n_items=60, n_attrs=4, seed=0, seq_len=(5, 15))
        ckpt = make_checkpoint(tmp / "codec-quick", ds.n_items, genres=False, max_len=50)
        net, source = ckpt.model, "synthetic data, random weights (--quick: figures meaningless)"
    else:
        from model.data import load as load_data
        from model.split import split

        from model import ModelConfig
        from model.data import DEFAULT_MAX_LEN
        from model.train import CONFIG_FIELDS, hyper, train

        ds = load_data(data)
        path = os.environ.get("HOLOREC_BENCH_ML100K")
        if not path:
            path = str(tmp / "ml100k")
            h = hyper("holomamba", ds.kind)
            cfg = ModelConfig(model="holomamba", max_len=DEFAULT_MAX_LEN[ds.kind], dropout=h["dropout"], **{k: h[k] for k in CONFIG_FIELDS})
            train(ds, cfg, epochs=epochs, lr=h["lr"], batch_size=h["batch_size"], out=Path(path))
        ckpt = load(path)
        net, source = ckpt.model, f"{path} (provenance: {json.dumps(ckpt.provenance)[:400]})"
    from service.settings import Settings

    hist, targets = split(ds, net.config.max_len).eval_set("test")
    template = net.init_state(1)
    forward_ndcg = evaluate(net, hist, targets, full_history=True)["NDCG@10"]
    base = evaluate_served(net, hist, targets, None)["NDCG@10"]
    out: dict[str, Any] = {"checkpoint": source, "users": len(hist), "forward_ndcg10": forward_ndcg, "step_ndcg10": base, "codecs": {}}
    s = Settings()
    for codec in CODECS:
        m = evaluate_served(net, hist, targets, codec)
        empty = rec.empty("v", codec, s.history_slots, s.dedup_slots, s.seen_filter_bytes, net.config.d_model, pack(template, codec)[0])
        out["codecs"][codec] = {"state_bytes": packed_size(template, codec), "record_bytes": len(rec.encode(empty)), "ndcg10": m["NDCG@10"],
                                "ndcg10_change": m["NDCG@10"] - base, "ndcg10_rel_change": (m["NDCG@10"] - base) / base if base else math.nan}
    return out


# where the time goes: categories a sampled frame's file falls in, first match wins (innermost frame = self time)
PROFILE_PARTS = [("model and torch", ("/torch/", "/model/")), ("Redis client", ("/redis/",)),
                 ("holorec service code", ("/service/",)),
                 ("HTTP stack: uvicorn, Starlette, FastAPI, pydantic", ("/uvicorn/", "/starlette/", "/fastapi/", "/pydantic", "/httptools/", "/anyio/")),
                 ("waiting and hand-offs: the event loop's poll, thread queues (asyncio, uvloop, threading)", ("/asyncio/", "/threading.py", "/concurrent/", "/queue.py", "/uvloop/")),
                 ("metrics (prometheus_client)", ("/prometheus_client/",))]


def section_profile(ckpt_dir: Path, redis_url: str, ns: str, quick: bool) -> dict[str, Any]:
    """py-spy samples of the (one-worker) service under GET /recommend and 1-event POST /events at concurrency 32.

    py-spy attaches once the load generator says its load begins and is stopped (SIGINT, on which it
    writes its samples) when the load ends: the window is the load, whatever start-up costs on a busy
    machine. py-spy records only threads that are running, so a case with no samples means the
    service did no work while it watched; that case is reported as absent with the reason."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return {"skipped": "py-spy is not installed (pip install -e '.[dev]')"}
    seconds = 1 if quick else 8
    out: dict[str, Any] = {"sample_seconds": seconds, "rate_hz": 250, "cases": {}}
    with Service(ckpt_dir, redis_url, ns) as srv, tempfile.TemporaryDirectory() as tmp:
        loadgen(prefill(srv.port, 10 if quick else 40))
        for case, spec in [("recommend", {"kind": "recommend", "n_users": HISTORY_USERS}), ("event", {"kind": "event"})]:
            raw = Path(tmp) / f"{case}.txt"
            spec = {**spec, "port": srv.port, "n_items": N_ITEMS, "concurrency": 32, "requests": 10**6, "seconds": seconds}
            load_proc = start_load(spec)
            spy_proc = subprocess.Popen([spy, "record", "-p", str(srv.proc.pid), "-r", "250", "-f", "raw", "-o", str(raw),
                                         "--nonblocking", "--full-filenames"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            load = finish_load(load_proc, spec)
            spy_proc.send_signal(signal.SIGINT)
            _, err = spy_proc.communicate(timeout=60)
            if not raw.exists():
                out["cases"][case] = {"per_s": load["per_s"], "absent": f"py-spy wrote nothing (exit {spy_proc.returncode}): {err.decode()[-300:]}"}
                continue
            shares = _profile_shares(raw.read_text())
            if not shares["samples"]:
                shares["absent"] = (f"py-spy caught no running thread in {load['seconds']:.1f} s of load "
                                    f"({load['requests']} requests served): {err.decode()[-300:] or 'no message'}")
            out["cases"][case] = {"per_s": load["per_s"], **shares}
    return out


def _profile_shares(raw: str) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks -> share of samples per part (by the innermost frame) and the top functions."""
    parts: dict[str, int] = {}
    funcs: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")[1:]  # the first entry names the thread
        if not frames or not count.isdigit():
            continue
        n, inner = int(count), frames[-1]  # "function (path:line)"
        total += n
        part = next((name for name, keys in PROFILE_PARTS if any(k in inner for k in keys)), "other (C code, interpreter)")
        parts[part] = parts.get(part, 0) + n
        fn = re.sub(r"\((?:/\S+/site-packages/|/\S+/lib/python3\.\d+/|" + re.escape(str(ROOT)) + "/)", "(", re.sub(r":\d+\)$", ")", inner))
        funcs[fn] = funcs.get(fn, 0) + n
    top = sorted(funcs.items(), key=lambda kv: -kv[1])[:12]
    return {"samples": total, "parts": {k: v / total for k, v in sorted(parts.items(), key=lambda kv: -kv[1])} if total else {},
            "top_functions": [{"function": f, "share": v / total} for f, v in top] if total else []}


class RawHTTP:
    """A keep-alive HTTP/1.1 client that sends pre-encoded requests and reads Content-Length bodies: next to no client
    cost, the same for every request, so what the floor section compares is the service (httpx's own cost was 0.6 ms a
    request, more for a POST with a JSON body than for a GET, which counted as the service's)."""

    def __init__(self, url: str) -> None:
        import socket
        from urllib.parse import urlsplit

        u = urlsplit(url)
        self.host = f"{u.hostname}:{u.port}".encode()
        self.sock = socket.create_connection((u.hostname, u.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def encode(self, method: str, path: str, body: bytes | None = None) -> bytes:
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host.decode()}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        return (head + "\r\n").encode() + (body or b"")

    def send(self, request: bytes) -> int:
        """One request and its whole answer; -> the status (raises on anything but 200)."""
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(65536)
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        while len(self.buf) < length:
            self.buf += self.sock.recv(65536)
        self.buf = self.buf[length:]
        status = int(head[9:12])
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {head[:200]!r}")
        return status

    def close(self) -> None:
        self.sock.close()


def section_floor(ckpt_dir: Path, redis_url: str, ns: str, quick: bool) -> dict[str, Any]:
    """One event, a new user's first event and one recommendation against the floor, interleaved request by request so drift hits all alike:
    GET /livez (the HTTP floor) and a bare GET and SET of a value the size of the user's stored record (the Redis floor).
    The same recommendation again, with no write between, is what a repeated read costs (no round trip, no decode).
    Requests are encoded before the clock starts (RawHTTP). The service and this client each on a CPU of their own
    where there are two (harness.split_cpus)."""
    import httpx
    import redis

    from service.store import user_key

    n, users = (50, 10) if quick else (3000, 500)
    rng = random.Random(0)
    r = redis.Redis.from_url(redis_url)
    times: dict[str, list[float]] = {k: [] for k in ("livez", "event", "first_event", "recommend", "recommend_again", "redis_get", "redis_set")}
    placement = harness.split_cpus()
    with Service(ckpt_dir, redis_url, ns, cpus=placement[0] if placement else None) as srv, harness.on_cpus(placement[1] if placement else None):
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            for u in range(users):  # every user has a history, so a recommendation is scored from state
                assert c.post("/events", json={"events": [{"user_id": f"f{u}", "item_id": f"item-{1 + j}"} for j in range(20)]}).status_code == 200
        record = r.get(user_key(ns, "f0"))
        assert record is not None, "no record written"
        probe = f"holorec:{ns}:floor-probe"
        r.set(probe, record)
        http = RawHTTP(srv.url)
        livez = http.encode("GET", "/livez")

        def timed(name: str, fn: Any) -> None:
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1000)

        for i in range(n):
            user, item = f"f{rng.randrange(users)}", f"item-{rng.randrange(1, N_ITEMS + 1)}"
            event = http.encode("POST", "/events", json.dumps({"events": [{"user_id": user, "item_id": item}]}).encode())
            first = http.encode("POST", "/events", json.dumps({"events": [{"user_id": f"n{i}", "item_id": item}]}).encode())
            recommend = http.encode("GET", f"/recommend/{user}")
            timed("livez", lambda: http.send(livez))
            timed("event", lambda: http.send(event))
            timed("first_event", lambda: http.send(first))  # a user with no record yet: the GET finds none, the write creates it
            timed("recommend", lambda: http.send(recommend))
            timed("recommend_again", lambda: http.send(recommend))  # no write between: the client-side cache and decoded record
            timed("redis_get", lambda: r.get(probe))
            timed("redis_set", lambda: r.set(probe, record))
        http.close()
    p50 = {k: statistics.median(v) for k, v in times.items()}
    return {"requests_each": n, "record_bytes": len(record), "p50_ms": p50, "client": "RawHTTP (pre-encoded requests)",
            "cpus": {"service": sorted(placement[0]), "client": sorted(placement[1])} if placement else None,
            **floor_adds(p50), "repeat_recommend_adds_ms": p50["recommend_again"] - p50["livez"]}


def floor_adds(p50: dict[str, float]) -> dict[str, float]:
    """What a request adds to the floor it needs (section 0 and bench/ab_floor.py): GET /livez, and a bare GET and SET of
    a record for a write, a bare GET for a read."""
    write_floor, read_floor = p50["livez"] + p50["redis_get"] + p50["redis_set"], p50["livez"] + p50["redis_get"]
    return {"event_adds_ms": p50["event"] - write_floor, "first_event_adds_ms": p50["first_event"] - write_floor,
            "recommend_adds_ms": p50["recommend"] - read_floor}


# --- driver -----------------------------------------------------------------------------------------
def _load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_ticks() -> list[int]:
    """The machine's CPU time so far, from /proc/stat: user nice system idle iowait irq softirq steal (empty off Linux)."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return []


def _cpu_share(t0: list[int], t1: list[int]) -> dict[str, float]:
    """Busy and stolen percent of all CPU time between two readings. Steal is time the hypervisor gave our
    virtual CPUs to other guests: on a shared VM it is what makes one run of this benchmark slower than the next."""
    d = [b - a for a, b in zip(t0, t1)]
    if len(d) < 8 or sum(d) <= 0:
        return {}
    return {"busy_pct": round(100 * (sum(d) - d[3] - d[4] - d[7]) / sum(d), 1), "steal_pct": round(100 * d[7] / sum(d), 1)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import redis

    quick = bool(getattr(args, "quick", False))
    redis_url = getattr(args, "redis_url", None) or "redis://127.0.0.1:6379/0"
    out_dir = Path(getattr(args, "out", "bench/results"))
    only = os.environ.get("HOLOREC_BENCH_SECTIONS", "floor,o1,replay,load,catalogue,codec,profile").split(",")
    ns = f"bench-serve-{uuid.uuid4().hex[:10]}"
    tmp = Path(tempfile.mkdtemp(prefix="holorec-bench-serve-"))
    result: dict[str, Any] = {"quick": quick, "namespace": ns, "hardware": harness.hardware(), "load_avg": {"start": _load_avg()}, "cpu": {},
                              "command": "holorec bench serve" + (" --quick" if quick else ""), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    t_all = time.perf_counter()
    try:
        ckpt_dir = tmp / "ml1m-size"
        make_checkpoint(ckpt_dir, N_ITEMS)
        # a namespace per section: a user written under another checkpoint would be re-warmed (replayed) when read
        sections = {"floor": lambda: section_floor(ckpt_dir, redis_url, f"{ns}-floor", quick),
                    "o1": lambda: section_o1(ckpt_dir, redis_url, f"{ns}-o1", quick),
                    "replay": lambda: section_replay(tmp, redis_url, f"{ns}-replay", quick),
                    "load": lambda: section_load(ckpt_dir, redis_url, f"{ns}-load", quick),
                    "catalogue": lambda: section_catalogue(tmp, redis_url, f"{ns}-catalogue", quick),
                    "codec": lambda: section_codec(tmp, quick, getattr(args, "epochs", 10),
                                                   getattr(args, "data", None) or str(ROOT.parent / "shared/data/ml-100k")),
                    "profile": lambda: section_profile(ckpt_dir, redis_url, f"{ns}-profile", quick)}
        threads = torch.get_num_threads()
        for name, fn in sections.items():
            if name not in only:
                continue
            torch.set_num_threads(threads)
            t0, ticks = time.perf_counter(), _cpu_ticks()
            print(f"bench serve: {name} ...", flush=True)
            result[name] = fn()
            result[name]["seconds"] = time.perf_counter() - t0
            result["load_avg"][name] = _load_avg()
            result["cpu"][name] = _cpu_share(ticks, _cpu_ticks())
    finally:
        clear_namespace(redis_url, ns)
        shutil.rmtree(tmp, ignore_errors=True)
    result["seconds"] = time.perf_counter() - t_all
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serve.json").write_text(json.dumps(result, indent=2))
    (out_dir / "serve.md").write_text(markdown(result))
    print(markdown(result))
    return result
