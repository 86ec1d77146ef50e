"""The router's Redis cache with a real redis-server: hits, single flight, Redis down and back."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request

import grpc
import pytest

from protos.imsearch.v1 import imsearch_pb2 as pb
from protos.imsearch.v1 import imsearch_pb2_grpc as pb_grpc
from services.common.config import Settings
from services.indexer.build import build_index
from services.searcher.client import SearchClient
from services.stack.part import free_port
from tests.helpers import random_unit_vectors, write_fake_embeddings

DIM = 16


def fanouts(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return float(re.search(r"^imsearch_fanouts_total (\S+)$", text, re.M).group(1))


@pytest.fixture()
def cached_cluster(tmp_path, start_stack):
    x = random_unit_vectors(2000, DIM, seed=3, clusters=10)
    write_fake_embeddings(tmp_path / "emb", x)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=2, settings=Settings(home=tmp_path / "h"))
    metrics_port = free_port()
    stack = start_stack(tmp_path / "idx", redis=True, router_index=False, metrics_port=metrics_port,
                        env={"IMSEARCH_HOME": str(tmp_path / "h")})
    return stack.router, stack.redis, metrics_port


def test_repeated_query_is_served_from_the_cache(cached_cluster):
    router, _, metrics_port = cached_cluster
    q = random_unit_vectors(1, DIM, seed=1)[0]
    with SearchClient(router.address) as client:
        first = client.search(q, k=5)
        before = fanouts(metrics_port)
        second = client.search(q, k=5)
        other_k = client.search(q, k=6)
    assert first.hits and [h.id for h in second.hits] == [h.id for h in first.hits]
    assert not first.cached and second.cached and not other_k.cached
    assert fanouts(metrics_port) == before + 1  # the k=6 query is another key; the repeat is not
    assert other_k.hits[:5] == first.hits


def test_feedback_is_part_of_the_cache_key(cached_cluster):
    router, _, _ = cached_cluster
    q = random_unit_vectors(1, DIM, seed=2)[0]
    with SearchClient(router.address) as client:
        plain = client.search(q, k=10)
        liked = plain.hits[-1].id
        with_feedback = client.search(q, k=10, relevant=[liked])
        again = client.search(q, k=10, relevant=[liked])
        plain_again = client.search(q, k=10)
    assert not with_feedback.cached and again.cached and plain_again.cached
    assert [h.id for h in again.hits] == [h.id for h in with_feedback.hits] != [h.id for h in plain.hits]
    assert [h.id for h in plain_again.hits] == [h.id for h in plain.hits]


def test_200_concurrent_identical_queries_make_one_fan_out(cached_cluster):
    router, _, metrics_port = cached_cluster
    q = random_unit_vectors(1, DIM, seed=2)[0].tolist()
    before = fanouts(metrics_port)

    async def storm():
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = pb_grpc.SearcherStub(channel)
            req = pb.SearchRequest(query=pb.Query(vector=pb.Vector(values=q)), k=10)
            return await asyncio.gather(*(stub.Search(req, timeout=30) for _ in range(200)))

    replies = asyncio.run(storm())
    assert len({tuple(h.id for h in r.hits) for r in replies}) == 1
    assert fanouts(metrics_port) == before + 1


def test_a_cancelled_or_hurried_caller_does_not_fail_the_identical_queries_sharing_its_flight(tmp_path, start_stack):
    """Before: the shared execution ran in the first caller's task with the first caller's deadline — a client that
    cancelled failed every identical query waiting on it, one with a 50 ms deadline made them all partial."""
    import os
    import signal

    from services.searcher.client import RouterClient, search_request

    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(2000, DIM, seed=3, clusters=10))
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=2, settings=Settings(home=tmp_path / "h"))
    stack = start_stack(tmp_path / "idx", redis=True, router_index=False,
                        env={"IMSEARCH_HOME": str(tmp_path / "h"), "IMSEARCH_SHARD_TIMEOUT_S": "10"})
    shard = stack.shards[0][0]

    async def scenario(hurry: str, q: list[float]) -> list:
        async with RouterClient(stack.router.address, timeout=20) as client:
            await client.search(random_unit_vectors(1, DIM, seed=9)[0].tolist(), k=5)  # streams open, version known
            os.kill(shard.pid, signal.SIGSTOP)  # from here the fan-out waits on shard 0
            try:
                timeout = 0.05 if hurry == "deadline" else None
                leader = asyncio.ensure_future(client.call("Search", search_request(q, 5), timeout=timeout))
                await asyncio.sleep(0.01)
                followers = [asyncio.ensure_future(client.search(q, k=5)) for _ in range(5)]
                await asyncio.sleep(0.3)  # every follower waits on the leader's flight
                if hurry == "cancel":
                    leader.cancel()
                await asyncio.gather(leader, return_exceptions=True)  # cancelled, or answered within its 50 ms
            finally:
                os.kill(shard.pid, signal.SIGCONT)
            return await asyncio.gather(*followers)

    for n, hurry in enumerate(("cancel", "deadline")):
        answers = asyncio.run(scenario(hurry, random_unit_vectors(1, DIM, seed=20 + n)[0].tolist()))
        assert [(a.coverage, len(a.hits)) for a in answers] == [(1.0, 5)] * 5, hurry


def test_an_answer_forged_by_whoever_can_write_redis_is_never_served(cached_cluster):
    """Before: the seal was an unkeyed sha256 of key, version and answer, which anyone able to write Redis could
    compute for any answer they liked."""
    import hashlib

    import redis

    from services.searcher.cache import seal

    router, rds, metrics_port = cached_cluster
    q = random_unit_vectors(1, DIM, seed=31)[0]
    with SearchClient(router.address) as client:
        truth = client.search(q, k=5)
        db = redis.Redis(port=rds.port)
        (key,) = list(db.scan_iter("imsearch:q:*"))  # the one entry: this query's
        version = truth.index_version.encode()
        fake = pb.SearchResponse(hits=[pb.Hit(id=424242, score=1.0)], index_version=truth.index_version,
                                 coverage=1.0).SerializeToString()
        unkeyed = b"imsearch-cache/1\n" + version + b"\n" + hashlib.sha256(
            key + b"|" + version + b"|" + fake).digest() + fake  # the old seal, for any answer
        for forged in (unkeyed, seal(key.decode(), truth.index_version, fake, b"a guessed secret")):
            for k in db.scan_iter("imsearch:q:*"):
                db.set(k, forged)
            again = client.search(q, k=5)
            assert [h.id for h in again.hits] == [h.id for h in truth.hits] and not again.cached


def test_redis_down_serves_uncached_and_recovers(cached_cluster):
    router, rds, _ = cached_cluster
    q = random_unit_vectors(1, DIM, seed=3)[0]
    with SearchClient(router.address) as client:
        client.search(q)
        assert client.search(q).cached
        rds.stop()
        for _ in range(5):
            reply = client.search(q)
            assert reply.coverage == 1.0 and not reply.cached  # no errors to clients, just no cache
        rds.start()
        deadline = time.monotonic() + 30
        while not (reply := client.search(q)).cached and time.monotonic() < deadline:
            time.sleep(0.1)
        assert reply.cached  # the cache is used again once Redis is back (it came back empty)


def test_concurrent_distinct_queries_share_fan_outs(cached_cluster):
    router, _, metrics_port = cached_cluster
    queries = random_unit_vectors(100, DIM, seed=5)
    before = fanouts(metrics_port)

    async def burst():
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = pb_grpc.SearcherStub(channel)
            reqs = [pb.SearchRequest(query=pb.Query(vector=pb.Vector(values=q.tolist())), k=5) for q in queries]
            return await asyncio.gather(*(stub.Search(r, timeout=30) for r in reqs))

    replies = asyncio.run(burst())
    assert all(r.coverage == 1.0 and len(r.hits) == 5 for r in replies)
    assert fanouts(metrics_port) - before < len(queries)  # batched: fewer fan-outs than queries


def cache_rejected(metrics_port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^imsearch_cache_rejected_total\{reason="(\w+)"\} (\S+)$', text, re.M)}


def test_poisoned_cache_values_are_misses_never_errors_or_wrong_hits(cached_cluster):
    import redis

    from services.searcher.cache import seal

    router, rds, metrics_port = cached_cluster
    queries = random_unit_vectors(12, DIM, seed=9)
    with SearchClient(router.address) as client:
        truth = [[h.id for h in client.search(q, k=5).hits] for q in queries]  # fills 12 cache keys
        db = redis.Redis(port=rds.port)
        keys = sorted(db.scan_iter("imsearch:q:*"))
        assert len(keys) == 12
        values = [db.get(k) for k in keys]
        version = client.search(queries[0], k=5).index_version
        poison = [b"garbage", values[0][:40], values[1][:-3],  # garbage, truncated twice
                  seal(keys[3].decode(), "v-another", values[3][-50:], b"any"),  # another version's answer
                  values[5]]  # another key's sealed answer: well-formed, the wrong hits
        for i, key in enumerate(keys):
            db.set(key, poison[i % len(poison)])
        again = [client.search(q, k=5) for q in queries]
        third = [client.search(q, k=5) for q in queries]
    assert [[h.id for h in r.hits] for r in again] == truth  # 0 wrong hits, 0 errors
    assert not any(r.cached for r in again) and all(r.cached for r in third)  # missed, then overwritten
    assert [[h.id for h in r.hits] for r in third] == truth and version
    rejected = cache_rejected(metrics_port)
    assert rejected.get("format", 0) >= 3 and rejected.get("checksum", 0) >= 3 and rejected.get("version", 0) >= 2
