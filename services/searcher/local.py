"""In-process search over every shard of a published index (no servers needed)."""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq

from services.common import faiss_util
from services.common.checksums import file_sha256, sha256_bytes
from services.common.config import Settings, get_settings
from services.common.errors import Corrupt, Incompatible, InvalidInput, NotFound, NotSupported
from services.common.hits import Hit
from services.common.images import decode_image
from services.common.store import TMP_PREFIX, Store, open_store
from services.indexer.manifest import Manifest, ShardEntry, load_current, version_prefix
from services.searcher.merge import hit_lists, merge_topk


@dataclass
class LoadedShard:
    entry: ShardEntry
    index: object  # faiss.Index
    ids: np.ndarray  # sorted int64
    uris: np.ndarray  # object, aligned with ids
    _params: dict = field(default_factory=dict)
    _order: np.ndarray | None = None  # IDMap position of each id in _sorted_ids (enable_fetch)
    _sorted_ids: np.ndarray | None = None
    _fetch_ready: bool = False

    def params(self, nprobe: int, k_factor: float):
        """Search parameters, built once per (nprobe, k_factor): read-only, so threads share them."""
        key = (nprobe, k_factor)
        if key not in self._params:
            # setdefault is atomic: racing threads all use the one stored copy, whose nested
            # params stay alive with it (faiss holds raw pointers to them).
            self._params.setdefault(key, faiss_util.search_parameters(self.index, nprobe, k_factor))
        return self._params[key][0]

    def enable_fetch(self) -> None:
        """Prepare id -> stored vector lookups (call before serving: it changes the index)."""
        if self._fetch_ready:
            return
        self._fetch_ready = True
        ix = faiss.downcast_index(self.index)
        if isinstance(ix, faiss.IndexIDMap):
            id_map = faiss.vector_to_array(ix.id_map)
            self._order = np.argsort(id_map)
            self._sorted_ids = id_map[self._order]
        elif isinstance(ix, faiss.IndexIVF):
            ix.set_direct_map_type(faiss.DirectMap.Hashtable)

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
            else:
                try:
                    out.append(ix.reconstruct(int(id_)))
                except RuntimeError:  # faiss: "key not found"
                    out.append(None)
        return out

    def uris_of(self, ids: np.ndarray) -> np.ndarray:
        """Uris of ids held by this shard ("" for ids it does not hold), same shape as ids."""
        if not len(self.ids):
            return np.full(ids.shape, "", dtype=object)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return np.where(self.ids[pos] == ids, self.uris[pos], "")


def _shard_file(store: Store, key: str, sha: str, cache: Path) -> Path:
    """A local, checksum-verified path of a stored file (downloaded into the cache for S3)."""
    local = store.local_path(key)
    if local is None:  # S3: download once into a cache named by the checksum
        local = cache / f"{sha}{Path(key).suffix}"
        if local.is_file() and file_sha256(local) == sha:
            return local
        local.parent.mkdir(parents=True, exist_ok=True)
        part = local.with_name(f"{TMP_PREFIX}{local.name}")
        store.get_file(key, part)  # streamed to disk: shards can be larger than RAM
        os.replace(part, local)
    if not local.is_file():
        raise Corrupt(f"shard file missing: {store.uri(key)}")
    if file_sha256(local) != sha:
        raise Corrupt(f"shard file {store.uri(key)}: checksum mismatch (damaged or replaced)")
    return local


def load_shard(store: Store, manifest: Manifest, entry: ShardEntry, cache: Path, mmap: bool = False) -> LoadedShard:
    prefix = version_prefix(manifest.version)
    path = _shard_file(store, f"{prefix}/{entry.file}", entry.sha256, cache)
    index = faiss_util.read_index(str(path), mmap)
    if index.d != manifest.dim:
        raise Incompatible(f"shard {entry.shard} has dim {index.d}, manifest says {manifest.dim}")
    if index.ntotal != entry.count:
        raise Corrupt(f"shard {entry.shard} holds {index.ntotal} vectors, manifest says {entry.count}")
    return LoadedShard(entry, index, *read_docs(store, manifest, entry))


def read_docs(store: Store, manifest: Manifest, entry: ShardEntry) -> tuple[np.ndarray, np.ndarray]:
    """A shard's (ids sorted, their uris), checksum verified."""
    docs_key = f"{version_prefix(manifest.version)}/{entry.docs_file}"
    data = store.get_bytes(docs_key)
    if sha256_bytes(data) != entry.docs_sha256:
        raise Corrupt(f"{store.uri(docs_key)}: checksum mismatch")
    docs = pq.read_table(io.BytesIO(data))
    ids = docs["id"].to_numpy()
    order = np.argsort(ids)
    return ids[order], np.asarray(docs["uri"].to_pylist(), dtype=object)[order]


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


def check_assign(assign: tuple[np.ndarray, np.ndarray], nq: int, quantizer) -> tuple[np.ndarray, np.ndarray]:
    Dq, Iq = assign
    if quantizer is None:
        raise InvalidInput("a coarse assignment was sent, but this index is not a plain IVF index")
    if Iq.shape != Dq.shape or Iq.ndim != 2 or len(Iq) != nq:
        raise InvalidInput(f"coarse assignment has shape {Iq.shape} for {nq} queries")
    if Iq.size and (Iq.min() < -1 or Iq.max() >= quantizer.ntotal):
        raise InvalidInput(f"coarse assignment names lists outside 0..{quantizer.ntotal - 1}")
    return Dq, Iq


