"""The searcher's two processes:

    python -m services.searcher router --shards h:50061,h:50062 --index idx/ [--port 50050]
    python -m services.searcher router --shards local --index idx/       (one host: no shard servers)
    python -m services.searcher router --collections collections.json
    python -m services.searcher shard --index s3://b/idx --shard 3 [--port 50061]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from services.common import server
from services.searcher import service, shard
from services.searcher.collections import DEFAULT, CollectionSpec


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m services.searcher", description="imsearch searcher processes")
    roles = ap.add_subparsers(dest="role", required=True)
    router = roles.add_parser("router", help="the Searcher API: fan-out search over shard servers, or over every "
                                             "shard in this process")
    router.add_argument("--shards", help="host:port[|replica],... one group per shard; or, with --shard-count, "
                                         "one group naming the shard as {i}; or 'local': every shard of --index "
                                         "searched inside this process (one host)")
    router.add_argument("--collections", type=Path, help="a collections file (JSON: name -> index and shards), "
                                                         "followed while serving [IMSEARCH_COLLECTIONS]")
    router.add_argument("--shard-count", type=int, help="expand a --shards template on {i} to this many shards")
    router.add_argument("--index", help="index root: the router then assigns IVF lists once for all shards, and "
                                        "embeds query images with the index's model (unless --embedder)")
    router.add_argument("--embedder", help="host:port of an Embedder service for query images")
    router.add_argument("--port", type=int, default=50050)
    router.add_argument("--host", default="127.0.0.1")
    one = roles.add_parser("shard", help="serve one shard of an index over gRPC")
    one.add_argument("--index", required=True, help="index root (folder or s3://)")
    one.add_argument("--shard", type=int, required=True)
    one.add_argument("--port", type=int, default=50061)
    one.add_argument("--host", default="127.0.0.1")
    return ap


def run_router(args: argparse.Namespace) -> None:
    async def start():
        default = CollectionSpec(DEFAULT, args.shards, args.index, args.embedder, args.shard_count) \
            if args.shards else None
        running, served = await service.serve(default, args.port, host=args.host, collections=args.collections)
        return running, served.close

    server.run_service(start, "router", args.host)


def run_shard(args: argparse.Namespace) -> None:
    async def start():
        return await shard.serve(args.index, args.shard, args.port, host=args.host), None

    server.run_service(start, f"shard {args.shard}", args.host)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    (run_router if args.role == "router" else run_shard)(args)


if __name__ == "__main__":
    main()
