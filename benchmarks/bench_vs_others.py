"""imsearch vs LanceDB and milvus-lite on the same data at the same recall@10 target.

Each system gets an IVF-Flat index with the same number of lists over the same N clustered
vectors (inner product); nprobe is swept upwards until recall@10 against exact search reaches
the target, and single-query QPS is measured there (all three are embedded libraries, so imsearch
is measured in-process too). Prints each QPS and the ratio imsearch ÷ other.
Needs the bench extra: pip install -e ".[bench]".
Usage: python -m benchmarks.bench_vs_others [--n 100000] [--target 0.95]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import faiss
import numpy as np
import pyarrow as pa

from services.common.config import Settings
from services.eval.synthetic import clustered_unit_vectors, write_embeddings
from services.indexer.build import build_index
from services.searcher.local import IndexSearcher

K = 10
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128)
Search = Callable[[np.ndarray, int], list[int]]  # (query, nprobe) -> row numbers


def recall(search: Search, queries: np.ndarray, truth: np.ndarray, nprobe: int) -> float:
    return float(np.mean([len(set(search(q, nprobe)) & set(t)) / K for q, t in zip(queries, truth.tolist())]))


def qps(search: Search, queries: np.ndarray, nprobe: int, seconds: float = 3.0) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        search(queries[done % len(queries)], nprobe)
        done += 1
    return done / (time.perf_counter() - start)


def at_target(name: str, search: Search, queries: np.ndarray, truth: np.ndarray, target: float) -> float | None:
    for nprobe in NPROBES:
        r = recall(search, queries[:300], truth[:300], nprobe)
        if r >= target:
            q = qps(search, queries, nprobe)
            print(f"  {name:<12} nprobe {nprobe:>3}: recall@10 {r:.4f}, {q:8.0f} QPS (single queries)")
            return q
    print(f"  {name:<12} never reached recall@10 {target} (nprobe up to {NPROBES[-1]})")
    return None


def imsearch_search(tmp: Path, data: np.ndarray, nlist: int, shards: int) -> Search:
    settings = Settings(home=tmp / "home")
    write_embeddings(tmp / "emb", data, part_rows=100_000)
    build_index(str(tmp / "emb"), str(tmp / "idx"), shards=shards, factory=f"IVF{nlist},Flat", settings=settings,
                step=lambda s: None)
    searcher = IndexSearcher(str(tmp / "idx"), settings)
    row = {}
    for s in searcher.shards:
        row.update({int(i): int(u.split("/")[1].split(".")[0]) for i, u in zip(s.ids, s.uris)})
    return lambda q, nprobe: [row[h.id] for h in searcher.search(q[None], K, nprobe)[0]]


def lancedb_search(tmp: Path, data: np.ndarray, nlist: int) -> Search:
    os.environ.setdefault("LANCE_LOG", "error")  # one deprecation warning per search otherwise
    import lancedb

    db = lancedb.connect(str(tmp / "lance"))
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(data.ravel(), pa.float32()), data.shape[1])
    table = db.create_table("v", data=pa.table({"id": pa.array(np.arange(len(data)), pa.int64()), "vector": vectors}))
    table.create_index(metric="dot", index_type="IVF_FLAT", num_partitions=nlist)

    def search(q: np.ndarray, nprobe: int) -> list[int]:
        res = table.search(q).distance_type("dot").nprobes(nprobe).limit(K).select(["id"]).to_arrow()
        return res["id"].to_pylist()

    return search


def milvus_search(tmp: Path, data: np.ndarray, nlist: int) -> Search:
    from pymilvus import DataType, MilvusClient

    client = MilvusClient(str(tmp / "milvus.db"))
    schema = client.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=data.shape[1])
    index = client.prepare_index_params()
    index.add_index("vector", index_type="IVF_FLAT", metric_type="IP", params={"nlist": nlist})
    # Bounded: a static dataset has nothing to wait for (the default, Strong, waits ~0.4 s per search here)
    client.create_collection("v", schema=schema, index_params=index, consistency_level="Bounded")
    for start in range(0, len(data), 10_000):
        chunk = data[start:start + 10_000]
        client.insert("v", [{"id": start + i, "vector": v} for i, v in enumerate(chunk.tolist())])
    client.flush("v")  # seal the segments so the IVF index is built (growing ones are brute-forced)
    client.load_collection("v")

    def search(q: np.ndarray, nprobe: int) -> list[int]:
        res = client.search("v", data=[q.tolist()], limit=K, search_params={"params": {"nprobe": nprobe}})
        return [hit["id"] for hit in res[0]]

    return search


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--shards", type=int, default=4)
    args = ap.parse_args()
    x = clustered_unit_vectors(args.n + 1000, args.dim, seed=0, clusters=max(100, args.n // 1000), noise=0.6)
    data, queries = x[:args.n], x[args.n:]
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(data)
    _, truth = exact.search(queries, K)
    nlist = int(4 * np.sqrt(args.n))
    print(f"{args.n} x {args.dim} clustered vectors, IVF{nlist} in every system, target recall@10 {args.target}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        makers = {"imsearch": lambda: imsearch_search(tmp, data, nlist, args.shards),
                  "lancedb": lambda: lancedb_search(tmp, data, nlist),
                  "milvus-lite": lambda: milvus_search(tmp, data, nlist)}
        for name, make in makers.items():
            try:
                t = time.perf_counter()
                search = make()
                print(f"  {name:<12} built in {time.perf_counter() - t:.0f}s")
                results[name] = at_target(name, search, queries, truth, args.target)
            except Exception as e:  # report and go on: one system failing must not hide the others
                print(f"  {name:<12} failed: {type(e).__name__}: {e}")
    ours = results.get("imsearch")
    for name in ("lancedb", "milvus-lite"):
        if ours and results.get(name):
            print(f"QPS ratio imsearch ÷ {name}: {ours / results[name]:.2f}")


if __name__ == "__main__":
    main()
