"""What the gateway knows of the catalogue: id <-> uri of the published version, and thumbnails."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import numpy as np

from services.common.config import Settings
from services.common.errors import NotFound
from services.common.images import thumbnail_jpeg
from services.common.store import open_store, read_uri
from services.common.validate import quote
from services.index.docs import all_docs
from services.index.versions import load_current

THUMB_SIDE = 256
THUMB_CACHE = 1024
REFRESH_S = 2.0


class Catalogue:
    """Ids and uris of the published version (reloaded when the version changes), thumbnails cached."""

    def __init__(self, index_url: str, settings: Settings):
        self.url, self.settings = index_url, settings
        self.version = ""
        self.checked = 0.0
        self.ids = np.zeros(0, np.int64)
        self.uris = np.zeros(0, dtype=object)
        self.by_uri: dict[str, int] = {}
        self.thumbs: OrderedDict[int, bytes] = OrderedDict()
        self.lock = threading.Lock()

    def refresh(self) -> None:
        """Reload ids and uris if another version is published (at most every REFRESH_S: unknown ids
        must not turn into a Store read each)."""
        now = time.monotonic()
        if self.version and now - self.checked < REFRESH_S:
            return
        self.checked = now
        store = open_store(self.url, self.settings)
        manifest = load_current(store)
        if manifest.version == self.version:
            return
        ids, uris = all_docs(store, manifest)
        with self.lock:
            self.ids, self.uris = ids, uris
            self.by_uri = {u: int(i) for i, u in zip(self.ids, self.uris)}
            self.version = manifest.version
            self.thumbs.clear()

    def uri_of(self, id_: int) -> str:
        for attempt in range(2):  # an id of a newer version: reload once
            j = int(np.searchsorted(self.ids, id_))
            if j < len(self.ids) and self.ids[j] == id_:
                return str(self.uris[j])
            if attempt == 0:
                self.refresh()
        raise NotFound(f"unknown catalogue id {id_}")

    def id_of(self, uri: str) -> int:
        if uri not in self.by_uri:
            self.refresh()
        if uri not in self.by_uri:
            raise NotFound(f"{quote(uri, 200)} is not in the catalogue (only catalogue images can be searched by uri)")
        return self.by_uri[uri]

    def thumbnail(self, id_: int) -> bytes:
        with self.lock:
            if id_ in self.thumbs:
                self.thumbs.move_to_end(id_)
                return self.thumbs[id_]
        data = read_uri(self.uri_of(id_), self.settings)
        thumb = thumbnail_jpeg(data, THUMB_SIDE, self.settings.max_image_bytes, self.settings.max_image_pixels)
        with self.lock:
            self.thumbs[id_] = thumb
            while len(self.thumbs) > THUMB_CACHE:
                self.thumbs.popitem(last=False)
        return thumb
