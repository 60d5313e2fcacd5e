"""The one contract every recommender in holorec follows.

Training, evaluation and the service only ever talk to a `SeqRecModel`:

    forward(items)        (b, l) item indices, left-padded with 0  -> (b, l, d) hidden states
    init_state(b)         the empty per-user state: dict of tensors, batch on dim 0
    step(item, state)     (b,) next item index -> ((b, d) user vector, new state)
    forward_state(items)  (b, l) left-padded -> ((b, d) user vector, state) after each row's items
    item_table()          (n_items + 1, d) the vectors items are scored with (row 0 = padding)
    score(h)              (b, d) -> (b, n_items + 1) logits, tied to item_table

`step` over a sequence reproduces `forward` at every position: that is what lets the
service keep a constant-size state per user and never replay history. The state is a
plain dict of tensors (no hidden caches) so it can be packed to bytes (model/state.py).

Shape letters: b batch, l sequence length, d model dim, v vocabulary (n_items + 1).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

State = dict[str, Tensor]  # every tensor has the batch on dim 0 and a fixed shape after it


@dataclass
class ModelConfig:
    """Every model's hyper-parameters; fields a model does not use are ignored by it."""

    model: str = "holomamba"  # holomamba | sasrec | gru4rec | elastic
    n_items: int = 0  # real items; index 0 is padding
    n_attrs: int = 0  # real attributes; index 0 is padding
    max_attrs: int = 0  # attribute slots per item in the item -> attribute table
    d_model: int = 64
    n_layers: int = 2
    dropout: float = 0.2
    max_len: int = 50  # training window; also SASRec's replay window
    # selective SSM (holomamba)
    d_state: int = 4  # per channel: what the served state, and so Redis memory, scales with (bench/results/memory.md)
    expand: int = 2
    d_conv: int = 4
    dt_min: float = 1e-3  # holomamba: the SSM's step sizes start log-uniform in [dt_min, dt_max] (Mamba's range); a larger
    dt_max: float = 0.1  # step lets each item write more into the state and decays older ones faster; training leaves
    # them near where they start, and [0.01, 1] scored level on Beauty's validation (bench/results/cpu-2026-12-07e-beauty)
    ffn_mult: int = 4  # holomamba: a point-wise feed-forward sublayer (d -> ffn_mult d -> d) after each SSM block; 0 = none
    bundle: int = 1  # holomamba: items bound to slot roles and bundled per SSM step (temporal bundling)
    recent_attn: int = 0  # holomamba: the user vector also attends over its last this many items' embeddings (their ids are in the state); 0 = off
    item_dropout: float = 0.0  # holomamba, training only: each item's own vector is dropped with this probability (its attributes stay), per input position and per scoring-table row; 0 = off
    # attention models (sasrec, elastic)
    n_heads: int = 1  # SASRec as published: one head
    # elastic
    n_experts: int = 8  # interest experts (dispatcher slots)
    n_memory: int = 1024  # interest memory bank size
    top_k_memory: int = 8  # memory entries retrieved per expert
    # training (every model)
    cl_weight: float = 0.0  # weight of a contrastive term between two dropout views of each user vector (SeqRecModel.loss); 0 = off
    adam_beta2: float = 0.999  # AdamW's second-moment decay (torch's default); SASRec's reference code trains with 0.98
    weight_decay: float = 0.01  # AdamW's decoupled decay on weight matrices and embeddings (model/train.py: optimizer)
    lr_cosine_epochs: int = 0  # the learning rate falls along a half cosine from its value to 0 over this many epochs, per step, and training ends there; 0 = off (constant)
    lr_halve_after: int = 0  # halve the learning rate after this many epochs without a better validation NDCG@10 (again after each such run); 0 = off
    ema: float = 0.0  # validate, keep and serve an exponential moving average of the weights with this decay per step (model/train.py); 0 = off
    ema_warmup: float = 10.0  # the average's decay at step t is min(ema, (1 + t) / (ema_warmup + t)), so it spans about the last t / (ema_warmup - 1) steps until ema caps it; 2 = the plain mean of the start and every step so far
    burn_in: int = 0  # holomamba: train each window from the state after up to this many earlier items (model/train.py); 0 = off
    attr_loss: float = 0.0  # holomamba, training only: weight of a second cross-entropy, the next item's attributes from the user vector (SeqRecModel.loss); 0 = off
    label_smoothing: float = 0.0  # training only: the cross-entropy's target puts this much mass uniformly over all items (Szegedy et al. 2016); 0 = off
    ahead_loss: float = 0.0  # training only: weight of a second cross-entropy at each position, against the item after the next one (SeqRecModel.loss); 0 = off
    confidence_penalty: float = 0.0  # training only: minus this times the entropy of each position's softmax is added to the loss (Pereyra et al. 2017); 0 = off
    item_bias: bool = False  # a learned per-item offset added to every item's score (what the dot product need not spend dimensions on)
    cosine: bool = False  # score cos(user, item) times a learned scale instead of the dot product (SeqRecModel.scoring_rows)
    ffn_glu: bool = False  # holomamba: the feed-forward is SwiGLU (W2 (SiLU(W1 x) * W3 x), hidden 8d/3 at ffn_mult 4: the same parameters) instead of GELU
    encoder_mix: bool = False  # holomamba: ItemEncoder weighs the item, attribute and bound terms by learned per-channel gains (ones to start) instead of equally
    emb_dropout: float = -1.0  # holomamba: dropout on the encoder's input alone (Mamba4Rec and SASRec drop the embedding too); -1 = `dropout`, as every sublayer
    embed_scale: bool = False  # holomamba: the encoder reads each item vector times sqrt(d_model), as SASRec does; the scoring table is unscaled
    post_norm: bool = False  # holomamba: Mamba4Rec's placement, LN(x + dropout(f(x))) after each SSM and feed-forward sublayer and LN on the dropped input, instead of LN before each sublayer and at the end

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """A config as saved; a field added since a checkpoint was written takes the value that model had."""
        d = {k: v for k, v in d.items() if not (k == "extra" and not v)}  # an unused field, since removed
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**(ADDED_SINCE | d))


