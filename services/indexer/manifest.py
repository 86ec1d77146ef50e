"""Index manifest and the CURRENT pointer: what a published index version is made of.

Layout under an index root:
  CURRENT                         -> {"version": ..., "manifest_sha256": ...}   (flipped last)
  versions/<version>/manifest.json
  versions/<version>/shard-00000.faiss, shard-00000.docs.parquet, ...
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ValidationError

from services.common.checksums import sha256_bytes
from services.common.errors import Corrupt, InvalidInput, NotFound
from services.common.store import Store

POINTER_KEY = "CURRENT"
FORMAT = 1


class ShardEntry(BaseModel):
    shard: int
    file: str
    sha256: str
    bytes: int
    count: int
    docs_file: str
    docs_sha256: str


class FileEntry(BaseModel):
    file: str
    sha256: str


class Manifest(BaseModel):
    format: int = FORMAT
    version: str
    created_at: str
    model: dict  # ModelSpec.describe(): name, arch, dim, fingerprint, ...
    dim: int  # dimension of the vectors the index takes (before any in-index transform)
    metric: str = "inner_product"
    factory: str
    params: dict  # IndexParams + nprobe
    nprobe: int = 1
    k_factor: float = 1
    count: int
    duplicates_dropped: int = 0
    source: dict = {}
    tuning: dict = {}
    shards: list[ShardEntry]
    quantizer: FileEntry | None = None  # plain IVF: the coarse quantizer alone, for routers

    def to_bytes(self) -> bytes:
        return self.model_dump_json(indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "manifest") -> "Manifest":
        try:
            m = cls.model_validate_json(data)
        except ValidationError as e:
            raise Corrupt(f"{where} is not a valid manifest: {e.errors()[0]['msg']} "
                          f"at {'.'.join(map(str, e.errors()[0]['loc']))}") from None
        if m.format != FORMAT:
            raise InvalidInput(f"{where}: unsupported manifest format {m.format} (this build reads {FORMAT})")
        return m


def version_prefix(version: str) -> str:
    return f"versions/{version}"


def publish(store: Store, manifest: Manifest) -> None:
    """Write the manifest, then flip CURRENT to it: readers see the old or the new version, whole."""
    data = manifest.to_bytes()
    store.put_bytes(f"{version_prefix(manifest.version)}/manifest.json", data)
    pointer = {"version": manifest.version, "manifest_sha256": sha256_bytes(data)}
    store.put_bytes(POINTER_KEY, json.dumps(pointer).encode())


def load_current(store: Store) -> Manifest:
    """The published manifest, its checksum verified against the pointer."""
    try:
        pointer = json.loads(store.get_bytes(POINTER_KEY))
        version = pointer["version"]
    except NotFound:
        raise NotFound(f"no index at {store.url} (no {POINTER_KEY} pointer; build one with `imsearch index`)") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise Corrupt(f"{store.uri(POINTER_KEY)} is damaged") from None
    key = f"{version_prefix(version)}/manifest.json"
    data = store.get_bytes(key)
    if sha256_bytes(data) != pointer.get("manifest_sha256"):
        raise Corrupt(f"{store.uri(key)}: checksum mismatch with {POINTER_KEY}")
    return Manifest.from_bytes(data, store.uri(key))
