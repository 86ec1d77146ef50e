"""The CURRENT pointer and the versions under an index root: publish, rollback, list, gc.

Every change (build, add, delete, publish, rollback, gc) writes whatever new version it makes beside the
others, then moves CURRENT by a compare-and-swap against the pointer the change started from: the flip
succeeds only if nobody else moved CURRENT meanwhile, so a change is either in the published version or
refused (Conflict, naming the version that won) — never acknowledged and then silently undone. A crash at
any point leaves CURRENT naming a complete version.

CURRENT = {"version", "manifest_sha256", "history": [earlier versions, newest first], "generation": n,
           "deleting": [versions gc is removing: never published again]}
"""

from __future__ import annotations

import datetime
import json
import re
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from services.common.checksums import sha256_bytes, verified_bytes
from services.common.errors import Conflict, Corrupt, InvalidInput, NotFound
from services.common.faults import crash_point
from services.common.filecache import forget_cached, not_cached, verified_file
from services.common.store import Store
from services.index.layout import (
    BUILDS,
    MANIFEST,
    POINTER_KEY,
    RESERVED,
    VERSIONS,
    manifest_key,
    version_key,
    version_prefix,
)
from services.index.manifest import Manifest, has_version, load_version

HISTORY = 20  # earlier versions remembered in the pointer, for rollback
Step = Callable[[str], None]


@dataclass
class Pointer:
    version: str
    manifest_sha256: str
    history: list[str] = field(default_factory=list)
    generation: int = 0
    deleting: list[str] = field(default_factory=list)
    token: str | None = field(default=None, compare=False)  # the store's token of what was read (for CAS)

    def to_bytes(self) -> bytes:
        return json.dumps({k: v for k, v in asdict(self).items() if k != "token"}).encode()

    def describe(self) -> str:
        return f"{self.version} (generation {self.generation})"


def read_pointer(store: Store) -> Pointer | None:
    """CURRENT with its token, or None when nothing was published yet."""
    try:
        data, token = store.get_versioned(POINTER_KEY)
        raw = json.loads(data)
        if not isinstance(raw.get("version"), str):
            raise KeyError("version")
        return Pointer(raw["version"], str(raw.get("manifest_sha256", "")), list(raw.get("history", [])),
                       int(raw.get("generation", 0)), list(raw.get("deleting", [])), token)
    except NotFound:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError):
        raise Corrupt(f"{store.uri(POINTER_KEY)} is damaged") from None


def current_pointer(store: Store) -> Pointer:
    """The CURRENT pointer, or NotFound when the root holds no published index."""
    pointer = read_pointer(store)
    if pointer is None:
        raise NotFound(f"no index at {store.url} (no {POINTER_KEY} pointer; build one with `imsearch index build`)")
    return pointer


def is_index(store: Store) -> bool:
    return store.exists(POINTER_KEY)


def load_published(store: Store) -> tuple[Pointer, Manifest]:
    """The pointer and the manifest it names (checksum verified): the base a change starts from."""
    pointer = current_pointer(store)
    return pointer, load_version(store, pointer.version, pointer.manifest_sha256)[0]


def load_current(store: Store) -> Manifest:
    """The published manifest, its checksum verified against the pointer."""
    return load_published(store)[1]


def write_pointer(store: Store, new: Pointer, base: Pointer | None, fresh: bool = False) -> Pointer:
    """CURRENT := new, only if it still is `base` (None: only if no index exists yet); else Conflict,
    with the pointer that won as `.winner`. fresh: new.version was written by this writer, under a name it reserved
    (no other writer can have published it)."""
    data = new.to_bytes()
    crash_point("index.before-flip")
    try:
        store.put_if(POINTER_KEY, data, base.token if base else None)
    except Conflict:
        now = read_pointer(store)
        if now is not None and now.to_bytes() == data:  # our own write: its reply was lost and the PUT retried
            return now
        if fresh and now is not None and new.version in now.history:
            # Our write landed (its reply lost, the PUT retried) and another writer published on top of it since:
            # a version only this writer could publish is in the history the winner built on, so the change
            # stands. Refusing it here made the caller discard a version that was published, and redo its change.
            return new
        error = Conflict(f"{store.url} changed while this ran: {now.describe() if now else 'nothing'} is "
                         f"published now, not {base.describe() if base else 'nothing'} as when it started")
        error.winner = now
        raise error from None
    crash_point("index.after-flip")
    return new


