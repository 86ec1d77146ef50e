"""The router's single-query rate over remote shard servers against the floor of the transport: a bare Python
gRPC echo server and client on the same machine, in the same run (issue 20, "many machines at the transport
floor").

Starts an echo server (grpc.aio, one generic unary method returning its request), measures the QPS of C
concurrent clients calling it with a query-sized message; then builds an index in S shards, starts S shard
servers and a router (real processes, no cache), and measures the same clients' single-vector Search QPS, for
S shards and for 1 shard (what one fan-out leg costs). Everything shares this machine's cores; each row says
the CPU each process spent per call (where the rest goes).

Then the router's legs as streams (the default) against unary calls (IMSEARCH_SHARD_STREAMS=false): a second
router over the same S shard servers, the two measured in turns (--rounds), so the host's drift between runs
(up to ±25 % here) falls on both alike.

    python -m benchmarks.bench_transport [--n 100000] [--shards 4] [--clients 16] [--seconds 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np

from benchmarks.cpu import idle_share, per_call_ms, with_cpu
from services.common.config import Settings
from services.eval.synthetic import clustered_unit_vectors, write_embeddings
from services.indexer.build import build_index
from services.searcher.client import RouterClient, search_request
from services.stack.part import Part, free_port
from services.stack.stack import Stack, StackSpec, shards_arg

METHOD = "/bench.Echo/Echo"


async def serve_echo(port: int) -> None:
    def echo(request: bytes, context) -> bytes:
        return request

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(
        echo, request_deserializer=None, response_serializer=None)})
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"echo serving on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


async def closed_loop(call, clients: int, seconds: float) -> float:
    """Calls per second of `clients` concurrent loops of `call()` for `seconds`."""
    done = 0
    end = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await call()
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(clients)))
    return done / (time.perf_counter() - start)


async def echo_qps(port: int, payload: bytes, clients: int, seconds: float) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        echo = channel.unary_unary(METHOD)
        await echo(payload)
        return await closed_loop(lambda: echo(payload), clients, seconds)


def fanouts_made(metrics_port: int) -> float:
    """The router's imsearch_fanouts_total, from its /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith("imsearch_fanouts_total "))


async def router_qps(address: str, queries: np.ndarray, clients: int, seconds: float) -> float:
    client = RouterClient(address, timeout=30)
    try:
        requests = [search_request(q, 10) for q in queries]
        await client.call("Search", requests[0])
        i = 0

        def call():
            nonlocal i
            i += 1
            return client.call("Search", requests[i % len(requests)])

        return await closed_loop(call, clients, seconds)
    finally:
        await client.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=3, help="turns of the streams-vs-unary comparison (0: skip)")
    ap.add_argument("--serve-echo", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_echo:
        asyncio.run(serve_echo(args.serve_echo))
        return

    x = clustered_unit_vectors(args.n + 500, args.dim, seed=0, clusters=1000, noise=0.6)
    data, queries = x[:args.n], x[args.n:]
    payload = search_request(queries[0], 10).SerializeToString()  # a query-sized message
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        echo = Part("echo", [sys.executable, "-m", "benchmarks.bench_transport", "--serve-echo", str(port)], port,
                    "port", log=tmp / "echo.log").start()
        try:
            echo.wait(30)
            floor, wall, cpu = with_cpu({"client": os.getpid(), "echo server": echo.pid},
                                        lambda: asyncio.run(echo_qps(echo.port, payload, args.clients, args.seconds)))
        finally:
            echo.stop()
        print(f"echo floor: {floor:,.0f} calls/s ({args.clients} clients, {len(payload)}-byte messages); "
              f"{per_call_ms(cpu, floor * wall)}")
        settings = Settings(home=tmp / "home")
        write_embeddings(tmp / "emb", data)
        results = {}
        for shards in sorted({args.shards, 1}, reverse=True):
            root = tmp / f"idx-{shards}"
            m = build_index(str(tmp / "emb"), str(root), shards=shards, settings=settings, step=lambda s: None)
            metrics = free_port()
            with Stack(StackSpec(str(root), router_index=True, env={"IMSEARCH_HOME": str(tmp / "home")},
                                 metrics_port=metrics), tmp / f"stack-{shards}").up() as stack:
                pids = {"client": os.getpid(), "router": stack.router.pid} | {
                    f"shard {n}": group[0].pid for n, group in enumerate(stack.shards)}
                fanouts = fanouts_made(metrics)
                (results[shards], wall, cpu), idle = idle_share(lambda: with_cpu(pids, lambda: asyncio.run(
                    router_qps(stack.router.address, queries, args.clients, args.seconds))))
                per_fanout = results[shards] * wall / max(fanouts_made(metrics) - fanouts, 1)
                print(f"router over {shards} shard server(s) ({m.factory}, nprobe {m.nprobe}): "
                      f"{results[shards]:,.0f} single queries/s = {results[shards] / floor:.2f} x the echo floor; "
                      f"{per_call_ms(cpu, results[shards] * wall)}; {per_fanout:.1f} queries a fan-out, "
                      f"{idle:.0%} of the machine's CPU idle", flush=True)
                if shards == args.shards and args.rounds:
                    streams_vs_unary(stack, root, tmp, queries, args)


def streams_vs_unary(stack: Stack, root: Path, tmp: Path, queries: np.ndarray, args) -> None:
    """The stack's router (streams) and a second one with unary legs over the same shard servers, in turns."""
    unary = Part.python("router-unary", "services.searcher", [
        "router", "--shards", shards_arg(stack.shards), "--index", str(root), "--host", "127.0.0.1"],
        env={"IMSEARCH_HOME": str(tmp / "home"), "IMSEARCH_SHARD_STREAMS": "false", "IMSEARCH_METRICS_PORT": "0"},
        log=tmp / "router-unary.log").start()
    try:
        rates: dict[str, list[float]] = {"streams": [], "unary": []}
        for _ in range(args.rounds):
            for name, address in (("streams", stack.router.address), ("unary", unary.address)):
                rates[name].append(asyncio.run(router_qps(address, queries, args.clients, args.seconds / 2)))
    finally:
        unary.stop()
    mean = {name: float(np.mean(r)) for name, r in rates.items()}
    turns = "; ".join(f"{name} {' '.join(f'{q:,.0f}' for q in r)} (mean {mean[name]:,.0f})"
                      for name, r in rates.items())
    print(f"legs as streams vs unary calls over the same {args.shards} shard servers, {args.rounds} turns of "
          f"{args.seconds / 2:g} s: {turns} queries/s: streams / unary = {mean['streams'] / mean['unary']:.2f}",
          flush=True)


if __name__ == "__main__":
    main()
