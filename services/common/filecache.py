"""Local copies of stored files (shard files of an index on S3): downloaded once into a cache folder under their
checksum, verified before use, refused up front without room, and removed once no version served needs them."""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from services.common.checksums import file_sha256, mismatch
from services.common.errors import Corrupt, NoSpace
from services.common.store import TMP_PREFIX, Store

log = logging.getLogger(__name__)
ROOM_MARGIN = 256 << 20  # left free beside a download: the disk has other writers (logs, Redis, other downloads)
STALE_DOWNLOAD_S = 3600  # a temp file this old belongs to a download whose process was killed


def cached_path(cache: Path, key: str, sha256: str) -> Path:
    """Where the local copy of a stored file lives in a cache: named by its checksum (one copy per content,
    whichever version or process asks for it)."""
    return cache / f"{sha256}{Path(key).suffix}"


def check_room(folder: Path, size: int, what: str) -> None:
    """NoSpace now, naming the sizes, rather than a disk filled hours into a download of a large shard."""
    free = shutil.disk_usage(folder).free
    if size + ROOM_MARGIN > free:
        raise NoSpace(f"no room to download {what} ({size / 2**20:,.0f} MiB) into {folder}: {free / 2**20:,.0f} MiB "
                      f"free, and {ROOM_MARGIN >> 20} MiB are kept free beside a download; set IMSEARCH_HOME on a "
                      "larger disk")


def verified_file(store: Store, key: str, sha256: str, cache: Path, size: int | None = None) -> Path:
    """A local, checksum-verified path of a stored file: the file itself on a local store, else a copy
    downloaded once into `cache` under its checksum (streamed to disk: shards can be larger than RAM).
    size: the file's bytes when known (a manifest records them): a download without room is refused first.

    Several processes may share one cache (one IMSEARCH_HOME): each downloads into a temp name of its own
    (minio's fget_object writes `dest.<etag>.part.minio`, so a shared dest interleaves two downloads in one
    file) and only a verified copy is renamed into place, so the cache never holds a damaged file."""
    local = store.local_path(key)
    if local is not None:
        if not local.is_file():
            raise Corrupt(f"file missing: {store.uri(key)}")
        if file_sha256(local) != sha256:
            raise mismatch(store, key)
        return local
    local = cached_path(cache, key, sha256)
    if local.is_file() and file_sha256(local) == sha256:
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    if size is not None:
        check_room(local.parent, size, store.uri(key))
    part = local.with_name(f"{TMP_PREFIX}{local.name}-{uuid.uuid4().hex[:12]}")
    try:
        store.get_file(key, part)
        if file_sha256(part) != sha256:
            raise mismatch(store, key)
        os.replace(part, local)  # atomic: a reader sees no file or a whole, verified one
    finally:
        part.unlink(missing_ok=True)
    return local


def not_cached(cache: Path, files: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Those of `files` ((key, sha256) pairs) without a copy in `cache` yet: what a piece of work is about to
    download, and forgets once done when it was only for that work (a check, an update)."""
    return [(key, sha) for key, sha in files if not cached_path(cache, key, sha).is_file()]


def _remove(path: Path, older_than: float | None = None) -> int:
    """Delete a file (only if last written before `older_than`, when given); the bytes freed."""
    try:
        stat = path.stat()
        if older_than is not None and stat.st_mtime >= older_than:  # a download running now
            return 0
        path.unlink()
        return stat.st_size
    except FileNotFoundError:  # never downloaded here (a local store), or another process was first
        return 0


def forget_cached(cache: Path, files: Iterable[tuple[str, str]], keep: set[str]) -> int:
    """Remove the cached copies of `files` ((key, sha256) pairs: a version no longer served) whose checksum is not
    in `keep` (the files of the versions still served: a shard unchanged by an update keeps its file), and
    downloads a killed process left behind; the bytes freed. Without this, every version ever served stayed on
    the disk. Another process sharing the cache and still holding one of these files is not hurt (a file loaded
    is in its memory; one mapped stays readable until unmapped); one that loads it later downloads it again."""
    freed = sum(_remove(cached_path(cache, key, sha)) for key, sha in files if sha not in keep)
    if cache.is_dir():
        stale = time.time() - STALE_DOWNLOAD_S
        freed += sum(_remove(p, older_than=stale) for p in cache.glob(f"{TMP_PREFIX}*"))
    if freed:
        log.info("freed %.0f MiB of cached files no longer served in %s", freed / 2**20, cache)
    return freed
