"""Faults against real processes: our own redis-server binaries on loopback ports, the service under uvicorn.

Redis killed and restarted under load, Redis frozen, several service processes on one Redis, a Redis
that evicts or refuses writes when full. The scenarios live in bench/faults.py (`holorec bench faults`
runs them longer); here they run short and their figures are asserted.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.faults import concurrency, outage
from bench.harness import RedisServer, Service, make_checkpoint
from model.checkpoint import load

TIMEOUT_S = 0.5  # HOLOREC_STORE_TIMEOUT_S for these services


@pytest.fixture(scope="module")
def bench_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untrained; the ring buffer is the services' history_slots, which concurrency() sets to hold every event."""
    return make_checkpoint(tmp_path_factory.mktemp("faults") / "ckpt")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    try:
        yield server
    finally:
        server.kill()


def test_redis_killed_and_frozen_under_load(bench_ckpt: Path, tmp_path: Path) -> None:
    """SIGKILL + restart on the AOF, then SIGSTOP: 503 + Retry-After while down, /readyz follows, the
    service reconnects by itself, and clients retrying with their event ids get each event applied once."""
    r = outage(tmp_path, bench_ckpt, n_users=10, n_clients=4, steady_s=1.5, down_s=1.5, freeze_s=1.5,
               timeout_s=TIMEOUT_S, log=tmp_path / "service.log")
    assert set(r["responses"]) <= {"200", "503"}, r["responses"]  # never a 500, never a dropped connection
    assert r["responses"].get("503", 0) > 0, "the outage was not seen at all"
    assert r["503_without_retry_after_or_json"] == 0
    assert r["readyz_503_while_down"] and r["readyz_503_while_frozen"] and r["readyz_at_end"] == 200
    assert r["events_unacknowledged"] == 0 and r["events_acknowledged"] == r["events_sent"]
    assert r["events_applied_twice"] == 0
    assert r["events_lost"] <= r["acked_in_fsync_window_before_kill"]  # only what everysec allows
    assert r["events_applied"] == r["events_acknowledged"] - r["events_lost"]
    # a frozen Redis costs a request one timed-out round trip: those queued behind it fail fast
    assert r["max_request_latency_s"] < TIMEOUT_S + 0.75, r


def test_four_processes_sixteen_clients_one_redis(bench_ckpt: Path, redis_server: RedisServer, tmp_path: Path) -> None:
    """2 replicas x 2 uvicorn workers, 16 clients on 10 users: per user applied == acknowledged, and the ring
    buffer holds exactly the acknowledged items (no lost update, no double application)."""
    r = concurrency(redis_server.url, redis_server.client(), bench_ckpt, replicas=2, workers=2, n_clients=16,
                    n_users=10, requests=20, log_dir=tmp_path)
    assert set(r["responses"]) <= {"200", "503"}, r["responses"]
    assert r["events_acknowledged"] == r["events_sent"] == r["events_applied"] > 0
    assert r["users_with_applied_ne_acknowledged"] == 0 and r["users_with_history_mismatch"] == 0, r["per_user"]
    assert r["cas_conflicts_retried"] > 0  # the processes really did race for the same records