def advance(store: Store, base: Pointer | None, version: str, manifest_data: bytes,
            history: list[str] | None = None, fresh: bool = False) -> Pointer:
    """Move CURRENT from base to a written version (base goes into history unless a history is given)."""
    if base is not None and version in base.deleting:
        raise Conflict(f"{version} is being removed by `imsearch index gc`; it cannot be published")
    if history is None:
        history = [base.version, *base.history] if base else []
    new = Pointer(version, sha256_bytes(manifest_data), [v for v in history if v != version][:HISTORY],
                  (base.generation + 1) if base else 1, list(base.deleting) if base else [])
    return write_pointer(store, new, base, fresh)


def verify_version(store: Store, manifest: Manifest, cache: Path) -> None:
    """Every file of a version is there and matches its checksum (Corrupt / NotFound naming the file)."""
    for e in manifest.shards:
        key = version_key(manifest.version, e.file)
        fresh = not_cached(cache, [(key, e.sha256)])
        verified_file(store, key, e.sha256, cache, e.bytes)
        forget_cached(cache, fresh, set())  # downloaded only to be checked: not kept, one shard on disk at a time
        verified_bytes(store, version_key(manifest.version, e.docs_file), e.docs_sha256)
    for extra in (manifest.quantizer, manifest.projection):
        if extra is not None:
            verified_bytes(store, version_key(manifest.version, extra.file), extra.sha256)


def publish(store: Store, version: str, cache: Path, step: Step | None = None) -> Pointer:
    """Point CURRENT at a written (staged) version, its files verified first."""
    base = read_pointer(store)
    manifest, data = load_version(store, version)
    if base is not None and version in base.deleting:
        raise Conflict(f"{version} is being removed by `imsearch index gc`; it cannot be published")
    (step or (lambda msg: None))(f"verifying the {2 * len(manifest.shards)} shard files of {version}")
    verify_version(store, manifest, cache)
    return advance(store, base, version, data)


def rollback(store: Store, cache: Path, step: Step | None = None) -> Pointer:
    """Back to the version published before the current one, its files verified first."""
    base = current_pointer(store)
    if not base.history:
        raise NotFound(f"index {store.url}: no earlier version to roll back to")
    target = base.history[0]
    manifest, data = load_version(store, target)
    (step or (lambda msg: None))(f"verifying the {2 * len(manifest.shards)} shard files of {target}")
    verify_version(store, manifest, cache)
    return advance(store, base, target, data, base.history[1:])


def list_versions(store: Store) -> list[str]:
    """Versions written under the root (published or staged), oldest name first."""
    return sorted({k.split("/")[1] for k in store.list(VERSIONS) if k.endswith(f"/{MANIFEST}")})


def version_age(store: Store, version: str, now: float) -> float:
    """Seconds since a version was written: its manifest's created_at, else (a killed build: no manifest) the
    newest of its files."""
    try:
        manifest, _ = load_version(store, version)
        return now - datetime.datetime.fromisoformat(manifest.created_at.replace("Z", "+00:00")).timestamp()
    except (NotFound, Corrupt, ValueError):
        keys = store.list(version_prefix(version))
        return now - max((store.modified(k) for k in keys), default=now)


def gc(store: Store, keep: int = 2, grace_s: float = 3600.0, retries: int = 5, step: Step | None = None,
       now: float | None = None) -> list[str]:
    """Delete every version except the current one, the `keep` before it (rollback's history is trimmed to
    those) and any younger than grace_s; killed builds' leftovers (no manifest) too, once older than grace_s.

    Safe beside other writers: the versions to delete are first marked in CURRENT (a compare-and-swap, so a
    publish racing it either wins — and its version is kept — or is refused), then deleted, then unmarked.
    A gc killed midway leaves them marked; the next gc finishes them."""
    step = step or (lambda msg: None)
    now = time.time() if now is None else now
    _gc_builds(store, grace_s, now, step)
    for attempt in range(retries + 1):
        base = current_pointer(store)
        protected = {base.version, *base.history[:keep]}
        written = {k.split("/")[1] for k in store.list(VERSIONS) if k.count("/") >= 2}
        old = {v for v in written - protected - set(base.deleting) if version_age(store, v, now) >= grace_s}
        doomed = sorted((old | set(base.deleting)) - protected)  # marked ones: a gc before was killed midway
        if not doomed:
            return []
        marked = replace(base, history=[v for v in base.history if v not in doomed], generation=base.generation + 1,
                         deleting=sorted(set(base.deleting) | set(doomed)))
        try:
            write_pointer(store, marked, base)
            break
        except Conflict:
            if attempt == retries:
                raise
    crash_point("gc.marked")
    for v in doomed:
        step(f"removing {v}")
        _delete_version(store, v)
    for attempt in range(retries + 1):  # unmark: another writer may have moved CURRENT meanwhile
        base = current_pointer(store)
        try:
            write_pointer(store, replace(base, generation=base.generation + 1,
                                         deleting=[v for v in base.deleting if v not in doomed]), base)
            break
        except Conflict:
            if attempt == retries:
                raise
    return doomed


