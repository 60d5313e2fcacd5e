"""Where validation and test part: NDCG@10 of checkpoints on both splits, per bucket of users.

The converged tables show test keeping less of validation's NDCG@10 for the recurrent models than for SASRec
(bench/results/valid_test.md). This splits both evaluations of each checkpoint by the target's training count
(how cold the item is) and by the user's history length, so the loss can be located: the same users, the same
checkpoints, only the bucket varies. Beside the buckets: each checkpoint's NDCG@10 with the user's history excluded,
how popular the items it recommends are (training count of its top 10), and its scoring vectors' norm per item bucket.

    python -m bench.buckets CKPT [CKPT ...] [--data PATH] > FILE.md

Every checkpoint must be trained on the same dataset (the one it records, or --data).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor

from model.checkpoint import load as load_checkpoint
from model.data import load
from model.evaluate import metrics_from_ranks, user_ranks
from model.protocol import SeqRecModel
from model.split import left_pad, split
from model.train import set_threads

COLD = ((0, 0), (1, 4), (5, 19), (20, 99), (100, None))  # training occurrences of the target
LENGTH = ((1, 4), (5, 9), (10, 19), (20, 49), (50, 199), (200, None))  # items in the history the model reads


def _bucket(x: int, edges: tuple[tuple[int, int | None], ...]) -> int:
    return next(i for i, (lo, hi) in enumerate(edges) if x >= lo and (hi is None or x <= hi))


def _label(lo: int, hi: int | None) -> str:
    return f"{lo}+" if hi is None else str(lo) if lo == hi else f"{lo}-{hi}"


def table(names: list[str], ranks: dict[str, dict[str, Tensor]], ids: dict[str, Tensor],
          edges: tuple[tuple[int, int | None], ...], title: str) -> str:
    """One markdown table: per bucket, the users' share and each checkpoint's valid and test NDCG@10, their ratio and
    how many targets made the top 10 (few hits: a ratio within chance).
    ids[split]: (users,) each user's bucket on that split."""
    head = f"| {title} | valid users | test users | " + " | ".join(f"{n}: valid / test (ratio; hits@10)" for n in names) + " |"
    lines = [head, "|" + "---|" * (3 + len(names))]
    for b, (lo, hi) in enumerate(edges):
        rows = {s: ids[s] == b for s in ids}
        if not any(r.any() for r in rows.values()):
            continue
        cells = []
        for n in names:
            v, t = (metrics_from_ranks(ranks[n][s][rows[s]])["NDCG@10"] if rows[s].any() else float("nan") for s in ("valid", "test"))
            hv, ht = ((ranks[n][s][rows[s]] <= 10).sum().item() for s in ("valid", "test"))
            cells.append((f"{v:.4f} / {t:.4f} ({t / v:.2f}" if v > 0 else f"{v:.4f} / {t:.4f} (-") + f"; {hv} / {ht} hits)")
        share = " | ".join(f"{rows[s].float().mean().item():.1%}" for s in ("valid", "test"))
        lines.append(f"| {_label(lo, hi)} | {share} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@torch.no_grad()
def top10(model: SeqRecModel, histories: list[list[int]], batch_size: int = 512) -> Tensor:  # -> (users, 10) item indices
    """Each user's ten best-scored items, padding excluded, from the last max_len items (as evaluation reads them)."""
    model.eval()
    out = []
    for s in range(0, len(histories), batch_size):
        x = left_pad(histories[s : s + batch_size], model.config.max_len)  # (b, max_len)
        scores = model.score(model.user_vector(x))  # (b, v)
        scores[:, 0] = float("-inf")
        out.append(scores.topk(10, dim=-1).indices)
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.buckets", description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data", help="dataset path (default: the one the first checkpoint records)")
    a = p.parse_args()
    set_threads()
    ckpts = [load_checkpoint(c) for c in a.checkpoints]
    ds = load(a.data or ckpts[0].provenance["data"], None if a.data else ckpts[0].provenance.get("attributes"))
    sp = split(ds, 1)  # evaluation histories are whole whatever the window: user_ranks cuts each model's own
    names, ranks, unseen = [], {}, {}  # unseen: the same ranks with the user's history removed from the ranking
    for path, ck in zip(a.checkpoints, ckpts):
        if ck.items != ds.items:
            raise SystemExit(f"{path}: trained on another item vocabulary than {ds.name}")
        name = f"{ck.model.config.model} ({Path(path).name})"
        names.append(name)
        ranks[name] = {s: user_ranks(ck.model, *sp.eval_set(s)) for s in ("valid", "test")}
        unseen[name] = {s: user_ranks(ck.model, *sp.eval_set(s), exclude_seen=True) for s in ("valid", "test")}
    counts = ds.train_counts()
    print(f"# Validation against test, per bucket: {ds.summary()}\n")
    print("Command: `python -m bench.buckets " + " ".join(a.checkpoints) + (f" --data {a.data}" if a.data else "") + "`\n")
    print("Overall NDCG@10, valid / test (ratio): " + "; ".join(
        f"{n} {metrics_from_ranks(r['valid'])['NDCG@10']:.4f} / {metrics_from_ranks(r['test'])['NDCG@10']:.4f}" for n, r in ranks.items()) + "\n")
    print("With the history excluded, NDCG@10 valid / test, and how many targets the user's own items push out of the top 10 "
          "(hits@10 without the history minus with it; no target is in its history): " + "; ".join(
        f"{n} {metrics_from_ranks(u['valid'])['NDCG@10']:.4f} / {metrics_from_ranks(u['test'])['NDCG@10']:.4f}, "
        + " / ".join(str(((u[s] <= 10).sum() - (ranks[n][s] <= 10).sum()).item()) for s in ("valid", "test"))
        for n, u in unseen.items()) + "\n")
    count_of = torch.tensor(counts, dtype=torch.float)  # (v,)
    test_hist, test_tgt = sp.eval_set("test")
    recs = {n: count_of[top10(ck.model, test_hist)] for n, ck in zip(names, ckpts)}  # (users, 10) each
    recs["test targets"] = count_of[torch.tensor(test_tgt)]
    print("Training count of what each model puts in its top 10 on test, median / mean (a popularity bias shows as higher "
          "counts), and of the test targets: " + "; ".join(f"{n} {r.median().item():.0f} / {r.mean().item():.1f}" for n, r in recs.items()) + "\n")
    print("## By the target's training occurrences (colder first)\n")
    cold = {s: torch.tensor([_bucket(counts[t], COLD) for t in sp.eval_set(s)[1]]) for s in ("valid", "test")}
    print(table(names, ranks, cold, COLD, "target's training count") + "\n")
    item_bucket = torch.tensor([_bucket(c, COLD) for c in counts[1:]])  # (n_items,) padding row 0 left out
    print("## Items by training count: each model's mean scoring-vector norm (a popularity bias shows as norm rising with count)\n")
    print("| item's training count | items | " + " | ".join(names) + " |\n|" + "---|" * (2 + len(names)))
    with torch.no_grad():
        norms = {n: ck.model.eval().table()[1:].norm(dim=-1) for n, ck in zip(names, ckpts)}  # (n_items,) each
    for b, (lo, hi) in enumerate(COLD):
        rows = item_bucket == b
        if rows.any():
            print(f"| {_label(lo, hi)} | {rows.sum().item()} | " + " | ".join(f"{norms[n][rows].mean().item():.2f}" for n in names) + " |")
    print()
    max_len = min(ck.model.config.max_len for ck in ckpts)
    print(f"## By the history's length (capped at max_len {max_len}, what the model reads)\n")
    length = {s: torch.tensor([_bucket(min(len(h), max_len), LENGTH) for h in sp.eval_set(s)[0]]) for s in ("valid", "test")}
    print(table(names, ranks, length, LENGTH, "history length"))


if __name__ == "__main__":
    main()
