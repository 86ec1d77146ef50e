"""Memory against recall at the models' descriptor width (issue 20): N × 1,280-d vectors (clustered, low-rank as
real descriptors are), each memory-bounded index type built with faiss and measured — bytes per vector in RAM
(and on disk where the full vectors stay there), recall@10 against exact search on held-out queries at the
smallest nprobe reaching 0.95 (or the best of the sweep), and QPS (batches of 100) there.

Types: IVF-Flat, IVF-SQ8, IVF-PQ re-ranked from SQ8 codes (the product's automatic choice past the IVF-Flat
budget), IVF-PQ re-ranked from the full vectors memory-mapped on disk (the automatic choice when not even SQ8
codes fit: `Refine(Flat)` read as the searcher reads it, faiss_util.read_index(map_refine=True)), IVF-PQ alone,
OPQ + IVF-PQ, the learned projection (PCA to 256) before IVF-Flat and before IVF-PQ + SQ8, and faiss's
IVF-RaBitQ (alone and re-ranked from SQ8). The coarse quantizer is trained once and shared by the types that
work in the original space.

    python -m benchmarks.bench_memory [--n 200000] [--queries 200]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from services.index import faiss_util
from services.indexer.params import choose_nlist

DIM, RANK, K, TARGET = 1280, 192, 10, 0.95
CENTRES, NOISE = 10_000, 1.0  # neighbours spread over several lists, as real catalogues' do
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def vectors(n: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """Unit vectors around 10,000 centres in a fixed random 192-d subspace of R^1280, plus weak isotropic noise
    (benchmarks/projection_cost.py's kind of catalogue, with wider clusters; made a chunk at a time)."""
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(DIM, RANK)))[0].T.astype(np.float32)
    centres = rng.normal(size=(CENTRES, RANK)).astype(np.float32)
    out = np.empty((n, DIM), np.float32)
    for i, start in enumerate(range(0, n, chunk)):
        r = np.random.default_rng(seed * 1000 + i + 1)
        m = min(chunk, n - start)
        z = centres[r.integers(0, CENTRES, m)] + NOISE * r.standard_normal((m, RANK), np.float32)
        x = z @ basis + 0.05 * r.standard_normal((m, DIM), np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found.tolist(), truth.tolist())]))


def sweep(search, queries: np.ndarray, truth: np.ndarray, nlist: int) -> dict:
    """The smallest nprobe of the sweep reaching TARGET (else the best), with its recall and QPS."""
    best = None
    for nprobe in [p for p in NPROBES if p <= nlist]:
        got = search(queries, nprobe)
        r = recall(got, truth)
        if best is None or r > best["recall_at_10"]:
            best = {"nprobe": nprobe, "recall_at_10": round(r, 4)}
        if r >= TARGET:
            break
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < 2:
        for b in range(0, len(queries), 100):
            search(queries[b:b + 100], best["nprobe"])
        done += len(queries)
    return {**best, "qps_batch_100": round(done / (time.perf_counter() - start))}


def faiss_search(index: faiss.Index, k_factor: int = 0):
    ivf = faiss.extract_index_ivf(index)

    def search(q: np.ndarray, nprobe: int) -> np.ndarray:
        ivf.nprobe = nprobe  # as well as the parameters: not every wrapper passes them down
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        if k_factor:
            params = faiss.IndexRefineSearchParameters(k_factor=k_factor, base_index_params=params)
        return index.search(q, K, params=params)[1]
    return search


KEEP: list = []  # quantizers shared by several indexes: faiss holds raw pointers to them


def build(factory: str, data: np.ndarray, sample: np.ndarray, quantizer: faiss.Index | None,
          opq_iters: int) -> faiss.Index:
    index = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(vt, faiss.OPQMatrix):
                vt.niter = opq_iters
    ivf = faiss.extract_index_ivf(index)
    if isinstance(ivf, faiss.IndexIVFPQ):
        ivf.do_polysemous_training = False
    if quantizer is not None and ivf.d == DIM and not isinstance(index, faiss.IndexPreTransform):
        ivf.quantizer, ivf.own_fields = quantizer, False  # trained once, shared: only the codes are trained here
        KEEP.append(quantizer)
    index.train(sample)
    index.add(data)
    return index


