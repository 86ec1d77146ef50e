"""Shards on shard servers: every shard asked at once within the deadline, each through its replicas (replicas.py:
hedged, failed over, ejected), their top-k merged; a shard that does not answer is left out and named — the answer
carries coverage < 1 and the missing shards, never a silent partial result.

With the index root (router --index) the router reads what the shards' own files hold for a version: the coarse
quantizer, so that a fan-out assigns the inverted lists once for every shard, and the projection queries are
searched in (router.py). The version a request pins is learned from the shards themselves: a router moves to a
version once every shard reports it loaded (from their answers, or from their Info when no fan-out has told it
for a while); until then requests pin the one before, which the shards keep loaded through a rollout.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from protos.imsearch.v1 import imsearch_pb2 as pb
from services.common import metrics
from services.common.config import Settings
from services.common.convert import pack_assign, pack_queries, unpack_results
from services.common.errors import DeadlineExceeded, ImsearchError, Unavailable
from services.common.store import open_store
from services.index import faiss_util
from services.index.follower import VersionFollower
from services.index.loaded import open_version
from services.index.manifest import Manifest, load_version
from services.index.merge import merge_topk
from services.index.projection import Projection
from services.index.shards import load_quantizer
from services.searcher.legs import Outgoing
from services.searcher.replicas import ReplicaSet
from services.searcher.searchpool import SearchPool
from services.searcher.shardset import Answer

log = logging.getLogger(__name__)


def shard_budget(client_remaining: float | None, shard_timeout: float) -> float:
    """Time the shards get: the router's own limit, cut to leave room to merge and reply
    before the client's deadline."""
    if client_remaining is None:
        return shard_timeout
    return max(0.001, min(shard_timeout, client_remaining * 0.9 - 0.01))


def majority_version(answers) -> str:
    """The version most of the shards that answered serve, from their Infos or their replies (None: a shard that
    did not answer; "" when none answered)."""
    versions = Counter(a.index_version for a in answers if a is not None)
    return versions.most_common(1)[0][0] if versions else ""