def _gc_builds(store: Store, grace_s: float, now: float, step: Step) -> None:
    """Staged Ray builds (builds/<key>/) none of whose files changed for grace_s: abandoned — the same command
    would have resumed them; a build still running past that loses only its resumability."""
    staged: dict[str, float] = {}
    for key in store.list(BUILDS):
        parts = key.split("/")
        if len(parts) >= 3 and parts[0] == BUILDS:
            staged[parts[1]] = max(staged.get(parts[1], 0.0), store.modified(key))
    for build, newest in sorted(staged.items()):
        if now - newest >= grace_s:
            step(f"removing the abandoned build staged at {BUILDS}/{build}")
            store.delete_prefix(f"{BUILDS}/{build}")


def _delete_version(store: Store, version: str) -> None:
    """Data files first, the manifest last (a half-deleted version stays visible, and marked), then whatever
    a killed write left in its folder."""
    keys = [k for k in store.list(version_prefix(version)) if not k.endswith(f"/{MANIFEST}")]
    for i, key in enumerate(keys):
        store.delete(key)
        if i == 0:
            crash_point("gc.mid-delete")
    store.delete(manifest_key(version))
    store.delete_prefix(version_prefix(version))


VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def new_version() -> str:
    return time.strftime("v%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def check_new_version(store: Store, version: str | None, owner: str | None = None) -> str:
    """A fresh version name (given, or made from the time), not yet used under the root, and reserved for this
    writer: the reservation is one conditional write (If-None-Match / O_EXCL), so of two writers asking for one
    name at once exactly one gets it — a check then a write let both through, and the second overwrote the first's
    published files. owner: who asks (a build's key: the same build run again after a kill takes its reservation
    back; None: a writer of its own)."""
    version = version or new_version()
    if not VERSION_NAME.fullmatch(version):
        raise InvalidInput(f"version name {version!r}: use letters, digits, '.', '_' and '-' only")
    if has_version(store, version):
        raise InvalidInput(f"{store.url} already has a version {version!r}")
    owner = owner or uuid.uuid4().hex
    try:
        store.put_if(version_key(version, RESERVED), json.dumps({"owner": owner}).encode(), None)
    except Conflict:
        try:
            held = json.loads(store.get_bytes(version_key(version, RESERVED))).get("owner")
        except (NotFound, ValueError, AttributeError):
            held = None
        if held != owner:
            raise InvalidInput(f"{store.url}: version name {version!r} is taken by another writer (a build or "
                               "change running now, or one killed: `imsearch index gc` frees it after its grace)") \
                from None
    return version


def staging_target(url: str, open_store) -> tuple[str, str] | None:
    """(ROOT, NAME) when `url` is ROOT/NAME and ROOT already holds an index: build version NAME there, staged
    (published later), instead of a new index at url. open_store: url -> Store."""
    root, _, name = url.rstrip("/").rpartition("/")
    if root and name and is_index(open_store(root)) and not is_index(open_store(url)):
        return root, name
    return None


def describe_versions(store: Store) -> list[dict]:
    """Every written version, oldest first: name, created_at, count, shards, factory, and its state —
    published, earlier (rollback can return to it; n = how many steps back), staged, or being removed."""
    pointer = read_pointer(store)
    history = pointer.history if pointer else []
    rows = []
    for v in list_versions(store):
        try:
            m, _ = load_version(store, v)
        except (Corrupt, NotFound):
            rows.append({"version": v, "created_at": "", "count": None, "shards": None, "factory": "",
                         "state": "damaged manifest"})
            continue
        state = ("published" if pointer and v == pointer.version else "being removed" if pointer and v in
                 pointer.deleting else f"earlier (rollback {history.index(v) + 1})" if v in history else "staged")
        rows.append({"version": v, "created_at": m.created_at, "count": m.count, "shards": len(m.shards),
                     "factory": m.factory, "state": state})
    return sorted(rows, key=lambda r: (r["created_at"], r["version"]))
