"""Load generator for the router (gRPC): a mix of new images, popular repeated queries (Zipf) and batch
calls, closed loop (as fast as N clients go) or open loop at a fixed rate, for a bounded time.

Reports throughput, latency percentiles, error rate by status, and the cache hit rate of the repeats.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from services.common.config import Settings
from services.common.errors import InvalidInput
from services.common.store import open_store
from services.index.docs import all_docs
from services.index.versions import load_current
from services.searcher.client import RouterClient, batch_request, search_request, to_query

KINDS = ("new", "popular", "batch")


def parse_mix(text: str) -> dict[str, float]:
    """'new=0.2,popular=0.7,batch=0.1' -> weights (normalised)."""
    mix: dict[str, float] = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if name not in KINDS or weight < 0:
            raise InvalidInput(f"mix entry {part!r}: use new=W, popular=W, batch=W with weights >= 0")
        mix[name] = weight
    total = sum(mix.values())
    if total <= 0:
        raise InvalidInput("the mix needs at least one positive weight")
    return {k: v / total for k, v in mix.items()}


@dataclass
class Workload:
    """What the queries are made of: new images (bytes) and a pool of popular queries (catalogue ids)."""
    images: list[bytes]
    popular: list  # catalogue ids (int), or query vectors (np.ndarray rows)
    zipf: float = 1.1
    batch: int = 16
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def __post_init__(self):
        ranks = np.arange(1, len(self.popular) + 1, dtype=np.float64)
        self.weights = (1.0 / ranks ** self.zipf).tolist()
        self.queries = [to_query(q) for q in self.popular]

    def request(self, kind: str):
        if kind == "new" and self.images:
            return "Search", search_request(self.rng.choice(self.images))
        if kind == "new":  # no images: a never-seen vector near a popular one (a cache miss every time)
            base = self.queries[self.rng.randrange(len(self.queries))]
            if base.WhichOneof("query") != "vector":
                raise InvalidInput("'new' queries need --images, or a pool of vectors")
            v = np.asarray(base.vector.values, np.float32)
            v = v + np.float32(0.05) * np.asarray([self.rng.gauss(0, 1) for _ in range(len(v))], np.float32)
            return "Search", search_request(v / np.linalg.norm(v))
        if kind == "popular":
            query = self.rng.choices(self.queries, self.weights)[0]
            return "Search", search_request(query)
        return "SearchBatch", batch_request(self.rng.choices(self.queries, k=self.batch), columnar=True)


@dataclass
class Report:
    seconds: float
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    statuses: Counter = field(default_factory=Counter)
    cache: Counter = field(default_factory=Counter)  # popular single queries: hit / miss
    partial: int = 0

    @property
    def calls(self) -> int:
        return sum(self.statuses.values())

    def summary(self) -> dict:
        every = [x for v in self.latencies.values() for x in v]
        errors = self.calls - self.statuses.get("OK", 0)

        def pct(values, q):
            return round(float(np.percentile(values, q)) * 1000, 2) if values else None

        out = {"seconds": round(self.seconds, 2), "calls": self.calls, "qps": round(self.calls / self.seconds, 1),
               "error_rate": round(errors / self.calls, 5) if self.calls else 0.0, "statuses": dict(self.statuses),
               "partial_answers": self.partial, "p50_ms": pct(every, 50), "p95_ms": pct(every, 95),
               "p99_ms": pct(every, 99)}
        hits, total = self.cache.get("hit", 0), sum(self.cache.values())
        out["cache_hit_rate"] = round(hits / total, 4) if total else None
        out["by_kind"] = {k: {"calls": len(v), "p50_ms": pct(v, 50), "p99_ms": pct(v, 99)}
                          for k, v in self.latencies.items() if v}
        return out


async def run_load(address: str, work: Workload, mix: dict[str, float], seconds: float, concurrency: int = 8,
                   rate: float = 0.0, token: str | None = None, timeout: float = 10.0,
                   tls_ca: str | None = None) -> Report:
    """Closed loop (rate 0: each of `concurrency` clients sends as soon as its last answer came) or open
    loop (rate > 0: calls start on a fixed schedule, at most `concurrency` * 8 in flight)."""
    kinds, weights = list(mix), list(mix.values())
    report = Report(seconds)
    async with RouterClient(address, token, timeout, tls_ca=tls_ca) as client:

        async def one() -> None:
            kind = work.rng.choices(kinds, weights)[0]
            method, request = work.request(kind)
            start = time.perf_counter()
            try:
                reply = await client.call(method, request)
                report.statuses["OK"] += 1
                report.latencies[kind].append(time.perf_counter() - start)
                report.partial += reply.coverage < 1.0
                if kind == "popular":
                    report.cache["hit" if reply.cached else "miss"] += 1
            except grpc.aio.AioRpcError as e:
                report.statuses[e.code().name] += 1

        end = time.perf_counter() + seconds
        if rate <= 0:
            async def caller() -> None:
                while time.perf_counter() < end:
                    await one()

            await asyncio.gather(*(caller() for _ in range(concurrency)))
        else:
            slots = asyncio.Semaphore(concurrency * 8)
            tasks, next_at = [], time.perf_counter()
            while next_at < end:
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                if slots.locked():
                    report.statuses["CLIENT_OVERLOADED"] += 1  # counted, not hidden: the server fell behind
                else:
                    await slots.acquire()
                    task = asyncio.create_task(one())
                    task.add_done_callback(lambda _: slots.release())
                    tasks.append(task)
                next_at += 1.0 / rate
            await asyncio.gather(*tasks)
    report.seconds = seconds
    return report


def popular_pool(index_url: str, n: int, settings: Settings) -> list[int]:
    """n catalogue ids of the published version, in a fixed random order (the Zipf ranks)."""
    store = open_store(index_url, settings)
    ids, _ = all_docs(store, load_current(store))
    return np.random.default_rng(0).permutation(ids)[:n].tolist()


def load_images(folder: str | Path, limit: int = 200) -> list[bytes]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:limit]
    if not files:
        raise InvalidInput(f"no .jpg/.png images in {folder} for the 'new' queries")
    return [p.read_bytes() for p in files]
