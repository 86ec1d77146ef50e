"""In-process searches: in parallel over requests under load, each with its share of the cores; a search that
runs alone gets all of them."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import faiss
import numpy as np
import pytest

from services.common.config import Settings
from services.eval.synthetic import write_embeddings
from services.indexer.build import build_index
from services.searcher.collections import LOCAL, CollectionSpec
from services.searcher.searchpool import TEAM_MIN_ROWS, SearchPool
from services.searcher.service import start_router
from tests.helpers import random_unit_vectors


def test_a_search_running_alone_gets_every_core():
    pool = SearchPool(threads=3)
    try:
        assert asyncio.run(pool.run(faiss.omp_get_max_threads)) == 3
        assert pool.running == 0
    finally:
        pool.shutdown()


def test_searches_under_load_run_at_once_and_a_search_started_beside_another_gets_one_core():
    pool = SearchPool(threads=2)
    both_inside = threading.Barrier(2, timeout=10)  # broken (an error) unless both run at the same time

    def search() -> int:
        both_inside.wait()
        return faiss.omp_get_max_threads()

    async def two():
        return await asyncio.gather(pool.run(search), pool.run(search))

    try:
        threads = asyncio.run(two())
    finally:
        pool.shutdown()
    assert sorted(threads) == [1, 2]  # the first started alone (all cores), the second beside it (one)
    assert pool.running == 0


def test_a_search_of_few_queries_runs_on_one_thread_even_alone():
    """A team's threads spin ~0.5 ms of CPU after each search: not worth it for a handful of queries."""
    pool = SearchPool(threads=2)
    try:
        assert asyncio.run(pool.run(faiss.omp_get_max_threads, rows=TEAM_MIN_ROWS - 1)) == 1
        assert asyncio.run(pool.run(faiss.omp_get_max_threads, rows=TEAM_MIN_ROWS)) == 2
    finally:
        pool.shutdown()


def test_a_small_search_while_none_runs_stays_on_the_callers_thread_when_asked():
    """A hand-off to a worker costs more CPU than searching a few queries (a shard server's usual message)."""
    pool, caller = SearchPool(threads=2, inline_small=True), threading.get_ident()
    started, release = threading.Event(), threading.Event()

    def where() -> tuple[int, int]:
        return threading.get_ident(), faiss.omp_get_max_threads()

    def long_search() -> None:
        started.set()
        release.wait(10)

    async def scenario():
        alone = await pool.run(where, rows=3)
        big = await pool.run(where, rows=TEAM_MIN_ROWS)
        running = asyncio.ensure_future(pool.run(long_search))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        beside = await pool.run(where, rows=3)  # another search runs: this one goes to a worker
        release.set()
        await running
        return alone, big, beside

    saved = faiss.omp_get_max_threads()
    try:
        alone, big, beside = asyncio.run(scenario())
    finally:
        pool.shutdown()
        faiss.omp_set_num_threads(saved)
    assert alone == (caller, 1)
    assert big[0] != caller and big[1] == 2
    assert beside[0] != caller and beside[1] == 1


def test_a_shard_server_searches_a_few_queries_on_one_thread_and_a_big_batch_on_every_core(tmp_path, monkeypatch):
    """Before: a shard server searched on its event loop's thread with every core for any message, and a
    router's fan-outs of a few queries each spent more of its CPU spinning than searching."""
    from protos.imsearch.v1 import imsearch_pb2 as pb
    from services.common.convert import pack_queries
    from services.searcher.localshards import LocalShards, load
    from services.searcher.shard import ShardService

    settings = Settings(home=tmp_path / "home", flat_max=500)
    write_embeddings(tmp_path / "emb", random_unit_vectors(3000, 16, seed=1, clusters=20))
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=2, settings=settings)
    caller = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(4)  # the shard server's cores, whatever this machine has
    try:
        service = ShardService(LocalShards(load(str(tmp_path / "idx"), 0, settings), str(tmp_path / "idx"), 0,
                                           settings))
    finally:
        faiss.omp_set_num_threads(caller)
    searcher, seen = service.shards.pick(""), []
    search_arrays = searcher.search_arrays

    def recording(*args, **kwargs):
        seen.append(faiss.omp_get_max_threads())
        return search_arrays(*args, **kwargs)

    monkeypatch.setattr(searcher, "search_arrays", recording)

    async def ask(n: int) -> pb.ShardSearchResponse:
        data, dim = pack_queries(random_unit_vectors(n, 16, seed=n, clusters=20))
        return await service.Search(pb.ShardSearchRequest(queries=data, dim=dim, k=5), None)

    try:
        replies = [asyncio.run(ask(n)) for n in (3, TEAM_MIN_ROWS + 8)]
    finally:
        service.shards.pool.shutdown()
    assert seen == [1, 4]
    assert [len(r.ids) // 8 for r in replies] == [3 * 5, (TEAM_MIN_ROWS + 8) * 5]


def test_a_failed_search_raises_to_its_caller_and_frees_its_share():
    pool = SearchPool(threads=2)

    def fail():
        raise ValueError("bad query")

    try:
        with pytest.raises(ValueError, match="bad query"):
            asyncio.run(pool.run(fail))
        assert pool.running == 0 and asyncio.run(pool.run(faiss.omp_get_max_threads)) == 2
    finally:
        pool.shutdown()


def test_the_in_process_router_runs_concurrent_searches_at_the_same_time(tmp_path, monkeypatch):
    """Before: one search at a time in the router process (a single worker), the cores idle while the event
    loop answered the last batch and collected the next."""
    settings = Settings(home=tmp_path / "home", flat_max=500)
    data = random_unit_vectors(3000, 16, seed=1, clusters=20)
    write_embeddings(tmp_path / "emb", data)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=2, settings=settings)
    queries = random_unit_vectors(2, 16, seed=2, clusters=20)

    async def run():
        router = await start_router(CollectionSpec("default", LOCAL, str(tmp_path / "idx")), settings)
        try:
            assert router.shards.pool.threads == faiss.omp_get_max_threads()
            searcher = router.shards.pick(router.version)
            alone = [await router.search(queries[i:i + 1], k) for i, k in ((0, 5), (1, 7))]
            search_arrays, both_inside = searcher.search_arrays, threading.Barrier(2, timeout=10)

            def meeting(*args, **kwargs):  # both searches must be inside at once, or the barrier breaks
                both_inside.wait()
                return search_arrays(*args, **kwargs)

            monkeypatch.setattr(searcher, "search_arrays", meeting)
            # Different k: two batchers, so two searches (requests alike would share one batch).
            together = await asyncio.gather(router.search_shared(queries[0:1], 5),
                                            router.search_shared(queries[1:2], 7))
            return alone, together
        finally:
            await router.close()

    if faiss.omp_get_max_threads() < 2:
        pytest.skip("one core: searches run one at a time")
    alone, together = asyncio.run(run())
    for a, b in zip(alone, together):  # the same answers as searched one after the other
        assert np.array_equal(a.ids, b.ids) and np.allclose(a.scores, b.scores)


