"""Router: embeds the query, fans out to every shard concurrently within the deadline, merges top-k.

A shard that fails or times out (after trying its replicas) is left out and named: the answer
carries coverage < 1 and the missing shards, never a silent partial result.

    python -m services.searcher.router --shards h:50061,h:50062 --index idx/
    (replicas of one shard are separated by '|': h1:50061|h2:50061,h1:50062|h2:50062)

On one host the shards need no servers of their own: `--shards local --index idx/` loads every shard into the
router and searches them as one faiss search over their stacked lists (the same API, version following and
pinning: the previous version stays loaded through a rollout), which spends the host's CPU on search instead of
on a gRPC hop per shard.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from protos.imsearch.v1 import imsearch_pb2 as pb
from protos.imsearch.v1 import imsearch_pb2_grpc as pb_grpc
from services.common import metrics, server
from services.common.batching import DynamicBatcher
from services.common.config import Settings, get_settings
from services.common.convert import (
    add_hits,
    fill_columns,
    pack_assign,
    pack_queries,
    unpack_results,
    vectors_from_proto,
)
from services.common.errors import (
    DeadlineExceeded,
    ImsearchError,
    Incompatible,
    InvalidInput,
    NotFound,
    NotSupported,
    TooLarge,
    Unavailable,
    from_status,
)
from services.common.store import open_store
from services.common.validate import check_k, check_qe
from services.index import faiss_util
from services.index.filters import Node, canonical, parse_filter, to_json
from services.index.manifest import Manifest, load_version
from services.index.merge import merge_topk
from services.index.projection import Projection, load_projection, to_index_space
from services.index.shards import load_quantizer
from services.searcher.cache import REJECTIONS, QueryCache, SingleFlight, cache_key, seal, unseal
from services.searcher.collections import DEFAULT, Collections, CollectionSpec, shard_groups
from services.searcher.expansion import check_same_space, expand, found_ids
from services.searcher.feedback import check_counts, requery
from services.searcher.legs import Outgoing
from services.searcher.replicas import ReplicaSet
from services.searcher.searchpool import SearchPool
from services.searcher.shard import ShardService
from services.searcher.shard import load as load_shards

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Searcher"].full_name
Embed = Callable[[list[bytes]], Awaitable[np.ndarray]]


@dataclass
class Answer:
    """Merged results, each array (nq, k) best first (id -1 where fewer than k), and how complete."""
    scores: np.ndarray
    ids: np.ndarray
    shards: np.ndarray
    uris: np.ndarray | None
    version: str
    coverage: float
    missing: list[int]

    def __getitem__(self, rows: slice) -> "Answer":
        """The answer of some queries (a DynamicBatcher hands each caller its own rows)."""
        return Answer(self.scores[rows], self.ids[rows], self.shards[rows],
                      None if self.uris is None else self.uris[rows], self.version, self.coverage, self.missing)


def shard_budget(client_remaining: float | None, shard_timeout: float) -> float:
    """Time the shards get: the router's own limit, cut to leave room to merge and reply
    before the client's deadline."""
    if client_remaining is None:
        return shard_timeout
    return max(0.001, min(shard_timeout, client_remaining * 0.9 - 0.01))


