"""Shard servers and the router as real processes: search, partial answers, bad input, auth."""

from __future__ import annotations

import time

import numpy as np
import pytest
from grpc import RpcError, StatusCode

from services.common.config import Settings
from services.indexer.build import build_index
from services.searcher.client import SearchClient
from services.searcher.feedback import rocchio
from services.searcher.local import IndexSearcher
from services.stack.part import free_port
from tests.helpers import random_unit_vectors, write_fake_embeddings

DIM, SHARDS = 16, 3


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    x = random_unit_vectors(3000, DIM, seed=7, clusters=20)
    write_fake_embeddings(tmp / "emb", x)
    build_index(str(tmp / "emb"), str(tmp / "idx"), shards=SHARDS, settings=Settings(home=tmp / "home"))
    return tmp


@pytest.fixture()
def cluster(index, tmp_path, start_stack):
    """SHARDS shard servers + a router, each its own process; always stopped."""
    stack = start_stack(index / "idx", router_index=False, env={"IMSEARCH_HOME": str(tmp_path / "home")})
    return [group[0] for group in stack.shards], stack.router


def code_of(fn) -> StatusCode:
    with pytest.raises(RpcError) as e:
        fn()
    return e.value.code()


def test_router_answers_like_the_in_process_searcher(index, cluster):
    _, router = cluster
    local = IndexSearcher(str(index / "idx"), Settings(home=index / "home"))
    queries = random_unit_vectors(20, DIM, seed=8, clusters=20)
    with SearchClient(router.address) as client:
        results = client.search_batch(list(queries), k=10)
        single = client.search(queries[0], k=10)
    expected = local.search(queries, k=10)
    assert [[h.id for h in r.hits] for r in results] == [[h.id for h in e] for e in expected]
    assert all(r.coverage == 1.0 and not r.missing_shards and r.index_version == local.version for r in results)
    assert [h.uri for h in single.hits] == [h.uri for h in expected[0]]


def test_columnar_batch_answers_match_per_query_results(index, cluster):
    _, router = cluster
    local = IndexSearcher(str(index / "idx"), Settings(home=index / "home"))
    queries = random_unit_vectors(12, DIM, seed=10, clusters=20)
    with SearchClient(router.address) as client:
        cols = client.search_columns(list(queries), k=50)
        rows = client.search_batch(list(queries), k=50)
    D, I, S, U = local.search_arrays(queries, k=50)
    assert cols.ids.shape == (12, 50)
    np.testing.assert_array_equal(cols.ids, I)
    assert cols.uris.tolist() == U.tolist()
    np.testing.assert_allclose(cols.scores[I >= 0], D[I >= 0], rtol=1e-5)
    assert (cols.shards == S).all()
    assert [[h.id for h in r.hits] for r in rows] == I.tolist()
    assert cols.coverage == 1.0 and cols.index_version == local.version and not cols.missing_shards


def test_a_killed_shard_gives_a_flagged_partial_answer_then_recovers(cluster):
    shards, router = cluster
    query = random_unit_vectors(1, DIM, seed=9)[0]
    with SearchClient(router.address) as client:
        assert client.search(query).coverage == 1.0
        shards[1].kill()
        partial = client.search(query, k=10)
        assert partial.partial and partial.missing_shards == [1] and partial.coverage == pytest.approx(2 / 3)
        assert partial.hits and all(h.shard != 1 for h in partial.hits)
        shards[1].start()  # waits until the new process reports SERVING
        deadline = time.monotonic() + 30  # the router's channel reconnects with backoff: poll, bounded
        while client.search(query).coverage < 1.0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.search(query).coverage == 1.0


def test_bad_requests_get_the_right_status_and_the_server_keeps_serving(cluster):
    _, router = cluster
    good = random_unit_vectors(1, DIM)[0]
    with SearchClient(router.address) as client:
        assert code_of(lambda: client.search(np.zeros(DIM + 3, np.float32))) == StatusCode.INVALID_ARGUMENT
        assert code_of(lambda: client.search(good, k=0)) == StatusCode.INVALID_ARGUMENT
        assert code_of(lambda: client.search(good, k=100_000)) == StatusCode.INVALID_ARGUMENT
        assert code_of(lambda: client.search(b"\x89PNG not really")) == StatusCode.UNIMPLEMENTED  # no embedder
        assert code_of(lambda: client.search_batch([good] * 1000)) == StatusCode.RESOURCE_EXHAUSTED
        huge = np.zeros(5_000_000, np.float32)  # 20 MB > the 16 MiB message limit
        assert code_of(lambda: client.search(huge)) == StatusCode.RESOURCE_EXHAUSTED
        assert client.search(good).coverage == 1.0


def test_all_shards_down_is_unavailable(cluster):
    shards, router = cluster
    for s in shards:
        s.kill()
    with SearchClient(router.address) as client:
        assert code_of(lambda: client.search(random_unit_vectors(1, DIM)[0])) == StatusCode.UNAVAILABLE


def test_bearer_token_is_required_when_configured(index, tmp_path, start_stack):
    env = {"IMSEARCH_HOME": str(tmp_path / "home"), "IMSEARCH_AUTH_TOKEN": "s3cret"}
    router = start_stack(index / "idx", shards=[0], router_index=False, env=env).router
    query = random_unit_vectors(1, DIM)[0]
    with SearchClient(router.address) as client:
        assert code_of(lambda: client.search(query)) == StatusCode.UNAUTHENTICATED
    with SearchClient(router.address, token="wrong") as client:
        assert code_of(lambda: client.search(query)) == StatusCode.UNAUTHENTICATED
    with SearchClient(router.address, token="s3cret") as client:
        assert client.search(query).coverage == 1.0  # the router passes the token on to the shard


