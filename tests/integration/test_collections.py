"""Named collections through real processes: two indexes behind one router and gateway, each published and rolled
back on its own under load with no failed request and no answer from the other collection; a collection added to
or removed from the collections file is served or refused without a restart; the cache keeps them apart; an API
key limited to one collection reaches only it."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from grpc import RpcError, StatusCode

from services.common.config import Settings
from services.common.store import LocalStore, open_store
from services.embedder.embeddings import read_embeddings
from services.index.versions import current_pointer, rollback
from services.indexer.build import build_index
from services.indexer.update import add_to_index
from services.searcher.client import SearchClient
from tests.helpers import random_unit_vectors, write_fake_embeddings

DIM, N, K = 16, 2000, 5


@pytest.fixture()
def two(tmp_path):
    """Two indexes of disjoint catalogues (different ids), 2 shards each; their ids by collection."""
    home = tmp_path / "home"
    ids = {}
    for seed, name in ((1, "shoes"), (2, "bags")):
        write_fake_embeddings(tmp_path / f"emb-{name}", random_unit_vectors(N, DIM, seed=seed, clusters=10),
                              first_row=seed * 100_000)
        build_index(str(tmp_path / f"emb-{name}"), str(tmp_path / f"idx-{name}"), shards=2,
                    settings=Settings(home=home))
        ids[name] = set(read_embeddings(LocalStore(tmp_path / f"emb-{name}")).ids.tolist())
    assert not ids["shoes"] & ids["bags"]
    return tmp_path, home, ids


class Load:
    """Clients searching both collections in turn until stopped; every answer and every error recorded."""

    def __init__(self, address: str, threads: int = 4):
        self.address, self.stop, self.answers, self.errors = address, threading.Event(), [], []
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, seed: int) -> None:
        queries = random_unit_vectors(50, DIM, seed=100 + seed, clusters=10)
        with SearchClient(self.address, timeout=10) as client:
            i = 0
            while not self.stop.is_set():
                name = ("shoes", "bags")[i % 2]
                try:
                    r = client.search(queries[i % len(queries)], k=K, collection=name)
                    self.answers.append((name, r.index_version, {h.id for h in r.hits}, r.coverage))
                except RpcError as e:
                    self.errors.append((name, e.code(), e.details()))
                i += 1

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def served_version(client: SearchClient, name: str, version: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while client.search(random_unit_vectors(1, DIM, seed=9)[0], k=K, collection=name).index_version != version:
        assert time.monotonic() < deadline, f"{name} never served {version}"
        time.sleep(0.2)


def test_two_collections_publish_and_roll_back_independently_under_load(two, start_stack, redis_server):
    tmp, home, ids = two
    env = {"IMSEARCH_HOME": str(home), "IMSEARCH_RELOAD_INTERVAL_S": "0.5",
           "IMSEARCH_REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/0"}
    stack = start_stack(tmp / "idx-shoes", collections={"shoes": str(tmp / "idx-shoes"),
                                                        "bags": str(tmp / "idx-bags")}, env=env)
    versions = {name: {current_pointer(open_store(str(tmp / f"idx-{name}"), Settings(home=home))).version}
                for name in ("shoes", "bags")}
    load = Load(stack.router.address)
    try:
        with SearchClient(stack.router.address) as client:
            for step, name in enumerate(("shoes", "bags", "shoes")):
                extra = tmp / f"new-{step}"
                write_fake_embeddings(extra, random_unit_vectors(20, DIM, seed=50 + step, clusters=10),
                                      first_row=(3 + step) * 100_000)
                ids[name] |= set(read_embeddings(LocalStore(extra)).ids.tolist())
                manifest, added, _ = add_to_index(str(tmp / f"idx-{name}"), str(extra), Settings(home=home))
                versions[name].add(manifest.version)
                served_version(client, name, manifest.version)
                back = rollback(open_store(str(tmp / f"idx-{name}"), Settings(home=home)), home / "cache")
                served_version(client, name, back.version)
    finally:
        load.finish()
    assert load.errors == []  # no failed request through two publishes and rollbacks of each
    assert len(load.answers) > 100
    seen = {"shoes": set(), "bags": set()}
    for name, version, hits, coverage in load.answers:
        assert hits and hits <= ids[name], f"{name} answered with another collection's ids"
        assert version in versions[name] and coverage == 1.0
        seen[name].add(version)
    assert len(seen["shoes"]) >= 2 and len(seen["bags"]) >= 2  # the changes landed while the load ran

    with SearchClient(stack.router.address) as client:
        q = random_unit_vectors(1, DIM, seed=77)[0]
        first = {name: client.search(q, k=K, collection=name) for name in ("shoes", "bags")}
        again = {name: client.search(q, k=K, collection=name) for name in ("shoes", "bags")}
        for name in ("shoes", "bags"):  # one query, two cache entries: each collection its own namespace
            assert not first[name].cached and again[name].cached
            assert {h.id for h in again[name].hits} <= ids[name]
        assert client.info("bags").collections == ["shoes", "bags"]
        # a collection removed from the file stops being served, the other is untouched; added back, it returns
        stack.write_collections(["shoes"])
        wait_for_code(lambda: client.search(q, k=K, collection="bags"), StatusCode.NOT_FOUND)
        assert {h.id for h in client.search(q, k=K, collection="shoes").hits} <= ids["shoes"]
        stack.write_collections()
        wait_for_code(lambda: client.search(q, k=K, collection="bags"), None)
        with pytest.raises(RpcError) as e:
            client.search(q, k=K, collection="hats")
        assert e.value.code() == StatusCode.NOT_FOUND and "served: shoes, bags" in e.value.details()


def wait_for_code(call, code, timeout: float = 20.0) -> None:
    """Until call fails with code (None: until it succeeds)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            call()
            got = None
        except RpcError as e:
            got = e.code()
        if got == code:
            return
        assert time.monotonic() < deadline, f"still {got}, waiting for {code}"
        time.sleep(0.3)


