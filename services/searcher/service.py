"""The Searcher API (gRPC) over the collections a router serves, each a Router (router.py): the query cache
(Redis, keyed by index version, single-flight), relevance feedback, αQE rounds, filters, Info. `serve()` starts it
and returns the running server; `python -m services.searcher router` is the process.

    python -m services.searcher router --shards h:50061,h:50062 --index idx/
    (replicas of one shard are separated by '|': h1:50061|h2:50061,h1:50062|h2:50062)

On one host the shards need no servers of their own: `--shards local --index idx/` loads every shard into the
router and searches them as one faiss search over their stacked lists (the same API, version following and
pinning: the previous version stays loaded through a rollout), which spends the host's CPU on search instead of
on a gRPC hop per shard.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError

from protos.imsearch.v1 import imsearch_pb2 as pb
from protos.imsearch.v1 import imsearch_pb2_grpc as pb_grpc
from services.common import metrics, server
from services.common.config import Settings, get_settings
from services.common.convert import add_hits, fill_columns, vectors_from_proto
from services.common.errors import Incompatible, InvalidInput, NotSupported, TooLarge, Unavailable
from services.common.validate import check_k
from services.index.filters import canonical, parse_filter, to_wire
from services.searcher.cache import REJECTIONS, QueryCache, SingleFlight, cache_key, seal, unseal
from services.searcher.collections import Collections, CollectionSpec, shard_groups
from services.searcher.embedders import local_embedder, remote_embedder
from services.searcher.expansion import (
    QePlan,
    answer_expanded,
    check_same_space,
    expand,
    first_depth,
    found_ids,
    gate,
    plan,
    to_expand,
    unknown,
)
from services.searcher.feedback import check_counts, requery
from services.searcher.localshards import LocalShards, load
from services.searcher.remote import RemoteShards, majority_version
from services.searcher.router import Router
from services.searcher.shardset import Answer

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Searcher"].full_name


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
        reply.expanded = answer.expanded is not None and bool(answer.expanded[q])
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
        own = np.array([request.query.id if request.query.WhichOneof("query") == "id" else -1], np.int64)
        answer = await self._search(router, vectors[:1], request.k, request.nprobe,
                                    await self._plan(router, request, version), timeout, version, where, own)
        return self._fill(pb.SearchResponse(), answer, 0)

    async def _plan(self, router: Router, request, version: str) -> QePlan | None:
        """What the request's qe asks (unset: the gated default), with the τ of the version it is pinned to."""
        asked = request.qe if request.HasField("qe") else None
        tau, _ = gate(await router.manifest(version or router.version) if router.index_url else None, self.settings)
        return plan(asked, tau, self.settings)

    @staticmethod
    async def _search(router: Router, vectors: np.ndarray, k: int, nprobe: int, qe: QePlan | None,
                      timeout: float | None, version: str, where: str = "", own: np.ndarray | None = None) -> Answer:
        """One search, or, for the queries whose best hit scores below the plan's τ, two: the first round finds
        each query's nearest (expansion.first_depth; matching the filter, as the answer must) — the answer of the
        queries that stay plain — and its top qe hits' stored vectors (one Fetch fan-out) re-weight the others for
        the second, whose hits are then scored by the query itself (the first round's scores; a second Fetch only
        for hits it had not ranked). A partial round makes the answer partial."""
        if qe is None:
            return await router.search_shared(vectors, k, nprobe, timeout, version, where)
        first = await router.search_shared(vectors, first_depth(k, qe), nprobe, timeout, version, where)
        answer = first.top(k)
        answer.expanded = to_expand(first.ids, first.scores, qe.tau, own)
        rows = np.flatnonzero(answer.expanded)
        if not len(rows):
            return answer
        ids, scores = first.ids[rows, :qe.neighbours], first.scores[rows, :qe.neighbours]
        wanted = found_ids(ids)
        fetched = await router.fetch(wanted, timeout)
        check_same_space(fetched, vectors, "query expansion")
        second = await router.search_shared(expand(vectors[rows], ids, scores, fetched), k, nprobe, timeout,
                                            version, where)
        known = dict(zip(wanted, fetched))
        more = unknown(second.ids, known, first.ids[rows])
        known.update(zip(more, await router.fetch(more, timeout) if more else []))
        answer.replace(rows, answer_expanded(vectors[rows], first.columns(rows), second.columns(), known), second)
        return answer

    @server.rpc
    async def Search(self, request: pb.SearchRequest, context) -> pb.SearchResponse:
        check_k(request.k, self.settings.max_k)
        name, router = self.collections.pick(request.collection)
        node = parse_filter(request.filter) if request.filter else None  # a bad filter: INVALID_ARGUMENT here
        where = to_wire(node)
        if self.cache is None or not router.version:
            return await self._search_one(router, request, context.time_remaining(), where)
        # The collection, query, feedback and filter (normalised: one key however it is spelled), encoded
        # together (one message: unambiguous bytes); each collection is its own namespace.
        asked = pb.SearchRequest(query=request.query, feedback=request.feedback,
                                 qe=request.qe if request.HasField("qe") else None,  # unset (gated) is not 0 (off)
                                 filter=canonical(node) if node else "", collection=name).SerializeToString()
        version = router.version
        # The process's expansion settings too: routers sharing one Redis may expand differently.
        asked += f"|qe {self.settings.qe_neighbours} {self.settings.qe_gate}".encode()
        key = cache_key(version, request.k, request.nprobe, asked)

        async def lookup_or_fetch(timeout: float | None) -> pb.SearchResponse:
            # Inside the flight: concurrent identical requests share one Redis lookup and at most
            # one fan-out, and the flight ends only after the answer is stored.
            reply = self._cached(key, version, await self.cache.get(key))
            metrics.CACHE.labels("hit" if reply else "miss").inc()
            if reply:
                return reply
            reply = await self._search_one(router, request, timeout, where)
            if reply.coverage == 1.0 and reply.index_version == version:  # never cache partial answers
                await self.cache.set(key, seal(key, version, reply.SerializeToString(), self.cache.secret))
            return reply

        return await self.flights.run(key, lookup_or_fetch, context.time_remaining(),
                                      complete=lambda reply: reply.coverage == 1.0)

    def _cached(self, key: str, version: str, value: bytes | None) -> pb.SearchResponse | None:
        """The cached answer, or None for a miss: nothing there, or anything but a sealed answer to this key
        at this version (counted, then overwritten by the fresh answer)."""
        if value is None:
            return None
        answer, why = unseal(key, version, value, self.cache.secret)
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
        version = majority_version(answered)
        reply = pb.IndexInfo(index_version=version, count=sum(i.count for i in answered), shards=answered,
                             model=pb.ModelInfo(dim=answered[0].dim, fingerprint=answered[0].model_fingerprint),
                             metric="inner_product", collections=self.collections.names, collection=name)
        m = await router.manifest(version)
        if m is not None:  # the router reads the index: the manifest knows the rest
            reply.factory, reply.nprobe, reply.created_at = m.factory, m.nprobe, m.created_at
            reply.model.name, reply.model.image_size = m.model.get("name", ""), m.model.get("image_size", 0)
            reply.fields.update(m.fields)
        tau, source = gate(m, self.settings)
        reply.qe_neighbours = self.settings.qe_neighbours
        if tau is not None:
            reply.has_qe_gate, reply.qe_gate, reply.qe_gate_from = True, tau, source
        return reply

    @server.rpc
    async def SearchBatch(self, request: pb.SearchBatchRequest, context) -> pb.SearchBatchResponse:
        if len(request.queries) > self.settings.max_batch:
            raise TooLarge(f"{len(request.queries)} queries in one batch; the limit is {self.settings.max_batch}")
        router = self.collections.get(request.collection)
        where = to_wire(parse_filter(request.filter) if request.filter else None)
        vectors, version = await router.to_index_space(await self._vectors(router, list(request.queries)))
        own = np.array([q.id if q.WhichOneof("query") == "id" else -1 for q in request.queries], np.int64)
        answer = await self._search(router, vectors, request.k, request.nprobe,
                                    await self._plan(router, request, version), context.time_remaining(), version,
                                    where, own)
        reply = pb.SearchBatchResponse()
        if request.columnar:
            fill_columns(reply.columns, answer.scores, answer.ids, answer.shards, answer.uris)
            reply.expanded.extend(np.zeros(len(vectors), bool) if answer.expanded is None else answer.expanded)
            return self._stamp(reply, answer)
        for q in range(len(vectors)):
            self._fill(reply.results.add(), answer, q)
        return self._stamp(reply, answer)  # the batch's version and coverage, as a columnar answer has


