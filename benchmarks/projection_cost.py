"""What the index's learned projection (centred PCA, the default 256 dimensions) does to index size and
search speed: the same catalogue built by the product with `--pca 0` and with the default, each searched
in-process (IndexSearcher: the query projected, then every shard searched).

Vectors: 1,280-d (the models' width), clustered synthetic with a low-rank structure as real descriptors
have (a 1,280-d image descriptor's variance sits in its first few hundred components). Reports the shard
bytes per vector, QPS for single queries and batches of 100, and recall@10 of each index against exact
search on the unprojected vectors (what the projection itself changes in the ranking).
Usage: python -m benchmarks.projection_cost [--n 50000] [--factory Flat] [--rank 192]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from benchmarks.bench_search import qps, recall
from services.common.config import Settings
from services.common.store import LocalStore
from services.embedder.embeddings import read_embeddings
from services.eval.synthetic import write_embeddings
from services.indexer.build import build_index
from services.searcher.local import IndexSearcher

DIM = 1280


def low_rank_vectors(n: int, rank: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 1,000 centres in a random `rank`-dim subspace of R^1280, plus weak isotropic
    noise (the tail of a real descriptor's spectrum)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(DIM, rank)))[0].T.astype(np.float32)  # (rank, DIM), orthonormal
    centres = rng.normal(size=(1000, rank)).astype(np.float32)
    z = centres[rng.integers(0, 1000, n)] + 0.6 * rng.normal(size=(n, rank)).astype(np.float32)
    x = z @ basis + 0.05 * rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def raw_faiss_qps(data: np.ndarray, queries: np.ndarray, factory: str, nprobe: int) -> tuple[float, float]:
    """The same vectors (in the index's space) in one plain faiss index: what the dimensions alone cost."""
    index = faiss.index_factory(data.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    index.train(data)
    index.add(data)
    if hasattr(index, "nprobe"):
        index.nprobe = nprobe
    return qps(lambda q: index.search(q, 10), queries, 1), qps(lambda q: index.search(q, 10), queries, 100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--factory", default="Flat")
    ap.add_argument("--rank", type=int, default=192)
    ap.add_argument("--queries", type=int, default=500)
    args = ap.parse_args()
    x = low_rank_vectors(args.n + args.queries, args.rank)
    data, queries = x[:args.n], x[args.n:]
    exact = faiss.IndexFlatIP(DIM)
    exact.add(data)
    truth = exact.search(queries, 10)[1]
    print(f"{args.n} x {DIM} vectors (rank {args.rank} + noise), index {args.factory}, 2 shards, in-process search")
    print("| projection | index dims | nprobe | shard bytes / vector | build s | QPS single | QPS batch 100 "
          "| raw faiss QPS single / batch 100 | recall@10 vs exact (raw) |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        settings = Settings(home=tmp / "home")
        write_embeddings(tmp / "emb", data)
        row_of = {int(i): r for r, i in enumerate(read_embeddings(LocalStore(tmp / "emb")).ids)}
        for label, pca in (("none (`--pca 0`)", 0), ("centred PCA 256 (default)", 256)):
            start = time.perf_counter()
            m = build_index(str(tmp / "emb"), str(tmp / f"idx-{pca}"), shards=2, factory=args.factory,
                            settings=settings, step=lambda s: None, pca_dim=pca)
            build_s = time.perf_counter() - start
            searcher = IndexSearcher(str(tmp / f"idx-{pca}"), settings)
            found = searcher.search_arrays(queries, 10, with_uris=False)[1]
            rows = np.vectorize(row_of.get)(found)
            per_vector = sum(s.bytes for s in m.shards) / args.n
            single = qps(lambda q: searcher.search_arrays(q, 10, with_uris=False), queries, 1)
            batch = qps(lambda q: searcher.search_arrays(q, 10, with_uris=False), queries, 100)
            raw_single, raw_batch = raw_faiss_qps(searcher.to_index_space(data), searcher.to_index_space(queries),
                                                  m.factory, m.nprobe)
            print(f"| {label} | {m.dim} | {m.nprobe} | {per_vector:.0f} | {build_s:.1f} | {single:.0f} | {batch:.0f} | "
                  f"{raw_single:.0f} / {raw_batch:.0f} | {recall(rows, truth):.4f} |", flush=True)


if __name__ == "__main__":
    main()
