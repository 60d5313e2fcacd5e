"""Training: one plain loop, the same for every model behind the protocol.

An epoch is one pass over every training row (one row per user: inputs s[:-1], targets s[1:] of
the user's training sequence, left-padded to max_len), so it covers every training position
inside the window. Loss: full-softmax cross-entropy over all items (SeqRecModel.loss). AdamW with
weight decay on matrices and embeddings only (not biases, norms, or the SSM's A_log and D, as
Mamba exempts them), gradient norm clipped at 1; a non-finite loss stops training (best weights kept, reason in the
report). With `config.ema` > 0 an exponential moving average of the weights is kept beside them (Polyak averaging,
decay min(ema, (1 + t) / (ema_warmup + t)) at step t, ema_warmup 10 by default, so the early average is not the random start), and it is the average that
is validated, kept as best and saved: the weights as served. After each epoch: validation NDCG@10 (full ranking), the learning rate halved after every
`config.lr_halve_after` epochs without a better one when that is set (or, with `config.lr_cosine_epochs`, the rate set
at every step along a half cosine to 0 at the end of that epoch, where training ends); the best
epoch's weights are kept and training stops after `patience` epochs without improvement that also
hold at least `patience_steps` optimizer steps: on a small log an epoch is a handful of steps
(MovieLens-100K at batch 128: 8), and ten of them is not long enough to tell a plateau from a
model still finding its way (SASRec at lr 1e-3 sat flat for 10 epochs from epoch 4, then rose).
Seeded: on CPU the same seed gives the same losses, bit for bit. With `progress_file` the loop's whole state
(weights, best weights, optimizer, random generators, history) is written there after every epoch, so a run cut
off (a CPU run longer than a working session) carries on from its last epoch, bit for bit, when started again.

Threads: HOLOREC_THREADS (default 1) sets torch.set_num_threads. One thread by default because
torch's default (one per core) collapses when the machine has other work: OpenMP threads spin
waiting for each other, and on a busy 2-core machine training ran 13x slower with two than one.
Shape letters: b batch, l max_len.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from model import build_model
from model.checkpoint import Checkpoint, save
from model.data import Dataset
from model.split import left_pad, split
from model.evaluate import evaluate, evaluate_popularity, format_metrics
from model.protocol import ModelConfig, SeqRecModel, State

# Dropout by dataset kind: dense MovieLens-like logs (and synthetic) 0.2; sparse ones, where a
# user has a handful of items (Amazon Beauty in S3-Rec format, and plain tables as sparse: model/data.py
# table_kind), 0.5, as SASRec found for its sparse Amazon sets.
DEFAULT_DROPOUT = {"movielens": 0.2, "synthetic": 0.2, "s3rec": 0.5}
DEFAULT_LR, DEFAULT_BATCH = 1e-3, 128  # SASRec's published learning rate and batch size
# Train to convergence by default: every tuned value below was chosen on runs of up to 200 epochs with this early
# stopping (README: Accuracy to convergence); at 10 epochs (the paper's budget) most models are still learning.
EPOCHS, PATIENCE = 200, 10

# Values chosen on validation NDCG@10 only (`holorec bench accuracy --grid`, or rows such as
# `holomamba:weight_decay=0.1`), per model and dataset kind; a pair not listed takes DEFAULT_LR,
# DEFAULT_DROPOUT and ModelConfig's weight decay.
# Weight decay 0.1 on S3-Rec-format (Amazon) logs, chosen on seed 0 to convergence on Beauty, validation NDCG@10 against
# 0.01: HoloMambaRec 0.0513 vs 0.0476, SASRec 0.0451 vs 0.0438; 3 seeds since: 0.0510 ± 0.0007 vs 0.0478 ± 0.0008 and
# 0.0456 ± 0.0005 vs 0.0442 ± 0.0006 (bench/results/cpu-2026-12-03). Then 0.3, seed 0: HoloMambaRec 0.0507 (below 0.1's
# 0.0513, so it keeps 0.1), SASRec 0.0470 (above 0.1's 0.0451, so it takes 0.3; at 1.0, 2 seeds, level: 0.0475 vs 0.0472,
# so 0.3 stays). GRU4Rec at 0.1, seed 0: 0.0390 vs 0.0376 at 0.01, so it takes 0.1. ELASTIC-style keeps 0.01 (not tried).
# A moving average of the weights (ema 0.999), seed 0 on Beauty: SASRec 0.0497 vs 0.0470, HoloMambaRec 0.0515 vs 0.0513
# (level: it takes it so that both train one way); GRU4Rec and ELASTIC-style not tried.
# Item dropout 0.2 for HoloMambaRec (2026-12-04), validation NDCG@10 against 0.0 to convergence: ML-100K, 5 seeds on a GPU,
# 0.0721 ± 0.0035 vs 0.0696 ± 0.0024, higher on every seed (bench/results/gpu-2026-12-04); Beauty, 3 seeds, 0.0520 ± 0.0011
# vs 0.0512 ± 0.0008, higher on every seed (bench/results/cpu-2026-12-04, gpu-2026-12-04); test, not used to choose, level.
# A plain table takes the kind its density says (model/data.py table_kind); without attributes no item is dropped (model/holomamba.py).
# HoloMambaRec on S3-Rec (Amazon) logs since the end of 2026-12-04: lr 2e-3, weight decay 0.2 and label smoothing 0.1 together.
# Each alone raised Beauty's seed 0 validation NDCG@10 (0.0534, 0.0537, 0.0536 against 0.0524; bench/results/gpu-2026-12-04-beauty);
# together, higher on every seed (seeds 0, 1 finished; seed 2 cut off at epoch 98, already higher; bench/results/cpu-2026-12-04-beauty).
# Then dropout 0.3 (from the paper's Amazon 0.5, set before those regularisers came in): validation 0.0562, 0.0558, 0.0546
# against 0.0546, 0.0538, 0.0523 at seeds 0-2 (seed 2 level with an unfinished CPU run's 0.0547; bench/results/cpu-2026-12-04-beauty).
# Test, not used to choose, in the README.
# Batch 64 for HoloMambaRec on S3-Rec (Amazon) logs since 2026-12-06 (all other values as above): validation NDCG@10 0.0569,
# 0.0568, 0.0564 against 0.0562, 0.0558, 0.0546 at batch 128, seeds 0-2, higher on every seed (bench/results/cpu-2026-12-06c-beauty).
# SASRec given the same, for fairness: 0.0501, 0.0505, 0.0501 against 0.0497, 0.0502, 0.0488, higher on every seed too, so
# it trains at 64 on those logs as well (same folder). Seeds 3-4 agree for both models (bench/results/cpu-2026-12-06d-beauty).
# Batch 32 for both, tried (2026-12-06): higher on validation NDCG@10 at seeds 0-2 for both, then lower at seeds 3-4 for both;
# over five seeds, paired against 64, HoloMambaRec +0.0003 ± 0.0008 and SASRec +0.0004 ± 0.0005, inside the noise, so both keep
# 64 (bench/results/cpu-2026-12-06f-beauty).
# HoloMambaRec's dropout 0.2 at batch 64, tried (2026-12-06): higher than 0.3 at seeds 0-2, lower at 3-4; over five seeds,
# paired, +0.0006 ± 0.0010, short of the rule written before its last seed (4 of 5 higher and t > 2), so 0.3 stays
# (bench/results/cpu-2026-12-06g-beauty).
# SASRec's dropout on S3-Rec (Amazon) logs, retried at batch 64 (2026-12-06; fairness, as HoloMambaRec's was): 0.3 was higher
# than its paper's 0.5 at seeds 0-2 (0.0507, 0.0512, 0.0505 against 0.0501, 0.0505, 0.0501) and lower at seeds 3-4 (0.0501,
# 0.0506 against 0.0511, 0.0508); over five seeds, paired, +0.0001 ± 0.0007, short of the rule written before seeds 3-4 ran,
# so it keeps 0.5; 0.2 at seed 0 lower (0.0497) (bench/results/cpu-2026-12-06g-beauty, cpu-2026-12-06h-beauty).
# Adam's beta2 0.98 for SASRec on S3-Rec (Amazon) logs since 2026-12-07, its reference code's (kang205/SASRec): validation
# NDCG@10 0.0527, 0.0524, 0.0518, 0.0522, 0.0521 against torch's 0.999's 0.0501, 0.0505, 0.0501, 0.0511, 0.0508 at seeds 0-4,
# higher on every seed (paired +0.0017 ± 0.0006), the rule written before the runs (bench/results/cpu-2026-12-07-beauty).
# On ML-100K lower at seeds 0-1 and level at 2 (0.0598, 0.0601, 0.0600 against 0.0632, 0.0623, 0.0599), so MovieLens keeps 0.999
# (bench/results/cpu-2026-12-07-ml100k). HoloMambaRec at 0.98 on Beauty, seed 0: level (0.0571 against 0.0569), so it keeps 0.999.
# GRU4Rec at 0.98: on ML-100K lower at every seed 0-2 (0.0662, 0.0646, 0.0698 against 0.0697, 0.0673, 0.0709), so it keeps 0.999
# (bench/results/cpu-2026-12-07b-ml100k); on Beauty higher at every seed 0-2 (0.0406, 0.0387, 0.0408 against 0.0390, 0.0374,
# 0.0373; paired +0.0022 ± 0.0012, the rule written before seeds 1-2 ran), so it takes 0.98 on S3-Rec (Amazon) logs since
# 2026-12-07 (bench/results/cpu-2026-12-07b-beauty, cpu-2026-12-07d-beauty).
# ELASTIC-style at 0.98 on Beauty: higher at seeds 0-1, lower at 2 (0.0498, 0.0501, 0.04945 against 0.0465, 0.0480, 0.04967;
# paired +0.0017 ± 0.0018, short of the same rule), so it keeps 0.999 (cpu-2026-12-07d-beauty).
# SASRec on MovieLens since 2026-12-05: lr 2e-3 and dropout 0.5, chosen by issue #13's grid (lr 5e-4, 1e-3, 2e-3 x dropout
# 0.2, 0.5) on ML-100K, seed 0, up to 400 epochs: validation NDCG@10 0.0632 against 0.0584 at the paper's lr 1e-3 and
# dropout 0.2, the next best 0.0611 (lr 1e-3, dropout 0.5; bench/results/cpu-2026-12-05i-ml100k-grid, `python -m bench.grid_table`).
# HoloMambaRec on MovieLens since 2026-12-06: lr 2e-3 and dropout 0.5, by the same grid (item dropout 0.2 kept), seed 0, up
# to 200 epochs: validation NDCG@10 0.0793 against 0.0721 at lr 1e-3 and dropout 0.2, the next best 0.0761 (lr 1e-3,
# dropout 0.5; dropout 0.5 ahead at lr 1e-3 and 2e-3, behind at 5e-4; same folder). Seeds 1-2 there too; test in the README.
# GRU4Rec on MovieLens since 2026-12-06: lr 2e-3 (dropout 0.2 as before), by the same grid,
# seed 0, up to 200 epochs: validation NDCG@10 0.0697 against 0.0632 at lr 1e-3, the next best 0.0683 (lr 2e-3, dropout
# 0.5; lr 5e-4 with 400 epochs: 0.0625, 0.0607; same folder). Seeds 1-2 there too.
# HoloMambaRec on S3-Rec (Amazon) logs since 2026-12-07: dropout 0.2 with a longer moving average of the weights (ema 0.9999,
# warm-up 5: about the last quarter of training), the two together; each alone had been higher on validation without meeting
# the keep rule (bench/results/cpu-2026-12-06g-beauty, cpu-2026-12-07g-beauty). Together, validation NDCG@10 at seeds 0-4
# 0.0583, 0.0589, 0.0574, 0.0584, 0.0584 against 0.0569, 0.0568, 0.0564, 0.0586, 0.0576: higher on 4 of 5, paired
# +0.00105 ± 0.00084, above 2 sd / sqrt(5) = 0.00075, the rule written before the runs (bench/results/cpu-2026-12-07i-beauty).
# SASRec given the longer average too (fairness; its dropout is its own grid's): validation NDCG@10 at seeds 0-4 0.0532,
# 0.0535, 0.0535, 0.0527, 0.0522 against 0.0527, 0.0524, 0.0518, 0.0522, 0.0521: higher on 5 of 5, paired +0.00078 ±
# 0.00063, above 2 sd / sqrt(5) = 0.00056, the same rule (same folder).
TUNED: dict[tuple[str, str], dict[str, float]] = {("holomamba", "s3rec"): {"lr": 2e-3, "dropout": 0.2, "weight_decay": 0.2, "ema": 0.9999,
                                                                           "ema_warmup": 5.0, "item_dropout": 0.2, "label_smoothing": 0.1, "batch_size": 64},
                                                  ("holomamba", "movielens"): {"lr": 2e-3, "dropout": 0.5, "item_dropout": 0.2},
                                                  ("sasrec", "s3rec"): {"weight_decay": 0.3, "ema": 0.9999, "ema_warmup": 5.0, "batch_size": 64, "adam_beta2": 0.98},
                                                  ("sasrec", "movielens"): {"lr": 2e-3, "dropout": 0.5},
                                                  ("gru4rec", "s3rec"): {"weight_decay": 0.1, "adam_beta2": 0.98},
                                                  ("gru4rec", "movielens"): {"lr": 2e-3}}


CONFIG_FIELDS = ("weight_decay", "ema", "ema_warmup", "item_dropout", "label_smoothing", "adam_beta2")  # the ones of hyper()'s values that live in ModelConfig


def hyper(model: str, kind: str) -> dict[str, float]:
    """The learning rate, batch size, dropout, weight decay, weight averaging (decay and warm-up), item dropout, label
    smoothing and Adam's beta2 `model` trains with on a dataset of this kind by default."""
    return ({"lr": DEFAULT_LR, "batch_size": DEFAULT_BATCH, "dropout": DEFAULT_DROPOUT[kind], "weight_decay": ModelConfig.weight_decay, "ema": ModelConfig.ema,
             "ema_warmup": ModelConfig.ema_warmup,
             "item_dropout": ModelConfig.item_dropout, "label_smoothing": ModelConfig.label_smoothing, "adam_beta2": ModelConfig.adam_beta2} | TUNED.get((model, kind), {}))


