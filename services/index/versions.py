"""The CURRENT pointer and the versions under an index root: publish, rollback, list, gc.

Every change (build, add, delete) writes a whole new version beside the others and then flips CURRENT
in one atomic put: a crash at any point leaves CURRENT naming a complete version. Old versions stay
(for rollback) until `gc` removes them.
"""

from __future__ import annotations

import json
import re
import time
import uuid

from services.common.checksums import sha256_bytes
from services.common.errors import Corrupt, InvalidInput, NotFound
from services.common.store import Store
from services.index.layout import MANIFEST, POINTER_KEY, VERSIONS, manifest_key, version_prefix
from services.index.manifest import Manifest, has_version, load_version, write_manifest

HISTORY = 20  # earlier versions remembered in the pointer, for rollback


def read_pointer(store: Store) -> dict | None:
    """{"version", "manifest_sha256", "history"}, or None when nothing was published yet."""
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


def is_index(store: Store) -> bool:
    return store.exists(POINTER_KEY)


def load_current(store: Store) -> Manifest:
    """The published manifest, its checksum verified against the pointer."""
    pointer = current_pointer(store)
    return load_version(store, pointer["version"], pointer.get("manifest_sha256") or "")[0]


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


def publish(store: Store, manifest: Manifest) -> None:
    """Write the manifest, then flip CURRENT to it: readers see the old or the new version, whole."""
    write_manifest(store, manifest)
    flip(store, manifest.version)


def rollback(store: Store) -> dict:
    """Back to the version published before the current one."""
    pointer = current_pointer(store)
    history = [v for v in pointer.get("history", []) if has_version(store, v)]
    if not history:
        raise NotFound(f"index {store.url}: no earlier version to roll back to")
    return flip(store, history[0], history[1:])


def list_versions(store: Store) -> list[str]:
    """Versions written under the root (published or staged), oldest first."""
    return sorted({k.split("/")[1] for k in store.list(VERSIONS) if k.endswith(f"/{MANIFEST}")})


def gc(store: Store, keep: int = 2) -> list[str]:
    """Delete every version except the current one and the `keep` most recent before it."""
    pointer = current_pointer(store)
    kept = {pointer["version"], *pointer.get("history", [])[:keep]}
    removed = [v for v in list_versions(store) if v not in kept]
    for v in removed:
        for key in store.list(version_prefix(v)):
            if not key.endswith(f"/{MANIFEST}"):
                store.delete(key)
        store.delete(manifest_key(v))  # last: a half-deleted version stays visible
    return removed


VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def new_version() -> str:
    return time.strftime("v%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def check_new_version(store: Store, version: str | None) -> str:
    """A fresh version name (given, or made from the time), not yet used under the root."""
    version = version or new_version()
    if not VERSION_NAME.fullmatch(version):
        raise InvalidInput(f"version name {version!r}: use letters, digits, '.', '_' and '-' only")
    if has_version(store, version):
        raise InvalidInput(f"{store.url} already has a version {version!r}")
    return version


def staging_target(url: str, open_store) -> tuple[str, str] | None:
    """(ROOT, NAME) when `url` is ROOT/NAME and ROOT already holds an index: build version NAME there, staged
    (published later), instead of a new index at url. open_store: url -> Store."""
    root, _, name = url.rstrip("/").rpartition("/")
    if root and name and is_index(open_store(root)) and not is_index(open_store(url)):
        return root, name
    return None
