"""Micro-batching (service/batcher.py): a lone request runs on the event loop, concurrent ones form a batch on the
batcher's thread, and a slow lone request sends the next ones to the thread so the loop stays free."""
from __future__ import annotations

import asyncio
import threading
import time

from service.batcher import BACKOFF_S, SLOW_S, Batcher


def run_batches(delay_s: float, scenario) -> list[tuple[int, bool]]:  # type: ignore[no-untyped-def]
    """(batch size, ran on the loop's thread) for every batch `scenario(batcher)` caused."""
    seen: list[tuple[int, bool]] = []
    loop_thread: list[threading.Thread] = []

    def fn(items: list[int]) -> list[int]:
        seen.append((len(items), threading.current_thread() is loop_thread[0]))
        time.sleep(delay_s)
        return [2 * x for x in items]

    async def main() -> None:
        loop_thread.append(threading.current_thread())
        b: Batcher[int, int] = Batcher(fn, window_s=0.01, max_size=64, name="test")
        b.start()
        try:
            await scenario(b)
        finally:
            await b.stop()

    asyncio.run(main())
    return seen


def test_a_lone_request_runs_on_the_loop_and_concurrent_ones_batch_on_the_thread() -> None:
    async def scenario(b: Batcher) -> None:
        assert await b.submit(1) == 2
        assert await asyncio.gather(*(b.submit(i) for i in range(5))) == [0, 2, 4, 6, 8]

    assert run_batches(0.0, scenario) == [(1, True), (5, False)]


def test_a_slow_lone_request_sends_the_next_to_the_thread() -> None:
    async def scenario(b: Batcher) -> None:
        for i in range(3):
            assert await b.submit(i) == 2 * i
        assert b.thread_until > asyncio.get_running_loop().time() + BACKOFF_S / 2

    assert run_batches(2 * SLOW_S, scenario) == [(1, True), (1, False), (1, False)]
