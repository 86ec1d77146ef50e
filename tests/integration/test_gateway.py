"""The HTTP gateway with the real router and shard servers behind it (each its own process): answers,
errors with the right HTTP status, limits, and a stopped shard flagged as a partial answer."""

from __future__ import annotations

import io
import signal
import time

import httpx
import pytest
from PIL import Image

from services.common.config import Settings
from services.common.store import LocalStore
from services.embedder.embeddings import read_embeddings
from tests.helpers import DEFAULT_MODEL, encode
from tests.integration.conftest import SHARDS


@pytest.fixture()
def stack(catalogue, served):
    running = served()
    return catalogue, [g[0] for g in running.shards], running.gateway


def error_of(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    return response.status_code, body["error"]["code"], body["error"]["message"]


def test_search_by_upload_id_uri_vector_and_batch(stack):
    tmp, _, gateway = stack
    target = sorted((tmp / "photos").iterdir())[3]
    query = encode(Image.open(target).resize((160, 120)), "JPEG", quality=50)
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        r = http.post("/v1/search", files={"image": ("q.jpg", query, "image/jpeg")}, data={"k": "5"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["results"][0]["uri"] == str(target) and len(body["results"]) == 5
        assert body["coverage"] == 1.0 and not body["partial"] and body["index_version"]
        top = body["results"][0]
        assert top["id_str"] == str(top["id"])
        assert top["thumbnail"] == f"/v1/images/{top['id']}?version={body['index_version']}"
        thumb = http.get(top["thumbnail"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256

        by_id = http.post("/v1/search", json={"id": top["id_str"], "k": 3}).json()  # ids as strings: 64-bit
        assert by_id["results"][0]["id"] == top["id"]
        by_uri = http.post("/v1/search", json={"uri": str(target), "k": 3}).json()
        assert by_uri["results"][0]["id"] == top["id"]
        by_link = http.post("/v1/search", json={"uri": f"{gateway.url}/v1/images/{top['id']}", "k": 3}).json()
        assert by_link["results"][0]["id"] == top["id"]
        vector = read_embeddings(LocalStore(tmp / "emb")).vectors[0].tolist()
        assert http.post("/v1/search", json={"vector": vector, "k": 2}).json()["results"][0]["score"] > 0.99

        batch = http.post("/v1/search/batch", json={"queries": [{"id": top["id_str"]}, {"uri": str(target)}],
                                                     "k": 2})
        assert batch.status_code == 200, batch.text
        assert [[h["id"] for h in r][0] for r in batch.json()["results"]] == [top["id"], top["id"]]
        mixed = http.post("/v1/search/batch", json={"queries": [{"id": top["id_str"]}, {"vector": vector}]})
        assert error_of(mixed)[:2] == (400, "INVALID_ARGUMENT")  # one kind of query per batch

        info = http.get("/v1/index").json()
        assert info["count"] == 12 and len(info["shards"]) == SHARDS and info["model"]["name"] == DEFAULT_MODEL
        assert "imsearch_gateway_requests_total" in http.get("/metrics").text
        assert http.get("/openapi.json").json()["paths"]["/v1/search"]
        assert "imsearch" in http.get("/").text


def test_feedback_through_the_api(stack):
    _, _, gateway = stack
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        ids = http.get("/v1/index").json()
        assert ids["count"] == 12
        first = http.post("/v1/search", json={"uri": str(sorted((stack[0] / "photos").iterdir())[0]), "k": 12}).json()
        liked = first["results"][-1]["id_str"]
        again = http.post("/v1/search", json={"uri": str(sorted((stack[0] / "photos").iterdir())[0]), "k": 12,
                                              "feedback": {"relevant": [liked]}}).json()
        order = [r["id_str"] for r in again["results"]]
        assert order.index(liked) < [r["id_str"] for r in first["results"]].index(liked)


def test_bad_input_gets_the_right_status_and_the_gateway_keeps_serving(stack, tmp_path):
    tmp, _, gateway = stack
    bomb = encode(Image.new("1", (12_000, 12_000)), "PNG", optimize=True)
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        cases = [
            (http.post("/v1/search", files={"image": ("a.txt", b"hello, not a picture", "text/plain")}), 400,
             "INVALID_ARGUMENT", "not an image"),
            (http.post("/v1/search", files={"image": ("z.jpg", b"", "image/jpeg")}), 400, "INVALID_ARGUMENT", "empty"),
            (http.post("/v1/search", files={"image": ("big.jpg", b"\xff" * (50 * 2**20), "image/jpeg")}), 413,
             "RESOURCE_EXHAUSTED", "limit"),
            (http.post("/v1/search", files={"image": ("bomb.png", bomb, "image/png")}), 413, "RESOURCE_EXHAUSTED",
             "decompression bomb"),
            (http.post("/v1/search", content=b"k=3", headers={"content-type": "text/plain"}), 400,
             "INVALID_ARGUMENT", "content type"),
            (http.post("/v1/search", json={"id": 12345, "k": 3}), 404, "NOT_FOUND", "unknown"),
            (http.post("/v1/search", json={"uri": "/nowhere.jpg"}), 404, "NOT_FOUND", "not in the catalogue"),
            (http.post("/v1/search", json={"id": 1, "vector": [0.1]}), 400, "INVALID_ARGUMENT", "exactly one"),
            (http.post("/v1/search", json={"vector": [0.1, 0.2], "k": 3}), 400, "INVALID_ARGUMENT", "dim"),
            (http.post("/v1/search", json={"vector": [0.1] * 1280, "k": 0}), 400, "INVALID_ARGUMENT", "k must"),
            (http.post("/v1/search", json={"vector": [0.1] * 1280, "k": 100000}), 400, "INVALID_ARGUMENT",
             "k must"),
            (http.post("/v1/search", content=b"{not json", headers={"content-type": "application/json"}), 400,
             "INVALID_ARGUMENT", "JSON"),
            (http.post("/v1/search/batch", json={"queries": "nope"}), 400, "INVALID_ARGUMENT", "queries"),
            (http.get("/v1/images/99999"), 404, "NOT_FOUND", "unknown catalogue id"),
            (http.get("/v1/images/not-a-number"), 400, "INVALID_ARGUMENT", "id_"),
            (http.get("/v1/nothing-here"), 404, "NOT_FOUND", "Not Found"),
        ]
        for response, status, code, words in cases:
            got = error_of(response)
            assert got[:2] == (status, code) and words in got[2], (got, status, code, words)
        target = sorted((tmp / "photos").iterdir())[0]
        ok = http.post("/v1/search", json={"uri": str(target), "k": 1})
        assert ok.status_code == 200  # still serving
    assert not list((tmp / "photos").glob("q*")) and len(list((tmp / "photos").iterdir())) == 12  # nothing written


def test_api_keys_rate_limit_and_cors(served):
    gateway = served(IMSEARCH_GATEWAY_API_KEYS="alpha,beta", IMSEARCH_GATEWAY_RATE_PER_S="0.5",
                     IMSEARCH_GATEWAY_BURST="3", IMSEARCH_GATEWAY_CORS_ORIGINS="https://shop.example").gateway
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        preflight = {"Origin": "https://shop.example", "Access-Control-Request-Method": "POST"}
        allowed = http.options("/v1/search", headers=preflight)
        assert allowed.headers.get("access-control-allow-origin") == "https://shop.example"
        other = http.options("/v1/search", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        assert error_of(http.get("/v1/index"))[:2] == (401, "UNAUTHENTICATED")
        assert error_of(http.get("/v1/index", headers={"X-API-Key": "gamma"}))[:2] == (401, "UNAUTHENTICATED")
        assert http.get("/healthz").status_code == 200  # probes stay open
        codes = [http.get("/v1/index", headers={"Authorization": "Bearer alpha"}).status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
        limited = http.get("/v1/index", headers={"Authorization": "Bearer alpha"})
        assert error_of(limited)[:2] == (429, "RESOURCE_EXHAUSTED") and limited.headers["retry-after"]
        assert http.get("/v1/index", headers={"X-API-Key": "beta"}).status_code == 200  # per key


def test_stopped_shards_give_a_flagged_partial_answer_then_unavailable(stack):
    tmp, shards, gateway = stack
    target = sorted((tmp / "photos").iterdir())[0]
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        shards[1].kill()
        body = http.post("/v1/search", json={"uri": str(target), "k": 5}).json()
        assert body["partial"] and body["coverage"] == 0.5 and body["missing_shards"] == [1]
        assert body["results"] and all(r["shard"] == 0 for r in body["results"])
        shards[0].kill()
        status, code, _ = error_of(http.post("/v1/search", json={"uri": str(target), "k": 5}))
        assert (status, code) == (503, "UNAVAILABLE")
        assert http.get("/readyz").status_code == 503  # no shard answers: not ready
        assert http.get("/healthz").status_code == 200  # but alive


def test_a_frozen_shard_past_the_gateway_deadline_is_504_and_the_gateway_recovers(catalogue, served):
    stack = served(IMSEARCH_GATEWAY_TIMEOUT_S="0.5", IMSEARCH_SHARD_TIMEOUT_S="3")
    target = str(sorted((catalogue / "photos").iterdir())[0])
    with httpx.Client(base_url=stack.gateway.url, timeout=30) as http:
        assert http.post("/v1/search", json={"uri": target, "k": 3}).status_code == 200  # warm
        stack.shards[0][0].send(signal.SIGSTOP)  # alive but silent, mid-request
        try:
            status, code, _ = error_of(http.post("/v1/search", json={"uri": target, "k": 3}))
            assert (status, code) == (504, "DEADLINE_EXCEEDED")
        finally:
            stack.shards[0][0].send(signal.SIGCONT)
        vector = read_embeddings(LocalStore(catalogue / "emb")).vectors[0].tolist()
        ok = http.post("/v1/search", json={"vector": vector, "k": 3})
        assert ok.status_code == 200 and ok.json()["coverage"] == 1.0


def test_numbers_out_of_their_protobuf_range_are_400s_naming_the_field(stack):
    tmp, _, gateway = stack
    uri = str(sorted((tmp / "photos").iterdir())[0])
    png = encode(Image.new("RGB", (32, 32), (9, 9, 9)))
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        for body, field in [({"uri": uri, "k": -1}, "k"), ({"uri": uri, "nprobe": -1}, "nprobe"),
                            ({"id": 2**63}, "id"), ({"uri": uri, "k": 2**32}, "k"),
                            ({"uri": uri, "feedback": {"relevant": [2**64]}}, "feedback.relevant"),
                            ({"uri": uri, "feedback": {"not_relevant": [-(2**63) - 1]}}, "feedback.not_relevant"),
                            ({"uri": uri, "k": 5000}, "k")]:
            status, code, message = error_of(http.post("/v1/search", json=body))
            assert (status, code) == (400, "INVALID_ARGUMENT") and message.startswith(field), (body, message)
        for form, field in [({"k": "-1"}, "k"), ({"k": str(2**40)}, "k"), ({"nprobe": "x"}, "nprobe"),
                            ({"relevant": str(2**64)}, "feedback id")]:
            status, code, message = error_of(http.post("/v1/search", files={"image": ("q.png", png)}, data=form))
            assert (status, code) == (400, "INVALID_ARGUMENT") and message.startswith(field), (form, message)
        status, _, message = error_of(http.post("/v1/search/batch", json={"queries": [{"id": 2**63}]}))
        assert status == 400 and message.startswith("queries.0.id"), message
        assert http.post("/v1/search", json={"uri": uri, "k": 3}).status_code == 200  # still serving


def test_error_messages_quote_only_a_short_prefix_of_what_was_sent(stack):
    _, _, gateway = stack
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        status, _, message = error_of(http.post("/v1/search", json={"uri": "/nowhere/" + "x" * 20_000}))
        assert status == 404 and len(message) < 400, len(message)
        png = encode(Image.new("RGB", (32, 32)))
        status, _, message = error_of(http.post("/v1/search", files={"image": ("q.png", png)}, data={"k": "9x" * 5000}))
        assert status == 400 and len(message) < 200, len(message)
        status, _, message = error_of(http.post("/v1/search", content=b"{}", headers={"content-type": "y" * 9000}))
        assert status == 400 and len(message) < 300, len(message)


def test_a_chunked_body_over_the_limit_is_413_before_it_is_all_sent(served):
    import socket

    gateway = served(IMSEARCH_MAX_IMAGE_BYTES=str(1 << 20)).gateway  # ~1 MiB limit
    chunk, total, sent = b"A" * 65536, 64 << 20, 0
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as s:
        s.sendall(b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        s.setblocking(False)
        reply, reset = b"", False
        while sent < total and not reply and not reset:
            try:
                s.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            except BlockingIOError:  # the server stopped reading: wait for its answer
                pass
            except ConnectionResetError:  # it answered and closed with our data unread: the answer may be queued
                reset = True
            try:
                reply = s.recv(65536)
            except (BlockingIOError, ConnectionResetError):
                pass
        s.settimeout(10)
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            try:
                more = s.recv(65536)
            except ConnectionResetError:
                break
            if not more:
                break
            reply += more
    assert sent < total // 2, sent  # answered (or cut off) while the client was still sending
    if reset and not reply:  # the kernel dropped the queued answer with the reset: the early cut is what is left
        return
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head[:100]
    assert b"AAAA" not in body and len(body) < 1000, body[:200]  # nothing of the body echoed back


def test_failed_key_guesses_are_rate_limited_per_address_whatever_key_comes_next(served):
    """Before: once an address was limited, wrong keys got 429 and the right key 200 — an oracle telling the
    guesser when it hit, at full speed."""
    gateway = served(IMSEARCH_GATEWAY_API_KEYS="right-key").gateway  # no request rate limit configured
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        codes = [http.get("/v1/index", headers={"X-API-Key": f"guess-{i}"}).status_code for i in range(14)]
        assert codes[:10] == [401] * 10 and set(codes[10:]) == {429}, codes
        limited = http.get("/v1/index", headers={"X-API-Key": "right-key"})
        assert limited.status_code == 429  # the right key tells nothing while the address is limited
        time.sleep(int(limited.headers["retry-after"]) + 0.5)
        assert http.get("/v1/index", headers={"X-API-Key": "right-key"}).status_code == 200  # the window passed


def test_the_shared_rate_limit_names_a_key_in_redis_by_a_hash_never_by_the_key(served, redis_server):
    """Before: `LIMITER/key <API key>/...`: anyone who could list Redis's keys read every API key."""
    import redis

    gateway = served(IMSEARCH_GATEWAY_API_KEYS="s3cret-key-1", IMSEARCH_GATEWAY_RATE_PER_S="5",
                     IMSEARCH_REDIS_URL=f"redis://127.0.0.1:{redis_server.port}/0").gateway
    assert httpx.get(gateway.url + "/v1/index", headers={"X-API-Key": "s3cret-key-1"}, timeout=10).status_code == 200
    names = [k.decode() for k in redis.Redis(port=redis_server.port).keys("*")]
    assert any("key " in n for n in names), names  # the window is there, under the key's hash
    assert not any("s3cret" in n for n in names), names


def test_a_batch_reports_its_version_and_coverage_like_a_single_search(stack):
    tmp, _, gateway = stack
    uris = [str(p) for p in sorted((tmp / "photos").iterdir())[:3]]
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        single = http.post("/v1/search", json={"uri": uris[0], "k": 2}).json()
        batch = http.post("/v1/search/batch", json={"queries": [{"uri": u} for u in uris], "k": 2}).json()
    assert batch["index_version"] == single["index_version"] != ""
    assert batch["coverage"] == 1.0 and batch["partial"] is False and batch["missing_shards"] == []


def test_two_gateways_share_one_rate_limit_through_redis_with_a_real_retry_after(served, redis_server, catalogue):
    from services.stack.part import Part

    env = {"IMSEARCH_REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/0", "IMSEARCH_GATEWAY_RATE_PER_S": "0.5",
           "IMSEARCH_GATEWAY_BURST": "4", "IMSEARCH_HOME": str(catalogue / "home")}
    first = served(**env)
    second = Part.python("gateway-2", "services.gateway", ["--router", first.router.address, "--index",
                                                           str(catalogue / "idx")], env=env, health="http").start()
    try:
        codes = []
        for i in range(6):  # alternate between the two: one budget of 4 calls per 8 s for this client
            gw = (first.gateway, second)[i % 2]
            codes.append(httpx.get(gw.url + "/v1/index", timeout=10))
        assert [r.status_code for r in codes] == [200, 200, 200, 200, 429, 429], [r.status_code for r in codes]
        assert all(2 <= int(r.headers["retry-after"]) <= 8 for r in codes[4:]), [r.headers for r in codes[4:]]
    finally:
        second.stop()


def test_forwarded_addresses_count_only_behind_a_trusted_proxy(served, catalogue):
    from services.stack.part import Part

    env = {"IMSEARCH_GATEWAY_RATE_PER_S": "0.2", "IMSEARCH_GATEWAY_BURST": "2"}
    trusting = served(IMSEARCH_GATEWAY_TRUSTED_PROXIES="127.0.0.1", **env)
    plain = Part.python("gateway-plain", "services.gateway", ["--router", trusting.router.address, "--index",
                                                              str(catalogue / "idx")],
                        env={**env, "IMSEARCH_HOME": str(catalogue / "home")}, health="http").start()
    try:
        def codes(gw, client: str, n: int = 3) -> list[int]:
            return [httpx.get(gw.url + "/v1/index", headers={"X-Forwarded-For": client}, timeout=10).status_code
                    for _ in range(n)]

        # behind the trusted proxy (this test, on 127.0.0.1) each forwarded client has its own budget
        assert codes(trusting.gateway, "10.0.0.1") == [200, 200, 429]
        assert codes(trusting.gateway, "10.0.0.2") == [200, 200, 429]
        # untrusted, the header is ignored: every "client" is this one address
        assert codes(plain, "10.0.0.3", 2) + codes(plain, "10.0.0.4", 1) == [200, 200, 429]
    finally:
        plain.stop()


def test_a_thumbnail_is_served_only_from_the_published_version_and_the_one_before(catalogue, start_stack, tmp_path):
    """Before: /v1/images/ID?version=<any version> read that version's docs: an image removed by `index delete`
    stayed viewable by naming any older version until gc, a staged version was readable, and naming versions made
    the gateway download each one's docs."""
    from services.indexer.build import build_index
    from services.indexer.update import delete_from_index

    root = tmp_path / "idx"
    settings = Settings(home=catalogue / "home")
    build_index(str(catalogue / "emb"), str(root), shards=2, settings=settings, version="v1")
    ids = read_embeddings(LocalStore(catalogue / "emb")).ids.tolist()
    gateway = start_stack(root, gateway=True, env={"IMSEARCH_HOME": str(catalogue / "home")}).gateway
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        assert http.get(f"/v1/images/{ids[0]}?version=v1").status_code == 200
        delete_from_index(str(root), ids[:1], settings, version="v2")  # a takedown
        build_index(str(catalogue / "emb"), f"{root}/staged", settings=settings, publish_it=False)
        time.sleep(2.5)  # the gateway looks at CURRENT at most every 2 s
        assert http.get(f"/v1/images/{ids[1]}").status_code == 200
        # the version before stays served: a router finishing a rollout may still answer from it
        assert http.get(f"/v1/images/{ids[0]}?version=v1").status_code == 200
        for path in (f"/v1/images/{ids[0]}", f"/v1/images/{ids[0]}?version=v2", f"/v1/images/{ids[1]}?version=staged"):
            r = http.get(path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND", (path, r.text)
        delete_from_index(str(root), ids[2:3], settings, version="v3")  # v1 is two versions back now
        time.sleep(2.5)
        for path in (f"/v1/images/{ids[0]}?version=v1", f"/v1/images/{ids[1]}?version=v1"):
            assert http.get(path).status_code == 404, path  # the taken-down image is out of reach for good
        assert http.get(f"/v1/images/{ids[1]}?version=v2").status_code == 200
