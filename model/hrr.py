"""Holographic reduced representations (Plate, 1995) and the attribute-aware item encoder.

bind(a, b) is circular convolution, computed through the real FFT in O(d log d); it keeps the
dimension d, so an item bound with its attributes is still one d-vector. unbind(c, a) is
circular correlation (binding with the involution of a), the approximate inverse:
unbind(bind(a, b), a) ~ b, noisier as more bindings are bundled into c.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def bind(a: Tensor, b: Tensor) -> Tensor:  # (..., d), (..., d) -> (..., d)
    d = a.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(a, dim=-1) * torch.fft.rfft(b, dim=-1), n=d, dim=-1)


def involution(a: Tensor) -> Tensor:  # a*[i] = a[-i mod d]: the approximate inverse under bind
    return torch.cat([a[..., :1], a[..., 1:].flip(-1)], dim=-1)


def unbind(c: Tensor, a: Tensor) -> Tensor:  # recover b from c = bind(a, b) (+ other bindings)
    return bind(c, involution(a))


def bundle(xs: Tensor, dim: int = -2) -> Tensor:  # superpose; scaled so k unit vectors stay ~unit
    k = xs.shape[dim]
    return xs.sum(dim) / max(k, 1) ** 0.5


class ItemEncoder(nn.Module):
    """Item representation e_i = (v_i + sum_j a_j + sum_j v_i (*) a_j) / sqrt(1 + 2 n_i).

    The paper binds one attribute per item; items here carry any number (0..max_attrs).
    Binding v_i with a_j encodes "this item has attribute j" in a way unique to the item;
    bundling the plain a_j alongside lets items that share attributes share a component, so
    rare items borrow strength from their category or brand. Items without attributes reduce
    to v_i; the 1/sqrt(1 + 2 n_i) keeps every item at the scale of a plain embedding.
    `mix`: the three terms are weighed by learned per-channel gains g_v, g_a, g_b (ones to start, so training starts
    from the formula above), letting some channels carry an item's identity and others what it shares.
    """

    def __init__(self, n_items: int, n_attrs: int, d: int, mix: bool = False) -> None:
        super().__init__()
        if mix:  # (d,) each: 1-D, so AdamW leaves them undecayed as it does norm gains (model/train.py: optimizer)
            self.g_item, self.g_attr, self.g_bind = (nn.Parameter(torch.ones(d)) for _ in range(3))
        self.mix = mix
        self.item = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.attr = nn.Embedding(n_attrs + 1, d, padding_idx=0)
        for emb in (self.item, self.attr):
            nn.init.normal_(emb.weight, std=d**-0.5)  # HRR vectors: N(0, 1/d), norm ~ 1
            with torch.no_grad():
                emb.weight[0].zero_()

    def forward(self, item_attrs: Tensor) -> Tensor:  # (v, m) attribute ids, 0 = none -> (v, d)
        return self.encode(self.item.weight, item_attrs)

    def encode(self, v: Tensor, item_attrs: Tensor) -> Tensor:  # (..., d) item vectors, (..., m) their attributes -> (..., d)
        """The formula for any set of items. Binding is linear, so sum_j v (*) a_j = v (*) sum_j a_j:
        one FFT binding per item whatever its number of attributes."""
        if item_attrs.shape[-1] == 0:
            return v
        flat = item_attrs.reshape(-1, item_attrs.shape[-1])  # (N, m)
        s = F.embedding_bag(flat, self.attr.weight, mode="sum", padding_idx=0).view(v.shape)  # (..., d): sum_j a_j
        n = (item_attrs > 0).sum(-1, keepdim=True)  # (..., 1)
        if self.mix:
            return (self.g_item * v + self.g_attr * s + self.g_bind * bind(v, s)) / torch.sqrt(1 + 2 * n)
        return (v + s + bind(v, s)) / torch.sqrt(1 + 2 * n)
