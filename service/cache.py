"""Repeat reads without a round trip: user records cached in the process until Redis says they changed.

Redis's server-assisted client-side caching (CLIENT TRACKING, Redis 6+) in broadcast mode: one connection of
our own asks Redis to report every write to a key under the namespace's prefix, and subscribes to those
reports (RESP2: tracking redirected to itself, channel __redis__:invalidate). Before every answer from the
cache, the reports that have arrived are read (a non-blocking poll of that socket), so a write made by any
replica is seen by the next read here once its report has arrived: Redis sends it in the same turn of its
event loop as the writer's reply (measured here: 25 us after the writer's SET returned).

A read racing a write cannot leave a stale entry: a key is marked before its value is fetched, a report for
it clears the mark, and the fetched value is kept only if the mark survived the reports read after the fetch.
When the reporting connection fails (Redis restarted, possibly from an older AOF), the whole cache is dropped
and bypassed until it reconnects. Plain Redis only: a Cluster would need one reporting connection per node.

What this process wrote for events is kept apart (`ours`; `writing`, `written`) and serves only the next event
for that user, which then makes one round trip (its compare-and-set) instead of two. Redis reports our own write
like any other, usually before the write's reply, so a written value is kept when at most one report for its key
arrived while the write was in flight, and if none did, the next one is skipped as ours. Any later write by
anyone else drops it. This reasoning has one gap: Redis reports the writes of one turn of its event loop as one
(a DELETE in the same turn as our write would be skipped with ours). So these values never serve a
recommendation. An event only uses one as its guess: the compare-and-set against the guessed revision is what
decides, and a stale guess costs one retry that reads Redis, never a lost update (a user deleted and written again
starts from a random revision, service/record.py next_revision, so an old guess cannot match the new record).
"""
from __future__ import annotations

import select
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import hiredis
import redis

from service.metrics import RECORD_CACHE, labelled


