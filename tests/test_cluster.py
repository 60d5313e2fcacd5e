"""The Redis store on a real 3-master Redis Cluster (redis-server --cluster-enabled yes on loopback ports)."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.cluster import key_slot

from bench.faults import concurrency
from bench.harness import RedisClusterServers, Service, make_checkpoint
from service.store import RedisStore, user_count_key, user_key


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    c = RedisClusterServers(tmp_path_factory.mktemp("cluster"), masters=3)
    try:
        yield c
    finally:
        c.stop()


def test_store_on_cluster_spreads_users_and_keeps_each_in_one_slot(cluster: RedisClusterServers) -> None:
    store = RedisStore(cluster.url, cluster=True, timeout_s=2)
    keys = [user_key("cl", f"user-{i}") for i in range(30)] + [user_key("cl", "ünïcødé {x}")]
    assert store.cas_many([(k, 0, b"HREC" + bytes(4) + (1).to_bytes(8, "little") + b"v1") for k in keys], None) == [True] * len(keys)
    assert store.get_many(keys) == [b"HREC" + bytes(4) + (1).to_bytes(8, "little") + b"v1"] * len(keys)  # no cross-slot MGET
    assert store.cas_many([(keys[0], 0, b"x" * 16), (keys[1], 1, b"HREC" + bytes(4) + (2).to_bytes(8, "little"))], None) == [False, True]
    new, counter = [user_key("cl", "new-1"), user_key("cl", "new-2")], user_count_key("cl")  # the counter: another slot, so an INCRBY
    writes = [(new[0], 0, b"HREC" + bytes(4) + (1).to_bytes(8, "little")), (new[1], 0, b"HREC" + bytes(4) + (1).to_bytes(8, "little")),
              (keys[2], 1, b"HREC" + bytes(4) + (2).to_bytes(8, "little"))]
    assert store.cas_many(writes, None, users_key=counter) == [True, True, True] and int(store.get(counter)) == 2  # two created
    assert store.cas_many([(new[0], 1, b"HREC" + bytes(4) + (2).to_bytes(8, "little"))], None, users_key=counter) == [True]
    assert int(store.get(counter)) == 2
    assert key_slot(keys[0].encode()) == key_slot(b"{u:user-0}")  # the hash tag decides the slot
    owners = {cluster.client().get_node_from_key(k).port for k in keys}
    assert len(owners) == 3  # 31 users land on every master
    assert store.get("holorec:cl:vocab:x") is None and store.ping()
    for k in [*keys, *new, counter]:
        store.delete(k)


def test_sixteen_clients_four_processes_on_a_cluster(cluster: RedisClusterServers, tmp_path: Path) -> None:
    """The concurrency test of tests/test_faults.py, with HOLOREC_REDIS_CLUSTER=true."""
    ckpt = make_checkpoint(tmp_path / "ckpt", max_len=512)
    r = concurrency(cluster.url, cluster.client(), ckpt, cluster=True, replicas=2, workers=2, n_clients=16,
                    n_users=10, requests=20, namespace="clconc", log_dir=tmp_path)
    assert set(r["responses"]) <= {"200", "503"}, r["responses"]
    assert r["events_acknowledged"] == r["events_sent"] == r["events_applied"] > 0
    assert r["users_with_applied_ne_acknowledged"] == 0 and r["users_with_history_mismatch"] == 0, r["per_user"]
    assert r["cas_conflicts_retried"] > 0  # the processes really did race for the same records


def test_service_starts_while_cluster_is_unreachable(tmp_path: Path) -> None:
    """The cluster client is made on first use: no cluster yet means 503 + /readyz 503, not a crash at start."""
    ckpt = make_checkpoint(tmp_path / "ckpt", max_len=64)
    svc = Service(ckpt, "redis://127.0.0.1:1/0", "nocl", wait=False, redis_cluster=True, store_timeout_s=0.5,
                  log=tmp_path / "svc.log")
    try:
        with httpx.Client(base_url=svc.url, timeout=10) as c:
            for _ in range(1200):  # up to 120 s for the import and, on a clean checkout, the first ONNX export
                try:
                    ready = c.get("/readyz")
                    break
                except httpx.HTTPError:
                    assert svc.proc.poll() is None, (tmp_path / "svc.log").read_text()
                    time.sleep(0.1)
            else:
                pytest.fail("the service did not answer /readyz within 120 s: " + (tmp_path / "svc.log").read_text())
            assert ready.status_code == 503 and ready.headers["Retry-After"]
            r = c.post("/events", json={"events": [{"user_id": "u", "item_id": "item-1"}]})
            assert r.status_code == 503 and r.json()["error"] == "store_unavailable"
    finally:
        svc.stop()