def mapped(index: faiss.Index, path: Path) -> faiss.Index:
    """The index as the searcher serves an ivf-pq-disk shard: written, then read with its flat codes mapped."""
    faiss.write_index(index, str(path))
    return faiss_util.read_index(str(path), map_refine=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--only", default="", help="comma-separated type names to run (default: all)")
    ap.add_argument("--opq-iters", type=int, default=10, help="OPQ's alternating iterations (faiss: 50, which "
                                                              "did not finish in 8 min at 200k on 2 cores)")
    args = ap.parse_args()
    t = time.perf_counter()
    data, queries = vectors(args.n, seed=1), vectors(args.queries, seed=2)
    nlist = choose_nlist(args.n)
    sample = data[np.sort(np.random.default_rng(0).choice(args.n, min(args.n, 64 * nlist), replace=False))]
    exact = faiss.IndexFlatIP(DIM)
    exact.add(data)
    truth = exact.search(queries, K)[1]
    del exact
    print(f"# {args.n} x {DIM}, nlist {nlist}, data and truth in {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    coarse = faiss.IndexFlatIP(DIM)
    km = faiss.Clustering(DIM, nlist)
    km.niter, km.max_points_per_centroid = 10, 256
    km.train(sample, coarse)
    print(f"# coarse quantizer trained in {time.perf_counter() - t:.0f} s", flush=True)
    m = 64
    types = {
        "IVF-Flat": (f"IVF{nlist},Flat", 0),
        "IVF-SQ8": (f"IVF{nlist},SQ8", 0),
        f"IVF-PQ{m} + SQ8 re-rank (auto)": (f"IVF{nlist},PQ{m},Refine(SQ8)", 8),
        f"IVF-PQ{m}": (f"IVF{nlist},PQ{m}", 0),
        f"IVF-PQ{m} + full vectors on disk (auto)": (f"IVF{nlist},PQ{m},Refine(Flat)", -8),
        f"OPQ{m} + IVF-PQ{m}": (f"OPQ{m},IVF{nlist},PQ{m}", 0),
        "PCA256 + IVF-Flat": (f"PCA256,IVF{nlist},Flat", 0),
        "PCA256 + IVF-PQ32 + SQ8 re-rank": (f"PCA256,IVF{nlist},PQ32,Refine(SQ8)", 8),
        "IVF-RaBitQ": (f"IVF{nlist},RaBitQ", 0),
        "IVF-RaBitQ + SQ8 re-rank": (f"IVF{nlist},RaBitQ,Refine(SQ8)", 8),
    }
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (factory, k_factor) in types.items():
            if only and name not in only:
                continue
            t = time.perf_counter()
            try:
                index = build(factory, data, sample, coarse, args.opq_iters)
            except RuntimeError as e:
                print(json.dumps({"type": name, "factory": factory, "error": str(e).splitlines()[-1]}), flush=True)
                continue
            built = time.perf_counter() - t
            # RAM: the index as serialised; for the disk type its PQ part alone (the full vectors stay in the
            # mapped file; serialising them too would hold a third copy of the catalogue here)
            in_ram = faiss.downcast_index(index).base_index if k_factor < 0 else index
            ram = len(faiss.serialize_index(in_ram)) / args.n
            if k_factor < 0:
                index = mapped(index, Path(tmp) / "shard.faiss")
            search = faiss_search(index, abs(k_factor))
            row = {"type": name, "factory": factory, "ram_bytes_per_vector": round(ram, 1),
                   **({"disk_bytes_per_vector": 4 * DIM} if k_factor < 0 else {}),
                   **sweep(search, queries, truth, nlist), "build_seconds": round(built)}
            print(json.dumps(row), flush=True)
            del index


if __name__ == "__main__":
    main()
