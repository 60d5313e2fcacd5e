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
    return sum(_layout(template, codec))


def _layout(template: State, codec: str) -> tuple[int, ...]:
    """Bytes per user of each of the template's tensors, in sorted-name order (worked out once per shape and codec:
    unpack runs on every served event)."""
    _check(codec)
    return _layout_of(tuple((k, tuple(template[k].shape[1:]), template[k].dtype) for k in sorted(template)), codec)


@functools.lru_cache(maxsize=32)
def _layout_of(spec: tuple[tuple[str, tuple[int, ...], torch.dtype], ...], codec: str) -> tuple[int, ...]:
    return tuple(_tensor_bytes(torch.empty(1, *shape, dtype=dtype), codec) for _, shape, dtype in spec)


def pack(state: State, codec: str = "float32") -> list[bytes]:
    """(b, ...) tensors -> b blobs."""
    _check(codec)
    parts: list[np.ndarray] = []  # each (b, bytes) uint8
    for k in sorted(state):
        t = state[k].detach().cpu()
        flat = t.reshape(t.shape[0], -1)  # (b, s)
        if not t.dtype.is_floating_point:
            parts.append(flat.to(torch.int32).numpy().astype("<i4").view(np.uint8))
        elif codec == "int8":
            x = flat.float().numpy()
            scale = np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-30) / 127.0  # (b, 1)
            q = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
            parts.append(scale.astype("<f4").view(np.uint8))
            parts.append(q.view(np.uint8))
        elif codec == "int8-rows":
            x = flat.float().numpy().reshape(t.shape[0], _rows(t), -1)  # (b, r, s / r)
            scale = (np.clip(np.abs(x).max(axis=2), 2.0**-14, 6e4) / 127.0).astype("<f2")  # (b, r), within float16's range
            q = np.clip(np.rint(x / scale[..., None].astype(np.float32)), -127, 127).astype(np.int8)
            parts.append(scale.view(np.uint8))
            parts.append(q.reshape(t.shape[0], -1).view(np.uint8))
        else:
            parts.append(flat.numpy().astype("<f4" if codec == "float32" else "<f2").view(np.uint8))
    rows = np.concatenate(parts, axis=1)  # (b, bytes)
    return [r.tobytes() for r in rows]


def unpack(blobs: Sequence[bytes], template: State, codec: str = "float32") -> State:
    """b blobs -> (b, ...) tensors shaped like `template`'s rows. Raises ValueError on a wrong size."""
    layout = _layout(template, codec)
    size = sum(layout)
    for i, blob in enumerate(blobs):
        if len(blob) != size:
            raise ValueError(f"state blob {i} has {len(blob)} bytes, expected {size} for codec {codec}")
    raw = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), size)  # (b, bytes)
    out: State = {}
    off = 0
    for k, nbytes in zip(sorted(template), layout):
        t = template[k]
        shape, n = (len(blobs), *t.shape[1:]), t[0].numel()
        if not t.dtype.is_floating_point:
            arr = raw[:, off : off + 4 * n].copy().view("<i4")
            out[k] = torch.from_numpy(arr.astype(np.int64)).reshape(shape).to(t.dtype)
        elif codec == "int8":
            scale = raw[:, off : off + 4].copy().view("<f4")  # (b, 1)
            q = raw[:, off + 4 : off + 4 + n].copy().view(np.int8).astype(np.float32)
            out[k] = torch.from_numpy(q * scale).reshape(shape)
        elif codec == "int8-rows":
            r = _rows(t)
            scale = raw[:, off : off + 2 * r].copy().view("<f2").astype(np.float32)  # (b, r)
            q = raw[:, off + 2 * r : off + 2 * r + n].copy().view(np.int8).astype(np.float32).reshape(len(blobs), r, -1)
            out[k] = torch.from_numpy(q * scale[..., None]).reshape(shape)
        else:
            dt = "<f4" if codec == "float32" else "<f2"
            arr = raw[:, off : off + nbytes].copy().view(dt).astype(np.float32)
            out[k] = torch.from_numpy(arr).reshape(shape)
        off += nbytes
    return out


def _check(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown state codec {codec!r}; choose from {list(CODECS)}")
