"""PNG pictures of the benchmark results, drawn from the JSON files in a results folder.

`holorec bench plots` redraws every picture whose JSON is there; every other `holorec bench`
command redraws them when it ends. Nothing here measures: each plot reads figures a bench wrote.
    latency_vs_history.png   serve o1: POST /events p50/p99 for users with 10 .. 100,000 past events
    throughput.png           serve load: requests/s (events/s for 100-event batches) per configuration
    train_speed.png          train: positions/s and peak memory per model against sequence length
    accuracy.png             accuracy_*: NDCG@10 mean ± std over seeds per model, per table
    state_bytes_ndcg.png     serve codec: bytes per user's state against NDCG@10 for each codec
    memory_frontier.png      memory: served NDCG@10 against Redis bytes per user, per model size and codec
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def write_all(out: Path) -> list[Path]:
    """Draw every plot whose results exist in `out`; -> the PNGs written. Without matplotlib: none, and says so."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench plots: matplotlib is not installed (pip install -e '.[dev]'): no pictures drawn")
        return []
    written = []
    serve, train, memory = _load(out / "serve.json"), _load(out / "train_speed.json"), _load(out / "memory.json")
    accuracy = {p.stem.removeprefix("accuracy_"): json.loads(p.read_text()) for p in sorted(out.glob("accuracy_*.json"))}
    serve = serve or {}  # a partial serve run (HOLOREC_BENCH_SECTIONS) has some sections only
    for name, draw, data in (("latency_vs_history", _latency_vs_history, serve.get("o1")), ("throughput", _throughput, serve.get("load")),
                             ("train_speed", _train_speed, train), ("accuracy", _accuracy, accuracy),
                             ("state_bytes_ndcg", _state_bytes_ndcg, serve.get("codec")),
                             ("memory_frontier", _memory_frontier, (memory or {}).get("frontier"))):
        if not data:
            continue
        fig = draw(plt, data)
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    print(f"bench plots: wrote {', '.join(p.name for p in written) or 'nothing (no results yet)'} in {out}")
    return written


def _latency_vs_history(plt: Any, o1: dict[str, Any]) -> Any:
    levels = o1["levels"]
    xs = [int(k) for k in levels]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for q in ("p50", "p99"):
        ax.plot(xs, [v[f"{q}_ms"] for v in levels.values()], marker="o", label=q)
    ax.set(xscale="log", xlabel="events already in the user's history", ylabel="POST /events latency, ms", ylim=(0, None),
           title=f"One event costs the same at any history length (record {next(iter(levels.values()))['record_bytes']:,} B)")
    ax.legend()
    return fig


def _throughput(plt: Any, load: dict[str, Any]) -> Any:
    runs = load["runs"]
    cases = [("event", "single events, req/s"), ("recommend", "GET /recommend, req/s"), ("batch100", "events/s in 100-event batches")]
    fig, axes = plt.subplots(1, len(cases), figsize=(12, 3.5))
    for ax, (case, label) in zip(axes, cases):
        vals = [v[case].get("events_per_s", v[case]["per_s"]) for v in runs.values()]
        ax.bar(list(runs), vals)
        ax.set(title=label)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle("Throughput at concurrency 32 by configuration (w = uvicorn workers; batch = micro-batching)")
    return fig


def _train_speed(plt: Any, r: dict[str, Any]) -> Any:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.5))
    for model in sorted({x["model"] for x in r["rows"]}):
        rows = sorted((x for x in r["rows"] if x["model"] == model), key=lambda x: x["length"])
        a.plot([x["length"] for x in rows], [x["positions_per_s"] for x in rows], marker="o", label=model)
        b.plot([x["length"] for x in rows], [x["peak_delta_mb"] for x in rows], marker="o", label=model)
    a.set(xscale="log", xlabel="sequence length", ylabel="training positions / s")
    b.set(xscale="log", xlabel="sequence length", ylabel="peak memory of a step, MB")
    a.legend()
    fig.suptitle(f"Training speed and memory ({r['positions_per_step']:,} positions per step)")
    return fig


def _accuracy(plt: Any, tables: dict[str, dict[str, Any]]) -> Any:
    fig, axes = plt.subplots(1, len(tables), figsize=(4.5 * len(tables), 3.5), squeeze=False)
    for ax, (name, r) in zip(axes[0], tables.items()):
        models = list(r["summary"])
        means = [r["summary"][m]["NDCG@10"][0] for m in models]
        stds = [r["summary"][m]["NDCG@10"][1] for m in models]
        ax.bar(models, means, yerr=stds, capsize=4)
        ax.axhline(r["popularity"]["NDCG@10"], color="grey", linestyle="--", label="popularity")
        ax.set(title=name, ylabel="test NDCG@10")
        ax.tick_params(axis="x", rotation=30)
        ax.legend()
    fig.suptitle("Accuracy: mean ± std over the seeds run (see each table for epochs and seeds)")
    return fig


def _state_bytes_ndcg(plt: Any, codec: dict[str, Any]) -> Any:
    codecs = codec["codecs"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, v in codecs.items():
        ax.scatter(v["state_bytes"], v["ndcg10"], s=40)
        ax.annotate(name, (v["state_bytes"], v["ndcg10"]), textcoords="offset points", xytext=(5, 5))
    ax.set(xlabel="state bytes per user", ylabel="NDCG@10 (ML-100K, stepped with packing)", title="What packing the state costs")
    return fig


def _memory_frontier(plt: Any, frontier: list[dict[str, Any]]) -> Any:
    datasets = sorted({f.get("dataset", "") for f in frontier})
    fig, axes = plt.subplots(1, len(datasets), figsize=(7 * len(datasets), 4), squeeze=False)
    markers = {"float32": "o", "float16": "s", "int8": "^", "int8-rows": "v"}
    for ax, ds in zip(axes[0], datasets):
        for codec, marker in markers.items():
            rows = [f for f in frontier if f["codec"] == codec and f.get("dataset", "") == ds]
            ax.errorbar([f["used_memory_per_user"] for f in rows], [f["ndcg10"] for f in rows], yerr=[f["ndcg10_std"] for f in rows],
                        fmt=marker, capsize=3, label=codec)
            for f in rows:
                ax.annotate(f["model"].removeprefix("holomamba").lstrip(":") or "default", (f["used_memory_per_user"], f["ndcg10"]),
                            textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.axvline(4000, color="grey", linestyle="--", linewidth=1)
        ax.set(xscale="log", xlabel="Redis used_memory per user, bytes (dashed: 4 GB per million users)",
               ylabel=f"NDCG@10 served ({ds} test)", title=f"HoloMambaRec on {ds}: accuracy against memory per user")
        ax.legend(title="state codec", fontsize=8)
    return fig


def run(args: argparse.Namespace) -> list[Path]:
    return write_all(Path(getattr(args, "out", "bench/results")))
