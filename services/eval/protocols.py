"""Evaluation protocols run against a real index (the published IVF/PQ shards, searched in-process).

classes    every image of a folder of class subfolders queries all the others (the seeds' tables)
copydetect transformed copies of catalogue images, plus distractors with no copy, query the index
labelled   any query set with a ground truth: query id -> relevant database ids / uris
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from services.common.config import get_settings
from services.common.errors import ImsearchError, InvalidInput
from services.common.folders import LabelledImage
from services.common.images import decode_image
from services.common.transforms import ALL_EDITS, random_copy
from services.eval import metrics as m
from services.eval.datasets import flatten
from services.searcher.expansion import QePlan, expand, found_ids, gate, plan, to_expand
from services.searcher.local import IndexSearcher

Progress = Callable[[int], None]
EXACT_MAX = 20_000  # an exact N x N similarity matrix beyond this costs too much memory
K_REPORT = (1, 5, 10)


def norm_uri(uri: str) -> str:
    """One spelling per file (called once per document: rankings are read by id, see Docs)."""
    return uri if "://" in uri else str(Path(uri).resolve())


def embed_files(searcher: IndexSearcher, images: list[bytes], progress: Progress | None = None,
                batch: int = 32) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        out.append(searcher.embed_images(images[i:i + batch]))
        if progress:
            progress(len(out[-1]))
    return np.concatenate(out)


def per_query_ap(rels: list[np.ndarray], n_rel: list[int]) -> np.ndarray:
    """Full-ranking AP of each query (NaN for a query with no relevant item)."""
    return np.array([m.average_precision(r, n) if n else np.nan for r, n in zip(rels, n_rel)])


def summarise(rels: list[np.ndarray], n_rel: list[int], ap: np.ndarray | None = None) -> dict[str, float]:
    """The headline metrics of a set of rankings (queries without any relevant item left out); ap: the
    queries' per_query_ap when already computed."""
    ap = per_query_ap(rels, n_rel) if ap is None else ap
    keep = [i for i, n in enumerate(n_rel) if n > 0]
    rels, n_rel = [rels[i] for i in keep], [n_rel[i] for i in keep]
    if not rels:
        raise InvalidInput("no query has a relevant item in the database")
    out = {"queries": len(rels), "mAP": float(np.mean(ap[keep])),
           "mAP@10": float(np.mean([m.average_precision_at_k(r, n, 10) for r, n in zip(rels, n_rel)]))}
    for k in K_REPORT:
        out[f"P@{k}"] = float(np.mean([m.precision_at_k(r, k) for r in rels]))
    out["R@10"] = float(np.mean([m.recall_at_k(r, n, 10) for r, n in zip(rels, n_rel)]))
    out["ANMRR"] = m.anmrr(rels, n_rel)
    return out


@dataclass
class Docs:
    """Ids and their uris (each normalised once), sorted by id: rankings are read by id, vectorised, instead of
    resolving a path for every result of every query (N² calls)."""
    ids: np.ndarray  # int64, sorted
    uris: np.ndarray  # object, aligned with ids
    _index: object = field(default=None, repr=False)  # pandas.Index of ids, once asked

    @classmethod
    def of_index(cls, searcher: IndexSearcher) -> "Docs":
        ids = np.concatenate([s.ids for s in searcher.shards])
        uris = np.concatenate([s.uris for s in searcher.shards])
        order = np.argsort(ids, kind="stable")
        return cls(ids[order], np.array([norm_uri(str(u)) for u in uris[order]], dtype=object))

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Where each id is in self.ids (ids it lacks: any position; uris_of checks). A hash lookup (pandas'
        Index, built once): at evaluation depth there are N² ids to place, and a binary search each is slower."""
        if self._index is None:
            import pandas as pd

            self._index = pd.Index(self.ids)
        return np.maximum(self._index.get_indexer(np.asarray(ids, np.int64).ravel()), 0).reshape(np.shape(ids))

    def uris_of(self, ids: np.ndarray) -> np.ndarray:
        pos = self.positions(ids)
        return np.where(self.ids[pos] == ids, self.uris[pos], "")

    def ids_of(self, uris: list[str]) -> np.ndarray:
        """The id of each uri (-1 where the index does not hold it)."""
        row = dict(zip(self.uris.tolist(), self.ids.tolist()))
        return np.array([row.get(u, -1) for u in uris], dtype=np.int64)


class LazyUris(Sequence):
    """ranked.uris[q]: the uris of one query's results, looked up when asked (reports read a few rows)."""

    def __init__(self, ids: list[np.ndarray], docs: Docs):
        self.ids, self.docs = ids, docs

    def __getitem__(self, q):
        return self.docs.uris_of(self.ids[q])

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Ranked:
    """Per query: the ids of its results and their scores, best first, the query itself removed."""
    ids: list[np.ndarray]
    scores: list[np.ndarray]
    docs: Docs

    @property
    def uris(self) -> LazyUris:
        return LazyUris(self.ids, self.docs)


