"""The micro-batcher (service/batcher.py): a lone request runs at once on the loop, requests that come together run
as one batch, and a failure reaches every caller."""
from __future__ import annotations

import asyncio
import threading

import pytest

from service.batcher import Batcher


def run(coro_fn):  # type: ignore[no-untyped-def]
    return asyncio.run(coro_fn())


def test_a_lone_request_runs_on_the_loop_and_requests_that_come_together_form_one_batch() -> None:
    calls: list[tuple[list[int], bool]] = []  # (batch, ran on the loop's thread)
    loop_thread = threading.get_ident()

    def double(xs: list[int]) -> list[int]:
        calls.append((list(xs), threading.get_ident() == loop_thread))
        return [2 * x for x in xs]

    async def main() -> tuple[int, list[int], int]:
        b = Batcher(double, window_s=0.002, max_size=64, name="test")
        b.start()
        alone = await b.submit(1)
        together = await asyncio.gather(*(b.submit(x) for x in range(10, 20)))
        later = await b.submit(3)
        await b.stop()
        return alone, together, later

    alone, together, later = run(main)
    assert alone == 2 and together == [2 * x for x in range(10, 20)] and later == 6
    assert calls[0] == ([1], True) and calls[-1] == ([3], True)  # alone: at once, on the loop, no thread hand-off
    batched = calls[1:-1]
    assert sorted(x for batch, _ in batched for x in batch) == list(range(10, 20))
    assert len(batched) < 10 and max(len(batch) for batch, _ in batched) > 1  # ten at once are not ten lone requests


def test_a_failure_reaches_every_caller_alone_or_batched() -> None:
    def fail(xs: list[int]) -> list[int]:
        raise RuntimeError(f"store down for {len(xs)}")

    async def main() -> list[BaseException | int]:
        b = Batcher(fail, window_s=0.002, max_size=64, name="test")
        b.start()
        with pytest.raises(RuntimeError):
            await b.submit(1)
        got = await asyncio.gather(*(b.submit(x) for x in range(5)), return_exceptions=True)
        await b.stop()
        return got

    assert all(isinstance(e, RuntimeError) for e in run(main))
