"""The leave-one-out split: per user, the last item is the test target, the second-to-last the validation
target, the rest training; and left padding, how every model reads a batch of histories.
Shape letters: u users, l max_len."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from model.data import Dataset, train_part


@dataclass
class Split:
    """Leave-one-out. Users with fewer than 3 items are kept for training only (no valid/test row).

    Training rows: each user's training sequence s (all but the last two items) gives one row,
    inputs s[:-1] and targets s[1:], cut to the most recent max_len and left-padded with 0: one
    row covers every training position inside the window (SASRec's protocol; older positions of
    users with more than max_len + 1 training items are not trained on; `prefixes` holds them, for burn-in).
    Evaluation: full histories (models see the last max_len items; exclude_seen uses them all).
    `unfitted_valid` (a diagnostic): training also leaves out each user's last training item, so the validation
    input's newest item is, like the test input's, one the model never fitted as a target after that user's items.
    """

    max_len: int
    inputs: Tensor  # (u_train, l) left-padded
    targets: Tensor  # (u_train, l) left-padded, inputs shifted by one
    prefixes: list[list[int]]  # per training row, the inputs before its window (empty for most users)
    valid_histories: list[list[int]]  # s[:-2]
    valid_targets: list[int]  # s[-2]
    test_histories: list[list[int]]  # s[:-1] (includes the validation item)
    test_targets: list[int]  # s[-1]

    def eval_set(self, which: str) -> tuple[list[list[int]], list[int]]:
        if which not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', not {which!r}")
        return (self.valid_histories, self.valid_targets) if which == "valid" else (self.test_histories, self.test_targets)


def left_pad(seqs: list[list[int]], length: int) -> Tensor:  # -> (len(seqs), length)
    """The most recent `length` items of each sequence, right-aligned, zeros in front."""
    out = torch.zeros(len(seqs), length, dtype=torch.long)
    for r, s in enumerate(seqs):
        s = s[-length:] if length > 0 else []
        if s:
            out[r, length - len(s) :] = torch.tensor(s, dtype=torch.long)
    return out


def split(ds: Dataset, max_len: int, unfitted_valid: bool = False) -> Split:
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    rows_in, rows_out = [], []
    vh, vt, th, tt = [], [], [], []
    for seq in ds.sequences:
        train = train_part(seq)[: -1 if unfitted_valid and len(seq) >= 3 else None]  # a user without validation keeps all
        if len(train) >= 2:
            rows_in.append(train[:-1])
            rows_out.append(train[1:])
        if len(seq) >= 3:
            vh.append(seq[:-2])
            vt.append(seq[-2])
            th.append(seq[:-1])
            tt.append(seq[-1])
    prefixes = [r[:-max_len] for r in rows_in]
    return Split(max_len, left_pad(rows_in, max_len), left_pad(rows_out, max_len), prefixes, vh, vt, th, tt)
