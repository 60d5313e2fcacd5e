"""Writing user state: events applied to records (POST /events, `holorec consume`) and users warmed from a log
(`holorec warm`).

Per batch: one pipelined read of all the batch's records, one batched model `step` per position (or, for a
whole history from the empty state, one parallel forward), one pipelined compare-and-set write.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from model.fast_step import PACKED_BATCH, packed_step, serving_step
from model.state import pack, unpack
from service import record as rec
from service.metrics import CAS_CONFLICTS, EVENTS, STEP_LATENCY, labelled
from service.records import Records, bumped


def epoch_seconds(ts: float) -> float:
    """A timestamp sent in seconds or milliseconds since the epoch, in seconds: values from 1e11 up are
    milliseconds (as seconds, 1e11 is the year 5138; as milliseconds, March 1973)."""
    return ts / 1000 if ts >= 1e11 else float(ts)


@dataclass
class Event:
    user_id: str
    item_id: str
    event_id: str | None = None
    timestamp: float | None = None


@dataclass
class EventsResult:
    applied: int = 0
    duplicate: int = 0
    unknown_items: list[str] = field(default_factory=list)


class Conflict(RuntimeError):
    """A user's record kept changing under us for every retry."""


class Applier:
    """Advances users' records: events, per user atomically, or a whole history at once."""

    def __init__(self, records: Records) -> None:
        self.records, self.ckpt, self.store, self.s = records, records.ckpt, records.store, records.s
        cache = self.s.graph_cache_dir
        self.step = serving_step(records.model, cache)  # ONNX Runtime or a frozen trace where exact (model/fast_step.py), else model.step
        self.packed = packed_step(records.model, self.s.state_codec, cache, self.s.native)  # one event per user: unpack, step and pack in one call

    # --- events -----------------------------------------------------------------------
    def apply(self, requests: list[list[Event]]) -> list[EventsResult]:
        """Apply each request's events in order; per user atomically (CAS on the revision, retried)."""
        self.records.save_vocab()
        results = [EventsResult() for _ in requests]
        by_user: dict[str, list[tuple[int, Event, int]]] = {}
        for r, events in enumerate(requests):
            for e in events:
                item = self.ckpt.item_index.get(e.item_id)
                if item is None:
                    results[r].unknown_items.append(e.item_id)
                    labelled(EVENTS, "unknown_item").inc()
                else:
                    by_user.setdefault(e.user_id, []).append((r, e, item))
        pending = list(by_user)
        for attempt in range(self.s.cas_retries):  # no sleep between rounds: this thread is the one the next batch waits for,
            if not pending:                            # and every round some writer of each contended user wins, so it ends
                break
            pending = self._apply_once(pending, by_user, results, first=attempt == 0)
            if pending:  # a metric update is a locked write to a shared file with several workers: none for nothing
                CAS_CONFLICTS.inc(len(pending))
        if pending:
            raise Conflict(f"{len(pending)} users still conflicting after {self.s.cas_retries} attempts")
        return results

    def _apply_once(self, users: list[str], by_user: dict[str, list[tuple[int, Event, int]]], results: list[EventsResult],
                    first: bool) -> list[str]:
        """One round: read, step, compare-and-set; -> the users whose record changed meanwhile. The first round reads
        through the client-side cache, which keeps what this process last wrote; a retry reads Redis itself."""
        loaded = self.records.read(users, cached=first, ours=first)
        outcomes: list[list[tuple[int, bool]]] = []  # per user: (request, applied?) per event
        seqs: list[list[int]] = []
        for u, r in zip(users, (x.record for x in loaded)):
            out, seq = [], []
            for req, e, item in by_user[u]:
                h = rec.event_hash(e.event_id) if e.event_id is not None else None
                if h is not None and r.seen(h):
                    out.append((req, False))
                    continue
                if h is not None:
                    r.remember(h)
                r.push(item)
                self.records.mark_seen(r, [item])
                r.applied += 1
                if e.timestamp is not None:
                    r.last_event_ts = epoch_seconds(e.timestamp)
                seq.append(item)
                out.append((req, True))
            outcomes.append(out)
            seqs.append(seq)
        # A user whose events were all duplicates keeps the record as read: nothing stepped, nothing written (a stream's
        # redelivery costs a read, not a compare-and-set); the verdict stands, as the ring held those ids when read.
        todo = [i for i, seq in enumerate(seqs) if seq or loaded[i].dirty]
        oks = [True] * len(users)
        if todo:
            blobs, vec = self._advance([loaded[i].record for i in todo], [seqs[i] for i in todo])
            now = time.time()
            writes = []
            for j, i in enumerate(todo):
                r, expected = loaded[i].record, loaded[i].revision
                r.state, r.vector, r.updated_at, r.revision = blobs[j], vec[j], now, rec.next_revision(expected)
                writes.append((self.records.key(users[i]), expected, self.records.encode(r)))
            for i, ok in zip(todo, self.store.cas_many(writes, self.s.state_ttl_s, cached=True, users_key=self.records.users_key)):
                oks[i] = ok
        failed: list[str] = []
        n_applied = n_duplicate = 0
        for i, ok in enumerate(oks):
            if not ok:
                failed.append(users[i])
                continue
            for req, applied in outcomes[i]:
                if applied:
                    results[req].applied += 1
                    n_applied += 1
                else:
                    results[req].duplicate += 1
                    n_duplicate += 1
        for outcome, n in (("applied", n_applied), ("duplicate", n_duplicate)):
            if n:
                labelled(EVENTS, outcome).inc(n)
        return failed

    @torch.inference_mode()
    def _advance(self, records: list[rec.Record], seqs: list[list[int]]) -> tuple[list[bytes], np.ndarray]:
        """Step every user through their own item list -> each one's packed state and (u, d) vectors. One event each
        (the usual request): one call of the packed step. Else unpack, one batched step per position, pack."""
        if self.packed is not None and len(seqs) <= PACKED_BATCH and all(len(s) == 1 for s in seqs):
            t0 = time.perf_counter()
            vec, blobs = self.packed(np.array([s[0] for s in seqs], np.int64), [r.state for r in records])
            STEP_LATENCY.observe(time.perf_counter() - t0)
            return blobs, vec
        state = unpack([r.state for r in records], self.records.template, self.s.state_codec)
        h, state = self._steps(state, torch.from_numpy(np.stack([r.vector for r in records])), seqs)
        return pack(state, self.s.state_codec), h.numpy()

    def _steps(self, state: dict[str, Tensor], vec: Tensor, seqs: list[list[int]]) -> tuple[Tensor, dict[str, Tensor]]:
        """One batched step per position; a user whose list has ended keeps their state. vec: (u, d)."""
        n = len(seqs)
        for t in range(max((len(s) for s in seqs), default=0)):
            rows = [u for u, s in enumerate(seqs) if len(s) > t]
            items = torch.tensor([seqs[u][t] for u in rows])
            t0 = time.perf_counter()
            if len(rows) == n:  # everyone steps (one event per user, or equal counts): no gather/scatter
                vec, state = self.step(items, state)
            else:
                idx = torch.tensor(rows)
                h, new = self.step(items, {k: v[idx] for k, v in state.items()})
                for k in state:
                    state[k][idx] = new[k]
                vec[idx] = h
            STEP_LATENCY.observe(time.perf_counter() - t0)
        return vec, state

    # --- warming from a log ---------------------------------------------------------------
    def warm(self, user_ids: list[str], histories: list[list[int]], last_ts: list[float], overwrite: bool = False) -> int:
        """Write each user's record as if their whole history had been posted as events without ids (count, window,
        last timestamp), the state from one parallel forward, not a step per event. A user who has a record keeps
        it unless `overwrite`; an overwrite that loses a race re-reads and retries. -> records written."""
        self.records.save_vocab()
        key = self.records.key
        blobs = self.store.get_many([key(u) for u in user_ids])
        todo = [i for i, b in enumerate(blobs) if overwrite or b is None]
        if not todo:
            return 0
        state, vec = self.records.states([histories[i] for i in todo])
        packed = pack(state, self.s.state_codec)
        records: dict[int, rec.Record] = {}
        for j, i in enumerate(todo):
            r = records[i] = self.records.fresh()
            for item in histories[i][-self.records.slots :]:
                r.push(item)
            self.records.mark_seen(r, histories[i])
            r.applied, r.last_event_ts, r.state, r.vector = len(histories[i]), epoch_seconds(last_ts[i]), packed[j], vec[j].numpy()
        expected = {i: 0 if blobs[i] is None else rec.stored_revision(blobs[i]) for i in todo}  # type: ignore[arg-type]
        written = 0
        for _ in range(self.s.cas_retries if overwrite else 1):
            writes = [(key(user_ids[i]), expected[i], self.records.encode(bumped(records[i], expected[i]))) for i in todo]
            oks = self.store.cas_many(writes, self.s.state_ttl_s, users_key=self.records.users_key)
            written += sum(oks)
            todo = [i for i, ok in zip(todo, oks) if not ok]  # without overwrite: created meanwhile, so kept
            if not todo:
                break
            for i, blob in zip(todo, self.store.get_many([key(user_ids[i]) for i in todo])):
                expected[i] = 0 if blob is None else rec.stored_revision(blob)
            CAS_CONFLICTS.inc(len(todo))
        return written
