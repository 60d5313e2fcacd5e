"""HoloMambaRec: HRR item+attribute encoder -> dropout -> N x (selective SSM block, feed-forward) -> norm, tied scoring.

Each layer is two residual sublayers, as Mamba4Rec (arXiv 2403.03900) wraps its Mamba layers: the
selective SSM mixes along time, then a point-wise feed-forward network (GELU) mixes channels; dropout
on each sublayer's output before the residual. The norms come first in each sublayer and once at the
end (pre-norm); config.post_norm places them as Mamba4Rec's code does, after each residual sum and on
the dropped input. The feed-forward has no state,
so serving's `step` applies it to the one position as `forward` does to every position.

Shape letters: b batch, l length, d model dim, v items + 1, e inner dim, n state dim, k conv width,
g bundle (items per SSM step), L groups (ceil(l / g)).
The per-user serving state is, for each layer i, `conv{i}` (b, e, k-1) and `ssm{i}` (b, e, n):
constant size whatever the history length.

Temporal bundling (config.bundle = g > 1). A user's items are cut into consecutive groups of g,
counted from their first item (left padding never shifts a group). Item slot i of a group is
bound to a learned role vector r_i and the bound pairs are superposed into one encoder input,
    x_j = sum_{i < p} bind(r_i, e_{item(j, i)}) / sqrt(g)        (p items of group j so far)
so the SSM runs one step per group: g times fewer recurrent steps.
Serving: the state holds the SSM states after the last *complete* group and `pending` (b, g-1),
the item indices of the partial group (0 = empty slot). An event fills the next slot; the user
vector is a "peek": one SSM step on the partial group's x_j from the committed state, not
committed. When the group fills up (p = g) the same step is committed and `pending` clears.
Training (`forward`) produces exactly those peeks for every item (SelectiveSSM.forward_peek):
the committed recurrence runs over full groups, and the output at the p-th item of group j is
the step on x_j with p items from the state after group j - 1. So `step` reproduces `forward`
at every position, and training sees the partial-group inputs serving feeds the model.
With g = 1 none of this is used and the model is the plain per-item HoloMambaRec.

Recent-items attention (config.recent_attn = K > 0; MaTrRec, arXiv 2407.19239, pairs Mamba with attention because
the SSM alone is weak on short sequences such as Amazon's). After the SSM layers, the user vector at each position
reads, by one-head attention, the embeddings of the user's last K items (this one included) plus a learned
embedding of how recent each is. Serving keeps those K item ids in the state as `recent` (b, K), oldest first:
K small integers, so the state stays constant-size and `step` still reproduces `forward`.

Item-id dropout (config.item_dropout = p > 0, training only). Each item's own vector v_i is zeroed with probability p,
per input position and per row of the scoring table, so the item is encoded from its attributes alone, as a rare
item nearly is: training leans on what items share. Evaluation and serving never drop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.hrr import ItemEncoder, bind
from model.protocol import ModelConfig, SeqRecModel, State
from model.ssm import SelectiveSSM


class FeedForward(nn.Module):
    """x + dropout(W2 dropout(GELU(W1 LN(x)))): point-wise, so the same on a sequence and on one step.
    `post_norm`: LN(x + dropout(W2 dropout(GELU(W1 x)))), Mamba4Rec's placement."""

    def __init__(self, d: int, mult: int, dropout: float, post_norm: bool = False) -> None:
        super().__init__()
        body = [nn.Linear(d, mult * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(mult * d, d), nn.Dropout(dropout)]
        self.post = post_norm
        self.net = nn.Sequential(*body) if post_norm else nn.Sequential(nn.LayerNorm(d), *body)
        if post_norm:
            self.norm = nn.LayerNorm(d)

    def forward(self, x: Tensor) -> Tensor:  # (..., d) -> (..., d)
        return self.norm(x + self.net(x)) if self.post else x + self.net(x)


class SwiGLU(nn.Module):
    """x + dropout(W2 dropout(SiLU(W1 LN(x)) * W3 LN(x))) (Shazeer 2020, "GLU Variants Improve Transformer"); hidden
    2/3 of mult * d, so it has the GELU feed-forward's parameters. Point-wise, like FeedForward."""

    def __init__(self, d: int, mult: int, dropout: float) -> None:
        super().__init__()
        h = round(2 * mult * d / 3)
        self.norm, self.gate_up, self.down = nn.LayerNorm(d), nn.Linear(d, 2 * h), nn.Linear(h, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # (..., d) -> (..., d)
        gate, up = self.gate_up(self.norm(x)).chunk(2, dim=-1)  # (..., h) each
        return x + self.drop(self.down(self.drop(F.silu(gate) * up)))


class RecentAttention(nn.Module):
    """x + dropout(W_o sum_j a_j W_v(e_j + r_j)),  a = softmax_j(W_q LN(x) . W_k(e_j + r_j) / sqrt d) over the last K items."""

    def __init__(self, d: int, k: int, dropout: float) -> None:
        super().__init__()
        self.norm, self.q, self.kv, self.out = nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.recency = nn.Parameter(torch.zeros(k, d))  # (K, d): row K-1 is the newest item
        self.drop, self.scale = nn.Dropout(dropout), d**-0.5

    def forward(self, x: Tensor, e: Tensor, ids: Tensor) -> Tensor:  # (..., d), (..., K, d), (..., K) -> (..., d)
        keys, values = self.kv(e + self.recency).chunk(2, dim=-1)  # (..., K, d) each
        att = (keys @ self.q(self.norm(x))[..., None])[..., 0] * self.scale  # (..., K)
        att = att.masked_fill(ids == 0, -1e9).softmax(-1)  # an empty slot gets no weight (all empty: padding rows only)
        return x + self.drop(self.out((att[..., None] * values).sum(-2)))


class HoloMambaRec(SeqRecModel):
    def __init__(self, config: ModelConfig, item_attrs: Tensor | None = None) -> None:
        super().__init__(config, item_attrs)
        c = config
        self.encoder = ItemEncoder(c.n_items, c.n_attrs, c.d_model, mix=c.encoder_mix)
        self.drop = nn.Dropout(c.dropout if c.emb_dropout < 0 else c.emb_dropout)
        self.layers = nn.ModuleList(SelectiveSSM(c.d_model, c.d_state, c.expand, c.d_conv, c.dropout, (c.dt_min, c.dt_max), c.post_norm)
                                    for _ in range(c.n_layers))
        if c.post_norm and (c.ffn_glu or c.recent_attn):
            raise ValueError("post_norm is built for the GELU feed-forward without recent_attn")
        block = (lambda: SwiGLU(c.d_model, c.ffn_mult, c.dropout)) if c.ffn_glu else (lambda: FeedForward(c.d_model, c.ffn_mult, c.dropout, c.post_norm))
        ffn = block if c.ffn_mult > 0 else nn.Identity
        self.ffns = nn.ModuleList(ffn() for _ in range(c.n_layers))
        # post_norm: the dropped input is normed (Mamba4Rec) and every sublayer ends in a norm, so none is added at the end
        self.in_norm = nn.LayerNorm(c.d_model) if c.post_norm else nn.Identity()
        self.norm = nn.Identity() if c.post_norm else nn.LayerNorm(c.d_model)
        self.k = c.recent_attn
        if self.k:
            if c.bundle > 1:
                raise ValueError("recent_attn is not supported with temporal bundling")
            self.recent = RecentAttention(c.d_model, self.k, c.dropout)
        if c.bundle < 1:
            raise ValueError(f"bundle must be >= 1, got {c.bundle}")
        self.g = c.bundle
        self.traceable_step = self.g == 1  # bundling's step branches on how full the pending group is
        if self.g > 1:  # slot roles, random HRR vectors N(0, 1/d) to start, learned jointly
            self.roles = nn.Parameter(torch.randn(self.g, c.d_model) * c.d_model**-0.5)  # (g, d)

    def inp(self, e: Tensor) -> Tensor:  # (..., d) item vectors -> the encoder's input
        """config.embed_scale: sqrt(d) times the item vector, so the item's own signal in the residual stream is not
        small against the sublayers' outputs while the tied scoring table keeps norm ~1 vectors."""
        return self.in_norm(self.drop(e * self.config.d_model**0.5 if self.config.embed_scale else e))

    def item_table(self) -> Tensor:  # (v, d)
        return self.encoder.encode(self.drop_ids(self.encoder.item.weight), self.item_attrs)

    def drop_ids(self, v: Tensor) -> Tensor:  # (..., d) item vectors -> the same, some rows zeroed in training
        """config.item_dropout: an item then reads as its attributes alone, as a rare item nearly does. Data without
        attributes is left alone: dropping an item's vector would leave nothing of it."""
        p = self.config.item_dropout
        if not (self.training and p > 0 and self.config.n_attrs > 0):
            return v
        return v * (torch.rand(v.shape[:-1] + (1,), device=v.device) >= p)

    def attribute_loss(self, h: Tensor, targets: Tensor) -> Tensor:  # (n, d), (n,) -> ()
        """Cross-entropy of softmax(h . a_j) over all attributes against the next item's attributes, shared equally
        (rows whose item has none skipped): S3-Rec (Zhou et al., CIKM 2020) found predicting items' attributes a useful
        signal on Amazon data. The a_j are the encoder's attribute vectors, the ones items are built from."""
        attrs = self.item_attrs[targets]  # (n, m), 0 = none
        want = torch.zeros(len(h), self.config.n_attrs + 1, device=h.device).scatter_(1, attrs, 1.0)[:, 1:]  # (n, A)
        rows = want.sum(1) > 0  # (n,)
        logp = F.log_softmax(h[rows] @ self.encoder.attr.weight[1:].T, dim=-1)  # (r, A)
        want = want[rows] / want[rows].sum(1, keepdim=True)
        return -(want * logp).sum(1).mean() if rows.any() else h.sum() * 0

    def embed(self, items: Tensor) -> Tensor:  # (...) -> (..., d): the rows of item_table for these items
        """ItemEncoder's formula applied to just these rows: a served event must not re-encode the
        whole catalogue (20x the rest of a step at 3706 items). tests/test_baselines.py checks it
        equals indexing item_table(). Without gradients (serving) the cached table is cheaper still."""
        if not torch.is_grad_enabled():
            return super().embed(items)
        return self.encoder.encode(self.drop_ids(self.encoder.item(items)), self.item_attrs[items])

    def forward(self, items: Tensor, state: State | None = None) -> Tensor:  # (b, l) -> (b, l, d)
        """`state`: the state after the items before these (forward_state), carried in as a constant; rows with a
        non-zero state must have no left padding (burn-in training gives those rows full windows)."""
        if self.g > 1:
            if state is not None:
                raise ValueError("a carried state is not supported with temporal bundling")
            return self._forward_bundled(items)
        if self.k and state is not None:
            raise ValueError("a carried state is not supported with recent_attn")
        mask = items > 0  # (b, l)
        e = self.embed(items)  # (b, l, d)
        x = self.inp(e)
        for i, (layer, ffn) in enumerate(zip(self.layers, self.ffns)):
            x = ffn(layer(x, mask, None if state is None else (state[f"conv{i}"], state[f"ssm{i}"])))  # (b, l, d)
        if self.k:  # position t reads items t-K+1 .. t
            ids = F.pad(items, (self.k - 1, 0)).unfold(1, self.k, 1)  # (b, l, K)
            x = self.recent(x, F.pad(e, (0, 0, self.k - 1, 0)).unfold(1, self.k, 1).transpose(-1, -2), ids)  # (b, l, d)
        return self.norm(x)

    def init_state(self, batch_size: int) -> State:
        state: State = {}
        for i, layer in enumerate(self.layers):
            state[f"conv{i}"], state[f"ssm{i}"] = layer.init_state(batch_size)
        if self.g > 1:
            state["pending"] = torch.zeros(batch_size, self.g - 1, dtype=torch.long)  # partial group, slot order
        if self.k:
            state["recent"] = torch.zeros(batch_size, self.k, dtype=torch.long)  # the last K items, oldest first, 0 = none
        return state

    def step(self, items: Tensor, state: State) -> tuple[Tensor, State]:  # (b,) -> (b, d)
        if self.g > 1:
            return self._step_bundled(items, state)
        x = self.inp(self.embed(items))  # (b, d)
        new: State = {}
        for i, (layer, ffn) in enumerate(zip(self.layers, self.ffns)):
            x, new[f"conv{i}"], new[f"ssm{i}"] = layer.step(x, state[f"conv{i}"], state[f"ssm{i}"])
            x = ffn(x)  # (b, d)
        if self.k:
            new["recent"] = torch.cat([state["recent"][:, 1:], items[:, None]], 1)  # (b, K)
            x = self.recent(x, self.embed(new["recent"]), new["recent"])  # (b, d)
        return self.norm(x), new

    def forward_state(self, items: Tensor) -> tuple[Tensor, State]:  # (b, l) left-padded -> (b, d), state
        """The user vector and state after each row's items in one parallel pass (bundled models step)."""
        if self.g > 1:
            return super().forward_state(items)
        mask = items > 0  # (b, l)
        e = self.embed(items)  # (b, l, d)
        x = self.inp(e)
        state: State = {}
        for i, (layer, ffn) in enumerate(zip(self.layers, self.ffns)):
            x, state[f"conv{i}"], state[f"ssm{i}"] = layer.forward_state(x, mask)
            x = ffn(x)  # (b, l, d)
        x = x[:, -1]  # (b, d)
        if self.k:
            state["recent"] = F.pad(items, (self.k, 0))[:, -self.k :]  # (b, K): left padding is already 0
            x = self.recent(x, F.pad(e, (0, 0, self.k, 0))[:, -self.k :], state["recent"])
        return self.norm(x), state

    # --- temporal bundling (g > 1) -----------------------------------------------------
    def _group_input(self, slots: Tensor) -> Tensor:  # (..., g) item per slot, 0 = empty -> (..., g, d)
        """Prefix bundles: [..., p, :] = sum_{i <= p} bind(r_i, e_i) / sqrt(g), the input after p + 1 items."""
        bound = bind(self.roles, self.inp(self.embed(slots)))  # (..., g, d); empty slots bind a zero vector
        return bound.cumsum(-2) / self.g**0.5

    def _forward_bundled(self, items: Tensor) -> Tensor:  # (b, l) -> (b, l, d)
        b, l = items.shape
        g, L = self.g, -(-l // self.g)
        mask = items > 0  # (b, l)
        k = mask.cumsum(1) - 1  # (b, l): index of each real item in the user's (windowed) history
        groups = (k[:, -1:] + g) // g  # (b, 1): groups this row has, the last possibly partial
        # real item -> flat slot (group position right-aligned, so groups are left-padded); padding -> a spill slot
        flat = torch.where(mask, (L - groups + k.div(g, rounding_mode="floor")) * g + k % g, L * g)  # (b, l)
        slots = torch.zeros(b, L * g + 1, dtype=items.dtype, device=items.device).scatter(1, flat, items)
        slots = slots[:, :-1].view(b, L, g)  # (b, L, g)
        x = self._group_input(slots)  # (b, L, g, d): x[:, j, p] = group j after p + 1 items
        gmask = slots[..., 0] > 0  # (b, L)
        for layer, ffn in zip(self.layers, self.ffns):
            x = ffn(layer.forward_peek(x, gmask))  # (b, L, g, d)
        x = self.norm(x).view(b, L * g, -1)  # (b, L g, d)
        out = x.gather(1, flat.clamp(max=L * g - 1)[..., None].expand(-1, -1, x.shape[-1]))  # (b, l, d)
        return out * mask[..., None]  # padding positions are zero

    def _step_bundled(self, items: Tensor, state: State) -> tuple[Tensor, State]:  # (b,) -> (b, d)
        pending = state["pending"]  # (b, g - 1)
        p = (pending > 0).sum(1, keepdim=True)  # (b, 1): items already in the partial group
        slots = torch.cat([pending, torch.zeros_like(pending[:, :1])], 1).scatter(1, p, items[:, None])  # (b, g)
        x = bind(self.roles, self.inp(self.embed(slots))).sum(-2) / self.g**0.5  # (b, d): slots past p are empty
        peek: State = {}
        for i, (layer, ffn) in enumerate(zip(self.layers, self.ffns)):
            x, peek[f"conv{i}"], peek[f"ssm{i}"] = layer.step(x, state[f"conv{i}"], state[f"ssm{i}"])
            x = ffn(x)  # (b, d)
        full = ((p[:, 0] == self.g - 1) & (items > 0))  # (b,): this item completes the group: commit the peek
        new = {k: torch.where(full.view(-1, *[1] * (t.dim() - 1)), t, state[k]) for k, t in peek.items()}
        new["pending"] = torch.where(full[:, None], 0, torch.where((items > 0)[:, None], slots[:, :-1], pending))
        return self.norm(x), new
