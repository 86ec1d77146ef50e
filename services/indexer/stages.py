"""The stages of an index build that the in-process build and the Ray build (parallel.py) share, so both make
the same index from the same embeddings: which rows train the projection and the index and which query the
tuning (positions among the embedded rows, catalogue order, fixed seeds), the building of one shard from its
rows, and choosing nprobe from what each shard reports of the tuning queries.

Tuning is split the same way: each shard answers the tuning queries exactly and at every nprobe of the
doubling sequence (`probe`), and the driver merges the shards' answers (`tune`) — the driver never needs
every vector for the exact ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from services.index import faiss_util
from services.index.merge import merge_topk
from services.index.shards import Shard
from services.indexer.params import PQ_TRAIN_POINTS, IndexParams

TUNE_QUERIES = 256
TUNE_K = 10
PROJECTION_SAMPLE = 100_000  # PCA from this many rows is as good as from all (and bounds a streaming driver)


def projection_rows(n: int) -> np.ndarray:
    """Rows the projection is learned from: all of a small catalogue, else a fixed-seed sample."""
    if n <= PROJECTION_SAMPLE:
        return np.arange(n)
    return np.sort(np.random.default_rng(1).choice(n, PROJECTION_SAMPLE, replace=False))


def train_rows(n: int, params: IndexParams, rng: np.random.Generator) -> np.ndarray:
    """Enough rows for k-means (64 per list) and PQ codebooks, never more than needed."""
    want = max(64 * max(params.nlist, 1), PQ_TRAIN_POINTS if params.pq_m else 0, 1000)
    if n <= want:
        return np.arange(n)
    return np.sort(rng.choice(n, want, replace=False))


def query_rows(n: int, rng: np.random.Generator) -> np.ndarray:
    """The tuning queries: catalogue rows (their own entry is left out of both answers, so the figure measures
    finding neighbours, as a fresh query must)."""
    return rng.choice(n, min(TUNE_QUERIES, n), replace=False)


def plan_rows(n: int, params: IndexParams, needs_training: bool) -> tuple[np.ndarray | None, np.ndarray]:
    """(rows to train on, None when there is nothing to train; the tuning query rows), from one fixed seed."""
    rng = np.random.default_rng(0)
    sample = train_rows(n, params, rng) if needs_training else None
    return sample, query_rows(n, rng)


def nprobe_steps(nlist: int) -> list[int]:
    """The nprobes tuning tries: 1, 2, 4, ... up to nlist (just 1 for exact indexes)."""
    steps = [1]
    while steps[-1] < nlist:
        steps.append(min(steps[-1] * 2, nlist))
    return steps


def clone(trained: faiss.Index | bytes) -> faiss.Index:
    blob = faiss.serialize_index(trained) if isinstance(trained, faiss.Index) else np.frombuffer(trained, np.uint8)
    return faiss.deserialize_index(blob)  # clone_index lacks some transforms


@dataclass
class Probe:
    """One shard's answers to the tuning queries: exact (D, I) and approximate {nprobe: (D, I)}, k+1 each."""
    number: int
    exact: tuple[np.ndarray, np.ndarray]
    ann: dict[int, tuple[np.ndarray, np.ndarray]]

    def to_json(self) -> dict:
        pair = lambda d, i: {"D": d.tolist(), "I": i.tolist()}  # noqa: E731
        return {"number": self.number, "exact": pair(*self.exact),
                "ann": {str(p): pair(*di) for p, di in self.ann.items()}}

    def at(self, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """The answers at nprobe: past the step where this shard answered exactly, that step's."""
        return self.ann[nprobe] if nprobe in self.ann else self.ann[max(p for p in self.ann if p <= nprobe)]

    @classmethod
    def from_json(cls, raw: dict) -> "Probe":
        pair = lambda r: (np.array(r["D"], np.float32), np.array(r["I"], np.int64))  # noqa: E731
        return cls(int(raw["number"]), pair(raw["exact"]), {int(p): pair(r) for p, r in raw["ann"].items()})


class ShardBuilder:
    """One shard built from its rows given in one go (in-process) or a part at a time (a Ray task streaming the
    embeddings parts: only the index and one part in memory): the trained empty index filled, and the running
    exact answers to the tuning queries."""

    def __init__(self, number: int, trained: faiss.Index | bytes, queries: np.ndarray, params: IndexParams):
        self.number, self.params = number, params
        self.index = clone(trained)
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = min(TUNE_K, max(len(queries), 1)) + 1
        self.ids: list[np.ndarray] = []
        self.uris: list[str] = []
        self.exact: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, ids: np.ndarray, vectors: np.ndarray, uris: list[str]) -> None:
        if not len(ids):
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        faiss_util.add(self.index, vectors, ids)
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(vectors)
        d, rows = flat.search(self.queries, self.k)
        found = (d, np.where(rows >= 0, ids[np.maximum(rows, 0)], -1))
        self.exact = found if self.exact is None else merge_topk([(0, *self.exact), (1, *found)], self.k)[:2]
        self.ids.append(np.asarray(ids, np.int64))
        self.uris.extend(uris)

    def finish(self, columns: dict) -> tuple[Shard, Probe]:
        """The shard (columns: its rows' filterable fields, in the order added) and its answers to the tuning
        queries: exact, and at each nprobe of the doubling sequence until this shard answers exactly."""
        exact = self.exact or (np.full((len(self.queries), self.k), -np.inf, np.float32),
                               np.full((len(self.queries), self.k), -1, np.int64))
        ann = {}
        for p in nprobe_steps(self.params.nlist):
            ann[p] = faiss_util.search(self.index, self.queries, self.k, p, self.params.k_factor)
            if np.array_equal(np.sort(ann[p][1], axis=1), np.sort(exact[1], axis=1)):
                break  # this shard answers exactly from here on: wider probes cannot change the merged recall
        ids = np.concatenate(self.ids) if self.ids else np.zeros(0, np.int64)
        return Shard(self.number, self.index, ids, self.uris, columns), Probe(self.number, exact, ann)


def tune(probes: list[Probe], qids: np.ndarray, n: int, params: IndexParams, target: float) -> tuple[int, dict]:
    """Smallest nprobe whose merged recall@10 against the merged exact answers reaches target."""
    if n < 2 or not len(qids):
        return 1, {"recall_at_10": 1.0, "queries": int(len(qids))}
    k = min(TUNE_K, n - 1)
    _, exact, _, _ = merge_topk([(p.number, *p.exact) for p in probes], k + 1)
    truth = [[i for i in row if i != q][:k] for q, row in zip(qids.tolist(), exact.tolist())]
    info = {"queries": int(len(qids)), "target": target}
    curve = {}
    for nprobe in nprobe_steps(params.nlist):
        _, got, _, _ = merge_topk([(p.number, *p.at(nprobe)) for p in probes], k + 1)
        hits = sum(len(set(t) & set([i for i in g if i != q][:k])) for q, t, g in zip(qids.tolist(), truth,
                                                                                       got.tolist()))
        curve[nprobe] = round(hits / max(sum(len(t) for t in truth), 1), 4)
        if curve[nprobe] >= target:
            break
    if params.nlist == 0:
        return 1, {"recall_at_10": curve[1], **info}
    return nprobe, {"recall_at_10": curve[nprobe], **info, "curve": {str(p): r for p, r in curve.items()}}
