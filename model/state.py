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

import math
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
    every served event, so each is a few whole-batch array operations on contiguous byte ranges of the (b, size) blob
    array (a tensor's scales, then its values, are each one range). The bytes are the layout above
    (tests/test_model_core.py pins them)."""
    size: int  # bytes per user
    floats: tuple[tuple[str, tuple[int, ...], int, int, int, int, int], ...]  # (name, shape, first scale byte, scales, first value byte, first value in `flat`, first scale in `flat`)
    ints: tuple[tuple[str, tuple[int, ...], torch.dtype, int, int], ...]  # (name, shape, dtype, first byte, n)
    seg_start: np.ndarray  # (S,) where each scale's segment starts among the float values of all tensors, in blob order (`flat`)
    seg_len: np.ndarray  # (S,) its values
    parts: tuple[tuple[int, int, str, tuple[int, ...]], ...]  # split's parts in blob order: (first byte, end byte, stored dtype, shape per user)
    order: tuple[tuple[str, int], ...]  # every tensor in blob order: (name, scale segments; -1 for an integer tensor)


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
    floats, ints, starts, parts, order = [], [], [], [], []
    off = flat = 0  # byte offset in the blob; float values so far
    for name, shape, dtype in spec:
        t = torch.empty(1, *shape, dtype=dtype)
        n, nbytes = t[0].numel(), _tensor_bytes(t, codec)
        if not dtype.is_floating_point:
            ints.append((name, shape, dtype, off, n))
            parts.append((off, off + 4 * n, "<i4", shape))
            order.append((name, -1))
        else:
            segs = 0 if codec not in SCALE else 1 if codec == "int8" else _rows(t)
            v_at = off + segs * _width(SCALE.get(codec))
            floats.append((name, shape, off, segs, v_at, flat, len(starts)))
            if segs:  # shaped to broadcast over the values it scales: a row's scale over its row, a tensor's over all
                parts.append((off, v_at, SCALE[codec], (segs, *[1] * (len(shape) - 1)) if segs > 1 else (1,) * len(shape)))
            parts.append((v_at, off + nbytes, VALUE[codec], shape))
            order.append((name, segs))
            starts += [flat + i * (n // segs) for i in range(segs)]
            flat += n
        off += nbytes
    seg_start = np.array(starts, np.intp)
    return Plan(off, tuple(floats), tuple(ints), seg_start, np.diff(np.append(seg_start, flat)), tuple(parts), tuple(order))


def placement(template: State, codec: str) -> tuple[int, dict[str, tuple[int, int, int]]]:
    """Bytes per user, and per float tensor (first scale byte, scales, first value byte): where model/native.c reads and
    writes each tensor of a blob."""
    plan = _plan(template, codec)
    return plan.size, {name: (s_at, segs, v_at) for name, _, s_at, segs, v_at, _, _ in plan.floats}


def _width(dtype: str | None) -> int:
    return 0 if dtype is None else np.dtype(dtype).itemsize


SMALL_BATCH = 16  # up to this many users numpy quantises every tensor in one pass; above it torch, a tensor at a time


def pack(state: State, codec: str = "float32") -> list[bytes]:
    """(b, ...) tensors -> b blobs."""
    plan = _plan(state, codec)
    b = next(iter(state.values())).shape[0]
    out = np.empty((b, plan.size), np.uint8)
    for name, _, _, at, n in plan.ints:
        out[:, at : at + 4 * n] = state[name].detach().cpu().reshape(b, n).to(torch.int32).numpy().astype("<i4").view(np.uint8)
    (_pack_floats_np if b <= SMALL_BATCH else _pack_floats_torch)(state, codec, plan, out)
    return [r.tobytes() for r in out]


# Both write the same bytes (tests/test_model_core.py packs across SMALL_BATCH): x ~ scale * q, q int8. A serving event
# packs one user, where the per-call overhead of ~10 array operations per tensor is most of the cost, so numpy quantises
# all tensors' values as one (b, N) array, every segment's peak by one reduceat (section 0 of `holorec bench serve`:
# bench/results/cpu-2026-12-04/floor_ab); a big batch packs thousands, where numpy's reduceat over 3-4-value
# rows is several times slower than torch's amax over a tensor's rows.
def _pack_floats_np(state: State, codec: str, plan: Plan, out: np.ndarray) -> None:
    b = out.shape[0]
    if not plan.floats:
        return
    x = np.concatenate([state[f[0]].detach().to("cpu", torch.float32).reshape(b, -1).numpy() for f in plan.floats], axis=1)  # (b, N)
    scales = None
    if codec in SCALE:
        peak = np.maximum.reduceat(np.abs(x), plan.seg_start, axis=1)  # (b, S)
        if codec == "int8":
            scale = div = np.maximum(peak, np.float32(1e-30)) / np.float32(127.0)
        else:  # within float16's range
            scale = (np.clip(peak, np.float32(2.0**-14), np.float32(6e4)) / np.float32(127.0)).astype(np.float16)
            div = scale.astype(np.float32)
        scales = scale.astype(SCALE[codec], copy=False).view(np.uint8)  # (b, S * scale bytes)
        x = np.rint(x / np.repeat(div, plan.seg_len, axis=1))
        np.clip(x, -127, 127, out=x)
    vals = x.astype(VALUE[codec]).view(np.uint8)  # (b, N * value bytes)
    w, sw = _width(VALUE[codec]), _width(SCALE.get(codec))
    for name, shape, s_at, segs, v_at, first, seg0 in plan.floats:
        if scales is not None:
            out[:, s_at:v_at] = scales[:, seg0 * sw : (seg0 + segs) * sw]
        n = math.prod(shape)
        out[:, v_at : v_at + n * w] = vals[:, first * w : (first + n) * w]


def _pack_floats_torch(state: State, codec: str, plan: Plan, out: np.ndarray) -> None:
    b = out.shape[0]
    for name, _, s_at, segs, v_at, _, _ in plan.floats:
        x = state[name].detach().to("cpu", torch.float32).reshape(b, max(segs, 1), -1)  # (b, segments, values each)
        if codec in SCALE:
            scale, q = _quantise_torch(x, codec)
            out[:, s_at:v_at] = scale.numpy().astype(SCALE[codec], copy=False).reshape(b, -1).view(np.uint8)
            q = q.numpy()
        else:
            q = x.numpy()
        vals = q.astype(VALUE[codec], copy=False).reshape(b, -1).view(np.uint8)  # (b, value bytes)
        out[:, v_at : v_at + vals.shape[1]] = vals


def _quantise_torch(x: Tensor, codec: str, dims: tuple[int, ...] = (2,)) -> tuple[Tensor, Tensor]:
    """x (b, segments, n) -> scales (b, segments, 1), int8 (b, segments, n); or each segment's values along `dims`."""
    peak = x.abs().amax(dims, keepdim=True)  # (b, segments, 1)
    if codec == "int8":
        scale = div = peak.clamp_min(1e-30) / 127.0
    else:
        scale = (peak.clamp(2.0**-14, 6e4) / 127.0).half()
        div = scale.float()
    return scale, torch.round(x / div).clamp(-127, 127).to(torch.int8)


def _raw(blobs: Sequence[bytes], plan: Plan, codec: str) -> np.ndarray:
    """b blobs -> (b, bytes) uint8, read-only. Raises ValueError on a wrong size."""
    for i, blob in enumerate(blobs):
        if len(blob) != plan.size:
            raise ValueError(f"state blob {i} has {len(blob)} bytes, expected {plan.size} for codec {codec}")
    return np.frombuffer(blobs[0] if len(blobs) == 1 else b"".join(blobs), dtype=np.uint8).reshape(len(blobs), plan.size)


def unpack(blobs: Sequence[bytes], template: State, codec: str = "float32") -> State:
    """b blobs -> (b, ...) tensors shaped like `template`'s rows. Raises ValueError on a wrong size."""
    plan = _plan(template, codec)
    b = len(blobs)
    raw = _raw(blobs, plan, codec)  # (b, bytes)
    out: State = {}
    for name, shape, dtype, at, n in plan.ints:
        out[name] = torch.from_numpy(raw[:, at : at + 4 * n].copy().view("<i4").astype(np.int64)).reshape(b, *shape).to(dtype)
    w = _width(VALUE[codec])
    for name, shape, s_at, segs, v_at, _, _ in plan.floats:
        n = math.prod(shape)
        x = np.ascontiguousarray(raw[:, v_at : v_at + w * n]).view(VALUE[codec]).astype(np.float32)  # (b, n)
        if segs:
            x = x.reshape(b, segs, -1)
            x *= np.ascontiguousarray(raw[:, s_at:v_at]).view(SCALE[codec]).astype(np.float32)[:, :, None]
        out[name] = torch.from_numpy(x.reshape(b, *shape))
    return out


# --- the blob as arrays, for a step that runs on the stored form (model/fast_step.py packed_step) ------------------
# A blob's parts in blob order: per integer tensor its int32 values (b, *shape); per float tensor its scales
# where the codec has them, shaped to broadcast over its values ((b, 1, ..) for a tensor's, (b, rows, 1, ..) for rows'),
# then its stored values (b, *shape). split and join move bytes only;
# parts_to_state and state_to_parts are unpack's and pack's arithmetic in torch, so they can be exported with the step.
def split(blobs: Sequence[bytes], template: State, codec: str) -> list[np.ndarray]:
    """b blobs -> their parts (views into one buffer where b == 1), a scale shaped to broadcast over its values.
    Raises ValueError on a wrong size."""
    plan = _plan(template, codec)
    b, raw = len(blobs), _raw(blobs, plan, codec)
    return [np.ascontiguousarray(raw[:, a:z]).view(dt).reshape(b, *shape) for a, z, dt, shape in plan.parts]


def join(parts: Sequence[np.ndarray], template: State, codec: str) -> list[bytes]:
    """split's inverse: parts -> b blobs."""
    plan = _plan(template, codec)
    b = parts[0].shape[0]
    stored = [p.astype(dt, copy=False) for p, (_, _, dt, _) in zip(parts, plan.parts)]
    if b == 1:  # one event at a time, the usual call: the parts' bytes one after another
        return [b"".join(p.tobytes() for p in stored)]
    return [r.tobytes() for r in np.concatenate([p.reshape(b, -1).view(np.uint8) for p in stored], axis=1)]


def parts_to_state(parts: Sequence[Tensor], template: State, codec: str) -> State:
    """split's parts as tensors -> the state, as unpack gives it. No reshapes: each is an op in the exported graph."""
    it, state = iter(parts), {}
    for name, segs in _plan(template, codec).order:
        if segs < 0:
            state[name] = next(it).to(template[name].dtype)
            continue
        scale = next(it).float() if segs else None  # broadcasts over the values it scales
        x = next(it).float()  # (b, *shape)
        state[name] = x if scale is None else x * scale
    return state


def state_to_parts(state: State, template: State, codec: str) -> list[Tensor]:
    """The state -> split's parts as tensors, holding what pack would write (the same peaks, so the same bytes)."""
    parts: list[Tensor] = []
    for name, segs in _plan(template, codec).order:
        x = state[name]  # (b, *shape)
        if segs < 0:
            parts.append(x.to(torch.int32))
        elif segs:  # a row's peak over the row, a tensor's over all of it
            parts += _quantise_torch(x.float(), codec, tuple(range(2 if segs > 1 else 1, x.dim())))
        else:
            parts.append(x.half() if codec == "float16" else x.float())
    return parts


def _check(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown state codec {codec!r}; choose from {list(CODECS)}")
