"""The service over real HTTP (uvicorn subprocess) against the real Redis, with a tiny trained model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import torch

from model.checkpoint import load
from service.record import decode
from service.store import user_key
from bench.harness import ROOT, Service, free_port, metrics, wait_for
from tests.conftest import REDIS_URL, tiny_sequences


def post(c: httpx.Client, events: list[dict]) -> httpx.Response:
    return c.post("/events", json={"events": events})


def expected_top(ckpt_dir: Path, history: list[int], k: int) -> tuple[list[str], list[float]]:
    """What the model's parallel forward over the same history recommends."""
    ckpt = load(ckpt_dir)
    with torch.no_grad():
        scores = ckpt.model.score(ckpt.model.user_vector(torch.tensor([history])))[0]
    scores[0] = float("-inf")
    top = torch.topk(scores, k)
    return [ckpt.items[i - 1] for i in top.indices.tolist()], top.values.tolist()


@pytest.fixture(scope="module")
def shared(ckpt_dir: Path) -> Iterator[tuple[Service, str]]:
    """One server for the tests that need no settings of their own (each uses its own user ids), and its namespace;
    the state stored as float32, so served scores can be compared with the model's forward within 1e-4."""
    ns = "t" + uuid.uuid4().hex[:12]
    srv = Service(ckpt_dir, REDIS_URL, ns, max_events=50, history_slots=2048, state_codec="float32")  # lossless: compared with forward
    yield srv, ns
    srv.stop()
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(f"holorec:{ns}:*", count=1000))
    if keys:
        r.delete(*keys)


def test_streamed_history_recommends_what_forward_does(ckpt_dir: Path, shared: tuple[Service, str]) -> None:
    srv, _ = shared
    history = tiny_sequences(1, length=30, seed=7)[0]
    with httpx.Client(base_url=srv.url) as c:
        for start in range(0, len(history), 7):  # several requests, as a stream would arrive
            r = post(c, [{"user_id": "alice", "item_id": f"item-{i}"} for i in history[start : start + 7]])
            assert r.status_code == 200 and r.json()["applied"] == len(history[start : start + 7])
        got = c.get("/recommend/alice", params={"k": 10, "exclude_seen": "false"}).json()
        seen_excluded = c.get("/recommend/alice", params={"k": 10}).json()
        meta = c.get("/users/alice").json()
    ids, scores = expected_top(ckpt_dir, history, 10)
    assert got["source"] == "state" and got["model_version"] == load(ckpt_dir).version
    assert [x["item_id"] for x in got["items"]] == ids
    assert np.allclose([x["score"] for x in got["items"]], scores, atol=1e-4)
    assert not {x["item_id"] for x in seen_excluded["items"]} & {f"item-{i}" for i in history}
    assert meta["events_applied"] == 30 and meta["current_model"] is True


def test_record_size_is_constant_in_history_length(shared: tuple[Service, str]) -> None:
    srv, namespace = shared
    r = redis.Redis.from_url(REDIS_URL)
    sizes = {}
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        post(c, [{"user_id": "short", "item_id": f"item-{1 + i % 40}"} for i in range(10)])
        for _ in range(40):  # 50 events a request: the shared server's HOLOREC_MAX_EVENTS
            assert post(c, [{"user_id": "long", "item_id": f"item-{1 + i % 40}"} for i in range(50)]).json()["applied"] == 50
        for u in ("short", "long"):
            sizes[u] = (r.strlen(user_key(namespace, u)), c.get(f"/users/{u}").json())
    assert sizes["short"][0] == sizes["long"][0] == sizes["short"][1]["state_bytes"]
    assert sizes["long"][1]["events_applied"] == 2000


