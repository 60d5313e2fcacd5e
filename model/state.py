"""Pack a batch of per-user states to one byte string per user, and back.

Layout of one user's blob: the state's tensors in sorted-name order, each flattened;
float tensors in the chosen codec, integer tensors always int32, all little-endian:
    float32  raw float32 values
    float16  raw float16 values (half the bytes; ~1e-3 relative error)
    int8     per tensor a float32 scale then int8 values, x ~ scale * q (a quarter of the bytes)
    int8-rows  per row (a channel: the tensor's second dimension) a float16 scale, then int8 values;
             rows of very different magnitude each keep their precision, for 2 bytes a row
A codec's id (stored in the record's header) is fixed by CODECS, never by a tuple's order.
The layout depends only on the model config, never on history length: a user with 10 events
and one with 100,000 take the same bytes.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.protocol import State

CODECS: dict[str, int] = {"float32": 0, "float16": 1, "int8": 2, "int8-rows": 3}  # name -> id in a record's header


def _rows(t: Tensor) -> int:
    """Rows a (b, c, ...) tensor is scaled by under int8-rows: its channels; a (b, n) tensor is one row."""
    return t.shape[1] if t.dim() >= 3 else 1


def _tensor_bytes(t: Tensor, codec: str) -> int:
    n = t[0].numel()
    if not t.dtype.is_floating_point:
        return 4 * n
    return {"float32": 4 * n, "float16": 2 * n, "int8": 4 + n, "int8-rows": 2 * _rows(t) + n}[codec]


def packed_size(template: State, codec: str = "float32") -> int:
    """Bytes per user for states shaped like `template` (batch size 1 or more)."""
    return _plan(template, codec).size


VALUE = {"float32": "<f4", "float16": "<f2", "int8": "i1", "int8-rows": "i1"}  # codec -> how a float value is stored
SCALE = {"int8": "<f4", "int8-rows": "<f2"}  # codec -> how a segment's scale is stored


@dataclass(frozen=True)
class Plan:
    """Where every byte of a user's blob goes, worked out once per state shape and codec. pack and unpack run on
    every served event, so they make one vectorised pass over all the float tensors at once rather than one pass
    per tensor. The bytes are the layout above (tests/test_model_core.py pins them)."""
    size: int  # bytes per user
    floats: tuple[tuple[str, tuple[int, ...], int, int, int, int], ...]  # (name, shape, start, end in the (b, S) float
    #   concat, its scales' first byte in the blob, its values' first byte)
    ints: tuple[tuple[str, tuple[int, ...], torch.dtype, int, int], ...]  # (name, shape, dtype, first byte, n)
    scale_bytes: int  # per user, all float tensors together
    starts: np.ndarray  # (segments,) each scaled segment's first value in the concat (int8: a tensor; int8-rows: a row)
    lengths: np.ndarray  # (segments,) its values


def _plan(template: State, codec: str) -> Plan:
    _check(codec)
    return _plan_of(tuple((k, tuple(template[k].shape[1:]), template[k].dtype) for k in sorted(template)), codec)


@functools.lru_cache(maxsize=32)
def _plan_of(spec: tuple[tuple[str, tuple[int, ...], torch.dtype], ...], codec: str) -> Plan:
    floats, ints, starts, lengths = [], [], [], []
    off = cat = 0  # byte offset in the blob; value offset in the float concat
    for name, shape, dtype in spec:
        t = torch.empty(1, *shape, dtype=dtype)
        n, nbytes = t[0].numel(), _tensor_bytes(t, codec)
        if not dtype.is_floating_point:
            ints.append((name, shape, dtype, off, n))
        else:
            segs = 0 if codec not in SCALE else 1 if codec == "int8" else _rows(t)
            starts.extend(cat + i * (n // segs) for i in range(segs))
            lengths.extend([n // max(segs, 1)] * segs)
            floats.append((name, shape, cat, cat + n, off, off + segs * _width(SCALE.get(codec))))
            cat += n
        off += nbytes
    scale_bytes = len(starts) * _width(SCALE.get(codec))
    return Plan(off, tuple(floats), tuple(ints), scale_bytes, np.array(starts, np.int64), np.array(lengths, np.int64))


def _width(dtype: str | None) -> int:
    return 0 if dtype is None else np.dtype(dtype).itemsize


def pack(state: State, codec: str = "float32") -> list[bytes]:
    """(b, ...) tensors -> b blobs."""
    plan = _plan(state, codec)
    b = next(iter(state.values())).shape[0]
    out = np.empty((b, plan.size), np.uint8)
    for name, _, _, at, n in plan.ints:
        out[:, at : at + 4 * n] = state[name].detach().cpu().reshape(b, n).to(torch.int32).numpy().astype("<i4").view(np.uint8)
    if plan.floats:
        x = torch.cat([state[f[0]].detach().reshape(b, -1).float() for f in plan.floats], 1).cpu().numpy()  # (b, S)
        scales = np.zeros((b, 0), np.uint8)  # (b, scale_bytes)
        if codec in SCALE:
            peak = np.maximum.reduceat(np.abs(x), plan.starts, axis=1)  # (b, segments)
            if codec == "int8":
                scale = np.maximum(peak, 1e-30) / 127.0
                div = scale
            else:  # within float16's range
                scale = (np.clip(peak, 2.0**-14, 6e4) / 127.0).astype("<f2")
                div = scale.astype(np.float32)
            q = np.rint(x / np.repeat(div, plan.lengths, axis=1))
            np.clip(q, -127, 127, out=q)
            values, scales = q.astype(np.int8).view(np.uint8), scale.astype(SCALE[codec]).view(np.uint8)
        else:
            values = x.astype(VALUE[codec]).view(np.uint8)  # (b, S * value bytes)
        w, s = _width(VALUE[codec]), 0
        for _, _, start, end, scale_at, value_at in plan.floats:
            out[:, scale_at:value_at] = scales[:, s : s + value_at - scale_at]
            out[:, value_at : value_at + w * (end - start)] = values[:, w * start : w * end]
            s += value_at - scale_at
    return [r.tobytes() for r in out]


def unpack(blobs: Sequence[bytes], template: State, codec: str = "float32") -> State:
    """b blobs -> (b, ...) tensors shaped like `template`'s rows. Raises ValueError on a wrong size."""
    plan = _plan(template, codec)
    for i, blob in enumerate(blobs):
        if len(blob) != plan.size:
            raise ValueError(f"state blob {i} has {len(blob)} bytes, expected {plan.size} for codec {codec}")
    b = len(blobs)
    raw = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(b, plan.size)  # (b, bytes)
    out: State = {}
    for name, shape, dtype, at, n in plan.ints:
        out[name] = torch.from_numpy(raw[:, at : at + 4 * n].copy().view("<i4").astype(np.int64)).reshape(b, *shape).to(dtype)
    if plan.floats:
        w, s = _width(VALUE[codec]), 0
        values, scales = np.empty((b, w * plan.floats[-1][3]), np.uint8), np.empty((b, plan.scale_bytes), np.uint8)
        for _, _, start, end, scale_at, value_at in plan.floats:
            scales[:, s : s + value_at - scale_at] = raw[:, scale_at:value_at]
            values[:, w * start : w * end] = raw[:, value_at : value_at + w * (end - start)]
            s += value_at - scale_at
        x = values.view(VALUE[codec]).astype(np.float32)  # (b, S)
        if codec in SCALE:
            x *= np.repeat(scales.view(SCALE[codec]).astype(np.float32), plan.lengths, axis=1)
        flat = torch.from_numpy(x)
        for name, shape, start, end, _, _ in plan.floats:
            out[name] = flat[:, start:end].reshape(b, *shape).contiguous()  # a copy only when b > 1
    return out


def _check(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown state codec {codec!r}; choose from {list(CODECS)}")
