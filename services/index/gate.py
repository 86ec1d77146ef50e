"""The query-expansion gate τ an index version learns at build and serves with (README Quality, "Query expansion,
gated"). αQE lifts category search (a query's neighbours are its class) and ruins copy search (a copy's
neighbours are other images), and the two are told apart by the best hit's score: a copy's best hit is its own
original. So a search expands only a query whose best hit scores below τ.

The rule: τ is the QUANTILE-th quantile of the scores between synthetic copies of catalogue images and their
originals, in the index's own space (after its projection) — all but that share of copies stay above τ, and stay
plain. On caltech101-dev (Lite1, PCA 256) that puts τ at 0.64: 29 % of category queries expand (+2.7 points of
category mAP), 6 % of copies do, and copy μAP and recall@1 stay as they were (benchmarks/qe_gate.py). A fixed τ
would not do: it moves with the model, the projection and the catalogue (0.64 for Lite1, 0.62 for Lite2 there).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel

QUANTILE = 0.05  # the share of synthetic copies allowed below τ (those few are expanded: it costs them little)
MIN_COPIES = 20  # fewer copies than this give no usable 5th percentile: no τ is learned


class QeGate(BaseModel):
    tau: float  # expand a query when its best hit scores below this
    copies: int  # synthetic copies it was learned from
    quantile: float = QUANTILE


def normalised(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def copy_scores(originals: np.ndarray, copies: np.ndarray) -> np.ndarray:
    """Cosine of each copy with its own original (both in the index's space): what its best hit scores at least."""
    return np.einsum("nd,nd->n", normalised(originals), normalised(copies))


def learn(originals: np.ndarray, copies: np.ndarray) -> QeGate | None:
    """τ from a sample of (original, synthetic copy) vector pairs in the index's space; None with too few."""
    if len(copies) < MIN_COPIES:
        return None
    tau = float(np.quantile(copy_scores(originals, copies), QUANTILE))
    return QeGate(tau=round(tau, 4), copies=len(copies))
