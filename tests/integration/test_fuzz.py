"""Malformed input at every entry point (hypothesis): raw bytes and odd-but-well-formed messages to the
router's gRPC methods, bodies of every kind to the gateway. Each call must end within its deadline with
a proper status (never INTERNAL / HTTP 500), and every server must still be healthy afterwards."""

from __future__ import annotations

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.imsearch.v1 import imsearch_pb2 as pb
from services.common.config import Settings
from services.indexer.build import build_index
from services.stack.stack import Stack, StackSpec
from tests.helpers import random_unit_vectors, write_fake_embeddings

DIM = 16
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ALLOWED_GRPC = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    write_fake_embeddings(tmp / "emb", random_unit_vectors(500, DIM, seed=3))
    build_index(str(tmp / "emb"), str(tmp / "idx"), shards=2, settings=Settings(home=tmp / "home"))
    env = {"IMSEARCH_HOME": str(tmp / "home"), "IMSEARCH_MAX_MESSAGE_BYTES": str(1 << 20)}
    with Stack(StackSpec(str(tmp / "idx"), router_index=False, gateway=True, env=env), tmp).up() as running:
        channel = grpc.insecure_channel(running.router.address)
        yield tmp, running.router, running.gateway, channel, [g[0] for g in running.shards]
        channel.close()


def raw(channel, method: str):
    """A call that sends bytes as they are (no client-side serialisation)."""
    return channel.unary_unary(f"/imsearch.v1.Searcher/{method}", request_serializer=None,
                               response_deserializer=None)


def call_status(fn) -> grpc.StatusCode:
    try:
        fn()
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


@FUZZ
@given(data=st.binary(max_size=2048), method=st.sampled_from(["Search", "SearchBatch", "Info"]))
def test_raw_bytes_to_the_router(stack, data, method):
    _, _, _, channel, _ = stack
    code = call_status(lambda: raw(channel, method)(data, timeout=5))
    assert code in ALLOWED_GRPC | {grpc.StatusCode.OK}, (code, data[:40])


queries = st.one_of(
    st.builds(lambda v: pb.Query(vector=pb.Vector(values=v)),
              st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=40)),
    st.builds(lambda i: pb.Query(id=i), st.integers(-(2**63), 2**63 - 1)),
    st.builds(lambda b: pb.Query(image=b), st.binary(max_size=256)),
    st.just(pb.Query()))


@FUZZ
@given(q=queries, k=st.integers(0, 2**32 - 1), nprobe=st.integers(0, 2**32 - 1),
       rel=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5))
def test_odd_messages_to_the_router(stack, q, k, nprobe, rel):
    _, _, _, channel, _ = stack
    request = pb.SearchRequest(query=q, k=k, nprobe=nprobe, feedback=pb.Feedback(relevant=rel))
    code = call_status(lambda: raw(channel, "Search")(request.SerializeToString(), timeout=5))
    assert code in ALLOWED_GRPC | {grpc.StatusCode.OK}, (code, request)
    batch = pb.SearchBatchRequest(queries=[q] * (k % 5), k=k % 2000, nprobe=nprobe % 64, columnar=bool(k % 2))
    code = call_status(lambda: raw(channel, "SearchBatch")(batch.SerializeToString(), timeout=5))
    assert code in ALLOWED_GRPC | {grpc.StatusCode.OK}, (code, batch)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                           | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=12)


@FUZZ
@given(body=st.binary(max_size=4096), kind=st.sampled_from(["application/json", "multipart/form-data",
                                                            "multipart/form-data; boundary=x", "image/jpeg",
                                                            "text/plain", ""]),
       path=st.sampled_from(["/v1/search", "/v1/search/batch"]))
def test_raw_bodies_to_the_gateway(stack, body, kind, path):
    _, _, gateway, _, _ = stack
    r = httpx.post(gateway.url + path, content=body, headers={"content-type": kind}, timeout=10)
    assert r.status_code == 200 or (400 <= r.status_code < 500 and "error" in r.json()), (r.status_code, r.text[:200])


@FUZZ
@given(doc=st.dictionaries(st.sampled_from(["vector", "id", "uri", "image_b64", "k", "nprobe", "feedback",
                                            "queries"]), json_values, max_size=5))
def test_json_documents_to_the_gateway(stack, doc):
    _, _, gateway, _, _ = stack
    for path in ("/v1/search", "/v1/search/batch"):
        r = httpx.post(gateway.url + path, json=doc, timeout=10)
        assert r.status_code in (200, 400, 404, 413), (path, doc, r.status_code, r.text[:200])


def test_every_server_is_healthy_after_the_fuzzing(stack):
    _, router, gateway, _, shards = stack
    for s in (router, *shards):
        s.wait(timeout=5)
    assert httpx.get(gateway.url + "/readyz", timeout=5).status_code == 200
    log = router.log.read_text()
    assert "Traceback" not in log and "internal error" not in log, log[-2000:]