async def start_router(spec: CollectionSpec, settings: Settings) -> Router:
    """One collection's Router over its shards (in this process for shards "local", else on shard servers); query
    images are embedded by the Embedder service at spec.embedder, else in-process with the model of spec.index,
    else refused (vectors and ids only)."""
    loop = asyncio.get_running_loop()
    embed, dim = await loop.run_in_executor(None, local_embedder, spec.index, settings) \
        if spec.index and not spec.embedder else (None, None)
    metadata = server.bearer_metadata(settings.token())
    if spec.in_process:  # one host: the shards load here and follow the index's CURRENT here
        searcher = await loop.run_in_executor(None, load, spec.index, None, settings)
        shards = LocalShards(searcher, spec.index, None, settings)
    else:
        shards = RemoteShards(shard_groups(spec), settings, metadata, spec.index)
    router = Router(shards, settings, embed, spec.index)
    router.dim = dim
    await router.start()
    if spec.embedder:
        router.embed, stub = remote_embedder(spec.embedder, settings, metadata)
        model = await stub.Info(pb.InfoRequest(), timeout=30, metadata=metadata)
        if router.fingerprint and model.fingerprint != router.fingerprint:
            raise Incompatible(f"embedder {spec.embedder} runs model {model.name} ({model.fingerprint}); the index "
                               f"was built with fingerprint {router.fingerprint}")
    return router


def cache_secret(settings: Settings, host: str) -> bytes:
    """The key of the query cache's seal: IMSEARCH_CACHE_SECRET, shared by every router of a deployment. Without
    one, a router on loopback (one host) makes a random key of its own — its entries are read by it alone, and
    the next process misses them — and a router reachable from other hosts refuses to start: its Redis is shared
    infrastructure, and an unkeyed seal would let whoever can write it forge answers."""
    if settings.cache_secret is not None:
        return settings.cache_secret.get_secret_value().encode()
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise InvalidInput(f"IMSEARCH_REDIS_URL is set and the router listens on {host}: set IMSEARCH_CACHE_SECRET "
                           "(the same for every router sharing that Redis) to key the cache's seal")
    log.warning("no IMSEARCH_CACHE_SECRET: the query cache is sealed with a random key of this process's")
    return secrets.token_bytes(32)


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
    cache = QueryCache(settings.redis_url, cache_secret(settings, host), settings.cache_ttl_s) \
        if settings.redis_url else None
    service = SearcherService(served, settings, cache)
    running = await server.start([(pb_grpc.add_SearcherServicer_to_server, service, SERVICE)], port, settings, host)
    if path is not None:
        running.tasks.append(asyncio.get_running_loop().create_task(served.watch(settings.reload_interval_s)))
    log.info("router serving on %s:%d: collection(s) %s", host, running.port, ", ".join(served.names))
    return running, served