class RemoteShards:
    def __init__(self, groups: list[list[str]], settings: Settings, metadata, index_url: str | None = None):
        """groups: each shard's replica addresses; index_url: the index root (None: the shards assign their own
        lists and project queries themselves)."""
        self.settings, self.index_url = settings, index_url
        self.replicas = [ReplicaSet(n, addresses, settings, metadata) for n, addresses in enumerate(groups)]
        self.follower: VersionFollower[None] = VersionFollower()
        self.coarse: dict[str, tuple | None] = {}  # version -> (quantizer, default nprobe) once loaded
        self.spaces: dict[str, tuple[Manifest, Projection | None]] = {}  # version -> its manifest and projection
        self.last_fanout = 0.0  # loop time of the last fan-out (answers teach the shards' newest version)
        # Reads of a version's files (manifest, projection, quantizer): on threads of their own, never the default
        # pool's that query images are embedded on, and one read a version however many requests want it.
        self._storage = ThreadPoolExecutor(max_workers=2, thread_name_prefix="version-files")
        self._space_loads: dict[str, asyncio.Task] = {}
        self._watch: asyncio.Task | None = None
        # The coarse assignment on one worker with one OpenMP thread: a team's threads spin on after so short a
        # search (searchpool.py), which at times doubled the router's CPU per query.
        self._assigning = SearchPool(threads=1)

    @property
    def version(self) -> str:
        return self.follower.latest

    @property
    def fanouts(self) -> int:
        return self.settings.router_fanouts

    def _move(self, version: str) -> None:
        if version and version != self.follower.latest:
            self.follower.move(version)

    async def start(self) -> list[pb.ShardInfo | None]:
        infos = await self.infos()
        self._move(majority_version(infos))
        self._watch = asyncio.get_running_loop().create_task(self._follow(self.settings.reload_interval_s))
        return infos

    async def _ask(self, shard: int, request, deadline: float, method: str = "Search", own_deadline: bool = True):
        """One shard's answer to `method` from whichever replica answers first (hedged, with failover), or
        None when none answered before the deadline (own_deadline: the router's own budget, not a caller's)."""
        return await self.replicas[shard].ask(method, request, deadline, own_deadline)

    async def search(self, queries: np.ndarray, k: int, nprobe: int = 0, timeout: float | None = None,
                     version: str = "", where: str = "") -> Answer:
        loop = asyncio.get_running_loop()
        budget = shard_budget(timeout, self.settings.shard_timeout_s)
        deadline, own = loop.time() + budget, budget >= self.settings.shard_timeout_s
        data, dim = pack_queries(queries)
        request = pb.ShardSearchRequest(queries=data, dim=dim, k=k, nprobe=nprobe, filter=where)
        answered = await self._fan_out(request, queries, deadline, version, own)
        if not answered and self.version and not version and loop.time() < deadline:
            # Every shard may have moved past our version (two publishes in a row): re-learn it once.
            if self.version != await self.refresh_version():
                answered = await self._fan_out(request, queries, deadline, "", own)
        if not answered:
            if loop.time() >= deadline:
                raise DeadlineExceeded("no shard answered within the deadline")
            raise Unavailable("no shard is reachable")
        # One version per answer: a shard that answered from another version counts as missing.
        version = majority_version(answered.values())
        answered = {s: r for s, r in answered.items() if r.index_version == version}
        merged = merge_topk([(s, *unpack_results(r, len(queries))) for s, r in answered.items()], k)
        missing = sorted(set(range(len(self.replicas))) - set(answered))
        if missing:
            metrics.PARTIAL.inc()
        self._follow_rollout(answered, version)
        return Answer(*merged, version, len(answered) / len(self.replicas), missing)

    async def _fan_out(self, request: pb.ShardSearchRequest, queries: np.ndarray, deadline: float, version: str = "",
                       own_deadline: bool = True) -> dict[int, pb.ShardSearchResponse]:
        request.index_version = version or self.version  # pinned: shards keep the previous version in a rollout
        request.ClearField("assign")
        request.ClearField("assign_scores")
        coarse = None if request.filter else self._coarse_for(request.index_version)
        if coarse is not None:  # choose the inverted lists once here instead of once per shard (a filter's
            # lists depend on each shard's matching rows: the shards choose them)
            quantizer, default_nprobe = coarse
            nprobe = min(request.nprobe or default_nprobe, quantizer.ntotal)
            Dq, Iq = await self._assigning.run(faiss_util.flat_search, quantizer, queries, nprobe)
            request.MergeFrom(pb.ShardSearchRequest(**pack_assign(Dq, Iq)))
            metrics.ASSIGNED.inc()
        metrics.FANOUTS.inc()
        self.last_fanout = asyncio.get_running_loop().time()
        out = Outgoing(request)  # one message for every shard's stream
        replies = await asyncio.gather(*(self._ask(s, out, deadline, "Search", own_deadline)
                                         for s in range(len(self.replicas))))
        return {s: r for s, r in enumerate(replies) if r is not None}

    def _follow_rollout(self, answered: dict[int, pb.ShardSearchResponse], version: str) -> None:
        """Move to a new version once every shard has it loaded (the next request uses it)."""
        latest = {r.latest_version for r in answered.values()}
        if len(answered) == len(self.replicas) and len(latest) == 1:
            self._move(latest.pop() or version)
        elif not self.version:
            self._move(version)

    def _coarse_for(self, version: str) -> tuple | None:
        """(quantizer, default nprobe) of a version once loaded; starts loading it on first sight."""
        if not self.index_url or not version:
            return None
        if version not in self.coarse:
            self.coarse[version] = None
            asyncio.get_running_loop().run_in_executor(self._storage, self._load_coarse, version)
        return self.coarse[version]

    def _load_coarse(self, version: str) -> None:
        try:
            space = self.spaces.get(version)  # a request projected for it read the manifest already
            manifest = space[0] if space is not None else self._manifest(version)
            quantizer = load_quantizer(open_store(self.index_url, self.settings), manifest)
            if quantizer is None:
                return
            self.coarse[version] = (quantizer, manifest.nprobe)
            held = {version, *self.follower.held()}
            for old in [v for v in list(self.coarse) if v not in held]:
                self.coarse.pop(old, None)  # this runs in a worker thread: no iteration over the live dict
        except ImsearchError as e:  # shards will assign lists themselves
            log.warning("cannot load the coarse quantizer of %s: %s", version, e)

    def _manifest(self, version: str) -> Manifest:
        """The manifest of one version of the index (blocking I/O: run in a thread)."""
        return load_version(open_store(self.index_url, self.settings), version)[0]

    async def space(self, version: str) -> tuple[Manifest, Projection | None] | None:
        if not self.index_url:
            return None
        if version in self.spaces:
            return self.spaces[version]
        task = self._space_loads.get(version)
        if task is None:  # the first request to want it reads it; the others wait on that read
            task = asyncio.get_running_loop().create_task(self._load_space(version))
            self._space_loads[version] = task
            task.add_done_callback(lambda _: self._space_loads.pop(version, None))
        return await asyncio.shield(task)

    async def _load_space(self, version: str) -> tuple[Manifest, Projection | None]:
        loop = asyncio.get_running_loop()
        manifest = await loop.run_in_executor(self._storage, self._manifest, version)
        loaded = await loop.run_in_executor(self._storage, open_version, open_store(self.index_url, self.settings),
                                            manifest, self.settings.file_cache(), [])
        held = set(self.follower.held())
        self.spaces = {v: s for v, s in self.spaces.items() if v in held} | {version: (manifest, loaded.projection)}
        return self.spaces[version]

    async def infos(self, timeout: float = 2.0) -> list[pb.ShardInfo | None]:
        """Each shard's Info from the first replica that answers (None for a shard with none)."""
        deadline = asyncio.get_running_loop().time() + timeout

        async def info(n: int) -> pb.ShardInfo | None:
            try:
                return await self._ask(n, pb.InfoRequest(), deadline, "Info")
            except ImsearchError:
                return None

        return list(await asyncio.gather(*(info(n) for n in range(len(self.replicas)))))

    async def refresh_version(self, timeout: float = 2.0) -> str:
        """Learn the version from the shards' Info (best effort: shards may be down)."""
        self._move(majority_version(await self.infos(timeout)))
        return self.version

    async def fetch(self, ids: list[int], timeout: float | None = None) -> tuple[list, list[int]]:
        """(each id's stored vector from whichever shard server holds it, None where none did; the shards that
        did not answer)."""
        budget = shard_budget(timeout, self.settings.shard_timeout_s)
        deadline, own = asyncio.get_running_loop().time() + budget, budget >= self.settings.shard_timeout_s
        request = pb.FetchRequest(ids=ids)
        vectors: list = [None] * len(ids)
        replies = await asyncio.gather(*(self._ask(n, request, deadline, "Fetch", own)
                                         for n in range(len(self.replicas))))
        for reply in replies:
            for i, (found, v) in enumerate(zip(reply.found if reply else [], reply.vectors if reply else [])):
                if found:
                    vectors[i] = v.values
        return vectors, [n for n, reply in enumerate(replies) if reply is None]

    async def _follow(self, interval: float) -> None:
        """Keep up with published versions when no answer teaches them: a router whose traffic is all cache
        hits makes no fan-out, so without this it would serve its old version's cached answers for ever."""
        while True:
            await asyncio.sleep(interval)
            if asyncio.get_running_loop().time() - self.last_fanout < interval:
                continue  # answers are keeping it current
            infos = await self.infos(timeout=min(2.0, interval))
            latest = {i.index_version for i in infos if i is not None}
            if all(infos) and len(latest) == 1 and latest != {self.version}:
                self._move(latest.pop())  # every shard has it loaded: the next request uses it
                log.info("router now pins version %s (learned from the shards' Info)", self.version)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        self._assigning.shutdown()
        self._storage.shutdown(wait=False)
        await asyncio.gather(*(rs.close() for rs in self.replicas))
