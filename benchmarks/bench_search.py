"""In-process sharded search vs raw faiss on the same data, index type and nprobe.

Prints QPS for both and their ratio (sharded ÷ raw), plus recall@10 of each against exact
search. Usage: python -m benchmarks.bench_search [--n 100000] [--dim 128] [--shards 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from services.common.config import Settings
from services.eval.synthetic import clustered_unit_vectors, write_embeddings
from services.index import faiss_util
from services.indexer.build import build_index
from services.searcher.local import IndexSearcher


def qps(fn, queries: np.ndarray, batch: int, min_seconds: float = 3.0) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        for i in range(0, len(queries), batch):
            fn(queries[i:i + batch])
        done += len(queries)
    return done / (time.perf_counter() - start)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--queries", type=int, default=1000)
    args = ap.parse_args()

    x = clustered_unit_vectors(args.n + args.queries, args.dim, seed=0, clusters=1000, noise=0.6)
    data, queries = x[:args.n], x[args.n:]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        settings = Settings(home=tmp / "home")
        write_embeddings(tmp / "emb", data)
        t = time.perf_counter()
        m = build_index(str(tmp / "emb"), str(tmp / "idx"), shards=args.shards, settings=settings, step=lambda s: None)
        build_s = time.perf_counter() - t
        searcher = IndexSearcher(str(tmp / "idx"), settings)
        raw = faiss_util.make_index(args.dim, m.factory)
        faiss_util.train(raw, data[:min(len(data), 64 * max(m.params["nlist"], 1))])
        raw.add_with_ids(data, np.arange(args.n, dtype=np.int64))

        exact = faiss.IndexFlatIP(args.dim)
        exact.add(data)
        _, truth_rows = exact.search(queries, 10)

        def raw_search(q):
            return faiss_util.search(raw, q, 10, m.nprobe, m.k_factor)

        def sharded_search(q):  # arrays, as raw faiss answers: ids, scores, shards, uris (Hit objects are the
            return searcher.search_arrays(q, 10)  # caller's choice: ~1 µs each)

        _, raw_rows = raw_search(queries)
        sharded = searcher.search(queries, 10)
        uri_row = {f"img/{i}.jpg": i for i in range(args.n)}
        sharded_rows = np.array([[uri_row[h.uri] for h in hits] for hits in sharded])
        print(f"data: {args.n} x {args.dim} clustered; index {m.factory}, nprobe {m.nprobe}, {args.shards} shards; "
              f"build {build_s:.1f}s")
        print(f"recall@10 vs exact: raw faiss {recall(raw_rows, truth_rows):.4f}, "
              f"sharded {recall(sharded_rows, truth_rows):.4f}")
        for batch in (1, 100):
            r, s = qps(raw_search, queries, batch), qps(sharded_search, queries, batch)
            print(f"batch {batch:>4}: raw faiss {r:9.0f} QPS, sharded in-process {s:9.0f} QPS, ratio {s / r:.2f}")


if __name__ == "__main__":
    main()
