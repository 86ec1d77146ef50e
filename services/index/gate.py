"""The query-expansion gate τ an index version learns at build and serves with (README Quality, "Query expansion,
gated"). αQE lifts category search (a query's neighbours are its class) and hurts copy search (a copy's
neighbours are other images), and the two are told apart by the best hit's score: a copy's best hit is its own
original. So a search expands only a query whose best hit scores below τ.

The rule: τ is the QUANTILE-th quantile of the scores between synthetic copies of catalogue images and their
originals as the index scores them (after its projection, against the original decoded from the index's codes:
PQ scores run lower than exact ones) — all but that share of copies stay above τ, and stay plain. On
caltech101-dev (Lite1, PCA 256, exact search) that puts τ at 0.70: 41 % of category queries expand (+3.3 points
of category mAP), 10 % of copies do, and copy μAP, recall@1 and finding an image's other copies stay as they
were (benchmarks/qe_gate.py). A fixed τ would not do: it moves with the model, the projection, the codes and
the catalogue.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel

# The share of synthetic copies allowed below τ. An expanded query keeps its best hit first (expansion.py), so
# an expanded copy still finds its original first; what it can lose is its other copies' ranks. On the dev set
# (benchmarks/qe_gate.py, Lite1 and Lite2) 10 % left every copy figure as it was — 20 % did not for Lite1 — and
# took two thirds of what expanding every query gains on category search.
QUANTILE = 0.10
MIN_COPIES = 20  # fewer copies than this give no usable 10th percentile: no τ is learned


class QeGate(BaseModel):
    tau: float  # expand a query when its best hit scores below this
    copies: int  # synthetic copies it was learned from
    quantile: float = QUANTILE


def normalised(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def as_indexed(index, vectors: np.ndarray) -> np.ndarray:
    """Vectors as a trained faiss index scores them: decoded from its codes (IVF-PQ, SQ8: a query's score is its
    inner product with the decoded vector), or as they are where its scores are exact (Flat, IVF-Flat, a refine
    step over full or SQ8 vectors: faiss has no standalone codec for those wrappers)."""
    if index is None:
        return vectors
    try:
        return index.sa_decode(index.sa_encode(np.ascontiguousarray(vectors, np.float32)))
    except RuntimeError:
        return vectors


def copy_scores(originals: np.ndarray, copies: np.ndarray) -> np.ndarray:
    """Each copy's score with its own original — the query unit length, the original as the index holds it (in
    its space, decoded from its codes): what the copy's best hit scores at least."""
    return np.einsum("nd,nd->n", originals, normalised(copies))


def learn(originals: np.ndarray, copies: np.ndarray) -> QeGate | None:
    """τ from a sample of (original as indexed, synthetic copy) vector pairs in the index's space; None with too
    few."""
    if len(copies) < MIN_COPIES:
        return None
    tau = float(np.quantile(copy_scores(originals, copies), QUANTILE))
    return QeGate(tau=round(tau, 4), copies=len(copies))
