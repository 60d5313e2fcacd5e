"""SASRec (Kang & McAuley, 2018): causal self-attention over the last max_len items; the replay baseline.

Shape letters: b batch, l length, d model dim, h heads, e head dim (d / h), w window (max_len).

Positions: item s gets position p_s = (number of real items before s in the input), clamped to
max_len - 1. Counting from the first real item means left padding never shifts a position, and
the prefix a causal query at t sees is positioned the same whether it is the end of the input
or the middle of a longer one. Hence:
    forward(x)[:, t] == forward(x[:, :t + 1])[:, -1]          (causality + left-aligned positions)
and `step` reproduces `forward` at every real position while the history fits the window.

Serving: SASRec has no O(1) recurrence, so its state is the window itself,
`{"items": (b, w) long}`, left-padded. `step` shifts the new item in and re-runs `forward` over
the window, returning the last position: O(w^2) per event. Once a history is longer than w,
the window holds its last w items, positioned from 0 again, exactly what training sees (the
training rows are the last max_len items too). `step` with item 0 leaves the window unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.protocol import ModelConfig, SeqRecModel, State, item_embedding


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm x), then x + ffn(norm x) (point-wise, as in SASRec)."""

    def __init__(self, d: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.h = n_heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d, d))
        self.drop = nn.Dropout(dropout)
        self.p = dropout

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:  # (b, l, d), (b, 1, l, l) bool -> (b, l, d)
        b, l, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, l, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)  # (b, h, l, e) each
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, l, d)))  # (b, l, d)
        return x + self.drop(self.ffn(self.norm2(x)))


class SASRec(SeqRecModel):
    def __init__(self, config: ModelConfig, item_attrs: Tensor | None = None) -> None:
        super().__init__(config, item_attrs)
        c = config
        if c.d_model % c.n_heads:
            raise ValueError(f"d_model {c.d_model} is not divisible by n_heads {c.n_heads}")
        self.items = item_embedding(c.n_items, c.d_model)
        self.pos = nn.Embedding(c.max_len, c.d_model)
        nn.init.normal_(self.pos.weight, std=c.d_model**-0.5)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c.d_model, c.n_heads, c.dropout) for _ in range(c.n_layers))
        self.norm = nn.LayerNorm(c.d_model)

    def item_table(self) -> Tensor:  # (v, d)
        return self.items.weight

    def forward(self, items: Tensor) -> Tensor:  # (b, l) -> (b, l, d)
        l = items.shape[1]
        mask = items > 0  # (b, l)
        pos = (mask.cumsum(1) - 1).clamp(0, self.config.max_len - 1)  # (b, l): real items before this one
        x = self.drop((self.embed(items) + self.pos(pos)) * mask[..., None])  # (b, l, d)
        causal = torch.ones(l, l, dtype=torch.bool, device=items.device).tril()  # (l, l): key <= query
        # a query sees real keys at or before it; padding queries also see themselves (no all-masked rows)
        allowed = (causal & mask[:, None, :]) | torch.eye(l, dtype=torch.bool, device=items.device)  # (b, l, l)
        for block in self.blocks:
            x = block(x, allowed[:, None])
        return self.norm(x) * mask[..., None]  # (b, l, d); padding positions are zero

    def init_state(self, batch_size: int) -> State:
        return {"items": torch.zeros(batch_size, self.config.max_len, dtype=torch.long)}

    def step(self, items: Tensor, state: State) -> tuple[Tensor, State]:  # (b,) -> (b, d)
        window = torch.cat([state["items"][:, 1:], items[:, None]], dim=1)  # (b, w)
        window = torch.where((items > 0)[:, None], window, state["items"])  # item 0: unchanged
        return self.forward(window)[:, -1], {"items": window}