def test_the_gateway_serves_each_collection_and_keys_limited_to_one(two, start_stack):
    tmp, home, ids = two
    stack = start_stack(tmp / "idx-shoes", gateway=True,
                        collections={"shoes": str(tmp / "idx-shoes"), "bags": str(tmp / "idx-bags")},
                        env={"IMSEARCH_HOME": str(home), "IMSEARCH_GATEWAY_API_KEYS": "admin,shop:shoes,bagger:bags"})
    body = {"vector": random_unit_vectors(1, DIM, seed=5)[0].tolist(), "k": K}
    with httpx.Client(base_url=stack.gateway.url, timeout=30) as http:
        admin, shop = {"X-API-Key": "admin"}, {"X-API-Key": "shop"}
        for name in ("shoes", "bags"):
            r = http.post(f"/v1/collections/{name}/search", json=body, headers=admin)
            assert r.status_code == 200, r.text
            hits = r.json()["results"]
            assert len(hits) == K and {h["id"] for h in hits} <= ids[name] and r.json()["collection"] == name
            assert hits[0]["thumbnail"].startswith(f"/v1/collections/{name}/images/")
        default = http.post("/v1/search", json=body, headers=admin).json()["results"]  # the first collection
        assert {h["id"] for h in default} <= ids["shoes"]
        assert http.get("/v1/index", headers=admin).json()["collections"] == ["shoes", "bags"]
        assert http.get("/v1/index", headers=shop).json()["collections"] == ["shoes"]
        # Before: /v1/index answered a key limited to bags with the default collection's (shoes') count, version,
        # fields and model. Unnamed, a limited key learns only which collections it may use.
        bagger = {"X-API-Key": "bagger"}
        assert http.get("/v1/index", headers=bagger).json() == {"collections": ["bags"]}
        assert http.get("/v1/collections/bags", headers=bagger).json()["count"] == len(ids["bags"])
        shoe = next(iter(ids["shoes"]))
        for path in (f"/v1/images/{shoe}", f"/v1/collections/shoes/images/{shoe}", "/v1/collections/shoes"):
            assert http.get(path, headers=bagger).status_code == 403, path
        assert http.get("/v1/collections/bags", headers=admin).json()["collection"] == "bags"
        assert http.post("/v1/collections/shoes/search", json=body, headers=shop).status_code == 200
        assert http.get("/v1/collections/shoes", headers=shop).json()["collection"] == "shoes"
        assert http.get("/v1/collections/bags", headers=shop).status_code == 403
        for path in ("/v1/collections/bags/search", "/v1/search"):
            r = http.post(path, json=body, headers=shop)
            assert r.status_code == 403 and r.json()["error"]["code"] == "PERMISSION_DENIED", r.text
        r = http.post("/v1/collections/hats/search", json=body, headers=admin)
        assert r.status_code == 404 and "no collection 'hats'" in r.json()["error"]["message"]
