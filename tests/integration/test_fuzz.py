"""Hostile and odd input at every entry point (hypothesis), against real processes with a real model behind
the router, so fuzzed bytes reach the code that guards them:

* raw bytes to the router's gRPC methods, and bodies of every content type to the gateway;
* requests built from the schemas — every query kind (image, vector, id, uri), numbers at and past their
  protobuf ranges, vectors of odd lengths and values, feedback ids — over HTTP (JSON, multipart, batch) and
  gRPC (Search, SearchBatch);
* mutated JPEG / PNG / WebP / GIF / BMP bytes (cut, flipped, spliced) through the gateway and the router into
  the decoder.

Every call ends within its deadline with a proper status (never INTERNAL / HTTP 500), memory stays bounded,
every server is healthy afterwards; the last test says how many examples reached protobuf and the decoder."""

from __future__ import annotations

import base64
import io
import json
import re
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.imsearch.v1 import imsearch_pb2 as pb
from services.common.store import LocalStore
from services.embedder.embeddings import read_embeddings
from services.searcher.client import SearchClient
from services.stack.part import free_port
from services.stack.stack import Stack, StackSpec
from tests.helpers import pattern

FUZZ = settings(max_examples=120, deadline=None, database=None, derandomize=True,  # the same examples every run
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ALLOWED_GRPC = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION}
ALLOWED_HTTP = {200, 400, 404, 413}
DIM = 1280
SEEN: Counter = Counter()  # examples sent: http/grpc x schema/raw


@pytest.fixture(scope="module")
def stack(catalogue, tmp_path_factory):
    """The real-photo catalogue behind shard servers, a router that embeds query images itself, the gateway."""
    env = {"IMSEARCH_HOME": str(catalogue / "home"), "IMSEARCH_MAX_MESSAGE_BYTES": str(1 << 20)}
    spec = StackSpec(str(catalogue / "idx"), gateway=True, metrics_port=free_port(), env=env)
    with Stack(spec, tmp_path_factory.mktemp("fuzz")).up() as running:
        channel = grpc.insecure_channel(running.router.address)
        running.ids = read_embeddings(LocalStore(catalogue / "emb")).ids.tolist()
        running.uris = [str(p) for p in sorted((catalogue / "photos").iterdir())]
        with SearchClient(running.router.address, timeout=60) as client:  # the model loads on the first image
            client.search((catalogue / "photos" / Path(running.uris[0]).name).read_bytes(), k=1)
        running.start = {"router": metric(running, "router"), "gateway": metric(running, "gateway"),
                         "rss": psutil.Process(running.router.pid).memory_info().rss}
        yield running, channel
        channel.close()


def metric(running, where: str) -> dict[str, float]:
    url = (f"http://127.0.0.1:{running.spec.metrics_port}/metrics" if where == "router"
           else f"{running.gateway.url}/metrics")
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, float] = {}
    for name, labels, value in re.findall(r"^(imsearch_\w+_total)(\{[^}]*\})? (\S+)$", text, re.M):
        out[name + labels] = out.get(name + labels, 0.0) + float(value)
    return out


def _encode(fmt: str) -> bytes:
    img = pattern(64, 48, seed=3)
    buf = io.BytesIO()
    (img.convert("P") if fmt == "GIF" else img).save(buf, fmt)
    return buf.getvalue()


BASES = [_encode(f) for f in ("JPEG", "PNG", "WEBP", "GIF", "BMP")]


@st.composite
def images(draw) -> bytes:
    """A real image of one of five formats, left whole or cut, bit-flipped, spliced with bytes."""
    data = bytearray(draw(st.sampled_from(BASES)))
    for op, at, junk in draw(st.lists(st.tuples(st.sampled_from(["flip", "cut", "splice", "zero"]),
                                                st.integers(0, 10_000), st.binary(min_size=1, max_size=12)),
                                      max_size=3)):
        at %= max(len(data), 1)
        if op == "flip":
            data[at] ^= junk[0] or 1
        elif op == "cut":
            del data[max(at, 1):]
        elif op == "splice":
            data[at:at] = junk
        else:
            data[at:at + len(junk)] = bytes(len(junk))
    return bytes(data)


