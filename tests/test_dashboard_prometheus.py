"""Every panel query of the Grafana dashboard, run by a real Prometheus against a real service.

A service with two uvicorn workers (and a `holorec consume` process) is driven through every outcome the
dashboard plots — applied, duplicate and unknown events, state and popular recommendations, a model
change that rebuilds states, a 422, then Redis killed for 503s — while Prometheus scrapes them four times
a second. Then each panel's query, with the dashboard's variables substituted, must return series.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from bench.harness import ROOT, ConsumerProcess, RedisServer, Service, free_port, metric
from bench.ingest import produce

DASHBOARD = ROOT / "deploy/grafana/dashboards/holorec.json"
PROMETHEUS = shutil.which("prometheus")
SCRAPE_S = 0.25  # Prometheus's scrape and rule interval here: each pause below spans a few scrapes


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, expression) for every target of every panel, rows included, variables substituted."""
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            walk(p.get("panels", []))
            out.extend((p.get("title", ""), t["expr"]) for t in p.get("targets", []) if t.get("expr"))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return [(title, expr.replace("$__rate_interval", "30s").replace("$route", ".*")) for title, expr in out]


def start_prometheus(tmp: Path, targets: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cfg = tmp / "prometheus.yml"
    ms = int(SCRAPE_S * 1000)
    cfg.write_text(f"global: {{scrape_interval: {ms}ms, scrape_timeout: {ms}ms, evaluation_interval: {ms}ms}}\n"
                   f"scrape_configs:\n  - job_name: holorec\n    static_configs:\n      - targets: {json.dumps(targets)}\n")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=open(tmp / "prometheus.log", "w"))
    return proc, f"http://127.0.0.1:{port}"


def consumer_metric(port: int, name: str) -> float:
    """A counter's total over its labels on `holorec consume`'s /metrics; 0 while it is not serving yet."""
    try:
        return metric(f"http://127.0.0.1:{port}", name)
    except httpx.HTTPError:
        return 0.0


def query(url: str, expr: str) -> list[dict]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert r["status"] == "success", (expr, r)
    return r["data"]["result"]


@pytest.mark.skipif(PROMETHEUS is None, reason="LOUD SKIP: no prometheus binary (deploy/test-prereqs.sh installs Debian's "
                    "'prometheus' where it can): the dashboard's queries were NOT checked")
def test_every_dashboard_query_returns_series(ckpt_dir: Path, ckpt_b_dir: Path, tmp_path: Path) -> None:
    redis_server = RedisServer(tmp_path / "redis")
    services: list[Service] = []
    consumer, prom = None, None
    try:
        old = Service(ckpt_dir, redis_server.url, "dash")  # users written under another model: rebuilt on next touch
        services.append(old)
        httpx.post(f"{old.url}/events", json={"events": [{"user_id": f"old{i}", "item_id": "item-1"} for i in range(5)]})
        old.stop()
        svc = Service(ckpt_b_dir, redis_server.url, "dash", workers=2)
        services.append(svc)
        consumer_port = free_port()
        consumer = ConsumerProcess(ckpt_b_dir, redis_server.url, "dash", "events", "g", "c1", metrics_port=consumer_port)
        prom, prom_url = start_prometheus(tmp_path, [f"127.0.0.1:{svc.port}", f"127.0.0.1:{consumer_port}"])
        with httpx.Client(base_url=svc.url, timeout=30) as c:
            for rnd in range(6):  # traffic over several scrapes, so every rate() has two samples
                produce(redis_server.url, "events", [{"user_id": f"s{i}", "item_id": f"item-{1 + i}"} for i in range(10)]
                        + [{"user_id": "s0", "item_id": "no-such-item"}, {"item_id": "item-1"}])  # two dead letters
                events = [{"user_id": f"u{i}", "item_id": f"item-{1 + (i + rnd) % 30}", "event_id": f"e{rnd}-{i}"} for i in range(20)]
                assert c.post("/events", json={"events": events}).status_code == 200
                assert c.post("/events", json={"events": events[:3]}).json()["duplicate"] == 3
                assert c.post("/events", json={"events": [{"user_id": "u0", "item_id": "no-such-item"}]}).status_code == 200
                assert c.post("/events", json={"events": [{"user_id": f"old{rnd % 5}", "item_id": "item-2"}]}).status_code == 200
                for u in ("u1", "u2", f"nobody{rnd}"):
                    assert c.get(f"/recommend/{u}").status_code == 200
                assert c.post("/events", json={"events": []}).status_code == 422
                time.sleep(2 * SCRAPE_S)
            # the consumer (a process that loads torch and the model) may start slowly on a busy machine: wait
            # until it has taken every entry, so its counters exist and have been scraped, before Redis goes
            deadline = time.monotonic() + 120
            while consumer_metric(consumer_port, "holorec_stream_entries_total") < 6 * 12 and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(3 * SCRAPE_S)
            redis_server.kill()  # now the store is gone: 503s, counted as errors and 5xx
            for _ in range(3):
                for _ in range(3):
                    assert c.post("/events", json={"events": [{"user_id": "u1", "item_id": "item-3"}]}).status_code == 503
                time.sleep(2 * SCRAPE_S)
        queries = panel_queries()
        assert len(queries) >= 20
        deadline, empty = time.monotonic() + 30, queries
        while empty and time.monotonic() < deadline:  # Prometheus may be a scrape behind
            empty = [(t, e) for t, e in empty if not query(prom_url, e)]  # one answer with series shows the panel works
            time.sleep(SCRAPE_S)
        assert not empty, f"panel queries with no series: {empty}"
    finally:
        if prom:
            prom.terminate()
            prom.wait(10)
        if consumer:
            consumer.stop()
        for s in services:
            s.stop()
        redis_server.kill()