def test_concurrent_writers_lose_nothing(ckpt_dir: Path, shared: tuple[Service, str]) -> None:
    """8 clients x 200 events for one user: exactly 1,600 applied, state = replay in applied order (the shared
    server's window of 2,048 holds the whole history)."""
    ckpt = load(ckpt_dir)
    srv, namespace = shared
    errors: list[str] = []

    def client(n: int) -> None:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for req in range(20):
                events = [{"user_id": "shared", "item_id": f"item-{1 + (n * 5 + j) % 40}", "event_id": f"c{n}-{req}-{j}"} for j in range(10)]
                r = post(c, events)
                if r.status_code != 200 or r.json()["applied"] != 10:
                    errors.append(f"{r.status_code} {r.text}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    blob = redis.Redis.from_url(REDIS_URL).get(user_key(namespace, "shared"))
    record = decode(blob, ckpt.version, ckpt.model.config.d_model)
    assert record.applied == 1600
    applied_order = record.history()
    assert len(applied_order) == 1600
    with torch.no_grad():
        vector, _ = ckpt.model.replay(applied_order)
    assert np.allclose(record.vector, vector.numpy(), atol=1e-4)


def test_bad_input_gets_the_documented_status(shared: tuple[Service, str]) -> None:
    srv, _ = shared  # HOLOREC_MAX_EVENTS=50
    with httpx.Client(base_url=srv.url) as c:
        unknown = post(c, [{"user_id": "u", "item_id": "no-such-item"}, {"user_id": "u", "item_id": "item-1"}])
        assert unknown.status_code == 200
        assert unknown.json() == {"applied": 1, "duplicate": 0, "unknown": 1, "unknown_items": ["no-such-item"]}
        missing = c.post("/events", json={"events": [{"item_id": "item-1"}]})
        assert missing.status_code == 422 and "user_id" in missing.text
        assert c.post("/events", content=b"not json", headers={"Content-Type": "application/json"}).status_code == 422
        assert c.post("/events", json={"events": []}).status_code == 422
        too_many = post(c, [{"user_id": "u", "item_id": "item-1"}] * 51)
        assert too_many.status_code == 422 and "at most 50" in too_many.text
        assert c.post("/events", content=b"{" + b" " * 2_000_000 + b"}", headers={"Content-Type": "application/json"}).status_code == 413
        assert post(c, [{"user_id": "bad\x01id", "item_id": "item-1"}]).status_code == 422
        assert post(c, [{"user_id": "x" * 300, "item_id": "item-1"}]).status_code == 422
        assert c.post("/events", content=b'{"events": [{"user_id": "u", "item_id": "item-1", "timestamp": NaN}]}',
                      headers={"Content-Type": "application/json"}).status_code == 422
        for k in (0, 1001, "ten"):
            assert c.get("/recommend/u", params={"k": k}).status_code == 422
        r = c.get("/recommend/u", params={"attribute": "no-such-genre"})  # named by its field, the input not echoed
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "attribute"] and "no-such-genre" not in r.text
        assert c.get("/users/nobody").status_code == 404


def test_duplicates_popularity_attributes_and_delete(ckpt_dir: Path, shared: tuple[Service, str]) -> None:
    srv, _ = shared
    ckpt = load(ckpt_dir)
    with httpx.Client(base_url=srv.url) as c:
        users = srv.metric("holorec_users_seen")  # users created minus deleted, counted in the store: other tests' too
        fresh = c.get("/recommend/newcomer", params={"k": 5}).json()
        assert fresh["source"] == "popular"
        assert [x["item_id"] for x in fresh["items"]] == [ckpt.items[i - 1] for i in ckpt.popular[:5]]
        first = post(c, [{"user_id": "d", "item_id": "item-1", "event_id": "e1"}, {"user_id": "d", "item_id": "item-2", "event_id": "e1"}])
        again = post(c, [{"user_id": "d", "item_id": "item-1", "event_id": "e1"}, {"user_id": "d", "item_id": "item-3", "event_id": "e2"}])
        assert (first.json()["applied"], first.json()["duplicate"]) == (1, 1)
        assert (again.json()["applied"], again.json()["duplicate"]) == (1, 1)
        assert c.get("/users/d").json()["events_applied"] == 2
        assert srv.metric("holorec_users_seen") == users + 1  # created once, however many events
        post(c, [{"user_id": "d2", "item_id": "item-4"}])
        assert srv.metric("holorec_users_seen") == users + 2
        genre = c.get("/recommend/d", params={"k": 20, "attribute": "genre-2", "exclude": "item-5,item-9"}).json()
        j = ckpt.attribute_index["genre-2"]
        allowed = {ckpt.items[i - 1] for i in range(1, 41) if j in ckpt.model.item_attrs[i].tolist()}
        got = {x["item_id"] for x in genre["items"]}
        assert got and got <= allowed - {"item-5", "item-9", "item-1", "item-3"}
        assert c.delete("/users/d").json()["deleted"] is True
        assert c.delete("/users/d").json()["deleted"] is False  # idempotent, counted once
        assert srv.metric("holorec_users_seen") == users + 1
        assert c.get("/users/d").status_code == 404
        assert c.get("/recommend/d").json()["source"] == "popular"


