"""Change a live index: add embeddings with the trained quantizer it has, delete ids.

Each change writes a new version (the touched shards in full, as `imsearch index build` would) and flips
CURRENT by compare-and-swap; shard servers watching the pointer switch to it without a restart. Adds and
deletes are pure changes: when another writer publishes first, the change is redone on top of the winner
(up to IMSEARCH_WRITE_RETRIES times) and the lost attempt's files are removed, so two concurrent changes
both land instead of one silently undoing the other.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

from services.common.config import Settings, get_settings
from services.common.errors import Conflict, Incompatible, InvalidInput, NotFound, NotSupported
from services.common.store import Store, open_store
from services.embedder.embeddings import Embeddings, read_embeddings
from services.index import descriptors, faiss_util, fields
from services.index.layout import version_prefix
from services.index.manifest import Manifest
from services.index.merge import merge_topk
from services.index.projection import Projection, load_projection
from services.index.shards import LoadedShard, Shard, load_shard
from services.index.versions import check_new_version, load_current, load_published
from services.index.writer import Step, write_version
from services.indexer.build import dedupe

# (base manifest, its loaded shards, its projection, new version name) -> (shards to write, manifest template, result)
Change = Callable[[Manifest, list[LoadedShard], Projection | None, str], tuple[list[Shard], Manifest, tuple]]


def change_index(root: str, change: Change, settings: Settings, step: Step, version: str | None = None) -> tuple:
    """Apply `change` to the published version and publish the result; on a lost race, again on the winner."""
    store = open_store(root, settings)
    for attempt in range(settings.write_retries + 1):
        base, manifest = load_published(store)
        name = check_new_version(store, version)
        step(f"loading {len(manifest.shards)} shard(s) of {manifest.version}")
        shards = [load_shard(store, manifest, e, settings.home / "cache") for e in manifest.shards]
        projection = load_projection(store, manifest)  # carried over: every version holds all its files
        parts, template, result = change(manifest, shards, projection, name)
        quantizer = faiss_util.ivf_quantizer(shards[0].index)  # a manifest always has a shard
        try:
            return (write_version(store, template, parts, quantizer, True, step, base, projection), *result)
        except Conflict as e:
            _discard(store, name)
            if attempt == settings.write_retries:
                raise Conflict(f"{e}; gave up after {attempt + 1} attempts (IMSEARCH_WRITE_RETRIES)") from None
            step(f"{e.winner.describe() if e.winner else 'another version'} was published meanwhile: "
                 "redoing the change on top of it")
    raise AssertionError("unreachable")


def _discard(store: Store, version: str) -> None:
    """The files of a version that lost the race: nothing refers to them."""
    store.delete_prefix(version_prefix(version))


def add_to_index(root: str, emb_url: str, settings: Settings | None = None, step: Step | None = None,
                 version: str | None = None) -> tuple[Manifest, int, int]:
    """Append embeddings to the published index; returns (new manifest, added, already indexed)."""
    settings = settings or get_settings()
    step = step or (lambda msg: None)
    emb, _ = dedupe(read_embeddings(open_store(emb_url, settings)))
    check_addable(load_current(open_store(root, settings)), emb, emb_url)  # before loading any shard

    def add(manifest: Manifest, shards: list[LoadedShard], projection: Projection | None, name: str):
        check_addable(manifest, emb, emb_url)
        held = np.concatenate([s.ids for s in shards]) if shards else np.zeros(0, np.int64)
        new = ~np.isin(emb.ids, held)
        if not new.any():
            raise InvalidInput(f"every one of the {len(emb.ids)} embeddings in {emb_url} is already indexed")
        columns = new_columns(manifest, emb, emb_url, step)
        vectors = index_vectors(emb.vectors, new, manifest, shards, projection, step)
        parts = []
        for s in shards:  # shard = id mod S, as at build time
            rows = np.flatnonzero(new & (emb.ids % len(shards) == s.entry.shard))
            if len(rows):
                faiss_util.add(s.index, vectors[rows], emb.ids[rows])
            parts.append(Shard(s.entry.shard, s.index, np.concatenate([s.ids, emb.ids[rows]]),
                               [*s.uris.tolist(), *(emb.uris[i] for i in rows)],
                               fields.concat(manifest.fields, s.columns, fields.take(columns, rows))))
        added = int(new.sum())
        step(f"adding {added} vectors ({len(emb.ids) - added} already indexed)")
        template = manifest.model_copy(update={"version": name, "source": {
            **manifest.source, "added_from": emb_url, "added": added, "previous": manifest.version}})
        return parts, template, (added, len(emb.ids) - added)

    return change_index(root, add, settings, step, version)


def new_columns(manifest: Manifest, emb: Embeddings, emb_url: str, step: Step) -> dict:
    """The index's filterable fields of the added rows (new values of a field are welcome; a value of another
    kind is not). Columns the index does not filter on are said, not indexed."""
    rows = fields.decode(emb.metadata, len(emb.ids))
    extra = sorted({k for r in rows for k in r if k not in manifest.fields and k not in fields.RESERVED})
    if extra:
        step(f"not filterable in this index (a rebuild with --filterable indexes them): {', '.join(extra)}")
    return fields.columns_of(rows, manifest.fields, f"{emb_url}: ")


def check_addable(manifest: Manifest, emb: Embeddings, emb_url: str) -> None:
    if emb.meta["model"].get("fingerprint") != manifest.model.get("fingerprint"):
        raise Incompatible(f"{emb_url} was embedded with {emb.meta['model'].get('name')} "
                           f"({emb.meta['model'].get('fingerprint')}); the index holds "
                           f"{manifest.model.get('name')} ({manifest.model.get('fingerprint')}) vectors")
    if emb.vectors.shape[1] != manifest.model_dim:
        raise Incompatible(f"{emb_url} holds {emb.vectors.shape[1]}-d vectors; the index takes "
                           f"{manifest.model_dim}-d model vectors")


def index_vectors(vectors: np.ndarray, new: np.ndarray, manifest: Manifest, shards: list[LoadedShard],
                  projection: Projection | None, step: Step) -> np.ndarray:
    """Model vectors made as the indexed ones were: projected, then (rows `new` only) augmented with their
    neighbours when the index was built with DBA."""
    if projection is not None:
        vectors = projection.apply(vectors)
    n = int(manifest.params.get("dba", 0))
    if n and new.any():
        step(f"DBA: each new vector re-weighted with its {n} nearest indexed or new neighbours "
             "(indexed vectors keep theirs until a rebuild)")
        vectors = vectors.copy()
        vectors[new] = descriptors.dba_new(vectors[new], n, functools.partial(nearest_stored, shards, manifest))
    return vectors


def nearest_stored(shards: list[LoadedShard], manifest: Manifest, queries: np.ndarray,
                   n: int) -> tuple[np.ndarray, np.ndarray]:
    """(sims (m, n), stored vectors (m, n, d)) of each query's n nearest indexed vectors, over every shard."""
    parts = [(s.entry.shard, *faiss_util.search(s.index, queries, n, manifest.nprobe, manifest.k_factor))
             for s in shards]
    D, I, S, _ = merge_topk(parts, n)
    stored = np.zeros((*I.shape, queries.shape[1]), np.float32)
    for s in shards:
        s.enable_fetch()
        mine = (S == s.entry.shard) & (I >= 0)
        for (r, c), v in zip(np.argwhere(mine), s.fetch(I[mine].tolist())):
            stored[r, c] = v
    return np.where(I >= 0, D, -np.inf).astype(np.float32), stored


