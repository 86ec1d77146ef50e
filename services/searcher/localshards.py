"""Shards searched in this process: every shard of an index root (the one-host router, `--shards local`) or one of
them (a shard server, shard.py), the published version followed as CURRENT moves.

A new version loads beside the one served, then takes its place; the one before stays loaded for requests
pinned to it (index/follower.py). A version that cannot load is kept visible (Info, the load-failure metric, one
log line per new failure) while the one served goes on; the version lag is a gauge (a shard server also reports
NOT_SERVING past IMSEARCH_MAX_VERSION_LAG_S). The shard files of a version no longer held leave the local cache.

Searches run on a SearchPool (searchpool.py): off the event loop, several at once under load, each with its share
of the cores.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

import numpy as np

from protos.imsearch.v1 import imsearch_pb2 as pb
from services.common import metrics
from services.common.config import Settings
from services.common.errors import Incompatible
from services.common.filecache import forget_cached
from services.common.store import open_store
from services.index.filters import parse_filter
from services.index.follower import VersionFollower
from services.index.manifest import Manifest
from services.index.projection import Projection
from services.searcher.local import IndexSearcher
from services.searcher.searchpool import SearchPool
from services.searcher.shardset import Answer

log = logging.getLogger(__name__)
MAX_RETRY_S = 300.0  # the longest wait before a version that failed to load is tried again


def load(index: str, shard: int | None, settings: Settings, manifest: Manifest | None = None) -> IndexSearcher:
    """One shard of the published version (or of `manifest`'s), or every shard (None), ready to serve."""
    searcher = IndexSearcher(index, settings, only=None if shard is None else [shard], manifest=manifest)
    for s in searcher.shards:
        s.enable_fetch()
    return searcher


class LocalShards:
    def __init__(self, searcher: IndexSearcher, index: str, shard: int | None, settings: Settings):
        """searcher: the version loaded first (load()); shard None: every shard (a router searching them itself)."""
        self.index, self.number, self.settings = index, shard, settings
        self.label = "all" if shard is None else str(shard)  # in logs and metrics
        self.follower: VersionFollower[IndexSearcher] = VersionFollower(searcher.version, searcher)
        # A shard server's small search while none runs stays on its loop; a router's never does: its loop has
        # requests to overlap with the search (searchpool.py).
        self.pool = SearchPool(inline_small=shard is not None)
        self._watch: asyncio.Task | None = None
        self.retry_at, self.backoff = 0.0, 0.0  # a version that failed to load is tried again after a back-off
        metrics.SHARD_LOAD_FAILURES.labels(self.label)  # 0 from the start: `increase` sees the first failure

    @property
    def version(self) -> str:
        return self.follower.latest

    @property
    def fanouts(self) -> int:
        """One search per worker and one more, queued, so that a worker finishing a search starts the next at once
        instead of waiting for the event loop to answer the last batch and collect the next."""
        return self.pool.threads + 1

    def pick(self, version: str) -> IndexSearcher:
        """The searcher of a pinned version while held, else the newest (a router re-pins)."""
        return self.follower.pick(version)

    def searcher(self, version: str) -> IndexSearcher:
        """The searcher of a pinned version ("": the newest); Incompatible when not held (a shard server)."""
        searcher = self.follower.get(version)
        if searcher is None:
            raise Incompatible(f"shard {self.number} has versions {sorted(self.follower.held())}, not {version}")
        return searcher

    async def start(self, on_lag: Callable[[float], Awaitable[None]] | None = None) -> list[pb.ShardInfo]:
        self._watch = asyncio.get_running_loop().create_task(self.watch(self.settings.reload_interval_s, on_lag))
        return self.infos_now()

    async def watch(self, interval: float, on_lag: Callable[[float], Awaitable[None]] | None = None) -> None:
        """Follow CURRENT every `interval` seconds; on_lag(seconds behind) after each look (a shard server)."""
        while True:
            await asyncio.sleep(interval)
            await self.follow()
            lag = self.follower.lag()
            metrics.SHARD_VERSION_LAG.labels(self.label).set(lag)
            if on_lag is not None:
                await on_lag(lag)

    async def follow(self) -> None:
        """One look at CURRENT; a new version loaded and served. Storage unreachable, a damaged pointer or a version
        that cannot load: what is served goes on."""
        loop, follower = asyncio.get_running_loop(), self.follower
        store = open_store(self.index, self.settings)
        try:
            pointer = await loop.run_in_executor(None, follower.read, store)
        except Exception as e:  # noqa: BLE001 - storage unreachable or the pointer damaged: keep serving
            log.warning("shard %s: cannot read the published version: %s", self.label, e)
            return
        if pointer is None:
            return
        if pointer.version == follower.failed_version and time.monotonic() < self.retry_at:
            return  # a damaged version is not downloaded again at every look, only after a growing back-off
        failed = (follower.failed_version, follower.failed_error)
        try:
            dropped = await loop.run_in_executor(None, follower.load, store, pointer, self._load)
        except Exception as e:  # noqa: BLE001 - a half-published or broken version: keep serving what we have
            again = follower.failed_version == failed[0]
            self.backoff = min(MAX_RETRY_S, self.backoff * 2) if again else self.settings.reload_interval_s
            self.retry_at = time.monotonic() + self.backoff
            if (follower.failed_version, follower.failed_error) != failed:
                log.error("shard %s: cannot load version %s (serving %s; next try in %.0f s): %s", self.label,
                          pointer.version, follower.latest, self.backoff, e)
                metrics.SHARD_LOAD_FAILURES.labels(self.label).inc()
            return
        log.info("shard %s now serves version %s", self.label, follower.latest)
        if dropped:  # their cached shard files, unless a version still held shares one
            kept = {sha for held in follower.held().values() for _, sha in held.files()}
            await loop.run_in_executor(None, forget_cached, self.settings.file_cache(),
                                       [f for s in dropped for f in s.files()], kept)

    def _load(self, manifest: Manifest) -> IndexSearcher:
        return load(self.index, self.number, self.settings, manifest)

    async def search(self, queries: np.ndarray, k: int, nprobe: int = 0, timeout: float | None = None,
                     version: str = "", where: str = "") -> Answer:
        """Every shard at once: one faiss search over their stacked lists (stacked.py) where they stack."""
        searcher = self.pick(version)
        D, I, S, uris = await self.pool.run(searcher.search_arrays, np.asarray(queries, np.float32), k,
                                            nprobe or None, where=parse_filter(where) if where else None,
                                            rows=len(queries))
        return Answer(D, I, S, uris, searcher.version, 1.0, [])

    async def fetch(self, ids: list[int], timeout: float | None = None) -> tuple[list, list[int]]:
        return self.pick("").find(ids), []

    async def infos(self, timeout: float = 2.0) -> list[pb.ShardInfo]:
        return self.infos_now()

    def infos_now(self) -> list[pb.ShardInfo]:
        """Each served shard's Info (one for a shard server; every shard in-process)."""
        searcher, f = self.pick(""), self.follower
        manifest = searcher.manifest
        return [pb.ShardInfo(shard=s.entry.shard, count=s.entry.count, sha256=s.entry.sha256,
                             index_version=searcher.version, file=s.entry.file, dim=manifest.model_dim,
                             model_fingerprint=manifest.model.get("fingerprint", ""),
                             published_version=f.published, failed_version=f.failed_version,
                             failed_error=f.failed_error, version_lag_seconds=f.lag())
                for s in searcher.shards]

    async def space(self, version: str) -> tuple[Manifest, Projection | None]:
        """The version's manifest and projection while it is held, else the newest's (manifest.version says)."""
        searcher = self.pick(version)
        return searcher.manifest, searcher.projection

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        self.pool.shutdown()
