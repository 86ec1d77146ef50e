"""Merging per-shard top-k lists into one top-k (vectorised, like faiss contrib's ResultHeap)."""

from __future__ import annotations

import numpy as np

from services.common.hits import Hit


def merge_topk(per_shard: list[tuple], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """[(shard, D (nq, k_s), I (nq, k_s)[, uris (nq, k_s)])] -> (D, I, S, uris), each (nq, k):
    the best k per query, best first (uris is None unless every shard gave them).

    Higher score is better (inner product). faiss's -1 ids (fewer than k results) sort last and
    stay -1. Ties break on the smaller id, so the result does not depend on shard order.
    """
    if not per_shard:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64), np.zeros((0, k), np.int32), None
    D = np.concatenate([p[1] for p in per_shard], axis=1).astype(np.float32, copy=False)
    I = np.concatenate([p[2] for p in per_shard], axis=1).astype(np.int64, copy=False)
    S = np.concatenate([np.full(p[2].shape, p[0], np.int32) for p in per_shard], axis=1)
    missing = I < 0
    D = np.where(missing, -np.inf, D)
    tie = np.where(missing, np.iinfo(np.int64).max, I)
    order = np.lexsort((tie, -D), axis=-1)[:, :k]
    U = None
    if all(len(p) > 3 for p in per_shard):
        U = np.take_along_axis(np.concatenate([p[3] for p in per_shard], axis=1), order, 1)
    return (np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1), np.take_along_axis(S, order, 1), U)


def hit_lists(D: np.ndarray, I: np.ndarray, S: np.ndarray, uris: np.ndarray | None = None) -> list[list[Hit]]:
    """Merged arrays -> per query a list of Hits (missing results dropped)."""
    if uris is None:
        uris = np.full(I.shape, "", dtype=object)
    return [[Hit(d, i, s, u) for d, i, s, u in zip(dr, ir, sr, ur) if i >= 0]
            for dr, ir, sr, ur in zip(D.tolist(), I.tolist(), S.tolist(), uris.tolist())]