def rank_index(searcher: IndexSearcher, vectors: np.ndarray, depth: int, exclude: np.ndarray | None = None,
               docs: Docs | None = None) -> Ranked:
    """Search the index with depth results per query; drop the query's own id (exclude; -1: none)."""
    # Evaluation ranks deeper than a serving request may (max_k), so it raises the cap for itself.
    searcher.settings = searcher.settings.model_copy(update={"max_k": max(searcher.settings.max_k, depth + 1)})
    exclude = np.full(len(vectors), -1, np.int64) if exclude is None else exclude
    out = Ranked([], [], docs or Docs.of_index(searcher))
    for i in range(0, len(vectors), 256):
        D, I, _, _ = searcher.search_arrays(vectors[i:i + 256], depth + 1, with_uris=False)
        for d, ids, own in zip(D, I, exclude[i:i + 256]):
            keep = (ids >= 0) & (ids != own)
            out.ids.append(ids[keep][:depth])
            out.scores.append(d[keep][:depth])
    return out


def expansion_plan(searcher: IndexSearcher, qe: int | None) -> QePlan | None:
    """What `--qe` asks, as a search would read it (None: the gated default with the index's τ)."""
    return plan(qe, gate(searcher.manifest, searcher.settings)[0], searcher.settings)


@dataclass
class Expanded:
    queries: np.ndarray  # the searched queries: expanded where `expanded`, else as they were
    expanded: np.ndarray  # (nq,) bool
    best: Ranked  # the first round (each query's qe nearest)

    def keep_best_first(self, ranked: Ranked) -> None:
        """An expanded query's ranking with its first round's best hit first, as a search answers it."""
        for q in np.flatnonzero(self.expanded):
            b, ids = self.best.ids[q][0], ranked.ids[q]
            rest = np.flatnonzero(ids != b)[:max(len(ids) - 1, 0)]
            ranked.ids[q] = np.concatenate([[b], ids[rest]]).astype(ids.dtype)
            ranked.scores[q] = np.concatenate([[self.best.scores[q][0]], ranked.scores[q][rest]]).astype(np.float32)


def expand_queries(searcher: IndexSearcher, vectors: np.ndarray, qe: QePlan, exclude: np.ndarray | None = None,
                   docs: Docs | None = None) -> Expanded:
    """αQE as a search runs it: the queries whose best hit (the query itself excluded) scores below τ re-weighted
    with their top hits' stored vectors."""
    first = rank_index(searcher, vectors, qe.neighbours, exclude, docs)
    if any(len(ids) < qe.neighbours for ids in first.ids):
        raise InvalidInput(f"query expansion with {qe.neighbours} neighbours needs an index of more than "
                           f"{qe.neighbours} vectors")
    ids, scores = np.stack(first.ids), np.stack(first.scores)
    expanded = to_expand(ids, scores, qe.tau)
    rows = np.flatnonzero(expanded)
    out = vectors.copy()
    if len(rows):
        out[rows] = expand(vectors[rows], ids[rows], scores[rows], searcher.fetch(found_ids(ids[rows])))
    return Expanded(out, expanded, first)


def rescore_expanded(searcher: IndexSearcher, ranked: Ranked, vectors: np.ndarray, expanded: np.ndarray) -> None:
    """An expanded query's results scored by the query itself, as a search answers them (expansion.rescore)."""
    for q in np.flatnonzero(expanded):
        if len(ranked.ids[q]):
            ranked.scores[q] = (searcher.fetch(ranked.ids[q].tolist()) @ vectors[q]).astype(np.float32)


def expansion_figures(qe: QePlan | None, expanded: np.ndarray) -> dict:
    if qe is None:
        return {"qe": 0, "qe_gate": None, "expanded_share": 0.0}
    return {"qe": qe.neighbours, "qe_gate": qe.tau if np.isfinite(qe.tau) else None,
            "expanded_share": float(np.mean(expanded)) if len(expanded) else 0.0}


