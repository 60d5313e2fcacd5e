"""Recommendations: users scored by their stored vector against the item table (exact, or through the IVF index),
filtered by the query's exclusions, seen items and attribute; users without state get the popular items."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from model.native import library
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
            table = self.model.scoring_rows(self.model.item_table()).detach().clone()  # (v, d)
            self.biased = self.model.config.item_bias  # scored as [h, 1] . [e_i, b_i] = h . e_i + b_i, as model.score does
            table = torch.cat([table, self.model.item_bias.detach()[:, None]], 1) if self.biased else table  # (v, d or d + 1)
        # kept transposed: h @ table_t is one contiguous product (h @ table.T took longer for one user)
        self.table_t = table.T.contiguous()  # (d or d + 1, v)
        self.index = IVFIndex(table, self.s.ann_lists, self.s.ann_probe) if self.s.ann_lists else None
        # Exact top-k in C where model/native.c was built (_native_top): in the service a recommendation spent more in
        # the torch and numpy calls around the product than in the product itself
        same_v = self.seen is None or self.seen.byte.shape[1] == self.table_t.shape[1]  # the filter's items are the table's
        self.native = library() if self.s.native and self.index is None and same_v else None
        self.table_np = self.table_t.numpy()  # (d or d + 1, v), the same memory
        # the addresses holorec_top reads on every call, taken once (each .ctypes.data costs a microsecond); the arrays
        # live as long as the scorer
        self.table_at = self.table_np.ctypes.data
        self.filter_at = (self.seen.byte.ctypes.data, self.seen.mask.ctypes.data, len(self.seen.byte)) if self.seen is not None else (None, None, 0)
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
            h = self._queries([loaded[i].record.vector for i in with_state])  # (n, c)
            # (n, v): one product for the batch (in torch: numpy's BLAS keeps threads HOLOREC_THREADS does not reach,
            # README); for one user in C, in the same call as its top-k
            exact = None
            if self.index is None and (self.native is None or len(h) > 1):
                with torch.inference_mode():
                    exact = (torch.from_numpy(h) @ self.table_t).numpy()
            for row, i in enumerate(with_state):
                q = queries[i]
                if self.native is not None:
                    idx, top = self._native_top(h[row], None if exact is None else exact[row], q, loaded[i].record)
                else:
                    with torch.inference_mode():
                        if exact is not None:
                            cand, scores = None, exact[row]
                        elif q.attribute is None:
                            cand, scores = (x.numpy() for x in self.index.search(torch.from_numpy(h[row])))  # type: ignore[union-attr]
                        else:  # an attribute filter could leave the probed clusters short of k items: score all
                            cand, scores = None, (torch.from_numpy(h[row]) @ self.table_t).numpy()
                        idx, top = self._top(scores, q, loaded[i].record, cand)
                out[i] = RecResult([(self.ckpt.items[j - 1], v) for j, v in zip(idx.tolist(), top.tolist())], "state")
            SCORE_LATENCY.observe(time.perf_counter() - t0)
        for source in ("state", "popular"):
            if n := sum(r.source == source for r in out):
                labelled(RECOMMENDATIONS, source).inc(n)
        return out

    def _queries(self, vectors: list[np.ndarray]) -> np.ndarray:
        """(n, c) float32: the stored user vectors (d,) as the item table meets them (model.query: unit length with
        config.cosine; then a 1 for the item bias). In numpy where torch adds nothing: one user's top-k in C had spent
        more in torch's calls around it than in them."""
        h = vectors[0][None] if len(vectors) == 1 else np.stack(vectors)  # (n, d)
        if self.model.config.cosine:
            with torch.inference_mode():
                h = self.model.query(torch.from_numpy(h)).numpy()
        return np.concatenate([h, np.ones((len(h), 1), np.float32)], 1) if self.biased else h

    def excluded_ids(self, q: RecQuery, r: rec.Record | None, seen: bool = True) -> np.ndarray:
        """(n,) item indices this query must not get: padding, the explicit exclusions, every item the user has
        seen (the seen filter: all of them, and a few unseen ones it mistakes for seen) or, with the filter off,
        the record's window. `seen=False`: all but the filter's, which _top asks about its best candidates only."""
        ids = np.array([0] + [self.ckpt.item_index[x] for x in q.exclude if x in self.ckpt.item_index], dtype=np.int32)
        if q.exclude_seen and r is not None:
            ids = np.concatenate([ids, r.window])  # padding slots are 0, already excluded
            if seen and self._filters(q, r):
                ids = np.concatenate([ids, np.flatnonzero(self.seen.contains(r.seen_filter))])  # type: ignore[union-attr]
        return ids

    def _filters(self, q: RecQuery, r: rec.Record | None) -> bool:
        """Whether the seen filter applies to this query and record (a record of another filter size has none)."""
        return q.exclude_seen and r is not None and self.seen is not None and len(r.seen_filter) == self.s.seen_filter_bytes

    def _top(self, scores: np.ndarray, q: RecQuery, r: rec.Record, cand: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The best q.k items left once the query's exclusions are applied: (k,) item indices, (k,) scores, best
        first; fewer where fewer are left. `scores` (v,) of every item, or (m,) of the index's candidates `cand`;
        changed in place. The seen filter is asked about the best 2k + 32 only, and about every item only when
        it removes so many of those that fewer than k are left: a query costs its exclusions and a top-k, not a
        filter lookup per catalogue item (the same answer: what is not in the top 2k + 32 cannot outrank it)."""
        banned = self.excluded_ids(q, r, seen=False)
        if cand is None:
            scores[banned] = -math.inf
        else:
            scores[np.isin(cand, banned)] = -math.inf
        if q.attribute is not None:
            keep = self.attribute_mask(q.attribute)
            if keep is None:
                scores.fill(-math.inf)
            else:
                keep_np = keep.numpy()
                scores[~(keep_np if cand is None else keep_np[cand])] = -math.inf
        k, filtered = min(q.k, len(scores)), self._filters(q, r)
        m = min(2 * k + 32, len(scores)) if filtered else k
        while True:
            top = torch.topk(torch.from_numpy(scores), m)  # torch's top-k: numpy's argpartition partly sorts the whole array
            pos, val = top.indices.numpy(), top.values.numpy()
            items = pos if cand is None else cand[pos]
            if filtered:
                unseen = ~self.seen.contains(r.seen_filter, items)  # type: ignore[union-attr]
                if unseen.sum() < k and m < len(scores):
                    m = len(scores)  # the filter took too many of the best: ask it about every item
                    continue
                items, val = items[unseen][:k], val[unseen][:k]
            live = val > -math.inf
            return items[live], val[live]

    def _native_top(self, h: np.ndarray, scores: np.ndarray | None, q: RecQuery, r: rec.Record) -> tuple[np.ndarray, np.ndarray]:
        """_top over every item in one call of model/native.c's holorec_top: the product (unless `scores` (v,) holds it;
        changed in place), the exclusions, the attribute and the seen filter (asked only about items good enough to enter
        the best k). The same items as _top, best first."""
        keep = None
        if q.attribute is not None:
            mask = self.attribute_mask(q.attribute)
            if mask is None:
                return np.empty(0, np.int64), np.empty(0, np.float32)
            keep = mask.numpy()
        banned = self.excluded_ids(q, r, seen=False)  # (m,) int32
        bits = r.seen_filter if self._filters(q, r) else None
        c, v = self.table_np.shape
        k = min(q.k, v)
        idx, val = np.empty(k, np.int64), np.empty(k, np.float32)
        table, scores = (self.table_at, np.empty(v, np.float32)) if scores is None else (None, scores)
        f_byte, f_mask, hashes = self.filter_at if bits is not None else (None, None, 0)
        n = self.native.holorec_top(  # type: ignore[union-attr]
            table, c, v, np.ascontiguousarray(h, np.float32).ctypes.data, np.ascontiguousarray(banned, np.int32).ctypes.data,
            len(banned), None if keep is None else keep.ctypes.data, None if bits is None else np.ascontiguousarray(bits).ctypes.data,
            f_byte, f_mask, hashes, k, scores.ctypes.data, idx.ctypes.data, val.ctypes.data)
        return idx[:n], val[:n]

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
