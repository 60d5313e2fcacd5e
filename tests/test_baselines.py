"""The baselines (GRU4Rec, SASRec, ELASTIC) and bundled HoloMambaRec keep the step contract, constant state size, and learn."""
from __future__ import annotations

import sys

import pytest
import torch

from model import MODELS, ModelConfig, build_model
from model.fast_step import PACKED_BATCH, SMALL_BATCH, native_step, onnx_packed_step, onnx_step, packed_step, serving_step, trace_step
from model.state import CODECS, join, pack, packed_size, split, unpack

BASELINES = tuple(m for m in MODELS if m != "holomamba")
N_ITEMS = 40


def make(name: str, seed: int = 0, **kw: object):
    torch.manual_seed(seed)
    kw = {"max_len": 64, **kw}
    cfg = ModelConfig(model=name, n_items=N_ITEMS, d_model=32, n_memory=100, top_k_memory=4, **kw)
    return build_model(cfg).eval()


def left_padded(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, N_ITEMS + 1, (batch, length), generator=g)
    for b in range(batch):
        items[b, : int(torch.randint(0, length, (1,), generator=g))] = 0  # random amount of left padding
    return items


def worst_step_gap(m, items: torch.Tensor, step=None) -> float:
    """Largest |step - forward| over the real positions, stepping all rows from init_state; padding rows keep their state."""
    with torch.no_grad():
        full = m(items)  # (b, l, d)
        state, worst = m.init_state(items.shape[0]), 0.0
        for t in range(items.shape[1]):
            h, new = (step or m.step)(items[:, t], state)
            real = items[:, t] > 0
            state = {k: torch.where(real.view(-1, *[1] * (v.dim() - 1)), new[k], v) for k, v in state.items()}
            if real.any():
                worst = max(worst, (h[real] - full[real, t]).abs().max().item())
    return worst


@pytest.mark.parametrize("name", ("gru4rec", "elastic"))
@pytest.mark.parametrize("batch,length", [(1, 1), (3, 9), (5, 40), (2, 64)])
def test_step_reproduces_forward(name: str, batch: int, length: int) -> None:
    assert worst_step_gap(make(name), left_padded(batch, length)) < 1e-4


@pytest.mark.parametrize("batch,length", [(1, 1), (3, 3), (5, 40)])
def test_recent_attention_step_reproduces_forward(batch: int, length: int) -> None:
    """recent_attn: histories shorter and longer than its K; the state holds the last K items, oldest first."""
    m = make("holomamba", recent_attn=4)
    items = left_padded(batch, length)
    assert worst_step_gap(m, items) < 1e-4
    with torch.no_grad():
        _, state = m.replay([7, 8, 9, 10, 11, 12])
        _, state2 = m.replay([3], state)
    assert state["recent"].tolist() == [[9, 10, 11, 12]] and state2["recent"].tolist() == [[10, 11, 12, 3]]
    m.train()
    seqs = torch.randint(1, N_ITEMS + 1, (3, 12), generator=torch.Generator().manual_seed(2))
    m.loss(seqs[:, :-1], seqs[:, 1:]).backward()  # the attention is in the training loss
    assert m.recent.q.weight.grad.abs().sum() > 0 and m.recent.recency.grad.abs().sum() > 0


def test_embed_scale_feeds_the_encoder_sqrt_d_times_the_item_vector_and_scores_the_plain_one() -> None:
    """embed_scale is the same model as one whose input item vectors are sqrt(d) longer (no attributes here, so an
    item's vector is its row), while the scoring table stays the unscaled rows."""
    on, plain = make("holomamba", embed_scale=True), make("holomamba")
    plain.load_state_dict(on.state_dict())
    longer = make("holomamba")
    longer.load_state_dict(on.state_dict())
    with torch.no_grad():
        longer.encoder.item.weight.mul_(32**0.5)
        items = left_padded(3, 9)
        assert torch.allclose(on(items), longer(items), atol=1e-5)
        assert not torch.allclose(on(items), plain(items), atol=1e-2)
        assert torch.equal(on.item_table(), plain.item_table())