class RecordCache:
    def __init__(self, url: str, prefix: str, entries: int, timeout_s: float) -> None:
        self.url, self.prefix, self.entries, self.timeout_s = url, prefix, entries, timeout_s
        self.values: OrderedDict[str, bytes | None] = OrderedDict()  # LRU: key -> the stored value (None: no record)
        self.marks: dict[str, object] = {}  # key -> the token of a fetch in flight
        self.ours: OrderedDict[str, bytes] = OrderedDict()  # LRU: key -> what this process wrote (events' guesses)
        self.skip: dict[str, int] = {}  # key in `ours` -> reports still to skip as our own write's
        self.reports: dict[str, list[int]] = {}  # key we are writing -> [reports for it so far, writes in flight]
        self.lock = threading.Lock()
        for result in ("hit", "miss"):  # exported at 0 from the start, so a hit ratio is defined before the first miss
            labelled(RECORD_CACHE, result)
        self.conn: redis.Connection | None = None
        self.sock: socket.socket | None = None  # conn's socket, which _drain reads itself, parsing with `reader`
        self.reader = hiredis.Reader()
        self.poller = select.poll()  # registered on conn's socket: whether a report has arrived, in one system call
        self.generation, self.retry_at, self.connecting = 0, 0.0, False  # generation: connections made so far
        with self.lock:
            self._drain()  # starts connecting

    def get_many(self, keys: Sequence[str], fetch: Callable[[list[str]], list[bytes | None]], ours: bool = False) -> list[bytes | None]:
        """The values of `keys`: from the cache where Redis has reported no write since they were fetched, the
        rest by `fetch`, and kept unless a report for them arrived meanwhile. `ours`: also this process's own
        writes (for events, whose compare-and-set checks the guess)."""
        with self.lock:
            live, generation = self._drain(), self.generation
            got: dict[str, bytes | None] = {}
            for k in keys:
                for table in (self.ours, self.values) if ours else (self.values,):
                    if live and k in table:
                        got[k] = table[k]
                        table.move_to_end(k)
                        break
            missing = [k for k in dict.fromkeys(keys) if k not in got]
            token = object()
            for k in missing:
                self.marks[k] = token
        for result, n in (("hit", len(keys) - len(missing)), ("miss", len(missing))):
            if n:  # both series exist from __init__; a zero update would still cost a locked write
                labelled(RECORD_CACHE, result).inc(n)
        if missing:
            try:
                fetched = fetch(missing)
            except BaseException:
                with self.lock:
                    for k in missing:
                        if self.marks.get(k) is token:
                            del self.marks[k]
                raise
            with self.lock:
                # the reports that arrived during the fetch clear marks; a reconnect means writes went unreported
                keep = self._drain() and live and self.generation == generation
                for k, v in zip(missing, fetched):
                    got[k] = v
                    if self.marks.get(k) is token:
                        del self.marks[k]
                        if keep:
                            self.values[k] = v
                self._trim()
        return [got[k] for k in keys]

    def writing(self, keys: Sequence[str]) -> tuple[int, dict[str, int]]:
        """Before this process compare-and-sets `keys`: start counting their reports. -> what `written` needs."""
        with self.lock:
            self._drain()
            before = {}
            for k in keys:
                counts = self.reports.setdefault(k, [0, 0])
                counts[1] += 1
                before[k] = counts[0]
            return self.generation, before

    def written(self, started: tuple[int, dict[str, int]], writes: Sequence[tuple[str, bytes]], oks: Sequence[bool]) -> None:
        """After the compare-and-set: keep each value that was written, unless its key had two reports meanwhile."""
        generation, before = started
        with self.lock:
            live = self._drain() and self.generation == generation
            for (k, v), ok in zip(writes, oks):
                counts = self.reports[k]
                arrived, counts[1] = counts[0] - before[k], counts[1] - 1
                if not counts[1]:
                    del self.reports[k]
                self.values.pop(k, None)  # what was fetched before is out of date either way
                self.ours.pop(k, None)
                self.skip.pop(k, None)
                if ok and live and arrived <= 1:
                    self.ours[k], self.skip[k] = v, 1 - arrived
            self._trim()

    def _trim(self) -> None:
        while len(self.values) > self.entries:
            self.values.popitem(last=False)
        while len(self.ours) > self.entries:
            self.skip.pop(self.ours.popitem(last=False)[0], None)

    # --- the reporting connection -------------------------------------------------------------
    def _drain(self) -> bool:
        """Apply every report that has arrived; -> whether the cache can be trusted (the connection is up)."""
        if self.conn is None:  # (re)connected on a thread of its own: a request never waits for it
            if time.monotonic() >= self.retry_at and not self.connecting:
                self.connecting = True
                threading.Thread(target=self._connect, name="holorec-record-cache", daemon=True).start()
            return False
        try:
            # The socket read and parsed here (hiredis's C parser), not through redis-py's read_response and can_read,
            # whose Python around each report (one or two an event) cost more than reading it. Each drain reads until
            # the socket is empty and parses every whole report received, so an idle socket means no report: one
            # poll. A closed or failed socket polls as ready too, and recv then says so.
            while self.poller.poll(0):
                data = self.sock.recv(65536)  # type: ignore[union-attr]
                if not data:
                    raise ConnectionError("the reporting connection was closed")
                self.reader.feed(data)
                while (msg := self.reader.gets()) is not False:
                    if isinstance(msg, list) and len(msg) == 3 and msg[0] == b"message":
                        self._invalidate(msg[2])
            return True
        except (redis.RedisError, OSError, hiredis.ProtocolError):
            self._drop()
            return False

    def _invalidate(self, keys: list[bytes] | None) -> None:
        if keys is None:  # a FLUSHDB/FLUSHALL, or Redis ran out of room to track: everything may have changed
            self._forget()
            return
        for raw in keys:
            k = raw.decode()
            self.marks.pop(k, None)
            if k in self.reports:
                self.reports[k][0] += 1
            self.values.pop(k, None)
            if self.skip.get(k):
                self.skip[k] -= 1  # our own write's report (or one from before it): the value we wrote stands
            else:
                self.ours.pop(k, None)
                self.skip.pop(k, None)

    def _forget(self) -> None:
        """Everything may have changed: no entry kept, no fetch or write in flight trusted."""
        self.values.clear()
        self.marks.clear()
        self.ours.clear()
        self.skip.clear()
        for counts in self.reports.values():
            counts[0] += 1

    def _connect(self) -> None:
        conn = None
        try:  # any URL form redis-py reads (redis://, rediss://, unix://), always RESP2: reports arrive as pub/sub messages
            conn = redis.ConnectionPool.from_url(self.url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s,
                                                 protocol=2).make_connection()
            conn.connect()
            conn.send_command("CLIENT", "ID")
            cid = conn.read_response()
            conn.send_command("CLIENT", "TRACKING", "ON", "REDIRECT", cid, "BCAST", "PREFIX", self.prefix)
            conn.read_response()
            conn.send_command("SUBSCRIBE", "__redis__:invalidate")
            # from here on the socket is read by this class alone (_drain), so that no report can sit in redis-py's
            # buffer: the subscription's reply too, and whatever came with it stays in `reader` for the first drain
            sock, reader = conn._sock, hiredis.Reader()  # type: ignore[attr-defined]
            while (reply := reader.gets()) is False:
                data = sock.recv(65536)  # blocks for at most timeout_s, the socket's timeout
                if not data:
                    raise ConnectionError("closed while subscribing")
                reader.feed(data)
            if not (isinstance(reply, list) and reply[:1] == [b"subscribe"]):
                raise ConnectionError(f"unexpected reply to SUBSCRIBE: {reply!r}")
        except (redis.RedisError, OSError, hiredis.ProtocolError):
            if conn is not None:
                conn.disconnect()
            with self.lock:
                self.connecting, self.retry_at = False, time.monotonic() + 1.0
            return
        with self.lock:
            self.poller = select.poll()
            self.poller.register(sock, select.POLLIN)
            self.conn, self.sock, self.reader = conn, sock, reader
            self.generation, self.connecting = self.generation + 1, False

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.disconnect()
        self.conn, self.sock, self.retry_at = None, None, time.monotonic() + 1.0
        self._forget()
