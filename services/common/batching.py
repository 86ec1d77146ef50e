"""Dynamic batching: concurrent requests coalesced into one call of a batch function."""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass
from typing import Callable

import numpy as np

from services.common import metrics, tracing
from services.common.errors import TooLarge


@dataclass
class _Job:
    rows: np.ndarray
    future: asyncio.Future
    trace: object = None  # the caller's trace context (tracing.current())


class DynamicBatcher:
    """Coalesces concurrent requests into batches (as Ray Serve's @serve.batch).

    fn takes the rows of all collected requests stacked, and returns one result row per input row
    (anything sliceable); a sync fn runs in the thread pool, an async one on the loop.
    """

    def __init__(self, fn: Callable, max_batch: int, max_wait_s: float, max_queue: int, workers: int = 1,
                 name: str = "embed"):
        self.fn, self.max_batch, self.max_wait_s = fn, max_batch, max_wait_s
        self.is_async = inspect.iscoroutinefunction(fn)
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=max_queue)
        self.workers, self.tasks = workers, []
        self.depth = metrics.QUEUE_DEPTH.labels(name)
        self.name = name
        self.batches = 0  # batch calls made (for tests and metrics)
        self.running = 0  # batches being called now

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch being called: stopping it now loses no caller."""
        return self.queue.empty() and not self.running

    def start(self) -> None:
        """workers > 1 keeps several batches in flight (e.g. fan-outs waiting on the network)."""
        self.tasks = [asyncio.get_running_loop().create_task(self._run()) for _ in range(self.workers)]

    async def submit(self, rows: np.ndarray):
        job = _Job(rows, asyncio.get_running_loop().create_future(), tracing.current())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise TooLarge(f"busy: {self.queue.qsize()} requests queued; retry later") from None
        self.depth.set(self.queue.qsize())
        return await job.future

    async def _collect(self, first: _Job | None) -> tuple[list[_Job], _Job | None]:
        """`first` (or the first waiting job), everything already queued behind it, and what arrives
        within max_wait_s, up to max_batch rows. A job that would overflow the batch is handed back
        to lead this worker's next batch (a lone job bigger than max_batch goes alone)."""
        loop = asyncio.get_running_loop()
        jobs = [first or await self.queue.get()]
        size = len(jobs[0].rows)
        deadline = loop.time() + self.max_wait_s
        while size < self.max_batch:
            try:
                job = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if size + len(job.rows) > self.max_batch:
                return jobs, job
            jobs.append(job)
            size += len(job.rows)
        return jobs, None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        leftover = None
        while True:
            jobs, leftover = await self._collect(leftover)
            self.depth.set(self.queue.qsize())
            self.running += 1
            try:
                rows = np.concatenate([j.rows for j in jobs])
                with tracing.for_batch([j.trace for j in jobs], f"{self.name} batch"):
                    if self.is_async:
                        out = await self.fn(rows)
                    else:
                        out = await loop.run_in_executor(None, self.fn, rows)
                self.batches += 1
                start = 0
                for job in jobs:
                    if not job.future.done():
                        job.future.set_result(out[start:start + len(job.rows)])
                    start += len(job.rows)
            except Exception as e:  # the batch failed: every waiting caller hears it
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)
            finally:
                self.running -= 1

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
