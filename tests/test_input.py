"""Untrusted input: requests (schemathesis over the OpenAPI schema, then explicit cases), corrupt state records
in Redis, and checkpoint directories holding more than they should. Against one live service (uvicorn
subprocess) on our own redis-server."""
from __future__ import annotations

import asyncio
import json
import math
import os
import pickle
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, settings

from bench.harness import ROOT, RedisServer, Service, wait_for
from model.checkpoint import CheckpointError, _sha256, _version, load
from service.app import create_app
from service.record import HEADER
from service.settings import Settings
from service.store import user_key

NS = "input"


class Live:
    def __init__(self, server: RedisServer, service: Service, log: Path) -> None:
        self.redis, self.service, self.url, self.log = server, service, service.url, log

    def metric(self, name: str, **labels: str) -> float:
        return self.service.metric(name, **labels)


@pytest.fixture(scope="module")
def live(ckpt_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("input")
    server = RedisServer(tmp / "redis")
    service = None
    try:
        service = Service(ckpt_dir, server.url, NS, log=tmp / "service.log", max_events=1000)
        yield Live(server, service, tmp / "service.log")
    finally:
        if service:
            service.stop()
        server.kill()


# --- schemathesis: generated requests from the app's own OpenAPI schema --------------------------------------
# The schema comes from the app object (no server needed at collection); the requests go to the live service.
schema = schemathesis.openapi.from_dict(create_app(Settings(checkpoint="unused")).openapi())


@schema.parametrize()
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_generated_requests_never_get_a_server_error(case, live: Live) -> None:
    response = case.call(base_url=live.url, timeout=30)
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400 and response.text != "Invalid HTTP request received.":  # uvicorn's, before the app
        assert "detail" in response.json()  # every refusal of the app's says why, in JSON


# --- explicit cases --------------------------------------------------------------------------------------------
def events(c: httpx.Client, *evs: dict) -> httpx.Response:
    return c.post("/events", json={"events": list(evs)})


def raw(c: httpx.Client, body: bytes, content_type: str | None = "application/json") -> httpx.Response:
    return c.post("/events", content=body, headers={"Content-Type": content_type} if content_type else {})


def refused(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    text = r.text.lower()
    for w in words:
        assert w.lower() in text, (w, r.text[:300])


def test_ids(live: Live) -> None:
    with httpx.Client(base_url=live.url, timeout=30) as c:
        for bad in ("a\x00b", "tab\there", "nl\n", "esc\x1b[31m", "del\x7f"):
            refused(events(c, {"user_id": bad, "item_id": "item-1"}), 422, "control characters")
            refused(c.get("/recommend/" + quote(bad)), 422, "control characters")
            refused(events(c, {"user_id": "u", "item_id": "item-1", "event_id": bad}), 422, "control characters")
        refused(events(c, {"user_id": "x" * 10_000, "item_id": "item-1"}), 422, "longer than 256")
        refused(c.get("/recommend/" + "x" * 10_000), 422, "longer than 256")
        refused(c.get("/users/" + "x" * 10_000), 422, "longer than 256")
        refused(events(c, {"user_id": "u", "item_id": "i" * 10_000}), 422, "at most 512")
        for field in ("user_id", "item_id", "event_id"):
            refused(events(c, {"user_id": "u", "item_id": "item-1", **{field: ""}}), 422, field, "at least 1")
        refused(c.post("/events", json={"events": []}), 422, "at least 1")
        refused(c.post("/events", json={}), 422, "events", "missing")
        for path in ("/recommend/", "/users/"):  # the rest of the path is the id ('/' included), here empty
            refused(c.get(path), 422, "user_id")
        # unicode ids work, end to end, and stay distinct
        for uid in ("ユーザー🙂", "Ωmega user", "عربي", "e\u0301", "é", "a{b}c", "{u:x}"):
            assert events(c, {"user_id": uid, "item_id": "item-3", "event_id": "e1"}).json()["applied"] == 1, uid
            assert c.get("/recommend/" + quote(uid, safe="")).json()["source"] == "state", uid
            meta = c.get("/users/" + quote(uid, safe="")).json()
            assert meta["user_id"] == uid and meta["events_applied"] == 1, uid
        refused(c.post("/events", content=b'{"events":[{"user_id":"\\ud800","item_id":"item-1"}]}',
                       headers={"Content-Type": "application/json"}), 422, "unicode")  # a lone surrogate


def test_timestamps(live: Live) -> None:
    with httpx.Client(base_url=live.url, timeout=30) as c:
        for ts in (b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1", b"1e300", b"1" + b"0" * 30, b"true", b'"1700000000"'):
            body = b'{"events":[{"user_id":"t","item_id":"item-1","timestamp":' + ts + b"}]}"
            r = raw(c, body)
            assert r.status_code == 422 and "timestamp" in r.text, (ts, r.status_code, r.text[:200])
        refused(raw(c, b'{"events":[{"user_id":"t","item_id":"item-1","timestamp":' + b"9" * 5000 + b"}]}"), 400, "number too long")
        for ts in (0, 1_700_000_000, 1_700_000_000_123, 1.7e9):
            assert events(c, {"user_id": "t", "item_id": "item-1", "timestamp": ts}).status_code == 200
        assert c.get("/users/t").json()["last_event_timestamp"] == 1.7e9
        assert events(c, {"user_id": "t", "item_id": "item-1", "timestamp": 1_700_000_000_123}).status_code == 200
        assert c.get("/users/t").json()["last_event_timestamp"] == 1_700_000_000.123  # milliseconds come back as seconds


def test_bodies(live: Live) -> None:
    with httpx.Client(base_url=live.url, timeout=60) as c:
        huge = {"events": [{"user_id": "b", "item_id": "item-1"}] * 100_000}
        refused(c.post("/events", json=huge), 413, "larger than")  # 2.6 MB, by Content-Length

        def chunks() -> Iterator[bytes]:  # no Content-Length: refused by counting
            yield b'{"events": ['
            for _ in range(100_000):
                yield b'{"user_id": "b", "item_id": "item-1"},'
            yield b'{"user_id": "b", "item_id": "item-1"}]}'

        refused(c.post("/events", content=chunks(), headers={"Content-Type": "application/json"}), 413, "larger than")
        refused(events(c, *[{"user_id": "b", "item_id": "item-1"}] * 1001), 422, "at most 1000")
        refused(raw(c, b"not json"), 422, "json")
        refused(raw(c, b"\xff\xfe\x00"), 400, "could not be parsed as json")
        refused(raw(c, b'{"events": "x"}'), 422, "list")
        refused(raw(c, b"[1, 2]"), 422, "dictionary")
        refused(raw(c, b'{"events": [{"user_id": "u", "item_id": "item-1", "extra": 1}]}'), 422, "extra")
        refused(raw(c, b'{"events":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400, "nesting too deep")
        refused(raw(c, b'{"events": [{"user_id": "u", "item_id": "item-1"}]}', "text/plain"), 415, "application/json")
        refused(raw(c, b'{"events": [{"user_id": "u", "item_id": "item-1"}]}', None), 415, "application/json")
        refused(raw(c, b"user_id=u&item_id=item-1", "application/x-www-form-urlencoded"), 415, "application/json")
        assert raw(c, b'{"events": [{"user_id": "u", "item_id": "item-1"}]}', "application/json; charset=utf-8").status_code == 200
        refused(c.get("/recommend/u", params={"k": "1e9"}), 422, "integer")
        # a body with a Content-Length takes the hot route (service/hot.py), a streamed one FastAPI's: the same answers
        for body in (b"not json", b"\xff\xfe\x00", b'{"events": "x"}', b'{"events": [{"user_id": "a\\u0000", "item_id": "item-1"}]}',
                     b'{"events": [{"user_id": "d", "item_id": "no-such-item"}]}', b'{"events": [{"user_id": "d", "item_id": "item-2"}]}'):
            hot, full = raw(c, body), c.post("/events", content=iter([body]), headers={"Content-Type": "application/json"})
            assert (hot.status_code, hot.json()) == (full.status_code, full.json()), body


def test_a_client_gone_before_its_body_is_a_499_not_a_server_error(live: Live, ckpt_dir: Path) -> None:
    """A client that closes the connection mid-body (a timeout, a crash) is not the server's error: the latency
    metric says 499 for it and nothing is counted as an internal error, on the hot route and on FastAPI's."""
    latency = "holorec_http_request_duration_seconds_count"
    with socket.create_connection(("127.0.0.1", live.service.port)) as sock:  # the hot route: a declared length
        sock.sendall(b"POST /events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"events\": [")
    wait_for("a 499 in the latency metric", lambda: live.metric(latency, route="/events", status="499") >= 1, 30)
    assert live.metric(latency, route="/events", status="500") == 0 and live.metric("holorec_errors_total", kind="internal") == 0

    from prometheus_client import REGISTRY  # FastAPI's route (what a root_path or a streamed body takes), in process

    app = create_app(Settings(checkpoint=str(ckpt_dir), redis_url=live.redis.url, namespace=NS))
    sent: list[dict] = []
    parts = [{"type": "http.request", "body": b'{"events": [', "more_body": True}, {"type": "http.disconnect"}]

    async def receive() -> dict:
        return parts.pop(0)

    async def send(msg: dict) -> None:
        sent.append(msg)

    async def go() -> None:
        async with app.router.lifespan_context(app):
            await app({"type": "http", "method": "POST", "path": "/events", "raw_path": b"/events", "root_path": "", "query_string": b"",
                       "headers": [(b"content-type", b"application/json"), (b"content-length", b"500")], "http_version": "1.1",
                       "scheme": "http", "server": ("t", 80), "client": ("t", 1)}, receive, send)

    internal = REGISTRY.get_sample_value("holorec_errors_total", {"kind": "internal"}) or 0
    asyncio.run(go())
    assert sent[0]["status"] == 499
    assert (REGISTRY.get_sample_value("holorec_errors_total", {"kind": "internal"}) or 0) == internal


# --- corrupt records in Redis ----------------------------------------------------------------------------------
def _flip(offset: int):  # type: ignore[no-untyped-def]
    def flip(b: bytes) -> bytes:
        o = offset % len(b)
        return b[:o] + bytes([b[o] ^ 0x10]) + b[o + 1 :]
    return flip


CORRUPTIONS = {
    "truncated_header": lambda b: b[:40],
    "truncated_body": lambda b: b[:-10],
    "format_99": lambda b: b[:4] + (99).to_bytes(2, "little") + b[6:],
    "flip_window": _flip(HEADER.size + 3),
    "flip_state": _flip(-3),
    "flip_applied_count": _flip(17),  # header fields are checksummed too
    "flip_revision": _flip(9),
    "garbage": lambda b: b"x",
    "zeros": lambda b: bytes(len(b)),  # revision 0 on a present key
    "revision_all_ones": lambda b: b[:8] + b"\xff" * 8 + b[16:],  # the next revision must wrap, not overflow into a 500
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_record_is_detected_counted_rebuilt_never_served(live: Live, name: str) -> None:
    corrupt, user = CORRUPTIONS[name], f"victim-{name}"
    key = user_key(NS, user)
    r = redis.Redis(port=live.redis.port)
    with httpx.Client(base_url=live.url, timeout=30) as c:
        assert events(c, *[{"user_id": user, "item_id": f"item-{i}"} for i in range(1, 8)]).json()["applied"] == 7
        r.set(key, corrupt(r.get(key)))
        before = live.metric("holorec_errors_total", kind="corrupt_record"), live.metric("holorec_state_rebuilds_total", reason="corrupt")
        rec = c.get(f"/recommend/{user}", params={"k": 5})
        assert rec.status_code == 200 and rec.json()["source"] == "popular"  # not served from the broken bytes
        after = live.metric("holorec_errors_total", kind="corrupt_record"), live.metric("holorec_state_rebuilds_total", reason="corrupt")
        assert after == (before[0] + 1, before[1] + 1)
        assert c.get(f"/users/{user}").json()["events_applied"] == 0  # rebuilt: a valid, empty record
        assert events(c, {"user_id": user, "item_id": "item-9"}).json()["applied"] == 1
        assert c.get(f"/recommend/{user}").json()["source"] == "state"
        # and a corrupt record met by an event write is rebuilt the same way
        r.set(key, corrupt(r.get(key)))
        assert events(c, {"user_id": user, "item_id": "item-2"}).json()["applied"] == 1
        assert c.get(f"/users/{user}").json()["events_applied"] == 1
    assert f"corrupt state record for user '{user}'" in live.log.read_text()


# --- checkpoints: never executed, tampering refused at start ----------------------------------------------------
class _Boom:
    """Unpickling this runs `touch MARKER`: proof of execution if the marker ever appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_files_are_never_unpickled(ckpt_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "EXECUTED"
    evil = tmp_path / "evil"
    shutil.copytree(ckpt_dir, evil)
    for name in ("model.pt", "model.pkl", "model.bin", "optimizer.pt"):
        (evil / name).write_bytes(pickle.dumps(_Boom(marker)))
    assert load(evil).version == load(ckpt_dir).version  # extra files are ignored
    # a pickle in place of the weights, with the JSON's hash and version made to match it: refused, not run
    (evil / "model.safetensors").write_bytes(pickle.dumps(_Boom(marker)))
    meta = json.loads((evil / "checkpoint.json").read_text())
    meta["weights_sha256"] = _sha256((evil / "model.safetensors").read_bytes())
    meta["version"] = _version(meta["weights_sha256"], {k: meta[k] for k in ("config", "items", "attributes", "item_attrs", "popular", "provenance")})
    (evil / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load(evil)
    assert not marker.exists()


def test_tampered_checkpoint_stops_the_service_with_one_clear_line(ckpt_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "tampered"
    shutil.copytree(ckpt_dir, bad)
    w = bytearray((bad / "model.safetensors").read_bytes())
    w[-7] ^= 0x01  # one bit of one weight
    (bad / "model.safetensors").write_bytes(bytes(w))
    env = {**os.environ, "HOLOREC_CHECKPOINT": str(bad), "HOLOREC_REDIS_URL": "redis://127.0.0.1:1/0"}
    commands = {3: [sys.executable, "-m", "uvicorn", "service.app:app_from_env", "--factory", "--port", "1"],
                2: [sys.executable, "-m", "cli", "serve", "--checkpoint", str(bad), "--port", "1"]}
    procs = {code: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for code, cmd in commands.items()}  # both at once: each spends its time importing torch
    for code, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert proc.returncode == code, out
        assert "sha256" in out and "does not match" in out and "tampered" in out, out
        assert "Traceback" not in out, out


def test_a_10_mb_body_gets_its_413_in_every_common_client(live: Live, tmp_path: Path) -> None:
    """The server reads and drops the refused body before answering, so no client sees a connection reset."""
    import urllib.error
    import urllib.request

    import requests

    body = b'{"events": [' + b'{"user_id": "b", "item_id": "item-1"},' * 270_000 + b"{}]}"  # ~10 MB
    assert len(body) > 10_000_000
    url, headers = f"{live.url}/events", {"Content-Type": "application/json"}

    def gen() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    statuses = {
        "httpx": httpx.post(url, content=body, headers=headers, timeout=60).status_code,
        "httpx chunked": httpx.post(url, content=gen(), headers=headers, timeout=60).status_code,
        "requests": requests.post(url, data=body, headers=headers, timeout=60).status_code,
        "requests chunked": requests.post(url, data=gen(), headers=headers, timeout=60).status_code,
    }
    try:
        urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=60)
    except urllib.error.HTTPError as e:
        statuses["urllib"] = e.code
    (tmp_path / "body.json").write_bytes(body)
    for shape, extra in (("curl", []), ("curl chunked", ["-H", "Transfer-Encoding: chunked"])):
        out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Content-Type: application/json", *extra,
                              "--data-binary", f"@{tmp_path / 'body.json'}", url], capture_output=True, text=True, timeout=60)
        statuses[shape] = int(out.stdout or 0)
    assert statuses == dict.fromkeys(statuses, 413) and len(statuses) == 7, statuses


def test_the_hand_written_recommendation_answer_is_what_json_dumps_writes() -> None:
    """GET /recommend's answer is written out by hand (service/api.py recommendation_json): byte for byte what the
    general encoder writes, for ids that need escaping and any float; a score that is not finite fails as there."""
    from service.api import json_bytes, recommendation_json

    items = [('say "hi"\\', 0.1), ("tab\there", -1e-12), ("ünï\u2028", 3.4028234663852886e38), ("\x01", 0.0), ("i", -7.5)]
    for user, rows in (("u/ß", items), ("bob", [])):
        expected = json_bytes({"user_id": user, "items": [{"item_id": i, "score": s} for i, s in rows], "model_version": "v\"1",
                               "source": "state"})
        assert recommendation_json(user, rows, 'v"1', "state") == expected
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError):
            recommendation_json("u", [("i", bad)], "v", "state")
        with pytest.raises(ValueError):
            json_bytes({"score": bad})
