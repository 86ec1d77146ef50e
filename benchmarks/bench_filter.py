"""Filtered search at 50 %, 10 %, 1 % and 0.1 % selectivity: recall@10 against exact filtered search, and QPS
against unfiltered search on the same index in the same run.

A catalogue of clustered vectors with realistic metadata (issue 21): Zipf-sized categories that follow the
vectors' clusters (images of one category look alike: the filter is correlated with where the query is),
uniform prices (uncorrelated), 70 % in stock. Built by `index build` with its automatic choices (index type,
nprobe tuned to recall@10 0.95 unfiltered), searched in-process (every shard as one stacked search) and as
shard servers search (each shard on its own, merged).

    python -m benchmarks.bench_filter [--n 1000000] [--dim 128] [--shards 4] [--widen-power 0.5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from services.common.config import Settings
from services.common.store import LocalStore
from services.embedder.embeddings import read_embeddings
from services.eval.synthetic import write_embeddings
from services.index import filtered
from services.index.filters import parse_where
from services.index.merge import merge_topk
from services.indexer.build import build_index
from services.searcher.local import IndexSearcher

K = 10
TARGETS = (0.5, 0.1, 0.01, 0.001)


def catalogue(n: int, dim: int, clusters: int, seed: int = 0):
    """(vectors, metadata rows, cluster of each row, centres)."""
    rng = np.random.default_rng(seed)
    # Graded similarity, as real embeddings have (a cat is nearer a dog than a chair): clusters drawn around
    # 50 themes. Without it every vector outside a query's own cluster is at ~0 similarity, and the "nearest"
    # matching rows beyond that cluster are an arbitrary draw no ANN index (or user) would care about.
    themes = rng.normal(size=(50, dim)).astype(np.float32)
    centres = themes[rng.integers(0, 50, clusters)] + 0.8 * rng.normal(size=(clusters, dim)).astype(np.float32)
    label = rng.integers(0, clusters, n)
    x = centres[label] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cluster_category = rng.zipf(1.3, clusters) % 500  # categories of Zipf sizes, each a few clusters
    category = np.where(rng.random(n) < 0.8, cluster_category[label], rng.zipf(1.3, n) % 500)
    price = np.round(rng.uniform(0, 1000, n), 2)
    stock = rng.random(n) < 0.7
    meta = [{"category": f"c{c}", "price": float(p), "in_stock": bool(s)}
            for c, p, s in zip(category.tolist(), price.tolist(), stock.tolist())]
    return x, meta, category, price, stock


def category_filter(category: np.ndarray, share: float) -> tuple[str, np.ndarray]:
    """(`category in (...)`, its rows): the categories, largest first, whose rows make up about `share` of the
    catalogue."""
    values, counts = np.unique(category, return_counts=True)
    chosen, total = [], 0
    for v, c in sorted(zip(values.tolist(), counts.tolist()), key=lambda vc: -vc[1]):
        if total + c <= share * len(category) * 1.25:
            chosen.append(v)
            total += c
        if total >= share * len(category) * 0.8:
            break
    return "category in (" + ", ".join(f'"c{v}"' for v in chosen) + ")", np.isin(category, chosen)


def qps(fn, queries: np.ndarray, min_seconds: float = 2.0) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        for q in queries:
            fn(q[None, :])
        done += len(queries)
    return done / (time.perf_counter() - start)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f[f >= 0]) & set(t[t >= 0])) for f, t in zip(found.tolist(), truth.tolist())
               for f, t in [(np.array(f), np.array(t))])
    return hits / max(1, int((truth >= 0).sum()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--widen-power", type=float, help="try another widening of nprobe: (1 / share)^POWER "
                                                      "(default: filtered.WIDEN_POWER)")
    args = ap.parse_args()
    if args.widen_power is not None:
        filtered.WIDEN_POWER = args.widen_power

    x, meta, category, price, stock = catalogue(args.n + args.queries, args.dim, clusters=1000)
    data, queries = x[:args.n], x[args.n:]
    meta, category, price, stock = meta[:args.n], category[:args.n], price[:args.n], stock[:args.n]
    # (filter, the rows it selects computed here with numpy, independently of the index's evaluation)
    filters = [(f"price < {1000 * t:g}", price < 1000 * t) for t in TARGETS] + \
        [category_filter(category, t) for t in TARGETS] + \
        [('in_stock and price < 20 and category != "c1"', stock & (price < 20) & (category != 1))]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        settings = Settings(home=tmp / "home")
        t = time.perf_counter()
        write_embeddings(tmp / "emb", data, metadata=meta)
        ids = read_embeddings(LocalStore(tmp / "emb")).ids
        print(f"wrote {args.n} embeddings with metadata in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        m = build_index(str(tmp / "emb"), str(tmp / "idx"), shards=args.shards, settings=settings,
                        step=lambda s: print("  ", s))
        print(f"built {m.factory} x {args.shards} shards in {time.perf_counter() - t:.1f} s; nprobe {m.nprobe}; "
              f"fields {m.fields}")
        searcher = IndexSearcher(str(tmp / "idx"), settings)
        parts = [IndexSearcher(str(tmp / "idx"), settings, only=[s]) for s in range(args.shards)]
        base = qps(lambda q: searcher.search_arrays(q, K), queries)
        print(f"unfiltered: {base:,.0f} QPS (single queries, nprobe {m.nprobe})")
        print(f"{'filter':<44} {'share':>7} {'recall@10':>9} {'shard srv':>9} {'QPS':>8} {'÷ unfilt':>8} "
              f"{'first ms':>8}")
        for text, mask in filters:
            node = parse_where(text)
            exact = faiss.IndexFlatIP(args.dim)
            exact.add(data[mask])
            _, pos = exact.search(queries, K)
            truth = np.where(pos >= 0, ids[mask][np.maximum(pos, 0)], -1)
            t = time.perf_counter()
            searcher.search_arrays(queries[:1], K, where=node)  # the first query of a filter selects its rows
            first_ms = 1000 * (time.perf_counter() - t)
            got = searcher.search_arrays(queries, K, where=node)[1]
            per_shard = [(s, *p.search_arrays(queries, K, where=node)[:2]) for s, p in enumerate(parts)]
            shard_got = merge_topk(per_shard, K)[1]
            rate = qps(lambda q: searcher.search_arrays(q, K, where=node), queries)
            label = text if len(text) <= 44 else text[:41] + "..."
            print(f"{label:<44} {mask.mean():>7.2%} {recall(got, truth):>9.3f} {recall(shard_got, truth):>9.3f} "
                  f"{rate:>8,.0f} {rate / base:>8.2f} {first_ms:>8.1f}")


if __name__ == "__main__":
    main()