def exact_relevance(vectors: np.ndarray, labels: list[str], batch: int = 512) -> list[np.ndarray]:
    """Per query, the relevance list of the exhaustive inner-product ranking of the same vectors against each
    other (itself left out), built from the ranks of its class mates alone: a sort of the scores (no argsort,
    no ranking kept) and one binary search per class mate. Equal scores rank a class mate first."""
    codes = np.unique(np.asarray(labels), return_inverse=True)[1].ravel()
    n, out = len(vectors), []
    for i in range(0, n, batch):
        sims = vectors[i:i + batch] @ vectors.T
        rows = np.arange(i, min(i + batch, n))
        sims[rows - i, rows] = -np.inf
        ascending = np.sort(sims, axis=1)
        for r, q in enumerate(rows):
            mates = np.flatnonzero(codes == codes[q])
            mates = mates[mates != q]
            rank = n - np.searchsorted(ascending[r], sims[r, mates], side="right")  # results scoring higher
            rel = np.zeros(n - 1, bool)
            rel[np.minimum(np.sort(rank), n - 2)] = True
            out.append(rel)
    return out


@dataclass
class ClassesResult:
    metrics: dict
    labels: list[str]
    uris: list[str]
    vectors: np.ndarray
    ranked: Ranked
    ap: np.ndarray  # per query, full-ranking AP on the index
    exact_metrics: dict | None = None
    per_class: list[dict] = field(default_factory=list)
    pr_levels: np.ndarray = field(default_factory=lambda: np.linspace(0, 1, 11))
    pr_by_class: dict[str, np.ndarray] = field(default_factory=dict)


def relevance(ranked: Ranked, labels: list[str], label_of: dict[str, str], batch: int = 256) -> list[np.ndarray]:
    """Per query: which results share its label (vectorised: label codes looked up by id, a batch of
    queries' rankings at a time)."""
    code = {lab: c for c, lab in enumerate(sorted(set(labels)))}
    doc_code = np.array([code.get(label_of.get(u), -1) for u in ranked.docs.uris.tolist()], dtype=np.int64)
    out: list[np.ndarray] = []
    for i in range(0, len(ranked.ids), batch):
        rows = ranked.ids[i:i + batch]
        flat = doc_code[ranked.docs.positions(np.concatenate(rows))] if rows else np.zeros(0, np.int64)
        for part, lab in zip(np.split(flat, np.cumsum([len(r) for r in rows])[:-1]), labels[i:i + batch]):
            out.append(part == code[lab])
    return out


def classes_eval(searcher: IndexSearcher, items: list[LabelledImage], depth: int | None = None,
                 progress: Progress | None = None, exact: bool = True,
                 vectors: np.ndarray | None = None, qe: int | None = None,
                 step: Callable[[str], None] = lambda msg: None) -> ClassesResult:
    """Every labelled image queries the index; relevant = same label, the query itself excluded.

    vectors: the images' embeddings when already at hand (else they are embedded here).
    qe: αQE with that many neighbours for every query (0: off; None: gated, as a search is); the exact
    baseline stays plain."""
    uris = [norm_uri(str(it.path)) for it in items]
    labels = [it.label for it in items]
    label_of = dict(zip(uris, labels))
    counts = {lab: labels.count(lab) for lab in set(labels)}
    n_rel = [counts[lab] - 1 for lab in labels]
    if vectors is None:
        vectors = embed_files(searcher, [it.path.read_bytes() for it in items], progress)
    vectors = searcher.to_index_space(vectors)  # as the index holds them: QE and the exact baseline need that
    depth = min(depth or searcher.manifest.count, searcher.manifest.count)
    docs = Docs.of_index(searcher)
    own = docs.ids_of(uris)
    qe_plan = expansion_plan(searcher, qe)
    ex = expand_queries(searcher, vectors, qe_plan, own, docs) if qe_plan else None
    if ex is not None:
        step(f"query expansion (αQE) with {qe_plan.neighbours} neighbours: {int(np.sum(ex.expanded))} of "
             f"{len(vectors)} queries expanded")
    step(f"ranking the index for {len(items)} queries (depth {depth})")
    ranked = rank_index(searcher, vectors if ex is None else ex.queries, depth, own, docs)
    if ex is not None:
        ex.keep_best_first(ranked)  # (mAP reads the order alone: no rescore)
    expanded = np.zeros(0, bool) if ex is None else ex.expanded
    rels = relevance(ranked, labels, label_of)
    ap = per_query_ap(rels, n_rel)
    metrics = (summarise(rels, n_rel, ap) | {"depth": depth, "index_vectors": searcher.manifest.count}
               | expansion_figures(qe_plan, expanded))
    exact_metrics = None
    if exact and len(items) <= EXACT_MAX:
        step("ranking the same embeddings by exact search, for comparison")
        exact_metrics = summarise(exact_relevance(vectors, labels), n_rel)
        metrics["mAP_exact"] = exact_metrics["mAP"]
        metrics["mAP_index_over_exact"] = metrics["mAP"] / exact_metrics["mAP"]
    result = ClassesResult(metrics, labels, uris, vectors, ranked, ap, exact_metrics)
    result.per_class, result.pr_by_class = per_class_figures(rels, n_rel, labels, ranked, label_of,
                                                             result.pr_levels, ap)
    return result


