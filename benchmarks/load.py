"""Serving under load (README "Performance"): 2 shards x 2 replicas + router + Redis as real processes,
driven by the load generator (new vectors, Zipf-popular repeats, batch calls).

1. closed loop: the peak calls/s;  2. open loop at 70 % of it: p50 / p99 (target p99 <= 5 x p50);
3. the same open loop while one replica is killed: error rate (target 0);  4. --soak S: S seconds at
70 % in windows of 60 s, with memory (RSS) of every process and latency per window (drift).
The load client shares the machine's cores with the servers.
Usage: python -m benchmarks.load [--n 200000] [--seconds 20] [--soak 600]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
from pathlib import Path

import psutil

from services.common.config import Settings
from services.common.store import LocalStore
from services.embedder.embeddings import read_embeddings
from services.eval.synthetic import clustered_unit_vectors, write_embeddings
from services.indexer.build import build_index
from services.searcher.loadtest import Workload, run_load
from services.stack.stack import Stack, StackSpec

MIX = {"new": 0.1, "popular": 0.8, "batch": 0.1}


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--soak", type=float, default=0, help="seconds of soak at 70 % of peak (0: none)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_embeddings(tmp / "emb", clustered_unit_vectors(args.n, 128, seed=1, clusters=200))
        build_index(str(tmp / "emb"), str(tmp / "idx"), shards=2, settings=Settings(home=tmp / "home"))
        pool = list(read_embeddings(LocalStore(tmp / "emb")).vectors[:2000])
        env = {"IMSEARCH_HOME": str(tmp / "home")}
        with Stack(StackSpec(str(tmp / "idx"), replicas=2, redis=True, router_index=False, env=env)).up() as stack:
            router, replicas = stack.router, stack.shards
            procs = [router, *(r for g in replicas for r in g)]

            def load(seconds: float, rate: float = 0.0, seed: int = 0) -> dict:
                work = Workload([], pool, zipf=1.1, batch=16)
                work.rng.seed(seed)
                return asyncio.run(run_load(router.address, work, MIX, seconds, args.concurrency, rate)).summary()

            load(3)  # warm-up
            peak = load(args.seconds)
            rate = 0.7 * peak["qps"]
            steady = load(args.seconds, rate, seed=1)
            killer = threading.Timer(args.seconds / 3, replicas[0][0].kill)
            killer.start()
            killed = load(args.seconds, rate, seed=2)
            results = {"peak": peak, "at_70pct": steady, "replica_killed_at_70pct": killed,
                       "p99_over_p50_at_70pct": round(steady["p99_ms"] / steady["p50_ms"], 2)}
            if args.soak:
                windows = []
                for w in range(int(args.soak // 60)):
                    r = load(60, rate, seed=10 + w)
                    windows.append({"minute": w + 1, "qps": r["qps"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
                                    "errors": r["error_rate"], "cache_hit_rate": r["cache_hit_rate"],
                                    "rss_mib": {"router": round(rss_mib(router.pid)),
                                                "shards": [round(rss_mib(p.pid)) for p in procs[1:]
                                                           if p.running()]}})
                    print(json.dumps(windows[-1]), flush=True)
                results["soak"] = windows
    print(json.dumps(results, indent=1))
    print(f"peak {peak['qps']} calls/s; at 70 %: p50 {steady['p50_ms']} ms, p99 {steady['p99_ms']} ms "
          f"(p99/p50 {results['p99_over_p50_at_70pct']}), cache hit rate {steady['cache_hit_rate']}; "
          f"replica killed: error rate {killed['error_rate']}, partial {killed['partial_answers']}")


if __name__ == "__main__":
    main()
