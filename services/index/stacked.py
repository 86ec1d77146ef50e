"""Plain-IVF shards of one version searched as one faiss index, in-process.

Shards trained together share their coarse quantizer, so list i of every shard belongs to the same centroid:
their lists are moved (faiss's merge_from: appended, not copied — the memory stays the same) into one IVF
index of the shards' type, which searches them all in one C++ call: the quantizer once, every probed list
scanned by faiss's own threads, the global top-k kept in faiss's heap, at the speed of one raw faiss index.
The shards keep their ids, uris and fields; their stored vectors are read through the stack (LoadedShard.home).
This is faiss IndexShardsIVF's idea without its limits (IndexShardsIVF insists that every shard's own nprobe
equals the search's, so per-call nprobe would mean mutating shared indexes). Measured (`python -m
benchmarks.bench_search --n 200000`, 4 shards, arrays out as raw faiss gives them): the per-shard loop in
Python with a merge in numpy ran at 0.28x of one raw faiss index for single queries and for batches of 100;
faiss's HStackInvertedLists over the shards' lists (which copies a list's codes on every access) at 0.70x
and 0.66x. Memory-mapped shards are stacked that way still (moving their lists would read them into RAM).

Results are the merge's: ids with their shard and uri, -1 / -inf / "" where fewer than k, equal scores by the
smaller id (within the k returned; which of several tied candidates at the k-th place is returned is faiss's
choice, as it is per shard behind a router).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import faiss
import numpy as np

from services.index import faiss_util
from services.index.merge import rank_columns
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
        return self.label(D, I, with_uris)

    def label(self, D: np.ndarray, I: np.ndarray, with_uris: bool = True):
        """faiss's (D, I) over the stacked shards -> (D, I, S, uris) as merge_topk gives them."""
        missing = I < 0
        D[missing] = -np.inf
        # faiss returns each row by score; rows with equal scores are re-ordered by id, as the merge orders them
        tied = np.flatnonzero(((D[:, 1:] == D[:, :-1]) & ~missing[:, 1:]).any(axis=1))
        if len(tied):
            order = rank_columns(D[tied], np.where(missing[tied], np.iinfo(np.int64).max, I[tied]))
            D[tied], I[tied] = np.take_along_axis(D[tied], order, 1), np.take_along_axis(I[tied], order, 1)
        if not len(self.ids):  # every shard empty
            return D, I, np.full(I.shape, -1, np.int32), (np.full(I.shape, "", dtype=object) if with_uris else None)
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
    if shards[0].home is not None and all(s.home is shards[0].home for s in shards):
        stacked = shards[0].home  # stacked before (their lists live there now): the same stack again
    elif any(s.home is not None for s in shards):
        return None  # some of them moved into another stack: no stack of these
    else:
        stacked = _stack(shards, ivfs)
    ids = np.concatenate([s.ids for s in shards])
    order = np.argsort(ids, kind="stable")
    shard_of = np.concatenate([np.full(len(s.ids), s.entry.shard, np.int32) for s in shards])
    uris = np.concatenate([np.asarray(s.uris, dtype=object) for s in shards])
    return StackedShards(stacked, shards, ids[order], shard_of[order], uris[order])


def _stack(shards: list[LoadedShard], ivfs: list) -> faiss.IndexIVF:
    """One IVF index over the shards' lists: moved into it, or (memory-mapped) read in place."""
    stacked = _empty_like(ivfs[0])
    stacked.ntotal = 0  # the clone kept the first shard's count with none of its lists
    if all(isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists) for ivf in ivfs):
        for shard, ivf in zip(shards, ivfs):
            stacked.merge_from(ivf, 0)  # moves the lists: the shard's index is left empty
            shard.home = stacked
        return stacked
    lists = faiss.InvertedListsPtrVector()
    for ivf in ivfs:
        lists.push_back(ivf.invlists)
    stack = faiss.HStackInvertedLists(lists.size(), lists.data())
    stack.this.disown()  # owned by the index from here on; the shards' own lists are not
    stacked.replace_invlists(stack, True)
    stacked.ntotal = sum(ivf.ntotal for ivf in ivfs)
    return stacked
