"""Pack a batch of per-user states to one byte string per user, and back.

Layout of one user's blob: the state's tensors in sorted-name order, each flattened;
float tensors in the chosen codec, integer tensors always int32, all little-endian:
    float32  raw float32 values
    float16  raw float16 values (half the bytes; ~1e-3 relative error)
    int8     per tensor a float32 scale then int8 values, x ~ scale * q (a quarter of the bytes)
The layout depends only on the model config, never on history length: a user with 10 events
and one with 100,000 take the same bytes.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from model.protocol import State

CODECS = ("float32", "float16", "int8")


def _tensor_bytes(t: Tensor, codec: str) -> int:
    n = t[0].numel()
    if not t.dtype.is_floating_point:
        return 4 * n
    return {"float32": 4 * n, "float16": 2 * n, "int8": 4 + n}[codec]


def packed_size(template: State, codec: str = "float32") -> int:
    """Bytes per user for states shaped like `template` (batch size 1 or more)."""
    _check(codec)
    return sum(_tensor_bytes(template[k], codec) for k in sorted(template))


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
        else:
            parts.append(flat.numpy().astype("<f4" if codec == "float32" else "<f2").view(np.uint8))
    rows = np.concatenate(parts, axis=1)  # (b, bytes)
    return [r.tobytes() for r in rows]


def unpack(blobs: Sequence[bytes], template: State, codec: str = "float32") -> State:
    """b blobs -> (b, ...) tensors shaped like `template`'s rows. Raises ValueError on a wrong size."""
    _check(codec)
    size = packed_size(template, codec)
    for i, blob in enumerate(blobs):
        if len(blob) != size:
            raise ValueError(f"state blob {i} has {len(blob)} bytes, expected {size} for codec {codec}")
    raw = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), size)  # (b, bytes)
    out: State = {}
    off = 0
    for k in sorted(template):
        t = template[k]
        shape, n = (len(blobs), *t.shape[1:]), t[0].numel()
        if not t.dtype.is_floating_point:
            arr = raw[:, off : off + 4 * n].copy().view("<i4")
            out[k] = torch.from_numpy(arr.astype(np.int64)).reshape(shape).to(t.dtype)
        elif codec == "int8":
            scale = raw[:, off : off + 4].copy().view("<f4")  # (b, 1)
            q = raw[:, off + 4 : off + 4 + n].copy().view(np.int8).astype(np.float32)
            out[k] = torch.from_numpy(q * scale).reshape(shape)
        else:
            dt = "<f4" if codec == "float32" else "<f2"
            arr = raw[:, off : off + _tensor_bytes(t, codec)].copy().view(dt).astype(np.float32)
            out[k] = torch.from_numpy(arr).reshape(shape)
        off += _tensor_bytes(t, codec)
    return out


def _check(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown state codec {codec!r}; choose from {CODECS}")