def test_emb_dropout_sets_the_input_dropout_alone() -> None:
    """emb_dropout replaces `dropout` on the encoder's input only; unset (-1), the input drops what the sublayers do."""
    split, same = make("holomamba", dropout=0.3, emb_dropout=0.5), make("holomamba", dropout=0.3)
    rates = lambda m: sorted({mod.p for mod in m.modules() if isinstance(mod, torch.nn.Dropout) and mod is not m.drop})
    assert (split.drop.p, same.drop.p) == (0.5, 0.3) and rates(split) == rates(same) == [0.3]


def test_dt_range_sets_where_the_ssm_step_sizes_start() -> None:
    """softplus(dt bias) starts inside [dt_min, dt_max]: Mamba's [1e-3, 0.1] by default, and the range asked for."""
    for kw, (lo, hi) in [({}, (1e-3, 0.1)), ({"dt_min": 0.01, "dt_max": 1.0}, (0.01, 1.0))]:
        dt = torch.nn.functional.softplus(make("holomamba", **kw).layers[0].dt_proj.bias)
        assert lo * 0.999 <= dt.min() and dt.max() <= hi * 1.001 and dt.max() > (lo * hi) ** 0.5


def test_post_norm_normalises_the_input_and_every_sublayer_output() -> None:
    """post_norm (Mamba4Rec's placement): the SSM and feed-forward sublayers each end in a LayerNorm and read an input
    that already is one (their gains start at 1, offsets at 0: per position mean 0, variance 1); the default places
    the norms inside the sublayers, so its first block reads the item vectors at their own scale (norm ~1 over d = 32)."""
    seen: dict[str, list[torch.Tensor]] = {}
    for post in (True, False):
        m = make("holomamba", post_norm=post)
        outs = seen[str(post)] = []
        hooks = [mod.register_forward_hook(lambda _m, inp, out, outs=outs: outs.extend([inp[0], out]))
                 for mod in (m.layers[0], m.ffns[0], m.layers[1])]
        with torch.no_grad():
            m(torch.randint(1, N_ITEMS + 1, (3, 9), generator=torch.Generator().manual_seed(5)))
        for h in hooks:
            h.remove()
    var = lambda x: x.var(-1, unbiased=False).mean().item()  # noqa: E731
    assert all(abs(var(x) - 1) < 1e-3 and x.mean(-1).abs().max() < 1e-4 for x in seen["True"])
    assert all(var(x) < 0.2 for x in seen["False"][:1])  # the default's first block reads the item vectors as they are


@pytest.mark.parametrize("name,kw,traced", [("holomamba", {}, True), ("holomamba", {"recent_attn": 4}, True),
                                            ("holomamba", {"embed_scale": True}, True), ("holomamba", {"ffn_glu": True}, True),
                                            ("holomamba", {"post_norm": True}, True),
                                            ("gru4rec", {}, False), ("holomamba", {"bundle": 3}, False),
                                            ("sasrec", {}, False), ("elastic", {}, False)])
def test_serving_step_is_compiled_where_exact_and_reproduces_forward(name: str, kw: dict, traced: bool) -> None:
    """ONNX Runtime up to SMALL_BATCH users, the trace above: both exact, and both present for a traceable model."""
    m = make(name, **kw)
    assert (onnx_step(m) is not None, trace_step(m) is not None) == (traced, traced)
    step = serving_step(m)
    assert (step != m.step) == traced  # a model whose step branches on the data keeps its eager step
    for batch, length in [(1, 30), (4, 64), (SMALL_BATCH + 1, 20)] if traced else []:  # the eager steps' own tests are above and below
        assert worst_step_gap(m, left_padded(batch, length), step) < 1e-4


def test_serving_step_without_onnxruntime_is_the_trace_at_every_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without onnxruntime (a platform with no wheel) still serves the exact compiled step."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    m = make("holomamba")
    assert onnx_step(m) is None and trace_step(m) is not None
    step = serving_step(m)
    assert step != m.step
    for batch in (1, SMALL_BATCH + 1):
        assert worst_step_gap(m, left_padded(batch, 12), step) < 1e-4


