"""The learned projection of an index: model vectors -> mean-centred PCA (optionally shrinkage-whitened)
-> L2, trained on the catalogue at build time and stored with the version it belongs to.

Why centred PCA to 256 without whitening by default: it trades category retrieval against near-duplicate
retrieval, and both are what image search is used for. On real photos category mAP rises as dimensions fall
while copy detection falls, and whitening moves each the other way; 256 keeps copy detection close to the
model's own, recall@1 unchanged, with vectors several times smaller (README Quality, "Post-processing", has the
figures); a catalogue searched only for "more like this" should take --pca 128 with --dba / qe (README).

faiss trains it (PCAMatrix: handles fewer rows than dimensions, eigenvalue power for whitening); the result
is kept as a plain affine map (A, b) in an .npz. It is applied by faiss too (a LinearTransform), not by a numpy
matmul: numpy's OpenBLAS keeps its pthreads spinning after a call, and on a small machine they take the cores
faiss's OpenMP threads search on next, and the search after a numpy projection ran several times slower than
projecting with faiss's own BLAS (README Performance, `python -m benchmarks.projection_cost`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cached_property

import faiss
import numpy as np

from services.common.checksums import verified_bytes
from services.common.errors import Corrupt, InvalidInput
from services.common.store import Store
from services.index.layout import version_key
from services.index.manifest import Manifest

TRAIN_MAX = 100_000  # rows to learn the covariance from: enough for a 1280-d model, bounded in memory
MIN_ROWS_PER_DIM = 4  # fewer catalogue images than this per output dimension: too noisy to learn, skip


@dataclass(frozen=True)
class Projection:
    matrix: np.ndarray  # (out_dim, in_dim) float32
    bias: np.ndarray  # (out_dim,) float32: -matrix @ mean
    power: float  # whitening: eigenvalues^(-power/2); 0 = none, 1 = full whitening

    @property
    def in_dim(self) -> int:
        return self.matrix.shape[1]

    @property
    def out_dim(self) -> int:
        return self.matrix.shape[0]

    def apply(self, vectors: np.ndarray, batch: int = 65_536) -> np.ndarray:
        """Model vectors (n, in_dim) -> index vectors (n, out_dim), unit length."""
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.in_dim:
            raise InvalidInput(f"the projection takes {self.in_dim}-d vectors, got shape {vectors.shape}")
        out = np.empty((len(vectors), self.out_dim), np.float32)
        for i in range(0, len(vectors), batch):
            out[i:i + batch] = self._transform.apply(np.ascontiguousarray(vectors[i:i + batch]))
        faiss.normalize_L2(out)
        return out

    @cached_property
    def _transform(self) -> faiss.LinearTransform:
        """y = A x + b in faiss (see the module's docstring for why not numpy)."""
        lt = faiss.LinearTransform(self.in_dim, self.out_dim, True)
        faiss.copy_array_to_vector(np.ascontiguousarray(self.matrix, np.float32).ravel(), lt.A)
        faiss.copy_array_to_vector(np.ascontiguousarray(self.bias, np.float32), lt.b)
        lt.is_trained = True
        return lt

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, matrix=self.matrix, bias=self.bias, power=np.float32(self.power))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "projection") -> "Projection":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                p = cls(z["matrix"].astype(np.float32), z["bias"].astype(np.float32), float(z["power"]))
        except (ValueError, KeyError, OSError) as e:
            raise Corrupt(f"{where} is not a projection: {e}") from None
        if p.matrix.ndim != 2 or p.bias.shape != (p.out_dim,):
            raise Corrupt(f"{where}: matrix {p.matrix.shape} and bias {p.bias.shape} do not fit")
        return p


def to_wire(projection: Projection | None) -> bytes | None:
    """A projection (or none) as Ray task arguments carry it: its file bytes (its cached faiss transform does
    not pickle)."""
    return None if projection is None else projection.to_bytes()


def from_wire(data: bytes | None) -> Projection | None:
    return None if data is None else Projection.from_bytes(data)


def check_options(pca_dim: int, power: float) -> None:
    if pca_dim < 0:
        raise InvalidInput(f"--pca must be >= 0 (0: no projection), got {pca_dim}")
    if not 0 <= power <= 1:
        raise InvalidInput(f"--whiten must be within 0..1 (eigenvalue power; 1 = full whitening), got {power}")


def skip_reason(n: int, dim: int, pca_dim: int) -> str | None:
    """Why no projection is learned for n vectors of dim (None: learn one)."""
    if pca_dim == 0:
        return "off (--pca 0)"
    if pca_dim >= dim:
        return f"skipped: the model's vectors have {dim} dimensions, not more than --pca {pca_dim}"
    if n < MIN_ROWS_PER_DIM * pca_dim:
        return (f"skipped: {n} vectors are too few to learn {pca_dim} dimensions from "
                f"(needs {MIN_ROWS_PER_DIM * pca_dim}); vectors are indexed as the model gives them")
    return None


def train(vectors: np.ndarray, pca_dim: int, power: float = 0.0, seed: int = 0) -> Projection:
    """Learn the projection on (a sample of) the catalogue's vectors."""
    check_options(pca_dim, power)
    if not 0 < pca_dim < vectors.shape[1]:
        raise InvalidInput(f"PCA to {pca_dim} dimensions needs a model with more than that, not {vectors.shape[1]}")
    if len(vectors) > TRAIN_MAX:
        rows = np.sort(np.random.default_rng(seed).choice(len(vectors), TRAIN_MAX, replace=False))
        vectors = vectors[rows]
    pca = faiss.PCAMatrix(vectors.shape[1], pca_dim, -0.5 * power, False)
    pca.train(np.ascontiguousarray(vectors, np.float32))
    matrix = faiss.vector_to_array(pca.A).reshape(pca_dim, vectors.shape[1]).astype(np.float32)
    bias = faiss.vector_to_array(pca.b).astype(np.float32)
    return Projection(matrix, bias, power)


def load_projection(store: Store, manifest: Manifest) -> Projection | None:
    """The version's projection, checksum-verified (None: it indexes the model's vectors as they are)."""
    if manifest.projection is None:
        return None
    key = version_key(manifest.version, manifest.projection.file)
    p = Projection.from_bytes(verified_bytes(store, key, manifest.projection.sha256), store.uri(key))
    if p.in_dim != manifest.model_dim or p.out_dim != manifest.dim:
        raise Corrupt(f"{store.uri(key)} maps {p.in_dim} -> {p.out_dim} dimensions; the manifest says "
                      f"{manifest.model_dim} -> {manifest.dim}")
    return p


def to_index_space(projection: Projection | None, vectors: np.ndarray, manifest: Manifest) -> np.ndarray:
    """Query vectors in the index's space: model vectors are projected, index vectors (e.g. stored vectors
    fetched by id) pass as they are; any other width is refused with both accepted widths named."""
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim == 2 and vectors.shape[1] == manifest.dim:
        return vectors
    if projection is not None and vectors.ndim == 2 and vectors.shape[1] == manifest.model_dim:
        return projection.apply(vectors)
    accepted = sorted({manifest.dim, manifest.model_dim if projection is not None else manifest.dim})
    got = vectors.shape[-1] if vectors.ndim == 2 else f"shape {vectors.shape}"
    raise InvalidInput(f"query vectors have dim {got}; this index takes {' or '.join(map(str, accepted))}-d "
                       f"vectors ({manifest.model.get('name')})")
