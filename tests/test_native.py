"""model/native.c in the service: an engine built where the C library is missing (a machine without a C compiler)
serves what one built with it serves. The step's and the top-k's own checks are in tests/test_baselines.py and
tests/test_seen.py."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from bench.harness import make_checkpoint
from model.checkpoint import load
from model.fast_step import packed_kind
from service.engine import Engine, Event, RecQuery
from service.settings import Settings
from service.store import MemoryStore


def test_an_engine_without_the_c_library_serves_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", n_items=300, d_model=32, max_len=20)
    settings = Settings(state_codec="float32")  # lossless, so the two ways' states can be compared value by value
    with_c = Engine(load(ckpt), MemoryStore(), settings)
    monkeypatch.setattr("model.fast_step.library", lambda: None)
    monkeypatch.setattr("service.scoring.library", lambda: None)
    without = Engine(load(ckpt), MemoryStore(), settings)
    assert (packed_kind(with_c.applier.packed), packed_kind(without.applier.packed)) == ("C (model/native.c)", "ONNX Runtime")
    assert with_c.scorer.native is not None and without.scorer.native is None

    rng = random.Random(5)
    users = [f"u{i}" for i in range(12)]
    for _ in range(15):  # one event per user and request (the packed step), then a few at once (the unpacked path)
        batch = [[Event(u, f"item-{rng.randrange(1, 301)}")] for u in rng.sample(users, 6)]
        batch.append([Event(users[0], f"item-{rng.randrange(1, 301)}") for _ in range(3)])
        for engine in (with_c, without):
            engine.apply(batch)
    queries = [RecQuery(u, k=k) for u in users for k in (1, 10, 300)] + [RecQuery(users[1], exclude_seen=False),
                                                                         RecQuery(users[2], attribute="genre-1", k=20)]
    for alone in (True, False):  # one user a call (the product in C) and all at once (torch's product, each top-k in C)
        got = [(e.recommend([q])[0] for q in queries) if alone else iter(e.recommend(queries)) for e in (with_c, without)]
        for q, a, b in zip(queries, *got):
            assert [i for i, _ in a.items] == [i for i, _ in b.items], q
            assert np.allclose([s for _, s in a.items], [s for _, s in b.items], atol=1e-4), q
    for u in users:
        a, b = (e._read([u])[0].record for e in (with_c, without))
        assert a.applied == b.applied and np.allclose(a.vector, b.vector, atol=1e-4)
        assert np.allclose(np.frombuffer(a.state, np.float32), np.frombuffer(b.state, np.float32), atol=1e-4)


def test_the_c_paths_can_be_turned_off(tmp_path: Path) -> None:
    """HOLOREC_NATIVE=false: ONNX Runtime and torch serve where the C library is built (an operator's switch)."""
    engine = Engine(load(make_checkpoint(tmp_path / "ckpt", n_items=50, d_model=32)), MemoryStore(), Settings(native=False))
    assert packed_kind(engine.applier.packed) == "ONNX Runtime" and engine.scorer.native is None
    engine.apply([[Event("u", "item-3")]])
    assert len(engine.recommend([RecQuery("u", k=5)])[0].items) == 5
