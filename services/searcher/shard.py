"""Shard server: one shard of a published index behind gRPC.

    python -m services.searcher.shard --index s3://b/idx --shard 3 --port 50061
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time

from protos.imsearch.v1 import imsearch_pb2 as pb
from protos.imsearch.v1 import imsearch_pb2_grpc as pb_grpc
from services.common import metrics, server
from services.common.config import Settings, get_settings
from services.common.convert import pack_results, unpack_assign, unpack_queries
from services.common.errors import Incompatible, InvalidInput, TooLarge
from services.common.filecache import forget_cached
from services.common.store import open_store
from services.index.filters import parse_filter
from services.index.layout import POINTER_KEY
from services.searcher.local import IndexSearcher
from services.searcher.searchpool import SearchPool

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Shard"].full_name


def load(index: str, shard: int | None, settings: Settings) -> IndexSearcher:
    """One shard of the published version (a shard server), or all of them (None: a router searching in-process)."""
    searcher = IndexSearcher(index, settings, only=None if shard is None else [shard])
    for s in searcher.shards:
        s.enable_fetch()
    return searcher


class ShardService(pb_grpc.ShardServicer):
    """Serves the newest published version of one shard (or of every shard, inside a router: shard None) and
    keeps the one before it, so a router can finish a rollout without mixing versions in one answer."""

    def __init__(self, searcher: IndexSearcher, index: str, shard: int | None, settings: Settings):
        self.index, self.number, self.settings = index, shard, settings
        self.label = "all" if shard is None else str(shard)  # in logs and metrics
        self.versions: dict[str, IndexSearcher] = {searcher.version: searcher}
        self.latest = searcher.version
        self.published = searcher.version  # what CURRENT named when last read
        self.failed_version = self.failed_error = ""
        self.behind_since: float | None = None  # monotonic: since when CURRENT names a version not served
        self.running: server.Running | None = None  # for readiness: set once serving
        self.serving = True
        # Searches off the event loop, several at once under load (several routers), each with its share of
        # the cores, one thread when small (searchpool.py). A shard server's small search while none runs stays
        # on its loop; a router's (shard None) never does: its loop has requests to overlap with the search.
        self.pool = SearchPool(inline_small=shard is not None)
        self.idle_streams: set[asyncio.Task] = set()  # SearchStream handlers waiting for their next message
        self.draining = False
        metrics.SHARD_LOAD_FAILURES.labels(self.label)  # 0 from the start: `increase` sees the first failure

    def lag(self) -> float:
        return 0.0 if self.behind_since is None else time.monotonic() - self.behind_since

    def pick(self, version: str) -> IndexSearcher:
        """The searcher of a pinned version when still held, else the newest (in-process: the router re-pins)."""
        return self.versions.get(version) or self.versions[self.latest]

    def _searcher(self, version: str) -> IndexSearcher:
        searcher = self.versions.get(version or self.latest)
        if searcher is None:
            raise Incompatible(f"shard {self.number} has versions {sorted(self.versions)}, not {version}")
        return searcher

    async def watch(self, interval: float) -> None:
        """Poll the index's CURRENT pointer; load a new version beside the old, then switch. A version that
        cannot load is kept visible (Info, metrics, log), and a shard that stays behind past
        IMSEARCH_MAX_VERSION_LAG_S reports NOT_SERVING so an orchestrator replaces it."""
        loop = asyncio.get_running_loop()
        store = open_store(self.index, self.settings)
        while True:
            await asyncio.sleep(interval)
            try:
                self.published = json.loads(await loop.run_in_executor(None, store.get_bytes, POINTER_KEY))["version"]
            except Exception as e:  # noqa: BLE001 - storage unreachable or the pointer damaged: keep serving
                log.warning("shard %s: cannot read the published version: %s", self.label, e)
            else:
                if self.published != self.latest:
                    await self._follow(self.published)
            await self._report()

    async def _follow(self, version: str) -> None:
        if self.behind_since is None:
            self.behind_since = time.monotonic()
        try:
            searcher = await asyncio.get_running_loop().run_in_executor(None, load, self.index, self.number,
                                                                        self.settings)
        except Exception as e:  # noqa: BLE001 - a half-published or broken version: keep serving what we have
            if (version, str(e)) != (self.failed_version, self.failed_error):
                log.error("shard %s: cannot load version %s (serving %s): %s", self.label, version, self.latest, e)
                metrics.SHARD_LOAD_FAILURES.labels(self.label).inc()
            self.failed_version, self.failed_error = version, str(e)[:500]
            return
        served = {self.latest: self.versions[self.latest], searcher.version: searcher}
        dropped = [s for v, s in self.versions.items() if v not in served]
        self.versions = served
        self.latest = searcher.version
        if dropped:  # their cached shard files, unless a version still served shares one
            kept = {sha for held in self.versions.values() for _, sha in held.files()}
            await asyncio.get_running_loop().run_in_executor(
                None, forget_cached, searcher.cache, [f for s in dropped for f in s.files()], kept)
        if self.latest == self.published:
            self.behind_since = None
            self.failed_version = self.failed_error = ""
        log.info("shard %s now serves version %s", self.label, self.latest)

    async def _report(self) -> None:
        lag = self.lag()
        metrics.SHARD_VERSION_LAG.labels(self.label).set(lag)
        serving = lag <= self.settings.max_version_lag_s
        if self.running is not None and serving != self.serving:
            self.serving = serving
            await self.running.set_serving(serving)
            if not serving:
                log.error("shard %s: %.0f s behind the published version %s: NOT_SERVING", self.label, lag,
                          self.published)

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
        searcher = self._searcher(request.index_version)  # one reference for the whole call: swaps can't split it
        if request.k == 0:
            raise InvalidInput("k must be at least 1")
        queries = unpack_queries(request.queries, request.dim)  # model or index vectors: search_arrays checks
        if len(queries) > self.settings.max_batch:
            raise TooLarge(f"{len(queries)} queries in one call; the limit is {self.settings.max_batch}")
        assign = unpack_assign(request, len(queries))
        where = parse_filter(request.filter) if request.filter else None  # a filter chooses its own lists
        D, I, _, uris = await self.pool.run(searcher.search_arrays, queries, request.k, request.nprobe or None,
                                            None if where else assign, where=where, rows=len(queries))
        return pb.ShardSearchResponse(**pack_results(D, I, uris), index_version=searcher.version,
                                      shard=self.number, latest_version=self.latest)

    @server.rpc
    async def Fetch(self, request: pb.FetchRequest, context) -> pb.FetchResponse:
        if len(request.ids) > self.settings.max_batch:
            raise TooLarge(f"{len(request.ids)} ids in one call; the limit is {self.settings.max_batch}")
        searcher = self._searcher("")
        found = self.fetch(searcher, list(request.ids))
        return pb.FetchResponse(vectors=[pb.Vector(values=[] if v is None else v.tolist()) for v in found],
                                found=[v is not None for v in found], index_version=searcher.version)

    @staticmethod
    def fetch(searcher: IndexSearcher, ids: list[int]) -> list:
        """Stored vectors of ids from whichever of the searcher's shards holds each (None: none does)."""
        found: list = [None] * len(ids)
        for shard in searcher.shards:
            for i, v in enumerate(shard.fetch(ids)):
                if v is not None:
                    found[i] = v
        return found

    def infos(self) -> list[pb.ShardInfo]:
        """Each served shard's Info (one for a shard server; every shard in-process)."""
        searcher = self._searcher("")
        manifest = searcher.manifest
        return [pb.ShardInfo(shard=s.entry.shard, count=s.entry.count, sha256=s.entry.sha256,
                             index_version=searcher.version, file=s.entry.file, dim=manifest.model_dim,
                             model_fingerprint=manifest.model.get("fingerprint", ""),
                             published_version=self.published, failed_version=self.failed_version,
                             failed_error=self.failed_error, version_lag_seconds=self.lag())
                for s in searcher.shards]

    @server.rpc
    async def Info(self, request, context) -> pb.ShardInfo:
        return self.infos()[0]

    def close(self) -> None:
        self.pool.shutdown()


