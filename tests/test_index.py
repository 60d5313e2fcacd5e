"""The approximate top-k index (HOLOREC_ANN_LISTS): exact when every cluster is probed, high recall on clustered items."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import load
from service.engine import Engine, Event, RecQuery
from service.index import IVFIndex
from service.settings import Settings
from service.store import MemoryStore


def test_probing_every_cluster_is_exact_and_lists_each_item_once() -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(501, 16, generator=g)
    index = IVFIndex(table, lists=20, probe=20)
    h = torch.randn(16, generator=g)
    ids, scores = index.search(h)
    assert sorted(ids.tolist()) == list(range(1, 501))  # every item but the padding row, once
    assert torch.allclose(scores, table[ids] @ h, atol=1e-5)
    assert ids[torch.topk(scores, 10).indices].tolist() == (torch.topk(table[1:] @ h, 10).indices + 1).tolist()


def test_recall_on_clustered_items_probing_a_tenth() -> None:
    g = torch.Generator().manual_seed(1)
    centers = torch.nn.functional.normalize(torch.randn(50, 32, generator=g), dim=1) * 3
    table = torch.cat([torch.zeros(1, 32), centers.repeat_interleave(40, 0) + 0.3 * torch.randn(2000, 32, generator=g)])
    index = IVFIndex(table, lists=50, probe=5)
    hits = 0
    for q in torch.randn(100, 32, generator=g):
        ids, scores = index.search(q)
        approx = set(ids[torch.topk(scores, 10).indices].tolist())
        exact = set((torch.topk(table[1:] @ q, 10).indices + 1).tolist())
        hits += len(approx & exact)
    assert hits / 1000 >= 0.8  # probing a random tenth of the items would find about 0.1 (measured here: 0.886)


def test_engine_with_a_full_probe_index_recommends_what_exact_scoring_does(ckpt_dir: Path) -> None:
    ckpt = load(ckpt_dir)
    exact = Engine(ckpt, MemoryStore(), Settings(checkpoint=str(ckpt_dir)))
    approx = Engine(ckpt, MemoryStore(), Settings(checkpoint=str(ckpt_dir), ann_lists=6, ann_probe=6))
    history = [[Event("u", f"item-{i}") for i in (3, 4, 5, 6, 7)], [Event("v", f"item-{i}") for i in (30, 31, 9)]]
    for engine in (exact, approx):
        engine.apply(history)
    queries = [RecQuery("u", k=5), RecQuery("v", k=7, exclude_seen=False, exclude=["item-10", "item-32"]),
               RecQuery("u", k=3, attribute="genre-2"), RecQuery("nobody", k=4)]
    want, got = exact.recommend(queries), approx.recommend(queries)
    assert [r.source for r in got] == ["state", "state", "state", "popular"]
    for w, a in zip(want, got):
        assert [i for i, _ in a.items] == [i for i, _ in w.items]
        assert all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(a.items, w.items))
    assert not {"item-3", "item-4", "item-5", "item-6", "item-7"} & {i for i, _ in got[0].items}
    assert not {"item-10", "item-32"} & {i for i, _ in got[1].items}
    # probing one cluster of six: fewer candidates, the same exclusions
    narrow = Engine(ckpt, MemoryStore(), Settings(checkpoint=str(ckpt_dir), ann_lists=6, ann_probe=1))
    narrow.apply(history)
    items = [i for i, _ in narrow.recommend([RecQuery("u", k=3)])[0].items]
    assert 0 < len(items) <= 3 and not {"item-3", "item-4", "item-5", "item-6", "item-7"} & set(items)


@pytest.mark.parametrize("head", ["item_bias", "cosine"])
def test_a_scoring_head_is_served_as_the_model_scores_it(tmp_path: Path, head: str) -> None:
    """item_bias (the service scores [h, 1] against [e_i, b_i]) and cosine (cos(h, e_i) times the learned scale): served
    exactly and through a full-probe index, for one user and for a batch, each must give model.score's top-k and scores (and differ from the dot
    product alone, or the test would prove nothing)."""
    from bench.harness import make_checkpoint

    path = make_checkpoint(tmp_path / "c", n_items=60, **{head: True})
    ckpt = load(path)
    m = ckpt.model
    with torch.no_grad():
        if head == "item_bias":
            m.item_bias.normal_(0, 3, generator=torch.Generator().manual_seed(0))
        h = m.user_vector(torch.tensor([[3, 4, 5, 6, 7]]))[0]  # (d,)
        scores = m.score(h[None])[0]  # (v,)
        plain = h @ m.item_table().T
        if head == "cosine":
            cos = F.cosine_similarity(h[None], m.item_table(), dim=-1)  # (v,)
            assert torch.allclose(scores[1:], cos[1:] * m.log_scale.exp(), atol=1e-5)
    scores[0] = plain[0] = float("-inf")
    want = [f"item-{i}" for i in torch.topk(scores, 10).indices.tolist()]
    assert want != [f"item-{i}" for i in torch.topk(plain, 10).indices.tolist()]
    for lists in (0, 6):
        engine = Engine(ckpt, MemoryStore(), Settings(checkpoint=str(path), state_codec="float32", ann_lists=lists, ann_probe=6))
        engine.apply([[Event("u", f"item-{i}") for i in (3, 4, 5, 6, 7)]])
        q = RecQuery("u", k=10, exclude_seen=False)
        for got in (engine.recommend([q])[0].items, *(r.items for r in engine.recommend([q, q]))):  # one user, and a batch
            assert [i for i, _ in got] == want
            assert all(abs(s - float(scores[int(i.split("-")[1])])) < 1e-4 for i, s in got)
