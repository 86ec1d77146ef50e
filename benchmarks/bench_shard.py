"""What one fan-out leg costs a shard server: its CPU per search message, as a stream message (the router's
default) and as a unary call, with and without the router's coarse assignment, for a few batch sizes.

One shard server (a real process) of a 100k × 128 index in 4 shards; this process sends one search at a time
through a ReplicaSet, as a router's fan-out does, and reads the server's CPU time before and after.

    python -m benchmarks.bench_shard [--n 100000] [--seconds 3] [--batches 1,6,32]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from benchmarks.cpu import cpu_seconds
from protos.imsearch.v1 import imsearch_pb2 as pb
from services.common.config import Settings
from services.common.convert import pack_assign, pack_queries
from services.common.store import open_store
from services.eval.synthetic import clustered_unit_vectors, write_embeddings
from services.index.shards import load_quantizer
from services.index.versions import load_current
from services.indexer.build import build_index
from services.searcher.legs import Outgoing
from services.searcher.replicas import ReplicaSet
from services.stack.part import Part


async def per_message(address: str, pid: int, request: pb.ShardSearchRequest, streams: bool,
                      seconds: float) -> tuple[float, float]:
    """(messages/s, the server's CPU ms per message) of one search at a time for `seconds`."""
    replicas = ReplicaSet(0, [address], Settings(shard_streams=streams), None)
    loop = asyncio.get_running_loop()
    try:
        await replicas.ask("Search", Outgoing(request), loop.time() + 10)  # connected (and the stream open)
        before, start, n = cpu_seconds(pid), time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            if await replicas.ask("Search", Outgoing(request), loop.time() + 10) is None:
                raise SystemExit("the shard server did not answer")
            n += 1
        wall = time.perf_counter() - start
        return n / wall, 1000 * (cpu_seconds(pid) - before) / n
    finally:
        await replicas.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--batches", default="1,6,32", help="queries per message")
    args = ap.parse_args()
    x = clustered_unit_vectors(args.n + 500, 128, seed=0, clusters=1000, noise=0.6)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        settings = Settings(home=tmp / "home")
        write_embeddings(tmp / "emb", x[:args.n])
        m = build_index(str(tmp / "emb"), str(tmp / "idx"), shards=4, settings=settings, step=lambda s: None)
        store = open_store(str(tmp / "idx"), settings)
        quantizer = load_quantizer(store, load_current(store))
        shard = Part.python("shard", "services.searcher", ["shard", "--index", str(tmp / "idx"), "--shard", "0"],
                            env={"IMSEARCH_HOME": str(tmp / "home"), "IMSEARCH_METRICS_PORT": "0"},
                            log=tmp / "shard.log").start()
        print(f"one shard server of {args.n:,} × 128 in 4 shards ({m.factory}, nprobe {m.nprobe})")
        try:
            for b in (int(v) for v in args.batches.split(",")):
                queries = x[args.n:args.n + b]
                data, dim = pack_queries(queries)
                plain = pb.ShardSearchRequest(queries=data, dim=dim, k=10, nprobe=m.nprobe)
                assigned = pb.ShardSearchRequest()
                assigned.CopyFrom(plain)
                if quantizer is not None:
                    assigned.MergeFrom(pb.ShardSearchRequest(**pack_assign(*quantizer.search(queries, m.nprobe))))
                for label, request in (("router's assignment", assigned), ("shard assigns", plain)):
                    row = []
                    for streams in (True, False):
                        rate, ms = asyncio.run(per_message(shard.address, shard.pid, request, streams, args.seconds))
                        row.append((rate, ms))
                    (rs, ms_s), (ru, ms_u) = row
                    print(f"{b:3d} queries, {label}: stream {ms_s:.3f} ms CPU a message ({rs:,.0f}/s), unary "
                          f"{ms_u:.3f} ({ru:,.0f}/s): stream / unary CPU {ms_s / ms_u:.2f}", flush=True)
        finally:
            shard.stop()


if __name__ == "__main__":
    main()
