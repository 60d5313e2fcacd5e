"""`holorec bench train`: training speed and peak memory per model at sequence lengths 50..5000.

Each (model, length) runs in its own subprocess (`python -m bench.train_speed --one MODEL L ...`):
a batch of synthetic sequences of exactly L+1 items, so every row is L training positions and
a step covers about POSITIONS of them (batch = POSITIONS // L, at least 1). One warm-up step,
then timed AdamW steps (forward, full-softmax loss, backward, update). Reported: ms per step,
training positions per second, and seconds per 100k positions (an "epoch" of that size).

Peak memory: on CPU the child reads its own ru_maxrss (the resident high-water mark) once the
data is built and again after the steps; the difference is the memory training itself needed.
A fresh process per config is what makes that honest: a high-water mark never goes down, so
in one process the largest config would hide every smaller one. On CUDA: max_memory_allocated.
Writes OUT/train_speed.md and .json.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.harness import command, hardware
from model import MODELS
from model.train import set_threads

LENGTHS, QUICK_LENGTHS = (50, 200, 1000, 5000), (50, 200)
POSITIONS, QUICK_POSITIONS = 8192, 2048


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def one(model: str, length: int, positions: int, steps: int, device: str, d_model: int) -> dict[str, Any]:
    """Runs inside the child process; returns the measurements."""
    from model import ModelConfig, build_model
    from model.split import split
    from model.synthetic import synthetic
    set_threads()
    batch = max(1, positions // length)
    ds = synthetic(n_users=batch, n_items=1000, n_attrs=20, seed=0, seq_len=(length + 3, length + 3))
    sp = split(ds, length)  # training part is L+1 items: one row of exactly L positions per user
    x, y = sp.inputs.to(device), sp.targets.to(device)  # (b, l) each
    torch.manual_seed(0)
    cfg = ModelConfig(model=model, n_items=ds.n_items, n_attrs=ds.n_attrs, max_attrs=ds.max_attrs, d_model=d_model, max_len=length)
    net = build_model(cfg, ds.item_attr_tensor()).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    base = _rss_mb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 1):  # step 0 warms up allocator and kernels
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = net.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    step_s = sum(times) / len(times)
    n = int((y > 0).sum())
    out = {"model": model, "length": length, "batch": batch, "positions_per_step": n, "steps": steps,
           "ms_per_step": 1000 * step_s, "positions_per_s": n / step_s, "s_per_100k_positions": 1e5 * step_s / n,
           "rss_before_mb": base, "rss_peak_mb": _rss_mb(), "peak_delta_mb": _rss_mb() - base}
    if device.startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    set_threads()  # the children inherit HOLOREC_THREADS; this makes the report say what they used
    t0 = time.perf_counter()
    quick = getattr(args, "quick", False)
    lengths, positions, steps = (QUICK_LENGTHS, QUICK_POSITIONS, 1) if quick else (LENGTHS, POSITIONS, 3)
    d_model = 64
    models = getattr(args, "models", None) or list(MODELS)
    if isinstance(models, str):
        models = [m for m in models.split(",") if m]
    rows: list[dict[str, Any]] = []
    for name in models:
        for length in lengths:
            cmd = [sys.executable, "-m", "bench.train_speed", "--one", name, str(length), str(positions), str(steps), args.device, str(d_model)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
                row = {"model": name, "length": length, "error": tail[0][:300]}
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print("  " + (f"{name} L={length}: {row['ms_per_step']:.0f} ms/step, {row['positions_per_s']:,.0f} positions/s, "
                          f"peak +{row['peak_delta_mb']:.0f} MB" if "error" not in row else f"{name} L={length}: FAILED {row['error']}"))
    result = {"bench": "train_speed", "command": command(), "d_model": d_model, "positions_per_step": positions, "timed_steps": steps,
              "hardware": hardware(args.device), "rows": rows, "wall_seconds": time.perf_counter() - t0,
              "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_speed.json").write_text(json.dumps(result, indent=2))
    (out / "train_speed.md").write_text(_markdown(result))
    print(f"wrote {out / 'train_speed.md'} and .json")
    return result


def _markdown(r: dict[str, Any]) -> str:
    hw = r["hardware"]
    lines = [
        "# Training speed and peak memory",
        "",
        f"Synthetic data, d_model {r['d_model']}, 2 layers; a step is about {r['positions_per_step']} training positions "
        f"(batch = {r['positions_per_step']} // L); mean of {r['timed_steps']} timed AdamW step(s) after one warm-up.",
        "Peak memory: resident high-water mark growth during training, each config in a fresh process.",
        "",
        "| model | L | batch | ms/step | positions/s | s per 100k positions | peak +MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['length']} | - | failed: {row['error']} | | | |")
        else:
            mem = row.get("cuda_peak_mb", row["peak_delta_mb"])
            lines.append(f"| {row['model']} | {row['length']} | {row['batch']} | {row['ms_per_step']:.0f} | {row['positions_per_s']:,.0f} | "
                         f"{row['s_per_100k_positions']:.1f} | {mem:.0f} |")
    lines += ["", f"Command: `{r['command']}`",
              f"Hardware: {hw['cpu']}, {hw['cores']} cores, {hw['torch_threads']} torch threads, device {hw['device']}; torch {hw['torch']}; "
              f"load average {hw.get('load_average_at_start', float('nan')):.1f} at start.",
              f"Wall time: {r['wall_seconds']:.0f} s, finished {r['finished']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--one", nargs=6, metavar=("MODEL", "L", "POSITIONS", "STEPS", "DEVICE", "D_MODEL"), required=True)
    a = p.parse_args()
    m, length, positions, steps, device, d_model = a.one
    print(json.dumps(one(m, int(length), int(positions), int(steps), device, int(d_model))))
