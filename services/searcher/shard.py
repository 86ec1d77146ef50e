"""Shard server: one shard of a published index behind gRPC (the Shard service), for routers on other hosts or for
replicas. What it serves and how it follows new versions is its LocalShards' (localshards.py); this module answers
the calls. `serve()` starts it and returns the running server; `python -m services.searcher shard` is the process.

    python -m services.searcher shard --index s3://b/idx --shard 3 --port 50061
"""

from __future__ import annotations

import asyncio
import logging

from protos.imsearch.v1 import imsearch_pb2 as pb
from protos.imsearch.v1 import imsearch_pb2_grpc as pb_grpc
from services.common import metrics, server
from services.common.config import Settings, get_settings
from services.common.convert import pack_results, unpack_assign, unpack_queries
from services.common.errors import InvalidInput, TooLarge
from services.common.validate import check_nprobe
from services.index.filters import parse_filter
from services.searcher.localshards import LocalShards, load

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Shard"].full_name


class ShardService(pb_grpc.ShardServicer):
    """Serves the newest published version of one shard and keeps the one before it, so a router can finish a
    rollout without mixing versions in one answer."""

    def __init__(self, shards: LocalShards):
        self.shards, self.settings, self.number = shards, shards.settings, shards.number
        self.running: server.Running | None = None  # for readiness: set once serving
        self.serving = True
        self.idle_streams: set[asyncio.Task] = set()  # SearchStream handlers waiting for their next message
        self.draining = False

    async def report(self, lag: float) -> None:
        """A shard that stays behind CURRENT past IMSEARCH_MAX_VERSION_LAG_S reports NOT_SERVING, so that an
        orchestrator replaces it."""
        serving = lag <= self.settings.max_version_lag_s
        if self.running is not None and serving != self.serving:
            self.serving = serving
            await self.running.set_serving(serving)
            if not serving:
                log.error("shard %s: %.0f s behind the published version %s: NOT_SERVING", self.shards.label, lag,
                          self.shards.follower.published)

    @server.rpc
    async def Search(self, request: pb.ShardSearchRequest, context) -> pb.ShardSearchResponse:
        return await self._search(request)

    async def SearchStream(self, messages, context):
        """The router's searches as messages on one stream, each answered (or refused) as its unary Search
        would be, in order; the stream itself ends only when the router closes it or the server stops."""
        await context.send_initial_metadata(())  # accepted: the router writes only after this (legs.py)
        me = asyncio.current_task()
        self.idle_streams.add(me)
        try:
            async for message in messages:
                self.idle_streams.discard(me)
                reply, code, details = await server.settle(type(self).__name__, "Search",
                                                           self._search(message.request))
                yield pb.ShardStreamResponse(tag=message.tag, response=reply, code=code.value[0], details=details)
                if self.draining:  # stopping: this stream ends after its answer; the router opens another
                    return
                self.idle_streams.add(me)
        except asyncio.CancelledError:
            if not self.draining:
                raise
            # ended by end_streams while waiting for a message: the stream closes with OK, and the router's
            # next search goes to another replica (this server refuses new calls now)
        finally:
            self.idle_streams.discard(me)

    def end_streams(self) -> None:
        """Stopping: end every stream waiting for a message now, and each busy one after its answer."""
        self.draining = True
        for task in list(self.idle_streams):
            task.cancel()

    async def _search(self, request: pb.ShardSearchRequest) -> pb.ShardSearchResponse:
        # one searcher for the whole call: a version swap cannot split it
        searcher = self.shards.searcher(request.index_version)
        if request.k == 0:
            raise InvalidInput("k must be at least 1")
        check_nprobe(request.nprobe, self.settings.max_nprobe)
        queries = unpack_queries(request.queries, request.dim)  # model or index vectors: search_arrays checks
        if len(queries) > self.settings.max_batch:
            raise TooLarge(f"{len(queries)} queries in one call; the limit is {self.settings.max_batch}")
        assign = unpack_assign(request, len(queries))
        where = parse_filter(request.filter) if request.filter else None  # a filter chooses its own lists
        D, I, _, uris = await self.shards.pool.run(searcher.search_arrays, queries, request.k,
                                                   request.nprobe or None, None if where else assign, where=where,
                                                   rows=len(queries))
        return pb.ShardSearchResponse(**pack_results(D, I, uris), index_version=searcher.version,
                                      shard=self.number, latest_version=self.shards.version)

    @server.rpc
    async def Fetch(self, request: pb.FetchRequest, context) -> pb.FetchResponse:
        if len(request.ids) > self.settings.max_batch:
            raise TooLarge(f"{len(request.ids)} ids in one call; the limit is {self.settings.max_batch}")
        searcher = self.shards.searcher("")
        found = searcher.find(list(request.ids))
        return pb.FetchResponse(vectors=[pb.Vector(values=[] if v is None else v.tolist()) for v in found],
                                found=[v is not None for v in found], index_version=searcher.version)

    @server.rpc
    async def Info(self, request, context) -> pb.ShardInfo:
        return self.shards.infos_now()[0]


async def serve(index: str, shard: int, port: int = 0, settings: Settings | None = None,
                host: str = "127.0.0.1") -> server.Running:
    """Load the shard, then start serving it; returns the running server (tests stop it)."""
    settings = settings or get_settings()
    loop = asyncio.get_running_loop()
    searcher = await loop.run_in_executor(None, load, index, shard, settings)
    shards = LocalShards(searcher, index, shard, settings)
    service = ShardService(shards)
    running = await server.start([(pb_grpc.add_ShardServicer_to_server, service, SERVICE)], port, settings, host)
    service.running = running
    running.on_stop.append(service.end_streams)
    running.tasks.append(loop.create_task(shards.watch(settings.reload_interval_s, service.report)))
    metrics.serve_metrics(settings.metrics_port, host)
    log.info("shard %d of %s (version %s) serving on %s:%d", shard, index, searcher.version, host, running.port)
    return running