@st.composite
def vectors(draw) -> list[float]:
    """The index's dimension or a wrong one; unit, zero, huge, NaN, infinite or random values."""
    dim = draw(st.sampled_from([DIM, DIM, DIM, 0, 1, DIM - 1, DIM + 1]))
    kind = draw(st.sampled_from(["unit", "unit", "zero", "huge", "nan", "inf", "tiny"]))
    rng = np.random.default_rng(draw(st.integers(0, 10_000)))
    v = rng.normal(size=dim).astype(np.float32)
    with np.errstate(over="ignore"):  # "huge" may overflow float32 to infinity: so be it
        v = {"unit": v / max(np.linalg.norm(v), 1e-9), "zero": v * 0, "huge": v * np.float32(3e38),
             "tiny": v * np.float32(1e-40), "nan": np.where(np.arange(dim) == 0, np.nan, v),
             "inf": np.where(np.arange(dim) == 0, np.inf, v)}[kind]
    return v.astype(np.float32).tolist()


UINT32 = st.one_of(st.sampled_from([0, 1, 2, 10, 999, 1000, 1001, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
HTTP_NUMBERS = st.one_of(UINT32, st.sampled_from([-1, 2**32, 2**63, -(2**63), 2**64]), st.integers(-(2**70), 2**70))
INT64 = st.sampled_from([-(2**63), -1, 0, 1, 2**63 - 1])
# Mostly valid, at the edges of their ranges, sometimes past them: most examples get past validation and
# into the code behind it.
K = st.one_of(*[st.sampled_from([1, 2, 10, 1000])] * 3, UINT32)
NPROBE = st.one_of(*[st.sampled_from([0, 1, 4, 2**32 - 1])] * 3, UINT32)
HTTP_K = st.one_of(*[st.sampled_from([1, 2, 10, 1000])] * 3, HTTP_NUMBERS)
HTTP_NPROBE = st.one_of(*[st.sampled_from([0, 1, 4, 2**32 - 1])] * 3, HTTP_NUMBERS)


def ids(running) -> st.SearchStrategy:
    return st.one_of(st.sampled_from(running.ids), INT64, st.integers(-(2**63), 2**63 - 1))


def json_query(running) -> st.SearchStrategy:
    return st.one_of(
        st.builds(lambda v: {"vector": v}, vectors()),
        st.builds(lambda i: {"id": i}, st.one_of(ids(running), ids(running),
                                                 st.sampled_from([2**63, -(2**63) - 1, 2**64]))),
        st.builds(lambda u: {"uri": u}, st.one_of(st.sampled_from(running.uris), st.sampled_from(running.uris),
                                                  st.sampled_from([f"/v1/images/{i}" for i in running.ids[:3]]),
                                                  st.text(max_size=30))),
        st.builds(lambda b: {"image_b64": base64.b64encode(b).decode()}, images()),
        st.builds(lambda b: {"image_b64": base64.b64encode(b).decode()}, images()),
        st.builds(lambda t: {"image_b64": t}, st.text(max_size=20)))


def json_search(running) -> st.SearchStrategy:
    feedback_ids = st.lists(st.one_of(ids(running), ids(running), HTTP_NUMBERS), max_size=2)
    return st.builds(lambda q, extra: {**q, **extra}, json_query(running), st.fixed_dictionaries({}, optional={
        "k": HTTP_K, "nprobe": HTTP_NPROBE,
        "feedback": st.fixed_dictionaries({}, optional={"relevant": feedback_ids, "not_relevant": feedback_ids})}))


def grpc_query(running) -> st.SearchStrategy:
    return st.one_of(st.builds(lambda b: pb.Query(image=b), images()),
                     st.builds(lambda v: pb.Query(vector=pb.Vector(values=v)), vectors()),
                     st.builds(lambda i: pb.Query(id=i), ids(running)))


def check_http(r: httpx.Response, kind: str = "raw") -> None:
    SEEN["http-" + kind] += 1
    assert r.status_code in ALLOWED_HTTP and (r.status_code == 200 or "error" in r.json()), \
        (r.status_code, r.text[:300])


def grpc_status(fn, kind: str = "raw") -> grpc.StatusCode:
    SEEN["grpc-" + kind] += 1
    try:
        fn()
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def raw(channel, method: str):
    """A call that sends bytes as they are (no client-side serialisation)."""
    return channel.unary_unary(f"/imsearch.v1.Searcher/{method}", request_serializer=None,
                               response_deserializer=None)


@FUZZ
@given(data=st.data())
def test_schema_shaped_json_searches_to_the_gateway(stack, data):
    running, _ = stack
    body = data.draw(json_search(running))
    path = data.draw(st.sampled_from(["/v1/search", "/v1/search/batch"]))
    if path.endswith("batch"):
        one = {k: v for k, v in body.items() if k in ("vector", "id", "uri", "image_b64")}
        body = {"queries": [one] * data.draw(st.sampled_from([1, 1, 2, 3, 0])),
                **{k: v for k, v in body.items() if k in ("k", "nprobe")}}
    # json.dumps writes NaN / Infinity as a lax client would (httpx refuses to)
    check_http(httpx.post(running.gateway.url + path, content=json.dumps(body),
                          headers={"content-type": "application/json"}, timeout=60), "schema")


@FUZZ
@given(image=images(), k=st.one_of(*[HTTP_K.map(str)] * 3, st.text(max_size=12)), nprobe=HTTP_NPROBE.map(str),
       relevant=st.one_of(st.just(""), st.just(""), st.lists(HTTP_NUMBERS.map(str), max_size=2).map(",".join)))
def test_mutated_images_uploaded_to_the_gateway(stack, image, k, nprobe, relevant):
    running, _ = stack
    check_http(httpx.post(running.gateway.url + "/v1/search", files={"image": ("q", image)},
                          data={"k": k, "nprobe": nprobe, "relevant": relevant}, timeout=60), "schema")


@FUZZ
@given(data=st.data())
def test_schema_shaped_grpc_searches_to_the_router(stack, data):
    running, channel = stack
    query = data.draw(grpc_query(running))
    request = pb.SearchRequest(query=query, k=data.draw(K), nprobe=data.draw(NPROBE), feedback=pb.Feedback(
        relevant=data.draw(st.lists(ids(running), max_size=2)),
        not_relevant=data.draw(st.lists(ids(running), max_size=2))))
    code = grpc_status(lambda: raw(channel, "Search")(request.SerializeToString(), timeout=60), "schema")
    assert code in ALLOWED_GRPC, (code, str(request)[:300])
    kind = query.WhichOneof("query")
    batch = pb.SearchBatchRequest(queries=data.draw(st.lists(grpc_query(running), max_size=4).filter(
        lambda qs: all(q.WhichOneof("query") == kind for q in qs))), k=request.k % 2000, nprobe=request.nprobe,
        columnar=data.draw(st.booleans()))
    code = grpc_status(lambda: raw(channel, "SearchBatch")(batch.SerializeToString(), timeout=60), "schema")
    assert code in ALLOWED_GRPC, (code, str(batch)[:300])


@FUZZ
@given(data=st.binary(max_size=2048), method=st.sampled_from(["Search", "SearchBatch", "Info"]))
def test_raw_bytes_to_the_router(stack, data, method):
    _, channel = stack
    code = grpc_status(lambda: raw(channel, method)(data, timeout=10))
    assert code in ALLOWED_GRPC, (code, data[:40])


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
    running, _ = stack
    check_http(httpx.post(running.gateway.url + path, content=body, headers={"content-type": kind}, timeout=10))


@FUZZ
@given(doc=st.dictionaries(st.sampled_from(["vector", "id", "uri", "image_b64", "k", "nprobe", "feedback",
                                            "queries"]), json_values, max_size=5))
def test_json_documents_to_the_gateway(stack, doc):
    running, _ = stack
    for path in ("/v1/search", "/v1/search/batch"):
        check_http(httpx.post(running.gateway.url + path, json=doc, timeout=10))


FIELD = st.one_of(st.sampled_from(["a", "price", "category", "in_stock"]), st.text(max_size=20))
VALUE = st.one_of(st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=20), st.booleans(), st.none())
LEAF = st.one_of(st.builds(lambda f, v: {f: v}, FIELD, st.one_of(VALUE, st.lists(VALUE, max_size=5))),
                 st.builds(lambda f, op, v: {f: {op: v}}, FIELD,
                           st.sampled_from(["eq", "ne", "lt", "lte", "gt", "gte", "in", "nin", "below", ""]),
                           st.one_of(VALUE, st.lists(VALUE, max_size=5))))
JSON_FILTERS = st.recursive(LEAF, lambda kids: st.one_of(st.builds(lambda ks: {"and": ks}, st.lists(kids, max_size=4)),
                                                         st.builds(lambda ks: {"or": ks}, st.lists(kids, max_size=4)),
                                                         st.builds(lambda k: {"not": k}, kids)), max_leaves=16)
# The attacks of the adversarial review, at sizes around each limit, and free text.
WHERE = st.one_of(
    st.text(max_size=60), st.sampled_from(["price > -1", "a in (1, 2)", "not a", "a ==", "a == 1 and", ""]),
    st.builds(lambda n: "not " * n + "a", st.integers(0, 6000)),
    st.builds(lambda n: "(" * n + "a" + ")" * n, st.integers(0, 400)),
    st.builds(lambda d: "a == " + "9" * d, st.integers(1, 6000)),
    st.builds(lambda x: f"a > {x}", st.integers(-(2**70), 2**70)),
    st.builds(lambda n: '{"not": ' * n + '{"a": 1}' + "}" * n, st.integers(0, 3000)),
    st.builds(lambda n: "a in (" + ", ".join(["1"] * n) + ")", st.integers(0, 12_000)))


@FUZZ
@given(data=st.data())
def test_filters_qe_and_collections_to_the_gateway_and_the_router(stack, data):
    """Before: deeply nested or over-long filters (RecursionError, ValueError) and integers past 64 bits
    (OverflowError on a shard) answered INTERNAL / HTTP 500."""
    running, channel = stack
    vector = np.eye(DIM, dtype=np.float32)[data.draw(st.integers(0, DIM - 1))].tolist()
    chosen = data.draw(st.one_of(st.builds(lambda f: {"filter": f}, JSON_FILTERS),
                                 st.builds(lambda w: {"where": w}, WHERE)))
    body = {"vector": vector, "k": 3, "qe": data.draw(st.one_of(st.integers(0, 50), HTTP_NUMBERS)), **chosen}
    name = data.draw(st.one_of(st.sampled_from(["", "", "default", "shoes\n", "..", "a/b", "%00"]),
                               st.text(max_size=20)))
    path = f"/v1/collections/{urllib.parse.quote(name, safe='')}/search" if name else "/v1/search"
    check_http(httpx.post(running.gateway.url + path, content=json.dumps(body),
                          headers={"content-type": "application/json"}, timeout=60), "schema")
    text = chosen["where"] if "where" in chosen else json.dumps(chosen["filter"])
    request = pb.SearchRequest(query=pb.Query(vector=pb.Vector(values=vector)), k=3, filter=text,
                               qe=body["qe"] % 2**32, collection=name)
    code = grpc_status(lambda: raw(channel, "Search")(request.SerializeToString(), timeout=60), "schema")
    assert code in ALLOWED_GRPC, (code, text[:200])


def test_every_server_is_healthy_after_the_fuzzing_which_reached_protobuf_and_the_decoder(stack):
    running, _ = stack
    for p in (running.router, *(g[0] for g in running.shards)):
        p.wait(timeout=5)
    assert httpx.get(running.gateway.url + "/readyz", timeout=5).status_code == 200
    log = running.router.log.read_text()
    assert "Traceback" not in log and "internal error" not in log, log[-2000:]
    assert "Traceback" not in running.gateway.log.read_text()
    router, gateway = metric(running, "router"), metric(running, "gateway")

    def delta(now, before, prefix):
        return sum(v - before.get(k, 0.0) for k, v in now.items() if k.startswith(prefix))

    to_router = delta(gateway, running.start["gateway"], "imsearch_gateway_router_calls_total")
    parsed = delta(router, running.start["router"], 'imsearch_requests_total{code="')  # every answered call
    decoded_ok = delta(router, running.start["router"], 'imsearch_images_decoded_total{result="ok"}')
    refused = delta(router, running.start["router"], 'imsearch_images_decoded_total{result="refused"}')
    internal = delta(router, running.start["router"], 'imsearch_requests_total{code="INTERNAL"')
    grown = (psutil.Process(running.router.pid).memory_info().rss - running.start["rss"]) / 2**20
    print(f"fuzzing: {SEEN['http-schema']} schema-shaped HTTP requests (+{SEEN['http-raw']} raw bodies and "
          f"documents), {to_router:.0f} reached the router as protobuf requests; {SEEN['grpc-schema']} "
          f"schema-shaped gRPC calls (+{SEEN['grpc-raw']} raw), {parsed:.0f} of all gRPC calls handled by the router; "
          f"the decoder got {decoded_ok + refused:.0f} images ({decoded_ok:.0f} decoded, {refused:.0f} refused); "
          f"router memory grew {grown:.0f} MiB")
    assert internal == 0
    assert to_router >= 0.3 * SEEN["http-schema"] and decoded_ok >= 40 and refused >= 25
    assert grown < 256, grown  # bounded: nothing kept per request
