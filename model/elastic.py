"""ELASTIC (Deng et al., 2024, arXiv 2408.09380), made causal so it serves with a constant-size state.

Shape letters: b batch, l length, d model dim, m interest experts, h heads, e head dim (d / h),
s sub-keys per half of the memory (ceil(sqrt(n_memory))), k entries retrieved, v items + 1.

What the paper describes (we could read its abstract and summaries, not its equations, in our
reference stores, so the equations below are ours, built from that description):
  * a fixed set of m learnable interest experts; a *linear dispatcher attention* layer in which
    the experts attend over the behaviour sequence to compress it into m vectors, and every
    position then reads back from those m vectors: O(l m d) instead of O(l^2 d);
  * an *interest memory*: a large learnable bank from which each compressed interest sparsely
    retrieves its top-k entries, adding capacity at almost no compute.

One layer, for position t with input x_t (pre-norm, residual; all per head, heads omitted):
    k_t, v_t, q_t = W_k LN(x_t), W_v LN(x_t), W_q LN(x_t)
    a_jt  = E_j . k_t / sqrt(e)                                  expert j's score for item t
    S_jt  = sum_{s<=t} g_j^(t-s) exp(a_js) v_s / sum_{s<=t} g_j^(t-s) exp(a_js)      (compress)
    S'_jt = S_jt + sum_{i in topk_i(r(S_jt) . K_i)} softmax_i(r . K_i) V_i           (memory)
    o_t   = sum_j softmax_j(q_t . E_j / sqrt(e)) S'_jt                               (dispatch)
    x_t  <- x_t + W_o o_t;   x_t <- x_t + FFN(LN(x_t))
then a final LayerNorm; scores are tied to the item embedding table.

Deviations, and why:
  * causal compression: expert j summarises only s <= t (the paper's experts see the whole
    sequence, which a next-item model serving online cannot). This is what makes the state
    constant-size: per layer, expert and head the online-softmax accumulators
        M (running max), Z (running denominator), N (running weighted value sum, e values)
    with the step  M' = max(M + log g, a),  Z' = exp(M + log g - M') Z + exp(a - M'),
                   N' = exp(M + log g - M') N + exp(a - M') v,       S = N' / Z'.
    `forward` computes the same recurrence for all t at once: M_t from a cummax, then (Z, N)
    with the log-depth parallel scan of model/ssm.py; no Python loop over l.
  * recency decay g_j = exp(-exp(w_j)) in (0, 1), learned, one per expert, initialised with
    half-lives spread from 2 items to 4 max_len: a softmax-weighted prefix sum alone is a bag of
    items with no order. Decay gives order and works for unbounded histories, where absolute
    positional embeddings would need a position counter in the state and run past max_len.
  * dispatch keys are the expert embeddings E_j themselves (experts query the sequence with E
    and positions find experts by E), so no extra key projection of S is needed.
  * the memory is addressed with product keys (Lample et al., 2019): two sub-key tables of s
    entries score the two halves of the query r = W_r S; the top k of each half give k^2
    candidates, of which the top k (indices < n_memory) are mixed. Costs O(s d) per query
    instead of O(n_memory d). Retrieval uses S_jt, so it is recomputed per step from the state.
Padding never advances the accumulators (decay counts real items only), so `step` from
`init_state` reproduces `forward` at every real position; `step` with item 0 is a no-op.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.protocol import ModelConfig, SeqRecModel, State, item_embedding
from model.ssm import parallel_scan

NEG = -1e4  # the running max before any item: below any score, finite so padding math stays NaN-free


class InterestMemory(nn.Module):
    """Sparse top-k retrieval from n learnable interest vectors, addressed by product keys."""

    def __init__(self, d: int, n: int, k: int) -> None:
        super().__init__()
        if d % 2:
            raise ValueError(f"d_model must be even for product keys, got {d}")
        self.n, self.s, self.k = n, math.ceil(math.sqrt(n)), min(k, n)
        self.query = nn.Linear(d, d)
        self.keys = nn.Parameter(torch.randn(2, self.s, d // 2) * (d // 2) ** -0.5)  # (2, s, d/2)
        self.values = nn.Parameter(torch.randn(n, d) * d**-0.5)  # (n, d)

    def forward(self, x: Tensor) -> Tensor:  # (..., d) -> (..., d)
        q1, q2 = self.query(x).chunk(2, dim=-1)  # (..., d/2) each
        k1 = min(self.k, self.s)
        t1, i1 = (q1 @ self.keys[0].T).topk(k1, dim=-1)  # (..., k1)
        t2, i2 = (q2 @ self.keys[1].T).topk(k1, dim=-1)
        score = (t1[..., :, None] + t2[..., None, :]).flatten(-2)  # (..., k1^2)
        index = (i1[..., :, None] * self.s + i2[..., None, :]).flatten(-2)  # (..., k1^2)
        score = score.masked_fill(index >= self.n, float("-inf"))  # s^2 may exceed n
        top, at = score.topk(min(self.k, k1 * k1), dim=-1)  # (..., k)
        w = torch.softmax(top, dim=-1)  # (..., k)
        index = index.gather(-1, at)
        k = index.shape[-1]  # weighted sum of k rows per query, without materialising (..., k, d)
        out = F.embedding_bag(index.reshape(-1, k), self.values, per_sample_weights=w.reshape(-1, k), mode="sum")
        return out.view(*x.shape)  # (..., d)


class DispatcherLayer(nn.Module):
    """Causal linear dispatcher attention + interest memory + FFN, with forward and step over one set of weights."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        d, m = c.d_model, c.n_experts
        if d % c.n_heads:
            raise ValueError(f"d_model {d} is not divisible by n_heads {c.n_heads}")
        self.h, self.e, self.m = c.n_heads, d // c.n_heads, m
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.experts = nn.Parameter(torch.randn(m, c.n_heads, self.e) * self.e**-0.5)  # (m, h, e)
        half_life = torch.logspace(math.log10(2.0), math.log10(4.0 * max(c.max_len, 1)), m)  # (m,)
        self.decay = nn.Parameter(torch.log(math.log(2.0) / half_life))  # log g_j = -exp(decay_j)
        self.memory = InterestMemory(d, c.n_memory, c.top_k_memory) if c.n_memory > 0 else None
        self.proj = nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(c.dropout), nn.Linear(d, d))
        self.drop = nn.Dropout(c.dropout)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(..., d) -> expert scores a (..., m, h), values v (..., h, e), dispatch weights (..., h, m)."""
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.h, self.e)).unbind(-3)  # (..., h, e) each
        a = torch.einsum("...he,mhe->...mh", k, self.experts) / self.e**0.5  # (..., m, h)
        w = torch.softmax(torch.einsum("...he,mhe->...hm", q, self.experts) / self.e**0.5, dim=-1)  # (..., h, m)
        return a, v, w

    def _read(self, x: Tensor, S: Tensor, w: Tensor) -> Tensor:  # x (..., d), S (..., m, h, e), w (..., h, m) -> (..., d)
        S = S.flatten(-2)  # (..., m, d)
        if self.memory is not None:
            S = S + self.memory(S)
        o = torch.einsum("...hm,...mhe->...he", w, S.unflatten(-1, (self.h, self.e))).flatten(-2)  # (..., d)
        x = x + self.drop(self.proj(o))
        return x + self.drop(self.ffn(self.norm2(x)))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # (b, l, d), (b, l) bool -> (b, l, d)
        a, v, w = self._project(x)  # (b, l, m, h), (b, l, h, e), (b, l, h, m)
        log_g = -torch.exp(self.decay)[:, None]  # (m, 1)
        real = mask[..., None, None]  # (b, l, 1, 1)
        c = mask.cumsum(1)[..., None, None].to(a.dtype)  # (b, l, 1, 1): real items so far
        # M_t = max over real s <= t of (a_s + (c_t - c_s) log g), through one cummax
        M = torch.cummax(torch.where(real, a - c * log_g, NEG), dim=1).values + c * log_g  # (b, l, m, h)
        M = torch.where(c > 0, M, NEG)  # before the first item: the init_state value
        M_prev = torch.cat([torch.full_like(M[:, :1], NEG), M[:, :-1]], dim=1)
        # padding keeps the state: alpha = exp(0) = 1, beta = exp(NEG) = 0 (masked before exp, so no inf * 0 in backward)
        alpha = torch.exp(torch.where(real, M_prev + log_g - M, 0.0))  # (b, l, m, h)
        beta = torch.exp(torch.where(real, a - M, NEG))  # (b, l, m, h)
        ones = torch.ones_like(v[..., :1])  # (b, l, h, 1)
        acc = parallel_scan(alpha[..., None], beta[..., None] * torch.cat([ones, v], -1)[:, :, None])  # (b, l, m, h, 1 + e)
        S = acc[..., 1:] / acc[..., :1].clamp_min(1e-6)  # (b, l, m, h, e); Z >= 1 after any item, 0 before
        return self._read(x, S, w)

    def init_state(self, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
        """M (b, m, h) at NEG; Z (b, m, h) and N (b, m, h, e) at zero."""
        return (torch.full((batch_size, self.m, self.h), NEG), torch.zeros(batch_size, self.m, self.h),
                torch.zeros(batch_size, self.m, self.h, self.e))

    def step(self, x: Tensor, M: Tensor, Z: Tensor, N: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One position: x (b, d) and the accumulators -> y (b, d) and the new accumulators."""
        a, v, w = self._project(x)  # (b, m, h), (b, h, e), (b, h, m)
        log_g = -torch.exp(self.decay)[:, None]  # (m, 1)
        M_new = torch.maximum(M + log_g, a)  # (b, m, h)
        alpha, beta = torch.exp(M + log_g - M_new), torch.exp(a - M_new)  # (b, m, h)
        Z = alpha * Z + beta
        N = alpha[..., None] * N + beta[..., None] * v[:, None]  # (b, m, h, e)
        return self._read(x, N / Z[..., None].clamp_min(1e-6), w), M_new, Z, N


