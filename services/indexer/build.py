"""Build a sharded index from embeddings: choose params, train once, add_with_ids per shard,
tune nprobe against exact search, write shard files + manifest, publish atomically."""

from __future__ import annotations

import logging

import faiss
import numpy as np

from services.common.config import Settings, get_settings
from services.common.errors import Conflict, InvalidInput
from services.common.store import open_store
from services.embedder.embeddings import Embeddings, read_embeddings
from services.index import descriptors, faiss_util, fields
from services.index.manifest import Manifest
from services.index.merge import merge_topk
from services.index.projection import Projection, check_options, skip_reason
from services.index.projection import train as train_projection
from services.index.shards import Shard
from services.index.versions import check_new_version, read_pointer
from services.index.writer import Step, write_version
from services.indexer.params import PQ_TRAIN_POINTS, IndexParams, choose_params, params_from_factory

log = logging.getLogger(__name__)
TUNE_QUERIES = 256
TUNE_K = 10


def dedupe(emb: Embeddings) -> tuple[Embeddings, int]:
    """Keep the first row of each id (the same image embedded twice in separate runs)."""
    _, first = np.unique(emb.ids, return_index=True)
    if len(first) == len(emb.ids):
        return emb, 0
    first.sort()
    uris = [emb.uris[i] for i in first]
    metadata = None if emb.metadata is None else [emb.metadata[i] for i in first]
    return (Embeddings(emb.meta, emb.ids[first], emb.vectors[first], uris, emb.errors, metadata),
            len(emb.ids) - len(first))


def train_sample(vectors: np.ndarray, params: IndexParams, rng: np.random.Generator) -> np.ndarray:
    """Enough points for k-means (64 per list) and PQ codebooks, never more than needed."""
    want = max(64 * max(params.nlist, 1), PQ_TRAIN_POINTS if params.pq_m else 0, 1000)
    if len(vectors) <= want:
        return vectors
    return vectors[np.sort(rng.choice(len(vectors), want, replace=False))]


def split_shards(trained: faiss.Index, emb: Embeddings, n_shards: int,
                 columns: dict | None = None) -> list[Shard]:
    """Shard = id mod S: deterministic, so later adds land on the same shard as their id. columns: the
    filterable fields of emb's rows, cut the same way."""
    which = emb.ids % n_shards
    shards = []
    for s in range(n_shards):
        rows = np.flatnonzero(which == s)
        index = faiss.deserialize_index(faiss.serialize_index(trained))  # clone_index lacks some transforms
        if len(rows):
            faiss_util.add(index, emb.vectors[rows], emb.ids[rows])
        shards.append(Shard(s, index, emb.ids[rows], [emb.uris[i] for i in rows], fields.take(columns or {}, rows)))
    return shards


def recall_at(shards: list[Shard], queries: np.ndarray, qids: np.ndarray, truth: np.ndarray,
              nprobe: int, k_factor: float) -> float:
    """Mean recall@k of the merged sharded search, not counting each query's own vector."""
    k = truth.shape[1]
    parts = [(s.number, *faiss_util.search(s.index, queries, k + 1, nprobe, k_factor)) for s in shards]
    _, got, _, _ = merge_topk(parts, k + 1)
    hits = 0
    for qid, t, g in zip(qids.tolist(), truth.tolist(), got.tolist()):
        found = [i for i in g if i != qid][:k]
        hits += len(set(t) & set(found))
    return hits / truth.size


def tune_nprobe(shards: list[Shard], emb: Embeddings, params: IndexParams, target: float,
                rng: np.random.Generator) -> tuple[int, dict]:
    """Smallest nprobe whose recall@10 against exact search on a sample reaches target.

    The queries are catalogue vectors; their own (trivially found) entry is left out on both
    sides, so the figure measures finding neighbours, as a fresh query must.
    """
    if len(emb.ids) < 2:
        return 1, {"recall_at_10": 1.0, "queries": len(emb.ids)}
    k = min(TUNE_K, len(emb.ids) - 1)
    rows = rng.choice(len(emb.ids), min(TUNE_QUERIES, len(emb.ids)), replace=False)
    queries, qids = emb.vectors[rows], emb.ids[rows]
    exact = faiss.IndexFlatIP(emb.vectors.shape[1])
    exact.add(emb.vectors)
    _, nn = exact.search(queries, k + 1)
    truth = np.array([[i for i in emb.ids[r].tolist() if i != q][:k] for r, q in zip(nn, qids.tolist())])
    info = {"queries": len(rows), "target": target}
    if params.nlist == 0:
        return 1, {"recall_at_10": round(recall_at(shards, queries, qids, truth, 1, params.k_factor), 4), **info}
    curve, nprobe = {}, 1
    while True:
        curve[nprobe] = round(recall_at(shards, queries, qids, truth, nprobe, params.k_factor), 4)
        if curve[nprobe] >= target or nprobe >= params.nlist:
            break
        nprobe = min(nprobe * 2, params.nlist)
    return nprobe, {"recall_at_10": curve[nprobe], **info, "curve": {str(p): r for p, r in curve.items()}}


def learn_projection(vectors: np.ndarray, pca_dim: int, power: float, step: Step) -> Projection | None:
    """The catalogue's centred PCA (shrinkage-whitened by `power`), or None when there is too little to
    learn it from (said in a step, with why)."""
    check_options(pca_dim, power)
    why = skip_reason(len(vectors), vectors.shape[1], pca_dim)
    if why:
        step(f"projection {why}")
        return None
    whiten = f", whitening power {power:g}" if power else ""
    step(f"learning the projection: centred PCA {vectors.shape[1]} -> {pca_dim} dimensions{whiten}")
    return train_projection(vectors, pca_dim, power)


