"""Recommendations: users scored by their stored vector against the item table (exact, or through the IVF index),
filtered by the query's exclusions, seen items and attribute; users without state get the popular items."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from service import record as rec
from service.index import IVFIndex
from service.metrics import RECOMMENDATIONS, SCORE_LATENCY, labelled
from service.records import Records


@dataclass
class RecQuery:
    user_id: str
    k: int = 10
    exclude_seen: bool = True
    exclude: list[str] = field(default_factory=list)
    attribute: str | None = None


@dataclass
class RecResult:
    items: list[tuple[str, float]]
    source: str  # state | popular


class Scorer:
    """Top-k items per user, from the records `records` reads (and writes back where re-warmed on reading)."""

    def __init__(self, records: Records) -> None:
        self.records, self.ckpt, self.model, self.s, self.seen = records, records.ckpt, records.model, records.s, records.seen
        with torch.inference_mode():
            table = self.model.item_table().detach().clone()  # (v, d)
            self.biased = self.model.config.item_bias  # scored as [h, 1] . [e_i, b_i] = h . e_i + b_i, as model.score does
            self.table = torch.cat([table, self.model.item_bias.detach()[:, None]], 1) if self.biased else table  # (v, d or d + 1)
        self.index = IVFIndex(self.table, self.s.ann_lists, self.s.ann_probe) if self.s.ann_lists else None
        self.popular = [i for i in self.ckpt.popular if 0 < i <= len(self.ckpt.items)]
        self.attr_masks: dict[int, Tensor] = {}

    def attribute_mask(self, name: str) -> Tensor | None:
        """(v,) True for items carrying attribute `name`; None if the checkpoint has no such attribute."""
        j = self.ckpt.attribute_index.get(name)
        if j is None:
            return None
        if j not in self.attr_masks:
            self.attr_masks[j] = (self.model.item_attrs == j).any(1)
        return self.attr_masks[j]

    def recommend(self, queries: list[RecQuery]) -> list[RecResult]:
        loaded = self.records.read([q.user_id for q in queries], cached=True)
        self.records.write_back([q.user_id for q in queries], loaded)
        with_state = [i for i, x in enumerate(loaded) if x.record.applied > 0]
        out: list[RecResult] = [self._popular(q) if x.record.applied <= 0 else None for q, x in zip(queries, loaded)]  # type: ignore[misc]
        if with_state:
            t0 = time.perf_counter()
            with torch.inference_mode():
                h = torch.from_numpy(np.stack([loaded[i].record.vector for i in with_state]))  # (n, d)
                if self.biased:
                    h = torch.cat([h, torch.ones(len(h), 1)], 1)  # (n, d + 1)
                exact = h @ self.table.T if self.index is None else None  # (n, v): one product for the batch
                for row, i in enumerate(with_state):
                    q = queries[i]
                    if exact is not None:
                        cand, scores = None, exact[row]
                    elif q.attribute is None:
                        cand, scores = self.index.search(h[row])  # type: ignore[union-attr]
                    else:  # an attribute filter could leave the probed clusters short of k items: score all
                        cand, scores = None, self.table @ h[row]
                    self._exclude(scores, q, loaded[i].record, cand)
                    top = torch.topk(scores, min(q.k, len(scores)))
                    idx = top.indices if cand is None else cand[top.indices]
                    out[i] = RecResult([(self.ckpt.items[j - 1], v) for j, v in zip(idx.tolist(), top.values.tolist()) if v > -math.inf], "state")
            SCORE_LATENCY.observe(time.perf_counter() - t0)
        for source in ("state", "popular"):
            if n := sum(r.source == source for r in out):
                labelled(RECOMMENDATIONS, source).inc(n)
        return out

    def excluded_ids(self, q: RecQuery, r: rec.Record | None, cand: np.ndarray | None = None) -> np.ndarray:
        """(n,) item indices this query must not get: padding, the explicit exclusions, every item the user has
        seen (the seen filter: all of them, and a few unseen ones it mistakes for seen) or, with the filter off,
        the record's window. With `cand` (the index's candidates) the filter is asked about those items only."""
        ids = np.array([0] + [self.ckpt.item_index[x] for x in q.exclude if x in self.ckpt.item_index], dtype=np.int64)
        if q.exclude_seen and r is not None:
            ids = np.concatenate([ids, r.window])  # padding slots are 0, already excluded
            if self.seen is not None and len(r.seen_filter) == self.s.seen_filter_bytes:
                seen = self.seen.contains(r.seen_filter, cand)  # (v,) or (m,) bool
                ids = np.concatenate([ids, np.flatnonzero(seen) if cand is None else cand[seen]])
        return ids

    def _exclude(self, scores: Tensor, q: RecQuery, r: rec.Record | None, cand: Tensor | None = None) -> None:
        """Set to -inf, in place, the scores of items this query must not get: scores (v,) of every item,
        or (m,) of the items `cand` (the index's candidates). By index, so a query costs its exclusions,
        not the catalogue size; only an attribute filter touches every item."""
        banned = torch.from_numpy(self.excluded_ids(q, r, None if cand is None else cand.numpy()))
        if cand is None:
            scores[banned] = -math.inf
        else:
            scores.masked_fill_(torch.isin(cand, banned), -math.inf)
        if q.attribute is not None:
            keep = self.attribute_mask(q.attribute)
            if keep is None:
                scores.fill_(-math.inf)
            else:
                scores.masked_fill_(~(keep if cand is None else keep[cand]), -math.inf)

    def _popular(self, q: RecQuery) -> RecResult:
        """The fallback for users without state: most interacted items in training, filtered alike."""
        banned = set(self.excluded_ids(q, None).tolist())
        keep = self.attribute_mask(q.attribute) if q.attribute is not None else None
        n, items = len(self.popular), []
        for rank, i in enumerate(self.popular):
            if i in banned or (q.attribute is not None and (keep is None or not bool(keep[i]))):
                continue
            items.append((self.ckpt.items[i - 1], 1.0 - rank / n))
            if len(items) == q.k:
                break
        return RecResult(items, "popular")
