"""`holorec bench serve --quick` end to end: real uvicorn + Redis, the load generator, every section.

A smoke test of the benchmark's plumbing: it checks the result has every figure and that the
figures are sane (positive, no errors, constant record size), never that a timing target is met.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import redis

from bench.harness import Service, make_checkpoint, on_cpus, split_cpus
from tests.conftest import REDIS_URL


def test_quick_serve_benchmark_reports_every_section(tmp_path: Path) -> None:
    from bench.serve import run

    before = os.sched_getaffinity(0)
    res = run(argparse.Namespace(out=str(tmp_path), quick=True, redis_url=REDIS_URL, epochs=1))
    assert json.loads((tmp_path / "serve.json").read_text())["quick"] is True
    md = (tmp_path / "serve.md").read_text()
    assert "holorec bench serve --quick" in md and "## 5." in md
    assert res["load_avg"]["start"] and res["hardware"]["cpu"] in md

    o1 = res["o1"]
    assert o1["record_bytes_constant"]
    for lvl, v in o1["levels"].items():
        assert v["errors"] == 0 and v["p50_ms"] > 0 and v["p99_ms"] >= v["p50_ms"] and v["record_bytes"] > 0
        assert v["events_applied"] >= int(lvl)

    for v in res["replay"]["max_len"].values():
        assert v["stored_state_ms"] > 0 and v["holomamba_top10_overlap"] >= 0.8 and v["redis_get_ms"] > 0  # what replay would serve
        for m in res["replay"]["models"]:
            assert v[f"naive_{m}_ms"] > 0

    for run_ in res["load"]["runs"].values():
        for case in ("livez_c1", "event_c1", "livez", "event", "batch100", "recommend"):
            assert run_[case]["errors"] == 0 and run_[case]["requests"] > 0
            assert 0 < run_[case]["p50_ms"] <= run_[case]["p95_ms"] <= run_[case]["p99_ms"]
        bd = run_["event_c1"]["breakdown"]  # from the service's own histograms: one GET, one CAS, one step per event
        assert bd["server_count"] == bd["redis_cas_count"] == bd["model_step_count"] == run_["event_c1"]["requests"]
        assert 0 < bd["model_step_ms"] < bd["server_ms"] and bd["redis_get_ms"] > 0  # (client vs server: two clocks' means, not compared)
    assert set(res["cpu"]) == {"floor", "o1", "replay", "load", "catalogue", "codec", "profile"} and "steal_pct" in res["cpu"]["load"]
    fl = res["floor"]  # the black-box check: every request answered, the floor and the service side by side
    assert fl["record_bytes"] > 0 and set(fl["p50_ms"]) == {"livez", "event", "first_event", "recommend", "recommend_again", "redis_get", "redis_set"}
    assert fl["p50_ms"]["event"] > fl["p50_ms"]["livez"] and "## 0. What the service adds" in md
    placement = split_cpus()  # the service and the client each on a CPU of their own, where there are two
    assert fl["cpus"] == ({"service": sorted(placement[0]), "client": sorted(placement[1])} if placement else None)
    assert os.sched_getaffinity(0) == before  # the client's CPU given back
    for case in ("recommend", "event"):  # the section ran; a sampler on a shared machine may catch nothing, and then says why
        prof = res["profile"]["cases"][case]
        if prof.get("absent"):
            assert f"Not measured, {case}: {prof['absent']}" in md
        else:
            assert prof["samples"] > 0 and abs(sum(prof["parts"].values()) - 1) < 1e-9 and prof["top_functions"]

    for v in res["catalogue"]["sizes"].values():
        assert v["c1"]["errors"] == v["c32"]["errors"] == {} and v["c1"]["p50_ms"] > 0 and v["c32"]["requests"] > 0

    codecs = res["codec"]["codecs"]
    assert set(codecs) == {"float32", "float16", "int8", "int8-rows"}
    assert codecs["float32"]["state_bytes"] == 2 * codecs["float16"]["state_bytes"] > codecs["int8"]["state_bytes"]
    assert codecs["float32"]["ndcg10_change"] == 0.0  # float32 packing is lossless
    assert all(math.isfinite(v["ndcg10"]) for v in codecs.values())

    assert not list(redis.Redis.from_url(REDIS_URL).scan_iter(f"holorec:{res['namespace']}*", count=1000))  # cleaned up


def test_wakeup_bench_times_the_step_after_each_wait_and_leaves_no_busy_loop(tmp_path: Path) -> None:
    """`python -m bench.wakeup`: a few rounds, every case timed (the service's events too), the busy loops it starts
    gone when it returns."""
    from bench.wakeup import run

    res = run(5, REDIS_URL, repeats=1)
    assert set(res["step_after_us"]) == set(res["before_us"]) and len(res["step_after_us"]) == 5
    assert all(v > 0 for v in [*res["step_after_us"].values(), *res["before_us"].values(), *res["ping_us"].values()])
    assert len(res["ping_us"]) == 2
    assert len(res["parts_us"]) == 7 and all(v > 0 for v in res["parts_us"].values())
    assert res["parts_sum_us"] == sum(res["parts_us"].values())
    for cond in ("idle", "awake"):  # one event at c=1 through the service, with the service's own breakdown
        e = res["event_c1"][cond]
        assert e["p50_ms"] > 0 and e["client_mean_ms"] > 0 and e["model_step_ms"] > 0 and e["redis_cas_ms"] > 0 and "app_own_ms" in e
    busy = subprocess.run(["pgrep", "-f", "^" + sys.executable + " -c while True: pass"], capture_output=True)
    assert busy.returncode == 1, busy.stdout  # pgrep: nothing matched


def test_a_pinned_service_runs_on_its_cpus_and_a_pinned_client_gets_its_own_back(tmp_path: Path) -> None:
    """harness.Service(cpus=...) and on_cpus: what the floor section and bench/ab_floor.py pin."""
    cpus = sorted(os.sched_getaffinity(0))
    before = set(cpus)
    with Service(make_checkpoint(tmp_path / "ck"), REDIS_URL, "pinned-" + os.urandom(4).hex(), cpus={cpus[-1]}) as srv:
        assert os.sched_getaffinity(srv.proc.pid) == {cpus[-1]}
    with on_cpus({cpus[0]}):
        assert os.sched_getaffinity(0) == {cpus[0]}
    assert os.sched_getaffinity(0) == before
