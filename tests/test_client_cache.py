"""Client-side caching of records (service/cache.py, HOLOREC_CLIENT_CACHE_ENTRIES): a repeated read costs no Redis
round trip, a write by another replica between two reads is seen by the second, and what this process wrote serves
its next event and recommendation for that user without a read."""
from __future__ import annotations

import time
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
def test_two_replicas_a_write_between_two_reads_is_seen(ckpt_dir: Path, namespace: str, entries: int) -> None:
    r = redis.Redis.from_url(REDIS_URL)
    a = Service(ckpt_dir, REDIS_URL, namespace, client_cache_entries=entries, wait=False)
    b = Service(ckpt_dir, REDIS_URL, namespace, client_cache_entries=entries)
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


def test_own_writes_are_kept_and_any_other_write_drops_them(namespace: str) -> None:
    """The cache's own-write bookkeeping against a real Redis: our compare-and-set's value serves the next event's
    read (never a recommendation's), a write by anyone else drops it, and so do two that land while ours is in flight."""
    r = redis.Redis.from_url(REDIS_URL)
    cache = RecordCache(REDIS_URL, user_key_prefix(namespace), 100, 1.0)
    store = RedisStore(REDIS_URL, cache=cache)
    wait_for("the reporting connection", lambda: cache.get_many([], lambda ks: []) == [] and cache.conn is not None, 10)
    k = user_key(namespace, "u")
    fetched: list[str] = []

    def read(ours: bool = True) -> bytes | None:
        return cache.get_many([k], lambda ks: fetched.extend(ks) or [r.get(x) for x in ks], ours)[0]

    def value(rev: int, body: bytes) -> bytes:
        return b"HREC" + bytes(4) + rev.to_bytes(8, "little") + body

    assert store.cas_many([(k, 0, value(1, b"ours"))], None, cached=True) == [True]
    time.sleep(0.05)  # our own write's report has arrived: not an invalidation of what we wrote
    assert read() == value(1, b"ours") and fetched == []
    assert store.cas_many([(k, 1, value(2, b"ours again"))], None, cached=True) == [True]
    time.sleep(0.05)
    assert read() == value(2, b"ours again") and fetched == []
    assert read(ours=False) == value(2, b"ours again") and fetched == [k]  # a recommendation never reads our own writes
    r.set(k, value(3, b"theirs"))  # another replica's write: the next read goes to Redis
    time.sleep(0.05)
    assert read() == value(3, b"theirs") and fetched == [k, k]
    assert store.cas_many([(k, 2, value(3, b"stale"))], None, cached=True) == [False]  # a lost compare-and-set keeps nothing
    assert read() == value(3, b"theirs") and fetched == [k, k, k]
    started = cache.writing([k])  # two writes by others land while ours is in flight: ours is not trusted
    r.set(k, value(4, b"theirs too"))
    time.sleep(0.05)
    r.set(k, value(5, b"theirs, again"))
    time.sleep(0.05)
    cache.written(started, [(k, value(4, b"ours, maybe"))], [True])
    assert read() == value(5, b"theirs, again") and fetched == [k] * 4
    assert store.cas_many([(k, 5, value(6, b"ours"))], None, cached=True) == [True]
    time.sleep(0.05)
    r.set(k, value(7, b"theirs"))  # our report and theirs have both arrived: ours is dropped
    time.sleep(0.05)
    assert read() == value(7, b"theirs") and fetched == [k] * 5


def test_replicas_taking_turns_on_one_user_lose_no_event_and_read_no_more(ckpt_dir: Path, namespace: str) -> None:
    """Events for one user alternate between two replicas: each replica's cached copy of its own last write is
    stale by then, the compare-and-set says so, and the retry reads Redis: every event counts once. On one replica,
    each event after its own last write reads nothing from Redis."""
    r = redis.Redis.from_url(REDIS_URL)
    a = Service(ckpt_dir, REDIS_URL, namespace, wait=False)
    b = Service(ckpt_dir, REDIS_URL, namespace)
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
            applied = ca.get("/users/w").json()["events_applied"]
            for n in range(12):
                client = (ca, cb)[n % 2]
                assert client.post("/events", json={"events": [{"user_id": "v", "item_id": f"item-{1 + n % 40}"}]}).json()["applied"] == 1
            assert ca.get("/users/v").json()["events_applied"] == 12 and cb.get("/users/w").json()["events_applied"] == applied
            assert ca.get("/recommend/v").json() == cb.get("/recommend/v").json()
    finally:
        a.stop()
        b.stop()


def test_a_stale_guess_costs_a_retry_not_an_event(ckpt_dir: Path, namespace: str) -> None:
    """An event whose guess (this replica's own last write) is out of date because another replica's write has not
    been reported yet: the compare-and-set fails, the retry reads Redis, and the event lands on the newer record."""
    s = Settings(checkpoint=str(ckpt_dir), namespace=namespace)
    ckpt = load(ckpt_dir)
    a_cache = RecordCache(REDIS_URL, user_key_prefix(namespace), 100, 1.0)
    a = Engine(ckpt, RedisStore(REDIS_URL, cache=a_cache), s)
    b = Engine(ckpt, RedisStore(REDIS_URL), s)
    wait_for("the reporting connection", lambda: a_cache.get_many([], lambda ks: []) == [] and a_cache.conn is not None, 10)
    k = user_key(namespace, "u")

    def event(engine: Engine, item: str) -> int:
        return engine.apply([[Event("u", item)]])[0].applied

    assert event(a, "item-1") == 1
    guess = a_cache.ours[k]
    assert event(b, "item-2") == 1
    time.sleep(0.05)  # b's report has arrived and dropped a's guess; put it back as if the report were still on its way
    with a_cache.lock:
        a_cache._drain()
        a_cache.ours[k], a_cache.skip[k] = guess, 0
    conflicts = CAS_CONFLICTS._value.get()
    assert event(a, "item-3") == 1
    assert CAS_CONFLICTS._value.get() == conflicts + 1  # the guess lost its compare-and-set once
    assert a.user_meta("u")["events_applied"] == 3 and b.user_meta("u")["events_applied"] == 3
