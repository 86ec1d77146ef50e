"""sha256 of bytes and of files (streamed), and the one checksum-verified read of a stored object:
what manifests and markers record, every reader verifies here."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

from services.common.errors import Corrupt
from services.common.store import TMP_PREFIX, Store


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sealed_json(body: dict) -> bytes:
    """A small record (a done marker) carrying a checksum of itself: a damaged one is told from a true one."""
    return json.dumps({**body, "check": sha256_bytes(json.dumps(body, sort_keys=True).encode())}).encode()


def read_sealed_json(data: bytes) -> dict:
    """The body of a sealed_json record; ValueError when it does not match its checksum (or is no JSON)."""
    record = json.loads(data)
    body = {k: v for k, v in record.items() if k != "check"}
    if record.get("check") != sha256_bytes(json.dumps(body, sort_keys=True).encode()):
        raise ValueError("marker does not match its checksum")
    return body


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def mismatch(store: Store, key: str, against: str = "") -> Corrupt:
    return Corrupt(f"{store.uri(key)}: checksum mismatch{' with ' + against if against else ''} "
                   "(damaged or replaced)")


def verified_bytes(store: Store, key: str, sha256: str, against: str = "") -> bytes:
    """The object's bytes, or Corrupt when they do not hash to sha256 (NotFound when it is missing)."""
    data = store.get_bytes(key)
    if sha256_bytes(data) != sha256:
        raise mismatch(store, key, against)
    return data


def verified_file(store: Store, key: str, sha256: str, cache: Path) -> Path:
    """A local, checksum-verified path of a stored file: the file itself on a local store, else a copy
    downloaded once into `cache` under its checksum (streamed to disk: shards can be larger than RAM).

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
    local = cache / f"{sha256}{Path(key).suffix}"
    if local.is_file() and file_sha256(local) == sha256:
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    part = local.with_name(f"{TMP_PREFIX}{local.name}-{uuid.uuid4().hex[:12]}")
    try:
        store.get_file(key, part)
        if file_sha256(part) != sha256:
            raise mismatch(store, key)
        os.replace(part, local)  # atomic: a reader sees no file or a whole, verified one
    finally:
        part.unlink(missing_ok=True)
    return local
