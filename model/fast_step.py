"""The serving `step` without Python between its ops: ONNX Runtime for small batches, a frozen TorchScript trace for large.

One event's step is some forty small tensor ops at batch 1; eager PyTorch spends most of their time in
Python dispatch. Two compiled forms of the same `step` each win where the other loses (`holorec bench step`,
bench/results/step.md, README): ONNX Runtime runs HoloMambaRec's step faster than the trace at batch 1, the
case of one event at a time (3-7% in `bench step`, whose models take turns and so run with cold caches; 2-2.5x
hot; an event 7-13% cheaper in the service), and at 8 users; it is level to slower at 16 and slower from about
20 users up, where the trace's kernels vectorise better. So batches up to SMALL_BATCH go to ONNX Runtime and
larger ones to the trace.
Both record one path through the code, so they are used only for models whose `step` has no branch on
the data (`SeqRecModel.traceable_step`), and each only after it reproduces the eager `step` within 1e-5
at two batch sizes; anything else, or a failed export, serves the eager `step`.
For one event per user (the usual request), `packed_step` runs unpack, the step and pack as one call on the stored
bytes, so the state never passes through torch between them (README: Serving over HTTP): model/native.c, the step written
in C, where `pip install` built it and it covers the model (0.051 against ONNX Runtime's 0.133 ms for one user, 0.23
against 0.28 for 8 in `holorec bench step`, bench/results/cpu-2026-12-08c-serve), else one ONNX Runtime call.
Given a cache directory, a process reads the graphs an earlier one exported for the same weights and code instead of
exporting them again (_graphs): the export and the `onnx` import it needs were a third of a service start.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from model.native import library
from model.state import CODECS, join, pack, parts_to_state, placement, split, state_to_parts, unpack
from model.protocol import SeqRecModel, State

StepFn = Callable[[Tensor, State], tuple[Tensor, State]]
PackedStepFn = Callable[[np.ndarray, list[bytes]], tuple[np.ndarray, list[bytes]]]  # packed_step: items, blobs -> vectors, blobs
SMALL_BATCH = 8  # up to this many users per step, ONNX Runtime; more, the trace (bench/results/step.md, README)
# up to this many users with one event each, the packed step (C or ONNX Runtime); more, unpack, the trace and pack: at 16
# users the C step took 0.44 ms against 0.61, at 32 0.83 against 0.85, level (`holorec bench step`,
# bench/results/cpu-2026-12-08c-serve/step_head_1/step.md)
PACKED_BATCH = 16
CACHE_BYTES = 1 << 30  # a cache directory's graphs beyond this, least recently used first, are deleted (_keep); each holds the item table


class _Positional(nn.Module):
    """step(items, state dict) as a function of tensors only, which is what a trace or an export takes and returns."""

    def __init__(self, model: SeqRecModel, keys: list[str]) -> None:
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, items: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        h, new = self.model.step(items, dict(zip(self.keys, state)))
        return (h, *(new[k] for k in self.keys))


@torch.inference_mode()
def serving_step(model: SeqRecModel, cache_dir: str | None = None) -> StepFn:
    """The step the service runs: ONNX Runtime up to SMALL_BATCH users and the trace above, where each is exact;
    whichever of them is missing, `model.step` in its place. `cache_dir`: see _graphs."""
    small, large = onnx_step(model, cache_dir), trace_step(model)
    if small is None and large is None:
        return model.step
    small, large = small or model.step, large or model.step

    def step(items: Tensor, state: State) -> tuple[Tensor, State]:  # (b,), state -> (b, d), state
        return (small if items.shape[0] <= SMALL_BATCH else large)(items, state)

    return step


@torch.inference_mode()
def trace_step(model: SeqRecModel) -> StepFn | None:
    """A frozen TorchScript trace of `model.step` (eval mode, weights fixed from now on), or None."""
    if not model.traceable_step:
        return None
    keys = list(model.init_state(1))
    try:
        with warnings.catch_warnings():  # the tracer's warnings about constant shapes: what it records is checked below
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript; where it is gone, eager serves
            traced = torch.jit.freeze(torch.jit.trace(_Positional(model.eval(), keys).eval(), _example(model, 1, keys), check_trace=False))
    except Exception:  # noqa: BLE001 - any failure to trace leaves the eager step, which is always right
        return None

    def step(items: Tensor, state: State) -> tuple[Tensor, State]:  # (b,), state -> (b, d), state
        out = traced(items, *(state[k] for k in keys))
        return out[0], dict(zip(keys, out[1:]))

    return step if _exact(model, step, keys) else None  # _exact also warms the TorchScript executor, whose first calls are slow


def _onnx(module: nn.Module, example: tuple[Tensor, ...], n_out: int) -> bytes | None:
    """`module` exported to ONNX with a free batch dimension (inputs in0.., outputs out0..); None without onnxruntime
    (nothing could run it) or for an op the exporter cannot write."""
    names, outs = [f"in{i}" for i in range(len(example))], [f"out{i}" for i in range(n_out)]
    try:
        import onnxruntime  # noqa: F401 - only to know it is there

        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's tracer and deprecation warnings: callers check what it records
            torch.onnx.export(module.eval(), example, buf, dynamo=False, input_names=names, output_names=outs,
                              dynamic_axes={n: {0: "b"} for n in [*names, *outs]})
        return buf.getvalue()
    except Exception:  # noqa: BLE001 - no onnxruntime, or an op it cannot export: the trace or eager serves
        return None


def _session(graph: bytes, batch: int | None = None) -> Any:
    """An ONNX Runtime session on this process's torch thread count; with `batch`, the batch dimension fixed at it, so
    ONNX Runtime folds away the shape arithmetic a free one needs. None if it cannot load the graph."""
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = torch.get_num_threads(), 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads must not busy-wait on a shared CPU
        if batch is not None:  # as fast as the graph rewritten with the dimension fixed (74.2 vs 74.6 us a packed step), without importing onnx
            opts.add_free_dimension_override_by_name("b", batch)
        return ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - the trace or eager serves
        return None


def _graphs(model: SeqRecModel, kind: str, cache_dir: str | None, export: Callable[[], bytes | None]) -> Iterator[tuple[bytes, Path | None]]:
    """This model's `kind` graph, from `cache_dir` where an earlier process exported it, then exported now: the caller
    takes the first that proves exact and keeps it with `_keep`. A service start spends more on the export (and the
    `onnx` import the exporter needs) than on anything but importing torch."""
    path = _cache_path(model, kind, cache_dir)
    if path is not None and path.is_file():
        with contextlib.suppress(OSError):
            graph = path.read_bytes()
            os.utime(path)  # recently used: _keep prunes by age
            yield graph, None  # already there: nothing to keep
    graph = export()
    if graph is not None:
        yield graph, path


def _cache_path(model: SeqRecModel, kind: str, cache_dir: str | None) -> Path | None:
    """The file for this export: named by a hash of all it depends on (weights, config, the model code, torch and ONNX
    Runtime versions). A stale or damaged file can still only cost time: the graph must prove exact before it serves."""
    if not cache_dir:
        return None
    try:
        import onnxruntime

        h = hashlib.sha256(f"{kind} {torch.__version__} {onnxruntime.__version__} {sorted(model.config.to_dict().items())}".encode())
        for src in sorted(Path(__file__).parent.glob("*.py")):
            h.update(src.read_bytes())
        for name, t in model.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return Path(cache_dir).expanduser() / f"{kind}-{h.hexdigest()[:32]}.onnx"
    except Exception:  # noqa: BLE001 - no onnxruntime: nothing will be exported either
        return None


def _keep(graph: bytes, path: Path | None) -> None:
    """Write a freshly exported graph to the cache (atomically: workers start together), then trim it to CACHE_BYTES."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(graph)
        os.replace(tmp, path)
        total = 0
        for f in sorted(path.parent.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True):
            total += f.stat().st_size
            if total > CACHE_BYTES and f != path:
                f.unlink(missing_ok=True)
    except OSError:  # a read-only or full disk: the next start exports again
        pass


