"""Hostile clients against the real processes: what a client may choose freely (k, nprobe, the size and shape of a
body) must not grow the router or the gateway."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import psutil
import pytest

from services.common.config import Settings
from services.eval.synthetic import write_embeddings
from services.indexer.build import build_index
from services.searcher.client import RouterClient
from tests.helpers import random_unit_vectors

DIM = 16


def memory_kb(pid: int, field: str) -> int:
    """A process's VmRSS (resident now) or VmHWM (the most it was resident) in kB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


@pytest.fixture()
def small_index(tmp_path):
    settings = Settings(home=tmp_path / "home", flat_max=500)
    write_embeddings(tmp_path / "emb", random_unit_vectors(3000, DIM, seed=1, clusters=20))
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=2, settings=settings)
    return tmp_path


def test_the_router_stays_flat_over_20000_searches_of_distinct_k_and_nprobe(small_index, start_stack):
    """Before: a batcher (and its tasks) per distinct (k, nprobe), never dropped: ~5 KB a request."""
    router = start_stack(small_index / "idx", in_process=True, env={"IMSEARCH_HOME": str(small_index / "home")}).router
    queries = random_unit_vectors(64, DIM, seed=2, clusters=20)
    shapes = [(k, nprobe) for k in range(1, 21) for nprobe in range(1, 1001)]

    async def run(part: list[tuple[int, int]]) -> None:
        async with RouterClient(router.address, timeout=30) as client:
            async def worker(w: int) -> None:
                for i in range(w, len(part), 16):
                    k, nprobe = part[i]
                    reply = await client.search(list(queries[i % 64]), k=k, nprobe=nprobe)
                    assert 0 < len(reply.hits) <= k  # nprobe 1 may probe lists of fewer than k

            await asyncio.gather(*(worker(w) for w in range(16)))

    asyncio.run(run(shapes[:1000]))  # warm: every code path, every cache of a fixed size
    before = memory_kb(router.pid, "VmRSS")
    asyncio.run(run(shapes[1000:]))
    grown = memory_kb(router.pid, "VmRSS") - before
    assert grown <= 20 * 1024, f"the router grew by {grown / 1024:.0f} MB over {len(shapes) - 1000} searches"


def test_batch_bodies_of_more_queries_than_the_router_takes_are_refused_before_they_are_parsed(served):
    """Before: every query of a batch body was parsed into objects before the router refused past 256: a 1.7 MB
    body cost the gateway +124 MB."""
    stack = served(IMSEARCH_MAX_IMAGE_BYTES="2000000")  # a body limit of ~2 MB, to keep the uploads quick
    gateway = stack.gateway
    limit = 2_000_000 + 64 * 1024
    one = '{"id":"1"},'
    body = ('{"k":1,"queries":[' + one * ((limit - 40) // len(one)))[:-1] + "]}"
    assert limit - 100 < len(body) <= limit
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        ok = http.post("/v1/search/batch", json={"queries": [{"vector": [0.1] * 1280}], "k": 1})
        assert ok.status_code == 200, ok.text  # parsed and searched: the JSON path is warm
        for _ in range(40):  # bodies of this size cost the gateway a fixed ~35 MB of buffers, whatever they hold:
            # reach it first with bodies no route parses, so that what is measured is what parsing would add
            assert http.post("/v1/search", content=body, headers={"content-type": "text/plain"}).status_code == 400
        peak = memory_kb(gateway.pid, "VmHWM")
        for _ in range(200):
            r = http.post("/v1/search/batch", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 413 and r.json()["error"]["code"] == "RESOURCE_EXHAUSTED", r.text[:300]
            assert len(r.text) < 1000  # nothing of the body echoed back
        grown = memory_kb(gateway.pid, "VmHWM") - peak
    assert grown <= 20 * 1024, f"the gateway's peak grew by {grown / 1024:.0f} MB over 200 maximal bodies"
    assert psutil.pid_exists(gateway.pid)


def test_a_batch_of_as_many_queries_as_the_router_takes_still_goes_through(served):
    """The shape check's bound is generous: a batch of IMSEARCH_MAX_BATCH full-width vectors is searched."""
    gateway = served().gateway
    vectors = random_unit_vectors(256, 1280, seed=3)
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        r = http.post("/v1/search/batch", json={"queries": [{"vector": v} for v in vectors.tolist()], "k": 2})
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["results"]) == 256
