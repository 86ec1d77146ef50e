"""faiss helpers shared by the indexer and the searchers."""

from __future__ import annotations

import threading

import faiss
import numpy as np

from services.common.errors import Corrupt, InvalidInput


def gpu_count() -> int:
    """The one faiss GPU check (0 with faiss-cpu)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


_BLAS_LOCK = threading.Lock()
_FAISS_BLAS_THRESHOLD = faiss.cvar.distance_compute_blas_threshold
BLAS_MIN_QUERIES = 20


def flat_search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive search (e.g. IVF coarse assignment) through BLAS for batches, faiss's own path for
    a few queries: BLAS wins for a batch against thousands of centroids and loses for one query (README
    Performance, the router rows). faiss's switch is one process-wide variable, hence the lock."""
    with _BLAS_LOCK:
        big = len(queries) >= BLAS_MIN_QUERIES
        faiss.cvar.distance_compute_blas_threshold = BLAS_MIN_QUERIES if big else _FAISS_BLAS_THRESHOLD
        try:
            return index.search(queries, k)
        finally:
            faiss.cvar.distance_compute_blas_threshold = _FAISS_BLAS_THRESHOLD


def make_index(dim: int, factory: str) -> faiss.Index:
    """Inner-product index from a factory string, wrapped in IDMap when it lacks add_with_ids."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise InvalidInput(f"bad index factory {factory!r}: {str(e).splitlines()[-1]}") from None
    ivf = find_ivf(index)
    if isinstance(ivf, faiss.IndexIVFPQ):
        ivf.do_polysemous_training = False  # we never search by Hamming distance; it costs seconds
    if not isinstance(faiss.downcast_index(index), faiss.IndexIVF):
        index = faiss.IndexIDMap(index)
    return index


def find_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        return None


def ivf_quantizer(index: faiss.Index) -> faiss.Index | None:
    """The coarse quantizer of a plain IVF index (what a router needs to assign lists), else None."""
    ix = faiss.downcast_index(index)
    return ix.quantizer if isinstance(ix, faiss.IndexIVF) else None


def train(index: faiss.Index, sample: np.ndarray) -> None:
    """Train once; k-means on the GPU(s) when there are any."""
    if index.is_trained:
        return
    ivf = find_ivf(index)
    if ivf is not None and gpu_count():
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
    index.train(np.ascontiguousarray(sample, dtype=np.float32))


def add(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> None:
    """add_with_ids; the inverted-list assignment runs on the GPU(s) when there are any."""
    vectors, ids = np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64)
    ivf = find_ivf(index)
    if ivf is None or not gpu_count():
        index.add_with_ids(vectors, ids)
        return
    cpu_quantizer = ivf.quantizer
    gpu_quantizer = faiss.index_cpu_to_all_gpus(cpu_quantizer)  # referenced here while faiss uses it
    ivf.quantizer = gpu_quantizer
    try:
        index.add_with_ids(vectors, ids)
    finally:
        ivf.quantizer = cpu_quantizer  # the shard file keeps the CPU quantizer


def remove_ids(index: faiss.Index, ids: np.ndarray, chunk: int = 65_536) -> tuple[faiss.Index, int]:
    """Remove ids; returns (the index, how many it held). Indexes that cannot remove in place
    (IVF-PQ + Refine, HNSW) are rebuilt without them from their stored vectors, chunk by chunk
    into a trained, emptied copy: the result is a new index object."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    try:
        return index, int(index.remove_ids(faiss.IDSelectorBatch(ids)))
    except RuntimeError:
        ix = faiss.downcast_index(index)
        if not isinstance(ix, faiss.IndexIDMap):
            raise
    held = faiss.vector_to_array(ix.id_map)  # label of inner position i
    fresh = faiss.clone_index(ix)
    fresh.reset()  # keeps the training (quantizers, codebooks)
    for start in range(0, len(held), chunk):
        part = held[start:start + chunk]
        keep = ~np.isin(part, ids)
        # A Refine index reconstructs from its refine codes (e.g. SQ8): the PQ codes are re-made from those.
        add(fresh, ix.index.reconstruct_n(start, len(part))[keep], part[keep])
    return fresh, int(np.isin(held, ids).sum())