@torch.inference_mode()
def onnx_step(model: SeqRecModel, cache_dir: str | None = None) -> StepFn | None:
    """`model.step` exported to ONNX (or read from `cache_dir`, see _graphs) and run by ONNX Runtime on this process's
    torch thread count, or None."""
    if not model.traceable_step:
        return None
    keys = list(model.init_state(1))
    export = lambda: _onnx(_Positional(model.eval(), keys), _example(model, 1, keys), 1 + len(keys))  # noqa: E731
    for graph, path in _graphs(model, "step", cache_dir, export):
        session = _session(graph)
        if session is None:
            continue
        names = [i.name for i in session.get_inputs()]

        def step(items: Tensor, state: State, session: Any = session, names: list[str] = names) -> tuple[Tensor, State]:  # (b,), state -> (b, d), state
            out = session.run(None, dict(zip(names, [items.numpy(), *(np.ascontiguousarray(state[k].numpy()) for k in keys)])))
            return torch.from_numpy(out[0]), {k: torch.from_numpy(v) for k, v in zip(keys, out[1:])}

        if _exact(model, step, keys):
            _keep(graph, path)
            return step
    return None


class _Packed(nn.Module):
    """step on the state as stored: the blob's parts in (model/state.py split), the new state's parts out, with
    unpack's and pack's arithmetic in the graph."""

    def __init__(self, model: SeqRecModel, template: State, codec: str) -> None:
        super().__init__()
        self.model, self.template, self.codec = model, template, codec

    def forward(self, items: Tensor, *parts: Tensor) -> tuple[Tensor, ...]:
        h, new = self.model.step(items, parts_to_state(parts, self.template, self.codec))
        return (h, *state_to_parts(new, self.template, self.codec))


