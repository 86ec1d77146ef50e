"""sha256 of bytes and of files (streamed), sealed markers, and the one checksum-verified read of a stored
object: what manifests and markers record, every reader verifies here. Local copies of large stored files
(the download cache) are filecache.py's."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from services.common.errors import Corrupt
from services.common.store import Store


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