def optimizer(model: SeqRecModel, lr: float) -> torch.optim.AdamW:
    """AdamW decaying only weight matrices and embeddings: decay pulls a norm's gain, a bias, the
    SSM's decay rates A_log or its skip D towards zero, which is a change of model, not a prior."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.endswith("A_log") else keep).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": model.config.weight_decay}, {"params": keep, "weight_decay": 0.0}], lr=lr,
                             betas=(0.9, model.config.adam_beta2))


def set_threads() -> None:
    """torch's intra-op threads from HOLOREC_THREADS, 1 when unset (see the module docstring)."""
    n = os.environ.get("HOLOREC_THREADS", "1")
    if not n.isdigit() or int(n) < 1:
        raise SystemExit(f"HOLOREC_THREADS must be a whole number >= 1, got {n!r}")
    torch.set_num_threads(int(n))


def train(
    ds: Dataset,
    config: ModelConfig,
    *,
    epochs: int = EPOCHS,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_BATCH,
    seed: int = 0,
    device: str = "cpu",
    patience: int = PATIENCE,
    patience_steps: int = 500,
    out: Path | None = None,
    progress: bool = True,
    progress_file: Path | None = None,
    unfitted_valid: bool = False,
) -> tuple[Checkpoint, dict[str, Any]]:
    """Train `config.model` on ds; returns the best-validation checkpoint and a report (metrics, history).
    `progress_file`: carry on from the epoch saved there by the same run (same data, model, seed, lr, batch and
    patience; the epoch budget may differ), and save there after every epoch; the caller deletes it when done.
    `unfitted_valid`: see model/split.py (validation then reads test's condition; a diagnostic, off by default)."""
    set_threads()
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed)
    sp = split(ds, config.max_len, unfitted_valid)
    config = replace(config, n_items=ds.n_items, n_attrs=ds.n_attrs, max_attrs=ds.max_attrs)
    if config.lr_cosine_epochs and config.lr_halve_after:
        raise ValueError("lr_cosine_epochs and lr_halve_after both set the learning rate: choose one")
    epochs = min(epochs, config.lr_cosine_epochs or epochs)  # the decay's end is training's end
    if config.burn_in and (config.model != "holomamba" or config.bundle > 1):
        raise ValueError("burn_in needs a carried state: HoloMambaRec without bundling")
    model = build_model(config, ds.item_attr_tensor()).to(device)
    opt = optimizer(model, lr)
    valid_h, valid_t = sp.eval_set("valid")
    n_rows = sp.inputs.shape[0]
    lengths = (sp.inputs > 0).sum(1)  # (rows,) real positions per training row
    if n_rows == 0:
        raise ValueError(f"{ds.name}: no user has two training items; nothing to train on")

    def validate() -> dict[str, float]:  # a burned-in model is chosen on what it is trained for: the whole history's state
        return evaluate(model, valid_h, valid_t, device=device, full_history=config.burn_in > 0) if valid_t else {"NDCG@10": 0.0}

    def averaged(run: Any) -> Any:  # run() with the moving average loaded in place of the weights (the weights when off)
        if ema is None:
            return run()
        weights = _copy_state(model)
        model.load_state_dict(ema)
        try:
            return run()
        finally:
            model.load_state_dict(weights)

    run_key = {"data": ds.summary(), "config": config.to_dict(), "seed": seed, "lr": lr, "batch_size": batch_size,
               "patience": patience, "patience_steps": patience_steps} | ({"unfitted_valid": True} if unfitted_valid else {})  # what makes a saved epoch this run's
    ema = _copy_state(model) if config.ema > 0 else None  # the averaged weights, float tensors updated in place
    saved = _load_progress(progress_file, run_key, model, opt, shuffle, ema) if progress_file else None
    if saved is None:
        best = validate()  # the untrained model is the bar to beat
        history: list[dict[str, Any]] = [{"epoch": 0, "valid": best}]
        best_epoch, best_state, bad, early_stopped = 0, _copy_state(model), 0, False
    else:
        best, history, best_epoch, bad, early_stopped = saved["best"], saved["history"], saved["best_epoch"], saved["bad"], saved["early_stopped"]
        best_state, t0 = saved["best_state"], t0 - saved["seconds"]
    stopped = ""
    if progress:
        print(f"{ds.summary()}; {n_rows} training rows, {int((sp.targets > 0).sum())} positions; "
              f"{config.model}, {sum(p.numel() for p in model.parameters()):,} parameters"
              + (f"; carrying on after epoch {len(history) - 1} ({progress_file})" if saved else ""))
    for epoch in range(len(history), 0 if early_stopped else epochs + 1):
        model.train()
        batches = length_buckets(lengths, batch_size, shuffle)
        bar = tqdm(batches, desc=f"epoch {epoch}", disable=not progress or not sys.stderr.isatty(), leave=False)  # a log gets the epoch lines
        t_epoch, seen, total = time.perf_counter(), 0, 0.0
        for s, rows in enumerate(bar):
            width = int(lengths[rows].max())  # left padding beyond the longest row changes no output: cut it
            x, y = sp.inputs[rows, -width:].to(device), sp.targets[rows, -width:].to(device)  # (b, width) each
            loss = model.loss(x, y, burn_in(model, sp.prefixes, rows, config.burn_in, device))
            if not torch.isfinite(loss):  # diverged: keep the best weights so far and say so
                stopped = f"non-finite loss ({loss.item()}) at epoch {epoch}, step {s + 1}"
                break
            if config.lr_cosine_epochs:  # from the step count alone, so a resumed run sets the same rates
                t = ((epoch - 1) * len(batches) + s) / (config.lr_cosine_epochs * len(batches))  # [0, 1)
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * t))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if ema is not None:
                t = (epoch - 1) * len(batches) + s  # optimizer steps before this one
                _average(ema, model, min(config.ema, (1 + t) / (config.ema_warmup + t)))
            n = int((y > 0).sum())
            seen, total = seen + n, total + loss.item() * n
            bar.set_postfix(loss=f"{loss.item():.3f}", pos_s=f"{seen / (time.perf_counter() - t_epoch):,.0f}")
        if stopped:
            if progress:
                print(f"stopping: {stopped}")
            break
        seconds = time.perf_counter() - t_epoch
        valid = averaged(validate)
        history.append({"epoch": epoch, "loss": total / seen, "seconds": seconds, "positions_per_s": seen / seconds, "valid": valid,
                        "lr": opt.param_groups[0]["lr"]})
        improved = valid["NDCG@10"] > best["NDCG@10"]
        if improved:
            best_state = _copy_state(model) if ema is None else {k: v.clone() for k, v in ema.items()}
            best, best_epoch, bad = valid, epoch, 0
        else:
            bad += 1
        halve = not improved and config.lr_halve_after > 0 and bad % config.lr_halve_after == 0
        if halve:  # a plateau: smaller steps from here (the weights stay where they are)
            for group in opt.param_groups:
                group["lr"] /= 2
        if progress:
            note = f" (lr now {opt.param_groups[0]['lr']:.2g})" if halve else ""
            print(f"epoch {epoch}: loss {total / seen:.4f}, {seen / seconds:,.0f} positions/s, valid {format_metrics(valid)}{' *' if improved else ''}{note}", flush=True)
        early_stopped = bad >= max(patience, -(-patience_steps // len(batches)))
        if progress_file is not None:
            _save_progress(progress_file, run_key, model, opt, shuffle, best_state, ema, {
                "best": best, "history": history, "best_epoch": best_epoch, "bad": bad, "early_stopped": early_stopped,
                "seconds": time.perf_counter() - t0})
        if early_stopped:
            break
    model.load_state_dict(best_state)
    model.eval()
    test = evaluate(model, *sp.eval_set("test"), device=device) if sp.test_targets else {}
    counts = ds.train_counts()
    report: dict[str, Any] = {
        "data": ds.source,
        "attributes": ds.attributes_source,
        "dataset": ds.name,
        "model": config.model,
        "epochs_run": len(history) - 1,
        "best_epoch": best_epoch,
        "stopped": stopped or ("early stopping" if len(history) - 1 < epochs else "epochs done"),
        "valid": best,
        "test": test,
        "popularity_test": evaluate_popularity(counts, *sp.eval_set("test")) if sp.test_targets else {},
        "history": history,
        "train_seconds": time.perf_counter() - t0,
        "hyper": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "patience": patience, "patience_steps": patience_steps},
        "seed": seed,
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    ckpt = Checkpoint(model.cpu(), list(ds.items), list(ds.attributes), ds.popularity()[:1000], report)
    if out is not None:
        save(ckpt, out)
    return ckpt, report


def burn_in(model: torch.nn.Module, prefixes: list[list[int]], rows: Tensor, limit: int, device: str) -> State | None:
    """The state each row's window starts from: after its last `limit` earlier items, in eval mode and without
    gradients, as serving would hold it. Serving folds a whole history into the state while a window alone trains
    only from the empty state, and beyond the window the two drift apart (bench/results/cpu-2026-12-01); this trains
    the model on the states it is served from. None when off or when no row of the batch has earlier items."""
    pre = [prefixes[r][-limit:] for r in rows.tolist()] if limit else []
    width = max(map(len, pre), default=0)
    if width == 0:
        return None
    model.eval()
    with torch.no_grad():
        _, state = model.forward_state(left_pad(pre, width).to(device))
    model.train()
    return state


def length_buckets(lengths: Tensor, batch_size: int, g: torch.Generator, pool: int = 50) -> list[Tensor]:
    """A shuffled epoch's batches, each of rows with similar lengths.

    Rows are shuffled, sorted by length within pools of `pool` batches, cut into batches, and the
    batches shuffled. Every row is seen once per epoch, as with a plain shuffle, but a batch of
    short histories (most of Beauty's) is no longer padded to the longest in the dataset.
    """
    order = torch.randperm(len(lengths), generator=g)
    pools = [p[torch.argsort(lengths[p], stable=True)] for p in order.split(batch_size * pool)]
    batches = [b for p in pools for b in p.split(batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def _copy_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def _average(ema: dict[str, Tensor], model: torch.nn.Module, decay: float) -> None:
    """ema <- decay ema + (1 - decay) weights, for every float tensor of the state (integer buffers are copied)."""
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            ema[k].lerp_(v, 1 - decay)
        else:
            ema[k].copy_(v)


def _save_progress(path: Path, key: dict[str, Any], model: SeqRecModel, opt: torch.optim.Optimizer, shuffle: torch.Generator,
                   best_state: dict[str, Tensor], ema: dict[str, Tensor] | None, loop: dict[str, Any]) -> None:
    """One safetensors file (tensors, and the loop's counters as JSON in its metadata), replaced atomically: a run
    killed mid-write keeps the epoch before."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()} | {f"best.{k}": v for k, v in best_state.items()}
    tensors |= {f"ema.{k}": v for k, v in (ema or {}).items()}
    for i, s in opt.state_dict()["state"].items():  # AdamW: step, exp_avg, exp_avg_sq per parameter
        tensors |= {f"opt.{i}.{k}": v for k, v in s.items()}
    tensors |= {"rng.torch": torch.get_rng_state(), "rng.shuffle": shuffle.get_state()}
    if torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"key": key, "lrs": [g["lr"] for g in opt.param_groups]} | loop
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"progress": json.dumps(meta)})
    os.replace(tmp, path)


def _load_progress(path: Path, key: dict[str, Any], model: SeqRecModel, opt: torch.optim.Optimizer,
                   shuffle: torch.Generator, ema: dict[str, Tensor] | None) -> dict[str, Any] | None:
    """Restore what _save_progress wrote into model, opt, ema and the generators; -> the loop's counters and best weights.
    None (start afresh) when there is no file or it is another run's."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["progress"])
            if meta["key"] != json.loads(json.dumps(key)):  # compared as JSON reads it back
                return None
            t = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as e:  # not a file _save_progress finished
        print(f"{path}: unreadable ({e}); starting the run afresh", file=sys.stderr)
        return None
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    for k in ema or {}:
        ema[k].copy_(t[f"ema.{k}"])
    sd = opt.state_dict()
    sd["state"] = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            sd["state"].setdefault(int(i), {})[name] = v
    for group, lr in zip(sd["param_groups"], meta["lrs"]):
        group["lr"] = lr
    opt.load_state_dict(sd)
    torch.set_rng_state(t["rng.torch"])
    shuffle.set_state(t["rng.shuffle"])
    if "rng.cuda" in t and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["rng.cuda"])
    device = next(model.parameters()).device
    return meta | {"best_state": {k[5:]: v.to(device) for k, v in t.items() if k.startswith("best.")}}