def search_parameters(index: faiss.Index, nprobe: int, k_factor: float, selector=None):
    """Per-call parameters (thread-safe, unlike ParameterSpace which mutates the index); with a selector, only
    the ids it accepts are searched (set on every level: a Refine index reads its base index's parameters).

    Returns (params, keepalive): faiss holds raw pointers to nested params, so the Python
    objects must outlive the search call. An IndexIDMap swaps a selector into its parameters during a search
    (not thread-safe): filtered searches pass the IDMap's inner index and positions (filtered.py).
    """
    keep: list = []

    def build(ix):
        ix = faiss.downcast_index(ix)
        if isinstance(ix, faiss.IndexIDMap):
            return build(ix.index)
        if isinstance(ix, faiss.IndexRefine):
            p = faiss.IndexRefineSearchParameters()
            p.k_factor = float(k_factor)
            base = build(ix.base_index)
            if base is not None:
                p.base_index_params = base
        elif isinstance(ix, faiss.IndexPreTransform):
            inner = build(ix.index)
            if inner is None:
                return None
            p = faiss.SearchParametersPreTransform()
            p.index_params = inner
        elif isinstance(ix, faiss.IndexIVF):
            p = faiss.SearchParametersIVF()
            p.nprobe = int(nprobe)
        elif isinstance(ix, faiss.IndexHNSW) and selector is not None:
            p = faiss.SearchParametersHNSW()
        elif selector is not None:
            p = faiss.SearchParameters()
        else:
            return None
        if selector is not None:
            p.sel = selector
        keep.append(p)
        return p

    return build(index), keep


def search(index: faiss.Index, queries: np.ndarray, k: int, nprobe: int = 1, k_factor: float = 1):
    params, _keep = search_parameters(index, nprobe, k_factor)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)


def search_preassigned(ivf: faiss.IndexIVF, queries: np.ndarray, k: int, Iq: np.ndarray, Dq: np.ndarray,
                       params) -> tuple[np.ndarray, np.ndarray]:
    """IVF search with the coarse lists already chosen. Calls the C++ method: the Python wrapper
    reads nprobe from the index (shared mutable state), the C++ one from per-call params."""
    n = len(queries)
    D, I = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
    Iq, Dq = np.ascontiguousarray(Iq, np.int64), np.ascontiguousarray(Dq, np.float32)
    ivf.search_preassigned_c(n, faiss.swig_ptr(queries), k, faiss.swig_ptr(Iq), faiss.swig_ptr(Dq),
                             faiss.swig_ptr(D), faiss.swig_ptr(I), False, params)
    return D, I


def id_selector(ids: np.ndarray, all_ids: np.ndarray) -> tuple[object, list]:
    """A selector of ids among all_ids (both sorted): a batch of ids, or for broad filters the negation of the
    few ids that do not match (faiss's IDSelectorBatch builds a hash set of its ids on every call)."""
    if len(ids) <= len(all_ids) // 2:
        return faiss.IDSelectorBatch(ids), [ids]
    others = np.setdiff1d(all_ids, ids, assume_unique=True)
    inner = faiss.IDSelectorBatch(others)
    return faiss.IDSelectorNot(inner), [inner, others]


def position_selector(mask: np.ndarray) -> tuple[object, list]:
    """A selector of an IDMap's inner positions (0..n-1) from a mask over them: a bitmap."""
    bits = np.packbits(mask, bitorder="little")
    return faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits)), [bits]


def to_bytes(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def read_index(path: str, mmap: bool = False, map_refine: bool = False) -> faiss.Index:
    """Read a shard file; memory-mapped if asked and the index type allows it.

    Mapped IVF lists cost several times more per query (README Performance, the closing notes), so RAM is the
    default; map when the shards do not fit in memory. map_refine maps only flat-coded storage (a re-ranking
    stage's full vectors: 8·k rows read a query, the IVF lists stay in RAM); the file must stay where it is.
    """
    extra = faiss.IO_FLAG_MMAP_IFC if map_refine else 0
    try:
        if mmap:
            try:
                return faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY | extra)
            except RuntimeError:
                pass  # not every index type can be mapped
        return faiss.read_index(path, extra)
    except RuntimeError as e:
        raise Corrupt(f"cannot read index file {path}: {str(e).splitlines()[-1]}") from None