class Router:
    def __init__(self, shards: list[list[str]], settings: Settings, embed: Embed | None = None):
        self.settings, self.embed = settings, embed
        self.metadata = server.bearer_metadata(settings.token())
        self.shards = [ReplicaSet(n, replicas, settings, self.metadata) for n, replicas in enumerate(shards)]
        self.dim: int | None = None
        self.fingerprint = ""
        self.batchers: dict[tuple[int, int], DynamicBatcher] = {}
        self.index_url: str | None = None  # lets the router assign IVF lists once for all shards
        self.coarse: dict[str, tuple | None] = {}
        self.spaces: dict[str, tuple[Manifest, Projection | None]] = {}  # version -> its projection
        self.version = ""  # the index version of the last answer: part of every cache key
        self.last_fanout = 0.0  # loop time of the last fan-out (answers learn the shards' newest version)
        self._watch: asyncio.Task | None = None
        self.local: ShardService | None = None  # shards "local": every shard searched in this process
        self._local_watch: asyncio.Task | None = None
        # The coarse assignment of fan-outs, on one worker with one OpenMP thread: a team's threads spin on after
        # so short a search, and doubled the router's CPU per query at times (bench_transport).
        self._assigning = SearchPool(threads=1)

    async def _ask(self, shard: int, request, deadline: float, method: str = "Search"):
        """One shard's answer to `method` from whichever replica answers first (hedged, with failover), or
        None when none answered before the deadline."""
        return await self.shards[shard].ask(method, request, deadline)

    async def search(self, queries: np.ndarray, k: int, nprobe: int = 0, timeout: float | None = None,
                     version: str = "", where: str = "") -> Answer:
        """version: the version the queries were projected for (pinned; "" = the router's current one);
        where: a filter in the JSON language (shard_filter), applied by every shard during its search."""
        check_k(k, self.settings.max_k)
        if self.local is not None:
            return await self._search_local(queries, k, nprobe, version, where)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + shard_budget(timeout, self.settings.shard_timeout_s)
        data, dim = pack_queries(queries)
        request = pb.ShardSearchRequest(queries=data, dim=dim, k=k, nprobe=nprobe, filter=where)
        answered = await self._fan_out(request, queries, deadline, version)
        if not answered and self.version and not version and loop.time() < deadline:
            # Every shard may have moved past our version (two publishes in a row): re-learn it once.
            if self.version != await self.refresh_version():
                answered = await self._fan_out(request, queries, deadline)
        if not answered:
            if loop.time() >= deadline:
                raise DeadlineExceeded("no shard answered within the deadline")
            raise Unavailable("no shard is reachable")
        # One version per answer: a shard that answered from another version counts as missing.
        version = Counter(r.index_version for r in answered.values()).most_common(1)[0][0]
        answered = {s: r for s, r in answered.items() if r.index_version == version}
        per_shard = [(s, *unpack_results(r, len(queries))) for s, r in answered.items()]
        merged = merge_topk(per_shard, k)
        missing = sorted(set(range(len(self.shards))) - set(answered))
        if missing:
            metrics.PARTIAL.inc()
        self._follow_rollout(answered, version)
        return Answer(*merged, version, len(answered) / len(self.shards), missing)

    async def _search_local(self, queries: np.ndarray, k: int, nprobe: int, version: str, where: str) -> Answer:
        """Every shard searched here, as one faiss search over their stacked lists (one host: no gRPC hop per
        shard). The pinned version while it is held (the previous one stays loaded through a rollout)."""
        searcher = self.local.pick(version or self.version)
        search = functools.partial(searcher.search_arrays, np.asarray(queries, np.float32), k, nprobe or None,
                                   where=parse_filter(where) if where else None)
        # On the local shards' search pool: one search per core at once, each with its share of the cores
        # (searchpool.py); requests arriving while every worker is busy join the next batch (search_shared).
        D, I, S, uris = await self.local.pool.run(search, rows=len(queries))
        self.version = self.local.latest  # the next request uses the newest version loaded
        return Answer(D, I, S, uris, searcher.version, 1.0, [])

    async def _fan_out(self, request: pb.ShardSearchRequest, queries: np.ndarray,
                       deadline: float, version: str = "") -> dict[int, pb.ShardSearchResponse]:
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
        replies = await asyncio.gather(*(self._ask(s, out, deadline) for s in range(len(self.shards))))
        return {s: r for s, r in enumerate(replies) if r is not None}

    def _follow_rollout(self, answered: dict[int, pb.ShardSearchResponse], version: str) -> None:
        """Move to a new version once every shard has it loaded (the next request uses it)."""
        latest = {r.latest_version for r in answered.values()}
        if len(answered) == len(self.shards) and len(latest) == 1:
            self.version = latest.pop() or version
        elif not self.version:
            self.version = version

    async def search_shared(self, queries: np.ndarray, k: int, nprobe: int = 0,
                            timeout: float | None = None, version: str = "", where: str = "") -> Answer:
        """Like search, but fanned out together with the other requests waiting when every fan-out
        slot is busy: one fan-out for many requests (per-call gRPC cost dominates small requests).
        A caller whose deadline is tighter than the shard budget goes alone, with its own deadline."""
        check_k(k, self.settings.max_k)
        queries = np.asarray(queries, np.float32)
        # Filtered requests fan out alone: a batcher per distinct filter would grow without bound (and only
        # requests with the same filter could share a fan-out).
        if where or (timeout is not None and timeout < self.settings.shard_timeout_s):
            return await self.search(queries, k, nprobe, timeout, version, where)
        key = (k, nprobe, queries.shape[1], version)  # only alike requests share a fan-out
        batcher = self.batchers.get(key)
        if batcher is None:
            batcher = DynamicBatcher(functools.partial(self.search, k=k, nprobe=nprobe, version=version),
                                     self.settings.max_batch, 0.0, self.settings.router_queue,
                                     workers=self._fanouts(), name="fanout")
            batcher.start()
            self.batchers[key] = batcher
        return await batcher.submit(queries)

    def _fanouts(self) -> int:
        """Batches in flight at once: IMSEARCH_ROUTER_FANOUTS over shard servers; in-process, one per search
        worker and one more, queued, so that a worker finishing a search starts the next at once instead of
        waiting for the event loop to answer the last batch and collect the next (cores sat idle meanwhile)."""
        return self.local.pool.threads + 1 if self.local else self.settings.router_fanouts

    def _coarse_for(self, version: str) -> tuple | None:
        """(quantizer, default nprobe) of a version once loaded; starts loading it on first sight."""
        if not self.index_url or not version:
            return None
        if version not in self.coarse:
            self.coarse[version] = None
            asyncio.get_running_loop().run_in_executor(None, self._load_coarse, version)
        return self.coarse[version]

    async def to_index_space(self, vectors: np.ndarray) -> tuple[np.ndarray, str]:
        """(query vectors in the index's space, the version whose projection made them: "" when none did).

        A projected index is searched with projected queries, made here with the projection of the version
        the fan-out is then pinned to. Without --index the router cannot load it: model vectors go to the
        shards as they are, and each shard projects them itself."""
        if self.local is not None:
            self.version = self.local.latest  # in-process: pin a version that is loaded here
        version = self.version
        if not self.index_url or not version:
            return vectors, ""
        if version not in self.spaces:
            loop = asyncio.get_running_loop()
            manifest = await loop.run_in_executor(None, self.manifest, version)
            store = open_store(self.index_url, self.settings)
            projection = await loop.run_in_executor(None, load_projection, store, manifest)
            self.spaces = {v: s for v, s in self.spaces.items() if v == self.version} | {version: (manifest,
                                                                                                  projection)}
        manifest, projection = self.spaces[version]
        vectors = to_index_space(projection, vectors, manifest)
        return vectors, version if projection is not None else ""

    def manifest(self, version: str) -> Manifest:
        """The manifest of one published version of the index (blocking I/O: run in a thread)."""
        return load_version(open_store(self.index_url, self.settings), version)[0]

    def _load_coarse(self, version: str) -> None:
        try:
            manifest = self.manifest(version)
            quantizer = load_quantizer(open_store(self.index_url, self.settings), manifest)
            if quantizer is None:
                return
            self.coarse[version] = (quantizer, manifest.nprobe)
            for old in [v for v in list(self.coarse) if v not in (version, self.version)]:
                self.coarse.pop(old, None)  # this runs in a worker thread: no iteration over the live dict
        except ImsearchError as e:  # shards will assign lists themselves
            log.warning("cannot load the coarse quantizer of %s: %s", version, e)

    async def shard_infos(self, timeout: float = 2.0) -> list[pb.ShardInfo | None]:
        """Each shard's Info from the first replica that answers (None for a shard with none)."""
        if self.local is not None:
            return self.local.infos()
        deadline = asyncio.get_running_loop().time() + timeout

        async def info(n: int) -> pb.ShardInfo | None:
            try:
                return await self._ask(n, pb.InfoRequest(), deadline, "Info")
            except ImsearchError:
                return None

        return list(await asyncio.gather(*(info(n) for n in range(len(self.shards)))))

    async def refresh_version(self, timeout: float = 2.0) -> str:
        """Learn version, dim and model from the shards' Info (best effort: shards may be down)."""
        infos = [i for i in await self.shard_infos(timeout) if i]
        if infos:
            self.version = Counter(i.index_version for i in infos).most_common(1)[0][0]
            first = next(i for i in infos if i.index_version == self.version)
            self.dim, self.fingerprint = first.dim or self.dim, first.model_fingerprint
        return self.version

    async def fetch(self, ids: list[int], timeout: float | None = None) -> np.ndarray:
        """Stored vectors of catalogue ids, asked of every shard at once (any sharding rule works); each id
        once, in calls of at most IMSEARCH_MAX_BATCH ids (what a shard takes)."""
        unique, where = np.unique(np.asarray(ids, np.int64), return_inverse=True)
        step = self.settings.max_batch
        parts = await asyncio.gather(*(self._fetch(unique[i:i + step].tolist(), timeout)
                                       for i in range(0, len(unique), step)))
        return np.concatenate(parts)[where.ravel()] if parts else np.zeros((0, self.dim or 0), np.float32)

    async def _fetch(self, ids: list[int], timeout: float | None) -> np.ndarray:
        if self.local is not None:  # every shard is here: one that holds the id answers
            vectors, silent = ShardService.fetch(self.local.pick(""), ids), []
        else:
            vectors, silent = await self._fetch_remote(ids, timeout)
        unknown = [i for i, v in zip(ids, vectors) if v is None]
        if unknown and silent:  # the id may live on a shard that did not answer: not a NotFound
            raise Unavailable(f"shard(s) {silent} did not answer; id(s) {', '.join(map(str, unknown[:5]))} "
                              "not found on the others")
        if unknown:
            raise NotFound(f"unknown catalogue id(s): {', '.join(map(str, unknown[:5]))}")
        return np.array(vectors, dtype=np.float32)

    async def _fetch_remote(self, ids: list[int], timeout: float | None) -> tuple[list, list[int]]:
        """(each id's stored vector from whichever shard server holds it, None where none did; the shards that
        did not answer)."""
        deadline = asyncio.get_running_loop().time() + shard_budget(timeout, self.settings.shard_timeout_s)
        request = pb.FetchRequest(ids=ids)
        vectors: list = [None] * len(ids)
        replies = await asyncio.gather(*(self._ask(n, request, deadline, "Fetch") for n in range(len(self.shards))))
        for reply in replies:
            for i, (found, v) in enumerate(zip(reply.found if reply else [], reply.vectors if reply else [])):
                if found:
                    vectors[i] = v.values
        return vectors, [n for n, reply in enumerate(replies) if reply is None]

    def follow_versions(self, interval: float) -> None:
        """Keep up with published versions when no answer teaches them: a router whose traffic is all cache
        hits makes no fan-out, so without this it would serve its old version's cached answers for ever."""
        async def watch() -> None:
            while True:
                await asyncio.sleep(interval)
                if asyncio.get_running_loop().time() - self.last_fanout < interval:
                    continue  # answers are keeping it current
                infos = await self.shard_infos(timeout=min(2.0, interval))
                latest = {i.index_version for i in infos if i is not None}
                if all(infos) and len(latest) == 1 and latest != {self.version}:
                    self.version = latest.pop()  # every shard has it loaded: the next request uses it
                    log.info("router now pins version %s (learned from the shards' Info)", self.version)

        self._watch = asyncio.get_running_loop().create_task(watch())

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._local_watch is not None:
            self._local_watch.cancel()
        for batcher in self.batchers.values():
            await batcher.stop()
        if self.local is not None:
            self.local.close()  # after the batchers: their last batches still search
        self._assigning.shutdown()
        await asyncio.gather(*(rs.close() for rs in self.shards))


