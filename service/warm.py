"""`holorec warm`: every user of a log gets the state their whole history leads to, before their first request.

Users go shortest history first, in batches of similar length holding about `tokens` items (little padding);
each batch is one parallel forward of the model (`forward_state`, not a step per event) and one pipelined
compare-and-set write (Engine.warm). A user who already has a record is skipped unless `overwrite`, so running
it twice changes nothing, and a run stopped by Ctrl-C is finished by running it again.

`rewarm` re-warms in bulk the records another model (or state codec) wrote, which otherwise wait for each
user's first touch after a new checkpoint is deployed.
"""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator

from tqdm import tqdm

from model.checkpoint import Checkpoint
from model.data import Dataset
from service.engine import Engine
from service.store import user_keys, user_of_key


def histories(ckpt: Checkpoint, ds: Dataset) -> tuple[list[str], list[list[int]], list[float]]:
    """Per user with at least one item the checkpoint knows: id, items as checkpoint indices (items it lacks
    dropped, as POST /events would not apply them), timestamp of the last item kept (nan if the log has none)."""
    to_ckpt = [0] + [ckpt.item_index.get(x, 0) for x in ds.items]  # dataset index -> checkpoint index, 0 = unknown
    users, seqs, last = [], [], []
    for u, (user, seq) in enumerate(zip(ds.users, ds.sequences)):
        kept = [j for j, i in enumerate(seq) if to_ckpt[i]]
        if kept:
            users.append(user)
            seqs.append([to_ckpt[seq[j]] for j in kept])
            last.append(ds.timestamps[u][kept[-1]] if ds.timestamps else math.nan)
    return users, seqs, last


def batches(lengths: list[int], tokens: int, max_users: int) -> Iterator[list[int]]:
    """Indices, shortest first, in batches whose rows padded to their longest hold at most `tokens` items."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and end - start < max_users and (end - start + 1) * lengths[order[end]] <= tokens:
            end += 1
        yield order[start:end]
        start = end


def warm(engine: Engine, ds: Dataset, *, overwrite: bool = False, tokens: int = 32768, max_users: int = 1024,
         progress: bool = True) -> dict:
    """Warm every user of `ds` (see the module docstring); -> counts and users/s."""
    t0 = time.perf_counter()
    users, seqs, last = histories(engine.ckpt, ds)
    written = 0
    with tqdm(total=len(users), unit=" users", desc="warm", disable=not progress, smoothing=0.05) as bar:
        for idx in batches([len(s) for s in seqs], tokens, max_users):
            written += engine.warm([users[i] for i in idx], [seqs[i] for i in idx], [last[i] for i in idx], overwrite)
            bar.update(len(idx))
    seconds = time.perf_counter() - t0
    return {"users_in_log": len(ds.users), "users_without_known_items": len(ds.users) - len(users),
            "written": written, "kept_existing": len(users) - written, "seconds": round(seconds, 2),
            "users_per_s": round(len(users) / max(seconds, 1e-9), 1)}


def rewarm(engine: Engine, *, batch: int = 1000, progress: bool = True) -> dict:
    """Re-warm every stored record of this namespace that another model or codec wrote; -> counts."""
    t0 = time.perf_counter()
    seen = rewritten = 0
    keys = engine.store.scan(user_keys(engine.s.namespace))  # SCAN may repeat a key: re-warming is idempotent
    with tqdm(unit=" users", desc="rewarm", disable=not progress) as bar:
        while chunk := list(itertools.islice(keys, batch)):
            rewritten += engine.rewarm([user_of_key(engine.s.namespace, k) for k in chunk])
            seen += len(chunk)
            bar.update(len(chunk))
    return {"records": seen, "rewarmed": rewritten, "seconds": round(time.perf_counter() - t0, 2)}
