"""The step contract, HRR algebra, state packing and checkpoints of the core model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, build_model
from model.checkpoint import Checkpoint, CheckpointError, load, save
from model.hrr import bind, bundle, unbind
from model.state import CODECS, SMALL_BATCH, pack, packed_size, unpack


def make_model(name: str = "holomamba", n_items: int = 40, seed: int = 0, **kw: object):
    torch.manual_seed(seed)
    cfg = ModelConfig(model=name, n_items=n_items, n_attrs=6, max_attrs=3, d_model=32, **kw)
    attrs = torch.randint(0, 7, (n_items + 1, 3))
    attrs[0] = 0
    attrs[1] = 0  # an item without attributes
    return build_model(cfg, attrs).eval()


def left_padded(batch: int, length: int, n_items: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, n_items + 1, (batch, length), generator=g)
    for b in range(batch):
        items[b, : int(torch.randint(0, length, (1,), generator=g))] = 0  # random amount of padding
    return items


@pytest.mark.parametrize("batch,length", [(1, 1), (3, 7), (5, 33), (2, 64)])
def test_step_reproduces_forward_holomamba(batch: int, length: int) -> None:
    m = make_model()
    items = left_padded(batch, length, 40)
    with torch.no_grad():
        full = m(items)  # (b, l, d)
        state = m.init_state(batch)
        # step all rows together; padding rows are skipped by keeping their old state
        worst = 0.0
        for t in range(length):
            h, new = m.step(items[:, t], state)
            real = items[:, t] > 0
            for k in state:
                state[k] = torch.where(real.view(-1, *[1] * (state[k].dim() - 1)), new[k], state[k])
            if real.any():
                worst = max(worst, (h[real] - full[real, t]).abs().max().item())
    assert worst < 1e-4


def test_swiglu_and_encoder_mix_keep_the_step_contract_start_from_the_formula_and_learn() -> None:
    """ffn_glu (SwiGLU feed-forward, GELU's parameter count within 1%) and encoder_mix (per-channel gains on the item,
    attribute and bound terms, ones to start: the plain encoder's table, and undecayed)."""
    from model.train import optimizer
    from tests.test_baselines import worst_step_gap

    m, plain = make_model(ffn_glu=True, encoder_mix=True), make_model()
    n_ffn = lambda model: sum(p.numel() for p in model.ffns.parameters())  # noqa: E731
    assert abs(n_ffn(m) / n_ffn(plain) - 1) < 0.01
    plain_enc = {k: v for k, v in m.state_dict().items() if k.startswith("encoder.") and not k.split(".")[1].startswith("g_")}
    plain.load_state_dict(plain_enc, strict=False)
    with torch.no_grad():
        assert torch.allclose(m.item_table(), plain.item_table(), atol=1e-6)  # gains of one: the formula
        m.encoder.g_bind.normal_()
        assert not torch.allclose(m.item_table(), plain.item_table(), atol=1e-3)
    items = left_padded(3, 20, 40)
    assert worst_step_gap(m, items) < 1e-4  # the step path reproduces forward with both options on
    m.train()
    m.loss(items[:, :-1], items[:, 1:]).backward()
    assert all(g.grad.abs().sum() > 0 for g in (m.encoder.g_item, m.encoder.g_attr, m.encoder.g_bind))
    undecayed = {id(p) for group in optimizer(m, 1e-3).param_groups if group["weight_decay"] == 0 for p in group["params"]}
    assert id(m.encoder.g_bind) in undecayed


def test_padding_does_not_change_outputs() -> None:
    m = make_model()
    seq = torch.tensor([[5, 9, 2, 17]])
    padded = torch.tensor([[0, 0, 0, 5, 9, 2, 17]])
    with torch.no_grad():
        assert torch.allclose(m(seq)[0, -1], m(padded)[0, -1], atol=1e-5)


def test_shapes_and_tied_scores() -> None:
    m = make_model()
    items = left_padded(4, 10, 40)
    with torch.no_grad():
        h = m(items)
        assert h.shape == (4, 10, 32)
        table = m.item_table()
        assert table.shape == (41, 32) and table[0].abs().max() == 0
        assert m.score(h[:, -1]).shape == (4, 41)
    m.train()
    loss = m.loss(items, torch.randint(0, 41, (4, 10)))
    loss.backward()
    assert torch.isfinite(loss)


def test_contrastive_term_adds_to_the_training_loss_only() -> None:
    """cl_weight > 0: in training, the cross-entropy plus the weighted two-view term; in eval mode the plain
    cross-entropy, so evaluation and serving never see it."""
    items, targets = left_padded(6, 10, 40), torch.randint(1, 41, (6, 10), generator=torch.Generator().manual_seed(2))
    plain, cl = make_model(dropout=0.3), make_model(dropout=0.3, cl_weight=0.5)  # same seed: same weights
    with torch.no_grad():
        assert torch.equal(plain.loss(items, targets), cl.loss(items, targets))
    plain.train(), cl.train()
    torch.manual_seed(3)
    ce = plain.loss(items, targets)
    torch.manual_seed(3)  # the same dropout masks for the first view
    both = cl.loss(items, targets)
    assert both.item() > ce.item() + 0.1  # InfoNCE over 6 rows is ~log 6 at the start
    both.backward()
    assert all(p.grad is not None for p in cl.layers.parameters() if p.requires_grad)


def test_hrr_unbind_recovers_and_degrades_with_bundling() -> None:
    torch.manual_seed(0)
    d, trials = 64, 200
    cos = {}
    for k in (1, 4, 16):
        keys, vals = torch.randn(trials, k, d) / d**0.5, torch.randn(trials, k, d) / d**0.5
        trace = bundle(bind(keys, vals), dim=1)  # (trials, d)
        rec = unbind(trace, keys[:, 0])
        cos[k] = F.cosine_similarity(rec, vals[:, 0], dim=-1).mean().item()
    assert cos[1] > 0.5
    assert cos[1] > cos[4] > cos[16] > 0.1  # recoverable, noisier as more are bundled


def test_bind_is_circular_convolution() -> None:
    a, b = torch.randn(8), torch.randn(8)
    direct = torch.stack([sum(a[j] * b[(i - j) % 8] for j in range(8)) for i in range(8)])
    assert torch.allclose(bind(a, b), direct, atol=1e-5)


@pytest.mark.parametrize("codec", CODECS)
def test_state_packing_round_trip_and_constant_size(codec: str) -> None:
    m = make_model()
    with torch.no_grad():
        _, short = m.replay([3, 4, 5])
        _, long = m.replay(list(range(1, 41)) * 10)
    blobs = pack(short, codec) + pack(long, codec)
    assert len(blobs[0]) == len(blobs[1]) == packed_size(m.init_state(1), codec)
    back = unpack(blobs, m.init_state(1), codec)
    tol = {"float32": 0.0, "float16": 1e-2, "int8": 5e-2, "int8-rows": 5e-2}[codec]
    for k in long:
        scale = long[k].abs().max().item() + 1e-6
        assert (back[k][1:] - long[k]).abs().max().item() <= tol * scale + 1e-7
    with pytest.raises(ValueError, match="expected"):
        unpack([blobs[0][:-1]], m.init_state(1), codec)


def test_int8_rows_keeps_each_channels_precision() -> None:
    """Channels a thousand times apart: one scale per tensor rounds the small ones to zero, one per row does not."""
    x = torch.randn(2, 6, 16) * torch.tensor([1e-3, 1e-2, 1.0, 10.0, 1e-3, 1.0])[None, :, None]  # (b, channels, state)
    template = {"h": torch.zeros(1, 6, 16)}
    for codec, worst in (("int8", 0.5), ("int8-rows", 0.01)):
        back = unpack(pack({"h": x}, codec), template, codec)["h"]
        rel = ((back - x).abs().amax(2) / x.abs().amax(2))  # (b, channels): error relative to each channel's size
        assert (rel.max().item() > 0.5) == (codec == "int8") and rel.max().item() <= (1.0 if codec == "int8" else worst)
    assert packed_size(template, "int8-rows") == 6 * 2 + 6 * 16


@pytest.mark.parametrize("users", [1, 2, SMALL_BATCH + 1])  # numpy quantises the first two, torch the third
@pytest.mark.parametrize("codec", CODECS)
def test_packed_bytes_are_the_documented_layout(codec: str, users: int) -> None:
    """Stored records outlive the code: the blob is built here by hand from model/state.py's layout (tensors in
    sorted-name order; integers int32; float values in the codec, int8 after a float32 scale per tensor, int8-rows
    after a float16 scale per channel) and must equal what pack writes, for a small and a large batch at once."""
    state = {"b_ints": torch.randint(-500, 500, (users, 3)), "a": torch.randn(users, 3, 4) * torch.tensor([1e-3, 1.0, 50.0])[:, None],
             "c": torch.randn(users, 5)}
    want: list[bytes] = []
    for u in range(users):
        parts = []
        for k in sorted(state):
            t = state[k][u]
            if not t.is_floating_point():
                parts.append(t.numpy().astype("<i4").tobytes())
            elif codec in ("float32", "float16"):
                parts.append(t.numpy().astype("<f4" if codec == "float32" else "<f2").tobytes())
            else:  # int8: the whole tensor is one row; int8-rows: a row per channel
                rows = t.reshape(1, -1).numpy() if codec == "int8" or t.dim() < 2 else t.reshape(t.shape[0], -1).numpy()
                peaks = np.abs(rows).max(axis=1)
                scales = (np.maximum(peaks, 1e-30) / np.float32(127)).astype("<f4") if codec == "int8" else \
                    (np.clip(peaks, 2.0**-14, 6e4) / np.float32(127)).astype("<f2")
                q = np.clip(np.rint(rows / scales.astype(np.float32)[:, None]), -127, 127).astype(np.int8)
                parts += [scales.tobytes(), q.tobytes()]
        want.append(b"".join(parts))
    assert pack(state, codec) == want


def test_checkpoint_round_trip_identical_scores(tmp_path) -> None:
    m = make_model()
    ckpt = Checkpoint(m, [f"item{i}" for i in range(1, 41)], [f"a{j}" for j in range(1, 7)], [3, 1, 2], {"dataset": "test"})
    version = save(ckpt, tmp_path)
    back = load(tmp_path)
    assert back.version == version and back.items == ckpt.items and back.popular == [3, 1, 2]
    items = left_padded(3, 9, 40)
    with torch.no_grad():
        assert torch.equal(m.score(m.user_vector(items)), back.model.score(back.model.user_vector(items)))


def test_corrupt_and_tampered_checkpoints_are_refused(tmp_path) -> None:
    save(Checkpoint(make_model(), [f"i{i}" for i in range(40)]), tmp_path)
    weights = tmp_path / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match="model.safetensors.*sha256"):
        load(tmp_path)
    weights.write_bytes(good)
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    meta["popular"] = [1]
    (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="checkpoint.json.*version"):
        load(tmp_path)
    (tmp_path / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="checkpoint.json.*JSON"):
        load(tmp_path)
    with pytest.raises(CheckpointError, match="missing"):
        load(tmp_path / "nowhere")


