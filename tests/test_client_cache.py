"""Client-side caching of records (service/cache.py, HOLOREC_CLIENT_CACHE_ENTRIES): a repeated read costs no Redis
round trip, a write by another replica between two reads is seen by the second, and what this process wrote is the
guess its next event for that user starts from (never a recommendation's answer)."""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from bench.harness import Service, wait_for
from model.checkpoint import load
from service.cache import RecordCache
from service.engine import Engine, Event
from service.metrics import CAS_CONFLICTS
from service.settings import Settings
from service.store import RedisStore, user_key, user_key_prefix
from tests.conftest import REDIS_URL


def gets(r: redis.Redis, command: str = "get") -> int:
    """GET (or other) commands this Redis has executed so far (INFO commandstats; a script's count too)."""
    return int(r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


@pytest.mark.parametrize("entries", [10000, 0])
def test_two_replicas_a_write_between_two_reads_is_seen(ckpt_dir: Path, namespace: str, counting_redis_url: str, entries: int) -> None:
    r = redis.Redis.from_url(counting_redis_url)
    a = Service(ckpt_dir, counting_redis_url, namespace, client_cache_entries=entries, wait=False)
    b = Service(ckpt_dir, counting_redis_url, namespace, client_cache_entries=entries)
    a.wait_ready()
    try:
        with httpx.Client(base_url=a.url, timeout=30) as ca, httpx.Client(base_url=b.url, timeout=30) as cb:
            assert cb.post("/events", json={"events": [{"user_id": "u", "item_id": "item-1"}]}).json()["applied"] == 1
            first = ca.get("/recommend/u").json()
            if entries:  # the cache's reporting connection comes up on a thread of its own: wait for a first hit
                wait_for("a cache hit", lambda: ca.get("/recommend/u").json() and a.metric("holorec_record_cache_total", result="hit") > 0, 30)
            before = gets(r)
            again = [ca.get("/recommend/u").json() for _ in range(5)]
            assert all(x == first for x in again)
            assert gets(r) - before == (0 if entries else 5)  # cached: no GET reached Redis; off: one per request
            for n in range(2, 6):  # replica b writes; replica a's very next recommendation reflects it
                assert cb.post("/events", json={"events": [{"user_id": "u", "item_id": f"item-{n}"}]}).json()["applied"] == 1
                after = ca.get("/recommend/u", params={"exclude_seen": "false"}).json()
                want = cb.get("/recommend/u", params={"exclude_seen": "false"}).json()
                assert after == want and after["source"] == "state"
                assert ca.get("/users/u").json()["events_applied"] == n
            r.delete(f"holorec:{namespace}:{{u:u}}")  # deleted behind the service's back: the report reaches the cache too
            time.sleep(0.05)
            assert ca.get("/recommend/u").json()["source"] == "popular"
    finally:
        a.stop()
        b.stop()


def connected_cache(namespace: str) -> RecordCache:
    cache = RecordCache(REDIS_URL, user_key_prefix(namespace), 100, 1.0)
    wait_for("the reporting connection", lambda: cache.get_many([], lambda ks: []) == [] and cache.conn is not None, 10)
    return cache


def reports_read(cache: RecordCache, r: redis.Redis, namespace: str) -> None:
    """Return once `cache` has read every report for writes made so far: Redis reports in write order, so once the
    report of a write made now has been read, so have all before it (no sleep that a busy machine could outlast)."""
    marker = user_key(namespace, "marker-" + uuid.uuid4().hex[:8])
    cache.get_many([marker], lambda ks: [None])  # cached as "no record" until a report says otherwise
    r.set(marker, b"x")
    wait_for("the marker's report", lambda: cache.get_many([], lambda ks: []) == [] and marker not in cache.values, 10, step=0.005)


def test_own_writes_are_kept_and_any_other_write_drops_them(namespace: str) -> None:
    """The cache's own-write bookkeeping against a real Redis: our compare-and-set's value serves the next event's
    read (never a recommendation's) once our own report has been read, a write by anyone else drops it, and so do
    two that land while ours is in flight."""
    r = redis.Redis.from_url(REDIS_URL)
    cache = connected_cache(namespace)
    store = RedisStore(REDIS_URL, cache=cache)
    k = user_key(namespace, "u")
    fetched: list[str] = []

    def read(ours: bool = True) -> bytes | None:
        return cache.get_many([k], lambda ks: fetched.extend(ks) or [r.get(x) for x in ks], ours)[0]

    def value(rev: int, body: bytes) -> bytes:
        return b"HREC" + bytes(4) + rev.to_bytes(8, "little") + body

    assert store.cas_many([(k, 0, value(1, b"ours"))], None, cached=True) == [True]
    reports_read(cache, r, namespace)  # our own write's report included: not an invalidation of what we wrote
    assert read() == value(1, b"ours") and fetched == []
    assert store.cas_many([(k, 1, value(2, b"ours again"))], None, cached=True) == [True]
    reports_read(cache, r, namespace)
    assert read() == value(2, b"ours again") and fetched == []
    assert read(ours=False) == value(2, b"ours again") and fetched == [k]  # a recommendation never reads our own writes
    r.set(k, value(3, b"theirs"))  # another replica's write: the next read goes to Redis
    reports_read(cache, r, namespace)
    assert read() == value(3, b"theirs") and fetched == [k, k]
    assert store.cas_many([(k, 2, value(3, b"stale"))], None, cached=True) == [False]  # a lost compare-and-set keeps nothing
    assert read() == value(3, b"theirs") and fetched == [k] * 3
    started = cache.writing([k])  # two writes by others land while ours is in flight: ours is not trusted
    r.set(k, value(4, b"theirs too"))
    r.set(k, value(5, b"theirs, again"))
    reports_read(cache, r, namespace)
    cache.written(started, [(k, value(4, b"ours, maybe"))], [True])
    assert read() == value(5, b"theirs, again") and fetched == [k] * 4
    assert store.cas_many([(k, 5, value(6, b"ours"))], None, cached=True) == [True]
    r.set(k, value(7, b"theirs"))  # our report and theirs: ours is dropped
    reports_read(cache, r, namespace)
    assert read() == value(7, b"theirs") and fetched == [k] * 5
    # Our write's report still on its way when the compare-and-set returns (Redis usually sends it first, so this is
    # staged: `written` with no write behind it, then a plain SET as the late report): that one report is skipped
    # as ours, the next drops our value.
    started = cache.writing([k])
    cache.written(started, [(k, value(8, b"ours, reported late"))], [True])
    r.set(k, value(8, b"ours, reported late"))
    reports_read(cache, r, namespace)
    assert read() == value(8, b"ours, reported late") and fetched == [k] * 5
    r.set(k, value(9, b"theirs"))
    reports_read(cache, r, namespace)
    assert read() == value(9, b"theirs") and fetched == [k] * 6


def test_a_closed_reporting_connection_is_noticed_at_the_next_read(namespace: str) -> None:
    """Redis closing the reporting connection (here CLIENT KILL; a restart alike) is seen by the next read's check for
    reports: the cache is dropped and bypassed, so a write made while no report could arrive is read from Redis, and
    once the connection is back, reads are cached again."""
    r = redis.Redis.from_url(REDIS_URL)
    cache = connected_cache(namespace)
    k = user_key(namespace, "u")
    fetched: list[str] = []

    def read() -> bytes | None:
        return cache.get_many([k], lambda ks: fetched.extend(ks) or [r.get(x) for x in ks])[0]

    r.set(k, b"old")
    reports_read(cache, r, namespace)
    assert read() == b"old" and read() == b"old" and fetched == [k]  # the second from the cache
    host, port = cache.conn._sock.getsockname()[:2]  # type: ignore[union-attr]
    assert r.client_kill(f"{host}:{port}")
    r.set(k, b"new")  # no report can reach the cache now
    assert read() == b"new" and cache.conn is None and fetched == [k, k]
    wait_for("the reporting connection again", lambda: cache.get_many([], lambda ks: []) == [] and cache.conn is not None, 10)
    assert read() == b"new" and read() == b"new" and fetched == [k] * 3


def test_one_replica_reads_no_record_for_its_own_users_events(ckpt_dir: Path, namespace: str, counting_redis_url: str) -> None:
    """Over HTTP: on one replica, each event for a user it wrote last reads nothing from Redis (its compare-and-set's
    own GET is the only one); a second replica taking turns on another user loses none of its events."""
    r = redis.Redis.from_url(counting_redis_url)
    a = Service(ckpt_dir, counting_redis_url, namespace, wait=False)
    b = Service(ckpt_dir, counting_redis_url, namespace)
    a.wait_ready()
    try:
        with httpx.Client(base_url=a.url, timeout=30) as ca, httpx.Client(base_url=b.url, timeout=30) as cb:
            wait_for("a's cache", lambda: ca.post("/events", json={"events": [{"user_id": "w", "item_id": "item-1"}]})
                     and a.metric("holorec_record_cache_total", result="hit") > 0, 30)
            before, scripts = gets(r), gets(r, "eval")
            for n in range(2, 7):
                assert ca.post("/events", json={"events": [{"user_id": "w", "item_id": f"item-{n}"}]}).json()["applied"] == 1
            assert gets(r, "eval") - scripts == 5  # one compare-and-set per event,
            assert gets(r) - before == 5  # whose script's GET is the only one: each event's read came from the cache
            for n in range(12):
                client = (ca, cb)[n % 2]
                assert client.post("/events", json={"events": [{"user_id": "v", "item_id": f"item-{1 + n % 40}"}]}).json()["applied"] == 1
            assert ca.get("/users/v").json()["events_applied"] == 12
            assert ca.get("/recommend/v").json() == cb.get("/recommend/v").json()
    finally:
        a.stop()
        b.stop()


def test_a_stale_guess_costs_a_retry_not_an_event(ckpt_dir: Path, namespace: str) -> None:
    """An event whose guess (this replica's own last write) is out of date because a write by another replica has
    not been reported yet: the compare-and-set fails, the retry reads Redis, and the event lands on the newer record,
    also when the user was deleted and written again in between (the new record does not reuse old revisions)."""
    r = redis.Redis.from_url(REDIS_URL)
    s = Settings(checkpoint=str(ckpt_dir), namespace=namespace)
    ckpt = load(ckpt_dir)
    a_cache = connected_cache(namespace)
    a = Engine(ckpt, RedisStore(REDIS_URL, cache=a_cache), s)
    b = Engine(ckpt, RedisStore(REDIS_URL), s)
    k = user_key(namespace, "u")

    def event(engine: Engine, item: str) -> int:
        return engine.apply([[Event("u", item)]])[0].applied

    def stale_guess(guess: bytes) -> None:
        """Put a's guess back, as if the reports that dropped it were still on their way."""
        reports_read(a_cache, r, namespace)
        assert k not in a_cache.ours
        with a_cache.lock:
            a_cache.ours[k], a_cache.skip[k] = guess, 0

    def history(engine: Engine) -> list[str]:
        return [ckpt.items[i - 1] for i in engine.records.read(["u"])[0].record.history()]

    assert event(a, "item-1") == 1
    guess = a_cache.ours[k]
    assert event(b, "item-2") == 1
    stale_guess(guess)
    conflicts = CAS_CONFLICTS._value.get()
    assert event(a, "item-3") == 1
    assert CAS_CONFLICTS._value.get() == conflicts + 1  # the guess lost its compare-and-set once
    assert a.user_meta("u")["events_applied"] == 3 and history(b) == ["item-1", "item-2", "item-3"]

    a.delete("u")  # a fresh user, one event by a; then deleted and recreated with one event by b
    assert event(a, "item-4") == 1
    guess = a_cache.ours[k]
    b.delete("u")
    assert event(b, "item-5") == 1
    stale_guess(guess)
    assert event(a, "item-6") == 1
    assert history(b) == ["item-5", "item-6"]  # not item-4: the deleted history does not come back


def test_a_cached_record_is_decoded_once_until_it_changes(ckpt_dir: Path, namespace: str) -> None:
    """Recommendations reading the same cached value reuse its decoded record (service/records.py `decoded`); a write
    by another replica, or by this one, gives the next read a new value and so a fresh decode."""
    s = Settings(checkpoint=str(ckpt_dir), namespace=namespace)
    ckpt = load(ckpt_dir)
    a = Engine(ckpt, RedisStore(REDIS_URL, cache=connected_cache(namespace)), s)
    b = Engine(ckpt, RedisStore(REDIS_URL), s)

    def read(engine: Engine) -> object:
        return engine.records.read(["u"], cached=True)[0]

    assert b.apply([[Event("u", "item-1")]])[0].applied == 1
    wait_for("a cached read", lambda: read(a) is read(a), 10)
    first = read(a)
    assert first.record.history() == [1]
    assert b.apply([[Event("u", "item-2")]])[0].applied == 1  # another replica writes
    wait_for("b's write reported", lambda: read(a) is not first, 10)
    assert read(a).record.history() == [1, 2] and read(a).record.applied == 2
    second = read(a)
    assert a.apply([[Event("u", "item-3")]])[0].applied == 1  # this replica writes
    wait_for("a's own write reported", lambda: read(a) is not second, 10)
    assert read(a).record.history() == [1, 2, 3]