def per_class_figures(rels, n_rel, labels, ranked: Ranked, label_of, levels, ap) -> tuple[list[dict], dict]:
    """Per class: 1-NN classification precision/recall/F1, mean AP, and the mean PR curve."""
    from sklearn.metrics import precision_recall_fscore_support

    firsts = ranked.docs.uris_of(np.array([ids[0] if len(ids) else -1 for ids in ranked.ids], np.int64))
    predicted = [label_of.get(u, "?") for u in firsts.tolist()]
    classes = sorted(set(labels))
    p, r, f, support = precision_recall_fscore_support(labels, predicted, labels=classes, zero_division=0)
    rows, curves = [], {}
    for j, c in enumerate(classes):
        idx = [i for i, lab in enumerate(labels) if lab == c and n_rel[i] > 0]
        aps = ap[idx].tolist()
        curves[c] = (np.mean([m.interpolated_pr(rels[i], n_rel[i], levels) for i in idx], axis=0)
                     if idx else np.zeros(len(levels)))
        rows.append({"class": c, "images": int(support[j]), "precision": float(p[j]), "recall": float(r[j]),
                     "f1": float(f[j]), "AP": float(np.mean(aps)) if aps else float("nan")})
    return rows, curves


@dataclass
class CopyQuery:
    source: str | None  # catalogue uri it is a copy of; None for a distractor
    edits: list[str]
    image: bytes


def make_copy_queries(catalogue: list[Path], distractors: list[Path], seed: int = 0, n_edits: int = 2,
                      skipped: dict[str, str] | None = None) -> list[CopyQuery]:
    """One transformed copy of every catalogue image, and one of every distractor (not in the index).
    A file that is not a readable image is left out, with the reason `imsearch embed` gives in `skipped`."""
    rng, limits = np.random.default_rng(seed), get_settings()
    skipped = {} if skipped is None else skipped
    out = []
    for path, is_copy in [(p, True) for p in catalogue] + [(p, False) for p in distractors]:
        try:  # the checks (and messages) of the embedder
            decode_image(path.read_bytes(), 32, limits.max_image_bytes, limits.max_image_pixels)
        except (ImsearchError, OSError) as e:
            skipped[str(path)] = str(e)
            continue
        img, edits = random_copy(flatten(path), rng, ALL_EDITS, n_edits)
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=90)
        out.append(CopyQuery(norm_uri(str(path)) if is_copy else None, edits, buf.getvalue()))
    return out


@dataclass
class CopyResult:
    metrics: dict
    queries: list[CopyQuery]
    ranked: Ranked
    by_edit: dict[str, float]


SCORE_NORMS = ("none", "margin")