@torch.inference_mode()
def packed_step(model: SeqRecModel, codec: str, cache_dir: str | None = None, native: bool = True) -> PackedStepFn | None:
    """unpack, `model.step` and pack in one call, for one event per user: an event's unpack, pack and the torch/numpy
    conversions between them cost about as much as the step (README: Serving over HTTP). model/native.c where it was
    built and covers the model (native_step), else one ONNX Runtime call. The bytes are pack(step(unpack(blobs))) but
    for a rare last-bit flip where the compiled float arithmetic rounds otherwise (checked: within one quantisation
    step of the eager step's state). None where `onnx_step` would be. `native=False`: ONNX Runtime even where C is built."""
    return (native_step(model, codec) if native else None) or onnx_packed_step(model, codec, cache_dir)


@torch.inference_mode()
def onnx_packed_step(model: SeqRecModel, codec: str, cache_dir: str | None = None) -> PackedStepFn | None:
    """packed_step as one ONNX Runtime call: the graph of unpack, `model.step` and pack; None where `onnx_step` would be."""
    if not model.traceable_step:
        return None
    template = model.init_state(1)
    keys = list(template)

    def export() -> bytes | None:
        example = _example(model, 1, keys)
        parts = [torch.from_numpy(p.copy()) for p in split(pack(dict(zip(keys, example[1:])), codec), template, codec)]
        return _onnx(_Packed(model.eval(), template, codec), (example[0], *parts), 1 + len(parts))

    for graph, path in _graphs(model, f"packed-{codec}", cache_dir, export):
        # Batch 1 (one event at a time) gets a session of its own with the batch fixed, which folds away the shape
        # arithmetic (an event 0.06-0.08 ms cheaper: bench/results/cpu-2026-12-05b/floor_ab_static)
        one, many = _session(graph, 1), _session(graph)
        if one is None or many is None:
            continue
        names = [i.name for i in one.get_inputs()]

        def step(items: np.ndarray, blobs: list[bytes], one: Any = one, many: Any = many, names: list[str] = names) -> tuple[np.ndarray, list[bytes]]:  # (b,) int64, b blobs -> (b, d), b blobs
            out = (one if len(blobs) == 1 else many).run(None, dict(zip(names, [items, *split(blobs, template, codec)])))
            return out[0], join(out[1:], template, codec)

        if _packed_exact(model, step, keys, template, codec):
            _keep(graph, path)
            return step
    return None


def packed_kind(step: PackedStepFn | None) -> str:
    """Which packed step `packed_step` returned, for the service's start-up log: C, ONNX Runtime or none."""
    if step is None:
        return "none"
    return "C (model/native.c)" if step.__qualname__.startswith(native_step.__name__) else "ONNX Runtime"


def _native_covers(model: SeqRecModel) -> bool:
    """The configurations model/native.c computes: HoloMambaRec with pre-norm blocks, the GELU feed-forward or none."""
    c = model.config
    return (c.model == "holomamba" and c.bundle == 1 and c.recent_attn == 0 and not c.post_norm and not c.ffn_glu
            and c.d_conv >= 2)


def _native_weights(model: SeqRecModel) -> np.ndarray:
    """Every weight the step reads, in model/native.c's order, as one float32 array; a Linear's weight transposed."""
    parts: list[Tensor] = []
    for layer, ffn in zip(model.layers, model.ffns):  # type: ignore[attr-defined]
        parts += [layer.norm.weight, layer.norm.bias, layer.in_proj.weight.T, layer.in_proj.bias, layer.conv.weight[:, 0],
                  layer.conv.bias, layer.x_proj.weight.T, layer.dt_proj.weight.T, layer.dt_proj.bias, -torch.exp(layer.A_log),
                  layer.D, layer.out_proj.weight.T, layer.out_proj.bias]
        if model.config.ffn_mult > 0:
            norm, w1, _, _, w2, _ = ffn.net
            parts += [norm.weight, norm.bias, w1.weight.T, w1.bias, w2.weight.T, w2.bias]
    parts += [model.norm.weight, model.norm.bias]  # type: ignore[attr-defined]
    return torch.cat([p.detach().float().contiguous().reshape(-1) for p in parts]).numpy()


