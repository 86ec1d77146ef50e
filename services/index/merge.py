"""Merging per-shard top-k lists into one top-k (vectorised, like faiss contrib's ResultHeap)."""

from __future__ import annotations

import numpy as np

from services.common.hits import Hit


def merge_topk(per_shard: list[tuple], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """[(shard, D (nq, k_s), I (nq, k_s)[, uris])] -> (D, I, S, uris), each (nq, k): the best k per
    query, best first (uris is None unless every shard gave them). A shard's uris are (nq, k_s) or
    any flat row-major sequence of them, such as a protobuf repeated field: only the winners' uris
    are read, not every shard's k.

    Higher score is better (inner product). faiss's -1 ids (fewer than k results) sort last and
    stay -1. Ties break on the smaller id, so the result does not depend on shard order (up to
    LEXSORT_MAX merged columns; see rank_columns).
    """
    if not per_shard:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64), np.zeros((0, k), np.int32), None
    if len(per_shard) == 1 and per_shard[0][2].shape[1] <= k:  # a shard server: faiss already sorted it
        shard, D, I, *uris = per_shard[0]
        U = None if not uris else np.asarray(uris[0], dtype=object).reshape(I.shape)
        return np.where(I < 0, -np.inf, D).astype(np.float32), I, np.full(I.shape, shard, np.int32), U
    D = np.concatenate([p[1] for p in per_shard], axis=1).astype(np.float32, copy=False)
    I = np.concatenate([p[2] for p in per_shard], axis=1).astype(np.int64, copy=False)
    widths = [p[2].shape[1] for p in per_shard]
    S = np.repeat(np.array([p[0] for p in per_shard], np.int32), widths)[None, :].repeat(len(I), 0)
    missing = I < 0
    D = np.where(missing, -np.inf, D)
    order = rank_columns(D, tie_keys(I))[:, :k]
    U = _pick_uris([p[3] for p in per_shard], widths, order) if all(len(p) > 3 for p in per_shard) else None
    return (np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1), np.take_along_axis(S, order, 1), U)


LEXSORT_MAX = 4096  # rankings up to this wide order ties by id; deeper (evaluation) rankings keep them as found


def rank_columns(D: np.ndarray, tie: np.ndarray) -> np.ndarray:
    """Columns by score, best first, equal scores by the smaller id. A stable sort of the shards' presorted
    lists is a merge of runs, far faster than lexsort; rows where two scores tie go through lexsort, so ties
    still break on the id — up to LEXSORT_MAX columns: in a ranking of the whole catalogue (evaluation)
    float32 ties are common and their order changes no metric, so they keep shard order there."""
    order = np.argsort(-D, axis=-1, kind="stable")
    if D.shape[1] > LEXSORT_MAX:
        return order
    tied = _tied_rows(np.take_along_axis(D, order, 1))
    if len(tied):
        order[tied] = np.lexsort((tie[tied], -D[tied]), axis=-1)
    return order


def order_ties(D: np.ndarray, I: np.ndarray) -> np.ndarray:
    """One search's result, each row by score already (one faiss heap over every shard: stacked.py), put in the
    order merge_topk gives a merge of shards: missing results (id -1) scored -inf, equal scores by the smaller id
    (the same rule as rank_columns, LEXSORT_MAX included). In place; returns where results are missing. I may hold
    positions among sorted ids instead of ids: they order alike."""
    missing = I < 0
    D[missing] = -np.inf
    if D.shape[1] > LEXSORT_MAX:
        return missing
    tied = _tied_rows(D)
    if len(tied):
        order = np.lexsort((tie_keys(I[tied]), -D[tied]), axis=-1)
        D[tied], I[tied] = np.take_along_axis(D[tied], order, 1), np.take_along_axis(I[tied], order, 1)
        missing[tied] = np.take_along_axis(missing[tied], order, 1)
    return missing


def tie_keys(I: np.ndarray) -> np.ndarray:
    """What orders equal scores: the id, a missing result (-1) after every id."""
    return np.where(I < 0, np.iinfo(np.int64).max, I)


def _tied_rows(ranked: np.ndarray) -> np.ndarray:
    """The rows of a by-score matrix where two finite scores are equal."""
    return np.flatnonzero(((ranked[:, 1:] == ranked[:, :-1]) & np.isfinite(ranked[:, 1:])).any(axis=1))


def _pick_uris(uris: list, widths: list[int], order: np.ndarray) -> np.ndarray:
    """The uris at the chosen columns of the shard-concatenated (nq, sum(widths)) result."""
    starts = np.cumsum([0, *widths[:-1]])
    shard = np.searchsorted(starts, order, side="right") - 1
    flat = np.arange(len(order))[:, None] * np.asarray(widths)[shard] + order - starts[shard]
    flat_uris = [u.ravel() if isinstance(u, np.ndarray) else u for u in uris]
    out = np.empty(order.shape, dtype=object)
    out.ravel()[:] = [flat_uris[j][f] for j, f in zip(shard.ravel().tolist(), flat.ravel().tolist())]
    return out


def hit_lists(D: np.ndarray, I: np.ndarray, S: np.ndarray, uris: np.ndarray | None = None) -> list[list[Hit]]:
    """Merged arrays -> per query a list of Hits (missing results dropped)."""
    if uris is None:
        uris = np.full(I.shape, "", dtype=object)
    return [[Hit(d, i, s, u) for d, i, s, u in zip(dr, ir, sr, ur) if i >= 0]
            for dr, ir, sr, ur in zip(D.tolist(), I.tolist(), S.tolist(), uris.tolist())]
