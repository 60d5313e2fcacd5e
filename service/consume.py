"""`holorec consume`: apply a Redis Stream's events through a consumer group, each event's effect exactly once.

Entries carry `user_id`, `item_id` and optionally `timestamp` and `event_id`. They go through the same path as
POST /events (Engine.apply: batched, per-user compare-and-set, event-id dedup); the event id is the entry's
`event_id`, else its stream id, so a redelivered entry is recognised.

At-least-once delivery plus dedup: an entry is acknowledged (XACK) only after its write. A consumer that dies
mid-batch leaves its entries pending; any consumer of the group claims them once they have been idle
`stream_claim_idle_ms` (XAUTOCLAIM on start and then as often), and re-applying what was written but not
acknowledged finds the event id in the user's record: a duplicate, not applied twice.

Per-user order is the stream's order, with any number of consumers in the group: before applying a batch, a
consumer waits until no other consumer holds an earlier unacknowledged entry of one of the batch's users,
claiming it if that consumer has been idle past the claim time. Entries of other users do not wait.

An entry the API would refuse (missing or bad field, unknown item) is added to the dead-letter stream with its
reason and acknowledged: it never blocks the group.
"""
from __future__ import annotations

import logging
import threading
import time

import redis
import redis.cluster
from pydantic import ValidationError

from service.api import EventIn, user_id_problem
from service.engine import Conflict, Engine, Event
from service.metrics import BATCH_SIZE, DEAD_LETTERS, ERRORS, STREAM_ENTRIES, STREAM_LAG, STREAM_PENDING
from service.settings import Settings
from service.store import StoreUnavailable

log = logging.getLogger("holorec")

Entry = tuple[str, dict[str, str] | None]  # (stream id, fields); fields None: deleted from the stream since delivery


