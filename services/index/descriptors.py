"""Descriptor re-weighting by neighbours (Radenović et al.): query-side αQE, database-side DBA."""

from __future__ import annotations

from typing import Callable

import faiss
import numpy as np

from services.common.errors import InvalidInput

ALPHA = 3.0


def weighted_sum(own: np.ndarray, neighbours: np.ndarray, sims: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """normalise(own + Σ max(sim, 0)^α · neighbour), row by row; neighbours (n, m, d), sims (n, m)."""
    w = np.maximum(sims, 0.0) ** alpha
    out = own + np.einsum("nm,nmd->nd", w, neighbours)
    return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def alpha_qe(queries: np.ndarray, neighbours: np.ndarray, sims: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """αQE: each query plus its top results weighted by similarity^α, re-normalised."""
    return weighted_sum(queries, neighbours, sims, alpha)


def dba(vectors: np.ndarray, n: int, alpha: float = ALPHA, batch: int = 4096) -> np.ndarray:
    """Database-side augmentation: each vector plus its n nearest others (exact inner product)."""
    if not 1 <= n < len(vectors):
        raise InvalidInput(f"DBA needs 1 <= n < {len(vectors)} neighbours, got {n}")
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    out = np.empty_like(vectors)
    for i in range(0, len(vectors), batch):
        D, I = flat.search(vectors[i:i + batch], n + 1)
        D, I = D[:, 1:], I[:, 1:]  # the vector itself comes first: it is `own`
        out[i:i + batch] = weighted_sum(vectors[i:i + batch], vectors[I], D, alpha)
    return out


def dba_new(vectors: np.ndarray, n: int, indexed: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
            alpha: float = ALPHA) -> np.ndarray:
    """DBA of vectors added to an augmented index: each new vector plus its n nearest among what is indexed
    (`indexed(queries, n)` -> (sims (m, n), stored vectors (m, n, d)); already augmented, as they are stored)
    and the other new vectors. The indexed vectors are left as they are: an add does not re-augment its
    neighbours (a rebuild does), so one new image changes no other image's results but its own."""
    sims, neighbours = indexed(vectors, n)
    if len(vectors) > 1:  # the batch's own neighbours, the vector itself left out
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(vectors)
        D, I = flat.search(vectors, min(n + 1, len(vectors)))
        D, I = D[:, 1:], I[:, 1:]
        sims, neighbours = np.concatenate([sims, D], axis=1), np.concatenate([neighbours, vectors[I]], axis=1)
    best = np.argsort(-sims, axis=1, kind="stable")[:, :n]
    return weighted_sum(vectors, np.take_along_axis(neighbours, best[:, :, None], axis=1),
                        np.take_along_axis(sims, best, axis=1), alpha)