def test_a_frozen_shard_costs_only_the_deadline(cluster):
    """SIGSTOP a shard: it accepts connections but never answers; the router must not wait past the deadline."""
    import signal

    shards, router = cluster
    query = random_unit_vectors(1, DIM, seed=11)[0]
    with SearchClient(router.address, timeout=10) as client, SearchClient(router.address, timeout=1.0) as hurried:
        assert client.search(query).coverage == 1.0
        shards[2].send(signal.SIGSTOP)
        try:
            start = time.monotonic()
            partial = client.search(query)  # the router's default shard deadline is 2 s
            elapsed = time.monotonic() - start
            start = time.monotonic()
            quick = hurried.search(query)  # a 1 s client deadline: the router answers within it
            quick_elapsed = time.monotonic() - start
        finally:
            shards[2].send(signal.SIGCONT)
    assert partial.missing_shards == [2] and partial.hits
    assert elapsed < 4.0, elapsed
    assert quick.missing_shards == [2] and quick.hits and quick_elapsed < 1.0


def test_search_by_catalogue_id(index, cluster):
    _, router = cluster
    local = IndexSearcher(str(index / "idx"), Settings(home=index / "home"))
    known = [int(local.shards[s].ids[5]) for s in range(SHARDS)]
    with SearchClient(router.address) as client:
        for id_ in known:
            top = client.search(id_, k=3).hits[0]
            assert top.id == id_ and top.score == pytest.approx(1.0, abs=1e-4)
        batch = client.search_batch(known, k=1)
        assert [r.hits[0].id for r in batch] == known
        assert code_of(lambda: client.search(123456789)) == StatusCode.NOT_FOUND


def test_search_with_relevance_feedback(index, cluster):
    _, router = cluster
    local = IndexSearcher(str(index / "idx"), Settings(home=index / "home"))
    query = random_unit_vectors(1, DIM, seed=9, clusters=20)[0]
    with SearchClient(router.address) as client:
        plain = [h.id for h in client.search(query, k=20).hits]
        liked = plain[-1]
        moved = [h.id for h in client.search(query, k=20, relevant=[liked], not_relevant=[plain[0]]).hits]
        assert code_of(lambda: client.search(query, k=5, relevant=[123456789])) == StatusCode.NOT_FOUND
        assert code_of(lambda: client.search(query, k=5, relevant=[liked], not_relevant=[liked])) \
            == StatusCode.INVALID_ARGUMENT
    expected = rocchio(query, local.fetch([liked]), local.fetch([plain[0]]))
    assert moved == [h.id for h in local.search(expected, k=20)[0]]  # the router re-queries as Rocchio says
    assert moved.index(liked) < plain.index(liked)


def test_router_assigns_ivf_lists_once_for_all_shards(tmp_path, start_stack):
    import re
    import urllib.request

    settings = Settings(home=tmp_path / "home")
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(6000, DIM, seed=21, clusters=30))
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=2, factory="IVF48,Flat", settings=settings)
    metrics_port = free_port()

    def assigned() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        return float(re.search(r"^imsearch_router_assigned_total (\S+)$", text, re.M).group(1))

    local = IndexSearcher(str(tmp_path / "idx"), settings)
    queries = random_unit_vectors(40, DIM, seed=22, clusters=30)
    router = start_stack(tmp_path / "idx", metrics_port=metrics_port, env={"IMSEARCH_HOME": str(tmp_path / "home")}
                         ).router
    with SearchClient(router.address) as client:
        deadline = time.monotonic() + 30  # the router loads the quantizer on first sight of a version
        while assigned() == 0 and time.monotonic() < deadline:
            client.search(queries[0])
        before = assigned()
        results = client.search_batch(list(queries), k=10, nprobe=3)
    assert before > 0 and assigned() > before
    expected = local.search(queries, k=10, nprobe=3)
    assert [[h.id for h in r.hits] for r in results] == [[h.id for h in e] for e in expected]


def test_router_info_describes_the_served_index(index, cluster):
    import grpc

    from protos.imsearch.v1 import imsearch_pb2 as pb
    from protos.imsearch.v1 import imsearch_pb2_grpc as pb_grpc

    shards, router = cluster
    local = IndexSearcher(str(index / "idx"), Settings(home=index / "home"))
    with grpc.insecure_channel(router.address) as channel:
        info = pb_grpc.SearcherStub(channel).Info(pb.InfoRequest(), timeout=10)
        assert info.index_version == local.version and info.count == local.manifest.count
        assert sorted(s.shard for s in info.shards) == list(range(SHARDS)) and info.model.dim == DIM
        shards[0].kill()
        partial = pb_grpc.SearcherStub(channel).Info(pb.InfoRequest(), timeout=10)
        assert sorted(s.shard for s in partial.shards) == list(range(1, SHARDS))


def test_imsearch_health_says_serving_with_exit_0_and_anything_else_with_1(cluster, tmp_path):
    from tests.integration.test_cli import run

    shards, router = cluster
    assert run("health", router.address, env_home=tmp_path).returncode == 0
    shards[0].kill()
    assert run("health", shards[0].address, "--timeout", "1", env_home=tmp_path).returncode == 1
    assert run("health", f"http://{router.address}/readyz", "--timeout", "1", env_home=tmp_path).returncode == 1
