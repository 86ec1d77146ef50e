"""Change a live index: add embeddings with the trained quantizer it has, delete ids.

Each change writes a new version (the touched shards in full, as `imsearch index build` would) and flips
CURRENT by compare-and-swap; shard servers watching the pointer switch to it without a restart. Adds and
deletes are pure changes: when another writer publishes first, the change is redone on top of the winner
(up to IMSEARCH_WRITE_RETRIES times) and the lost attempt's files are removed, so two concurrent changes
both land instead of one silently undoing the other.

A large add runs on Ray (add_parallel): one task per shard loads it, streams the rows it takes out of the new
embeddings parts (split by shard first past 2 shards, as a build's) and writes it grown, so the driver holds
neither the batch nor the shards; the same rows in the same order as the in-process add, so the same files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from typing import Callable

import numpy as np

from services.common.config import Settings, get_settings
from services.common.errors import Conflict, Incompatible, InvalidInput, NotFound, NotSupported
from services.common.filecache import forget_cached, not_cached
from services.common.rayinit import start_ray
from services.common.store import Store, open_store
from services.embedder.embeddings import Embeddings, read_embeddings, read_meta
from services.index import descriptors, faiss_util, fields
from services.index.layout import BUILDS, version_prefix
from services.index.loaded import open_version
from services.index.manifest import Manifest, ShardEntry
from services.index.merge import merge_topk
from services.index.projection import Projection, from_wire, load_projection, to_wire
from services.index.shards import LoadedShard, Shard, load_quantizer, load_shard, shard_files
from services.index.versions import Pointer, check_new_version, load_current, load_published, read_pointer
from services.index.writer import Step, finish_version, write_shard, write_version
from services.indexer.build import choose_engine
from services.indexer.driver import dedupe
from services.indexer.parallel import ShardRows, Sources, each_result, split_by_shard

log = logging.getLogger(__name__)

# (base manifest, its loaded shards, its projection, new version name) -> (shards to write, manifest template, result)
Change = Callable[[Manifest, list[LoadedShard], Projection | None, str], tuple[list[Shard], Manifest, tuple]]


def change_index(root: str, change: Change, settings: Settings, step: Step, version: str | None = None) -> tuple:
    """Apply `change` to the published version and publish the result; on a lost race, again on the winner."""
    store = open_store(root, settings)

    def attempt(base: Pointer, manifest: Manifest, name: str) -> tuple:
        step(f"loading {len(manifest.shards)} shard(s) of {manifest.version}")
        cache = settings.file_cache()
        fresh = not_cached(cache, shard_files(manifest))
        try:
            loaded = open_version(store, manifest, cache)  # the projection carried over: a version holds all its files
            parts, template, result = change(manifest, loaded.shards, loaded.projection, name)
            return (write_version(store, template, parts, loaded.quantizer, True, step, base, loaded.projection),
                    *result)
        finally:  # downloaded for this change only (loaded whole: the files are not needed once read)
            forget_cached(cache, fresh, set())

    return retried(store, settings, step, version, attempt)


def retried(store: Store, settings: Settings, step: Step, version: str | None,
            attempt: Callable[[Pointer, Manifest, str], tuple]) -> tuple:
    """attempt(base pointer, published manifest, new version name) writes that version and publishes it over
    base; when another writer published first (Conflict), the attempt's files are removed and it is made again
    on top of the winner, up to IMSEARCH_WRITE_RETRIES times. An attempt that fails otherwise leaves no files."""
    for n in range(settings.write_retries + 1):
        base, manifest = load_published(store)
        name = check_new_version(store, version)
        try:
            return attempt(base, manifest, name)
        except Conflict as e:
            _discard(store, name)
            if n == settings.write_retries:
                raise Conflict(f"{e}; gave up after {n + 1} attempts (IMSEARCH_WRITE_RETRIES)") from None
            step(f"{e.winner.describe() if e.winner else 'another version'} was published meanwhile: "
                 "redoing the change on top of it")
        except BaseException:
            _discard_unless_published(store, name)
            raise
    raise AssertionError("unreachable")


def _discard(store: Store, version: str) -> None:
    """The files of a version that lost the race: nothing refers to them."""
    store.delete_prefix(version_prefix(version))


def _discard_unless_published(store: Store, version: str) -> None:
    """After a failed attempt: its files, unless it failed after publishing (then they are served). When the
    pointer cannot be read either, they are left to `index gc`."""
    try:
        pointer = read_pointer(store)
    except Exception:  # noqa: BLE001 - the attempt's own error is the one to raise
        return
    if pointer is None or (pointer.version != version and version not in pointer.history):
        _discard(store, version)


def add_to_index(root: str, emb_url: str, settings: Settings | None = None, step: Step | None = None,
                 version: str | None = None, engine: str = "auto") -> tuple[Manifest, int, int]:
    """Append embeddings to the published index; returns (new manifest, added, already indexed). engine: auto |
    local | ray (each shard grown in a Ray task streaming its rows out of the embeddings parts)."""
    settings = settings or get_settings()
    step = step or (lambda msg: None)
    emb_store = open_store(emb_url, settings)
    meta = read_meta(emb_store)
    current = load_current(open_store(root, settings))
    check_addable(current, meta, emb_url)  # before loading any shard
    name, why = choose_add_engine(engine, int(meta.get("embedded", 0)), current, settings)
    if name == "ray":
        step(f"adding on Ray: {why}")
        return add_parallel(open_store(root, settings), emb_store, meta, settings, step, version)
    emb, _ = dedupe(read_embeddings(emb_store))

    def add(manifest: Manifest, shards: list[LoadedShard], projection: Projection | None, name: str):
        check_addable(manifest, meta, emb_url)
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
            parts.append(s.grown(manifest.fields, emb.ids[rows], [emb.uris[i] for i in rows],
                                 fields.take(columns, rows)))
        added = int(new.sum())
        step(f"adding {added} vectors ({len(emb.ids) - added} already indexed)")
        return parts, added_template(manifest, name, emb_url, added), (added, len(emb.ids) - added)

    return change_index(root, add, settings, step, version)


def choose_add_engine(engine: str, vectors: int, manifest: Manifest, settings: Settings) -> tuple[str, str]:
    """As for a build (choose_engine), with the index's own DBA: its new vectors are augmented with their
    neighbours among every indexed vector, which a task holding one shard does not have."""
    dba = int(manifest.params.get("dba", 0))
    if engine == "ray" and dba:
        raise InvalidInput(f"{manifest.version} was built with database-side augmentation (DBA {dba}): new "
                           "vectors need their neighbours in every shard, so add with --engine local")
    return choose_engine(engine, vectors, settings, dba)


def added_template(manifest: Manifest, name: str, emb_url: str, added: int) -> Manifest:
    return manifest.model_copy(update={"version": name, "source": {
        **manifest.source, "added_from": emb_url, "added": added, "previous": manifest.version}})


def new_columns(manifest: Manifest, emb: Embeddings, emb_url: str, step: Step) -> dict:
    """The index's filterable fields of the added rows (new values of a field are welcome; a value of another
    kind is not). Columns the index does not filter on are said, not indexed."""
    columns, extra = fields.added_columns(manifest.fields, fields.decode(emb.metadata, len(emb.ids)), f"{emb_url}: ")
    say_not_filterable(extra, step)
    return columns


def say_not_filterable(extra: list[str], step: Step) -> None:
    if extra:
        step(f"not filterable in this index (a rebuild with --filterable indexes them): {', '.join(extra)}")


def check_addable(manifest: Manifest, meta: dict, emb_url: str) -> None:
    """The embeddings (their meta) come from the index's model, in its model dimension."""
    model = meta.get("model", {})
    if model.get("fingerprint") != manifest.model.get("fingerprint"):
        raise Incompatible(f"{emb_url} was embedded with {model.get('name')} "
                           f"({model.get('fingerprint')}); the index holds "
                           f"{manifest.model.get('name')} ({manifest.model.get('fingerprint')}) vectors")
    if meta.get("dim") != manifest.model_dim:
        raise Incompatible(f"{emb_url} holds {meta.get('dim')}-d vectors; the index takes "
                           f"{manifest.model_dim}-d model vectors")


