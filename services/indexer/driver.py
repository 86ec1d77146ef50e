"""What the driver of an index build decides and writes, whichever engine builds the shards (build.py in this
process, parallel.py in Ray tasks): the options, the rows kept (the first of each id), the index parameters,
the learned projection, the new version's manifest template with its tuned nprobe, and publishing it. Both
engines import it, so both make the same version from the same embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from services.common.config import Settings
from services.common.errors import Conflict, InvalidInput
from services.common.store import Store
from services.embedder import gatesample
from services.embedder.embeddings import Embeddings
from services.index import gate
from services.index.manifest import Manifest
from services.index.projection import Projection, check_options, skip_reason
from services.index.projection import train as train_projection
from services.index.writer import Step
from services.indexer.params import IndexParams, choose_params, params_from_factory
from services.indexer.stages import Probe, projection_rows, tune


@dataclass(frozen=True)
class BuildOptions:
    shards: int
    factory: str | None
    nprobe: int | None
    version: str | None
    publish_it: bool
    pca_dim: int | None
    whiten: float | None
    filterable: str | None

    def asked_fields(self, settings: Settings) -> str:
        return settings.filterable if self.filterable is None else self.filterable

    def projection_options(self, settings: Settings) -> tuple[int, float]:
        return (settings.pca_dim if self.pca_dim is None else self.pca_dim,
                settings.whiten_power if self.whiten is None else self.whiten)



def dedupe(emb: Embeddings) -> tuple[Embeddings, int]:
    """Keep the first row of each id (the same image embedded twice in separate runs)."""
    kept, _ = first_rows(emb.ids)
    if len(kept) == len(emb.ids):
        return emb, 0
    return subset(emb, kept), len(emb.ids) - len(kept)


def first_rows(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows that keep their id: the first of each, in catalogue order; for every row, the position among
    those of the row that keeps its id)."""
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(first), np.int64)
    rank[order] = np.arange(len(first))
    return first[order], rank[inverse.reshape(-1)]


def subset(emb: Embeddings, rows: np.ndarray) -> Embeddings:
    metadata = None if emb.metadata is None else [emb.metadata[i] for i in rows]
    return Embeddings(emb.meta, emb.ids[rows], emb.vectors[rows], [emb.uris[i] for i in rows], emb.errors, metadata)


def learn_projection(n: int, dim: int, read: Callable[[np.ndarray], np.ndarray], pca_dim: int, power: float,
                     step: Step) -> Projection | None:
    """The catalogue's centred PCA (shrinkage-whitened by `power`) learned from the vectors `read` gives for the
    rows of stages.projection_rows(n), or None when there is too little to learn it from (said in a step, with
    why; nothing is read then)."""
    check_options(pca_dim, power)
    rows = projection_rows(n)
    why = skip_reason(len(rows), dim, pca_dim)
    if why:
        step(f"projection {why}")
        return None
    whiten = f", whitening power {power:g}" if power else ""
    step(f"learning the projection: centred PCA {dim} -> {pca_dim} dimensions{whiten}")
    return train_projection(read(rows), pca_dim, power)



def learn_gate(emb_store: Store, projection: Projection | None, trained, model: str,
               step: Step) -> gate.QeGate | None:
    """The query-expansion gate of the new version, from the sample of synthetic copies `imsearch embed` made
    beside the embeddings (gatesample.py), projected as the index's vectors are and the originals coded as the
    trained index codes them; None (said) without one."""
    sample = gatesample.read(emb_store)
    if sample is None or sample.model != model:
        step("query expansion: no gate sample beside these embeddings (made by `imsearch embed` since it learns "
             "one; IMSEARCH_QE_GATE_SAMPLE=0 makes none): searches expand only when IMSEARCH_QE_GATE or a "
             "request's qe asks")
        return None
    space = projection.apply if projection is not None else (lambda v: v)
    learned = gate.learn(gate.as_indexed(trained, space(sample.originals)), space(sample.copies))
    if learned is None:
        step(f"query expansion: {len(sample.copies)} synthetic copies are too few to learn a gate from "
             f"(at least {gate.MIN_COPIES}): searches expand only when IMSEARCH_QE_GATE or a request's qe asks")
        return None
    step(f"query expansion gate: τ {learned.tau:.3f}, below the scores of {1 - learned.quantile:.0%} of "
         f"{learned.copies} synthetic copies with their originals: a search whose best hit scores below it expands")
    return learned


def check_not_empty(n: int, meta: dict, url: str) -> None:
    if n == 0:
        raise InvalidInput(f"{url} has no embedded images ({meta.get('errors', 0)} error rows): nothing to index")


def choose_index_params(n: int, dim: int, factory: str | None, settings: Settings) -> IndexParams:
    return params_from_factory(factory) if factory else choose_params(
        n, dim, settings.memory_budget_gb * 2**30, settings.flat_max, settings.disk_rerank)


def version_template(version: str, meta: dict, emb_url: str, dim: int, params: IndexParams, o: BuildOptions,
                     dba: int, projection: Projection | None, kinds: dict, dropped: int, probes: list[Probe],
                     qids: np.ndarray, count: int, settings: Settings, step: Step,
                     qe_gate: gate.QeGate | None = None) -> Manifest:
    """The new version's manifest before its files are written: parameters, tuned nprobe, where it came from."""
    tuned, tuning = tune(probes, qids, count, params, settings.target_recall)
    step(f"nprobe {tuned}: recall@10 {tuning['recall_at_10']:.3f} vs exact search on {tuning['queries']} queries")
    if tuning["recall_at_10"] < settings.target_recall:
        step(f"warning: recall@10 stays below IMSEARCH_TARGET_RECALL {settings.target_recall} at every nprobe: "
             f"{params.factory}'s codes are too coarse for this catalogue; a larger IMSEARCH_MEMORY_BUDGET_GB "
             "(PQ re-ranked from SQ8 codes), --pca to fewer dimensions, or another --index-factory")
    if o.nprobe is not None:
        tuning["nprobe_tuned"], tuning["nprobe_from"] = tuned, "user"
    learned = {"pca_dim": projection.out_dim, "whiten_power": projection.power} if projection else {}
    return Manifest(
        version=version, created_at="", model=meta["model"], dim=dim, factory=params.factory,
        params=params.as_dict() | ({"dba": dba} if dba else {}) | learned, nprobe=o.nprobe or tuned,
        k_factor=params.k_factor, count=0, fields=kinds, qe_gate=qe_gate,
        duplicates_dropped=dropped + int(meta.get("reasons", {}).get("duplicate", 0)), tuning=tuning, shards=[],
        source={"embeddings": emb_url, "embeddings_created_at": meta.get("created_at"),
                "error_rows": int(meta.get("errors", 0))})


def publish_build(write: Callable[[], Manifest], out: Store, version: str) -> Manifest:
    try:
        return write()
    except Conflict as e:
        raise Conflict(f"{e}; this build is kept staged as {version}: `imsearch index publish {out.url} {version}` "
                       "makes it current anyway, or rebuild") from None