def test_user_ids_with_slashes_are_readable(shared: tuple[Service, str]) -> None:
    """Ids are any text: a user written as "tenant/42" is read back at /recommend/tenant/42 and /users/tenant%2F42
    alike, by the hot route and the framework's routes, and the metric keeps the route's template."""
    srv, _ = shared
    with httpx.Client(base_url=srv.url) as c:
        before = srv.metric("holorec_http_request_duration_seconds_count", route="/recommend/{user_id}", method="GET", status="200")
        assert post(c, [{"user_id": "tenant/42", "item_id": "item-1"}]).json()["applied"] == 1
        for path in ("/recommend/tenant/42", "/recommend/tenant%2F42"):
            r = c.get(path)
            assert r.status_code == 200 and r.json()["user_id"] == "tenant/42" and r.json()["source"] == "state"
        assert srv.metric("holorec_http_request_duration_seconds_count", route="/recommend/{user_id}", method="GET", status="200") == before + 2
        assert c.get("/users/tenant%2F42").json()["events_applied"] == 1
        assert c.delete("/users/tenant/42").json() == {"user_id": "tenant/42", "deleted": True}
        assert c.get("/users/tenant/42").status_code == 404


def test_a_request_before_the_model_is_loaded_gets_503(ckpt_dir: Path) -> None:
    """No lifespan has run (TestClient outside `with`): a hot route answers 503, Retry-After and an error kind."""
    from fastapi.testclient import TestClient
    from service.app import create_app
    from service.hot import HotRoutes
    from service.settings import Settings

    c = TestClient(HotRoutes(create_app(Settings(checkpoint=str(ckpt_dir), retry_after_s=7))))
    for r in (c.get("/recommend/u"), c.post("/events", json={"events": [{"user_id": "u", "item_id": "item-1"}]}), c.get("/users/u")):
        assert r.status_code == 503 and r.headers["Retry-After"] == "7" and r.json()["error"] == "not_ready"


def test_model_swap_rewarms_from_ring_buffer(ckpt_dir: Path, ckpt_b_dir: Path, server_factory) -> None:
    history = tiny_sequences(1, length=25, seed=3)[0]
    a = server_factory(ckpt_dir)
    with httpx.Client(base_url=a.url) as c:
        post(c, [{"user_id": "swap", "item_id": f"item-{i}"} for i in history])
    a.stop()
    b = server_factory(ckpt_b_dir)
    with httpx.Client(base_url=b.url) as c:
        before = c.get("/users/swap").json()
        got = c.get("/recommend/swap", params={"k": 10, "exclude_seen": "false"}).json()
        after = c.get("/users/swap").json()
    assert before["model_version"] == load(ckpt_dir).version and before["current_model"] is False
    assert got["source"] == "state" and got["model_version"] == load(ckpt_b_dir).version
    assert [x["item_id"] for x in got["items"]] == expected_top(ckpt_b_dir, history, 10)[0]
    assert after["current_model"] is True and after["events_applied"] == 25


