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
    every served event, so each is a few whole-array numpy operations over all the float tensors at once (one
    gather or scatter of the blob's bytes by precomputed positions), not a pass per tensor. The bytes are the
    layout above (tests/test_model_core.py pins them)."""
    size: int  # bytes per user
    floats: tuple[tuple[str, tuple[int, ...], int, int], ...]  # (name, shape, start, end in the (b, S) float concat)
    ints: tuple[tuple[str, tuple[int, ...], torch.dtype, int, int], ...]  # (name, shape, dtype, first byte, n)
    starts: np.ndarray  # (segments,) each scaled segment's first value in the concat (int8: a tensor; int8-rows: a row)
    segment: np.ndarray  # (S,) the segment of each value in the concat
    value_at: np.ndarray  # (S * value bytes,) where each byte of the concat's values goes in the blob
    scale_at: np.ndarray  # (segments * scale bytes,) where each byte of the segments' scales goes


_PLANS: dict[tuple, Plan] = {}  # (codec, (name, shape, dtype) per tensor as given) -> plan: one lookup per call


def _plan(template: State, codec: str) -> Plan:
    key = (codec, *((k, t.shape, t.dtype) for k, t in template.items()))  # batch size included: slicing it off costs more
    plan = _PLANS.get(key)
    if plan is None:
        _check(codec)
        if len(_PLANS) > 1024:
            _PLANS.clear()
        plan = _PLANS[key] = _plan_of(tuple((k, tuple(template[k].shape[1:]), template[k].dtype) for k in sorted(template)), codec)
    return plan


def _plan_of(spec: tuple[tuple[str, tuple[int, ...], torch.dtype], ...], codec: str) -> Plan:
    floats, ints, starts, lengths, value_at, scale_at = [], [], [], [], [], []
    w, sw = _width(VALUE[codec]), _width(SCALE.get(codec))
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
            floats.append((name, shape, cat, cat + n))
            scale_at.append(np.arange(off, off + segs * sw))
            value_at.append(np.arange(off + segs * sw, off + nbytes))
            cat += n
        off += nbytes
    cat_ = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
    return Plan(off, tuple(floats), tuple(ints), np.array(starts, np.int64), np.repeat(np.arange(len(starts)), lengths),
                cat_(value_at), cat_(scale_at))


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
        parts = [state[f[0]].numpy(force=True).reshape(b, -1) for f in plan.floats]
        x = (np.concatenate(parts, 1) if len(parts) > 1 else parts[0]).astype(np.float32, copy=False)  # (b, S)
        if codec in SCALE:
            peak = np.maximum.reduceat(np.abs(x), plan.starts, axis=1)  # (b, segments)
            if codec == "int8":
                scale = np.maximum(peak, 1e-30) / 127.0
                div = scale
            else:  # within float16's range
                scale = (np.clip(peak, 2.0**-14, 6e4) / 127.0).astype("<f2")
                div = scale.astype(np.float32)
            q = np.rint(x / div[:, plan.segment])
            np.minimum(q, 127, out=q)
            np.maximum(q, -127, out=q)
            out[:, plan.value_at] = q.astype(np.int8).view(np.uint8)
            out[:, plan.scale_at] = scale.astype(SCALE[codec]).view(np.uint8)
        else:
            out[:, plan.value_at] = x.astype(VALUE[codec]).view(np.uint8)  # (b, S * value bytes)
    return [r.tobytes() for r in out]


def unpack(blobs: Sequence[bytes], template: State, codec: str = "float32") -> State:
    """b blobs -> (b, ...) tensors shaped like `template`'s rows. Raises ValueError on a wrong size."""
    plan = _plan(template, codec)
    for i, blob in enumerate(blobs):
        if len(blob) != plan.size:
            raise ValueError(f"state blob {i} has {len(blob)} bytes, expected {plan.size} for codec {codec}")
    b = len(blobs)
    raw = np.frombuffer(blobs[0] if b == 1 else b"".join(blobs), dtype=np.uint8).reshape(b, plan.size)  # (b, bytes)
    out: State = {}
    for name, shape, dtype, at, n in plan.ints:
        out[name] = torch.from_numpy(raw[:, at : at + 4 * n].copy().view("<i4").astype(np.int64)).reshape(b, *shape).to(dtype)
    if plan.floats:
        x = raw.take(plan.value_at, axis=1).view(VALUE[codec]).astype(np.float32)  # (b, S)
        if codec in SCALE:
            x *= raw.take(plan.scale_at, axis=1).view(SCALE[codec]).astype(np.float32)[:, plan.segment]
        for name, shape, start, end in plan.floats:
            out[name] = torch.from_numpy(np.ascontiguousarray(x[:, start:end]).reshape(b, *shape))  # a copy only when b > 1
    return out


def _check(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown state codec {codec!r}; choose from {list(CODECS)}")