class SearcherService(pb_grpc.SearcherServicer):
    """The Searcher API over the collections served (each a Router); a request names its collection."""

    def __init__(self, collections: Collections, settings: Settings, cache: QueryCache | None = None):
        self.collections, self.settings, self.cache = collections, settings, cache
        self.flights = SingleFlight()
        if cache is not None:  # every cache series exists from the start: the dashboard shows 0, not nothing
            for result in ("hit", "miss"):
                metrics.CACHE.labels(result)
            for why in REJECTIONS:
                metrics.CACHE_REJECTED.labels(why)

    @staticmethod
    async def _vectors(router: Router, queries: list[pb.Query]) -> np.ndarray:
        kinds = {q.WhichOneof("query") for q in queries}
        if None in kinds:
            raise InvalidInput("a query needs an image, a vector or an id")
        if kinds == {"vector"}:  # the router checks their width against the index when it has --index
            return vectors_from_proto([q.vector for q in queries], None if router.index_url else router.dim)
        if kinds == {"image"}:
            if router.embed is None:
                raise NotSupported("this router has no embedder: send vectors")
            return await router.embed([q.image for q in queries])
        if kinds == {"id"}:
            return await router.fetch([q.id for q in queries])
        raise InvalidInput("all queries of one batch must be of the same kind (images, vectors or ids)")

    @staticmethod
    def _stamp(reply, answer: Answer):
        """Version and completeness, on a SearchResponse or a columnar SearchBatchResponse."""
        reply.index_version, reply.coverage = answer.version, answer.coverage
        reply.missing_shards.extend(answer.missing)
        return reply

    def _fill(self, reply: pb.SearchResponse, answer: Answer, q: int) -> pb.SearchResponse:
        add_hits(reply.hits, answer.scores[q], answer.ids[q], answer.shards[q],
                 None if answer.uris is None else answer.uris[q])
        return self._stamp(reply, answer)

    async def _search_one(self, router: Router, request: pb.SearchRequest, timeout: float | None,
                          where: str = "") -> pb.SearchResponse:
        vectors, version = await router.to_index_space(await self._vectors(router, [request.query]))
        relevant, not_relevant = list(request.feedback.relevant), list(request.feedback.not_relevant)
        if relevant or not_relevant:
            check_counts(relevant, not_relevant)
            marked = await router.fetch(relevant + not_relevant, timeout)
            check_same_space(marked, vectors, "relevance feedback")
            vectors = requery(vectors[0], marked, len(relevant), self.settings)
        answer = await self._search(router, vectors[:1], request.k, request.nprobe, request.qe, timeout, version,
                                    where)
        return self._fill(pb.SearchResponse(), answer, 0)

    @staticmethod
    async def _search(router: Router, vectors: np.ndarray, k: int, nprobe: int, qe: int, timeout: float | None,
                      version: str, where: str = "") -> Answer:
        """One search, or with qe two: the first finds each query's qe nearest (matching the filter, as the
        answer must), whose stored vectors (one Fetch fan-out) re-weight it for the second. A partial first
        round makes the answer partial."""
        check_qe(qe)
        if not qe:
            return await router.search_shared(vectors, k, nprobe, timeout, version, where)
        first = await router.search_shared(vectors, qe, nprobe, timeout, version, where)
        wanted = found_ids(first.ids)
        fetched = await router.fetch(wanted, timeout) if wanted else np.zeros((0, vectors.shape[1]), np.float32)
        check_same_space(fetched, vectors, "query expansion")
        answer = await router.search_shared(expand(vectors, first.ids, first.scores, fetched), k, nprobe,
                                            timeout, version, where)
        answer.coverage = min(answer.coverage, first.coverage)
        answer.missing = sorted(set(answer.missing) | set(first.missing))
        return answer

    @server.rpc
    async def Search(self, request: pb.SearchRequest, context) -> pb.SearchResponse:
        check_k(request.k, self.settings.max_k)
        name, router = self.collections.pick(request.collection)
        node = parse_filter(request.filter) if request.filter else None  # a bad filter: INVALID_ARGUMENT here
        where = shard_filter(node)
        if self.cache is None or not router.version:
            return await self._search_one(router, request, context.time_remaining(), where)
        # The collection, query, feedback and filter (normalised: one key however it is spelled), encoded
        # together (one message: unambiguous bytes); each collection is its own namespace.
        asked = pb.SearchRequest(query=request.query, feedback=request.feedback, qe=request.qe,
                                 filter=canonical(node) if node else "", collection=name).SerializeToString()
        version = router.version
        key = cache_key(version, request.k, request.nprobe, asked)

        async def lookup_or_fetch() -> pb.SearchResponse:
            # Inside the flight: concurrent identical requests share one Redis lookup and at most
            # one fan-out, and the flight ends only after the answer is stored.
            reply = self._cached(key, version, await self.cache.get(key))
            metrics.CACHE.labels("hit" if reply else "miss").inc()
            if reply:
                return reply
            reply = await self._search_one(router, request, context.time_remaining(), where)
            if reply.coverage == 1.0 and reply.index_version == version:  # never cache partial answers
                await self.cache.set(key, seal(key, version, reply.SerializeToString()))
            return reply

        return await self.flights.run(key, lookup_or_fetch)

    @staticmethod
    def _cached(key: str, version: str, value: bytes | None) -> pb.SearchResponse | None:
        """The cached answer, or None for a miss: nothing there, or anything but a sealed answer to this key
        at this version (counted, then overwritten by the fresh answer)."""
        if value is None:
            return None
        answer, why = unseal(key, version, value)
        if answer is None:
            metrics.CACHE_REJECTED.labels(why).inc()
            return None
        try:
            reply = pb.SearchResponse.FromString(answer)
        except DecodeError:
            metrics.CACHE_REJECTED.labels("parse").inc()
            return None
        reply.cached = True
        return reply

    @server.rpc
    async def Info(self, request, context) -> pb.IndexInfo:
        name, router = self.collections.pick(request.collection)
        infos = await router.shard_infos()
        answered = [i for i in infos if i is not None]
        if not answered:
            raise Unavailable("no shard is reachable")
        version = Counter(i.index_version for i in answered).most_common(1)[0][0]
        reply = pb.IndexInfo(index_version=version, count=sum(i.count for i in answered), shards=answered,
                             model=pb.ModelInfo(dim=answered[0].dim, fingerprint=answered[0].model_fingerprint),
                             metric="inner_product", collections=self.collections.names, collection=name)
        if router.index_url:  # the manifest knows the rest
            m = await asyncio.get_running_loop().run_in_executor(None, router.manifest, version)
            reply.factory, reply.nprobe, reply.created_at = m.factory, m.nprobe, m.created_at
            reply.model.name, reply.model.image_size = m.model.get("name", ""), m.model.get("image_size", 0)
            reply.fields.update(m.fields)
        return reply

    @server.rpc
    async def SearchBatch(self, request: pb.SearchBatchRequest, context) -> pb.SearchBatchResponse:
        if len(request.queries) > self.settings.max_batch:
            raise TooLarge(f"{len(request.queries)} queries in one batch; the limit is {self.settings.max_batch}")
        router = self.collections.get(request.collection)
        where = shard_filter(parse_filter(request.filter) if request.filter else None)
        vectors, version = await router.to_index_space(await self._vectors(router, list(request.queries)))
        answer = await self._search(router, vectors, request.k, request.nprobe, request.qe, context.time_remaining(),
                                    version, where)
        reply = pb.SearchBatchResponse()
        if request.columnar:
            fill_columns(reply.columns, answer.scores, answer.ids, answer.shards, answer.uris)
            return self._stamp(reply, answer)
        for q in range(len(vectors)):
            self._fill(reply.results.add(), answer, q)
        return self._stamp(reply, answer)  # the batch's version and coverage, as a columnar answer has


