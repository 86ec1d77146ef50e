"""Writing a version: every shard file (+ docs, + the coarse quantizer of plain IVF), then the manifest,
then (when publishing) the CURRENT flip by compare-and-swap against the pointer the change started from.
Files first, pointer last: a crash leaves CURRENT intact; a lost race leaves the version staged."""

from __future__ import annotations

import datetime
import logging
from typing import Callable

from services.common.checksums import sha256_bytes
from services.common.faults import crash_point
from services.common.store import Store
from services.index import faiss_util
from services.index.docs import docs_bytes
from services.index.layout import PROJECTION_FILE, QUANTIZER_FILE, docs_file, shard_file, version_key
from services.index.manifest import FileEntry, Manifest, ShardEntry, write_manifest
from services.index.projection import Projection
from services.index.shards import Shard
from services.index.versions import Pointer, advance

log = logging.getLogger(__name__)


def now_iso() -> str:
    """UTC with milliseconds: versions written within one second still sort in the order written."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
Step = Callable[[str], None]


def write_version(out: Store, template: Manifest, parts: list[Shard], quantizer, publish_it: bool = True,
                  step: Step | None = None, base: Pointer | None = None,
                  projection: Projection | None = None) -> Manifest:
    """Write the shards of template.version, then finish it (finish_version)."""
    step = step or (lambda msg: log.info(msg))
    entries = [write_shard(out, template.version, s, step) for s in parts]
    return finish_version(out, template, entries, quantizer, publish_it, step, base, projection)


def finish_version(out: Store, template: Manifest, entries: list[ShardEntry], quantizer, publish_it: bool = True,
                   step: Step | None = None, base: Pointer | None = None,
                   projection: Projection | None = None) -> Manifest:
    """With template.version's shards written (entries), write its projection and quantizer, its manifest
    (count, files, checksums filled in), and when publish_it move CURRENT from `base` (the pointer read when
    the change started; None: a new index) to it. Returns the manifest written; Conflict (the version staged)
    when another writer moved CURRENT first."""
    step = step or (lambda msg: log.info(msg))
    # routers can assign lists once for all shards
    quantizer_entry = _write_file(out, template.version, QUANTIZER_FILE,
                                  None if quantizer is None else faiss_util.to_bytes(quantizer))
    projection_entry = _write_file(out, template.version, PROJECTION_FILE,
                                   None if projection is None else projection.to_bytes())
    crash_point("index.shards-written")
    manifest = template.model_copy(update={
        "created_at": now_iso(), "shards": entries, "quantizer": quantizer_entry, "projection": projection_entry,
        "count": sum(e.count for e in entries)})
    data = write_manifest(out, manifest)
    crash_point("index.manifest-written")
    if publish_it:
        advance(out, base, manifest.version, data, fresh=True)  # its name reserved by this writer
        step(f"published {manifest.version} at {out.url}")
    else:
        step(f"wrote {manifest.version} at {out.url} (not published: `imsearch index publish`)")
    return manifest


def _write_file(out: Store, version: str, file: str, blob: bytes | None) -> FileEntry | None:
    if blob is None:
        return None
    out.put_bytes(version_key(version, file), blob)
    return FileEntry(file=file, sha256=sha256_bytes(blob))


def write_shard(out: Store, version: str, s: Shard, step: Step) -> ShardEntry:
    """Write one shard's index and docs files under version; their manifest entry."""
    blob, docs = faiss_util.to_bytes(s.index), docs_bytes(s.ids, s.uris, s.columns)
    file, docs_name = shard_file(s.number), docs_file(s.number)
    out.put_bytes(version_key(version, file), blob)
    out.put_bytes(version_key(version, docs_name), docs)
    step(f"wrote shard {s.number}: {s.index.ntotal} vectors, {len(blob) / 2**20:.1f} MiB")
    return ShardEntry(shard=s.number, file=file, sha256=sha256_bytes(blob), bytes=len(blob),
                      count=int(s.index.ntotal), docs_file=docs_name, docs_sha256=sha256_bytes(docs))