ADDED_SINCE: dict[str, Any] = {"ffn_mult": 0}  # fields added later -> the value checkpoints written before them imply


def item_embedding(n_items: int, d: int) -> nn.Embedding:
    """A (n_items + 1, d) table with a zero padding row, N(0, 1/d) init: the baselines' item_table."""
    emb = nn.Embedding(n_items + 1, d, padding_idx=0)
    nn.init.normal_(emb.weight, std=d**-0.5)
    with torch.no_grad():
        emb.weight[0].zero_()
    return emb


class SeqRecModel(nn.Module):
    """Base class: tied item scoring and the loss; subclasses supply the encoder."""

    config: ModelConfig
    traceable_step = False  # `step` has no branch on the data, so a trace of it is the same function (model/fast_step.py)

    def __init__(self, config: ModelConfig, item_attrs: Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        attrs = item_attrs if item_attrs is not None else torch.zeros(config.n_items + 1, 0, dtype=torch.long)
        self.register_buffer("item_attrs", attrs.long(), persistent=False)  # (v, max_attrs); saved in the JSON
        if config.item_bias:
            self.item_bias = nn.Parameter(torch.zeros(config.n_items + 1))  # (v,)
        if config.cosine:
            self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # (): the softmax temperature's inverse, learned

    # --- what subclasses implement ---------------------------------------------------
    def forward(self, items: Tensor) -> Tensor:  # (b, l) -> (b, l, d)
        raise NotImplementedError

    def init_state(self, batch_size: int) -> State:
        raise NotImplementedError

    def step(self, items: Tensor, state: State) -> tuple[Tensor, State]:  # (b,) -> (b, d)
        raise NotImplementedError

    def item_table(self) -> Tensor:  # (v, d), row 0 (padding) zero
        raise NotImplementedError

    # --- shared ----------------------------------------------------------------------
    def table(self) -> Tensor:  # (v, d)
        """item_table(), computed once per weight update when no gradient is wanted (serving, evaluation).

        HoloMambaRec's table is an encoder over the whole catalogue (FFT binding with attributes):
        recomputing it for every served event or evaluation batch is most of their cost. The cache is
        keyed on the parameters' and buffers' storage and in-place version counters, so an optimizer
        step, a load_state_dict or a .to() invalidates it; with gradients on it is never used.
        """
        if torch.is_grad_enabled():
            return self.item_table()
        if not hasattr(self, "_table_deps"):
            self._table_deps = [*self.parameters(), *self.buffers()]
        key = tuple((t.data_ptr(), t._version) for t in self._table_deps)
        if getattr(self, "_table_key", None) != key:
            self._table_cache, self._table_key = self.item_table().detach(), key
        return self._table_cache

    def embed(self, items: Tensor) -> Tensor:  # (...) -> (..., d): rows of item_table
        return F.embedding(items, self.table())

    def query(self, h: Tensor) -> Tensor:  # (..., d) -> (..., d)
        """A user vector as it meets the item rows: with config.cosine, unit length."""
        return F.normalize(h, dim=-1) if self.config.cosine else h

    def scoring_rows(self, table: Tensor) -> Tensor:  # (m, d) -> (m, d)
        """Item vectors as a user vector meets them: with config.cosine, unit length times a learned scale (at most
        100), so score = cos(user, item) / temperature and a norm carries no popularity."""
        if not self.config.cosine:
            return table
        return F.normalize(table, dim=-1) * self.log_scale.clamp(max=math.log(100.0)).exp()

    def score(self, h: Tensor) -> Tensor:  # (b, d) -> (b, v)
        s = self.query(h) @ self.scoring_rows(self.table()).T
        return s + self.item_bias if self.config.item_bias else s

    def user_vector(self, items: Tensor) -> Tensor:  # (b, l) left-padded -> (b, d)
        return self.forward(items)[:, -1]

    def loss(self, items: Tensor, targets: Tensor, state: State | None = None) -> Tensor:
        """Full-softmax cross-entropy over all items at every non-padding position.

        With config.cl_weight > 0 (training only), plus that weight times a contrastive term (InfoNCE, dot product,
        temperature 1), as DuoRec's model-level augmentation (Qiu et al., WSDM 2022): the same rows run through
        the encoder a second time with other dropout masks, and each user's last-position vector must pick out
        its own second view among the batch's. A regulariser for sparse logs; serving is unchanged.
        `state`: carried in from the items before these (burn-in training, recurrent models only)."""
        run = (lambda: self.forward(items)) if state is None else (lambda: self.forward(items, state))  # type: ignore[call-arg]
        h = run()  # (b, l, d)
        mask = targets > 0  # (b, l)
        logits = self.query(h[mask]) @ self.scoring_rows(self.item_table()[1:]).T  # (n, v - 1): real items only, so padding is never predicted
        if self.config.item_bias:
            logits = logits + self.item_bias[1:]
        smooth = self.config.label_smoothing if self.training else 0.0
        loss = F.cross_entropy(logits, targets[mask] - 1, label_smoothing=smooth)  # the same loss as masking padding's logit to -inf, without
        # writing into the (n, v) logits in place, which made autograd copy them (3-8% of a training step, measured)
        if self.training and self.config.confidence_penalty > 0:  # sum_j p_j log p_j: its pull on a logit scales with p_j, so
            logp = F.log_softmax(logits, dim=-1)  # unlike label smoothing it tempers the head without lifting the tail
            loss = loss + self.config.confidence_penalty * (logp.exp() * logp).sum(-1).mean()
        if self.training and self.config.ahead_loss > 0:  # two steps ahead: more signal per position from sparse logs
            after = torch.cat([targets[:, 1:], torch.zeros_like(targets[:, :1])], 1)[mask]  # (n,): 0 where the row ends
            keep = after > 0
            if keep.any():
                loss = loss + self.config.ahead_loss * F.cross_entropy(logits[keep], after[keep] - 1, label_smoothing=smooth)
        if self.training and self.config.attr_loss > 0:
            loss = loss + self.config.attr_loss * self.attribute_loss(h[mask], targets[mask])
        if self.training and self.config.cl_weight > 0:
            u, v = h[:, -1], run()[:, -1]  # (b, d) each: the last position is every row's latest item
            sim = u @ v.T  # (b, b)
            labels = torch.arange(len(u), device=u.device)
            loss = loss + self.config.cl_weight * (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels)) / 2
        return loss

    def attribute_loss(self, h: Tensor, targets: Tensor) -> Tensor:  # (n, d), (n,) -> ()
        """How well each user vector predicts its next item's attributes (config.attr_loss); models with attribute embeddings."""
        raise ValueError(f"{self.config.model} has no attribute embeddings: attr_loss needs holomamba")

    def forward_state(self, items: Tensor) -> tuple[Tensor, State]:  # (b, l) left-padded -> (b, d), state
        """The user vector and state `step` reaches from `init_state` over each row's items (warming users from a
        log). Stepped here, padding skipped; a model with a parallel form (holomamba) overrides it."""
        b = items.shape[0]
        state, h = self.init_state(b), torch.zeros(b, self.config.d_model)
        for t in range(items.shape[1]):
            rows = (items[:, t] > 0).nonzero()[:, 0]  # (r,)
            if len(rows):
                h[rows], new = self.step(items[rows, t], {k: v[rows] for k, v in state.items()})
                for k in state:
                    state[k][rows] = new[k]
        return h, state

    def replay(self, items: list[int], state: State | None = None) -> tuple[Tensor, State]:
        """Step one user through a history, item by item: the slow path the service avoids, and the reference tests check it against."""
        state = state if state is not None else self.init_state(1)
        h = torch.zeros(1, self.config.d_model)
        for i in items:
            h, state = self.step(torch.tensor([i]), state)
        return h[0], state