# --- index add on Ray: each shard grown in its own task (large batches)


def add_parallel(out: Store, emb_store: Store, meta: dict, settings: Settings, step: Step,
                 version: str | None = None) -> tuple[Manifest, int, int]:
    """Append embeddings to the published index with one Ray task per shard, none holding more than its shard
    and one part (add_to_index's engine for large batches). Published by compare-and-swap, redone on top of
    the winner when another writer publishes first, as every index change is."""
    import ray

    start_ray(settings)
    # The new parts split by shard once (parallel.split_by_shard), staged for this add only: removed after it
    # whatever its end (an abandoned one, by `index gc` with every build staging).
    staging = f"{BUILDS}/add-{hashlib.sha256(json.dumps(meta['parts'], sort_keys=True).encode()).hexdigest()[:16]}"
    split: dict[int, Sources] = {}  # by shard count: a retry on top of a rebuilt index may have another

    def attempt(base: Pointer, manifest: Manifest, name: str) -> tuple:
        projection = load_projection(out, manifest)
        shared = ray.put(to_wire(projection))
        numbers = [e.shard for e in manifest.shards]
        if len(numbers) not in split:
            split[len(numbers)] = split_by_shard(emb_store, meta["parts"], manifest.model_dim, out,
                                                 f"{staging}-{len(numbers)}", len(numbers), numbers, settings, step)
        sources = split[len(numbers)]
        step(f"adding to the {len(manifest.shards)} shard(s) of {manifest.version} in Ray tasks")
        calls = {e.shard: (settings, sources.url, sources.parts[e.shard], manifest, e.shard, shared, out.url, name)
                 for e in manifest.shards}
        grown: dict[int, dict] = {}
        for number, result in each_result(add_shard, calls):
            grown[number] = result
            step(f"shard {number}: {result['added']} added ({len(grown)}/{len(calls)})")
        added, known = sum(r["added"] for r in grown.values()), sum(r["known"] for r in grown.values())
        say_not_filterable(sorted({f for r in grown.values() for f in r["extra"]}), step)
        if not added:
            raise InvalidInput(f"every one of the {known} embeddings in {emb_store.url} is already indexed")
        step(f"adding {added} vectors ({known} already indexed)")
        entries = [ShardEntry(**grown[e.shard]["entry"]) for e in manifest.shards]
        return (finish_version(out, added_template(manifest, name, emb_store.url, added), entries,
                               load_quantizer(out, manifest), True, step, base, projection), added, known)

    try:
        return retried(out, settings, step, version, attempt)
    finally:
        for shards in split:
            out.delete_prefix(f"{staging}-{shards}")


