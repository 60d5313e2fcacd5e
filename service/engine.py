"""What the service does, without HTTP: apply events to user records, score users, warm and re-warm records.

Everything here runs on the batcher's threads (or `holorec warm` / `holorec consume`), a batch at a
time: one pipelined read of all the batch's records, one batched model `step` per position (or, for a
whole history from the empty state, one parallel forward), one pipelined compare-and-set write.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from model.checkpoint import Checkpoint
from model.fast_step import serving_step
from model.split import left_pad
from model.seen import SeenFilter
from model.state import pack, unpack
from service import record as rec
from service.index import IVFIndex
from service.metrics import CAS_CONFLICTS, ERRORS, EVENTS, RECOMMENDATIONS, SCORE_LATENCY, STATE_REBUILDS, STEP_LATENCY, USERS_SEEN
from service.settings import Settings
from service.store import StateStore, user_key

log = logging.getLogger("holorec")


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


@dataclass
class Loaded:
    """A user's record as read, ready for this model, with the revision to compare-and-set against."""
    record: rec.Record
    revision: int  # 0: no record stored; -1: a stored value too short to hold one (corrupt)
    dirty: bool  # re-warmed, re-packed, resized or rebuilt on reading: to be written back even without an event


class Conflict(RuntimeError):
    """A user's record kept changing under us for every retry."""