@pytest.mark.parametrize("length", [1, 7, 16, 17, 50, 70])
def test_selective_scan_values_and_gradients_match_the_loop(length: int) -> None:
    """The chunked scan (chunks of 16, a doubling scan over chunk carries) and its hand-written
    backward agree with autograd through the plain loop, across chunk boundaries and padding."""
    from model.ssm import selective_scan, selective_scan_loop

    g = torch.Generator().manual_seed(length)
    b, e, n = 3, 5, 4
    dt = torch.rand(b, length, e, generator=g, dtype=torch.float64)
    dt[0, : length // 3] = 0  # padding: dt = 0
    args = [dt, torch.randn(b, length, e, generator=g, dtype=torch.float64), -2 * torch.rand(e, n, generator=g, dtype=torch.float64),
            torch.randn(b, length, n, generator=g, dtype=torch.float64), torch.randn(b, length, n, generator=g, dtype=torch.float64)]
    fast, slow = [x.clone().requires_grad_() for x in args], [x.clone().requires_grad_() for x in args]
    y_fast, y_slow = selective_scan(*fast), selective_scan_loop(*slow)
    assert torch.allclose(y_fast, y_slow, atol=1e-10)
    gy = torch.randn(y_fast.shape, generator=g, dtype=torch.float64)
    (y_fast * gy).sum().backward()
    (y_slow * gy).sum().backward()
    for name, x, z in zip(["dt", "u", "A", "B", "C"], fast, slow):
        assert torch.allclose(x.grad, z.grad, atol=1e-10), name


@pytest.mark.parametrize("first,second", [(5, 7), (20, 40), (50, 17)])
def test_a_carried_state_continues_the_sequence(first: int, second: int) -> None:
    """forward over the second part from the state after the first (conv window and h, as `step` holds them) gives
    what forward over the whole gives there, and the same gradients for the second part's inputs: what burn-in
    training (config.burn_in) relies on. The state is a constant, as in truncated backpropagation through time."""
    from model.ssm import SelectiveSSM

    torch.manual_seed(0)
    block = SelectiveSSM(16, d_state=4).double()
    x = torch.randn(2, first + second, 16, dtype=torch.float64)
    mask = torch.ones(2, first + second, dtype=torch.bool)
    whole = x.clone().requires_grad_()
    y_whole = block(whole, mask)[:, first:]
    with torch.no_grad():
        _, conv, h = block.forward_state(x[:, :first], mask[:, :first])
    part = x[:, first:].clone().requires_grad_()
    y_part = block(part, mask[:, first:], (conv, h))
    assert torch.allclose(y_part, y_whole, atol=1e-9)
    gy = torch.randn(y_part.shape, dtype=torch.float64)
    (y_part * gy).sum().backward()
    (y_whole * gy).sum().backward()
    assert torch.allclose(part.grad, whole.grad[:, first:], atol=1e-9)
