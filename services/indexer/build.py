"""Build a sharded index from embeddings: choose params, train once, add_with_ids per shard,
tune nprobe against exact search, write shard files + manifest, publish atomically."""

from __future__ import annotations

import logging

import faiss
import numpy as np

from services.common.config import Settings, get_settings
from services.common.errors import InvalidInput
from services.common.store import Store, open_store
from services.embedder.embeddings import Embeddings, read_embeddings, read_meta
from services.index import descriptors, faiss_util, fields
from services.index.manifest import Manifest
from services.index.shards import Shard
from services.index.versions import check_new_version, read_pointer
from services.index.writer import Step, write_version
from services.indexer.driver import (
    BuildOptions,
    check_not_empty,
    choose_index_params,
    first_rows,
    learn_gate,
    learn_projection,
    publish_build,
    subset,
    version_template,
)
from services.indexer.parallel import build_key, build_parallel
from services.indexer.params import IndexParams
from services.indexer.stages import Probe, ShardBuilder, plan_rows

log = logging.getLogger(__name__)


def split_shards(trained: faiss.Index, emb: Embeddings, n_shards: int, columns: dict, queries: np.ndarray,
                 params: IndexParams) -> tuple[list[Shard], list[Probe]]:
    """Shard = id mod S: deterministic, so later adds land on the same shard as their id. columns: the
    filterable fields of emb's rows, cut the same way. With each shard, its answers to the tuning queries."""
    which = emb.ids % n_shards
    shards, probes = [], []
    for s in range(n_shards):
        rows = np.flatnonzero(which == s)
        builder = ShardBuilder(s, trained, queries, params)
        builder.add(emb.ids[rows], emb.vectors[rows], [emb.uris[i] for i in rows])
        shard, probe = builder.finish(fields.take(columns, rows))
        shards.append(shard)
        probes.append(probe)
    return shards, probes


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


ENGINES = ("auto", "local", "ray")


def choose_engine(engine: str, vectors: int, settings: Settings, dba: int | None) -> tuple[str, str]:
    """(local | ray, why): Ray when asked, when a Ray cluster is configured, or past IMSEARCH_INDEX_RAY_MIN_VECTORS
    (unless database-side augmentation is asked for: it needs every vector in one process)."""
    if engine not in ENGINES:
        raise InvalidInput(f"--engine must be auto, local or ray, not {engine!r}")
    if engine == "ray" and dba:
        raise InvalidInput("--dba needs every vector in one process: build with --engine local, or --dba 0")
    if engine != "auto":
        return engine, "as asked (--engine)"
    if dba:
        return "local", "database-side augmentation needs every vector in one process"
    if settings.ray_address:
        return "ray", f"the Ray cluster at {settings.ray_address}"
    if vectors >= settings.index_ray_min_vectors:
        return "ray", f"{vectors} vectors >= IMSEARCH_INDEX_RAY_MIN_VECTORS ({settings.index_ray_min_vectors})"
    return "local", f"{vectors} vectors < IMSEARCH_INDEX_RAY_MIN_VECTORS ({settings.index_ray_min_vectors})"


def check_build_options(shards: int, nprobe: int | None) -> None:
    if not 1 <= shards <= 1024:
        raise InvalidInput(f"--shards must be between 1 and 1024, got {shards}")
    if nprobe is not None and nprobe < 1:
        raise InvalidInput(f"--nprobe must be >= 1, got {nprobe}")