async def serve(index: str, shard: int, port: int = 0, settings: Settings | None = None,
                host: str = "127.0.0.1") -> server.Running:
    """Load the shard, then start serving it; returns the running server (tests stop it)."""
    settings = settings or get_settings()
    searcher = await asyncio.get_running_loop().run_in_executor(None, load, index, shard, settings)
    service = ShardService(searcher, index, shard, settings)
    running = await server.start([(pb_grpc.add_ShardServicer_to_server, service, SERVICE)], port, settings, host)
    service.running = running
    running.on_stop.append(service.end_streams)
    running.tasks.append(asyncio.get_running_loop().create_task(service.watch(settings.reload_interval_s)))
    metrics.serve_metrics(settings.metrics_port, host)
    log.info("shard %d of %s (version %s) serving on %s:%d", shard, index, searcher.version, host, running.port)
    return running


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="serve one shard of an imsearch index over gRPC")
    ap.add_argument("--index", required=True, help="index root (folder or s3://)")
    ap.add_argument("--shard", type=int, required=True)
    ap.add_argument("--port", type=int, default=50061)
    ap.add_argument("--host", default="127.0.0.1")
    return ap


def main() -> None:
    args = build_parser().parse_args()

    async def start():
        return await serve(args.index, args.shard, args.port, host=args.host), None

    server.run_service(start, f"shard {args.shard}", args.host)


if __name__ == "__main__":
    main()