def copydetect_eval(searcher: IndexSearcher, queries: list[CopyQuery], k: int = 10, predictions: int = 1,
                    score_norm: str = "none", progress: Progress | None = None, qe: int | None = None,
                    step: Callable[[str], None] = lambda msg: None) -> CopyResult:
    """μAP over the first `predictions` results of every query pooled by score, recall@1 and @k.

    score_norm "margin" subtracts each query's k-th score (its background level: a distractor's
    scores are flat, a copy's first score stands out), as DISC21's score normalisation does with
    neighbours from a background set."""
    if not any(q.source for q in queries):
        raise InvalidInput("copy detection needs queries that are copies of catalogue images")
    if score_norm not in SCORE_NORMS or not 1 <= predictions <= k:
        raise InvalidInput(f"score normalisation must be one of {SCORE_NORMS} and predictions within 1..{k}")
    vectors = searcher.to_index_space(embed_files(searcher, [q.image for q in queries], progress))
    qe_plan = expansion_plan(searcher, qe)
    ex = expand_queries(searcher, vectors, qe_plan) if qe_plan else None
    expanded = np.zeros(0, bool) if ex is None else ex.expanded
    step(f"ranking the index for {len(queries)} copy queries ({int(np.sum(expanded))} expanded)")
    ranked = rank_index(searcher, vectors if ex is None else ex.queries, k)
    if ex is not None:
        rescore_expanded(searcher, ranked, vectors, expanded)
        ex.keep_best_first(ranked)
    norm = (lambda sc: sc - sc[-1]) if score_norm == "margin" else (lambda sc: sc)
    scores = np.concatenate([norm(sc)[:predictions] for sc in ranked.scores])
    correct = np.concatenate([(r == q.source)[:predictions] for r, q in zip(ranked.uris, queries)])
    copies = [(q, r) for q, r in zip(queries, ranked.uris) if q.source]
    top1 = [len(r) > 0 and r[0] == q.source for q, r in copies]
    by_edit: dict[str, list[bool]] = {}
    for (q, _), ok in zip(copies, top1):
        for e in q.edits:
            by_edit.setdefault(e, []).append(ok)
    metrics = {"queries": len(queries), "copies": len(copies), "distractors": len(queries) - len(copies),
               "uAP": m.micro_ap(scores, correct, len(copies)), "predictions_per_query": predictions,
               "score_norm": score_norm, "recall@1": float(np.mean(top1)),
               f"recall@{k}": float(np.mean([q.source in r for q, r in copies])),
               "index_vectors": searcher.manifest.count} | expansion_figures(qe_plan, expanded)
    if len(expanded):
        metrics["copies_expanded_share"] = float(np.mean([e for e, q in zip(expanded, queries) if q.source]))
    return CopyResult(metrics, queries, ranked, {e: float(np.mean(v)) for e, v in sorted(by_edit.items())})


def read_ground_truth(queries_path: str, gt_path: str) -> tuple[list[tuple[str, str]], dict]:
    """queries: parquet/csv with columns `query` (name) and `uri` (image); ground truth: JSON mapping a
    query name to a list of relevant catalogue uris, or to {"easy": [...], "hard": [...], "junk": [...]}
    (the revisited Oxford/Paris form)."""
    import json

    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    table = pq.read_table(queries_path) if queries_path.endswith(".parquet") else pcsv.read_csv(queries_path)
    missing = {"query", "uri"} - set(table.column_names)
    if missing:
        raise InvalidInput(f"{queries_path} lacks columns {sorted(missing)} (has {table.column_names})")
    try:
        gt = json.loads(Path(gt_path).read_text())
    except (OSError, ValueError) as e:
        raise InvalidInput(f"ground truth {gt_path}: {e}") from None
    queries = list(zip(map(str, table["query"].to_pylist()), table["uri"].to_pylist()))
    unknown = [q for q, _ in queries if q not in gt]
    if unknown:
        raise InvalidInput(f"{len(unknown)} queries have no ground truth entry, e.g. {unknown[:3]}")
    return queries, gt


def labelled_eval(searcher: IndexSearcher, queries: list[tuple[str, bytes]], gt: dict, depth: int | None = None,
                  progress: Progress | None = None) -> dict:
    """Any query set with a ground truth of relevant uris; adds Easy/Medium/Hard mAP for revisited sets."""
    vectors = embed_files(searcher, [img for _, img in queries], progress)
    depth = min(depth or searcher.manifest.count, searcher.manifest.count)
    ranked = rank_index(searcher, vectors, depth)
    revisited = all(isinstance(v, dict) for v in gt.values())
    relevant = [{norm_uri(u) for key in (("easy", "hard") if revisited else (None,))
                 for u in (gt[q].get(key, []) if revisited else gt[q])} for q, _ in queries]
    rels = [np.isin(r, list(rel)) for r, rel in zip(ranked.uris, relevant)]
    metrics = summarise(rels, [len(rel) for rel in relevant]) | {"depth": depth}
    if revisited:
        gnd = [{key: [norm_uri(u) for u in gt[q].get(key, [])] for key in ("easy", "hard", "junk")}
               for q, _ in queries]
        metrics |= {f"mAP_{k}": v for k, v in m.revisited_map(ranked.uris, gnd).items()}
    return metrics
