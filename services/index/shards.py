"""Shard files: one faiss index per shard (plus its docs), saved and loaded with their checksums, and the
coarse quantizer plain-IVF shards share."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from services.common.checksums import verified_bytes
from services.common.errors import Corrupt, Incompatible, NotSupported
from services.common.filecache import verified_file
from services.common.store import Store
from services.index import faiss_util, fields
from services.index.docs import read_docs
from services.index.layout import version_key
from services.index.manifest import Manifest, ShardEntry


@dataclass
class Shard:
    """A shard to write: its faiss index and the ids and uris it holds."""
    number: int
    index: faiss.Index
    ids: np.ndarray
    uris: list[str]
    columns: dict = field(default_factory=dict)  # filterable fields: name -> filters.Column, aligned with ids


_FETCH_SETUP = threading.Lock()  # one lock for all shards: shards of a stack share its direct map


@dataclass
class LoadedShard:
    entry: ShardEntry
    index: object  # faiss.Index
    ids: np.ndarray  # sorted int64
    uris: np.ndarray  # object, aligned with ids
    columns: dict = field(default_factory=dict)  # filterable fields: name -> filters.Column, aligned with ids
    home: object = None  # the stacked index its vectors were moved into (stacked.py), else None: its own
    home_ids: np.ndarray | None = None  # the stack's sorted ids: its lists hold positions among them, not ids
    _params: dict = field(default_factory=dict)
    _order: np.ndarray | None = None  # IDMap position of each id in _sorted_ids (enable_fetch)
    _sorted_ids: np.ndarray | None = None
    _fetch_ready: bool = False

    def params(self, nprobe: int, k_factor: float):
        return cached_params(self._params, self.index, nprobe, k_factor)

    def grown(self, kinds: dict[str, str], ids: np.ndarray, uris: list[str], columns: dict) -> Shard:
        """This shard to write again with rows appended (their vectors already added to its index)."""
        return Shard(self.entry.shard, self.index, np.concatenate([self.ids, ids]), [*self.uris.tolist(), *uris],
                     fields.concat(kinds, self.columns, columns))

    def enable_fetch(self) -> None:
        """Prepare id -> stored vector lookups (before serving: it changes the index). Concurrent first calls
        (filtered searches on several threads) wait for the one preparing; the flag is set once all is ready."""
        if self._fetch_ready:
            return
        with _FETCH_SETUP:
            if self._fetch_ready:
                return
            ix = faiss.downcast_index(self.index)
            if isinstance(ix, faiss.IndexIDMap):
                id_map = faiss.vector_to_array(ix.id_map)
                self._order = np.argsort(id_map)
                self._sorted_ids = id_map[self._order]
            elif isinstance(ix, faiss.IndexIVF):
                holder = faiss.downcast_index(self.home) if self.home is not None else ix
                if holder.direct_map.type != faiss.DirectMap.Hashtable:  # a stack's map serves all its shards
                    holder.set_direct_map_type(faiss.DirectMap.Hashtable)
            self._fetch_ready = True

    def fetch(self, ids: list[int]) -> list[np.ndarray | None]:
        """Stored vectors of ids (None where this shard does not hold the id)."""
        ix = faiss.downcast_index(self.index)
        inner = faiss.downcast_index(ix.index) if isinstance(ix, faiss.IndexIDMap) else ix
        if isinstance(inner, faiss.IndexPreTransform):
            # Whitening + L2 normalisation cannot be inverted: the query vector is lost.
            raise NotSupported("search by id is not available for indexes with in-index whitening")
        out: list[np.ndarray | None] = []
        for id_ in ids:
            if isinstance(ix, faiss.IndexIDMap):
                j = int(np.searchsorted(self._sorted_ids, id_))
                hit = j < len(self._sorted_ids) and self._sorted_ids[j] == id_
                out.append(ix.index.reconstruct(int(self._order[j])) if hit else None)
            elif self.home is not None:  # the stack holds every shard's vectors: only this shard's are ours
                j = int(np.searchsorted(self.ids, id_))
                held = j < len(self.ids) and self.ids[j] == id_
                key = int(self._home_keys(np.array([id_]))[0])
                out.append(faiss.downcast_index(self.home).reconstruct(key) if held else None)
            else:
                try:
                    out.append(ix.reconstruct(int(id_)))
                except RuntimeError:  # faiss: "key not found"
                    out.append(None)
        return out

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors (as the index holds them) of ids this shard holds, read in one batch."""
        self.enable_fetch()
        ix = faiss.downcast_index(self.index)
        if isinstance(ix, faiss.IndexIDMap):
            return ix.index.reconstruct_batch(self._order[np.searchsorted(self._sorted_ids, ids)])
        if self.home is not None:
            return faiss.downcast_index(self.home).reconstruct_batch(self._home_keys(ids))
        return ix.reconstruct_batch(ids)  # IVF: through the hashtable direct map (ids are not 0..n-1)

    def _home_keys(self, ids: np.ndarray) -> np.ndarray:
        """What the stack's lists hold for these ids: their positions among its ids when renumbered."""
        return ids if self.home_ids is None else np.searchsorted(self.home_ids, ids)

    def uris_of(self, ids: np.ndarray) -> np.ndarray:
        """Uris of ids held by this shard ("" for ids it does not hold), same shape as ids."""
        if not len(self.ids):
            return np.full(ids.shape, "", dtype=object)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return np.where(self.ids[pos] == ids, self.uris[pos], "")


