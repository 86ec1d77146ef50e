"""Filtered search: the filter applied during the search, never after it, so k results come back however few
rows match, and the recall of the unfiltered search is kept at every selectivity.

Per shard, a filter's matching rows (a Selection, computed once from the shard's Columns and kept in an LRU
bounded in bytes) are searched one of three ways:
* exact: the matching rows' stored vectors (as the index holds them: PQ/SQ codes decoded) searched
  exhaustively, when they are no more than an ANN search would scan anyway (very selective filters);
* plain IVF, probed by matching rows (`probe_by_matches`): the Selection counts the matching rows of every
  inverted list; each query probes its lists nearest first, skipping lists with no matching row, until they
  hold as many matching rows as the unfiltered search scans rows (nprobe x the mean list size). The number of
  lists follows the filter *near the query*: a filter correlated with the vectors (a category whose images
  cluster elsewhere) probes further, which a fixed nprobe cannot do — the known failure of filtered IVF/HNSW
  (measured: a 10 % category filter at a widened fixed nprobe kept recall@10 0.79; probing by matches 0.99).
  faiss's id selector (`SearchParameters.sel`) keeps non-matching ids out of the heap;
* other indexes (IDMap-wrapped: Flat, HNSW, IVF-PQ with refinement, in-index transforms): the selector, with
  nprobe widened by the share of matching rows (`widen`).
Plain-IVF shards stacked in one process (stacked.py) are searched as one: their lists' counts add up, one
selector over every shard's matching ids.

Figures: README "Filtered search" (`python -m benchmarks.bench_filter`).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import faiss
import numpy as np

from services.common.filters import Node, canonical, matches
from services.index import faiss_util
from services.index.merge import merge_topk
from services.index.shards import LoadedShard

WIDEN_MIN = 2  # a fixed-nprobe filtered search probes at least this many times the lists...
WIDEN_POWER = 1.0  # ...and nprobe x (1 / share)^power: as many matching candidates as unfiltered
EXACT_MAX_ROWS = 50_000  # the exact path keeps the matching vectors in memory: bounded


def widen(nprobe: int, share: float, nlist: int) -> int:
    """The nprobe of a fixed-nprobe filtered IVF search where `share` of the rows match."""
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


def probe_by_matches(Dq: np.ndarray, Iq: np.ndarray, per_list: np.ndarray,
                     wanted: float) -> tuple[np.ndarray, np.ndarray]:
    """A coarse assignment (lists nearest first, every list) cut per query to the lists holding matching rows,
    up to the first at which they hold `wanted` of them; -1 pads (faiss skips it)."""
    counts = np.where(Iq >= 0, per_list[Iq], 0)
    keep = np.argsort(counts == 0, axis=1, kind="stable")  # lists with matches first, nearest first
    Iq, Dq, counts = (np.take_along_axis(a, keep, 1) for a in (Iq, Dq, counts))
    width = np.minimum((np.cumsum(counts, axis=1) < wanted).sum(axis=1) + 1, (counts > 0).sum(axis=1))
    cols = np.arange(Iq.shape[1])[None, :]
    used = int(width.max()) if len(width) else 0
    Iq = np.where(cols < width[:, None], Iq, -1)[:, :max(used, 1)]
    return np.ascontiguousarray(Dq[:, :max(used, 1)]), np.ascontiguousarray(Iq)


def assign(ivf: faiss.IndexIVF, queries: np.ndarray, sel: "Selection", nprobe: int):
    """The lists each query probes for a filter: nearest first, until they hold the matching rows an unfiltered
    search at nprobe would scan (nprobe x the mean list size)."""
    wanted = nprobe * sel.total / ivf.nlist
    # Most queries find their matching rows in a few times the lists the filter's share suggests: the coarse
    # search ranks that many (faiss's heap over every list costs more than the scan); the others, all lists.
    first = min(ivf.nlist, max(64, 4 * widen(nprobe, sel.count / max(sel.total, 1), ivf.nlist)))
    Dq, Iq = faiss_util.flat_search(ivf.quantizer, queries, first)
    short = np.flatnonzero(sel.per_list[Iq].sum(axis=1) < wanted) if first < ivf.nlist else []
    if len(short):
        D2, I2 = faiss_util.flat_search(ivf.quantizer, queries[short], ivf.nlist)
        Dq = np.pad(Dq, ((0, 0), (0, ivf.nlist - first)), constant_values=-np.inf)
        Iq = np.pad(Iq, ((0, 0), (0, ivf.nlist - first)), constant_values=-1)
        Dq[short], Iq[short] = D2, I2
    return probe_by_matches(Dq, Iq, sel.per_list, wanted)


@dataclass
class View:
    """What filtered search needs of a shard, read once: the index it searches, labels -> ids, lists."""
    index: object  # the searched faiss index: the shard's own, or an IDMap's inner index
    id_map: np.ndarray | None  # IDMap: the id of each inner position; None when the index's labels are ids
    exact_ok: bool  # its vectors can be read back in the query space (not behind an in-index transform)
    nlist: int
    list_of: np.ndarray | None = None  # plain IVF: the inverted list of each of the shard's (sorted) ids


def view_of(shard: LoadedShard) -> View:
    ix = faiss.downcast_index(shard.index)
    if isinstance(ix, faiss.IndexIDMap):
        inner = faiss.downcast_index(ix.index)
        ivf = faiss_util.find_ivf(inner)
        return View(inner, faiss.vector_to_array(ix.id_map), not isinstance(inner, faiss.IndexPreTransform),
                    0 if ivf is None else int(ivf.nlist))
    if isinstance(ix, faiss.IndexIVF):
        return View(ix, None, True, int(ix.nlist), _list_of(ix, shard.ids))
    return View(ix, None, not isinstance(ix, faiss.IndexPreTransform), 0)


def _list_of(ivf: faiss.IndexIVF, ids: np.ndarray) -> np.ndarray:
    """The list each id (sorted, as the shard's docs) sits in."""
    lists = ivf.invlists
    held, where = [], []
    for no in range(ivf.nlist):
        size = lists.list_size(no)
        if size:
            held.append(faiss.rev_swig_ptr(lists.get_ids(no), size).copy())
            where.append(np.full(size, no, np.int32))
    if not held:
        return np.zeros(0, np.int32)
    held_ids, lists_of = np.concatenate(held), np.concatenate(where)
    order = np.argsort(held_ids)
    return lists_of[order][np.searchsorted(held_ids[order], ids)]


@dataclass
class Selection:
    """One shard's (or a stack's) rows matching one filter."""
    ids: np.ndarray  # the matching ids, sorted
    total: int
    per_list: np.ndarray | None = None  # plain IVF: matching rows in each inverted list
    selector: object = None  # faiss IDSelector, built when first needed
    keep: list = field(default_factory=list)  # what the selector points into (faiss holds raw pointers)
    exact: tuple | None = None  # (IndexFlatIP of the matching rows' vectors, their ids), built when first needed

    @property
    def count(self) -> int:
        return len(self.ids)

    def nbytes(self) -> int:
        held = self.ids.nbytes * (6 if self.selector is not None else 1)  # a hash set's share
        return held + (self.exact[0].ntotal * self.exact[0].d * 4 if self.exact is not None else 0)


def id_selector(ids: np.ndarray, all_ids: np.ndarray) -> tuple[object, list]:
    """A selector of ids among all_ids (both sorted): a batch of ids, or for broad filters the negation of the
    few ids that do not match (faiss's IDSelectorBatch builds a hash set: 180 ms for 500k ids, measured)."""
    if len(ids) <= len(all_ids) // 2:
        return faiss.IDSelectorBatch(ids), [ids]
    others = np.setdiff1d(all_ids, ids, assume_unique=True)
    inner = faiss.IDSelectorBatch(others)
    return faiss.IDSelectorNot(inner), [inner, others]


def position_selector(mask: np.ndarray) -> tuple[object, list]:
    """A selector of an IDMap's inner positions (0..n-1) from a mask over them: a bitmap."""
    bits = np.packbits(mask, bitorder="little")
    return faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits)), [bits]


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

    def selection(self, shard: LoadedShard, node: Node, key: str) -> Selection:
        with self._lock:
            hit = self._cache.get((shard.entry.shard, key))
            if hit is not None:
                self._cache.move_to_end((shard.entry.shard, key))
                return hit
        mask = matches(node, shard.columns) if len(shard.ids) else np.zeros(0, bool)
        view = self.view(shard)
        per_list = None if view.list_of is None else np.bincount(view.list_of[mask], minlength=view.nlist)
        sel = Selection(shard.ids[mask], len(shard.ids), per_list)
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

    @staticmethod
    def _few(sels: list[Selection], views: list[View], nprobe: int) -> bool:
        """Whether the matching rows are few enough to search exhaustively: no more than a probed search would
        scan (the rows of lists holding nprobe x mean-list-size matching rows, at the filter's share)."""
        if not all(v.exact_ok for v in views):
            return False
        matched, total = sum(s.count for s in sels), sum(s.total for s in sels)
        nlist = max(v.nlist for v in views)
        if matched > EXACT_MAX_ROWS:
            return False
        if nlist == 0:
            return True
        scanned = nprobe * total / nlist * total / matched  # the wanted matching rows, at the filter's share
        return matched <= scanned

    def _search_shard(self, shard: LoadedShard, sel: Selection, queries: np.ndarray, k: int, nprobe: int):
        view = self.view(shard)
        if view.list_of is not None:  # plain IVF: probed by matching rows
            if self._few([sel], [view], nprobe):
                return self._exact(shard, view, sel, queries, k)
            if sel.selector is None:
                sel.selector, sel.keep = id_selector(sel.ids, shard.ids)
            return self._probed(view.index, sel, queries, k, nprobe)
        how, width = choose(sel.count, sel.total, nprobe, view.nlist, view.exact_ok)
        if how == "exact":
            return self._exact(shard, view, sel, queries, k)
        if sel.selector is None:
            if view.id_map is None:
                sel.selector, sel.keep = id_selector(sel.ids, shard.ids)
            else:
                sel.selector, sel.keep = position_selector(np.isin(view.id_map, sel.ids))
        params, _keep = faiss_util.search_parameters(view.index, width, self.k_factor, sel.selector)
        D, I = view.index.search(queries, k, params=params)
        if view.id_map is not None:
            I = np.where(I >= 0, view.id_map[np.maximum(I, 0)], -1)
        return D, I

    def _probed(self, ivf: faiss.IndexIVF, sel: Selection, queries: np.ndarray, k: int, nprobe: int):
        Dq, Iq = assign(ivf, queries, sel, nprobe)
        params, _keep = faiss_util.search_parameters(ivf, Iq.shape[1], self.k_factor, sel.selector)
        return faiss_util.search_preassigned(ivf, queries, k, Iq, Dq, params)

    def _exact(self, shard: LoadedShard, view: View, sel: Selection, queries: np.ndarray, k: int):
        if sel.exact is None:
            sel.exact = _flat(self._vectors(shard, view, sel.ids), sel.ids)
            self._evict()
        return _flat_search(sel.exact, queries, k)

    @staticmethod
    def _vectors(shard: LoadedShard, view: View, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ids of this shard, as the index holds them."""
        if view.id_map is None:  # plain IVF: read by id (a hashtable direct map: ids are not 0..n-1)
            shard.enable_fetch()
            return view.index.reconstruct_batch(ids)
        order = np.argsort(view.id_map)
        return view.index.reconstruct_batch(order[np.searchsorted(view.id_map[order], ids)])

    def _stacked(self, queries, k, nprobe, sels, key, with_uris):
        """Every plain-IVF shard as one search: the lists' matching counts summed, one selector; or, for few
        matching rows, one exhaustive search over all of them."""
        sel = self._cache.get((-1, key))
        if sel is None:
            sel = Selection(np.sort(np.concatenate([s.ids for s in sels])), sum(s.total for s in sels),
                            np.sum([s.per_list for s in sels], axis=0))
            self._remember((-1, key), sel)
        if self._few([sel], [self.view(s) for s in self.shards], nprobe):
            if sel.exact is None:
                vectors = [self._vectors(shard, self.view(shard), s.ids) for shard, s in zip(self.shards, sels)]
                sel.exact = _flat(np.concatenate(vectors), np.concatenate([s.ids for s in sels]))
                self._evict()
            return self.stacked.label(*_flat_search(sel.exact, queries, k), with_uris)
        if sel.selector is None:
            sel.selector, sel.keep = id_selector(sel.ids, self.stacked.ids)
            self._evict()
        Dq, Iq = assign(self.stacked.index, queries, sel, nprobe)
        return self.stacked.search(queries, k, Iq.shape[1], self.k_factor, (Dq, Iq), with_uris, sel.selector)


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