@pytest.mark.parametrize("codec,kw", [*((c, {}) for c in CODECS),  # float tensors only, every codec
                                      ("int8", {"recent_attn": 4})])  # and an integer tensor (the last K items)
def test_onnx_packed_step_is_unpack_step_pack(codec: str, kw: dict) -> None:
    """The served event's one ONNX Runtime call (unpack, step, pack) writes the bytes the path it replaced wrote
    (unpack, the ONNX step, pack: the check at export allows a last-bit flip, which these states do not hit), and its
    vector is the eager step's."""
    m = make("holomamba", **kw)
    step, onnx = onnx_packed_step(m, codec), onnx_step(m)
    assert step is not None and onnx is not None
    template = m.init_state(1)
    g = torch.Generator().manual_seed(3)
    for b in (1, 3, PACKED_BATCH):
        with torch.no_grad():
            _, state = m.replay(torch.randint(1, N_ITEMS + 1, (9,), generator=g).tolist())
            state = {k: v.repeat(b, *[1] * (v.dim() - 1)) * torch.linspace(0.5, 2, b).view(-1, *[1] * (v.dim() - 1)).to(v.dtype)
                     if v.is_floating_point() else v.repeat(b, *[1] * (v.dim() - 1)) for k, v in state.items()}  # b different users
            blobs = pack(state, codec)
            assert join(split(blobs, template, codec), template, codec) == blobs  # split and join only move bytes
            items = torch.randint(0, N_ITEMS + 1, (b,), generator=g)
            want_h, _ = m.step(items, unpack(blobs, template, codec))
            got_h, got = step(items.numpy(), blobs)
            assert got == pack(onnx(items, unpack(blobs, template, codec))[1], codec)
        assert got_h.shape == (b, m.config.d_model) and torch.allclose(torch.from_numpy(got_h), want_h, atol=1e-5, rtol=0)


