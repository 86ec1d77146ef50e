"""In-process searches: in parallel over requests under load, over one request's queries when it is alone.

faiss spreads one call over every core with OpenMP (its IVF search splits the queries between the threads), and
concurrent calls would each start a team on the same cores: 2 calls of 2 threads on 2 cores preempt each other's
threads, and an OpenMP region waits for its slowest one. One call at a time leaves the cores idle while the event
loop turns the last answer into gRPC and collects the next batch (1.5 of 2 cores used under bench_router's load).
So a search runs on one of `threads` workers with its share of the cores: all of them when it is the only search
running, one each when every worker is busy (a single-threaded scan also spends less CPU per query than a
2-thread region: 0.042 vs 0.055 ms at 1M x 128). OpenMP's thread count is per calling thread (libgomp keeps it in
the thread's own ICVs), so each worker sets its own before it calls faiss.

Hand-written: faiss has no scheduler of its own for concurrent calls, and a thread pool of faiss calls needs
only the count of searches running.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import faiss

T = TypeVar("T")


class SearchPool:
    def __init__(self, threads: int | None = None):
        """threads: the cores searches may use (default: OpenMP's, which OMP_NUM_THREADS limits)."""
        self.threads = max(1, threads or faiss.omp_get_max_threads())
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="search")
        self._lock = threading.Lock()
        self.running = 0

    def share(self) -> int:
        """OpenMP threads for a search starting now (self.running counts it)."""
        return max(1, self.threads // max(1, self.running))

    def _run(self, fn: Callable[[], T]) -> T:
        with self._lock:
            self.running += 1
            share = self.share()
        faiss.omp_set_num_threads(share)
        try:
            return fn()
        finally:
            with self._lock:
                self.running -= 1

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self._run, functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False)
