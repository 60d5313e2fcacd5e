"""What the service does, without HTTP: apply events to user records, score users, warm and re-warm records.

Everything here runs on the batcher's threads (or `holorec warm` / `holorec consume`), a batch at a
time. `Engine` is the one object the rest of the code holds; the work lives in three parts it builds:

    service/records.py   Records: read (re-warm, re-pack, resize, rebuild), encode and write back user records
    service/apply.py     Applier: apply events (per-user compare-and-set, retried) and warm users from a log
    service/scoring.py   Scorer: top-k from the stored user vector, exclusions, attribute filter, popular fallback
"""
from __future__ import annotations

import numpy as np
from torch import Tensor

from model.checkpoint import Checkpoint
from model.fast_step import StepFn
from service import record as rec
from service.apply import Applier, Conflict, Event, EventsResult, epoch_seconds
from service.records import Loaded, Records
from service.scoring import RecQuery, RecResult, Scorer
from service.settings import Settings
from service.store import StateStore

__all__ = ["Conflict", "Engine", "Event", "EventsResult", "Loaded", "RecQuery", "RecResult", "epoch_seconds"]


class Engine:
    def __init__(self, ckpt: Checkpoint, store: StateStore, settings: Settings) -> None:
        self.ckpt, self.store, self.s = ckpt, store, settings
        self.records = Records(ckpt, store, settings)
        self.applier = Applier(self.records)
        self.scorer = Scorer(self.records)
        r = self.records  # the parts' attributes, here as before the split (the same objects)
        self.model, self.version, self.d, self.slots, self.id_bytes = r.model, r.version, r.d, r.slots, r.id_bytes
        self.template, self.empty_state, self.seen, self.vocabs = r.template, r.empty_state, r.seen, r.vocabs
        self.index, self.popular, self.attr_masks = self.scorer.index, self.scorer.popular, self.scorer.attr_masks

    @property
    def step(self) -> StepFn:
        """The model step events are applied with: a frozen trace where it is exact (model/fast_step.py), else model.step."""
        return self.applier.step

    @step.setter
    def step(self, fn: StepFn) -> None:
        self.applier.step = fn

    @property
    def vocab_checked(self) -> float:
        """When this model's vocabulary was last seen in the store (time.monotonic)."""
        return self.records.vocab_checked

    # --- events and warming (service/apply.py) ---------------------------------------
    def apply(self, requests: list[list[Event]]) -> list[EventsResult]:
        """Apply each request's events in order; per user atomically (CAS on the revision, retried)."""
        return self.applier.apply(requests)

    def warm(self, user_ids: list[str], histories: list[list[int]], last_ts: list[float], overwrite: bool = False) -> int:
        """Write each user's record as if their whole history had been posted as events; -> records written."""
        return self.applier.warm(user_ids, histories, last_ts, overwrite)

    # --- recommendations (service/scoring.py) ------------------------------------------
    def recommend(self, queries: list[RecQuery]) -> list[RecResult]:
        return self.scorer.recommend(queries)

    def attribute_mask(self, name: str) -> Tensor | None:
        """(v,) True for items carrying attribute `name`; None if the checkpoint has no such attribute."""
        return self.scorer.attribute_mask(name)

    def _excluded_ids(self, q: RecQuery, r: rec.Record | None) -> np.ndarray:
        """(n,) item indices this query must not get (Scorer.excluded_ids); tests look here."""
        return self.scorer.excluded_ids(q, r)

    # --- records and users (service/records.py) -------------------------------------------
    def key(self, user_id: str) -> str:
        return self.records.key(user_id)

    def _read(self, user_ids: list[str], cached: bool = False) -> list[Loaded]:
        """Each user's record ready for this model (Records.read); tests look here."""
        return self.records.read(user_ids, cached)

    def rewarm(self, user_ids: list[str]) -> int:
        """Re-warm now the records of these users that another model or codec wrote, as their first touch would;
        -> records rewritten."""
        return self.records.rewarm(user_ids)

    def user_meta(self, user_id: str) -> dict | None:
        return self.records.user_meta(user_id)

    def delete(self, user_id: str) -> bool:
        return self.records.delete(user_id)
