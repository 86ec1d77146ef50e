"""Shard server: one shard of a published index behind gRPC.

    python -m services.searcher.shard --index s3://b/idx --shard 3 --port 50061
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from protos.imsearch.v1 import imsearch_pb2 as pb
from protos.imsearch.v1 import imsearch_pb2_grpc as pb_grpc
from services.common import metrics, server
from services.common.config import Settings, get_settings
from services.common.convert import hits_to_proto, vectors_from_proto
from services.common.errors import Incompatible, InvalidInput, TooLarge
from services.searcher.local import IndexSearcher

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Shard"].full_name


class ShardService(pb_grpc.ShardServicer):
    def __init__(self, searcher: IndexSearcher, settings: Settings):
        self.searcher, self.settings = searcher, settings
        self.number = searcher.shards[0].entry.shard

    @server.rpc
    async def Search(self, request: pb.ShardSearchRequest, context) -> pb.ShardSearchResponse:
        version = self.searcher.version
        if request.index_version and request.index_version != version:
            raise Incompatible(f"shard {self.number} serves index version {version}, not {request.index_version}")
        if len(request.queries) > self.settings.max_batch:
            raise TooLarge(f"{len(request.queries)} queries in one call; the limit is {self.settings.max_batch}")
        if request.k == 0:
            raise InvalidInput("k must be at least 1")
        queries = vectors_from_proto(request.queries, self.searcher.manifest.dim)
        hits = await asyncio.get_running_loop().run_in_executor(
            None, self.searcher.search, queries, request.k, request.nprobe or None)
        return pb.ShardSearchResponse(results=[hits_to_proto(h) for h in hits], index_version=version,
                                      shard=self.number)

    @server.rpc
    async def Fetch(self, request: pb.FetchRequest, context) -> pb.FetchResponse:
        if len(request.ids) > self.settings.max_batch:
            raise TooLarge(f"{len(request.ids)} ids in one call; the limit is {self.settings.max_batch}")
        found = self.searcher.shards[0].fetch(list(request.ids))
        return pb.FetchResponse(vectors=[pb.Vector(values=[] if v is None else v.tolist()) for v in found],
                                found=[v is not None for v in found], index_version=self.searcher.version)

    @server.rpc
    async def Info(self, request, context) -> pb.ShardInfo:
        entry = self.searcher.shards[0].entry
        manifest = self.searcher.manifest
        return pb.ShardInfo(shard=entry.shard, count=entry.count, sha256=entry.sha256,
                            index_version=self.searcher.version, file=entry.file, dim=manifest.dim,
                            model_fingerprint=manifest.model.get("fingerprint", ""))


async def serve(index: str, shard: int, port: int = 0, settings: Settings | None = None,
                host: str = "127.0.0.1") -> server.Running:
    """Load the shard, then start serving it; returns the running server (tests stop it)."""
    settings = settings or get_settings()
    searcher = await asyncio.get_running_loop().run_in_executor(
        None, lambda: IndexSearcher(index, settings, only=[shard]))
    searcher.shards[0].enable_fetch()
    service = ShardService(searcher, settings)
    running = await server.start([(pb_grpc.add_ShardServicer_to_server, service, SERVICE)], port, settings, host)
    metrics.serve_metrics(settings.metrics_port, host)
    log.info("shard %d of %s (version %s) serving on %s:%d", shard, index, searcher.version, host, running.port)
    return running


def main() -> None:
    ap = argparse.ArgumentParser(description="serve one shard of an imsearch index over gRPC")
    ap.add_argument("--index", required=True, help="index root (folder or s3://)")
    ap.add_argument("--shard", type=int, required=True)
    ap.add_argument("--port", type=int, default=50061)
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)

    async def run() -> None:
        running = await serve(args.index, args.shard, args.port, host=args.host)
        print(f"shard {args.shard} serving on {args.host}:{running.port}", flush=True)
        await server.wait_for_signal(running)

    asyncio.run(run())


if __name__ == "__main__":
    main()