class Elastic(SeqRecModel):
    def __init__(self, config: ModelConfig, item_attrs: Tensor | None = None) -> None:
        super().__init__(config, item_attrs)
        c = config
        self.items = item_embedding(c.n_items, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(DispatcherLayer(c) for _ in range(c.n_layers))
        self.norm = nn.LayerNorm(c.d_model)

    def item_table(self) -> Tensor:  # (v, d)
        return self.items.weight

    def forward(self, items: Tensor) -> Tensor:  # (b, l) -> (b, l, d)
        mask = items > 0  # (b, l)
        x = self.drop(self.embed(items))  # (b, l, d)
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x) * mask[..., None]  # padding positions are zero

    def init_state(self, batch_size: int) -> State:
        state: State = {}
        for i, layer in enumerate(self.layers):
            state[f"max{i}"], state[f"den{i}"], state[f"num{i}"] = layer.init_state(batch_size)
        return state

    def step(self, items: Tensor, state: State) -> tuple[Tensor, State]:  # (b,) -> (b, d)
        x = self.drop(self.embed(items))  # (b, d)
        new: State = {}
        for i, layer in enumerate(self.layers):
            acc = state[f"max{i}"], state[f"den{i}"], state[f"num{i}"]
            x, new[f"max{i}"], new[f"den{i}"], new[f"num{i}"] = layer.step(x, *acc)
        real = items > 0  # item 0 leaves the state as it was
        new = {k: torch.where(real.view(-1, *[1] * (t.dim() - 1)), t, state[k]) for k, t in new.items()}
        return self.norm(x), new