class BadEntry(ValueError):
    """An entry that cannot be applied; `kind` labels the dead-letter metric, the message is the reason stored."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _order(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


class Consumer:
    def __init__(self, engine: Engine, client: redis.Redis | redis.cluster.RedisCluster, stream: str, group: str,
                 name: str, dead_letter: str) -> None:
        self.engine, self.r, self.stream, self.group, self.name, self.dead_letter = engine, client, stream, group, name, dead_letter
        s = engine.s
        self.batch, self.block_ms, self.claim_idle_ms = s.stream_batch, s.stream_block_ms, s.stream_claim_idle_ms

    def create_group(self, new_only: bool = False) -> None:
        """A new group starts at the stream's first entry (or, new_only, at entries added from now); an existing
        group keeps its position."""
        try:
            self.r.xgroup_create(self.stream, self.group, id="$" if new_only else "0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def run(self, stop: threading.Event, new_only: bool = False) -> None:
        """Until `stop`: this consumer's own pending entries first, claims of dead consumers' entries on start and
        every claim interval, then new entries. A Redis outage or exhausted compare-and-set is waited out."""
        ready, backlog, next_claim = False, True, 0.0
        while not stop.is_set():
            try:
                if not ready:
                    self.create_group(new_only)
                    ready = True
                if time.monotonic() >= next_claim:
                    self.claim()
                    self.observe()
                    next_claim = time.monotonic() + self.claim_idle_ms / 1000
                entries = self._read("0" if backlog else ">")
                backlog = backlog and bool(entries)
                self.process(entries)
            except (redis.ConnectionError, redis.TimeoutError, StoreUnavailable, Conflict) as e:
                log.warning("holorec consume: %s: %s; retrying in 1 s", type(e).__name__, e)
                ERRORS.labels("stream_retry").inc()
                backlog = True  # what was read stays pending for this consumer: read it again first
                stop.wait(1.0)

    def _read(self, start: str) -> list[Entry]:
        got = self.r.xreadgroup(self.group, self.name, {self.stream: start}, count=self.batch,
                                block=None if start == "0" else self.block_ms)
        return got[0][1] if got else []

    def claim(self) -> None:
        """Take over every entry another consumer has left unacknowledged for the claim time, and apply it."""
        cursor = "0-0"
        while True:
            cursor, entries, *_ = self.r.xautoclaim(self.stream, self.group, self.name, self.claim_idle_ms, cursor, count=self.batch)
            self.process(entries)
            if cursor == "0-0":
                return

    def observe(self) -> None:
        for g in self.r.xinfo_groups(self.stream):
            if g["name"] == self.group:
                STREAM_PENDING.labels(self.stream, self.group).set(g["pending"])
                if g.get("lag") is not None:
                    STREAM_LAG.labels(self.stream, self.group).set(g["lag"])

    def process(self, entries: list[Entry]) -> None:
        """Apply a batch in stream order, dead-letter the bad entries, then acknowledge them all."""
        if not entries:
            return
        BATCH_SIZE.labels("stream").observe(len(entries))
        entries = self._after_earlier(entries)
        events: list[Event] = []
        dead: list[tuple[str, dict[str, str], BadEntry]] = []
        for sid, fields in entries:
            if not fields:  # deleted from the stream (trimmed) since it was delivered: nothing to apply
                continue
            try:
                events.append(self.parse(sid, fields))
            except BadEntry as e:
                dead.append((sid, fields, e))
        if events:
            res = self.engine.apply([events])[0]
            STREAM_ENTRIES.labels("applied").inc(res.applied)
            STREAM_ENTRIES.labels("duplicate").inc(res.duplicate)
        pipe = self.r.pipeline(transaction=False)
        for sid, fields, e in dead:
            pipe.xadd(self.dead_letter, {**fields, "reason": str(e), "stream": self.stream, "stream_id": sid})
            DEAD_LETTERS.labels(e.kind).inc()
        pipe.xack(self.stream, self.group, *[sid for sid, _ in entries])
        pipe.execute()
        STREAM_ENTRIES.labels("dead_letter").inc(len(dead))

    def parse(self, sid: str, fields: dict[str, str]) -> Event:
        """The entry as an Event, checked as POST /events checks it; BadEntry if the API would refuse it."""
        for f in ("user_id", "item_id"):
            if not fields.get(f):
                raise BadEntry("missing_field", f"missing field {f}")
        ts = fields.get("timestamp")
        try:
            seconds = float(ts) if ts is not None else None
        except ValueError:
            raise BadEntry("bad_field", f"timestamp: {ts[:100]!r} is not a number") from None
        try:
            e = EventIn(user_id=fields["user_id"], item_id=fields["item_id"], event_id=fields.get("event_id"), timestamp=seconds)
        except ValidationError as err:
            first = err.errors()[0]
            raise BadEntry("bad_field", f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        problem = user_id_problem(e.user_id, self.engine.s)
        if problem:
            raise BadEntry("bad_field", problem)
        if e.item_id not in self.engine.ckpt.item_index:
            raise BadEntry("unknown_item", f"item {e.item_id!r} is not in the checkpoint's catalogue")
        return Event(e.user_id, e.item_id, e.event_id or sid, e.timestamp)

    def _after_earlier(self, entries: list[Entry]) -> list[Entry]:
        """Per-user order across consumers: wait while another consumer holds an unacknowledged entry of one of this
        batch's users earlier than the batch's last entry, claiming it once idle past the claim time (a dead
        consumer's); this consumer's own earlier unacknowledged entries join the batch at once. The last entry, not
        the first: a claimed batch can have another's entries between its own (two consumers splitting a dead one's
        entries; XAUTOCLAIM skipping entries re-read just before a failure). Every wait ends within the claim time."""
        while True:
            entries = sorted(entries, key=lambda e: _order(e[0]))
            ids = {sid for sid, _ in entries}
            users = {f["user_id"] for _, f in entries if f and "user_id" in f}
            pending = self.r.xpending_range(self.stream, self.group, "-", "(" + entries[-1][0], 10_000)
            mine = [p["message_id"] for p in pending if p["consumer"] == self.name and p["message_id"] not in ids]
            if mine:
                entries = entries + self._fetch(mine)
                continue
            others = [p for p in pending if p["consumer"] != self.name]
            fields = self._fetch([p["message_id"] for p in others])
            blocking = [p for p, (_, f) in zip(others, fields) if f and f.get("user_id") in users]
            if not blocking:
                return entries
            stale = [p["message_id"] for p in blocking if p["time_since_delivered"] >= self.claim_idle_ms]
            if stale:
                got = self.r.xclaim(self.stream, self.group, self.name, self.claim_idle_ms, stale)
                entries = entries + [e for e in got if e[0] not in ids]  # one of ours taken meanwhile is ours again
            else:
                time.sleep(0.005)

    def _fetch(self, sids: list[str]) -> list[Entry]:
        """These entries from the stream, in one round trip; fields None for one deleted (trimmed) since."""
        if not sids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for sid in sids:
            pipe.xrange(self.stream, sid, sid)
        return [(sid, got[0][1] if got else None) for sid, got in zip(sids, pipe.execute())]


def stream_client(s: Settings) -> redis.Redis | redis.cluster.RedisCluster:
    """A client of its own for the stream: replies as text, and a socket timeout that outlasts a blocking read."""
    opts = dict(decode_responses=True, socket_timeout=s.stream_block_ms / 1000 + s.store_timeout_s,
                socket_connect_timeout=s.store_timeout_s)
    if s.redis_cluster:
        return redis.cluster.RedisCluster.from_url(s.redis_url, **opts)
    return redis.Redis.from_url(s.redis_url, **opts)  # type: ignore[arg-type]