def choose_dba(n: int, dba: int | None, settings: Settings, step: Step) -> int:
    """Neighbours of database-side augmentation: as asked, else the default where the catalogue allows it."""
    if dba is None:
        dba = settings.dba if n <= settings.dba_max else 0
        if settings.dba and n > settings.dba_max:
            step(f"DBA off: {n} vectors > IMSEARCH_DBA_MAX {settings.dba_max} (--dba N asks for it anyway)")
        dba = dba if n > dba else 0  # a catalogue of a handful of images has no neighbours to speak of
    if dba:
        step(f"DBA: each vector re-weighted with its {dba} nearest neighbours")
    return dba


def build_index(emb_url: str, out_url: str, shards: int = 1, factory: str | None = None,
                nprobe: int | None = None, settings: Settings | None = None, step: Step | None = None,
                version: str | None = None, publish_it: bool = True, dba: int | None = None,
                pca_dim: int | None = None, whiten: float | None = None, filterable: str | None = None) -> Manifest:
    """filterable: metadata fields to filter on (None: IMSEARCH_FILTERABLE; "*" every scalar column; "" none).
    pca_dim / whiten: the learned projection (None: IMSEARCH_PCA_DIM / IMSEARCH_WHITEN_POWER; pca_dim 0:
    none); dba: database-side augmentation with that many neighbours (None: IMSEARCH_DBA up to
    IMSEARCH_DBA_MAX vectors; 0: off). Vectors are indexed projected, then augmented."""
    settings = settings or get_settings()
    step = step or (lambda msg: log.info(msg))
    if not 1 <= shards <= 1024:
        raise InvalidInput(f"--shards must be between 1 and 1024, got {shards}")
    if nprobe is not None and nprobe < 1:
        raise InvalidInput(f"--nprobe must be >= 1, got {nprobe}")
    out = open_store(out_url, settings)
    # The pointer as this build starts: a change published while it runs (a takedown delete) must not be
    # silently undone by publishing this build over it.
    base = read_pointer(out)
    version = check_new_version(out, version)
    emb_store = open_store(emb_url, settings)
    step(f"reading embeddings from {emb_store.url}")
    emb, dropped = dedupe(read_embeddings(emb_store))
    n, dim = emb.vectors.shape
    if n == 0:
        raise InvalidInput(f"{emb_url} has no embedded images ({emb.meta.get('errors', 0)} error rows): "
                           "nothing to index")
    asked = settings.filterable if filterable is None else filterable
    rows = fields.decode(emb.metadata if asked.strip() else None, n)  # no fields asked: no JSON to read
    kinds = fields.choose_fields(rows, asked, step)
    columns = fields.columns_of(rows, kinds)
    del rows
    projection = learn_projection(emb.vectors, settings.pca_dim if pca_dim is None else pca_dim,
                                  settings.whiten_power if whiten is None else whiten, step)
    if projection is not None:
        emb.vectors = projection.apply(emb.vectors)
        dim = projection.out_dim
    dba = choose_dba(n, dba, settings, step)
    if dba:
        emb.vectors = descriptors.dba(emb.vectors, dba)
    params = params_from_factory(factory) if factory else choose_params(
        n, dim, settings.memory_budget_gb * 2**30, settings.flat_max)
    rng = np.random.default_rng(0)
    trained = faiss_util.make_index(dim, params.factory)
    if trained.is_trained:  # exact (Flat) search: nothing to learn
        step(f"{params.factory}: exact search, nothing to train")
    else:
        sample = train_sample(emb.vectors, params, rng)
        step(f"training {params.factory} on {len(sample)} of {n} vectors")
        faiss_util.train(trained, sample)
        del sample
    step(f"adding {n} vectors to {shards} shard(s)")
    parts = split_shards(trained, emb, shards, columns)
    tuned, tuning = tune_nprobe(parts, emb, params, settings.target_recall, rng)
    step(f"nprobe {tuned}: recall@10 {tuning['recall_at_10']:.3f} vs exact search on {tuning['queries']} queries")
    if nprobe is not None:
        tuning["nprobe_tuned"], tuning["nprobe_from"] = tuned, "user"
    nprobe = nprobe or tuned

    learned = {"pca_dim": projection.out_dim, "whiten_power": projection.power} if projection else {}
    template = Manifest(
        version=version, created_at="", model=emb.meta["model"], dim=dim, factory=params.factory,
        params=params.as_dict() | ({"dba": dba} if dba else {}) | learned, nprobe=nprobe, k_factor=params.k_factor,
        count=0, fields=kinds, duplicates_dropped=dropped + int(emb.meta.get("reasons", {}).get("duplicate", 0)),
        tuning=tuning, shards=[],
        source={"embeddings": emb_store.url, "embeddings_created_at": emb.meta.get("created_at"),
                "error_rows": int(emb.errors.num_rows)})
    try:
        return write_version(out, template, parts, faiss_util.ivf_quantizer(trained), publish_it, step, base,
                             projection)
    except Conflict as e:
        raise Conflict(f"{e}; this build is kept staged as {version}: `imsearch index publish {out.url} {version}` "
                       "makes it current anyway, or rebuild") from None