def add_shard(settings: Settings, emb_url: str, parts: list[dict], manifest: Manifest, number: int, shared,
              out_url: str, version: str) -> dict:
    """One shard of the published version grown by the embedded rows it takes (id mod S) that it does not hold,
    in a Ray task: loaded, the rows streamed a part (or a split file) at a time, projected and added, written
    into version."""
    projection = from_wire(shared)
    out = open_store(out_url, settings)
    entry = next(e for e in manifest.shards if e.shard == number)
    cache = settings.file_cache()
    fresh = not_cached(cache, shard_files(manifest, [entry]))
    try:
        shard = load_shard(out, manifest, entry, cache)
    finally:  # loaded whole: the downloaded copy is not needed once read
        forget_cached(cache, fresh, set())
    rows = ShardRows(open_store(emb_url, settings), parts, number, len(manifest.shards), manifest.model_dim, True)
    ids_added: list[np.ndarray] = []
    uris: list[str] = []
    metadata: list = []
    known = 0
    for ids, vectors, part_uris, meta in rows:
        new = np.flatnonzero(~np.isin(ids, shard.ids))
        known += len(ids) - len(new)
        if not len(new):
            continue
        vectors = vectors[new]
        faiss_util.add(shard.index, projection.apply(vectors) if projection is not None else vectors, ids[new])
        ids_added.append(ids[new])
        uris += [part_uris[i] for i in new]
        metadata += [meta[i] for i in new]
    columns, extra = fields.added_columns(manifest.fields, fields.decode(metadata, len(metadata)), f"{emb_url}: ")
    ids = np.concatenate(ids_added) if ids_added else np.zeros(0, np.int64)
    written = write_shard(out, version, shard.grown(manifest.fields, ids, uris, columns), log.info)
    return {"entry": written.model_dump(), "added": len(ids), "known": known, "extra": extra}


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
