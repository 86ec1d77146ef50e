"""αQE in serving: a query searched once, re-weighted by the stored vectors of its top hits
(descriptors.alpha_qe, similarity^3 weights), and searched again — by default only a query whose best hit scores
below the index's gate τ (index/gate.py: a copy's best hit is its original, so copies stay plain). An expanded
query keeps its first round's best hit first — expansion re-ranks the neighbourhood, never the nearest match, so
a copy that did expand still finds its original first — and the rest is ranked by the expanded query; every hit
is scored by the query's own similarity with it, so a score means the same whether a search expanded or not (a
threshold on it keeps working, and a distractor that expanded does not score higher for it). The router and
`imsearch search` run the rounds (each with its own fan-out and fetch); this module is what they share."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from services.common.config import Settings
from services.common.errors import NotSupported
from services.common.validate import check_qe
from services.index.descriptors import alpha_qe
from services.index.manifest import Manifest


@dataclass(frozen=True)
class QePlan:
    neighbours: int  # the top hits a query is re-weighted with
    tau: float  # a query expands when its best hit scores below this (inf: every query)


def gate(manifest: Manifest | None, settings: Settings) -> tuple[float | None, str]:
    """(τ, where it comes from): IMSEARCH_QE_GATE, else the one the version learned at build, else none."""
    if settings.qe_gate is not None:
        return settings.qe_gate, "IMSEARCH_QE_GATE"
    if manifest is not None and manifest.qe_gate is not None:
        return manifest.qe_gate.tau, f"learned at build from {manifest.qe_gate.copies} synthetic copies"
    return None, ""


def plan(asked: int | None, tau: float | None, settings: Settings) -> QePlan | None:
    """What a request's qe means: unset, the gated default (none without a τ); 0, no expansion; N, every query
    with N neighbours."""
    if asked is None:
        n = settings.qe_neighbours
        return QePlan(n, tau) if n and tau is not None else None
    check_qe(asked)
    return QePlan(asked, math.inf) if asked else None


def to_expand(ids: np.ndarray, scores: np.ndarray, tau: float, own: np.ndarray | None = None) -> np.ndarray:
    """Per query of a first round (nq, >= 2): expand it? Read from its best hit, or for a query by catalogue id
    (own: the ids, -1 for none) its best hit but itself — "more like this" of a catalogue image is a category
    search, and its first hit, itself, says nothing. A query without a hit is not expanded."""
    first = np.zeros(len(ids), np.int64)
    if own is not None:
        first[(ids[:, 0] == own) & (own >= 0)] = 1
    rows = np.arange(len(ids))
    best = np.where(first < ids.shape[1], first, 0)
    return (ids[rows, best] >= 0) & (first < ids.shape[1]) & (scores[rows, best] < tau)


def check_same_space(stored: np.ndarray, queries: np.ndarray, what: str) -> None:
    """Stored vectors (feedback, expansion) and the queries they re-weight must be in one space: a router
    without --index sends model vectors on a projected index, whose stored vectors are projected."""
    if len(stored) and stored.shape[1] != queries.shape[1]:
        raise NotSupported(f"{what} on a projected index needs the router started with --index")


def found_ids(ids: np.ndarray) -> list[int]:
    """The hits of the first round to fetch (-1: fewer results than asked)."""
    return ids[ids >= 0].tolist()


def expand(queries: np.ndarray, ids: np.ndarray, scores: np.ndarray, fetched: np.ndarray) -> np.ndarray:
    """The expanded queries (nq, d) from the first round's ids/scores (nq, qe) and the stored vectors of
    found_ids(ids), in that order."""
    found = ids >= 0
    stored = np.zeros((*ids.shape, queries.shape[1]), np.float32)
    stored[found] = fetched
    return alpha_qe(queries, stored, np.where(found, scores, 0.0).astype(np.float32))


def first_depth(k: int, qe: QePlan) -> int:
    """How deep the first round of a gated search ranks: its k answers, the qe neighbours, and more of the
    neighbourhood the expanded round re-ranks — so most of its hits come with the query's own scores already
    (deeper costs a shard little; a Fetch round trip costs the query most)."""
    return max(2 * k, qe.neighbours, 2)


def unknown(ids: np.ndarray, known: dict[int, np.ndarray], first_ids: np.ndarray) -> list[int]:
    """The expanded round's hits whose score by the query is still unknown: in neither its first round nor
    among the stored vectors fetched (each once)."""
    return sorted({int(i) for row, seen in zip(ids, first_ids) for i in row
                   if i >= 0 and i not in known and i not in set(seen.tolist())})


def rescore(queries: np.ndarray, ids: np.ndarray, scores: np.ndarray, known: dict[int, np.ndarray],
            first_ids: np.ndarray, first_scores: np.ndarray) -> np.ndarray:
    """The expanded round's hits scored by the (unexpanded) queries: their first-round score where the first
    round found them, else the query's inner product with the stored vector; no hit (-1) keeps its score."""
    out = scores.copy()
    for q, row in enumerate(ids):
        seen = dict(zip(first_ids[q].tolist(), first_scores[q].tolist()))
        for j, i in enumerate(row.tolist()):
            if i >= 0:
                out[q, j] = seen[i] if i in seen else float(queries[q] @ known[i])
    return out


def keep_best_first(first: list[np.ndarray], second: list[np.ndarray]) -> list[np.ndarray]:
    """The expanded round's columns (scores, ids, then any others such as shards and uris; (nq, k) each) with
    each query's first-round best hit put first and the rest in the expanded round's order, that hit not twice.
    first: the first round's columns, the same kinds, at least one wide."""
    out = [c.copy() for c in second]
    best, ids = first[1][:, 0], second[1]
    for q in np.flatnonzero(best >= 0):
        rest = np.flatnonzero(ids[q] != best[q])[:ids.shape[1] - 1]
        for o, f, c in zip(out, first, second):
            o[q, 0], o[q, 1:1 + len(rest)] = f[q, 0], c[q, rest]
    return out


def answer_expanded(queries: np.ndarray, first: list[np.ndarray], second: list[np.ndarray],
                    known: dict[int, np.ndarray]) -> list[np.ndarray]:
    """The expanded round's columns (scores, ids, then any others) as a search answers them: every hit scored by
    the query itself (rescore: first holds the first round's columns, as deep as it ranked), the first round's
    best hit first (keep_best_first)."""
    scored = [rescore(queries, second[1], second[0], known, first[1], first[0]), *second[1:]]
    return keep_best_first(first, scored)
