"""Index manifest and the CURRENT pointer: what a published index version is made of.

Layout under an index root:
  CURRENT                         -> {"version", "manifest_sha256", "history": [earlier versions]} (flipped last)
  versions/<version>/manifest.json
  versions/<version>/shard-00000.faiss, shard-00000.docs.parquet, ...

Every change (build, add, delete) writes a whole new version beside the others and then flips the
CURRENT pointer in one atomic put: a crash at any point leaves CURRENT naming a complete version.
Old versions stay (for rollback) until `gc` removes them.
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


HISTORY = 20  # earlier versions remembered in the pointer, for rollback


def write_manifest(store: Store, manifest: Manifest) -> bytes:
    data = manifest.to_bytes()
    store.put_bytes(f"{version_prefix(manifest.version)}/manifest.json", data)
    return data


def publish(store: Store, manifest: Manifest) -> None:
    """Write the manifest, then flip CURRENT to it: readers see the old or the new version, whole."""
    write_manifest(store, manifest)
    flip(store, manifest.version)


def read_pointer(store: Store) -> dict | None:
    try:
        pointer = json.loads(store.get_bytes(POINTER_KEY))
        if not isinstance(pointer.get("version"), str):
            raise KeyError("version")
        return pointer
    except NotFound:
        return None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise Corrupt(f"{store.uri(POINTER_KEY)} is damaged") from None


def current_pointer(store: Store) -> dict:
    """The CURRENT pointer, or NotFound when the root holds no published index."""
    pointer = read_pointer(store)
    if pointer is None:
        raise NotFound(f"no index at {store.url} (no {POINTER_KEY} pointer; build one with `imsearch index build`)")
    return pointer


def load_version(store: Store, version: str) -> tuple[Manifest, bytes]:
    key = f"{version_prefix(version)}/manifest.json"
    try:
        data = store.get_bytes(key)
    except NotFound:
        raise NotFound(f"index {store.url} has no version {version!r} (see `imsearch index versions`)") from None
    return Manifest.from_bytes(data, store.uri(key)), data


def flip(store: Store, version: str, history: list[str] | None = None) -> dict:
    """Point CURRENT at a written version (its manifest must parse); the old one goes into history."""
    _, data = load_version(store, version)
    old = read_pointer(store)
    if history is None:
        history = ([old["version"]] + old.get("history", [])) if old else []
    history = [v for v in history if v != version][:HISTORY]
    pointer = {"version": version, "manifest_sha256": sha256_bytes(data), "history": history}
    store.put_bytes(POINTER_KEY, json.dumps(pointer).encode())
    return pointer


def rollback(store: Store) -> dict:
    """Back to the version published before the current one."""
    pointer = current_pointer(store)
    history = [v for v in pointer.get("history", []) if store.exists(f"{version_prefix(v)}/manifest.json")]
    if not history:
        raise NotFound(f"index {store.url}: no earlier version to roll back to")
    return flip(store, history[0], history[1:])


def list_versions(store: Store) -> list[str]:
    """Versions written under the root (published or staged), oldest first."""
    return sorted({k.split("/")[1] for k in store.list("versions") if k.endswith("/manifest.json")})


def gc(store: Store, keep: int = 2) -> list[str]:
    """Delete every version except the current one and the `keep` most recent before it."""
    pointer = current_pointer(store)
    kept = {pointer["version"], *pointer.get("history", [])[:keep]}
    removed = [v for v in list_versions(store) if v not in kept]
    for v in removed:
        for key in store.list(version_prefix(v)):
            if not key.endswith("/manifest.json"):
                store.delete(key)
        store.delete(f"{version_prefix(v)}/manifest.json")  # last: a half-deleted version stays visible
    return removed


def load_current(store: Store) -> Manifest:
    """The published manifest, its checksum verified against the pointer."""
    pointer = current_pointer(store)
    manifest, data = load_version(store, pointer["version"])
    if sha256_bytes(data) != pointer.get("manifest_sha256"):
        raise Corrupt(f"{store.uri(version_prefix(pointer['version']))}/manifest.json: checksum mismatch with "
                      f"{POINTER_KEY}")
    return manifest
