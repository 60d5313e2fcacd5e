"""Users' records in the store, ready for this model: read, re-warmed, encoded, written back, counted, deleted.

A record another model version wrote is re-warmed on reading (its window replayed through the old model's
vocabulary with this model); one in another codec is re-packed, one with other sizes resized, a corrupt one
rebuilt empty. `Loaded.dirty` says so, and whoever read it writes it back.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.checkpoint import Checkpoint
from model.seen import SeenFilter
from model.split import left_pad
from model.state import pack, unpack
from service import record as rec
from service.metrics import ERRORS, STATE_REBUILDS, USERS_SEEN
from service.settings import Settings
from service.store import StateStore, user_count_key, user_key, vocab_key

log = logging.getLogger("holorec")


@dataclass
class Loaded:
    """A user's record as read, ready for this model, with the revision to compare-and-set against."""
    record: rec.Record
    revision: int  # 0: no record stored; -1: a stored value too short to hold one (corrupt)
    dirty: bool  # re-warmed, re-packed, resized or rebuilt on reading: to be written back even without an event


class Records:
    """One model's view of the store's user records: the sizes, codec and vocabulary it reads and writes them with."""

    def __init__(self, ckpt: Checkpoint, store: StateStore, settings: Settings) -> None:
        self.ckpt, self.store, self.s = ckpt, store, settings
        self.model = ckpt.model.eval()
        self.version = ckpt.version
        self.d = self.model.config.d_model
        self.slots = settings.history_slots  # the record's window of recent item indices
        self.id_bytes = 2 if len(ckpt.items) < 2**16 else 4  # a window index's bytes in the record
        self.template = self.model.init_state(1)
        self.empty_state = pack(self.template, settings.state_codec)[0]
        self.seen = SeenFilter(ckpt.items, settings.seen_filter_bytes) if settings.seen_filter_bytes else None
        self.vocabs: dict[str, list[str]] = {self.version: ckpt.items}
        self.vocab_checked = -math.inf  # when this model's vocabulary was last seen in the store
        self.users_key = user_count_key(settings.namespace)  # the users_seen counter: writes that create a record add to it (store.cas_many)
        # key -> (the stored value, its record as read): a recommendation read through the client-side cache gets the
        # very bytes object it got last time while Redis reports no write, and then needs no decode (read only). Only
        # with that cache: without it (a Cluster, the embedded store) every read is a new object, or not worth the memory.
        self.decoded: OrderedDict[str, tuple[bytes, Loaded]] = OrderedDict()
        self.memo_reads = getattr(store, "cache", None) is not None  # the app makes one only when client_cache_entries > 0

    def save_vocab(self) -> None:
        """Records keep item indices; a later model re-warms them through this id list. Checked again every
        minute: an LRU Redis evicts this rarely read key first, and the next model needs it."""
        if time.monotonic() - self.vocab_checked > 60:
            if not self.store.exists(vocab_key(self.s.namespace, self.version)):
                self.store.set(vocab_key(self.s.namespace, self.version), json.dumps(self.ckpt.items).encode())
            self.vocab_checked = time.monotonic()

    # --- keys and records -----------------------------------------------------------
    def key(self, user_id: str) -> str:
        return user_key(self.s.namespace, user_id)

    def fresh(self) -> rec.Record:
        return rec.empty(self.version, self.s.state_codec, self.slots, self.s.dedup_slots, self.s.seen_filter_bytes, self.d, self.empty_state)

    def encode(self, r: rec.Record) -> bytes:
        return rec.encode(r, self.id_bytes)

    def mark_seen(self, r: rec.Record, items: list[int] | np.ndarray) -> None:
        if self.seen is not None:
            self.seen.add(r.seen_filter, items)

    def read(self, user_ids: list[str], cached: bool = False, ours: bool = False) -> list[Loaded]:
        """Each user's record ready for this model; `cached`: through the client-side cache (the serving app's reads);
        `ours`: and from this process's own last writes (events, whose compare-and-set checks the revision read)."""
        keys = [self.key(u) for u in user_ids]
        blobs = self.store.get_many(keys, cached, ours)
        out: list[Loaded] = []
        stale: list[int] = []
        memo = cached and not ours and self.memo_reads  # recommendations, which never change a record
        for u, key, blob in zip(user_ids, keys, blobs):
            if blob is None:
                out.append(Loaded(self.fresh(), 0, False))
                continue
            if memo and (hit := self.decoded.get(key)) is not None and hit[0] is blob:
                out.append(hit[1])
                continue
            try:
                r = rec.decode(blob, self.version, self.d)
                resized = len(r.seen_filter) != self.s.seen_filter_bytes
                if resized:  # a format-2 record, or the setting changed: refilled from what is known, the window
                    r.seen_filter = np.zeros(self.s.seen_filter_bytes, np.uint8)
                    if r.model_version == self.version:  # else _rewarm does it, through the old vocabulary
                        self.mark_seen(r, r.window[r.window > 0])
                if len(r.window) != self.slots or len(r.dedup) != self.s.dedup_slots:  # a setting changed
                    r.resize(self.slots, self.s.dedup_slots)
                    resized = True
                if r.model_version == self.version:
                    if r.codec != self.s.state_codec:  # the same state, stored another way: re-packed, history kept
                        r.state = pack(unpack([r.state], self.template, r.codec), self.s.state_codec)[0]
                        r.codec, resized = self.s.state_codec, True
                    out.append(Loaded(r, r.revision, resized))
                    if memo and not resized:
                        self.decoded[key] = (blob, out[-1])
                        self.decoded.move_to_end(key)
                        if len(self.decoded) > self.s.client_cache_entries:
                            self.decoded.popitem(last=False)
                    continue
                stale.append(len(out))
                out.append(Loaded(r, r.revision, True))
            except (rec.CorruptRecord, ValueError) as e:  # ValueError: a state the codec cannot unpack
                log.warning("corrupt state record for user %r (%s): rebuilt empty, not served", u, e)
                ERRORS.labels("corrupt_record").inc()
                STATE_REBUILDS.labels("corrupt").inc()
                out.append(Loaded(self.fresh(), rec.stored_revision(blob), True))
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
        state, vec = self.states(histories)
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
            self.mark_seen(r, histories[i])  # the filter holds ids, so it survives a new catalogue; the window is in it

    def _vocab(self, version: str) -> list[str] | None:
        if version not in self.vocabs:
            raw = self.store.get(vocab_key(self.s.namespace, version))
            if not raw:  # not cached: it may be written later
                return None
            self.vocabs[version] = json.loads(raw)
        return self.vocabs[version]

    @torch.inference_mode()
    def states(self, histories: list[list[int]]) -> tuple[dict[str, Tensor], Tensor]:
        """State and user vector (n, d) after each history from the empty state, in one parallel forward over the
        histories left-padded to the longest (callers batch histories of similar length)."""
        items = left_pad(histories, max(1, max(map(len, histories), default=0)))  # (n, l)
        vec, state = self.model.forward_state(items)
        vec[items[:, -1] == 0] = 0  # an empty history: the zero vector of a user never stepped
        return state, vec

    # --- writing back ----------------------------------------------------------------
    def rewarm(self, user_ids: list[str]) -> int:
        """Re-warm now the records of these users that another model or codec wrote, as their first touch would;
        -> records rewritten."""
        return self.write_back(user_ids, self.read(user_ids))

    def write_back(self, user_ids: list[str], loaded: list[Loaded]) -> int:
        """Store the records `read` re-warmed or reset; losing the race means someone wrote newer state."""
        rewrites = [(self.key(u), x.revision, self.encode(bumped(x.record, x.revision))) for u, x in zip(user_ids, loaded) if x.dirty]
        return sum(self.store.cas_many(rewrites, self.s.state_ttl_s)) if rewrites else 0

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
            USERS_SEEN.set(self.store.incr(self.users_key, -1))
        return existed


def bumped(r: rec.Record, expected: int) -> rec.Record:
    """`r` stamped for a compare-and-set against revision `expected`: the next revision, written now."""
    r.revision = rec.next_revision(expected)
    r.updated_at = time.time()
    return r