def test_shards_searched_on_threads_of_their_own_share_the_callers_cores(tmp_path, monkeypatch):
    """Shards that are not stacked (flat here) are searched on the searcher's per-shard threads: they share the
    calling search's OpenMP threads out (before: each started a team on every core, whatever the caller had)."""
    from services.index.shards import LoadedShard
    from services.searcher.local import IndexSearcher

    if faiss.omp_get_max_threads() < 2:
        pytest.skip("one core: every thread has one OpenMP thread")
    settings = Settings(home=tmp_path / "home")  # 3,000 vectors: flat shards, not stacked
    write_embeddings(tmp_path / "emb", random_unit_vectors(3000, 16, seed=1, clusters=20))
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=2, settings=settings)
    searcher = IndexSearcher(str(tmp_path / "idx"), settings)
    assert searcher.stacked is None
    seen, uris_of = [], LoadedShard.uris_of

    def recording(self, ids):  # runs on the thread that searched the shard, right after its search
        seen.append(faiss.omp_get_max_threads())
        return uris_of(self, ids)

    monkeypatch.setattr(LoadedShard, "uris_of", recording)
    queries = random_unit_vectors(8, 16, seed=2, clusters=20)
    caller = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)  # a search given one core (a search pool under load)
        alone = searcher.search_arrays(queries, 5)
        faiss.omp_set_num_threads(caller)  # a search given every core: each of the 2 shards gets half
        shared = searcher.search_arrays(queries, 5)
    finally:
        faiss.omp_set_num_threads(caller)
    assert seen == [1, 1, max(1, caller // 2), max(1, caller // 2)]
    assert np.array_equal(alone[1], shared[1])


def signal_handled_after(index: faiss.Index, queries: np.ndarray) -> tuple[float, float]:
    """(seconds from a signal sent 50 ms into a search on this thread to its handler running, seconds the
    search still had to go when it was sent). While faiss checks for signals the handler runs inside the
    search; without the check, only once it returns."""
    times = {}
    previous = signal.signal(signal.SIGUSR1, lambda *_: times.setdefault("handled", time.perf_counter()))

    def send():
        time.sleep(0.05)
        times["sent"] = time.perf_counter()
        os.kill(os.getpid(), signal.SIGUSR1)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        index.search(queries, 5)
        ended = time.perf_counter()
        sender.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert times["sent"] < ended - 0.1, "the search must outlast the signal for the test to mean anything"
    return times["handled"] - times["sent"], ended - times["sent"]


def test_once_a_search_pool_exists_faiss_stops_taking_the_gil_mid_search_to_check_for_signals():
    """The check took the GIL in every search; pool workers waited on the event loop for it (searchpool.py).
    In a process of its own: the test puts faiss's process-wide check back and takes it away again, which faiss
    does without a lock — a search another test left running on a thread raced with that once (a segfault of
    the whole run in CI), as no server ever does (its first pool takes the check away before any search)."""
    import subprocess
    import sys
    from pathlib import Path

    code = "from tests.unit.searcher.test_searchpool import signal_checks_then_none; signal_checks_then_none()"
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[3], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "checked", run.stdout


def signal_checks_then_none() -> None:
    rng = np.random.default_rng(0)
    data, queries = rng.random((60_000, 32), np.float32), rng.random((2_000, 32), np.float32)
    index = faiss.index_factory(32, "IVF32,Flat")
    index.train(data[:5_000])
    index.add(data)
    index.nprobe = 32
    faiss.omp_set_num_threads(1)  # the check asks Python from the calling thread: this one, the main thread
    faiss.PythonInterruptCallback.reset()  # faiss as imported: checking
    handled, remaining = signal_handled_after(index, queries)
    assert handled < remaining / 2, (handled, remaining)  # the fault lands: faiss asked Python mid-search
    SearchPool(threads=1).shutdown()
    handled, remaining = signal_handled_after(index, queries)
    assert handled >= remaining * 0.95, (handled, remaining)  # not until the search returned
    print("checked")
