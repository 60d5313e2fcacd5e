"""Full-ranking evaluation: every item is a candidate, no sampled negatives.

Rank of the target = 1 + the number of other candidates scoring >= the target's score, so a tie
never favours the target (a model that scores everything equal ranks it last, not first).
The padding item 0 is never a candidate. By default the user's history items stay candidates
(SASRec's protocol); with exclude_seen they are removed, except the target itself.
    HR@k = [rank <= k]    NDCG@k = [rank <= k] / log2(rank + 1)    MRR = 1 / rank
all averaged over users. Shape letters: b batch, l max_len, v n_items + 1.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from model.split import left_pad
from model.seen import SeenFilter
from model.protocol import SeqRecModel

KS = (5, 10, 20)


def ranks(scores: Tensor, targets: Tensor) -> Tensor:  # (b, v), (b,) -> (b,) 1-based, ties against the target
    scores = scores.clone()
    scores[:, 0] = float("-inf")  # padding is never a candidate
    t = scores.gather(1, targets[:, None])  # (b, 1)
    r = (scores >= t).sum(1)  # counts the target itself once: rank = 1 + others >= target
    return torch.where(torch.isnan(t[:, 0]), scores.shape[1], r)  # a NaN target score ranks last


def metrics_from_ranks(r: Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    r = r.double()
    out: dict[str, float] = {}
    for k in ks:
        hit = r <= k
        out[f"HR@{k}"] = hit.double().mean().item()
        out[f"NDCG@{k}"] = torch.where(hit, 1.0 / torch.log2(r + 1), torch.zeros_like(r)).mean().item()
    out["MRR"] = (1.0 / r).mean().item()
    return out


def _mask_seen(scores: Tensor, histories: list[list[int]], targets: Tensor, seen_filter: SeenFilter | None = None) -> None:
    """(b, v) in place: history items to -inf (the target kept). With a seen filter, the items the service's filter
    (model/seen.py) reports for that history: the history and the filter's false positives, as served."""
    keep = scores.gather(1, targets[:, None])  # (b, 1)
    for b, h in enumerate(histories):
        if seen_filter is None:
            scores[b, torch.tensor(h, dtype=torch.long)] = float("-inf")
        else:
            bits = seen_filter.empty()
            seen_filter.add(bits, h)
            scores[b, torch.from_numpy(seen_filter.contains(bits))] = float("-inf")
    scores.scatter_(1, targets[:, None], keep)  # the target stays a candidate


def evaluate(model: SeqRecModel, histories: list[list[int]], targets: list[int], *, ks: tuple[int, ...] = KS, **kw: Any) -> dict[str, float]:
    """HR@k, NDCG@k for k in ks, and MRR; the model sees each history's last max_len items, or with
    full_history (recurrent models only) the whole history, as the service's stored state does (see user_ranks)."""
    return metrics_from_ranks(user_ranks(model, histories, targets, **kw), ks)


@torch.no_grad()
def user_ranks(
    model: SeqRecModel,
    histories: list[list[int]],
    targets: list[int],
    *,
    exclude_seen: bool = False,
    seen_filter: SeenFilter | None = None,
    full_history: bool = False,
    batch_size: int = 256,
    device: str = "cpu",
) -> Tensor:  # -> (users,) each target's 1-based rank, in the order given
    """Per-user ranks, for metrics over any subset of users (bench/buckets.py)."""
    if len(histories) != len(targets) or not targets:
        raise ValueError(f"need one target per history and at least one user, got {len(histories)} and {len(targets)}")
    was_training = model.training
    model.eval()
    L = max(map(len, histories)) if full_history else model.config.max_len
    # users in order of history length, each batch padded only to its longest: left padding changes no
    # output (tests/test_model_core.py), and the metrics are means, so the order does not matter
    order = sorted(range(len(targets)), key=lambda u: min(len(histories[u]), L))
    all_ranks = []
    for s in range(0, len(order), batch_size):
        users = order[s : s + batch_size]
        hist, tgt = [histories[u] for u in users], torch.tensor([targets[u] for u in users], dtype=torch.long)
        x = left_pad(hist, max(1, min(L, max(len(h) for h in hist))))  # (b, width <= L)
        scores = model.score(model.user_vector(x.to(device))).float()  # (b, v), on the model's device
        if exclude_seen:
            scores = scores.cpu()
            _mask_seen(scores, hist, tgt, seen_filter)
        all_ranks.append(ranks(scores, tgt.to(scores.device)).cpu())  # ranked where scored: a GPU copies back b ranks, not b x v scores
    model.train(was_training)
    out = torch.empty(len(order), dtype=torch.long)
    out[torch.tensor(order)] = torch.cat(all_ranks)  # back to the order given
    return out


@torch.no_grad()
def evaluate_served(model: SeqRecModel, histories: list[list[int]], targets: list[int], codec: str | None, *,
                    ks: tuple[int, ...] = KS, batch_size: int = 1024) -> dict[str, float]:
    """HR@k, NDCG@k, MRR as the service serves them: each user's whole history stepped one event at a time,
    the state packed with `codec` and unpacked between two events (what storing it does; None: kept as is)."""
    from model.state import pack, unpack  # a model-only import: evaluation does not need the codecs otherwise

    was_training = model.training
    model.eval()
    template = model.init_state(1)
    order = sorted(range(len(targets)), key=lambda u: len(histories[u]))  # similar lengths step together
    all_ranks = []
    for s in range(0, len(order), batch_size):
        users = order[s : s + batch_size]
        x = left_pad([histories[u] for u in users], max(1, max(len(histories[u]) for u in users)))  # (b, l)
        state, h = model.init_state(len(users)), torch.zeros(len(users), model.config.d_model)
        for t in range(x.shape[1]):
            rows = (x[:, t] > 0).nonzero()[:, 0]  # (r,) users whose history has begun
            if not len(rows):
                continue
            h[rows], new = model.step(x[rows, t], {k: v[rows] for k, v in state.items()})
            if codec is not None:
                new = unpack(pack(new, codec), template, codec)
            for k in state:
                state[k][rows] = new[k]
        all_ranks.append(ranks(model.score(h), torch.tensor([targets[u] for u in users], dtype=torch.long)))
    model.train(was_training)
    return metrics_from_ranks(torch.cat(all_ranks), ks)


def evaluate_popularity(counts: list[int], histories: list[list[int]], targets: list[int], *, ks: tuple[int, ...] = KS, exclude_seen: bool = False) -> dict[str, float]:
    """The popularity baseline: every user gets items ranked by training count (same tie rule)."""
    base = torch.tensor(counts, dtype=torch.float)  # (v,)
    all_ranks = []
    for s in range(0, len(targets), 1024):
        hist, tgt = histories[s : s + 1024], torch.tensor(targets[s : s + 1024], dtype=torch.long)
        scores = base.expand(len(hist), -1).clone()  # (b, v)
        if exclude_seen:
            _mask_seen(scores, hist, tgt)
        all_ranks.append(ranks(scores, tgt))
    return metrics_from_ranks(torch.cat(all_ranks), ks)


def format_metrics(m: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in m.items() if not math.isnan(v))
