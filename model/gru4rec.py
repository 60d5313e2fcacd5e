"""GRU4Rec (Hidasi et al., 2016) behind the step contract: item embedding -> dropout -> GRU -> linear.

Shape letters: b batch, l length, d model dim, n GRU layers, v items + 1.

The GRU hidden state is the whole per-user state, `{"h": (b, n, d)}` (batch first, unlike
nn.GRU's (n, b, d)). Padding must leave it untouched, so `forward` runs the GRU over the real
items only: each row's real items are moved to the front, fed as a packed sequence, and the
outputs put back in place. Padding positions therefore never touch the state, and `step`
from `init_state` reproduces `forward` at every real position. `step` with item 0 is a no-op
on the state, for the same reason.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from model.protocol import ModelConfig, SeqRecModel, State, item_embedding


class GRU4Rec(SeqRecModel):
    # its step traces exactly, but `holorec bench step` timed the frozen trace 4x slower than eager at batch 64
    # (2.05 against 0.52 ms, 2026-12-01): serving keeps the eager step
    def __init__(self, config: ModelConfig, item_attrs: Tensor | None = None) -> None:
        super().__init__(config, item_attrs)
        c = config
        self.items = item_embedding(c.n_items, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.gru = nn.GRU(c.d_model, c.d_model, c.n_layers, batch_first=True, dropout=c.dropout if c.n_layers > 1 else 0.0)
        self.out = nn.Linear(c.d_model, c.d_model)  # frees the logit scale from the GRU's (-1, 1) range

    def item_table(self) -> Tensor:  # (v, d)
        return self.items.weight

    def _run(self, items: Tensor) -> tuple[Tensor, Tensor]:  # (b, l) -> GRU outputs (b, l, d), final hidden (b, n, d)
        b, l = items.shape
        mask = items > 0  # (b, l)
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # (b, l): real items first, in order
        x = self.drop(self.embed(items.gather(1, order)))  # (b, l, d)
        lengths = mask.sum(1)  # (b,)
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        y, h = self.gru(packed)  # h (n, b, d): each row's hidden state after its last real item
        y, _ = pad_packed_sequence(y, batch_first=True, total_length=l)  # (b, l, d), zeros past each length
        y = torch.zeros_like(y).scatter(1, order[..., None].expand_as(y), y)  # back to the input's positions
        h = torch.where((lengths > 0)[:, None, None], h.transpose(0, 1), 0.0)  # (b, n, d); no items: the initial zeros
        return y * mask[..., None], h

    def forward(self, items: Tensor) -> Tensor:  # (b, l) -> (b, l, d)
        return self.out(self._run(items)[0]) * (items > 0)[..., None]  # (b, l, d); padding positions are zero

    def forward_state(self, items: Tensor) -> tuple[Tensor, State]:  # (b, l) left-padded -> (b, d), state
        """nn.GRU's final hidden state of the packed sequence: one pass, no stepping."""
        y, h = self._run(items)
        return self.out(y[:, -1]), {"h": h}

    def init_state(self, batch_size: int) -> State:
        return {"h": torch.zeros(batch_size, self.config.n_layers, self.config.d_model)}

    def step(self, items: Tensor, state: State) -> tuple[Tensor, State]:  # (b,) -> (b, d)
        x = self.drop(self.embed(items))[:, None]  # (b, 1, d)
        y, h = self.gru(x, state["h"].transpose(0, 1).contiguous())  # (b, 1, d), (n, b, d)
        h = torch.where((items > 0)[:, None, None], h.transpose(0, 1), state["h"])  # (b, n, d); padding: no-op
        return self.out(y[:, 0]), {"h": h}