def shard_filter(node: Node | None) -> str:
    """A parsed filter as the router sends it to shards: the JSON language ("" for none)."""
    return "" if node is None else json.dumps(to_json(node), separators=(",", ":"))


def remote_embedder(address: str, settings: Settings, metadata) -> tuple[Embed, pb_grpc.EmbedderStub]:
    """Embed query images through the Embedder service (which batches across requests)."""
    stub = pb_grpc.EmbedderStub(server.channel(address, settings))

    async def embed(images: list[bytes]) -> np.ndarray:
        try:
            reply = await stub.Embed(pb.EmbedRequest(images=images), timeout=settings.embed_timeout_s,
                                     metadata=metadata)
        except grpc.aio.AioRpcError as e:
            raise from_status(e.code(), e.details(), f"embedder {address}") from None
        return vectors_from_proto(reply.vectors)

    return embed, stub


def local_embedder(index: str, settings: Settings) -> tuple[Embed, int]:
    """The embedded default: embed query images in this process with the index's own model."""
    from services.searcher.local import IndexSearcher

    searcher = IndexSearcher(index, settings, only=[])

    async def embed(images: list[bytes]) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(None, searcher.embed_images, images)

    return embed, searcher.manifest.model_dim


async def start_router(spec: CollectionSpec, settings: Settings) -> Router:
    """One collection's Router over its shards; query images are embedded by the Embedder service at
    spec.embedder, else in-process with the model of spec.index, else refused (vectors and ids only)."""
    loop = asyncio.get_running_loop()
    embed, dim = await loop.run_in_executor(None, local_embedder, spec.index, settings) \
        if spec.index and not spec.embedder else (None, None)
    router = Router(shard_groups(spec), settings, embed)
    router.dim, router.index_url = dim, spec.index
    if spec.in_process:  # one host: the shards load here and follow the index's CURRENT here
        searcher = await loop.run_in_executor(None, load_shards, spec.index, None, settings)
        router.local = ShardService(searcher, spec.index, None, settings)
        router._local_watch = loop.create_task(router.local.watch(settings.reload_interval_s))
    await router.refresh_version()
    if spec.embedder:
        router.embed, stub = remote_embedder(spec.embedder, settings, router.metadata)
        model = await stub.Info(pb.InfoRequest(), timeout=30, metadata=router.metadata)
        if router.fingerprint and model.fingerprint != router.fingerprint:
            raise Incompatible(f"embedder {spec.embedder} runs model {model.name} ({model.fingerprint}); the index "
                               f"was built with fingerprint {router.fingerprint}")
    router.follow_versions(settings.reload_interval_s)
    return router


