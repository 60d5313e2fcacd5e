"""Client-side caching of records for GET /recommend (service/cache.py, HOLOREC_CLIENT_CACHE_ENTRIES): a repeated
read costs no Redis round trip, and a write by another replica between two reads is seen by the second."""
from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import redis

from bench.harness import Service, wait_for
from tests.conftest import REDIS_URL


def gets(r: redis.Redis) -> int:
    """GET commands this Redis has executed so far (INFO commandstats)."""
    return int(r.info("commandstats").get("cmdstat_get", {}).get("calls", 0))


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