def delete_from_index(root: str, ids: list[int], settings: Settings | None = None, step: Step | None = None,
                      version: str | None = None) -> tuple[Manifest, int, list[int]]:
    """Remove ids from the published index; returns (new manifest, removed, ids it did not hold)."""
    settings = settings or get_settings()
    step = step or (lambda msg: None)
    if not ids:
        raise InvalidInput("no ids to delete")
    wanted = np.unique(np.asarray(ids, np.int64))

    def delete(manifest: Manifest, shards: list[LoadedShard], projection: Projection | None, name: str):
        held = np.concatenate([s.ids for s in shards]) if shards else np.zeros(0, np.int64)
        unknown = wanted[~np.isin(wanted, held)].tolist()
        if len(unknown) == len(wanted):
            raise NotFound(f"none of the {len(wanted)} id(s) is in the index, e.g. {unknown[:3]}")
        parts, removed = [], 0
        for s in shards:
            drop = np.isin(s.ids, wanted)
            index = s.index
            if drop.any():
                try:
                    index, n = faiss_util.remove_ids(s.index, s.ids[drop])
                except RuntimeError as e:
                    raise NotSupported(f"{manifest.factory} shards cannot delete ids "
                                       f"({str(e).splitlines()[-1]}); rebuild without them") from None
                removed += n
            parts.append(Shard(s.entry.shard, index, s.ids[~drop], s.uris[~drop].tolist(),
                               fields.take(s.columns, np.flatnonzero(~drop))))
        step(f"removed {removed} vectors ({len(unknown)} id(s) not found)")
        template = manifest.model_copy(update={"version": name, "source": {
            **manifest.source, "deleted": removed, "previous": manifest.version}})
        return parts, template, (removed, unknown)

    return change_index(root, delete, settings, step, version)