def cached_params(cache: dict, index: faiss.Index, nprobe: int, k_factor: float):
    """Search parameters of index, built once per (nprobe, k_factor) into cache: read-only, so threads share
    them."""
    key = (nprobe, k_factor)
    if key not in cache:
        # setdefault is atomic: racing threads all use the one stored copy, whose nested
        # params stay alive with it (faiss holds raw pointers to them).
        cache.setdefault(key, faiss_util.search_parameters(index, nprobe, k_factor))
    return cache[key][0]


def shard_files(manifest: Manifest, entries: list[ShardEntry] | None = None) -> list[tuple[str, str]]:
    """(key, sha256) of a version's shard files (or of these entries'): the large files readers cache locally."""
    entries = manifest.shards if entries is None else entries
    return [(version_key(manifest.version, e.file), e.sha256) for e in entries]


def load_shard(store: Store, manifest: Manifest, entry: ShardEntry, cache: Path, mmap: bool = False,
               serving: bool = False) -> LoadedShard:
    """One shard of a version with its docs, every file checksum-verified (S3 files cached locally).
    Serving a version that re-ranks from disk maps the full vectors (read-only: an update loads them)."""
    path = verified_file(store, version_key(manifest.version, entry.file), entry.sha256, cache, entry.bytes)
    index = faiss_util.read_index(str(path), mmap, map_refine=serving and manifest.reranks_from_disk)
    if index.d != manifest.dim:
        raise Incompatible(f"shard {entry.shard} has dim {index.d}, manifest says {manifest.dim}")
    if index.ntotal != entry.count:
        raise Corrupt(f"shard {entry.shard} holds {index.ntotal} vectors, manifest says {entry.count}")
    return LoadedShard(entry, index, *read_docs(store, manifest, entry))


def load_quantizer(store: Store, manifest: Manifest) -> faiss.Index | None:
    """The coarse quantizer a plain-IVF version stores for routers (None when it has none)."""
    if manifest.quantizer is None:
        return None
    blob = verified_bytes(store, version_key(manifest.version, manifest.quantizer.file), manifest.quantizer.sha256)
    return faiss.deserialize_index(np.frombuffer(blob, np.uint8))


def shared_quantizer(indexes: list) -> object | None:
    """The common coarse quantizer of plain IVF shards trained together, else None."""
    ivfs = [faiss.downcast_index(ix) for ix in indexes]
    if not ivfs or not all(isinstance(ix, faiss.IndexIVF) for ix in ivfs):
        return None
    first = ivfs[0].quantizer
    centroids = first.reconstruct_n(0, first.ntotal)
    for ix in ivfs[1:]:
        q = ix.quantizer
        if q.ntotal != first.ntotal or not np.array_equal(q.reconstruct_n(0, q.ntotal), centroids):
            return None
    return first