def build_index(emb_url: str, out_url: str, shards: int = 1, factory: str | None = None,
                nprobe: int | None = None, settings: Settings | None = None, step: Step | None = None,
                version: str | None = None, publish_it: bool = True, dba: int | None = None,
                pca_dim: int | None = None, whiten: float | None = None, filterable: str | None = None,
                engine: str = "auto") -> Manifest:
    """filterable: metadata fields to filter on (None: IMSEARCH_FILTERABLE; "*" every scalar column; "" none).
    pca_dim / whiten: the learned projection (None: IMSEARCH_PCA_DIM / IMSEARCH_WHITEN_POWER; pca_dim 0:
    none); dba: database-side augmentation with that many neighbours (None: IMSEARCH_DBA up to
    IMSEARCH_DBA_MAX vectors; 0: off). Vectors are indexed projected, then augmented. engine: auto | local |
    ray (shards built in parallel Ray tasks that stream their rows; a rerun of a killed build resumes)."""
    settings = settings or get_settings()
    step = step or (lambda msg: log.info(msg))
    check_build_options(shards, nprobe)
    emb_store = open_store(emb_url, settings)
    meta = read_meta(emb_store)
    name, why = choose_engine(engine, int(meta.get("embedded", 0)), settings, dba)
    options = BuildOptions(shards, factory, nprobe, version, publish_it, pca_dim, whiten, filterable)
    if name == "ray":
        step(f"building on Ray: {why}")
        return build_parallel(emb_store, meta, open_store(out_url, settings), options, settings, step)
    return _build_local(emb_store, open_store(out_url, settings), options, dba, settings, step)


def _build_local(emb_store: Store, out: Store, o: BuildOptions, dba: int | None, settings: Settings,
                 step: Step) -> Manifest:
    """Every vector in this process: read, projected, augmented, split into shards, written."""
    # The pointer as this build starts: a change published while it runs (a takedown delete) must not be
    # silently undone by publishing this build over it.
    base = read_pointer(out)
    version = check_new_version(out, o.version, build_key(read_meta(emb_store), o, settings))
    step(f"reading embeddings from {emb_store.url}")
    raw = read_embeddings(emb_store)
    n = len(raw.ids)
    check_not_empty(n, raw.meta, emb_store.url)
    asked = o.asked_fields(settings)
    rows = fields.decode(raw.metadata if asked.strip() else None, n)  # no fields asked: no JSON to read
    kinds = fields.choose_fields(rows, asked, step)
    kept, to_kept = first_rows(raw.ids)
    columns = fields.columns_of([rows[i] for i in kept], kinds) if kinds else {}
    del rows
    emb = subset(raw, kept) if len(kept) < n else raw
    projection = learn_projection(n, raw.vectors.shape[1], lambda rows: raw.vectors[rows],
                                  *o.projection_options(settings), step)
    dim = emb.vectors.shape[1]
    if projection is not None:
        emb.vectors = projection.apply(emb.vectors)
        dim = projection.out_dim
    dba = choose_dba(n, dba, settings, step)
    if dba:
        emb.vectors = descriptors.dba(emb.vectors, dba)
    params = choose_index_params(n, dim, o.factory, settings)
    trained = faiss_util.make_index(dim, params.factory)
    sample, queries = plan_rows(n, params, not trained.is_trained)
    train_index(trained, params, emb.vectors[to_kept[sample]] if sample is not None else None, n, step)
    queries = to_kept[queries]
    step(f"adding {len(emb.ids)} vectors to {o.shards} shard(s)")
    parts, probes = split_shards(trained, emb, o.shards, columns, emb.vectors[queries], params)
    template = version_template(version, emb.meta, emb_store.url, dim, params, o, dba, projection, kinds,
                                n - len(emb.ids), probes, emb.ids[queries], len(emb.ids), settings, step,
                                learn_gate(emb_store, projection, trained, emb.meta["model"]["fingerprint"], step))
    return publish_build(lambda: write_version(out, template, parts, faiss_util.ivf_quantizer(trained), o.publish_it,
                                               step, base, projection), out, version)


def train_index(trained: faiss.Index, params: IndexParams, sample: np.ndarray | None, n: int, step: Step) -> None:
    if sample is None:  # exact (Flat) search: nothing to learn
        step(f"{params.factory}: exact search, nothing to train")
        return
    step(f"training {params.factory} on {len(sample)} of {n} vectors")
    faiss_util.train(trained, sample)