def test_api_key_and_metrics(ckpt_dir: Path, server_factory) -> None:
    srv = server_factory(ckpt_dir, api_key="s3cret")
    with httpx.Client(base_url=srv.url) as c:
        assert c.get("/recommend/u").status_code == 401
        assert c.get("/recommend/u", headers={"X-API-Key": "wrong"}).status_code == 401
        ok = c.post("/events", json={"events": [{"user_id": "u", "item_id": "item-1"}]}, headers={"X-API-Key": "s3cret"})
        assert ok.status_code == 200
        assert c.get("/recommend/u", headers={"X-API-Key": "s3cret"}).json()["source"] == "state"
        assert c.get("/livez").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/docs").status_code == c.get("/openapi.json").status_code == 200
        assert c.get("/no-such-page").status_code == 404
    latency = "holorec_http_request_duration_seconds"
    first_bucket = (("le", "5e-05"), ("method", "POST"), ("route", "/events"), ("status", "200"))  # buckets start at 50 us
    assert (latency + "_bucket", first_bucket) in metrics(srv.url)
    for route, status in (("/docs", "200"), ("/openapi.json", "200"), ("unmatched", "404"), ("/recommend/{user_id}", "401"),
                          ("/recommend/{user_id}", "200"), ("/livez", "200")):  # the hot routes (service/hot.py) too
        assert srv.metric(latency + "_count", route=route, status=status) >= 1, route
    for name, labels in (("holorec_model_step_duration_seconds_count", {}), ("holorec_redis_duration_seconds_count", {}),
                         ("holorec_batch_size_count", {}), ("holorec_events_total", {"outcome": "applied"}),
                         ("holorec_recommendations_total", {"source": "state"})):
        assert srv.metric(name, **labels) >= 1, name
    assert srv.metric("holorec_model_info") == 1


def test_serve_prints_curl_lines_that_work_as_printed(ckpt_dir: Path):
    """`holorec serve` (embedded store) prints a URL and two curl lines; run them verbatim through a shell."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOLOREC_")} | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--checkpoint", str(ckpt_dir), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        printed = [proc.stdout.readline() for _ in range(3)]
        assert f"http://127.0.0.1:{port}/docs" in printed[0]
        curls = [line.split("try:", 1)[-1].strip() for line in printed[1:]]
        assert all(c.startswith("curl ") for c in curls), printed
        wait_for("the service", lambda: proc.poll() is None and httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200, 60)
        posted = json.loads(subprocess.run(["bash", "-c", curls[0]], capture_output=True, text=True, check=True).stdout)
        assert posted["applied"] == 2 and not posted["unknown_items"], posted
        rec = json.loads(subprocess.run(["bash", "-c", curls[1]], capture_output=True, text=True, check=True).stdout)
        assert rec["source"] == "state" and len(rec["items"]) == 5, rec
    finally:
        proc.terminate()
        proc.wait(10)
    rest = proc.stdout.read()
    assert "HTTP/1.1" not in rest, rest  # no access log by default (HOLOREC_ACCESS_LOG): /metrics counts the requests


def test_startup_moves_long_lived_objects_out_of_the_collectors_reach(ckpt_dir: Path) -> None:
    """After startup the objects that live as long as the process (torch, the model, FastAPI's schemas) are frozen:
    a full garbage collection that walked them all stalled every request for over 100 ms under load. In a fresh
    interpreter, so this test process is not frozen itself."""
    code = ("import gc\n"
            "from fastapi.testclient import TestClient\n"
            "from service.app import create_app\n"
            "from service.settings import Settings\n"
            "before = gc.get_freeze_count()\n"
            f"with TestClient(create_app(Settings(checkpoint={str(ckpt_dir)!r}))) as c:\n"
            "    assert c.get('/readyz').status_code == 200\n"
            "    print(before, gc.get_freeze_count())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = map(int, out.stdout.split()[-2:])
    assert before == 0 and after > 100_000
