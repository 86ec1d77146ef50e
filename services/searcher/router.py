"""Router: one collection's search — query vectors into the index's space, searched on its shards, batched across
requests. Where the shards are is its ShardSet's business (shardset.py): in this process (localshards.py, one
host) or on shard servers (remote.py: fan-out, replicas, merge). The Searcher API around it (cache, feedback, αQE,
filters, collections) is service.py; the process, `python -m services.searcher router`.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Awaitable, Callable

import numpy as np

from protos.imsearch.v1 import imsearch_pb2 as pb
from services.common.batching import DynamicBatcher
from services.common.config import Settings
from services.common.errors import NotFound, Unavailable
from services.common.validate import check_k, check_nprobe
from services.index.manifest import Manifest
from services.index.projection import to_index_space
from services.searcher.shardset import Answer, ShardSet

Embed = Callable[[list[bytes]], Awaitable[np.ndarray]]
# Groups of alike requests (k, nprobe, width, version) with a batcher each, most recently used kept: k and nprobe are
# the caller's to choose, so without a bound a loop over their values grew the router by a batcher and its tasks a
# request. Past the bound an idle group's batcher is stopped; while every one is busy, a new shape searches alone.
MAX_BATCHERS = 64


class Router:
    def __init__(self, shards: ShardSet, settings: Settings, embed: Embed | None = None, index_url: str | None = None):
        """embed: query images -> model vectors (None: images refused); index_url: the index root, when the router
        may read it (the projection, the coarse quantizer, the manifest)."""
        self.shards, self.settings, self.embed, self.index_url = shards, settings, embed, index_url
        self.dim: int | None = None  # the model's vector width, as the shards report it
        self.fingerprint = ""  # the model's, as the shards report it
        self.batchers: dict[tuple, DynamicBatcher] = {}

    @property
    def version(self) -> str:
        """The index version a new request pins: part of every cache key."""
        return self.shards.version

    async def start(self) -> None:
        """Start following the shards' version; learn the model from their Info (best effort: shards may be down)."""
        infos = [i for i in await self.shards.start() if i is not None]
        if infos:
            first = next((i for i in infos if i.index_version == self.version), infos[0])
            self.dim, self.fingerprint = first.dim or self.dim, first.model_fingerprint

    async def to_index_space(self, vectors: np.ndarray) -> tuple[np.ndarray, str]:
        """(query vectors in the index's space, the version whose projection made them: "" when none did).

        A projected index is searched with projected queries, made here with the projection of the version the
        search is then pinned to. A router that cannot read the index (no --index) sends model vectors as they
        are, and each shard projects them itself."""
        space = await self.shards.space(self.version) if self.version else None
        if space is None:
            return vectors, ""
        manifest, projection = space
        return to_index_space(projection, vectors, manifest), manifest.version if projection is not None else ""

    async def manifest(self, version: str) -> Manifest | None:
        """The manifest of a version, when the router reads the index (None otherwise)."""
        space = await self.shards.space(version)
        return None if space is None else space[0]

    async def search(self, queries: np.ndarray, k: int, nprobe: int = 0, timeout: float | None = None,
                     version: str = "", where: str = "") -> Answer:
        """version: the version the queries were projected for (pinned; "" = the router's current one);
        where: a filter in the JSON language (filters.to_wire), applied by every shard during its search."""
        check_k(k, self.settings.max_k)
        check_nprobe(nprobe, self.settings.max_nprobe)
        return await self.shards.search(queries, k, nprobe, timeout, version, where)

    async def search_shared(self, queries: np.ndarray, k: int, nprobe: int = 0,
                            timeout: float | None = None, version: str = "", where: str = "") -> Answer:
        """Like search, but searched together with the other requests waiting when every search slot is busy: one
        search for many requests (per-call cost dominates small requests). A caller whose deadline is tighter than
        the shard budget goes alone, with its own deadline."""
        check_k(k, self.settings.max_k)
        check_nprobe(nprobe, self.settings.max_nprobe)  # before a batcher is made for it
        queries = np.asarray(queries, np.float32)
        # Filtered requests go alone: a batcher per distinct filter would grow without bound (and only requests
        # with the same filter could share a search).
        if where or (timeout is not None and timeout < self.settings.shard_timeout_s):
            return await self.search(queries, k, nprobe, timeout, version, where)
        key = (k, nprobe, queries.shape[1], version)  # only alike requests share a search
        batcher = self._batcher(key)
        if batcher is None:
            return await self.search(queries, k, nprobe, timeout, version)
        return await batcher.submit(queries)

    def _batcher(self, key: tuple) -> DynamicBatcher | None:
        """The batcher of a group of alike requests, made when new while fewer than MAX_BATCHERS exist or one is
        idle (stopped to make room); None when every one is busy."""
        batcher = self.batchers.pop(key, None)
        if batcher is None:
            if len(self.batchers) >= MAX_BATCHERS:
                idle = next((k for k, b in self.batchers.items() if b.idle), None)  # the least recently used first
                if idle is None:
                    return None
                asyncio.get_running_loop().create_task(self.batchers.pop(idle).stop())
            k, nprobe, _, version = key
            batcher = DynamicBatcher(functools.partial(self.search, k=k, nprobe=nprobe, version=version),
                                     self.settings.max_batch, 0.0, self.settings.router_queue,
                                     workers=self.shards.fanouts, name="fanout")
            batcher.start()
        self.batchers[key] = batcher  # the most recently used last
        return batcher

    async def fetch(self, ids: list[int], timeout: float | None = None) -> np.ndarray:
        """Stored vectors of catalogue ids, asked of every shard at once (any sharding rule works); each id
        once, in calls of at most IMSEARCH_MAX_BATCH ids (what a shard takes)."""
        unique, where = np.unique(np.asarray(ids, np.int64), return_inverse=True)
        step = self.settings.max_batch
        parts = await asyncio.gather(*(self._fetch(unique[i:i + step].tolist(), timeout)
                                       for i in range(0, len(unique), step)))
        return np.concatenate(parts)[where.ravel()] if parts else np.zeros((0, self.dim or 0), np.float32)

    async def _fetch(self, ids: list[int], timeout: float | None) -> np.ndarray:
        vectors, silent = await self.shards.fetch(ids, timeout)
        unknown = [i for i, v in zip(ids, vectors) if v is None]
        if unknown and silent:  # the id may live on a shard that did not answer: not a NotFound
            raise Unavailable(f"shard(s) {silent} did not answer; id(s) {', '.join(map(str, unknown[:5]))} "
                              "not found on the others")
        if unknown:
            raise NotFound(f"unknown catalogue id(s): {', '.join(map(str, unknown[:5]))}")
        return np.array(vectors, dtype=np.float32)

    async def shard_infos(self, timeout: float = 2.0) -> list[pb.ShardInfo | None]:
        return await self.shards.infos(timeout)

    async def close(self) -> None:
        for batcher in self.batchers.values():
            await batcher.stop()
        await self.shards.close()  # after the batchers: their last batches still search
