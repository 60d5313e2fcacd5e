"""The markdown report of `holorec bench serve` (bench/serve.py): OUT/serve.md from the result JSON."""
from __future__ import annotations

import math
from typing import Any


def _f(x: Any, nd: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{nd}f}"


def markdown(res: dict[str, Any]) -> str:
    hw = res["hardware"]
    lines = [f"# holorec serving benchmark{' (--quick: smoke test, not figures)' if res['quick'] else ''}", "",
             f"Command: `{res['command']}` (from the repository root, Redis at 127.0.0.1:6379). "
             f"Machine: {hw['cpu']}, {hw['cores']} cores, Python {hw['python']}, torch {hw['torch']}; "
             f"shared with other jobs: load average (1/5/15 min) {res['load_avg']}; CPU busy and stolen by the hypervisor, % of all CPU time "
             f"per section: {res['cpu']}. Started {res['started']}, took {res['seconds']:.0f} s.",
             "Service: uvicorn subprocess(es), Redis, random-weight HoloMambaRec (d_model 64, 2 layers, max_len 200, 3,706 items, "
             "18 genres) unless said otherwise; load from a separate asyncio process over loopback keep-alive connections.", ""]
    if "floor" in res:
        fl = res["floor"]
        p = fl["p50_ms"]
        lines += ["## 0. What the service adds to the floor (concurrency 1, one keep-alive connection, 1 worker)", "",
                  f"{fl['requests_each']} rounds, each: GET /livez, POST /events (1 event), the same for a user with no record yet (a first "
                  "event: the GET finds none and the write creates the record), GET /recommend (3,706 items, top 10) twice "
                  "(the second with no write between: served from the client-side cache, its record not decoded again), and a bare "
                  f"Redis GET and SET of a {fl['record_bytes']:,}-byte value (the size of a stored record), from one client (HTTP: "
                  "requests encoded before the clock starts, answers read by Content-Length over one keep-alive socket); medians in ms. "
                  + (f"The service ran on CPU {fl['cpus']['service']} and the client on CPU {fl['cpus']['client']} (apart, as a client on "
                     "another machine; left to the scheduler, whether they share a CPU moves these figures from run to run)."
                     if fl.get("cpus") else "The service and the client ran wherever the scheduler put them."), "",
                  "| GET /livez | POST /events | first event | GET /recommend | again | Redis GET | Redis SET | event adds (event - livez - GET - SET) "
                  "| first event adds | recommendation adds (recommend - livez - GET) | repeat adds (again - livez) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {_f(p['livez'], 3)} | {_f(p['event'], 3)} | {_f(p['first_event'], 3)} | {_f(p['recommend'], 3)} | {_f(p['recommend_again'], 3)} "
                  f"| {_f(p['redis_get'], 3)} | {_f(p['redis_set'], 3)} | **{_f(fl['event_adds_ms'], 3)}** | **{_f(fl['first_event_adds_ms'], 3)}** "
                  f"| **{_f(fl['recommend_adds_ms'], 3)}** | **{_f(fl['repeat_recommend_adds_ms'], 3)}** |", ""]
    if "o1" in res:
        o = res["o1"]
        lines += ["## 1. One more event costs the same whatever the history (POST /events, 1 event, concurrency 1)", "",
                  "| events already applied | p50 ms | p99 ms | stored record bytes | requests |", "|---:|---:|---:|---:|---:|"]
        for lvl, v in o["levels"].items():
            lines.append(f"| {int(lvl):,} ({v['events_applied']:,} at the end) | {_f(v['p50_ms'])} | {_f(v['p99_ms'])} | {v['record_bytes']:,} | {v['requests']} |")
        lines += ["", f"The levels take turns request by request on one connection ({o['rounds']} rounds; p50 and p99 are medians "
                  "over the rounds), so the machine's drifts hit every level alike. "
                  f"p50 ratio, longest to shortest history: **{o['p50_ratio_longest_to_shortest']:.2f}** (target <= 1.2); "
                  f"record size constant: {o['record_bytes_constant']}. Prefill: {o['prefill_events']:,} events in 1000-event "
                  f"requests over HTTP in {o['prefill_s']:.0f} s.", ""]
    if "replay" in res:
        rp = res["replay"]
        lines += ["## 2. Stored state vs replaying history per request (in-process, no HTTP)", "",
                  "Naive: the history in a Redis list; per GET, LRANGE the last max_len items, run the model's forward over them, "
                  "score, top-10. holorec: per GET, the record through the serving app's client-side cache (a repeat read of an "
                  "unchanged user makes no round trip; a write by any replica invalidates it), decode, score its stored user vector, "
                  "top-10 (Engine.recommend). The Redis GET column is one uncached GET of the record: the round trip the cache saves. "
                  f"Median of {rp['requests']} requests each (1000-long windows: a quarter as many); torch threads: "
                  f"{rp['torch_threads']} for both, as a service worker runs (HOLOREC_THREADS).", "",
                  "| max_len | holorec stored state ms | a Redis GET of the record | " + " | ".join(f"naive {m} ms | {m} / stored" for m in rp["models"]) + " |",
                  "|---:|---:|---:|" + "---:|---:|" * len(rp["models"])]
        for L, v in rp["max_len"].items():
            cells = " | ".join(f"{_f(v[f'naive_{m}_ms'])} | **{_f(v[f'ratio_{m}'], 1)}x**" for m in rp["models"])
            lines.append(f"| {L} | {_f(v['stored_state_ms'], 3)} | {_f(v['redis_get_ms'], 3)} | {cells} |")
        overlap = ", ".join(f"{v['holomamba_top10_overlap']:.0%} at {L}" for L, v in rp["max_len"].items() if "holomamba_top10_overlap" in v)
        lines += ["", f"HoloMambaRec's top-10 from the stored state against its replay of the window: {overlap} the same items "
                  "(the stored state and user vector are quantised by the default codec, int8, so near-ties can swap). "
                  + ("" if "sasrec" in rp["models"] else "SASRec (model/sasrec.py) was not importable: not measured."), ""]
    if "load" in res:
        ld = res["load"]
        lines += [f"## 3. Throughput and latency under load (concurrency {ld['concurrency']}; median of {ld['repeats']} runs, each capped at "
                  f"{ld['seconds_cap']} s)", "",
                  "Each configuration starts from an empty namespace and the same prefill, which gives 2,000 users a record. "
                  "Events at c=32 go to random users out of 10,000 (a 100-event batch: 100 events, mostly distinct users, as a stream "
                  "consumer would send); events at c=1 and GET /recommend to users out of the 2,000 with history. "
                  "Micro-batching off = HOLOREC_MAX_BATCH=1.", "",
                  "| workers | micro-batching | 1 event, c=1: p50 / p99 ms | 1-event requests/s | p50 / p95 / p99 ms | 100-event batches: events/s | p50 / p95 / p99 ms | GET /recommend req/s | p50 / p95 / p99 ms | errors |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, v in ld["runs"].items():
            w, b = name[1], "on" if name.endswith("_batch") else "off"
            e, bt, rc, c1 = v["event"], v["batch100"], v["recommend"], v["event_c1"]
            errs = sum(x["errors"] for x in v.values())
            lines.append(f"| {w} | {b} | {_f(c1['p50_ms'])} / {_f(c1['p99_ms'])} | {_f(e['per_s'], 0)} | {_f(e['p50_ms'], 1)} / {_f(e['p95_ms'], 1)} / {_f(e['p99_ms'], 1)} "
                         f"| {_f(bt['events_per_s'], 0)} | {_f(bt['p50_ms'], 1)} / {_f(bt['p95_ms'], 1)} / {_f(bt['p99_ms'], 1)} "
                         f"| {_f(rc['per_s'], 0)} | {_f(rc['p50_ms'], 1)} / {_f(rc['p95_ms'], 1)} / {_f(rc['p99_ms'], 1)} | {errs} |")
        lines += ["", "The floor, and where one event's time goes. GET /livez does no work: it is what uvicorn, FastAPI and the load "
                  "generator cost alone on this machine. The breakdown is per request over the c=1 event runs: the client's mean "
                  "round trip; the service's own histograms (holorec_http_request_duration_seconds for POST /events, "
                  "holorec_redis_duration_seconds, holorec_model_step_duration_seconds, scraped from /metrics before and after); "
                  "rest of the app = FastAPI routing and validation, the micro-batcher's hand-off to its thread, record and state "
                  "(de)coding; outside the app = HTTP parsing in uvicorn, the kernel's loopback and the load generator.", "",
                  "| workers | micro-batching | GET /livez c=1 p50 / p99 ms | GET /livez c=32 req/s | p50 / p95 / p99 ms "
                  "| 1 event c=1: client mean ms | in the app | Redis GET | Redis CAS | model step | rest of the app | outside the app |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, v in ld["runs"].items():
            w, b = name[1], "on" if name.endswith("_batch") else "off"
            l1, lz, bd = v["livez_c1"], v["livez"], v["event_c1"]["breakdown"]
            parts = " | ".join(_f(bd[f"{k}_ms"], 3) for k in ("client_mean", "server", "redis_get", "redis_cas", "model_step", "app_rest", "outside_app"))
            lines.append(f"| {w} | {b} | {_f(l1['p50_ms'])} / {_f(l1['p99_ms'])} | {_f(lz['per_s'], 0)} "
                         f"| {_f(lz['p50_ms'], 1)} / {_f(lz['p95_ms'], 1)} / {_f(lz['p99_ms'], 1)} | {parts} |")
        lines.append("")
    if "catalogue" in res:
        cat = res["catalogue"]
        lines += ["## 4. Catalogue scale: GET /recommend, exact top-10 by one matrix product or the IVF index (1 worker, micro-batching on)", "",
                  "| items | scoring | c=1 p50 ms | c=1 p99 ms | c=32 req/s | c=32 p50 ms | c=32 p99 ms | recall@10 vs exact |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for size, v in cat["sizes"].items():
            for name, r in [("exact", v)] + ([(f"IVF {v['ivf']['lists']} lists, probe {v['ivf']['probe']}", v["ivf"])] if "ivf" in v else []):
                lines.append(f"| {int(size):,} | {name} | {_f(r['c1']['p50_ms'])} | {_f(r['c1']['p99_ms'])} | {_f(r['c32']['per_s'], 0)} | "
                             f"{_f(r['c32']['p50_ms'])} | {_f(r['c32']['p99_ms'])} | {_f(r.get('recall@10', 1.0), 3)} |")
        lines += ["", "The IVF index (HOLOREC_ANN_LISTS, HOLOREC_ANN_PROBE) scores the items of the probed k-means clusters only; its recall is "
                  "measured in-process on the same random-weight model (user vectors of random 20-item histories). Trained item tables "
                  "cluster more than random ones, so expect recall on a real checkpoint to differ: measure it there.", ""]
    if "codec" in res:
        cd = res["codec"]
        lines += ["## 5. State size per codec (HOLOREC_STATE_CODEC) and what it costs in accuracy", "",
                  f"ML-100K test users ({cd['users']}; MovieLens-1M is not available on this machine), each stepped through their whole "
                  f"history, the state packed and unpacked after every step (`evaluate_served`). Checkpoint: {cd['checkpoint']}. "
                  f"NDCG@10 (full ranking): forward over the whole history {cd['forward_ndcg10']:.4f}, step without packing {cd['step_ndcg10']:.4f}. "
                  "`holorec bench memory` has these codecs for every model size, with their accuracy over seeds.", "",
                  "| codec | state bytes / user | whole record bytes | NDCG@10 | change vs no packing |", "|---|---:|---:|---:|---:|"]
        for codec, v in cd["codecs"].items():
            lines.append(f"| {codec} | {v['state_bytes']:,} | {v['record_bytes']:,} | {v['ndcg10']:.4f} | {v['ndcg10_change']:+.4f} ({100 * v['ndcg10_rel_change']:+.2f}%) |")
        lines.append("")
    if "profile" in res:
        pf = res["profile"]
        lines += ["## 6. Where the time goes under load (py-spy, 1 worker, concurrency 32)", ""]
        if "skipped" in pf:
            lines += [f"Not measured: {pf['skipped']}.", ""]
        else:
            lines += [f"Not measured, {c}: {v['absent']}." for c, v in pf["cases"].items() if "absent" in v] + [""]
            cases = {c: v for c, v in pf["cases"].items() if "absent" not in v}
            lines += [f"`py-spy record` at {pf['rate_hz']} Hz for the {pf['sample_seconds']} s of load on the uvicorn process while the load generator "
                      "runs. Each sample counts for its innermost Python frame (a torch kernel or a socket call counts for the "
                      "Python line that made it); shares are of every sample of every thread, waiting included.", "",
                      "| part | " + " | ".join(f"{c} ({_f(v['per_s'], 0)} req/s while sampled)" for c, v in cases.items()) + " |",
                      "|---|" + "---:|" * len(cases)]
            names = sorted({p for v in cases.values() for p in v["parts"]}, key=lambda p: -max(v["parts"].get(p, 0) for v in cases.values()))
            for name in names:
                lines.append(f"| {name} | " + " | ".join(f"{100 * v['parts'].get(name, 0):.1f}%" for v in cases.values()) + " |")
            lines.append("")
            for c, v in cases.items():
                top = "; ".join(f"`{t['function']}` {100 * t['share']:.1f}%" for t in v["top_functions"])
                lines += [f"Top functions by own samples, {c}: {top}.", ""]
    return "\n".join(lines)
