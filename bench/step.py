"""`holorec bench step`: what one served event costs per model: parameters, state bytes, step latency.

For each model at a MovieLens-1M-sized config (3706 items, 18 genres, d_model 64, 2 layers,
max_len 200; HoloMambaRec also with temporal bundling of 4): the parameter count, the packed
per-user state in bytes for each codec of model/state.py, and the wall time of one batched
`step` on CPU at batch sizes 1, 16, 64 and 1024 (and of the two compiled steps the service runs, model/fast_step.py): median over rounds after warm-up, one step per
model per round, models interleaved so that load from other processes hits every model alike;
under torch.inference_mode(), a fixed thread count (HOLOREC_THREADS or 1). Writes OUT/step.md and
OUT/step.json, with the 1-minute load average: on a shared machine timings are only as quiet as it is.

The weights are untrained (timing does not depend on their values); the state is advanced a
few events first so SASRec's window and the recurrent states are not trivially empty.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.harness import command, hardware
from model import MODELS as MODEL_NAMES, ModelConfig, SeqRecModel, build_model
from model.fast_step import PACKED_BATCH, SMALL_BATCH, StepFn, native_step, onnx_packed_step, onnx_step, serving_step, trace_step
from model.state import CODECS, pack, packed_size, unpack

MODELS = (*((name, {}) for name in MODEL_NAMES), ("holomamba", {"bundle": 4}))  # every model, and HoloMambaRec bundling 4
BATCHES = (1, 16, 64, 1024)
ROUNDS, QUICK_ROUNDS = {1: 300, 16: 150, 64: 60, 1024: 9}, {1: 20, 16: 10, 64: 5, 1024: 3}  # SASRec's b=1024 step alone takes seconds
N_ITEMS, N_ATTRS, MAX_ATTRS = 3706, 18, 3  # MovieLens-1M: 3706 rated movies, 18 genres, <= 3 kept per movie here


def config(name: str, **kw: Any) -> ModelConfig:
    return ModelConfig(model=name, n_items=N_ITEMS, n_attrs=N_ATTRS, max_attrs=MAX_ATTRS, d_model=64, n_layers=2, max_len=200, **kw)


def item_attrs(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    attrs = torch.randint(0, N_ATTRS + 1, (N_ITEMS + 1, MAX_ATTRS), generator=g)
    attrs[0] = 0
    return attrs  # (v, m)


def build(name: str, **kw: Any) -> tuple[str, SeqRecModel]:
    torch.manual_seed(0)
    model = build_model(config(name, **kw), item_attrs()).eval()
    return name + "".join(f" ({k} {v})" for k, v in kw.items()), model


def time_steps(models: dict[str, tuple[SeqRecModel, StepFn]], batch: int, rounds: int) -> dict[str, dict[str, float]]:
    """One step per (model, step function) per round, interleaved so load spikes from other processes hit all alike.

    Returns per row the median, p10 and p90 in milliseconds over the rounds.
    """
    g = torch.Generator().manual_seed(batch)
    times: dict[str, list[float]] = {label: [] for label in models}
    with torch.inference_mode():
        states, items = {}, torch.randint(1, N_ITEMS + 1, (batch,), generator=g)
        for label, (model, step) in models.items():
            state = model.init_state(batch)
            for _ in range(3):  # warm-up, and a non-empty state
                _, state = step(torch.randint(1, N_ITEMS + 1, (batch,), generator=g), state)
            states[label] = state
        for _ in range(rounds):
            for label, (_, step) in models.items():
                t0 = time.perf_counter()
                step(items, states[label])
                times[label].append(time.perf_counter() - t0)
    return {label: {**_spread([1e3 * t for t in ts]), "repeats": len(ts)} for label, ts in times.items()}


def _spread(ms: list[float]) -> dict[str, float]:
    """Median, p10 and p90 of timings in milliseconds."""
    ms = sorted(ms)
    return {"median_ms": statistics.median(ms), "p10_ms": ms[len(ms) // 10], "p90_ms": ms[(9 * len(ms)) // 10]}


STORED_BATCHES, STORED_ROUNDS = (1, SMALL_BATCH, PACKED_BATCH, 2 * PACKED_BATCH), 500


def time_stored(model: SeqRecModel, codec: str, batch: int, rounds: int) -> dict[str, dict[str, float]]:
    """One event per user on the stored state, as the service applies it: the blobs in, the new blobs and vectors out.
    Three ways, alternating: unpack, the serving step and pack (what the service runs without a packed step, and for
    more than SMALL_BATCH users: ONNX Runtime up to it, the frozen trace above), the packed step as one ONNX Runtime call,
    and as one call of model/native.c (packed_step's choice where it was built). -> per way the median, p10 and p90 in
    milliseconds."""
    template, serving = model.init_state(1), serving_step(model)
    packed, native = onnx_packed_step(model, codec), native_step(model, codec)
    if serving == model.step or packed is None:
        return {}
    g = torch.Generator().manual_seed(batch)
    with torch.inference_mode():
        state = model.init_state(batch)
        for _ in range(3):
            _, state = model.step(torch.randint(1, N_ITEMS + 1, (batch,), generator=g), state)
        blobs, items = pack(state, codec), torch.randint(1, N_ITEMS + 1, (batch,), generator=g)

        def three_calls() -> None:
            h, new = serving(items, unpack(blobs, template, codec))
            pack(new, codec), h.numpy()

        ways = {"unpack, step, pack": three_calls, "one ONNX Runtime call": lambda: packed(items.numpy(), blobs)}
        if native is not None:
            ways["one call of model/native.c"] = lambda: native(items.numpy(), blobs)
        times: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(rounds + 20):
            for k, fn in ways.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: _spread(ts[20:]) for k, ts in times.items()}  # the first 20 rounds warm both up


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], stored: dict[str, Any]) -> str:
    lines = [
        "# One served event: `step` cost per model",
        "",
        f"Config: {N_ITEMS} items, {N_ATTRS} attributes (<= {MAX_ATTRS} per item), d_model 64, 2 layers, max_len 200. "
        f"CPU, torch.inference_mode(), {meta['threads']} thread(s); median over interleaved rounds (p10-p90 in brackets).",
        "",
        "| model | params | state B/user fp32 | fp16 | int8 | step b=1 (ms) | b=16 (ms) | b=64 (ms) | b=1024 (ms) | b=1024 per user (us) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s, st = r["state_bytes"], r["step"]
        cell = {b: f"{st[b]['median_ms']:.3f} [{st[b]['p10_ms']:.3f}-{st[b]['p90_ms']:.3f}]" for b in st}
        lines.append(f"| {r['model']} | {r['params']:,} | {s['float32']:,} | {s['float16']:,} | {s['int8']:,} | "
                     f"{cell['1']} | {cell['16']} | {cell['64']} | {cell['1024']} | {1e3 * st['1024']['median_ms'] / 1024:.1f} |")
    lines += ["", "Rows named `served` time the compiled steps the service runs for that model (model/fast_step.py): `step` "
              f"exported to ONNX Runtime for batches up to {SMALL_BATCH} users, a frozen TorchScript trace of it for larger ones, "
              "each used where the model's step has no branch on the data and it reproduces the eager step; other models "
              "serve their eager `step`.",
              "", "HoloMambaRec indexes its HRR item table, encoded once per weight update (SeqRecModel.table), not per event.",
              "", "Every model's state is the same size after 1 event or 100,000 (SASRec's is its window of max_len item ids). "
              "A bundled HoloMambaRec still runs one SSM step per event (a peek, or the commit of a full group); "
              "bundling shortens the recurrence in training, not the per-event cost.",
              ""]
    if stored["ways"]:
        lines += [f"## One event on the stored state (HoloMambaRec, {stored['codec']} state)", "",
                  "The service's update of a user's stored state for one event: blobs in, new blobs and user vectors out; "
                  "the ways alternate round by round (model/fast_step.py `packed_step`: model/native.c where it was built, else the "
                  "ONNX Runtime call).", "",
                  "| users | " + " | ".join(stored["ways"]) + " |", "|---:|" + "---:|" * len(stored["ways"])]
        for b, timed in stored["by_batch"].items():
            lines.append(f"| {b} | " + " | ".join(f"{t['median_ms']:.3f} [{t['p10_ms']:.3f}-{t['p90_ms']:.3f}]" for t in timed.values()) + " |")
        lines += [""]
    lines += [f"Command: `{meta['command']}`  ", f"Hardware: {meta['hardware']}  ",
              f"Load average (1 min) before/after: {meta['load_avg_1m_before_after'][0]:.1f} / {meta['load_avg_1m_before_after'][1]:.1f}  ",
              f"Wall time: {meta['wall_s']:.0f} s", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    threads = int(os.environ.get("HOLOREC_THREADS", "1"))
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]  # other processes on the machine: timings are only as quiet as it is
    quick = getattr(args, "quick", False)
    models: dict[str, tuple[SeqRecModel, StepFn]] = {}
    for label, m in (build(n, **k) for n, k in MODELS):
        models[label] = (m, m.step)  # eager
        for how, fn in (("ONNX Runtime", onnx_step(m)), ("frozen TorchScript trace", trace_step(m))):
            if fn is not None:  # what the service runs instead, where it is exact
                models[f"{label}, served: {how}"] = (m, fn)
    rows = [{"model": label, "params": sum(p.numel() for p in m.parameters()),
             "state_bytes": {c: packed_size(m.init_state(1), c) for c in CODECS}, "step": {}} for label, (m, _) in models.items()]
    for b in BATCHES:
        rounds = QUICK_ROUNDS[b] if quick else ROUNDS[b]
        timed = time_steps(models, b, rounds)
        for row in rows:
            row["step"][str(b)] = timed[row["model"]]
        print(f"b={b}: " + "  ".join(f"{k} {v['median_ms']:.3f} ms" for k, v in timed.items()), flush=True)
    holomamba = next(m for label, (m, _) in models.items() if label == "holomamba")
    stored: dict[str, Any] = {"codec": "int8", "by_batch": {}}  # the service's default codec
    for b in STORED_BATCHES:
        stored["by_batch"][str(b)] = time_stored(holomamba, "int8", b, QUICK_ROUNDS[1] if quick else STORED_ROUNDS)
    stored["ways"] = list(stored["by_batch"]["1"])
    print("stored state: " + "  ".join(f"b={b} {k} {v['median_ms']:.3f} ms" for b, t in stored["by_batch"].items() for k, v in t.items()), flush=True)
    meta = {"command": command(), "hardware": hardware("cpu"), "threads": threads, "quick": quick,
            "wall_s": time.perf_counter() - t0, "load_avg_1m_before_after": [load_before, os.getloadavg()[0]]}
    result = {"meta": meta, "rows": rows, "stored": stored}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "step.md").write_text(markdown(rows, meta, stored))
    print(f"wrote {out / 'step.md'} and {out / 'step.json'}")
    return result
