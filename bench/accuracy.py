"""`holorec bench accuracy`: train and evaluate every registered model on one dataset, several seeds.

Writes OUT/accuracy_<dataset>_<epochs>ep.md (mean +- std over seeds of the test HR/NDCG@5/10/20, MRR and
training wall time, next to the popularity baseline) and .json (every run), with the exact
command, the hardware and the total wall time. Protocol: leave-one-out, full ranking over all
items, history items kept as candidates, pessimistic ties (model/evaluate.py).
Resumable: a finished run is written at once and skipped by a rerun; an unfinished one saves its last epoch
under OUT/partial/ and a rerun carries it on from there (model/train.py: progress_file). With --checkpoints each
finished run's best weights go to OUT/checkpoints/ too (untracked), for bench/buckets.py.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from model import MODELS, ModelConfig
from model.data import DEFAULT_MAX_LEN, load
from model.checkpoint import save
from model.split import split
from bench.harness import command, hardware
from model.evaluate import evaluate, evaluate_popularity, evaluate_served
from model.train import CONFIG_FIELDS, hyper, set_threads, train

METRICS = ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR")


def row_overrides(name: str) -> dict[str, int | float]:
    """The config fields a table row name sets, each after a colon: `holomamba:ffn_mult=0:cl_weight=0.1`
    (colons, not commas: --models is a comma-separated list of such names); a value with a point is a float."""
    return {k: float(v) if "." in v else int(v) for k, v in (f.split("=") for f in name.split(":")[1:] if f)}


def model_config(name: str, **kw: Any) -> ModelConfig:
    """A table row name to its config: a registered model, optionally with config fields after a colon,
    e.g. `holomamba:bundle=2` (temporal bundling) or `holomamba:d_state=16:expand=1`."""
    return ModelConfig(model=name.partition(":")[0], **kw | row_overrides(name))


@torch.no_grad()
def step_ms(model: torch.nn.Module, batch: int = 1, steps: int = 200) -> float:
    """Mean wall time of one serving `step` (eval mode, CPU, one thread's worth), after a warm-up."""
    model = model.cpu().eval()
    state = model.init_state(batch)
    items = torch.randint(1, model.config.n_items + 1, (steps + 20, batch))
    for i in range(20):
        _, state = model.step(items[i], state)
    t = time.perf_counter()
    for i in range(20, steps + 20):
        _, state = model.step(items[i], state)
    return (time.perf_counter() - t) / steps * 1e3


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


GRID = {"lr": (5e-4, 1e-3, 2e-3), "dropout": (0.2, 0.5)}


def tune(args: argparse.Namespace) -> dict[str, Any]:
    """`bench accuracy --grid`: every model at every (lr, dropout) of GRID, seed 0, chosen by validation
    NDCG@10 alone (test metrics are not recorded). Writes OUT/tune_<dataset>_<models>_<epochs>ep.json/.md; the
    chosen values go into model/train.py's TUNED by hand, so a default changes in a reviewed commit.
    Resumable like `run`: finished (model, lr, dropout) runs are skipped."""
    set_threads()
    ds = load(args.data or "synthetic")
    max_len = getattr(args, "max_len", None) or DEFAULT_MAX_LEN[ds.kind]
    models = [m for m in (getattr(args, "models", None) or ",".join(MODELS)).split(",") if m]
    path = Path(args.out) / f"tune_{ds.name}_{'-'.join(models)}_{args.epochs}ep.json"  # one file per process
    path.parent.mkdir(parents=True, exist_ok=True)
    res = json.loads(path.read_text()) if path.exists() else {"dataset": ds.name, "max_len": max_len, "epochs": args.epochs,
                                                              "patience": args.patience, "grid": GRID, "runs": {}}
    for name in models:
        for lr in GRID["lr"]:
            for dropout in GRID["dropout"]:
                key = f"{name} lr={lr} dropout={dropout}"
                if key in res["runs"]:
                    continue
                h = hyper(name.partition(":")[0], ds.kind)
                cfg = model_config(name, d_model=64, max_len=max_len, dropout=dropout, **{k: h[k] for k in CONFIG_FIELDS})
                partial = _partial(path.parent, ds.name, key)
                _, rep = train(ds, cfg, epochs=args.epochs, lr=lr, batch_size=getattr(args, "batch_size", None) or h["batch_size"], seed=0, patience=args.patience,
                               patience_steps=getattr(args, "patience_steps", 500), device=args.device, progress=True,
                               progress_file=partial)
                res["runs"][key] = {"model": name, "lr": lr, "dropout": dropout, "valid NDCG@10": rep["valid"]["NDCG@10"],
                                    "best_epoch": rep["best_epoch"], "epochs_run": rep["epochs_run"]}
                path.write_text(json.dumps(res, indent=2))
                partial.unlink(missing_ok=True)
    res["chosen"] = {}
    for name in models:
        mine = [r for r in res["runs"].values() if r["model"] == name]
        if len(mine) == len(GRID["lr"]) * len(GRID["dropout"]):
            best = max(mine, key=lambda r: r["valid NDCG@10"])
            res["chosen"][name] = {"lr": best["lr"], "dropout": best["dropout"]}
    path.write_text(json.dumps(res, indent=2))
    lines = [f"# Tuning on {ds.name}: validation NDCG@10 (seed 0, up to {args.epochs} epochs, patience {args.patience})", "",
             "| model | lr | dropout | valid NDCG@10 | best epoch / run |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['lr']} | {r['dropout']} | {r['valid NDCG@10']:.4f} | {r['best_epoch']}/{r['epochs_run']} |" for r in res["runs"].values()]
    lines += ["", "Chosen (highest validation NDCG@10): " + "; ".join(f"{m}: lr {c['lr']}, dropout {c['dropout']}" for m, c in res["chosen"].items()), ""]
    path.with_suffix(".md").write_text("\n".join(lines))
    return res


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every (model, seed) run is written to the JSON as soon as it ends; a rerun of the same command
    skips the runs already there with the same settings, so a long job cut off carries on."""
    if getattr(args, "grid", False):
        return tune(args)
    set_threads()
    t0 = time.perf_counter()
    quick = getattr(args, "quick", False)
    ds = load(args.data or "synthetic")
    epochs, seeds = (min(args.epochs, 2), 1) if quick else (args.epochs, args.seeds)
    max_len = getattr(args, "max_len", None) or DEFAULT_MAX_LEN[ds.kind]
    models = getattr(args, "models", None) or list(MODELS)
    if isinstance(models, str):
        models = [m for m in models.split(",") if m]
    codecs = [c for c in (getattr(args, "codecs", None) or "").split(",") if c]  # served NDCG through each state codec
    d_model = 32 if quick else 64
    batch_size, patience = getattr(args, "batch_size", None), getattr(args, "patience", 10)  # batch None: each model's default
    patience_steps = 0 if quick else getattr(args, "patience_steps", 500)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"accuracy_{ds.name}_{epochs}ep"  # one file per budget: 10 epochs and to convergence
    result: dict[str, Any] = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else {}
    runs: dict[str, list[dict[str, Any]]] = result.get("runs", {})
    t0 -= result.get("wall_seconds", 0.0)  # a resumed job's wall time includes the earlier runs'
    result.update({
        "bench": "accuracy", "dataset": ds.name, "data": ds.source, "summary_line": ds.summary(),
        "protocol": "leave-one-out; full ranking over all items; history items kept; ties count against the target",
        "epochs": epochs, "patience": patience, "patience_steps": patience_steps, "seeds": seeds, "max_len": max_len, "d_model": d_model, "batch_size": batch_size or "per model",
        "hardware": hardware(args.device), "popularity": result.get("popularity") or evaluate_popularity(ds.train_counts(), *split(ds, max_len).eval_set("test")),
    })
    result.setdefault("commands", [])
    if command() not in result["commands"]:
        result["commands"].append(command())
    print(f"bench accuracy: {ds.summary()}; models {models}, {seeds} seed(s), up to {epochs} epochs (patience {patience}), max_len {max_len}, batch {batch_size or 'per model'}")

    test_h, test_t = split(ds, max_len).eval_set("test")
    settings_of: dict[str, dict[str, Any]] = {}  # this command's settings per row: runs at other settings are dropped
    for name in models:
        h = hyper(name.partition(":")[0], ds.kind)
        lr = args.lr if getattr(args, "lr", None) is not None else h["lr"]
        batch = batch_size or h["batch_size"]
        dropout = args.dropout if getattr(args, "dropout", None) is not None else h["dropout"]
        cfg = model_config(name, d_model=d_model, max_len=max_len, dropout=dropout, **{k: h[k] for k in CONFIG_FIELDS})
        settings = {"lr": lr, "dropout": dropout, **_recorded(cfg), "epochs": epochs, "patience": patience,
                    "patience_steps": patience_steps, "max_len": max_len, "d_model": cfg.d_model,
                    "batch_size": batch}  # d_model, weight_decay and ema as the row name may set them
        if name.startswith("holomamba"):  # a changed default state size or item dropout is another model, never a finished run of this one
            settings |= {"d_state": cfg.d_state, "item_dropout": cfg.item_dropout}
        unfitted = getattr(args, "unfitted_valid", False)
        settings |= {"unfitted_valid": True} if unfitted else {}  # recorded only when on: earlier runs stay finished runs
        settings_of[name] = settings
        for seed in range(seeds) if getattr(args, "seed", None) is None else [args.seed]:
            done = [r for r in runs.get(name, []) if r["seed"] == seed and _settings(name, r) == settings]
            if done:
                print(f"  {name} seed {seed}: already in {stem}.json, skipped")
                continue
            partial = _partial(out, ds.name, f"{name} seed {seed}")
            ckpt, rep = train(ds, cfg, epochs=epochs, lr=lr, batch_size=batch, seed=seed, patience=patience,
                              patience_steps=patience_steps, device=args.device, progress=not quick, progress_file=partial,
                              unfitted_valid=unfitted)
            print(f"  {name} seed {seed}: test NDCG@10 {rep['test']['NDCG@10']:.4f} HR@10 {rep['test']['HR@10']:.4f} "
                  f"(valid {rep['valid']['NDCG@10']:.4f}; best epoch {rep['best_epoch']}/{rep['epochs_run']}, {rep['train_seconds']:.0f} s)", flush=True)
            runs[name] = [r for r in runs.get(name, []) if r["seed"] != seed] + [{
                "seed": seed, "settings": settings, "test": rep["test"], "valid": rep["valid"], "best_epoch": rep["best_epoch"],
                "epochs_run": rep["epochs_run"], "train_seconds": rep["train_seconds"], "device": args.device,
                "valid_curve": [round(e["valid"]["NDCG@10"], 5) for e in rep["history"]]}]
            _write(stem, result | {"runs": runs}, t0, settings_of)  # the run is safe on disk before the extra evaluations
            partial.unlink(missing_ok=True)
            if getattr(args, "checkpoints", False):  # for per-user analyses (bench/buckets.py); untracked, like partial/
                save(ckpt, out / "checkpoints" / _run_name(ds.name, f"{name} seed {seed}"))
            model = ckpt.model.to(args.device)  # train() hands the checkpoint back on the CPU
            runs[name][-1].update({
                "test_seen_excluded": evaluate(model, test_h, test_t, exclude_seen=True, device=args.device),
                "test_full_history": None if name.startswith("sasrec") else evaluate(model, test_h, test_t, full_history=True, device=args.device),
                "step_ms_b1": step_ms(ckpt.model),
                "test_served": {c: evaluate_served(ckpt.model, test_h, test_t, c) for c in codecs}})
            _write(stem, result | {"runs": runs}, t0, settings_of)
            print("run record: " + json.dumps({"table": str(stem), "model": name} | runs[name][-1]), flush=True)  # a log alone can rebuild the table
    return _write(stem, result | {"runs": runs}, t0, settings_of)


def _partial(out: Path, dataset: str, run: str) -> Path:
    """Where an unfinished run keeps its last epoch (model/train.py: progress_file): a run cut off carries on from
    there when the command is run again; deleted once the run is in the results."""
    return out / "partial" / (_run_name(dataset, run) + ".safetensors")


def _run_name(dataset: str, run: str) -> str:
    """A run as a file name: its partial epoch's, and its checkpoint's folder with --checkpoints."""
    return re.sub(r"[^\w.=-]+", "_", f"{dataset}_{run}")


def _settings(name: str, run: dict[str, Any]) -> dict[str, Any]:
    """A recorded run's settings. One written before weight decay, ema, label smoothing, Adam's beta2 (or HoloMambaRec's item
    dropout) was recorded trained at what its row name set, else at ModelConfig's default (then the only one)."""
    cfg = model_config(name)
    old = {"item_dropout": cfg.item_dropout} if name.startswith("holomamba") else {}
    return _recorded(cfg) | old | run.get("settings", {})


def _recorded(cfg: ModelConfig) -> dict[str, float]:
    """The config fields every run's settings record besides lr and dropout (a row name may set them): the tuned ones
    (CONFIG_FIELDS) but item dropout, which only HoloMambaRec's runs record."""
    return {k: getattr(cfg, k) for k in CONFIG_FIELDS if k != "item_dropout"}


def _write(stem: Path, result: dict[str, Any], t0: float, settings_of: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Merge `result`'s runs into the JSON on disk (another process may be filling other rows of the
    same table), summarise every run and write the JSON and markdown, under a lock."""
    with open(stem.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = stem.with_suffix(".json")
        disk = json.loads(path.read_text()) if path.exists() else {}
        on_disk = disk.get("runs", {})
        result["commands"] = list(dict.fromkeys(disk.get("commands", []) + result.get("commands", [])))  # every process's
        for name, settings in settings_of.items():  # a row is one model at one set of settings: runs at others are replaced
            mine = [r for r in result["runs"].get(name, []) if _settings(name, r) == settings]
            seeds = {r["seed"] for r in mine}
            on_disk[name] = [r for r in on_disk.get(name, []) if _settings(name, r) == settings and r["seed"] not in seeds] + mine
        result["runs"] = runs = {name: sorted(rs, key=lambda r: r["seed"]) for name, rs in on_disk.items()}
        _summarise(stem, result, t0)
    return result


def _summarise(stem: Path, result: dict[str, Any], t0: float) -> None:
    runs = result["runs"]
    result["summary"] = {name: {m: _mean_std([r["test"][m] for r in rs]) for m in METRICS}
                         | {"train_seconds": _mean_std([r["train_seconds"] for r in rs]),
                            **({"step_ms_b1": _mean_std([r["step_ms_b1"] for r in rs]),
                                "NDCG@10 seen excluded": _mean_std([r["test_seen_excluded"]["NDCG@10"] for r in rs])}
                               if all("step_ms_b1" in r for r in rs) else {}),
                            **({"NDCG@10 full history": _mean_std([r["test_full_history"]["NDCG@10"] for r in rs])}
                               if all(r.get("test_full_history") for r in rs) else {}),
                            "valid NDCG@10": _mean_std([r["valid"]["NDCG@10"] for r in rs])}
                         for name, rs in runs.items() if rs}
    result["wall_seconds"] = time.perf_counter() - t0
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(_markdown(result))
    print(f"wrote {stem}.md and {stem}.json")


def _markdown(r: dict[str, Any]) -> str:
    hw = r["hardware"]
    lines = [
        f"# Accuracy on {r['dataset']}",
        "",
        f"{r['summary_line']}. {r['protocol']}.",
        f"Test split; mean ± std over the seeds run; up to {r['epochs']} epochs, early stopping after {r.get('patience', 5)} epochs "
        f"and {r.get('patience_steps', 0)} optimizer steps without a better validation NDCG@10 (the best epoch's weights kept); max_len {r['max_len']}, d_model {r['d_model']} (unless the row's name sets it), "
        "AdamW; lr, dropout and batch size per model (columns).",
        "",
        "| model | " + " | ".join(METRICS) + " | valid NDCG@10 | NDCG@10, seen excluded | NDCG@10, full history | lr | dropout | batch | train s | step ms (b=1) | seeds | best epoch / run |",
        "|---|" + "---|" * (len(METRICS) + 10),
    ]
    for name, s in r["summary"].items():
        rs = r["runs"][name]
        cells = [f"{s[m][0]:.4f} ± {s[m][1]:.4f}" for m in METRICS]
        for key in ("valid NDCG@10", "NDCG@10 seen excluded", "NDCG@10 full history"):
            cells.append(f"{s[key][0]:.4f} ± {s[key][1]:.4f}" if key in s else "-")
        st = rs[0].get("settings", {"lr": r.get("lr", "-"), "dropout": r.get("dropout", "-")})
        epochs = ", ".join(f"{x['best_epoch']}/{x['epochs_run']}" for x in rs)
        step = f"{s['step_ms_b1'][0]:.2f}" if "step_ms_b1" in s else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {st['lr']} | {st['dropout']} | {st.get('batch_size', r.get('batch_size', '-'))} | {s['train_seconds'][0]:.0f} ± {s['train_seconds'][1]:.0f} "
                     f"| {step} | {len(rs)} | {epochs} |")
    lines.append("| popularity | " + " | ".join(f"{r['popularity'][m]:.4f}" for m in METRICS) + " | - | - | - | - | - | - | - | - | - | - |")
    if unfitted := [name for name, rs in r["runs"].items() if rs and rs[0].get("settings", {}).get("unfitted_valid")]:
        lines += ["", f"Trained with --unfitted-valid ({', '.join(unfitted)}): without each user's last training item as well, so the "
                  "validation input's newest item, like the test input's, was never a training target (a diagnostic; model/split.py)."]
    commands = r.get("commands") or [r.get("command", "")]
    lines += [
        "",
        "HoloMambaRec reads item attributes (bound to the item by circular convolution); SASRec, GRU4Rec and ELASTIC are ID-only. "
        "ELASTIC is ELASTIC-style: our reconstruction from the paper's abstract. "
        "holomamba:bundle=G is HoloMambaRec with temporal bundling: G items bound to slot roles per SSM step; "
        "other `model:field=value` rows change one config field (an ablation). "
        "NDCG@10, seen excluded: the same checkpoint ranked with the user's history items removed (the target kept). "
        "NDCG@10, full history: the recurrent models read each user's whole history, as the service's stored state does, "
        "instead of the last max_len items training sees (SASRec cannot: its window is its state). "
        "step ms: one serving `step` for one user (eval mode, CPU), mean of 200 after a warm-up; SASRec's step re-runs its window.",
        "",
        "A best epoch equal to the epochs run means validation NDCG@10 was still rising: that model is under-trained "
        "at this budget, and the table compares budgets as much as models.",
        "",
        "Command(s), rerun to resume: " + "; ".join(f"`{c}`" for c in commands),
        f"Hardware: {hw['cpu']}, {hw['cores']} cores, {hw['torch_threads']} torch threads, device {hw['device']}"
        + (f" ({hw['gpu']})" if "gpu" in hw else "") + f"; torch {hw['torch']}; load average {hw.get('load_average_at_start', float('nan')):.1f} at start.",
        f"Wall time: {r['wall_seconds']:.0f} s, finished {r['finished']}.",
        "",
    ]
    return "\n".join(lines)