class Engine:
    def __init__(self, ckpt: Checkpoint, store: StateStore, settings: Settings) -> None:
        self.ckpt, self.store, self.s = ckpt, store, settings
        self.model = ckpt.model.eval()
        self.step = serving_step(self.model)  # a frozen trace where it is exact (model/fast_step.py), else model.step
        self.version = ckpt.version
        self.d = self.model.config.d_model
        self.slots = settings.history_slots  # the record's window of recent item indices
        self.id_bytes = 2 if len(ckpt.items) < 2**16 else 4  # a window index's bytes in the record
        self.template = self.model.init_state(1)
        self.empty_state = pack(self.template, settings.state_codec)[0]
        with torch.inference_mode():
            self.table = self.model.item_table().detach().clone()  # (v, d)
        self.index = IVFIndex(self.table, settings.ann_lists, settings.ann_probe) if settings.ann_lists else None
        self.popular = [i for i in ckpt.popular if 0 < i <= len(ckpt.items)]
        self.seen = SeenFilter(ckpt.items, settings.seen_filter_bytes) if settings.seen_filter_bytes else None
        self.attr_masks: dict[int, Tensor] = {}
        self.vocabs: dict[str, list[str]] = {self.version: ckpt.items}
        self.vocab_checked = -math.inf  # when this model's vocabulary was last seen in the store

    def _save_vocab(self) -> None:
        """Records keep item indices; a later model re-warms them through this id list. Checked again every
        minute: an LRU Redis evicts this rarely read key first, and the next model needs it."""
        if time.monotonic() - self.vocab_checked > 60:
            if not self.store.exists(self._vocab_key(self.version)):
                self.store.set(self._vocab_key(self.version), json.dumps(self.ckpt.items).encode())
            self.vocab_checked = time.monotonic()

    # --- keys and records -----------------------------------------------------------
    def key(self, user_id: str) -> str:
        return user_key(self.s.namespace, user_id)

    def _vocab_key(self, version: str) -> str:
        return f"holorec:{self.s.namespace}:vocab:{version}"

    def _fresh(self) -> rec.Record:
        return rec.empty(self.version, self.s.state_codec, self.slots, self.s.dedup_slots, self.s.seen_filter_bytes, self.d, self.empty_state)

    def _encode(self, r: rec.Record) -> bytes:
        return rec.encode(r, self.id_bytes)

    def _mark_seen(self, r: rec.Record, items: list[int] | np.ndarray) -> None:
        if self.seen is not None:
            self.seen.add(r.seen_filter, items)

    def _read(self, user_ids: list[str], cached: bool = False) -> list[Loaded]:
        """Each user's record ready for this model; `cached`: through the client-side cache (recommendations)."""
        blobs = self.store.get_many([self.key(u) for u in user_ids], cached)
        out: list[Loaded] = []
        stale: list[int] = []
        for u, blob in zip(user_ids, blobs):
            if blob is None:
                out.append(Loaded(self._fresh(), 0, False))
                continue
            try:
                r = rec.decode(blob, self.version, self.d)
                resized = len(r.seen_filter) != self.s.seen_filter_bytes
                if resized:  # a format-2 record, or the setting changed: refilled from what is known, the window
                    r.seen_filter = np.zeros(self.s.seen_filter_bytes, np.uint8)
                    if r.model_version == self.version:  # else _rewarm does it, through the old vocabulary
                        self._mark_seen(r, r.window[r.window > 0])
                if len(r.window) != self.slots or len(r.dedup) != self.s.dedup_slots:  # a setting changed
                    r.resize(self.slots, self.s.dedup_slots)
                    resized = True
                if r.model_version == self.version:
                    if r.codec != self.s.state_codec:  # the same state, stored another way: re-packed, history kept
                        r.state = pack(unpack([r.state], self.template, r.codec), self.s.state_codec)[0]
                        r.codec, resized = self.s.state_codec, True
                    out.append(Loaded(r, r.revision, resized))
                    continue
                stale.append(len(out))
                out.append(Loaded(r, r.revision, True))
            except (rec.CorruptRecord, ValueError) as e:  # ValueError: a state the codec cannot unpack
                log.warning("corrupt state record for user %r (%s): rebuilt empty, not served", u, e)
                ERRORS.labels("corrupt_record").inc()
                STATE_REBUILDS.labels("corrupt").inc()
                out.append(Loaded(self._fresh(), rec.stored_revision(blob), True))
        if stale:
            self._rewarm([out[i].record for i in stale])
            for i in stale:
                STATE_REBUILDS.labels("model_change").inc()
        return out

    def _rewarm(self, records: list[rec.Record]) -> None:
        """Replay each stale record's window (mapped through its model's vocabulary) with this model."""
        histories = []
        for r in records:
            old = self._vocab(r.model_version)
            ids = [old[i - 1] for i in r.history() if old is not None and 0 < i <= len(old)]
            histories.append([self.ckpt.item_index[x] for x in ids if x in self.ckpt.item_index][-self.slots :])
        state, vec = self._states(histories)
        blobs = pack(state, self.s.state_codec)
        for i, r in enumerate(records):
            if not histories[i] and r.applied:  # old vocabulary evicted (or no item kept): no state, so popularity
                log.warning("state of version %s cannot be re-warmed (its vocabulary is gone): reset", r.model_version)
                r.applied = 0
            r.model_version, r.codec, r.state = self.version, self.s.state_codec, blobs[i]
            r.vector = vec[i].numpy().astype(np.float32)
            r.window = np.zeros(self.slots, np.int32)
            for item in histories[i]:
                r.push(item)
            self._mark_seen(r, histories[i])  # the filter holds ids, so it survives a new catalogue; the window is in it

    def _vocab(self, version: str) -> list[str] | None:
        if version not in self.vocabs:
            raw = self.store.get(self._vocab_key(version))
            if not raw:  # not cached: it may be written later
                return None
            self.vocabs[version] = json.loads(raw)
        return self.vocabs[version]

    # --- the model ------------------------------------------------------------------
    @torch.inference_mode()
    def _states(self, histories: list[list[int]]) -> tuple[dict[str, Tensor], Tensor]:
        """State and user vector (n, d) after each history from the empty state, in one parallel forward over the
        histories left-padded to the longest (callers batch histories of similar length)."""
        items = left_pad(histories, max(1, max(map(len, histories), default=0)))  # (n, l)
        vec, state = self.model.forward_state(items)
        vec[items[:, -1] == 0] = 0  # an empty history: the zero vector of a user never stepped
        return state, vec

    @torch.inference_mode()
    def _advance(self, state: dict[str, Tensor], vec: Tensor, seqs: list[list[int]]) -> tuple[dict[str, Tensor], Tensor]:
        """Step every user through their own item list; one batched step per position."""
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
        return state, vec

    # --- events -----------------------------------------------------------------------
    def apply(self, requests: list[list[Event]]) -> list[EventsResult]:
        """Apply each request's events in order; per user atomically (CAS on the revision, retried)."""
        self._save_vocab()
        results = [EventsResult() for _ in requests]
        by_user: dict[str, list[tuple[int, Event, int]]] = {}
        for r, events in enumerate(requests):
            for e in events:
                item = self.ckpt.item_index.get(e.item_id)
                if item is None:
                    results[r].unknown_items.append(e.item_id)
                    EVENTS.labels("unknown_item").inc()
                else:
                    by_user.setdefault(e.user_id, []).append((r, e, item))
        pending = list(by_user)
        for _ in range(self.s.cas_retries):  # no sleep between rounds: this thread is the one the next batch waits for,
            if not pending:                  # and every round some writer of each contended user wins, so it ends
                break
            pending = self._apply_once(pending, by_user, results)
            CAS_CONFLICTS.inc(len(pending))
        if pending:
            raise Conflict(f"{len(pending)} users still conflicting after {self.s.cas_retries} attempts")
        return results

    def _apply_once(self, users: list[str], by_user: dict[str, list[tuple[int, Event, int]]], results: list[EventsResult]) -> list[str]:
        loaded = self._read(users)
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
                self._mark_seen(r, [item])
                r.applied += 1
                if e.timestamp is not None:
                    r.last_event_ts = epoch_seconds(e.timestamp)
                seq.append(item)
                out.append((req, True))
            outcomes.append(out)
            seqs.append(seq)
        state = unpack([x.record.state for x in loaded], self.template, self.s.state_codec)
        vec = torch.from_numpy(np.stack([x.record.vector for x in loaded]))  # (u, d)
        state, vec = self._advance(state, vec, seqs)
        blobs = pack(state, self.s.state_codec)
        now = time.time()
        writes = []
        for i, x in enumerate(loaded):
            r, expected = x.record, x.revision
            r.state, r.vector, r.updated_at, r.revision = blobs[i], vec[i].numpy(), now, max(expected, 0) + 1
            writes.append((self.key(users[i]), expected, self._encode(r)))
        oks = self.store.cas_many(writes, self.s.state_ttl_s)
        failed: list[str] = []
        created = n_applied = n_duplicate = 0
        for i, ok in enumerate(oks):
            if not ok:
                failed.append(users[i])
                continue
            created += loaded[i].revision == 0
            for req, applied in outcomes[i]:
                if applied:
                    results[req].applied += 1
                    n_applied += 1
                else:
                    results[req].duplicate += 1
                    n_duplicate += 1
        EVENTS.labels("applied").inc(n_applied)
        EVENTS.labels("duplicate").inc(n_duplicate)
        self._count_users(created)
        return failed

    def _count_users(self, created: int) -> None:
        if created:
            USERS_SEEN.set(self.store.incr(f"holorec:{self.s.namespace}:users", created))

    # --- warming from a log ---------------------------------------------------------------
    def warm(self, user_ids: list[str], histories: list[list[int]], last_ts: list[float], overwrite: bool = False) -> int:
        """Write each user's record as if their whole history had been posted as events without ids (count, window,
        last timestamp), the state from one parallel forward, not a step per event. A user who has a record keeps
        it unless `overwrite`; an overwrite that loses a race re-reads and retries. -> records written."""
        self._save_vocab()
        blobs = self.store.get_many([self.key(u) for u in user_ids])
        todo = [i for i, b in enumerate(blobs) if overwrite or b is None]
        if not todo:
            return 0
        state, vec = self._states([histories[i] for i in todo])
        packed = pack(state, self.s.state_codec)
        records: dict[int, rec.Record] = {}
        for j, i in enumerate(todo):
            r = records[i] = self._fresh()
            for item in histories[i][-self.slots :]:
                r.push(item)
            self._mark_seen(r, histories[i])
            r.applied, r.last_event_ts, r.state, r.vector = len(histories[i]), epoch_seconds(last_ts[i]), packed[j], vec[j].numpy()
        expected = {i: 0 if blobs[i] is None else rec.stored_revision(blobs[i]) for i in todo}  # type: ignore[arg-type]
        written = created = 0
        for _ in range(self.s.cas_retries if overwrite else 1):
            writes = [(self.key(user_ids[i]), expected[i], self._encode(self._bumped(records[i], expected[i]))) for i in todo]
            oks = self.store.cas_many(writes, self.s.state_ttl_s)
            written += sum(oks)
            created += sum(ok and expected[i] == 0 for i, ok in zip(todo, oks))
            todo = [i for i, ok in zip(todo, oks) if not ok]  # without overwrite: created meanwhile, so kept
            if not todo:
                break
            for i, blob in zip(todo, self.store.get_many([self.key(user_ids[i]) for i in todo])):
                expected[i] = 0 if blob is None else rec.stored_revision(blob)
            CAS_CONFLICTS.inc(len(todo))
        self._count_users(created)
        return written

    def rewarm(self, user_ids: list[str]) -> int:
        """Re-warm now the records of these users that another model or codec wrote, as their first touch would;
        -> records rewritten."""
        return self._write_back(user_ids, self._read(user_ids))

    def _write_back(self, user_ids: list[str], loaded: list[Loaded]) -> int:
        """Store the records `_read` re-warmed or reset; losing the race means someone wrote newer state."""
        rewrites = [(self.key(u), x.revision, self._encode(self._bumped(x.record, x.revision))) for u, x in zip(user_ids, loaded) if x.dirty]
        return sum(self.store.cas_many(rewrites, self.s.state_ttl_s)) if rewrites else 0

    # --- recommendations ---------------------------------------------------------------
    def attribute_mask(self, name: str) -> Tensor | None:
        """(v,) True for items carrying attribute `name`; None if the checkpoint has no such attribute."""
        j = self.ckpt.attribute_index.get(name)
        if j is None:
            return None
        if j not in self.attr_masks:
            self.attr_masks[j] = (self.model.item_attrs == j).any(1)
        return self.attr_masks[j]

    def recommend(self, queries: list[RecQuery]) -> list[RecResult]:
        loaded = self._read([q.user_id for q in queries], cached=True)
        self._write_back([q.user_id for q in queries], loaded)
        with_state = [i for i, x in enumerate(loaded) if x.record.applied > 0]
        out: list[RecResult] = [self._popular(q) if x.record.applied <= 0 else None for q, x in zip(queries, loaded)]  # type: ignore[misc]
        if with_state:
            t0 = time.perf_counter()
            with torch.inference_mode():
                h = torch.from_numpy(np.stack([loaded[i].record.vector for i in with_state]))  # (n, d)
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
        for r in out:
            RECOMMENDATIONS.labels(r.source).inc()
        return out

    def _bumped(self, r: rec.Record, expected: int) -> rec.Record:
        r.revision = max(expected, 0) + 1
        r.updated_at = time.time()
        return r

    def _excluded_ids(self, q: RecQuery, r: rec.Record | None, cand: np.ndarray | None = None) -> np.ndarray:
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
        banned = torch.from_numpy(self._excluded_ids(q, r, None if cand is None else cand.numpy()))
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
        banned = set(self._excluded_ids(q, None).tolist())
        keep = self.attribute_mask(q.attribute) if q.attribute is not None else None
        n, items = len(self.popular), []
        for rank, i in enumerate(self.popular):
            if i in banned or (q.attribute is not None and (keep is None or not bool(keep[i]))):
                continue
            items.append((self.ckpt.items[i - 1], 1.0 - rank / n))
            if len(items) == q.k:
                break
        return RecResult(items, "popular")

    # --- users ---------------------------------------------------------------------------
    def user_meta(self, user_id: str) -> dict | None:
        blob = self.store.get(self.key(user_id))
        if blob is None:
            return None
        try:
            r = rec.decode(blob, self.version, self.d)
        except rec.CorruptRecord as e:
            ERRORS.labels("corrupt_record").inc()
            return {"user_id": user_id, "corrupt": str(e), "state_bytes": len(blob)}
        return {
            "user_id": user_id,
            "events_applied": r.applied,
            "last_update": r.updated_at,
            "last_event_timestamp": None if math.isnan(r.last_event_ts) else r.last_event_ts,
            "model_version": r.model_version,
            "current_model": r.model_version == self.version,
            "state_bytes": len(blob),
        }

    def delete(self, user_id: str) -> bool:
        existed = self.store.delete(self.key(user_id))
        if existed:
            USERS_SEEN.set(self.store.incr(f"holorec:{self.s.namespace}:users", -1))
        return existed
