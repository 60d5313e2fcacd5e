"""SASRec (Kang & McAuley, ICDM 2018) as published: causal self-attention over the last max_len items.

Shape letters: b batch, l length, d model dim, w window (max_len).

What follows the paper and its reference code:
- item embeddings scaled by sqrt(d), plus a learned position embedding, then dropout;
- positions count back from the end: in a (b, l) input, column t takes position max_len - l + t,
  so the most recent item is always at position max_len - 1, whatever the history length
  (training rows are left-padded to a common width, and the width never changes an output);
- one head by default, 2 blocks; per block (reference layer-norm placement):
      q = LN(x);  x = q + MHA(q, x, x);  x = LN(x);  x = x + FFN(x)  (point-wise, d -> d, ReLU)
  with dropout after attention weights, inside and after the FFN; padding positions zeroed after
  each block; a final layer norm. Dropout: 0.2 on MovieLens, 0.5 on Amazon (model/train.py).

Serving: SASRec has no O(1) recurrence, so its state is the window itself,
`{"items": (b, w) long}`, left-padded. `step` shifts the new item in and re-runs `forward` over
the window, returning the last position: O(w^2) per event. Once a history is longer than w,
the window holds its last w items, exactly what training sees (the training rows are the last
max_len items too). `step` with item 0 leaves the window unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.protocol import ModelConfig, SeqRecModel, State, item_embedding


class Block(nn.Module):
    """Attention with the query normalised (keys and values are not), then a point-wise FFN."""

    def __init__(self, d: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.h, self.p = n_heads, dropout
        self.norm_q, self.norm_ffn = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.kv = nn.Linear(d, d), nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.Dropout(dropout), nn.ReLU(), nn.Linear(d, d), nn.Dropout(dropout))

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:  # (b, l, d), (b, 1, l, l) bool -> (b, l, d)
        b, l, d = x.shape
        xq = self.norm_q(x)  # (b, l, d)
        q = self.q(xq).view(b, l, self.h, d // self.h).transpose(1, 2)  # (b, h, l, d / h)
        k, v = self.kv(x).view(b, l, 2, self.h, d // self.h).permute(2, 0, 3, 1, 4)  # (b, h, l, d / h) each
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.p if self.training else 0.0)
        x = self.norm_ffn(xq + self.proj(a.transpose(1, 2).reshape(b, l, d)))  # (b, l, d)
        return x + self.ffn(x)


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
        l, w = items.shape[1], self.config.max_len
        if l > w:
            raise ValueError(f"SASRec sees at most max_len = {w} items, got {l}")
        mask = items > 0  # (b, l)
        pos = torch.arange(w - l, w, device=items.device)  # (l,): the last column is always position w - 1
        x = self.drop((self.embed(items) * self.config.d_model**0.5 + self.pos(pos)) * mask[..., None])  # (b, l, d)
        causal = torch.ones(l, l, dtype=torch.bool, device=items.device).tril()  # (l, l): key <= query
        # a query sees real keys at or before it; padding queries also see themselves (no all-masked rows)
        allowed = ((causal & mask[:, None, :]) | torch.eye(l, dtype=torch.bool, device=items.device))[:, None]  # (b, 1, l, l)
        for block in self.blocks:
            x = block(x, allowed) * mask[..., None]
        return self.norm(x) * mask[..., None]  # (b, l, d); padding positions are zero

    def init_state(self, batch_size: int) -> State:
        return {"items": torch.zeros(batch_size, self.config.max_len, dtype=torch.long)}

    def step(self, items: Tensor, state: State) -> tuple[Tensor, State]:  # (b,) -> (b, d)
        window = torch.cat([state["items"][:, 1:], items[:, None]], dim=1)  # (b, w)
        window = torch.where((items > 0)[:, None], window, state["items"])  # item 0: unchanged
        return self.forward(window)[:, -1], {"items": window}