@torch.inference_mode()
def native_step(model: SeqRecModel, codec: str) -> PackedStepFn | None:
    """unpack, step and pack for one event per user in C (model/native.c), or None where its library was not built, it
    does not cover the model, or it does not reproduce the eager step (as `packed_step` checks its graph)."""
    lib = library()
    if lib is None or not _native_covers(model):
        return None
    fn = lib.holorec_step
    c, template = model.config, model.init_state(1)
    ssm = model.layers[0]  # type: ignore[attr-defined]
    size, at = placement(template, codec)
    table = model.table().detach().float().contiguous().numpy()  # (v, d): the rows `embed` reads
    dims = np.array([c.d_model, ssm.e, ssm.n, ssm.r, ssm.k, c.ffn_mult * c.d_model if c.ffn_mult > 0 else 0, c.n_layers,
                     len(table), CODECS[codec], size, *(x for i in range(c.n_layers) for k in ("conv", "ssm") for x in at[f"{k}{i}"])],
                    np.int32)
    weights, scale = _native_weights(model), c.d_model**0.5 if c.embed_scale else 1.0
    held = (dims, weights, table)  # the arrays the library reads: alive as long as the step
    args = (dims.ctypes.data, weights.ctypes.data, table.ctypes.data, scale)

    def step(items: np.ndarray, blobs: list[bytes], held: Any = held) -> tuple[np.ndarray, list[bytes]]:  # (b,) int64, b blobs -> (b, d), b blobs
        b = len(blobs)
        if any(len(x) != size for x in blobs):
            raise ValueError(f"a state blob is not {size} bytes, the size for codec {codec}")
        items = np.ascontiguousarray(items, np.int64)
        out, vec = np.empty(b * size, np.uint8), np.empty((b, c.d_model), np.float32)
        if fn(*args, items.ctypes.data, b, blobs[0] if b == 1 else b"".join(blobs), out.ctypes.data, vec.ctypes.data):
            raise IndexError(f"an item index outside the model's {len(table) - 1} items")
        raw = out.tobytes()
        return vec, [raw] if b == 1 else [raw[i * size : (i + 1) * size] for i in range(b)]

    return step if _packed_exact(model, step, list(template), template, codec) else None


def _exact(model: SeqRecModel, step: StepFn, keys: list[str]) -> bool:
    """Does `step` reproduce the eager step within 1e-5, at batch 1 and 3, twice (the second time on a warm executor)?"""
    for b in (1, 3, 1, 3):
        args = _example(model, b, keys, seed=b)
        want, got = model.step(args[0], dict(zip(keys, args[1:]))), step(args[0], dict(zip(keys, args[1:])))
        pairs = zip((want[0], *want[1].values()), (got[0], *(got[1][k] for k in want[1])))
        if any(w.shape != g.shape or not torch.allclose(w, g.to(w.dtype), atol=1e-5, rtol=0) for w, g in pairs):
            return False
    return True


def _packed_exact(model: SeqRecModel, step: PackedStepFn, keys: list[str], template: State, codec: str) -> bool:
    """Does `step` give the eager step's vector within 1e-5 and its state within one quantisation step, at batch 1 and 3?
    (The codec's own rounding of that state, doubled, plus 1e-5 bounds a last-bit flip of one value.)"""
    for b in (1, 3, 1, 3):
        args = _example(model, b, keys, seed=b)
        blobs = pack(dict(zip(keys, args[1:])), codec)
        want_h, want = model.step(args[0], unpack(blobs, template, codec))
        got_h, got_blobs = step(args[0].numpy(), blobs)
        got, rounded = unpack(got_blobs, template, codec), unpack(pack(want, codec), template, codec)
        if got_h.shape != tuple(want_h.shape) or not np.allclose(got_h, want_h.numpy(), atol=1e-5, rtol=0):
            return False
        for k in keys:
            tol = 2 * (rounded[k].double() - want[k].double()).abs().max().item() + 1e-5
            if (got[k].double() - want[k].double()).abs().max().item() > tol:
                return False
    return True


def _example(model: SeqRecModel, b: int, keys: list[str], seed: int = 0) -> tuple[Tensor, ...]:
    """Items (a padding 0 among them when b > 1) and a state a few events in."""
    g = torch.Generator().manual_seed(seed)
    state = model.init_state(b)
    for _ in range(3):
        _, state = model.step(torch.randint(1, model.config.n_items + 1, (b,), generator=g), state)
    items = torch.randint(1, model.config.n_items + 1, (b,), generator=g)
    if b > 1:
        items[0] = 0
    return (items, *(state[k] for k in keys))
