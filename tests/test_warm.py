"""`holorec warm`: states from a log in one parallel pass, equal to posting the same events one by one.

Random-weight tiny models and small logs made here; the store is the test Redis (a namespace per test).
"""
from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.harness import ROOT, make_checkpoint
from model import ModelConfig, build_model
from model.checkpoint import load
from model.split import left_pad
from model.data import load as load_data
from model.state import unpack
from service import record as rec
from service.engine import Engine, Event, RecQuery
from service.settings import Settings
from service.store import MemoryStore, RedisStore
from service.warm import batches, rewarm, warm
from tests.conftest import REDIS_URL


@pytest.mark.parametrize("model, extra", [("holomamba", {}), ("holomamba", {"bundle": 3}), ("holomamba", {"recent_attn": 3}), ("gru4rec", {}),
                                          ("sasrec", {}), ("elastic", {})])
def test_forward_state_equals_stepping_item_by_item(model: str, extra: dict) -> None:
    """Histories shorter than the conv window, one scan chunk and several chunks, left-padded in one batch."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(model=model, n_items=30, d_model=16, max_len=24, dropout=0.0, **extra)).eval()
    rng = random.Random(0)
    seqs = [[rng.randint(1, 30) for _ in range(n)] for n in (1, 2, 3, 7, 16, 17, 40)]
    with torch.inference_mode():
        h, state = m.forward_state(left_pad(seqs, 40))  # (7, d), state with batch 7
        for r, seq in enumerate(seqs):
            h1, s1 = m.replay(seq)
            assert torch.allclose(h[r], h1, atol=1e-4), (model, len(seq))
            for k in state:
                assert torch.allclose(state[k][r].float(), s1[k][0].float(), atol=1e-4), (model, k, len(seq))


def test_batches_are_shortest_first_and_bounded() -> None:
    lengths = [5, 1, 300, 2, 2, 40]
    got = list(batches(lengths, tokens=8, max_users=3))
    assert sorted(i for b in got for i in b) == list(range(6))
    assert [lengths[b[0]] for b in got] == sorted(lengths[b[0]] for b in got)
    assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 8 for b in got) and max(map(len, got)) <= 3


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untrained weights; the ring buffer's size is the engine's setting (engine_for), not the checkpoint's."""
    return make_checkpoint(tmp_path_factory.mktemp("warm") / "ckpt")


def write_log(path: Path, n_users: int = 50, seed: int = 0, unknown: float = 0.05) -> dict[str, list[tuple[str, float]]]:
    """A CSV log in shuffled row order; -> per user, (item, timestamp) in time order. Some items are unknown."""
    rng = random.Random(seed)
    events = {f"user-{u}": [] for u in range(n_users)}
    rows = []
    for u, evs in events.items():
        t = 1_700_000_000.0 + rng.randint(0, 10**6)
        for _ in range(rng.randint(1, 30)):
            t += rng.randint(1, 1000)
            item = f"item-{rng.randint(1, 40)}" if rng.random() >= unknown else "not-in-catalogue"
            evs.append((item, t))
            rows.append((u, item, t))
    rng.shuffle(rows)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        w.writerows(rows)
    return events


SLOTS = 6  # a ring buffer shorter than most histories (up to 30 items), so warming's window cut is checked too


def engine_for(ckpt_path: Path, namespace: str, store=None) -> Engine:  # type: ignore[no-untyped-def]
    s = Settings(redis_url=REDIS_URL, namespace=namespace, state_codec="float32",  # lossless: states compared within 1e-4
                 history_slots=SLOTS)
    return Engine(load(ckpt_path), store or RedisStore(REDIS_URL), s)