def test_eviction_and_a_full_redis(ckpt_dir: Path, ckpt_b_dir: Path, tmp_path: Path) -> None:
    """maxmemory + allkeys-lru: evicted users fall back to popularity and rebuild from new events; an evicted
    vocabulary leaves the next model with popularity, not a blank state; noeviction gives 503, not 500."""
    server = RedisServer(tmp_path / "redis")
    services: list[Service] = []
    try:
        rc = server.client()
        rc.config_set("maxmemory", rc.info("memory")["used_memory"] + 600_000)  # room for ~80 records of 7 kB
        rc.config_set("maxmemory-policy", "allkeys-lru")
        a = Service(ckpt_dir, server.url, "ev", store_timeout_s=TIMEOUT_S, log=tmp_path / "a.log")
        services.append(a)
        users = [f"user-{i}" for i in range(200)]
        with httpx.Client(base_url=a.url, timeout=30) as c:
            for i in range(0, len(users), 20):
                events = [{"user_id": u, "item_id": f"item-{1 + j % 40}", "event_id": f"{u}-{j}"} for u in users[i : i + 20] for j in range(3)]
                r = c.post("/events", json={"events": events})
                assert r.status_code == 200, r.text
            assert rc.info("stats")["evicted_keys"] > 0
            gone = [u for u in users if c.get(f"/users/{u}").status_code == 404]
            kept = [u for u in users if u not in gone]
            assert gone and kept
            for u in gone[:5]:
                rec = c.get(f"/recommend/{u}", params={"k": 5})
                assert rec.status_code == 200 and rec.json()["source"] == "popular"
                assert c.post("/events", json={"events": [{"user_id": u, "item_id": "item-7"}]}).json()["applied"] == 1
                assert c.get(f"/recommend/{u}").json()["source"] == "state"
                assert c.get(f"/users/{u}").json()["events_applied"] == 1  # rebuilt from the new event only
            assert c.get("/readyz").status_code == 200

        # the vocabulary key is one LRU victim like any other: the next model must cope without it
        a.stop()
        version_a = load(ckpt_dir).version
        rc.delete(f"holorec:ev:vocab:{version_a}")
        survivor = next(u for u in kept if rc.exists(f"holorec:ev:{{u:{u}}}"))
        b = Service(ckpt_b_dir, server.url, "ev", store_timeout_s=TIMEOUT_S, log=tmp_path / "b.log")
        services.append(b)
        with httpx.Client(base_url=b.url, timeout=30) as c:
            rec = c.get(f"/recommend/{survivor}", params={"k": 5})
            assert rec.status_code == 200 and rec.json()["source"] == "popular"  # not a blank "state"
            assert c.post("/events", json={"events": [{"user_id": survivor, "item_id": "item-3"}]}).json()["applied"] == 1
            assert c.get(f"/recommend/{survivor}").json()["source"] == "state"
            assert c.get(f"/users/{survivor}").json()["current_model"] is True

            # noeviction: a full Redis refuses writes (OOM); the service answers 503 + Retry-After
            rc.config_set("maxmemory-policy", "noeviction")
            statuses = []
            for i in range(100):
                r = c.post("/events", json={"events": [{"user_id": f"new-{i}-{j}", "item_id": "item-1"} for j in range(20)]})
                statuses.append(r.status_code)
                if r.status_code == 503:
                    assert r.headers["Retry-After"] and r.json()["error"] == "store_unavailable"
                    break
            assert set(statuses) <= {200, 503} and statuses[-1] == 503, statuses
            assert c.get(f"/recommend/{survivor}").status_code == 200  # reads still work
    finally:
        for s in services:
            s.stop()
        server.kill()


def test_store_connections_survive_a_restart_and_a_timeout(redis_server: RedisServer) -> None:
    """The hot path's commands run on each thread's own connection (RedisStore._command): a Redis restart costs at most
    one refused write and no read; a timed-out command's late reply is never read as the next command's."""
    import signal
    import threading
    import time

    from service.store import RedisStore, StoreUnavailable

    store = RedisStore(redis_server.url, timeout_s=TIMEOUT_S)
    assert store.cas_many([("k", 0, b"\x00" * 24 + b"one")], None) == [True]
    conns: list[object] = []
    t = threading.Thread(target=lambda: conns.append((store.get_many(["k"]), store.conns.conn)))
    t.start()
    t.join()
    assert conns[0][0] == [b"\x00" * 24 + b"one"] and conns[0][1] is not store.conns.conn  # one connection per thread

    redis_server.kill()
    redis_server.start()
    assert store.get_many(["k"]) == [None]  # the dead connection is retried at once for a read (no AOF here: empty)
    refused = 0
    for _ in range(2):
        try:
            assert store.cas_many([("k", 0, b"\x00" * 24 + b"two")], None) == [True]
            break
        except StoreUnavailable:
            refused += 1
    assert refused <= 1

    redis_server.signal(signal.SIGSTOP)  # frozen: the write times out, its reply comes later
    try:
        with pytest.raises(StoreUnavailable):
            store.cas_many([("k", 0, b"\x00" * 24 + b"three")], None)
    finally:
        redis_server.signal(signal.SIGCONT)
    time.sleep(store.cooldown_s + 0.05)
    got = store.get_many(["k"])  # the frozen write may still have landed; its late reply ([1]) must not be this answer
    assert got in ([b"\x00" * 24 + b"two"], [b"\x00" * 24 + b"three"]), got
