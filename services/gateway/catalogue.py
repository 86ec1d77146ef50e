"""What the gateway knows of the catalogue: id <-> uri of the published version and of the recent versions
answers came from, and thumbnails.

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
from services.index.manifest import load_version
from services.index.versions import VERSION_NAME, load_current

THUMB_SIDE = 256
THUMB_CACHE = 1024
VERSIONS_KEPT = 3
REFRESH_S = 2.0


@dataclass
class Docs:
    ids: np.ndarray  # sorted
    uris: np.ndarray

    def uri_of(self, id_: int) -> str | None:
        j = int(np.searchsorted(self.ids, id_))
        return str(self.uris[j]) if j < len(self.ids) and self.ids[j] == id_ else None


class Catalogue:
    def __init__(self, index_url: str, settings: Settings):
        self.url, self.settings = index_url, settings
        self.version = ""  # the published version, as last seen
        self.checked = 0.0
        self.docs: OrderedDict[str, Docs] = OrderedDict()  # version -> docs, most recently used last
        self.by_uri: dict[str, int] = {}  # of the published version
        self.thumbs: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self.lock = threading.Lock()
        self.refreshing = threading.Lock()
        self.storage_error = ""  # the last storage failure, until a read succeeds again

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
            store = self._store()
            manifest = self._remember(lambda: load_current(store))
            if manifest.version != self.version:
                docs = self._load(manifest)
                with self.lock:
                    self.by_uri = {u: int(i) for i, u in zip(docs.ids, docs.uris)}
                    self.version = manifest.version
        finally:
            self.refreshing.release()

    def _load(self, manifest) -> Docs:
        docs = Docs(*self._remember(lambda: all_docs(self._store(), manifest)))
        with self.lock:
            self.docs[manifest.version] = docs
            self.docs.move_to_end(manifest.version)
            while len(self.docs) > VERSIONS_KEPT:
                self.docs.popitem(last=False)
        return docs

    def docs_of(self, version: str | None) -> Docs:
        """The docs of a version (the published one when None), loaded once and kept for a few versions."""
        if not version:
            self.refresh()
            version = self.version
            if not version:
                raise NotFound(f"no published index at {self.url} yet")
        if not VERSION_NAME.fullmatch(version):
            raise InvalidInput(f"version {quote(version)} is not a version name")
        with self.lock:
            if version in self.docs:
                self.docs.move_to_end(version)
                return self.docs[version]
        manifest, _ = self._remember(lambda: load_version(self._store(), version))
        return self._load(manifest)

    def uri_of(self, id_: int, version: str | None = None) -> str:
        uri = self.docs_of(version).uri_of(id_)
        if uri is None and not version:  # an id of a newer version: look again (refresh is rate-limited)
            self.checked = 0.0
            uri = self.docs_of(None).uri_of(id_)
        if uri is None:
            raise NotFound(f"unknown catalogue id {id_}" + (f" in version {version}" if version else ""))
        return uri

    def known(self, uri: str) -> int | None:
        """The id of a uri of the loaded published version, without touching storage (None if unknown)."""
        return self.by_uri.get(uri)

    def id_of(self, uri: str) -> int:
        if uri not in self.by_uri:
            self.refresh()
        if uri not in self.by_uri:
            raise NotFound(f"{quote(uri, 200)} is not in the catalogue (only catalogue images can be searched by uri)")
        return self.by_uri[uri]

    def thumbnail(self, id_: int, version: str | None = None) -> bytes:
        if not version:
            self.refresh()
            version = self.version
        key = (version, id_)
        with self.lock:
            if key in self.thumbs:
                self.thumbs.move_to_end(key)
                return self.thumbs[key]
        uri = self.uri_of(id_, version)
        data = self._remember(lambda: read_uri(uri, self.settings))
        thumb = thumbnail_jpeg(data, THUMB_SIDE, self.settings.max_image_bytes, self.settings.max_image_pixels)
        with self.lock:
            self.thumbs[key] = thumb
            while len(self.thumbs) > THUMB_CACHE:
                self.thumbs.popitem(last=False)
        return thumb
