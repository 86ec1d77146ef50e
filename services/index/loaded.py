"""Loading a version: its shards (every one, some, or none), its learned projection, and the coarse quantizer its
plain-IVF shards share. One function for every reader: a searcher, a shard server, the in-process router, an add
or a delete."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.errors import NotFound
from services.common.store import Store
from services.index.manifest import Manifest
from services.index.projection import Projection, load_projection
from services.index.shards import LoadedShard, load_shard, shared_quantizer


@dataclass
class LoadedVersion:
    manifest: Manifest
    shards: list[LoadedShard]
    projection: Projection | None  # applied to model vectors before they search this version
    quantizer: object | None  # the faiss coarse quantizer the loaded plain-IVF shards share, else None


def open_version(store: Store, manifest: Manifest, cache: Path, only: list[int] | None = None, mmap: bool = False,
                 serving: bool = False) -> LoadedVersion:
    """The version `manifest` describes, every file checksum-verified (S3 files cached under `cache`): every
    shard, or `only` those numbers (NotFound naming any the version lacks); mmap / serving as load_shard takes
    them (a server maps what re-ranks from disk)."""
    entries = manifest.shards
    if only is not None:
        known = {e.shard for e in entries}
        if not set(only) <= known:
            raise NotFound(f"index {store.url} has shards {sorted(known)}, not {sorted(set(only) - known)}")
        entries = [e for e in entries if e.shard in only]
    shards = [load_shard(store, manifest, e, cache, mmap, serving=serving) for e in entries]
    quantizer = shared_quantizer([s.index for s in shards])
    return LoadedVersion(manifest, shards, load_projection(store, manifest), quantizer)
