"""Filtered search applies the filter during the search: every hit matches, k hits come back however few rows
match, and the answer is the exact filtered search's (recall@10 >= 0.95) at every selectivity."""

from __future__ import annotations

import threading

import faiss
import numpy as np
import pytest

from services.index import faiss_util
from services.index.filtered import EXACT_MAX_ROWS, FilteredSearch, choose, widen
from services.index.filters import column, parse_where
from services.index.manifest import ShardEntry
from services.index.merge import merge_topk
from services.index.shards import LoadedShard, shared_quantizer
from services.index.stacked import stack_shards
from tests.helpers import random_unit_vectors

DIM, N, K = 32, 20_000, 10
SELECTIVITY = {"bucket < 500": 0.5, "bucket < 100": 0.1, "bucket < 10": 0.01, "bucket < 1": 0.001}


def catalogue(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = random_unit_vectors(N, DIM, seed=seed, clusters=40)
    ids = rng.choice(10**12, N, replace=False).astype(np.int64)  # content hashes, not row numbers
    meta = {"bucket": rng.integers(0, 1000, N).tolist(),
            "category": [f"c{int(z) % 50}" for z in rng.zipf(1.5, N)],
            "in_stock": (rng.random(N) < 0.7).tolist()}
    return x, ids, meta


def shards_of(factory: str, n_shards: int, x, ids, meta) -> list[LoadedShard]:
    """Shards trained together and cut by id mod S, as the indexer makes them, with their filterable fields."""
    trained = faiss_util.make_index(DIM, factory)
    faiss_util.train(trained, x[:10_000])
    out = []
    for s in range(n_shards):
        rows = np.flatnonzero(ids % n_shards == s)
        rows = rows[np.argsort(ids[rows])]  # a loaded shard's docs are sorted by id
        ix = faiss.deserialize_index(faiss.serialize_index(trained))
        faiss_util.add(ix, x[rows], ids[rows])
        entry = ShardEntry(shard=s, file="", sha256="", bytes=0, count=len(rows), docs_file="", docs_sha256="")
        columns = {"bucket": column("int", [meta["bucket"][r] for r in rows]),
                   "category": column("str", [meta["category"][r] for r in rows]),
                   "in_stock": column("bool", [meta["in_stock"][r] for r in rows])}
        out.append(LoadedShard(entry, ix, ids[rows],
                               np.array([f"img/{i}.jpg" for i in ids[rows]], dtype=object), columns))
    return out


def searcher(shards: list[LoadedShard], cache_mb: float = 64) -> FilteredSearch:
    return FilteredSearch(shards, stack_shards(shards, shared_quantizer([s.index for s in shards])), 8, cache_mb)


def exact_filtered(x, ids, mask, q, k):
    flat = faiss.IndexFlatIP(DIM)
    flat.add(x[mask])
    D, P = flat.search(q, k)
    return np.where(P >= 0, ids[mask][np.maximum(P, 0)], -1)


def tuned_nprobe(shards, x, ids, q) -> int:
    """The smallest nprobe reaching recall@10 0.95 without a filter (what `index build` tunes the default to)."""
    want = exact_filtered(x, ids, np.ones(len(ids), bool), q, K)
    for nprobe in (1, 2, 4, 8, 16, 32, 64):
        parts = [(s.entry.shard, *faiss_util.search(s.index, q, K, nprobe, 8)) for s in shards]
        if recall(merge_topk(parts, K)[1], want) >= 0.95:
            return nprobe
    return 64


def recall(got, want) -> float:
    hits = sum(len(set(g[g >= 0]) & set(w[w >= 0])) for g, w in zip(got, want))
    return hits / max(1, int((want >= 0).sum()))


@pytest.fixture(scope="module")
def data():
    return catalogue()


@pytest.mark.parametrize("factory,n_shards", [("IVF64,Flat", 3), ("IVF64,Flat", 1), ("Flat", 2),
                                              ("IVF64,PQ8,Refine(SQ8)", 2), ("IVF64,SQ8", 2)])
@pytest.mark.parametrize("where", list(SELECTIVITY))
def test_filtered_search_finds_what_exact_filtered_search_finds(data, factory, n_shards, where):
    x, ids, meta = data
    shards = shards_of(factory, n_shards, x, ids, meta)
    q = random_unit_vectors(100, DIM, seed=5, clusters=40)
    node = parse_where(where)
    mask = np.array([b < int(where.split("<")[1]) for b in meta["bucket"]])
    assert abs(mask.mean() - SELECTIVITY[where]) < 0.3 * SELECTIVITY[where] + 0.001
    D, I, S, U = searcher(shards).search(q, K, tuned_nprobe(shards, x, ids, q), node)
    allowed = set(ids[mask].tolist())
    assert set(I[I >= 0].tolist()) <= allowed  # nothing that fails the filter, ever
    assert ((I >= 0).sum(axis=1) == min(K, mask.sum())).all()  # k hits however few rows match
    assert (U[I >= 0] == np.array([f"img/{i}.jpg" for i in I[I >= 0]], dtype=object)).all()
    assert recall(I, exact_filtered(x, ids, mask, q, K)) >= 0.95


def test_a_post_filter_would_have_lost_hits_where_the_search_filter_does_not(data):
    """The failure filtered search exists to avoid: top-k then filter leaves fewer than k at 1 %."""
    x, ids, meta = data
    shards = shards_of("IVF64,Flat", 2, x, ids, meta)
    q = random_unit_vectors(50, DIM, seed=6, clusters=40)
    wide = searcher(shards).stacked.search(q, 100, 2, 1.0)[1]
    allowed = set(ids[np.array(meta["bucket"]) < 10].tolist())
    post = [[i for i in row if i in allowed][:K] for row in wide.tolist()]
    assert np.mean([len(p) for p in post]) < 5
    I = searcher(shards).search(q, K, 2, parse_where("bucket < 10"))[1]
    assert ((I >= 0).sum(axis=1) == K).all()


def test_a_filter_nothing_matches_answers_no_hits(data):
    shards = shards_of("IVF64,Flat", 2, *data)
    D, I, S, U = searcher(shards).search(random_unit_vectors(3, DIM, seed=7), K, 2,
                                         parse_where('category == "no such"'))
    assert (I == -1).all() and np.isneginf(D).all() and (S == -1).all() and (U == "").all()


def test_the_plan_follows_the_share_of_matching_rows():
    assert choose(0, 10**6, 8, 4000, True) == ("none", 0)
    assert choose(1000, 10**6, 8, 4000, True) == ("exact", 0)  # fewer than a widened search would scan
    how, width = choose(500_000, 10**6, 8, 4000, True)
    assert how == "ann" and width == widen(8, 0.5, 4000) > 8  # even a broad filter probes more lists
    assert choose(100_000, 10**6, 8, 4000, True)[1] > width  # narrower: wider still
    assert choose(1000, 10**6, 8, 4000, False) == ("ann", 4000)  # vectors cannot be read: scan every list
    assert choose(EXACT_MAX_ROWS + 1, 10**6, 4000, 4000, True)[0] == "ann"  # the exact path's memory is bounded
    assert choose(5, 100, 1, 0, True) == ("exact", 1)  # Flat


def test_the_cache_of_selections_stays_within_its_budget(data):
    shards = shards_of("Flat", 1, *data)
    search = searcher(shards, cache_mb=0.1)
    q = random_unit_vectors(2, DIM, seed=8)
    for b in range(1, 40):
        search.search(q, K, 1, parse_where(f"bucket < {b * 20}"))
    held = sum(s.nbytes() for s in search._cache.values())
    assert 0 < len(search._cache) < 39 and held <= 0.1 * 2**20 + max(s.nbytes() for s in search._cache.values())


def test_concurrent_filtered_searches_on_id_mapped_shards_keep_their_own_filters(data):
    """faiss's IndexIDMap swaps the selector inside shared search parameters: filtered searches avoid it."""
    x, ids, meta = data
    shards = shards_of("IVF64,PQ8,Refine(SQ8)", 1, x, ids, meta)
    search = searcher(shards)
    q = random_unit_vectors(20, DIM, seed=9, clusters=40)
    categories = {f"c{i}" for i in range(1, 9)}
    wrong: list = []
    errors: list = []
    done: list = []

    start = threading.Barrier(len(categories))  # every first search at once: the lazy set-up races too

    def run(cat: str) -> None:
        allowed = {i for i, c in zip(ids.tolist(), meta["category"]) if c == cat}
        start.wait()
        try:
            for _ in range(20):
                I = search.search(q, K, 64, parse_where(f'category == "{cat}"'))[1]
                wrong.extend(i for i in I[I >= 0].tolist() if i not in allowed)
                done.append(cat)
        except Exception as e:  # a thread's failure must fail the test, not just print
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(c,)) for c in sorted(categories)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(done) == 20 * len(categories)
    assert wrong == []
