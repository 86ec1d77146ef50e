"""Synthetic embeddings folders (for tests and benchmarks that need no model)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import numpy as np

from services.common.store import LocalStore
from services.embedder.embeddings import PartWriter
from services.embedder.spec import ModelSpec


def clustered_unit_vectors(n: int, d: int, seed: int = 0, clusters: int = 0, noise: float = 0.5) -> np.ndarray:
    """Random unit vectors, optionally drawn around `clusters` centres (like real embeddings)."""
    rng = np.random.default_rng(seed)
    if clusters:
        centres = rng.normal(size=(clusters, d)).astype(np.float32)
        x = centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, d)).astype(np.float32)
    else:
        x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_embeddings(root: str | Path, vectors: np.ndarray, name: str = "synthetic", error_rows: int = 0,
                     part_rows: int = 50_000, uri_prefix: str = "img", first_row: int = 0,
                     metadata: list[dict] | None = None) -> ModelSpec:
    """An embeddings folder laid out as `imsearch embed` writes it, from given vectors (row numbers,
    hence ids and uris, start at first_row: later batches of the same catalogue get new ids); metadata: each
    row's manifest columns, as `imsearch embed --manifest` keeps them."""
    chunks = (vectors[start:start + part_rows] for start in range(0, len(vectors), part_rows))
    return write_embedding_chunks(root, chunks, vectors.shape[1], name, error_rows, part_rows, uri_prefix, first_row,
                                  metadata)


def write_embedding_chunks(root: str | Path, chunks: Iterable[np.ndarray], dim: int, name: str = "synthetic",
                           error_rows: int = 0, part_rows: int = 50_000, uri_prefix: str = "img", first_row: int = 0,
                           metadata: list[dict] | None = None) -> ModelSpec:
    """write_embeddings from vectors made a chunk at a time (catalogues bigger than memory)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    weights = root / f"{name}.weights"
    weights.write_bytes(name.encode())
    spec = ModelSpec(name, "none", str(weights), dim)
    writer = PartWriter(LocalStore(root), spec, part_rows)
    start = 0
    for chunk in chunks:
        n = len(chunk)
        rows = range(first_row + start, first_row + start + n)
        sha = [hashlib.sha256(f"{name}-{r}".encode()).hexdigest() for r in rows]
        writer.add({"uri": np.array([f"{uri_prefix}/{r}.jpg" for r in rows], dtype=object),
                    "sha256": np.array(sha, dtype=object), "width": np.full(n, 64), "height": np.full(n, 48),
                    "error": np.array([""] * n, dtype=object), "vector": chunk,
                    **({} if metadata is None else {"metadata": [json.dumps(m, sort_keys=True)
                                                                 for m in metadata[start:start + n]]})})
        start += n
    if error_rows:
        writer.add({"uri": np.array([f"bad/{i}.jpg" for i in range(error_rows)], dtype=object),
                    "sha256": np.array([""] * error_rows, dtype=object), "width": np.zeros(error_rows),
                    "height": np.zeros(error_rows),
                    "error": np.array(["not an image: test"] * error_rows, dtype=object),
                    "vector": np.zeros((error_rows, dim), np.float32)})
    writer.close("synthetic")
    return spec