def test_a_cached_graph_is_used_once_it_proves_exact(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first start exports and keeps both graphs; the next one with the same weights exports nothing; a damaged
    file is exported again (and replaced); other weights get their own files."""
    from model import fast_step

    cache, m = str(tmp_path), make("holomamba")
    items, state = torch.tensor([3]), m.init_state(1)
    assert onnx_step(m, cache) is not None and onnx_packed_step(m, "int8", cache) is not None
    files = sorted(tmp_path.glob("*.onnx"))
    assert [f.name.split("-")[0] for f in files] == ["packed", "step"]
    exports = []
    monkeypatch.setattr(fast_step, "_onnx", lambda *a: exports.append(a) or None)  # an export now would return nothing
    step, packed = onnx_step(m, cache), onnx_packed_step(m, "int8", cache)
    assert step is not None and packed is not None and exports == []
    assert torch.allclose(step(items, state)[0], m.step(items, state)[0], atol=1e-5, rtol=0)
    monkeypatch.undo()
    files[1].write_bytes(b"not a graph")
    assert onnx_step(m, cache) is not None and files[1].read_bytes() != b"not a graph"
    assert onnx_packed_step(make("holomamba", seed=1), "int8", cache) is not None and len(list(tmp_path.glob("*.onnx"))) == 3


def test_packed_step_only_where_the_serving_step_is_compiled() -> None:
    assert packed_step(make("holomamba", bundle=3), "int8") is None and packed_step(make("sasrec"), "int8") is None


def _quantised_gap(m, codec: str, blobs: list[bytes], got: list[bytes], items: torch.Tensor) -> float:
    """How far `got` (the stepped blobs) is from the eager step's state, in units of the codec's own rounding of that
    state (1 = one quantisation step; float32: one unit of 1e-6)."""
    template = m.init_state(1)
    _, want = m.step(items, unpack(blobs, template, codec))
    rounded, mine = unpack(pack(want, codec), template, codec), unpack(got, template, codec)
    worst = 0.0
    for k in want:
        step = max((rounded[k].double() - want[k].double()).abs().max().item(), 1e-6)
        worst = max(worst, (mine[k].double() - want[k].double()).abs().max().item() / step)
    return worst


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("kw", [{}, {"ffn_mult": 0}, {"embed_scale": True, "d_state": 16, "d_conv": 2}])
def test_native_step_is_the_eager_step(codec: str, kw: dict) -> None:
    """model/native.c (built by `pip install`, as on every machine this project installs on): for one event per user,
    the eager step's vector within 1e-5 and its state within about one quantisation step (where the C arithmetic
    rounds a value's last bit otherwise, the codec can round it to the neighbouring level), at 1 to PACKED_BATCH
    users; and it is what packed_step serves."""
    m = make("holomamba", **kw)
    step = native_step(m, codec)
    assert step is not None and packed_step(m, codec).__qualname__ == step.__qualname__
    g = torch.Generator().manual_seed(4)
    for b in (1, 3, PACKED_BATCH):
        with torch.no_grad():
            _, state = m.replay(torch.randint(1, N_ITEMS + 1, (9,), generator=g).tolist())
            state = {k: v.repeat(b, *[1] * (v.dim() - 1)) * torch.linspace(0.5, 2, b).view(-1, *[1] * (v.dim() - 1)) for k, v in state.items()}
            blobs, items = pack(state, codec), torch.randint(0, N_ITEMS + 1, (b,), generator=g)
            want_h, _ = m.step(items, unpack(blobs, m.init_state(1), codec))
            got_h, got = step(items.numpy(), blobs)
            assert torch.allclose(torch.from_numpy(got_h), want_h, atol=1e-5, rtol=0)
            assert len(got) == b and all(len(x) == len(blobs[0]) for x in got)
            assert _quantised_gap(m, codec, blobs, got, items) <= 1.01


def test_native_step_reproduces_forward() -> None:
    """Stepping a user's history event by event through the C step (float32 state, from the empty one) gives forward's
    vector at every position within 1e-4: the serving path agrees with the training path."""
    m = make("holomamba")
    step, items = native_step(m, "float32"), left_padded(1, 40)[0].clamp(min=1)
    with torch.no_grad():
        full = m(items[None])[0]  # (l, d)
        blobs, worst = pack(m.init_state(1), "float32"), 0.0
        for t, item in enumerate(items.tolist()):
            h, blobs = step(torch.tensor([item]).numpy(), blobs)
            worst = max(worst, (torch.from_numpy(h[0]) - full[t]).abs().max().item())
    assert worst < 1e-4


@pytest.mark.parametrize("kw", [{"post_norm": True}, {"ffn_glu": True}, {"recent_attn": 4}])
def test_native_step_only_for_what_it_computes(kw: dict) -> None:
    """A configuration model/native.c does not compute gets no C step, and packed_step serves the ONNX Runtime call."""
    m = make("holomamba", **kw)
    assert native_step(m, "int8") is None and packed_step(m, "int8") is not None


def test_native_step_refuses_what_it_cannot_read() -> None:
    m = make("holomamba")
    step = native_step(m, "int8")
    blob = pack(m.init_state(1), "int8")
    with pytest.raises(IndexError):
        step(torch.tensor([N_ITEMS + 1]).numpy(), blob)
    with pytest.raises(ValueError):
        step(torch.tensor([1]).numpy(), [blob[0][:-1]])


@pytest.mark.parametrize("length", [1, 9, 64])
def test_sasrec_step_is_the_user_vector_of_the_history(length: int) -> None:
    """SASRec puts the newest item at the last position, so a step equals forward's last position
    over the history so far (not forward's middle positions, which sit earlier in the window)."""
    m = make("sasrec")
    seq = left_padded(1, length, seed=5)[:, -length:].clamp(min=1)
    with torch.no_grad():
        state = m.init_state(1)
        for t in range(length):
            h, state = m.step(seq[:, t], state)
            assert (h - m.user_vector(seq[:, : t + 1])).abs().max().item() < 1e-4


def test_sasrec_as_published() -> None:
    """One head, sqrt(d)-scaled item embeddings, the newest item at the last position whatever the history length."""
    m = make("sasrec", max_len=16)
    assert m.config.n_heads == 1 and m.blocks[0].h == 1 and len(m.blocks) == 2
    seen: list[torch.Tensor] = []
    m.pos.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        for length in (1, 5, 16):
            m(torch.arange(1, length + 1)[None])
    assert [int(p[-1]) for p in seen] == [15, 15, 15]
    dropped: list[torch.Tensor] = []  # what enters the embedding dropout: scaled item + position
    m.drop.register_forward_hook(lambda mod, inp, out: dropped.append(inp[0]))
    with torch.no_grad():
        m(torch.tensor([[3]]))
    assert torch.allclose(dropped[0][0, 0], m.items.weight[3] * 32**0.5 + m.pos.weight[15], atol=1e-6)


def bundled(g: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(model="holomamba", n_items=N_ITEMS, n_attrs=6, max_attrs=3, d_model=32, bundle=g)
    attrs = torch.randint(0, 7, (N_ITEMS + 1, 3))
    attrs[0] = 0
    return build_model(cfg, attrs).eval()


@pytest.mark.parametrize("g", [2, 3, 4])
@pytest.mark.parametrize("batch,length", [(1, 1), (3, 7), (5, 33), (2, 64)])
def test_bundled_holomamba_step_reproduces_forward(g: int, batch: int, length: int) -> None:
    """Every item, including those that leave a group partial (served by a peek), matches forward."""
    assert worst_step_gap(bundled(g), left_padded(batch, length, seed=g)) < 1e-4


def test_bundled_state_commits_only_full_groups() -> None:
    m = bundled(3)
    with torch.no_grad():
        _, s2 = m.replay([7, 8])
        _, s3 = m.replay([7, 8, 9])
        _, s5 = m.replay([7, 8, 9, 10, 11])
    empty = m.init_state(1)
    assert torch.equal(s2["pending"], torch.tensor([[7, 8]])) and torch.equal(s2["ssm0"], empty["ssm0"])
    assert torch.equal(s3["pending"], torch.tensor([[0, 0]])) and not torch.equal(s3["ssm0"], empty["ssm0"])
    assert torch.equal(s5["pending"], torch.tensor([[10, 11]])) and torch.equal(s5["ssm1"], s3["ssm1"])
    assert len(pack(s2)[0]) == len(pack(m.replay(list(range(1, 41)) * 5)[1])[0]) == packed_size(empty)


@pytest.mark.parametrize("name", [*BASELINES, "holomamba-bundle3"])
def test_stepping_padding_is_a_no_op(name: str) -> None:
    m = bundled(3) if name == "holomamba-bundle3" else make(name)
    with torch.no_grad():
        _, state = m.replay([4, 5])
        _, after = m.step(torch.tensor([0]), state)
    assert all(torch.equal(state[k], after[k]) for k in state)


@pytest.mark.parametrize("name", ("gru4rec", "elastic"))
def test_step_reproduces_forward_past_max_len(name: str) -> None:
    """Recurrent models have no window: stepping 3x max_len still matches forward over the whole sequence."""
    assert worst_step_gap(make(name), left_padded(2, 192, seed=3)) < 1e-4


def test_sasrec_window_slides_past_max_len() -> None:
    """Past max_len, SASRec's step equals forward over the last max_len items (what training sees)."""
    m = make("sasrec", max_len=8)
    seq = torch.randint(1, N_ITEMS + 1, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        state = m.init_state(1)
        for t in range(20):
            h, state = m.step(seq[:, t], state)
            window = seq[:, max(0, t - 7) : t + 1]
            assert (h - m(window)[:, -1]).abs().max().item() < 1e-5
        assert torch.equal(state["items"], seq[:, -8:])


@pytest.mark.parametrize("name", BASELINES)
def test_left_padding_does_not_change_outputs(name: str) -> None:
    m = make(name)
    seq = torch.tensor([[5, 9, 2, 17]])
    padded = torch.tensor([[0, 0, 0, 5, 9, 2, 17]])
    with torch.no_grad():
        assert torch.allclose(m(seq), m(padded)[:, 3:], atol=1e-5)


@pytest.mark.parametrize("name", BASELINES)
def test_shapes_tied_table_and_eval_determinism(name: str) -> None:
    m = make(name, dropout=0.5)
    items = left_padded(4, 10)
    with torch.no_grad():
        h = m(items)
        assert h.shape == (4, 10, 32)
        table = m.item_table()
        assert table.shape == (N_ITEMS + 1, 32) and table[0].abs().max() == 0
        assert m.score(h[:, -1]).shape == (4, N_ITEMS + 1)
        assert torch.equal(m(items), h)  # dropout is off in eval mode
    m.train()
    loss = m.loss(items, torch.randint(0, N_ITEMS + 1, (4, 10)))
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", BASELINES)
def test_packed_state_size_independent_of_history(name: str) -> None:
    m = make(name)
    with torch.no_grad():
        _, short = m.replay([3])
        _, long = m.replay(list(range(1, N_ITEMS + 1)) * 5)
    for codec in ("float32", "float16", "int8"):
        sizes = {len(b) for b in pack(short, codec) + pack(long, codec)}
        assert sizes == {packed_size(m.init_state(1), codec)}


@pytest.mark.parametrize("name,bundle", [("holomamba", 1), ("holomamba", 3), *((b, 1) for b in BASELINES)])
def test_learns_next_item(name: str, bundle: int) -> None:
    """Item i is always followed by i + 1 (mod 20): 120 full-batch AdamW steps make that near-certain."""
    torch.manual_seed(0)
    n = 20
    cfg = ModelConfig(model=name, n_items=n, d_model=32, n_layers=1, max_len=12, dropout=0.0, n_memory=64, top_k_memory=4,
                      bundle=bundle)
    m = build_model(cfg)
    starts = torch.arange(30) % n  # (u,)
    seqs = (starts[:, None] + torch.arange(11)) % n + 1  # (u, 11): i, i+1, ... (mod n), 1-based
    seqs[::3, :4] = 0  # some rows left-padded
    x, y = seqs[:, :-1], seqs[:, 1:] * (seqs[:, :-1] > 0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    with torch.no_grad():
        first = m.loss(x, y).item()
    for _ in range(120):
        loss = m.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 < first / 5


def test_holomamba_embed_matches_item_table() -> None:
    """HoloMambaRec encodes only the stepped items' rows; they must equal the full table's rows."""
    torch.manual_seed(0)
    cfg = ModelConfig(model="holomamba", n_items=N_ITEMS, n_attrs=6, max_attrs=3, d_model=32)
    attrs = torch.randint(0, 7, (N_ITEMS + 1, 3))
    attrs[0] = 0
    m = build_model(cfg, attrs)
    items = left_padded(3, 8)
    assert torch.allclose(m.embed(items), m.item_table()[items], atol=1e-6)
    assert m.embed(items[:, 0]).shape == (3, 32)
    # without gradients (serving, evaluation) the table is cached; a weight update must invalidate it
    with torch.no_grad():
        before = m.embed(items)
        assert torch.allclose(before, m.item_table()[items], atol=1e-6)
        m.encoder.attr.weight.mul_(2.0)  # what an optimizer step or load_state_dict does: in place
        after = m.embed(items)
        assert torch.allclose(after, m.item_table()[items], atol=1e-6) and not torch.allclose(after, before)
        assert torch.allclose(m.score(after[:, -1]), after[:, -1] @ m.item_table().T, atol=1e-5)


@pytest.mark.parametrize("name", [*BASELINES, "holomamba-bundle3", "holomamba-item-bias"])
def test_checkpoint_round_trip(name: str, tmp_path) -> None:
    from model.checkpoint import Checkpoint, load, save

    m = bundled(3) if name == "holomamba-bundle3" else make("holomamba", item_bias=True) if name == "holomamba-item-bias" else make(name)
    if name == "holomamba-item-bias":
        with torch.no_grad():
            m.item_bias.normal_()
    save(Checkpoint(m, [f"item{i}" for i in range(1, N_ITEMS + 1)]), tmp_path)
    back = load(tmp_path).model
    assert back.config == m.config
    items = left_padded(3, 9)
    with torch.no_grad():
        assert torch.equal(m.score(m.user_vector(items)), back.score(back.user_vector(items)))
