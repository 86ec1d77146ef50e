"""Filtered search: the filter applied during the search, never after it, so k results come back however few
rows match, with the recall of the unfiltered search at every selectivity.

Per shard, a filter's matching rows (a Selection, computed once from the shard's Columns and kept in an LRU
bounded in bytes) are searched one of two ways, chosen from the share of rows that match (`choose`):
* exact: the matching rows' stored vectors (as the index holds them: PQ/SQ codes decoded) searched
  exhaustively, when they are no more than the ANN search would scan (very selective filters: faster than
  the unfiltered search, and nothing to miss);
* ANN with faiss's id selector (`SearchParameters.sel`: non-matching ids never enter the heap), nprobe
  widened by 1 / share so the probed lists hold as many matching rows as the unfiltered search scans rows.
  A narrower widening loses the known way filtered IVF/HNSW search does: a category filter whose images
  cluster away from the query leaves too few matching rows in the lists probed (README Performance, the
  filtered-search rows compare √(1 / share) with 1 / share). Probing lists by their count of matching rows
  per query reached the same recall and was slower here (its full coarse ranking costs more than the lists it
  skips), so it is not used.
Plain-IVF shards stacked in one process (stacked.py) are searched as one: one selector over every shard's
matching ids. IDMap-wrapped indexes (Flat, HNSW, IVF-PQ with refinement) are searched through their inner
index with a bitmap of positions: IndexIDMap swaps a selector into the caller's parameters during a search,
which shared parameters cannot survive under threads.

Figures: README Performance, "filtered search" (`python -m benchmarks.bench_filter`).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import faiss
import numpy as np

from services.index import faiss_util
from services.index.filters import Node, canonical, matches
from services.index.merge import merge_topk
from services.index.shards import LoadedShard

WIDEN_MIN = 2  # a filtered search probes at least this many times the lists (a broad filter drops candidates too)
WIDEN_POWER = 1.0  # nprobe x (1 / share)^power: as many matching candidates as the unfiltered search
EXACT_MAX_ROWS = 50_000  # the exact path keeps the matching vectors in memory: bounded


def widen(nprobe: int, share: float, nlist: int) -> int:
    """The nprobe of a filtered IVF search where `share` of the rows match."""
    return min(nlist, math.ceil(nprobe * max(WIDEN_MIN, (1 / share) ** WIDEN_POWER)))


def choose(matched: int, total: int, nprobe: int, nlist: int, exact_ok: bool) -> tuple[str, int]:
    """("none" | "exact" | "ann", nprobe): how to search `matched` of `total` rows. Exact when the matching
    rows are no more than the rows the widened search would scan (or the index is not IVF, and they are
    few enough to hold); a shard whose vectors cannot be read back (in-index whitening) scans every list
    instead."""
    if matched == 0:
        return "none", 0
    if nlist == 0:
        return ("exact" if exact_ok and matched <= EXACT_MAX_ROWS else "ann"), 1
    wide = widen(nprobe, matched / max(total, 1), nlist)
    if matched <= wide * total / nlist:
        return ("exact", 0) if exact_ok and matched <= EXACT_MAX_ROWS else ("ann", nlist)
    return "ann", wide


@dataclass
class View:
    """What filtered search needs of a shard, read once: the index it searches and how its labels map to ids."""
    index: object  # the searched faiss index: the shard's own, or an IDMap's inner index
    id_map: np.ndarray | None  # IDMap: the id of each inner position; None when the index's labels are ids
    exact_ok: bool  # its vectors can be read back in the query space (not behind an in-index transform)
    nlist: int


def view_of(shard: LoadedShard) -> View:
    ix = faiss.downcast_index(shard.index)
    if isinstance(ix, faiss.IndexIDMap):
        inner = faiss.downcast_index(ix.index)
        ivf = faiss_util.find_ivf(inner)
        return View(inner, faiss.vector_to_array(ix.id_map), not isinstance(inner, faiss.IndexPreTransform),
                    0 if ivf is None else int(ivf.nlist))
    if isinstance(ix, faiss.IndexIVF):
        return View(ix, None, True, int(ix.nlist))
    return View(ix, None, not isinstance(ix, faiss.IndexPreTransform), 0)


@dataclass
class Selection:
    """One shard's (or a stack's) rows matching one filter."""
    ids: np.ndarray  # the matching ids, sorted
    total: int
    selector: object = None  # faiss IDSelector, built when first needed
    keep: list = field(default_factory=list)  # what the selector points into (faiss holds raw pointers)
    exact: tuple | None = None  # (IndexFlatIP of the matching rows' vectors, their ids), built when first needed

    @property
    def count(self) -> int:
        return len(self.ids)

    def nbytes(self) -> int:
        held = self.ids.nbytes * (6 if self.selector is not None else 1)  # a hash set's share
        return held + (self.exact[0].ntotal * self.exact[0].d * 4 if self.exact is not None else 0)


def _none(nq: int, k: int, with_uris: bool):
    empty = np.full((nq, k), -1, np.int64)
    return (np.full(empty.shape, -np.inf, np.float32), empty, np.full(empty.shape, -1, np.int32),
            np.full(empty.shape, "", dtype=object) if with_uris else None)


class FilteredSearch:
    """Filtered searches over the shards an IndexSearcher loaded (one version: the cache dies with it)."""

    def __init__(self, shards: list[LoadedShard], stacked, k_factor: float, cache_mb: float):
        self.shards, self.stacked, self.k_factor = shards, stacked, k_factor
        self.budget = cache_mb * 2**20
        self._views: dict[int, View] = {}
        self._cache: OrderedDict[tuple[int, str], Selection] = OrderedDict()
        self._lock = threading.Lock()

    def view(self, shard: LoadedShard) -> View:
        if shard.entry.shard not in self._views:
            self._views.setdefault(shard.entry.shard, view_of(shard))
        return self._views[shard.entry.shard]

    def _lookup(self, key: tuple[int, str]) -> Selection | None:
        """A remembered selection, marked most recently used."""
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
            return hit

    def selection(self, shard: LoadedShard, node: Node, key: str) -> Selection:
        hit = self._lookup((shard.entry.shard, key))
        if hit is not None:
            return hit
        mask = matches(node, shard.columns) if len(shard.ids) else np.zeros(0, bool)
        sel = Selection(shard.ids[mask], len(shard.ids))
        self._remember((shard.entry.shard, key), sel)
        return sel

    def _remember(self, key, sel: Selection) -> None:
        with self._lock:
            self._cache[key] = sel
            self._cache.move_to_end(key)
        self._evict()

    def _evict(self) -> None:
        """Least recently used selections out while the cache is over IMSEARCH_FILTER_CACHE_MB (the newest
        stays whatever its size)."""
        with self._lock:
            while len(self._cache) > 1 and sum(s.nbytes() for s in self._cache.values()) > self.budget:
                self._cache.popitem(last=False)

    def search(self, queries: np.ndarray, k: int, nprobe: int, node: Node, with_uris: bool = True):
        """(D, I, S, uris) as merge_topk gives them, over the rows matching node."""
        key = canonical(node)
        sels = [self.selection(s, node, key) for s in self.shards]
        if sum(s.count for s in sels) == 0:
            return _none(len(queries), k, with_uris)
        if self.stacked is not None:
            return self._stacked(queries, k, nprobe, sels, key, with_uris)
        per_shard = []
        for shard, sel in zip(self.shards, sels):
            if sel.count:
                D, I = self._search_shard(shard, sel, queries, k, nprobe)
                per_shard.append((shard.entry.shard, D, I, shard.uris_of(I)) if with_uris else
                                 (shard.entry.shard, D, I))
        return merge_topk(per_shard, k)

    def _search_shard(self, shard: LoadedShard, sel: Selection, queries: np.ndarray, k: int, nprobe: int):
        view = self.view(shard)
        how, width = choose(sel.count, sel.total, nprobe, view.nlist, view.exact_ok)
        if how == "exact":
            return self._exact(shard, sel, queries, k)
        if sel.selector is None:
            if view.id_map is None:
                sel.selector, sel.keep = faiss_util.id_selector(sel.ids, shard.ids)
            else:
                sel.selector, sel.keep = faiss_util.position_selector(np.isin(view.id_map, sel.ids))
            self._evict()
        params, _keep = faiss_util.search_parameters(view.index, width, self.k_factor, sel.selector)
        D, I = view.index.search(queries, k, params=params)
        if view.id_map is not None:
            I = np.where(I >= 0, view.id_map[np.maximum(I, 0)], -1)
        return D, I

    def _exact(self, shard: LoadedShard, sel: Selection, queries: np.ndarray, k: int):
        if sel.exact is None:
            sel.exact = _flat(shard.vectors_of(sel.ids), sel.ids)
            self._evict()
        return _flat_search(sel.exact, queries, k)

    def _stacked(self, queries, k, nprobe, sels, key, with_uris):
        """Every plain-IVF shard as one search (one selector over all their matching ids), or for few matching
        rows one exhaustive search over all of them."""
        sel = self._lookup((-1, key))
        if sel is None:
            sel = Selection(np.sort(np.concatenate([s.ids for s in sels])), sum(s.total for s in sels))
            self._remember((-1, key), sel)
        how, width = choose(sel.count, sel.total, nprobe, self.stacked.index.nlist,
                            all(self.view(s).exact_ok for s in self.shards))
        if how == "exact":
            if sel.exact is None:
                vectors = [shard.vectors_of(s.ids) for shard, s in zip(self.shards, sels)]
                sel.exact = _flat(np.concatenate(vectors), np.concatenate([s.ids for s in sels]))
                self._evict()
            return self.stacked.label(*_flat_search(sel.exact, queries, k), with_uris)
        if sel.selector is None:
            sel.selector, sel.keep = self.stacked.selector(sel.ids)
            self._evict()
        return self.stacked.search(queries, k, width, self.k_factor, with_uris=with_uris, selector=sel.selector)


def _flat(vectors: np.ndarray, ids: np.ndarray) -> tuple:
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors, np.float32))
    return flat, ids


def _flat_search(exact: tuple, queries: np.ndarray, k: int):
    """Exhaustive search of (flat, ids) -> (D, I) with ids, padded to k (-inf, -1) when fewer rows match."""
    flat, ids = exact
    D, P = flat.search(queries, min(k, flat.ntotal))
    I = np.where(P >= 0, ids[np.maximum(P, 0)], -1)
    if D.shape[1] < k:
        pad = ((0, 0), (0, k - D.shape[1]))
        D, I = np.pad(D, pad, constant_values=-np.inf), np.pad(I, pad, constant_values=-1)
    return D, I
