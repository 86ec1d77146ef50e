"""In-process searches: in parallel over requests under load, over one request's queries when it is alone.

faiss spreads one call over every core with OpenMP (its IVF search splits the queries between the threads), and
concurrent calls would each start a team on the same cores: 2 calls of 2 threads on 2 cores preempt each other's
threads, and an OpenMP region waits for its slowest one. One call at a time leaves cores idle while the event
loop turns the last answer into gRPC and collects the next batch. So a search runs on one of `threads` workers
with its share of the cores: all of them when it is the only search running, one each when every worker is busy
(a single-threaded scan also spends less CPU per query than a region of several threads). OpenMP's thread count
is per calling thread (libgomp keeps it in the thread's own ICVs), so each worker sets its own before it calls
faiss. README Performance, the one-host row (`bench_router --in-process`), has what this buys.

A search of few queries runs on one thread even alone: a team's threads spin for a while after every parallel
region (libgomp's default wait policy), which costs more CPU than splitting a handful of queries saves. A server
of small searches (a shard server under a router's fan-outs, single queries in-process) spent more CPU spinning
than searching; a process-wide passive wait policy would cost large batches their parallel speed instead.

faiss's Python module installs an interrupt callback that a long search calls every few thousand vectors to
ask Python whether Ctrl-C was pressed, taking the GIL to ask. On a worker thread it can never see a signal (Python
handles them on the main thread only), and it waits for the GIL while the event loop holds it, so the searching
workers of the one-host router sat waiting on the loop mid-search. A pool's process does without it (see
no_signal_checks).

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
TEAM_MIN_ROWS = 32  # fewer queries than this: one thread (see above)


def small(rows: int | None) -> bool:
    """A search too small for an OpenMP team (see above); None: unknown, not small."""
    return rows is not None and rows < TEAM_MIN_ROWS


def no_signal_checks() -> None:
    """faiss searches stop calling back into Python to check for signals (see above): a server stops through its
    event loop's signal handler, never by interrupting a faiss call. Process-wide; faiss.PythonInterruptCallback
    .reset() puts the check back. faiss deletes the callback without the lock its checks take: the first pool of
    a server is made as it starts, before any search; a later pool's call deletes nothing, racing with nothing."""
    faiss.InterruptCallback.clear_instance()


class SearchPool:
    def __init__(self, threads: int | None = None, inline_small: bool = False):
        """threads: the cores searches may use (default: OpenMP's, which OMP_NUM_THREADS limits).
        inline_small: a search of few rows starting while no other runs runs on the caller's thread (the
        event loop), on one OpenMP thread: handing it to a worker costs a thread wake-up each way, more CPU than
        searching a few queries. For a server of small searches (a shard server); not for one
        whose loop also has other work to overlap with its searches (the in-process router)."""
        self.threads = max(1, threads or faiss.omp_get_max_threads())
        no_signal_checks()
        self.inline_small = inline_small
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="search")
        self._lock = threading.Lock()
        self.running = 0

    def share(self, rows: int | None = None) -> int:
        """OpenMP threads for a search of `rows` queries starting now (self.running counts it)."""
        if small(rows):
            return 1
        return max(1, self.threads // max(1, self.running))

    def _run(self, fn: Callable[[], T], rows: int | None) -> T:
        with self._lock:
            self.running += 1
            share = self.share(rows)
        faiss.omp_set_num_threads(share)
        try:
            return fn()
        finally:
            with self._lock:
                self.running -= 1

    async def run(self, fn: Callable[..., T], *args, rows: int | None = None, **kwargs) -> T:
        """fn(*args, **kwargs) on a worker; rows: the queries it searches (None: as many as it likes)."""
        if self.inline_small and small(rows) and not self.running:
            own = faiss.omp_get_max_threads()  # the caller's thread's count: given back after
            faiss.omp_set_num_threads(1)
            try:
                return fn(*args, **kwargs)
            finally:
                faiss.omp_set_num_threads(own)
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self._run, functools.partial(fn, *args, **kwargs), rows)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False)
