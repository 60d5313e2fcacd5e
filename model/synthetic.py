"""`synthetic`: a small dataset with a sequential pattern a model can learn, for tests and --quick benches
(`holorec train --data synthetic` or `synthetic:n_users=...,seed=...`)."""
from __future__ import annotations

from typing import Any

import numpy as np

from model.data import Dataset, DataError


def synthetic(n_users: int = 600, n_items: int = 300, n_attrs: int = 12, seed: int = 0, seq_len: tuple[int, int] = (8, 40)) -> Dataset:
    """Users drifting between attribute clusters, moving along Markov chains inside a cluster.

    Item i belongs to cluster i mod n_attrs (its attribute "c<k>"); each item has one favourite
    successor (p = 0.6) and two others (0.15 each) in its cluster, else a Zipf-popular item of the
    cluster. A user starts in a cluster drawn from their own preferences and moves to another
    with probability 0.1 per step. So the next item is predictable from the last one (a sequential
    model can learn it) while global popularity is a weak guess.
    """
    rng = np.random.default_rng(seed)
    clusters = [np.arange(c, n_items, n_attrs) for c in range(n_attrs)]  # 0-based item ids per cluster
    successors: dict[int, tuple[int, int, int]] = {}  # item -> (favourite, other, other)
    zipf: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # cluster -> (members, Zipf weights)
    for members in clusters:
        perm = rng.permutation(members)
        for j, i in enumerate(perm):
            others = rng.choice(members, size=2, replace=True)
            successors[int(i)] = (int(perm[(j + 1) % len(perm)]), *(int(o) for o in others))
        w = 1.0 / np.arange(1, len(members) + 1)
        zipf[len(zipf)] = (rng.permutation(members), w / w.sum())
    sequences: list[list[int]] = []
    for _ in range(n_users):
        prefs = rng.dirichlet(np.full(n_attrs, 0.3))
        length = int(rng.integers(seq_len[0], seq_len[1] + 1))
        c = int(rng.choice(n_attrs, p=prefs))
        members, w = zipf[c]
        cur = int(rng.choice(members, p=w))
        seq = [cur]
        while len(seq) < length:
            r = rng.random()
            if r < 0.1:  # drift to another interest
                c = int(rng.choice(n_attrs, p=prefs))
                members, w = zipf[c]
                cur = int(rng.choice(members, p=w))
            elif r < 0.1 + 0.9 * 0.6:
                cur = successors[cur][0]
            elif r < 0.1 + 0.9 * 0.9:
                cur = successors[cur][1 + int(rng.integers(0, 2))]
            else:
                members, w = zipf[cur % n_attrs]
                cur = int(rng.choice(members, p=w))
            seq.append(cur)
        sequences.append([i + 1 for i in seq])
    items = [f"i{i}" for i in range(n_items)]
    attributes = [f"c{c}" for c in range(n_attrs)]
    item_attrs = [[]] + [[i % n_attrs + 1] for i in range(n_items)]
    defaults = dict(n_users=600, n_items=300, n_attrs=12, seed=0)
    given = dict(n_users=n_users, n_items=n_items, n_attrs=n_attrs, seed=seed)
    source = "synthetic" if given == defaults and seq_len == (8, 40) else "synthetic:" + ",".join(f"{k}={v}" for k, v in given.items())
    if seq_len != (8, 40):
        source += f",min_len={seq_len[0]},max_len={seq_len[1]}"
    users = [f"u{u}" for u in range(n_users)]
    return Dataset("synthetic", users, sequences, items, attributes, item_attrs, kind="synthetic", source=source)


def synthetic_params(spec: str) -> dict[str, Any]:
    """'synthetic' or 'synthetic:n_users=200,n_items=100,seed=1' -> synthetic() keyword arguments."""
    params: dict[str, Any] = {}
    _, _, rest = spec.partition(":")
    lens = [8, 40]
    for part in filter(None, rest.split(",")):
        key, _, value = part.partition("=")
        if key in ("n_users", "n_items", "n_attrs", "seed") and value.isdigit():
            params[key] = int(value)
        elif key in ("min_len", "max_len") and value.isdigit():
            lens[key == "max_len"] = int(value)
        else:
            raise DataError(f"{spec}: bad synthetic parameter {part!r} (n_users, n_items, n_attrs, seed, min_len, max_len)")
    params["seq_len"] = (lens[0], lens[1])
    return params