async def serve(default: CollectionSpec | None = None, port: int = 0, settings: Settings | None = None,
                host: str = "127.0.0.1", collections: Path | None = None) -> tuple[server.Running, Collections]:
    """The router over the collection `default` (router --shards), or over the collections of a collections file
    (followed while serving), or both."""
    settings = settings or get_settings()
    # The metrics port first, before any outgoing connection: a port picked free by whoever started this
    # process (IMSEARCH_METRICS_PORT) is in the ephemeral range, which the connections to shards draw from.
    metrics.serve_metrics(settings.metrics_port, host)
    path = collections or settings.collections
    served = Collections(lambda spec: start_router(spec, settings), path)
    if default is not None:
        await served.add(default)
    await served.load()
    if not served.routers:
        raise InvalidInput("nothing to serve: give --shards or --collections")
    cache = QueryCache(settings.redis_url, settings.cache_ttl_s) if settings.redis_url else None
    service = SearcherService(served, settings, cache)
    running = await server.start([(pb_grpc.add_SearcherServicer_to_server, service, SERVICE)], port, settings, host)
    if path is not None:
        running.tasks.append(asyncio.get_running_loop().create_task(served.watch(settings.reload_interval_s)))
    log.info("router serving on %s:%d: collection(s) %s", host, running.port, ", ".join(served.names))
    return running, served


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="imsearch router: fan-out search over shard servers")
    ap.add_argument("--shards", help="host:port[|replica],... one group per shard; or, with "
                                     "--shard-count, one group naming the shard as {i}; or 'local': every "
                                     "shard of --index searched inside this process (one host)")
    ap.add_argument("--collections", type=Path, help="a collections file (JSON: name -> index and shards), "
                                                     "followed while serving [IMSEARCH_COLLECTIONS]")
    ap.add_argument("--shard-count", type=int, help="expand a --shards template on {i} to this many shards")
    ap.add_argument("--index", help="index root: the router then assigns IVF lists once for all shards, and "
                                    "embeds query images with the index's model (unless --embedder)")
    ap.add_argument("--embedder", help="host:port of an Embedder service for query images")
    ap.add_argument("--port", type=int, default=50050)
    ap.add_argument("--host", default="127.0.0.1")
    return ap


def main() -> None:
    args = build_parser().parse_args()

    async def start():
        default = CollectionSpec(DEFAULT, args.shards, args.index, args.embedder, args.shard_count) \
            if args.shards else None
        running, served = await serve(default, args.port, host=args.host, collections=args.collections)
        return running, served.close

    server.run_service(start, "router", args.host)


if __name__ == "__main__":
    main()
