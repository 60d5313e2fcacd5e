"""exclude_seen never repeats an item a user has had: the seen filter in the record, as served and as evaluated."""
from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import torch

from bench.harness import make_checkpoint
from model.checkpoint import load
from model.evaluate import _mask_seen
from model.seen import SeenFilter, false_positive_rate
from service import record as rec
from service.engine import Engine, Event, RecQuery
from service.settings import Settings
from service.store import MemoryStore


def test_no_false_negatives_and_the_stated_false_positive_rates() -> None:
    """Measured over 100,000 unseen ids, the rates the README states: the default 384 bytes hide 1.1% of unseen items at
    300 seen and 28% at 1,000; 1,024 bytes 2.2% at 1,000 and 97% at 10,000."""
    ids = [f"item-{i}" for i in range(110_000)]
    for size, n, stated in ((384, 300, 0.011), (384, 1_000, 0.28), (1024, 1_000, 0.022), (1024, 10_000, 0.97)):
        f = SeenFilter(ids, size)
        bits = f.empty()
        f.add(bits, np.arange(1, n + 1))
        assert f.contains(bits, np.arange(1, n + 1)).all()  # every item added is reported
        measured = f.contains(bits, np.arange(10_001, 110_001)).mean()
        assert abs(measured - false_positive_rate(n, size)) < 0.01 and abs(measured - stated) < 0.01, (size, n, measured)


def test_adding_items_one_by_one_sets_the_bits_adding_them_at_once_does() -> None:
    """add's two ways (bit by bit for a few items, one ufunc.at call for many) must set the same bits; a tiny
    filter makes an item's positions share bytes, the case a plain fancy-indexed |= would get wrong."""
    for n_bytes in (2, 384):
        f = SeenFilter([f"item-{i}" for i in range(1, 201)], n_bytes)
        items = np.random.default_rng(n_bytes).integers(1, 201, 60)
        one_by_one, at_once = f.empty(), f.empty()
        for i in items:
            f.add(one_by_one, [int(i)])
        f.add(at_once, items)
        assert np.array_equal(one_by_one, at_once) and f.contains(one_by_one, items).all()


def test_eighty_items_through_a_window_of_twenty_never_come_back(tmp_path: Path, server_factory) -> None:
    """The issue's check: a window of 20, 80 distinct items posted, a top-100 holds none of them."""
    ckpt = make_checkpoint(tmp_path / "ckpt", n_items=300)
    srv = server_factory(ckpt, history_slots=20)
    posted = [f"item-{i}" for i in range(7, 247, 3)]
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.post("/events", json={"events": [{"user_id": "shopper", "item_id": i} for i in posted]}).json()["applied"] == 80
        got = [x["item_id"] for x in c.get("/recommend/shopper", params={"k": 100}).json()["items"]]
        assert len(got) == 100 and not set(got) & set(posted)
        with_seen = [x["item_id"] for x in c.get("/recommend/shopper", params={"k": 100, "exclude_seen": "false"}).json()["items"]]
        assert set(with_seen) & set(posted[:-20])  # the test is not empty: the model does rank these items


def test_evaluate_excludes_what_the_service_excludes(tmp_path: Path) -> None:
    ckpt = load(make_checkpoint(tmp_path / "ckpt", max_len=8, n_items=200))
    engine = Engine(ckpt, MemoryStore(), Settings(seen_filter_bytes=16))  # a small filter: false positives happen
    history = list(range(1, 200, 3))
    engine.apply([[Event("u", ckpt.items[i - 1]) for i in history]])
    r = engine._read(["u"])[0].record
    served = set(engine._excluded_ids(RecQuery("u"), r).tolist()) - {0}
    scores = torch.zeros(1, 201)
    _mask_seen(scores, [history], torch.tensor([1]), SeenFilter(ckpt.items, 16))
    evaluated = set(torch.nonzero(scores[0] == -math.inf)[:, 0].tolist()) - {0}
    assert evaluated | {1} == served and len(served) > len(history)  # the target (1) stays a candidate in evaluation


