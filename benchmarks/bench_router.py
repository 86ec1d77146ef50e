"""Router over shard servers (real processes, gRPC) vs raw faiss in-process, same index and nprobe.

Builds an index of N clustered vectors in S shards with the auto-chosen parameters, starts S shard
servers and a router, and prints:
  * recall@10 against exact search of raw faiss and of the router, and the recall/QPS curve
    of raw faiss over nprobe;
  * SearchBatch QPS through the router ÷ raw faiss QPS (same batches, same nprobe), for the
    columnar answer (bulk callers) and the per-query Hit messages;
  * single-query latency p50/p99 with C concurrent clients, and the cache-hit p50 with Redis.
Everything (load client, router, shard servers) shares this machine's cores, as raw faiss does.
  * single-query latency with αQE (--qe) against plain search, 1 and C clients: every query expanded, and gated
    (the default: τ put at the median best score of the queries, so half of them expand).
With --in-process the router searches every shard in its own process (`--shards local`, what `imsearch serve`
runs on one host) instead of over shard servers.
Usage: python -m benchmarks.bench_router [--n 1000000] [--shards 4] [--clients 32] [--concurrency 8] [--qe 10]
       [--in-process]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq

from benchmarks.cpu import with_cpu
from services.common.config import Settings
from services.eval.synthetic import clustered_unit_vectors, write_embeddings
from services.index import faiss_util
from services.indexer.build import build_index
from services.searcher.client import RouterClient, batch_request
from services.searcher.localshards import load
from services.searcher.searchpool import no_signal_checks
from services.stack.stack import Stack, StackSpec


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


def merged_raw_index(idx_root: Path, manifest) -> faiss.Index:
    """The S shards merged back into one index: exactly the unsharded index, trained once."""
    files = [idx_root / "versions" / manifest.version / s.file for s in manifest.shards]
    raw = faiss.read_index(str(files[0]))
    for f in files[1:]:
        other = faiss.read_index(str(f))  # keep a reference: extract_index_ivf returns a borrowed pointer
        faiss.extract_index_ivf(raw).merge_from(faiss.extract_index_ivf(other), 0)
    return raw


def timed_qps(fn, batches: list, min_seconds: float = 5.0) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        for b in batches:
            fn(b)
            done += len(b)
    return done / (time.perf_counter() - start)


def searches_alone(idx_root: Path, settings: Settings, batches: list, k: int, nprobe: int,
                   seconds: float = 5.0) -> tuple[float, float]:
    """(QPS, ms of CPU a query) of the in-process router's searches with no server around them: one thread per
    core, each on one OpenMP thread (as its SearchPool runs them under load), two batches of queries at a time
    (as its batcher joins them). The ceiling of the one-host router on these cores, whatever its gRPC costs."""
    searcher = load(str(idx_root), None, settings)
    no_signal_checks()  # the process as the router's (searchpool.py)
    joined = [np.concatenate(batches[i:i + 2]) for i in range(0, len(batches), 2)]
    threads, done, start = os.cpu_count() or 1, [], time.perf_counter()

    def work() -> None:
        faiss.omp_set_num_threads(1)
        n, i = 0, 0
        while time.perf_counter() - start < seconds:
            searcher.search_arrays(joined[i % len(joined)], k, nprobe)
            n, i = n + len(joined[i % len(joined)]), i + 1
        done.append(n)

    cpu = time.process_time()
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return sum(done) / wall, 1000 * cpu / sum(done)


async def router_qps(address: str, batches: list[np.ndarray], k: int, nprobe: int, concurrency: int,
                     seconds: float = 5.0, columnar: bool = False) -> float:
    requests = [batch_request(list(b), k, nprobe, columnar, qe=0) for b in batches]  # plain, as raw faiss
    async with RouterClient(address, timeout=30) as client:
        done, start = 0, time.perf_counter()

        async def worker(offset: int):
            nonlocal done
            i = offset
            while time.perf_counter() - start < seconds:
                await client.call("SearchBatch", requests[i % len(requests)])
                done += len(batches[i % len(batches)])
                i += 1

        await asyncio.gather(*(worker(c) for c in range(concurrency)))
        return done / (time.perf_counter() - start)


async def latencies(address: str, queries: np.ndarray, k: int, clients: int, per_client: int,
                    repeat: bool = False, qe: int | None = 0) -> np.ndarray:
    async with RouterClient(address, timeout=30) as client:
        out: list[float] = []

        async def one_client(c: int):
            for j in range(per_client):
                q = queries[0 if repeat else (c * per_client + j) % len(queries)]
                t = time.perf_counter()
                await client.search(q, k, qe=qe)
                out.append(time.perf_counter() - t)

        await asyncio.gather(*(one_client(c) for c in range(clients)))
        return np.array(out) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=8, help="SearchBatch calls in flight")
    ap.add_argument("--qe", type=int, default=10, help="αQE neighbours of the expanded-query latency rows")
    ap.add_argument("--fanouts", type=int, default=2, help="router fan-outs in flight (IMSEARCH_ROUTER_FANOUTS); "
                                                          "requests beyond share a fan-out")
    ap.add_argument("--in-process", action="store_true", help="the router searches the shards itself (one host)")
    args = ap.parse_args()
    k = 10
    # Raw faiss gets the router's BLAS switch for batches too (its faster setting for batch >= 20).
    faiss.cvar.distance_compute_blas_threshold = faiss_util.BLAS_MIN_QUERIES
    x = clustered_unit_vectors(args.n + 2000, args.dim, seed=0, clusters=max(100, args.n // 1000), noise=0.6)
    data, queries = x[:args.n], x[args.n:]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        settings = Settings(home=tmp / "home", flat_max=1000)
        write_embeddings(tmp / "emb", data, part_rows=200_000)
        t = time.perf_counter()
        m = build_index(str(tmp / "emb"), str(tmp / "idx"), shards=args.shards, settings=settings,
                        step=lambda s: print("  build:", s, flush=True))
        print(f"index {m.factory}, nprobe {m.nprobe} (tuned to recall@10 {m.tuning['recall_at_10']}), "
              f"{args.shards} shards, built in {time.perf_counter() - t:.0f}s")
        raw = merged_raw_index(tmp / "idx", m)
        exact = faiss.IndexFlatIP(args.dim)
        exact.add(data)
        _, truth = exact.search(queries[:1000], k)
        del exact
        row_of_id = {}  # raw index ids are content-hash ids: map them back to rows for recall
        for s in m.shards:
            docs = pq.read_table(tmp / "idx" / "versions" / m.version / s.docs_file).to_pydict()
            row_of_id.update({i: int(u.split("/")[1].split(".")[0]) for i, u in zip(docs["id"], docs["uri"])})
        to_rows = np.vectorize(lambda i: row_of_id.get(int(i), -1))

        print("raw faiss recall/QPS over nprobe (batch %d):" % args.batch)
        batches = [queries[i:i + args.batch] for i in range(0, 1000, args.batch)]
        for nprobe in sorted({1, 2, 4, 8, 16, 32, 64, m.nprobe}):
            _, I = faiss_util.search(raw, queries[:1000], k, nprobe)
            qps = timed_qps(lambda b, p=nprobe: faiss_util.search(raw, b, k, p), batches, 2.0)
            print(f"  nprobe {nprobe:>3}: recall@10 {recall(to_rows(I), truth):.4f}  {qps:8.0f} QPS")

        # The gated rows: τ at the median best score of their queries, so half of them expand (these synthetic
        # vectors have no gate sample to learn one from); every other row asks qe=0 (plain) or qe=N.
        best, _ = faiss_util.search(raw, queries[1000:], 1, m.nprobe)
        tau = float(np.median(best[:, 0]))
        env = {"IMSEARCH_HOME": str(tmp / "home"), "IMSEARCH_ROUTER_FANOUTS": str(args.fanouts),
               "IMSEARCH_QE_GATE": f"{tau:.6f}", "IMSEARCH_QE_NEIGHBOURS": str(args.qe)}
        if not args.in_process or "SHARD_OMP" in os.environ:  # shard servers: one faiss thread each
            env["OMP_NUM_THREADS"] = os.environ.get("SHARD_OMP", "1")
        print("router searching every shard in its own process" if args.in_process else
              f"router over {args.shards} shard servers")
        with Stack(StackSpec(str(tmp / "idx"), redis=True, env=env, in_process=args.in_process)).up() as stack:
            router = stack.router
            me = {"this process": os.getpid()}
            raw_qps, raw_wall, raw_cpu = with_cpu(me, lambda: timed_qps(
                lambda b: faiss_util.search(raw, b, k, m.nprobe), batches))
            col_qps, wall, cpu = with_cpu(me | {"router": router.pid}, lambda: asyncio.run(router_qps(
                router.address, batches, k, m.nprobe, args.concurrency, columnar=True)))
            hit_qps = asyncio.run(router_qps(router.address, batches, k, m.nprobe, args.concurrency))
            _, I = faiss_util.search(raw, queries[:1000], k, m.nprobe)

            async def router_ids():
                async with RouterClient(router.address, timeout=30) as client:
                    out = []
                    for b in batches:
                        reply = await client.search_batch(list(b), k, qe=0)
                        out += [[h.id for h in r.hits] for r in reply.results]
                    return np.array(out)

            routed = asyncio.run(router_ids())
            print(f"recall@10: raw faiss {recall(to_rows(I), truth):.4f}, router {recall(to_rows(routed), truth):.4f}")
            print(f"SearchBatch({args.batch}) x {args.concurrency} in flight, raw faiss {raw_qps:.0f} QPS:")
            print(f"  router, columnar answer: {col_qps:.0f} QPS, ratio {col_qps / raw_qps:.2f}")
            print(f"  router, Hit messages:    {hit_qps:.0f} QPS, ratio {hit_qps / raw_qps:.2f}")
            # Where the rest goes: the load client's CPU comes out of the same cores, and the router's own.
            per_query = {name: 1000 * seconds / (col_qps * wall) for name, seconds in cpu.items()}
            raw_ms, client_ms = 1000 * raw_cpu["this process"] / (raw_qps * raw_wall), per_query["this process"]
            print(f"  CPU per query (columnar): raw faiss {raw_ms:.4f} ms; load client {client_ms:.4f} ms, so at most "
                  f"{raw_ms / (raw_ms + client_ms):.2f} x raw faiss were the router free; router "
                  f"{per_query['router']:.4f} ms ({cpu['router'] / wall:.2f} of {os.cpu_count()} cores busy)")
            if args.in_process:
                alone_qps, alone_ms = searches_alone(tmp / "idx", settings, batches, k, m.nprobe)
                print(f"  the router's searches alone, no server: {alone_qps:.0f} QPS ({alone_qps / raw_qps:.2f} x raw "
                      f"faiss), {alone_ms:.4f} ms of CPU a query")
            lat = asyncio.run(latencies(router.address, queries, k, args.clients, 20))
            print(f"single query, {args.clients} clients: p50 {np.percentile(lat, 50):.2f} ms, "
                  f"p99 {np.percentile(lat, 99):.2f} ms")
            for clients in (1, args.clients):  # αQE: a first round of qe, a Fetch, the expanded search
                plain = asyncio.run(latencies(router.address, queries[1000:], k, clients, 200 // clients))
                qe = asyncio.run(latencies(router.address, queries[1000:], k, clients, 200 // clients, qe=args.qe))
                gated = asyncio.run(latencies(router.address, queries[1000:], k, clients, 200 // clients, qe=None))
                for name, lat_ in ((f"αQE {args.qe}, every query", qe), ("gated αQE, half the queries below τ", gated)):
                    p50, base = np.percentile(lat_, 50), np.percentile(plain, 50)
                    print(f"{name}, {clients} client(s): p50 {p50:.2f} ms vs plain {base:.2f} ms (x{p50 / base:.2f}), "
                          f"p99 {np.percentile(lat_, 99):.2f} vs {np.percentile(plain, 99):.2f} ms")
            asyncio.run(latencies(router.address, queries, k, 1, 2, repeat=True))  # fill the cache
            hit = asyncio.run(latencies(router.address, queries, k, 1, 200, repeat=True))
            print(f"cache hit, 1 client: p50 {np.percentile(hit, 50):.2f} ms, p99 {np.percentile(hit, 99):.2f} ms")


if __name__ == "__main__":
    main()
