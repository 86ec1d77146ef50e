"""Which version of an index a reader serves, when it moves to another, and which versions it keeps.

Every reader of a published index holds what serving a version takes (a shard server and the in-process router
its loaded shards, the gateway its ids and uris, a router over shard servers nothing but the name) for the
version it serves and the one before it: a request pinned to the version before (its router has not seen every
shard move yet, a rollout in progress) is still answered from it, so no answer mixes two versions.

It moves in one of two ways:
* `check()`: read CURRENT (through index.versions: a damaged pointer is Corrupt, none is NotFound), and when it
  names another version, load that one (`load(manifest)`, the reader's own) and move to it; `read` and `load` are
  its two halves, for a reader that tells a pointer it cannot read from a version it cannot load. A version that
  cannot load is remembered (failed_version, failed_error) and raised; `lag()` counts the seconds the reader has
  served something else than what CURRENT names. Shard servers, the in-process router and the gateway move so.
* `move(version, value)`: the reader decided by itself. A router over shard servers moves once every shard
  reports the new version loaded, which CURRENT cannot tell it.

One writer (the loop or thread that follows) and any readers on any thread: the state is replaced by one
assignment, never changed in place, so a reader sees it before or after a move, never half of one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

from services.common.store import Store
from services.index.manifest import Manifest, load_version
from services.index.versions import Pointer, current_pointer

T = TypeVar("T")


@dataclass(frozen=True)
class Held(Generic[T]):
    latest: str  # the version served ("" before the first move)
    values: dict[str, T]  # version -> what serving it takes: the latest and those kept before it, oldest first


class VersionFollower(Generic[T]):
    def __init__(self, version: str = "", value: T | None = None, keep: int = 2):
        """Serving `version` (with `value`) from the start, or nothing yet; keep: versions held, the latest
        included."""
        self.keep = keep
        self._held: Held[T] = Held(version, {version: value} if version else {})
        self.published = version  # what CURRENT named when last read
        self.behind_since: float | None = None  # monotonic: since when CURRENT names a version not served
        self.failed_version = self.failed_error = ""  # the last version that could not load, and why

    @property
    def latest(self) -> str:
        return self._held.latest

    def held(self) -> dict[str, T]:
        """Version -> value of every version held, oldest first."""
        return dict(self._held.values)

    def get(self, version: str = "") -> T | None:
        """The value of a version held ("": the latest), else None."""
        held = self._held
        return held.values.get(version or held.latest)

    def pick(self, version: str = "") -> T:
        """A pinned version's value while it is held, else the latest's (for readers that re-pin)."""
        held = self._held
        return held.values[version] if version in held.values else held.values[held.latest]

    def move(self, version: str, value: T | None = None) -> list[T]:
        """Serve `version` from now on (value: what serving it takes), keeping the versions served before it up
        to `keep` in all; returns the values no longer held, for the caller to release."""
        values = {v: x for v, x in self._held.values.items() if v != version} | {version: value}
        kept = list(values)[-self.keep:]
        self._held = Held(version, {v: values[v] for v in kept})
        if version == self.published:
            self.behind_since = None
            self.failed_version = self.failed_error = ""
        return [values[v] for v in values if v not in kept]

    def lag(self) -> float:
        """Seconds since CURRENT first named a version this reader does not serve (0 when it serves it)."""
        return 0.0 if self.behind_since is None else time.monotonic() - self.behind_since

    def check(self, store: Store, load: Callable[[Manifest], T]) -> list[T]:
        """Follow CURRENT once (blocking I/O: call it off an event loop): read(), then load() what it names.
        Returns the values dropped; raises what reading or loading raised."""
        pointer = self.read(store)
        return [] if pointer is None else self.load(store, pointer, load)

    def read(self, store: Store) -> Pointer | None:
        """CURRENT, when it names a version other than the latest (else None): the next one to load."""
        pointer = current_pointer(store)
        self.published = pointer.version
        if pointer.version == self.latest:
            self.behind_since = None
            return None
        if self.behind_since is None:
            self.behind_since = time.monotonic()
        return pointer

    def load(self, store: Store, pointer: Pointer, load: Callable[[Manifest], T]) -> list[T]:
        """Serve the version `pointer` names from now on: its value held already (back to the version before: a
        rollback), else load(manifest) of its checksum-verified manifest. A failure is remembered, then raised.
        Returns the values dropped."""
        value = self._held.values.get(pointer.version)
        if value is None:
            try:
                value = load(load_version(store, pointer.version, pointer.manifest_sha256)[0])
            except Exception as e:
                self.failed_version, self.failed_error = pointer.version, str(e)[:500]
                raise
        return self.move(pointer.version, value)
