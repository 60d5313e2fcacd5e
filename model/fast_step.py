"""The serving `step`, traced and frozen by TorchScript: the same ops without Python between them.

One event's step is some forty small tensor ops at batch 1; eager PyTorch spends most of their time in
Python dispatch. A frozen trace runs HoloMambaRec's step 2x faster at batch 1 and 1.4x at batch 64 (`holorec
bench step`, bench/results/step.md). A trace records one path through the code, so it is used only for models whose
`step` has no branch on the data (`SeqRecModel.traceable_step`), and only after it reproduces the eager
`step` within 1e-5 at two batch sizes; anything else, or a failed trace, serves the eager `step`.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from model.protocol import SeqRecModel, State

StepFn = Callable[[Tensor, State], tuple[Tensor, State]]


class _Positional(nn.Module):
    """step(items, state dict) as a function of tensors only, which is what a trace takes and returns."""

    def __init__(self, model: SeqRecModel, keys: list[str]) -> None:
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, items: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        h, new = self.model.step(items, dict(zip(self.keys, state)))
        return (h, *(new[k] for k in self.keys))


@torch.inference_mode()
def serving_step(model: SeqRecModel) -> StepFn:
    """A frozen trace of `model.step` (eval mode, weights fixed from now on), or `model.step` itself."""
    if not model.traceable_step:
        return model.step
    keys = list(model.init_state(1))
    try:
        with warnings.catch_warnings():  # the tracer's warnings about constant shapes: what it records is checked below
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript; where it is gone, eager serves
            traced = torch.jit.freeze(torch.jit.trace(_Positional(model.eval(), keys).eval(), _example(model, 1, keys), check_trace=False))
    except Exception:  # noqa: BLE001 - any failure to trace leaves the eager step, which is always right
        return model.step

    def step(items: Tensor, state: State) -> tuple[Tensor, State]:  # (b,), state -> (b, d), state
        out = traced(items, *(state[k] for k in keys))
        return out[0], dict(zip(keys, out[1:]))

    for b in (1, 3, 1, 3):  # also warms the TorchScript executor, whose first calls are slow
        args = _example(model, b, keys, seed=b)
        want, got = model.step(args[0], dict(zip(keys, args[1:]))), step(args[0], dict(zip(keys, args[1:])))
        if any(not torch.allclose(w, g, atol=1e-5, rtol=0) for w, g in zip((want[0], *want[1].values()), (got[0], *got[1].values()))):
            return model.step
    return step


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
