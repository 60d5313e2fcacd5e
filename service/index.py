"""Approximate top-k for large catalogues: an inverted-file (IVF) index over the item table.

Exact scoring reads the whole (v, d) table for every request: at 1M items x 64 dims that is 256 MB
and tens of milliseconds on one core. IVF clusters the items once (k-means), scores a query against
the cluster centroids, and scores exactly only the items of the `probe` best clusters. Off by
default (HOLOREC_ANN_LISTS=0); `holorec bench serve` reports its latency and recall@10 against exact.
"""
from __future__ import annotations

import torch
from torch import Tensor


class IVFIndex:
    def __init__(self, table: Tensor, lists: int, probe: int, *, iters: int = 8, sample: int = 65_536, seed: int = 0) -> None:
        """table: (v, d) item table, row 0 the padding item (never listed)."""
        items = table[1:].float()  # (n, d)
        lists = max(1, min(lists, len(items)))
        g = torch.Generator().manual_seed(seed)
        train = items[torch.randperm(len(items), generator=g)[: max(sample, lists)]]  # k-means on a sample
        cent = train[torch.randperm(len(train), generator=g)[:lists]].clone()  # (lists, d)
        for _ in range(iters):
            a = _nearest(train, cent)
            counts = torch.bincount(a, minlength=lists)[:, None]
            sums = torch.zeros_like(cent).index_add_(0, a, train)
            cent = torch.where(counts > 0, sums / counts.clamp(min=1), cent)  # an empty cluster keeps its centroid
        a = _nearest(items, cent)  # (n,)
        order = torch.argsort(a, stable=True)
        self.ids = order + 1  # (n,) item indices, cluster by cluster
        self.rows = items[order].contiguous()  # (n, d) the table in the same order: a cluster is one slice
        self.offsets = [0, *torch.bincount(a, minlength=lists).cumsum(0).tolist()]
        self.centroids, self.probe = cent, max(1, min(probe, lists))

    def search(self, h: Tensor) -> tuple[Tensor, Tensor]:  # (d,) -> item indices (m,), their scores (m,)
        """The items of the `probe` clusters whose centroids score highest for h, scored exactly."""
        best = torch.topk(self.centroids @ h, self.probe).indices.tolist()
        spans = [(self.offsets[c], self.offsets[c + 1]) for c in best]
        return torch.cat([self.ids[a:b] for a, b in spans]), torch.cat([self.rows[a:b] @ h for a, b in spans])


def _nearest(x: Tensor, cent: Tensor, chunk: int = 65_536) -> Tensor:  # (n, d), (c, d) -> (n,) nearest centroid (L2)
    c2 = (cent * cent).sum(1)  # (c,)
    return torch.cat([(c2 - 2 * xc @ cent.T).argmin(1) for xc in x.split(chunk)])
