"""HoloMambaRec: HRR item+attribute encoder -> dropout -> N selective SSM blocks -> norm, tied scoring.

Shape letters: b batch, l length, d model dim, v items + 1, e inner dim, n state dim, k conv width.
The per-user serving state is, for each layer i, `conv{i}` (b, e, k-1) and `ssm{i}` (b, e, n):
constant size whatever the history length.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from model.hrr import ItemEncoder, bind
from model.protocol import ModelConfig, SeqRecModel, State
from model.ssm import SelectiveSSM


class HoloMambaRec(SeqRecModel):
    def __init__(self, config: ModelConfig, item_attrs: Tensor | None = None) -> None:
        super().__init__(config, item_attrs)
        c = config
        self.encoder = ItemEncoder(c.n_items, c.n_attrs, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(SelectiveSSM(c.d_model, c.d_state, c.expand, c.d_conv) for _ in range(c.n_layers))
        self.norm = nn.LayerNorm(c.d_model)

    def item_table(self) -> Tensor:  # (v, d)
        return self.encoder(self.item_attrs)

    def embed(self, items: Tensor) -> Tensor:  # (...) -> (..., d): the rows of item_table for these items
        """ItemEncoder's formula applied to just these rows: a served event must not re-encode the
        whole catalogue (20x the rest of a step at 3706 items). tests/test_baselines.py checks it
        equals indexing item_table()."""
        v = self.encoder.item(items)  # (..., d)
        attrs = self.item_attrs[items]  # (..., m)
        if attrs.shape[-1] == 0:
            return v
        a = self.encoder.attr(attrs)  # (..., m, d)
        n = (attrs > 0).sum(-1, keepdim=True)  # (..., 1)
        return (v + a.sum(-2) + bind(v[..., None, :], a).sum(-2)) / torch.sqrt(1 + 2 * n)

    def forward(self, items: Tensor) -> Tensor:  # (b, l) -> (b, l, d)
        mask = items > 0  # (b, l)
        x = self.drop(self.embed(items))  # (b, l, d)
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)

    def init_state(self, batch_size: int) -> State:
        state: State = {}
        for i, layer in enumerate(self.layers):
            state[f"conv{i}"], state[f"ssm{i}"] = layer.init_state(batch_size)
        return state

    def step(self, items: Tensor, state: State) -> tuple[Tensor, State]:  # (b,) -> (b, d)
        x = self.drop(self.embed(items))  # (b, d)
        new: State = {}
        for i, layer in enumerate(self.layers):
            x, new[f"conv{i}"], new[f"ssm{i}"] = layer.step(x, state[f"conv{i}"], state[f"ssm{i}"])
        return self.norm(x), new
