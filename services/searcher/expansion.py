"""αQE in serving: a query searched once, re-weighted by the stored vectors of its top hits
(descriptors.alpha_qe, similarity^3 weights), and searched again. The router and `imsearch search` run the
rounds (each with its own fan-out and fetch); this module is what they share."""

from __future__ import annotations

import numpy as np

from services.common.errors import NotSupported
from services.index.descriptors import alpha_qe


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