def test_a_format_2_record_is_read_and_its_filter_refilled_from_the_window(tmp_path: Path) -> None:
    ckpt = load(make_checkpoint(tmp_path / "ckpt", max_len=8, n_items=40))
    store = MemoryStore()
    engine = Engine(ckpt, store, Settings(state_codec="float32"))  # the old header below says float32
    engine.apply([[Event("u", f"item-{i}") for i in range(1, 12)]])
    r = rec.decode(store.get(engine.key("u")), ckpt.version, 16)
    body = r.window.astype("<i4").tobytes() + r.dedup.astype("<u8").tobytes() + r.vector.astype("<f4").tobytes() + r.state
    head = rec.OLD_HEADERS[2].pack(rec.MAGIC, 2, 0, r.revision, r.applied, r.updated_at, r.last_event_ts, ckpt.version.encode()[:16],
                              len(r.window), len(r.dedup), r.dedup_pos, 0)[:-4]
    store.set(engine.key("u"), head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body)
    loaded = engine._read(["u"])[0]
    old, dirty = loaded.record, loaded.dirty
    assert dirty and old.applied == 11 and np.array_equal(old.vector, r.vector)
    assert engine.seen.contains(old.seen_filter, np.arange(4, 12)).all()  # the window's 8 items, refilled


def test_recommend_asks_the_filter_about_its_best_candidates_and_answers_what_scoring_every_item_would(tmp_path: Path) -> None:
    """GET /recommend asks the seen filter about its best 2k + 32 items, and about all of them only when too few of those
    are left: the answer must be the brute-force one (every item scored, every exclusion applied), also for a user whose
    history (and a 16-byte filter's false positives) takes most of the best items, for a k beyond the catalogue, an
    attribute filter and explicit exclusions. Both ways: model/native.c's holorec_top (built by `pip install`, so
    present here) and the torch path a machine without it takes."""
    ckpt = load(make_checkpoint(tmp_path / "ckpt", max_len=8, n_items=200))
    engine = Engine(ckpt, MemoryStore(), Settings(seen_filter_bytes=16))
    engine.apply([[Event("light", ckpt.items[i - 1]) for i in (3, 50, 7)]])
    engine.apply([[Event("heavy", ckpt.items[i - 1]) for i in range(1, 200, 2)]])
    table = engine.scorer.table_t.T.numpy()
    checked_fallback, native = False, engine.scorer.native
    assert native is not None
    for lib, user in [(lib, u) for lib in (native, None) for u in ("light", "heavy")]:
        engine.scorer.native = lib  # None: the torch path
        r = engine._read([user])[0].record
        seen_count = len(set(engine._excluded_ids(RecQuery(user), r).tolist()))
        checked_fallback |= seen_count > 120  # most of the 200 items: the best 2k + 32 cannot hold k unseen ones
        queries = [RecQuery(user), RecQuery(user, k=60), RecQuery(user, k=500), RecQuery(user, exclude_seen=False, k=30),
                   RecQuery(user, k=20, exclude=["item-2", "item-4", "no-such-item"]), RecQuery(user, k=15, attribute="genre-2")]
        together = engine.recommend(queries)  # a batch: one product for all, then each query's top-k
        for q, batched in zip(queries, together):
            scores = table @ r.vector
            scores[engine._excluded_ids(q, r)] = -math.inf
            if q.attribute is not None:
                scores[~engine.attribute_mask(q.attribute).numpy()] = -math.inf
            best = [int(j) for j in np.argsort(-scores, kind="stable")[: q.k] if scores[j] > -math.inf]
            for got in (engine.recommend([q])[0], batched):
                assert [ckpt.item_index[i] for i, _ in got.items] == best, (user, q)
                assert np.allclose([s for _, s in got.items], scores[best], atol=1e-5)
    assert checked_fallback
