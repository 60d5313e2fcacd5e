"""Micro-batching: gather concurrent requests for a short window, run them as one batch.

Requests `await submit(x)`; a background task takes what is waiting. A lone request runs at once, on
the event loop: handing it to a thread and back costs more than its work on a busy machine, where the
thread waits for a CPU. When nothing is waiting or running, a request waits one turn of the loop (the
turn the task's wake-up gave others to come with it) and, still alone, runs in submit itself, without
the queue, a future and the task's two wake-ups (README: Serving over HTTP); if others came meanwhile, it
queues behind them (requests in flight together have no order between them). More than one request (there is concurrency): it
keeps gathering until `window_s` has passed or `max_size` are waiting, then runs `fn(batch)` on this
batcher's own thread, so the loop keeps taking requests meanwhile, and hands each caller its own
result or exception. Batching costs latency only under load, where requests arriving while a batch
runs form the next one. `max_size=1` turns batching off: every request runs alone, in arrival order
(on the thread while others wait).
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from service.metrics import BATCH_SIZE, labelled

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    def __init__(self, fn: Callable[[list[T]], list[R]], *, window_s: float, max_size: int, name: str) -> None:
        self.fn, self.window_s, self.max_size, self.name = fn, window_s, max_size, name
        self.queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] = asyncio.Queue()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")
        self.task: asyncio.Task[None] | None = None
        self.busy = False  # the task holds a batch (gathering or running it)
        self.claimed = False  # a lone request is about to run in submit

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        self.pool.shutdown(wait=True)

    async def submit(self, item: T) -> R:
        if not (self.busy or self.claimed) and self.queue.empty():  # nothing to batch with, nothing to wait for
            self.claimed = True  # requests coming meanwhile queue for the task
            try:
                await asyncio.sleep(0)  # one turn of the loop, as the task's wake-up gave them: they may come with this one
                if self.queue.empty():
                    labelled(BATCH_SIZE, self.name).observe(1)
                    return self.fn([item])[0]
            finally:
                self.claimed = False
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self.queue.put((item, fut))
        return await fut

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            self.busy = True
            deadline = loop.time() + self.window_s
            while len(batch) < self.max_size:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time() if len(batch) > 1 else 0
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            labelled(BATCH_SIZE, self.name).observe(len(batch))
            items = [x for x, _ in batch]
            alone = len(items) == 1 and self.queue.empty()  # requests that came with it would be in the batch or queued
            try:
                results = self.fn(items) if alone else await loop.run_in_executor(self.pool, self.fn, items)
                for (_, fut), res in zip(batch, results):
                    if not fut.done():
                        fut.set_result(res)
            except Exception as e:  # the whole batch failed (e.g. store down): every caller sees it
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
            finally:
                self.busy = False
