"""Plain-IVF shards of one version searched as one faiss index, in-process.

Shards trained together share their coarse quantizer, so list i of every shard belongs to the same centroid:
their lists are moved (faiss's merge_from: appended, not copied — the memory stays the same) into one IVF
index of the shards' type, which searches them all in one C++ call: the quantizer once, every probed list
scanned by faiss's own threads, the global top-k kept in faiss's heap, at the speed of one raw faiss index.
The shards keep their ids, uris and fields; their stored vectors are read through the stack (LoadedShard.home).
The moved lists hold positions among the stack's sorted ids instead of the ids: a hit's id, shard and uri are
then one array read each, where a binary search over every id (a cache miss at each step after a scan of the
lists) was a visible share of the in-process router's profile; a filter's selector is a bitmap of positions.
This is faiss IndexShardsIVF's idea without its limits (IndexShardsIVF insists that every shard's own nprobe
equals the search's, so per-call nprobe would mean mutating shared indexes). The two ways tried before — a
per-shard loop in Python with a merge in numpy, and faiss's HStackInvertedLists over the shards' lists (which
copies a list's codes on every access) — both ran well below one raw faiss index (README Performance, "sharded
in-process search ÷ raw faiss", `python -m benchmarks.bench_search`). Memory-mapped shards are stacked with
HStackInvertedLists still (moving their lists would read them into RAM).

Results are the merge's: ids with their shard and uri, -1 / -inf / "" where fewer than k, equal scores by the
smaller id (within the k returned; which of several tied candidates at the k-th place is returned is faiss's
choice, as it is per shard behind a router).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import faiss
import numpy as np

from services.index import faiss_util
from services.index.merge import order_ties
from services.index.shards import LoadedShard, cached_params


def _empty_like(ivf: faiss.IndexIVF) -> faiss.IndexIVF:
    """A copy of ivf's parameters (quantizer, PQ/SQ codebooks, metric) without its vectors: clone_index with
    the lists swapped out for an empty placeholder for the moment of the copy (cloning a shard would copy
    its vectors, or read a memory-mapped shard into RAM)."""
    lists, owned = ivf.invlists, ivf.own_invlists
    placeholder = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    placeholder.this.disown()  # the index deletes it when replaced below
    ivf.own_invlists = False  # keep the shard's lists alive through the swap
    ivf.replace_invlists(placeholder, True)
    try:
        return faiss.clone_index(ivf)
    finally:
        ivf.replace_invlists(lists, owned)


@dataclass
class StackedShards:
    index: faiss.IndexIVF
    shards: list[LoadedShard]
    ids: np.ndarray  # every shard's ids, sorted
    shard_of: np.ndarray  # shard number of ids[i]
    uris: np.ndarray  # uri of ids[i]
    by_position: bool = False  # the lists hold positions among ids (moved lists), not ids (mapped shards)
    _params: dict = field(default_factory=dict)

    def search(self, queries: np.ndarray, k: int, nprobe: int, k_factor: float,
               assign: tuple[np.ndarray, np.ndarray] | None = None, with_uris: bool = True, selector=None):
        """(D, I, S, uris) as merge_topk gives them; assign = (scores, lists) of a coarse search made already;
        selector: only the ids it accepts (a filter, filtered.py)."""
        if selector is None:
            params = cached_params(self._params, self.index, nprobe, k_factor)
        else:  # built per call: the selector differs (cheap next to the search)
            params, _keep = faiss_util.search_parameters(self.index, nprobe, k_factor, selector)
        if assign is None:
            D, I = self.index.search(queries, k, params=params)
        else:
            D, I = faiss_util.search_preassigned(self.index, queries, k, assign[1], assign[0], params)
        return self.label(D, I, with_uris, positions=self.by_position)

    def selector(self, ids: np.ndarray) -> tuple[object, list]:
        """A faiss selector of these ids (sorted, every one among self.ids) for search(): the bitmap of their
        positions when the lists hold positions."""
        if not self.by_position:
            return faiss_util.id_selector(ids, self.ids)
        mask = np.zeros(len(self.ids), bool)
        mask[np.searchsorted(self.ids, ids)] = True
        return faiss_util.position_selector(mask)

    def label(self, D: np.ndarray, I: np.ndarray, with_uris: bool = True, positions: bool = False):
        """faiss's (D, I) over the stacked shards -> (D, I, S, uris) as merge_topk gives them. I holds ids, or
        with positions, positions among self.ids (what search over renumbered lists returns)."""
        missing = order_ties(D, I)  # the merge's order, from the merge's own rule (positions sort as their ids do)
        if not len(self.ids):  # every shard empty
            return D, I, np.full(I.shape, -1, np.int32), (np.full(I.shape, "", dtype=object) if with_uris else None)
        if positions:
            pos = np.where(missing, 0, I)
            I = self.ids[pos]
            I[missing] = -1
        else:
            pos = np.searchsorted(self.ids, I)
            np.minimum(pos, len(self.ids) - 1, out=pos)
        S = self.shard_of[pos]
        S[missing] = -1
        if not with_uris:
            return D, I, S, None
        U = self.uris[pos]
        U[missing] = ""
        return D, I, S, U


def stack_shards(shards: list[LoadedShard], quantizer: faiss.Index | None) -> StackedShards | None:
    """Several plain-IVF shards with one quantizer (shared_quantizer's answer, computed once by the caller)
    as one index; None for anything else (one shard, Flat, HNSW, a refined index...), which keeps the
    per-shard search."""
    if len(shards) < 2 or quantizer is None:
        return None
    ivfs = [faiss.downcast_index(s.index) for s in shards]
    if len({(ivf.code_size, type(ivf)) for ivf in ivfs}) != 1:
        return None
    ids = np.concatenate([s.ids for s in shards])
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    if shards[0].home is not None and all(s.home is shards[0].home for s in shards):
        stacked = shards[0].home  # stacked before (their lists live there now): the same stack again
    elif any(s.home is not None for s in shards):
        return None  # some of them moved into another stack: no stack of these
    else:
        stacked = _stack(shards, ivfs, ids)
    shard_of = np.concatenate([np.full(len(s.ids), s.entry.shard, np.int32) for s in shards])
    uris = np.concatenate([np.asarray(s.uris, dtype=object) for s in shards])
    return StackedShards(stacked, shards, ids, shard_of[order], uris[order], shards[0].home_ids is not None)


def _stack(shards: list[LoadedShard], ivfs: list, ids: np.ndarray) -> faiss.IndexIVF:
    """One IVF index over the shards' lists: moved into it (renumbered: positions among ids, the shards' ids
    sorted), or (memory-mapped) read in place."""
    stacked = _empty_like(ivfs[0])
    stacked.ntotal = 0  # the clone kept the first shard's count with none of its lists
    if all(isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists) for ivf in ivfs):
        for shard, ivf in zip(shards, ivfs):
            stacked.merge_from(ivf, 0)  # moves the lists: the shard's index is left empty
        _renumber(stacked, ids)
        for shard in shards:
            shard.home, shard.home_ids = stacked, ids
        return stacked
    lists = faiss.InvertedListsPtrVector()
    for ivf in ivfs:
        lists.push_back(ivf.invlists)
    stack = faiss.HStackInvertedLists(lists.size(), lists.data())
    stack.this.disown()  # owned by the index from here on; the shards' own lists are not
    stacked.replace_invlists(stack, True)
    stacked.ntotal = sum(ivf.ntotal for ivf in ivfs)
    return stacked


def _renumber(ivf: faiss.IndexIVF, ids: np.ndarray) -> None:
    """Each list's ids replaced, in place, by their positions among ids (sorted; holding every id of the
    lists). Before any direct map is made: enable_fetch builds it from the positions."""
    invlists = faiss.downcast_InvertedLists(ivf.invlists)
    for lst in range(ivf.nlist):
        n = invlists.list_size(lst)
        if n:
            ptr = invlists.get_ids(lst)
            held = faiss.rev_swig_ptr(ptr, n)  # the list's own ids, written in place
            held[:] = np.searchsorted(ids, held)
            invlists.release_ids(lst, ptr)
