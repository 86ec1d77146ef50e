"""What the gateway knows of the catalogue: id <-> uri of the published version and of the one before it (followed
as every reader of an index follows them: index/follower.py), and thumbnails.

A hit's thumbnail link names the version that answered, so a thumbnail always shows the image the hit
was found in, even while the index moves on. Every method here reads storage in the calling thread: the
gateway calls them through its own bounded thread pool, never on its event loop.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from services.common.config import Settings
from services.common.errors import ImsearchError, InvalidInput, NotFound
from services.common.images import thumbnail_jpeg
from services.common.store import open_store, read_uri
from services.common.validate import quote
from services.index.docs import all_docs
from services.index.follower import VersionFollower
from services.index.versions import VERSION_NAME

THUMB_SIDE = 256
THUMB_CACHE = 1024
REFRESH_S = 2.0


@dataclass
class Docs:
    ids: np.ndarray  # sorted
    uris: np.ndarray
    by_uri: dict[str, int] | None = None  # uri -> id, for the versions followed (searches by uri)

    def uri_of(self, id_: int) -> str | None:
        j = int(np.searchsorted(self.ids, id_))
        return str(self.uris[j]) if j < len(self.ids) and self.ids[j] == id_ else None


class Catalogue:
    def __init__(self, index_url: str, settings: Settings):
        self.url, self.settings = index_url, settings
        # The published version's docs and the one before it (hits of a router still pinned to it, a rollout)
        self.follower: VersionFollower[Docs] = VersionFollower()
        self.checked = 0.0
        self.thumbs: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self.lock = threading.Lock()
        self.refreshing = threading.Lock()
        self.storage_error = ""  # the last storage failure, until a read succeeds again

    @property
    def version(self) -> str:
        """The published version, as last seen."""
        return self.follower.latest

    def _store(self):
        return open_store(self.url, self.settings)

    def _remember(self, fn):
        """Run a storage read, keeping its failure (readiness reports it) until one succeeds again."""
        try:
            out = fn()
        except ImsearchError as e:
            if not isinstance(e, NotFound):
                self.storage_error = str(e)
            raise
        self.storage_error = ""
        return out

    def refresh(self) -> None:
        """Follow the published version (at most every REFRESH_S, one reader at a time: a hung store holds one
        thread, and the others answer from what is loaded)."""
        if self.version and time.monotonic() - self.checked < REFRESH_S:
            return
        if not self.refreshing.acquire(blocking=False):
            if not self.version:  # nothing loaded yet: wait for the read in flight rather than answer from nothing
                with self.refreshing:
                    pass
            return
        try:
            self.checked = time.monotonic()
            self._remember(lambda: self.follower.check(self._store(), self._followed))
        finally:
            self.refreshing.release()

    def _followed(self, manifest) -> Docs:
        """The docs of a version followed, with the uri -> id lookup of searches by uri."""
        ids, uris = all_docs(self._store(), manifest)
        return Docs(ids, uris, {u: int(i) for i, u in zip(ids, uris)})

    def docs_of(self, version: str | None) -> Docs:
        """The docs of a version served: the published one (None), or the one before it (hits of a router still
        pinned to it through a rollout). Any other version — older, staged, being removed — is NotFound: a takedown
        (`index delete`) must not stay viewable by naming an earlier version, and naming versions must not make the
        gateway download each one's docs."""
        self.refresh()
        if not self.version:
            raise NotFound(f"no published index at {self.url} yet")
        version = version or self.version
        if not VERSION_NAME.fullmatch(version):
            raise InvalidInput(f"version {quote(version)} is not a version name")
        docs = self.follower.get(version)
        if docs is None and version != self.version:  # perhaps published since the last look: look again now
            self.checked = 0.0
            self.refresh()
            docs = self.follower.get(version)
        if docs is None:
            raise NotFound(f"version {quote(version)} is not served (the published version is {self.version})")
        return docs

    def uri_of(self, id_: int, version: str | None = None) -> str:
        """The uri of a catalogue id in a version served (the published one when None, or the one before it, whose
        answers a router may still give through a rollout: an image taken down stays reachable by naming that
        version until the next publish moves it out of reach)."""
        docs = self.docs_of(version)
        uri = docs.uri_of(id_)
        if uri is None and not version:  # an id of a newer version: look again (refresh is rate-limited)
            self.checked = 0.0
            uri = self.docs_of(None).uri_of(id_)
        if uri is None:
            raise NotFound(f"unknown catalogue id {id_}" + (f" in version {version}" if version else ""))
        return uri

    def known(self, uri: str) -> int | None:
        """The id of a uri of the loaded published version, without touching storage (None if unknown)."""
        docs = self.follower.get()
        return None if docs is None else docs.by_uri.get(uri)

    def id_of(self, uri: str) -> int:
        if self.known(uri) is None:
            self.refresh()
        found = self.known(uri)
        if found is None:
            raise NotFound(f"{quote(uri, 200)} is not in the catalogue (only catalogue images can be searched by uri)")
        return found

    def thumbnail(self, id_: int, version: str | None = None) -> bytes:
        uri = self.uri_of(id_, version)  # first: a version no longer served is not shown, even from the cache
        key = (version or self.version, id_)
        with self.lock:
            if key in self.thumbs:
                self.thumbs.move_to_end(key)
                return self.thumbs[key]
        data = self._remember(lambda: read_uri(uri, self.settings))
        thumb = thumbnail_jpeg(data, THUMB_SIDE, self.settings.max_image_bytes, self.settings.max_image_pixels)
        with self.lock:
            self.thumbs[key] = thumb
            while len(self.thumbs) > THUMB_CACHE:
                self.thumbs.popitem(last=False)
        return thumb
