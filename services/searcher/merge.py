"""Merging per-shard top-k lists into one top-k, with a heap (as faiss contrib's ResultHeap)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, order=True)
class Hit:
    score: float
    id: int
    shard: int
    uri: str = ""

    def as_dict(self) -> dict:
        return {"id": self.id, "uri": self.uri, "score": self.score, "shard": self.shard}


def merge_topk(per_shard: list[tuple[int, np.ndarray, np.ndarray]], k: int) -> list[list[tuple[float, int, int]]]:
    """[(shard, D (nq, k), I (nq, k))] -> per query the best k (score, id, shard), best first.

    Higher score is better (inner product); faiss's -1 ids (fewer than k results) are dropped.
    Ties break on the smaller id so the result does not depend on shard order.
    """
    if not per_shard:
        return []
    nq = per_shard[0][1].shape[0]
    out = []
    for q in range(nq):
        candidates = ((float(D[q, j]), int(I[q, j]), shard)
                      for shard, D, I in per_shard for j in range(I.shape[1]) if I[q, j] >= 0)
        out.append(heapq.nsmallest(k, candidates, key=lambda c: (-c[0], c[1])))
    return out