def run_cli(*args: str, namespace: str) -> dict:
    env = {**os.environ, "HOLOREC_REDIS_URL": REDIS_URL, "HOLOREC_NAMESPACE": namespace, "HOLOREC_THREADS": "1", "HOLOREC_STATE_CODEC": "float32",
           "HOLOREC_HISTORY_SLOTS": str(SLOTS)}
    out = subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_warm_cli_writes_what_posting_the_log_would(ckpt_path: Path, namespace: str, tmp_path: Path) -> None:
    """Every user of the log: events_applied, window and last timestamp as if posted; state and vector equal to
    stepping the events through the engine (POST /events' path) within 1e-4; recommendations from state."""
    log = write_log(tmp_path / "log.csv")
    res = run_cli("warm", "--data", str(tmp_path / "log.csv"), "--checkpoint", str(ckpt_path), namespace=namespace)["warm"]
    known = {u: [(i, t) for i, t in evs if i != "not-in-catalogue"] for u, evs in log.items()}
    with_items = [u for u in known if known[u]]
    assert res["written"] == len(with_items) and res["kept_existing"] == 0
    assert res["users_without_known_items"] == len(log) - len(with_items)

    engine = engine_for(ckpt_path, namespace)
    posted = engine_for(ckpt_path, namespace, MemoryStore())  # the same events, stepped one by one
    posted.apply([[Event(u, i, None, t) for i, t in evs] for u, evs in log.items()])
    for u in with_items:
        meta = engine.user_meta(u)
        assert meta is not None and meta["events_applied"] == len(known[u]), u
        assert meta["last_event_timestamp"] == known[u][-1][1]
        warmed, stepped = (rec.decode(e.store.get(e.key(u)), e.version, e.d) for e in (engine, posted))  # type: ignore[arg-type]
        assert np.array_equal(warmed.window, stepped.window) and warmed.applied == stepped.applied
        assert np.allclose(warmed.vector, stepped.vector, atol=1e-4)
        a, b = (unpack([r.state], engine.template) for r in (warmed, stepped))
        assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    assert all(r.source == "state" for r in engine.recommend([RecQuery(u) for u in with_items]))
    assert all(engine.user_meta(u) is None for u in log if u not in with_items)


def test_warm_is_idempotent_resumable_and_overwrites_only_when_asked(ckpt_path: Path, namespace: str, tmp_path: Path) -> None:
    write_log(tmp_path / "log.csv", n_users=30, seed=1, unknown=0)
    ds = load_data(str(tmp_path / "log.csv"))
    engine = engine_for(ckpt_path, namespace)
    first = warm(engine, ds, progress=False)
    keys = [engine.key(u) for u in ds.users]
    before = engine.store.get_many(keys)
    again = warm(engine, ds, progress=False)
    assert again["written"] == 0 and again["kept_existing"] == first["written"]
    assert engine.store.get_many(keys) == before  # untouched, revisions included

    engine.apply([[Event(ds.users[10], "item-1")]])  # a live event after warming: not undone by a re-run
    kept = engine.store.get_many(keys[7:])
    for k in keys[:7]:  # as if the first run had been stopped before these users
        engine.store.delete(k)
    resumed = warm(engine, ds, progress=False)
    assert resumed["written"] == 7 and engine.store.get_many(keys[7:]) == kept
    assert engine.user_meta(ds.users[10])["events_applied"] == len(ds.sequences[10]) + 1  # type: ignore[index]
    assert engine.user_meta(ds.users[3])["events_applied"] == len(ds.sequences[3])  # type: ignore[index]

    written_first = rec.stored_revision(engine.store.get(keys[8]))  # type: ignore[arg-type]
    over = warm(engine, ds, overwrite=True, progress=False)
    assert over["written"] == first["written"]
    r = rec.decode(engine.store.get(keys[8]), engine.version, engine.d)  # type: ignore[arg-type]
    assert r.revision == written_first + 1 and r.applied == len(ds.sequences[8])


def test_rewarm_moves_every_record_to_the_new_checkpoint(ckpt_path: Path, namespace: str, tmp_path: Path) -> None:
    """After a new checkpoint: `holorec warm --rewarm` re-warms each stored record from its window, as first touch
    would, keeping its count; records already current are left alone."""
    write_log(tmp_path / "log.csv", n_users=12, seed=2)
    old = engine_for(ckpt_path, namespace)
    warm(old, load_data(str(tmp_path / "log.csv")), progress=False)
    new_ckpt = make_checkpoint(tmp_path / "new", seed=1)
    new = engine_for(new_ckpt, namespace)
    users = sorted(u for u in (f"user-{i}" for i in range(12)) if old.user_meta(u))
    counts = {u: old.user_meta(u)["events_applied"] for u in users}  # type: ignore[index]

    res = run_cli("warm", "--rewarm", "--checkpoint", str(new_ckpt), namespace=namespace)["rewarm"]
    assert res["rewarmed"] == res["records"] == len(users)
    assert rewarm(new, progress=False)["rewarmed"] == 0  # nothing left to do
    replay = engine_for(new_ckpt, namespace, MemoryStore())
    for u in users:
        r = rec.decode(new.store.get(new.key(u)), new.version, new.d)  # type: ignore[arg-type]
        assert r.model_version == new.version and r.applied == counts[u]
        replay.apply([[Event(u, new.ckpt.items[i - 1]) for i in r.history()]])
        stepped = rec.decode(replay.store.get(replay.key(u)), new.version, new.d)  # type: ignore[arg-type]
        assert np.allclose(r.vector, stepped.vector, atol=1e-4) and not np.isnan(r.vector).any()