def check_k(k: int, max_k: int) -> None:
    if not 1 <= k <= max_k:
        raise InvalidInput(f"k must be between 1 and {max_k}, got {k}")


class IndexSearcher:
    """Loads the published version of an index root and searches all its shards."""

    def __init__(self, url: str, settings: Settings | None = None, only: list[int] | None = None):
        """Load every shard of the published version, or `only` those numbers (a shard server)."""
        self.settings = settings or get_settings()
        self.store = open_store(url, self.settings)
        self.manifest = load_current(self.store)
        cache = self.settings.home / "cache"
        entries = self.manifest.shards
        if only is not None:
            known = {e.shard for e in entries}
            if not set(only) <= known:
                raise NotFound(f"index {self.store.url} has shards {sorted(known)}, not {sorted(set(only) - known)}")
            entries = [e for e in entries if e.shard in only]
        self.shards = [load_shard(self.store, self.manifest, e, cache, self.settings.mmap_index) for e in entries]
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.shards)))
        self.quantizer = shared_quantizer([s.index for s in self.shards])

    @property
    def version(self) -> str:
        return self.manifest.version

    def search(self, queries: np.ndarray, k: int = 10, nprobe: int | None = None) -> list[list[Hit]]:
        return hit_lists(*self.search_arrays(queries, k, nprobe))

    def search_arrays(self, queries: np.ndarray, k: int = 10, nprobe: int | None = None,
                      assign: tuple[np.ndarray, np.ndarray] | None = None):
        """(D, I, S, uris), each (nq, k), best first; id -1 / uri "" where fewer than k results.

        assign = (scores, lists), each (nq, nprobe): a coarse assignment made elsewhere (the router)
        for plain IVF shards; then nprobe is its width."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.manifest.dim:
            raise InvalidInput(f"query vectors have shape {queries.shape}; this index takes "
                               f"{self.manifest.dim}-d vectors ({self.manifest.model.get('name')})")
        if not np.isfinite(queries).all():
            raise InvalidInput("query vectors contain NaN or infinity")
        check_k(k, self.settings.max_k)
        nprobe = nprobe or self.manifest.nprobe
        if nprobe < 1:
            raise InvalidInput(f"nprobe must be >= 1, got {nprobe}")

        if assign is not None:
            Dq, Iq = check_assign(assign, len(queries), self.quantizer)
        elif self.quantizer is not None:  # one coarse search serves every shard (as faiss IndexShardsIVF)
            Dq, Iq = self.quantizer.search(queries, min(nprobe, self.quantizer.ntotal))
        if self.quantizer is not None:
            nprobe = Iq.shape[1]  # faiss reads nprobe entries per query from the assignment

            def one(shard: LoadedShard):
                params = shard.params(nprobe, self.manifest.k_factor)
                D, I = faiss_util.search_preassigned(shard.index, queries, k, Iq, Dq, params)
                return shard.entry.shard, D, I, shard.uris_of(I)
        else:
            def one(shard: LoadedShard):
                D, I = shard.index.search(queries, k, params=shard.params(nprobe, self.manifest.k_factor))
                return shard.entry.shard, D, I, shard.uris_of(I)

        # Threads pay off for batches; single queries are faster searched shard after shard.
        per_shard = list(self._pool.map(one, self.shards) if len(queries) >= 8 and len(self.shards) > 1
                         else map(one, self.shards))
        return merge_topk(per_shard, k)

    def fetch(self, ids: list[int]) -> np.ndarray:
        """Stored vectors of catalogue ids from whichever shard holds them (NotFound for unknown ids)."""
        found: list[np.ndarray | None] = [None] * len(ids)
        for shard in self.shards:
            shard.enable_fetch()  # once: a CLI search by feedback; shard servers did it at load
            for i, v in enumerate(shard.fetch(ids)):
                if v is not None:
                    found[i] = v
        unknown = [i for i, v in zip(ids, found) if v is None]
        if unknown:
            raise NotFound(f"unknown catalogue id(s): {', '.join(map(str, unknown[:5]))}")
        return np.array(found, dtype=np.float32).reshape(len(ids), self.manifest.dim)

    def embed_images(self, images: list[bytes], model: str | None = None) -> np.ndarray:
        """Embed query images with the index's own model (refusing any other model)."""
        from services.embedder.models import load_embedder

        spec = self.manifest.model
        if model is not None and model != spec["name"]:
            raise Incompatible(f"index was built with model {spec['name']!r}, not {model!r}")
        size = spec.get("image_size", 224)
        pixels = np.stack([decode_image(b, size, self.settings.max_image_bytes,
                                        self.settings.max_image_pixels).pixels for b in images])
        try:
            embedder = load_embedder(spec["name"], spec.get("weights"), self.settings.device)
        except (InvalidInput, NotFound) as e:
            raise Incompatible(f"index was built with model {spec['name']!r}, "
                               f"which cannot be loaded here: {e}") from None
        if embedder.spec.fingerprint != spec["fingerprint"]:
            raise Incompatible(f"model {spec['name']!r} here has fingerprint {embedder.spec.fingerprint}, "
                               f"the index was built with {spec['fingerprint']} (different weights or settings)")
        return embedder.embed(pixels)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
