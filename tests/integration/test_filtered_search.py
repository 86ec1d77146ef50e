"""Filtered search through real processes (shard servers, router with its Redis cache, HTTP gateway): the filter
reaches every shard and is applied during its search, both spellings give one answer (and one cache entry), bad
filters are INVALID_ARGUMENT / 400 naming the field, and add and delete change what a filter finds."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
from grpc import RpcError, StatusCode

from services.common.config import Settings
from services.common.store import LocalStore
from services.embedder.embeddings import read_embeddings
from services.indexer.build import build_index
from services.indexer.update import add_to_index, delete_from_index
from services.searcher.client import SearchClient
from tests.helpers import random_unit_vectors, write_fake_embeddings

DIM, N, SHARDS, K = 16, 3000, 3, 10
CATEGORIES = ["shoes", "bags", "hats", "belts", "scarves", "rare"]


def metadata(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    weights = np.array([40, 25, 15, 10, 9, 1], float)  # Zipf-like; "rare" is 1 %
    cats = rng.choice(CATEGORIES, n, p=weights / weights.sum())
    return [{"category": str(c), "price": round(float(p), 2), "in_stock": bool(s)}
            for c, p, s in zip(cats, rng.uniform(0, 200, n), rng.random(n) < 0.6)]


@pytest.fixture()
def catalogue(tmp_path):
    x = random_unit_vectors(N, DIM, seed=3, clusters=30)
    meta = metadata(N, seed=4)
    write_fake_embeddings(tmp_path / "emb", x, metadata=meta)
    manifest = build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=SHARDS, factory="IVF32,Flat",
                           settings=Settings(home=tmp_path / "home"))
    assert manifest.fields == {"category": "str", "in_stock": "bool", "price": "float"}
    ids = read_embeddings(LocalStore(tmp_path / "emb")).ids
    return tmp_path, x, ids, meta


def exact(x, ids, keep: np.ndarray, q: np.ndarray, k: int = K) -> list[list[int]]:
    """Exact filtered search by brute force: the answer a filtered search must give."""
    scores = q @ x[keep].T
    order = np.argsort(-scores, axis=1)[:, :k]
    return [ids[keep][row].tolist() for row in order]


def recall(got: list[list[int]], want: list[list[int]]) -> float:
    return sum(len(set(g) & set(w)) for g, w in zip(got, want)) / sum(len(w) for w in want)


def test_a_filter_through_grpc_and_http_finds_what_exact_filtered_search_finds(catalogue, start_stack, redis_server):
    tmp, x, ids, meta = catalogue
    stack = start_stack(tmp / "idx", gateway=True, env={"IMSEARCH_HOME": str(tmp / "home"),
                                                         "IMSEARCH_REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/0"})
    q = random_unit_vectors(8, DIM, seed=5, clusters=30)
    cat = np.array([m["category"] for m in meta])
    price = np.array([m["price"] for m in meta])
    stock = np.array([m["in_stock"] for m in meta])
    where = 'in_stock and category in ("shoes", "bags") and price < 120'
    keep = stock & np.isin(cat, ["shoes", "bags"]) & (price < 120)
    as_json = {"in_stock": True, "category": ["bags", "shoes"], "price": {"lt": 120}}
    rare = cat == "rare"
    with SearchClient(stack.router.address) as client:
        by_where = [[h.id for h in r.hits] for r in client.search_batch(list(q), k=K, where=where)]
        by_json = [[h.id for h in r.hits] for r in client.search_batch(list(q), k=K, where=json.dumps(as_json))]
        assert by_where == by_json
        assert recall(by_where, exact(x, ids, keep, q)) >= 0.95
        assert all(len(r) == K for r in by_where)
        # 1 % of the catalogue (about 30 rows over 3 shards): still k hits, the exact ones
        few = [[h.id for h in r.hits] for r in client.search_batch(list(q), k=K, where='category == "rare"')]
        assert few == exact(x, ids, rare, q)
        # the cache: one entry however the filter is spelled; another filter is another entry
        first = client.search(q[0], k=K, where=where)
        again = client.search(q[0], k=K, where=json.dumps(as_json))
        other = client.search(q[0], k=K, where='category == "rare"')
        assert not first.cached and again.cached and not other.cached
        assert [h.id for h in again.hits] == [h.id for h in first.hits] == by_where[0]
        assert [h.id for h in other.hits] == few[0]
        # query expansion's neighbours come from the filtered rows too
        expanded = client.search(q[1], k=K, where='category == "rare"', qe=3)
        assert {h.id for h in expanded.hits} <= set(ids[rare].tolist()) and len(expanded.hits) == K
        with pytest.raises(RpcError) as e:
            client.search(q[0], k=K, where='colour == "red"')
        assert e.value.code() == StatusCode.INVALID_ARGUMENT and "unknown field 'colour'" in e.value.details()
        with pytest.raises(RpcError) as e:
            client.search(q[0], k=K, where="price <")
        assert e.value.code() == StatusCode.INVALID_ARGUMENT and "not an expression" in e.value.details()

    with httpx.Client(base_url=stack.gateway.url, timeout=30) as http:
        body = {"vector": q[0].tolist(), "k": K}
        r = http.post("/v1/search", json={**body, "filter": as_json})
        assert r.status_code == 200, r.text
        assert [h["id"] for h in r.json()["results"]] == by_where[0]
        r = http.post("/v1/search", json={**body, "where": 'category == "rare"'})
        assert [h["id"] for h in r.json()["results"]] == few[0]
        r = http.post("/v1/search/batch", json={"queries": [{"vector": v.tolist()} for v in q[:2]], "k": K,
                                                 "filter": {"category": "rare"}})
        assert [[h["id"] for h in res] for res in r.json()["results"]] == few[:2]
        r = http.post("/v1/search", json={**body, "filter": {"price": {"lt": "cheap"}}})
        assert r.status_code == 400 and "price holds float values" in r.json()["error"]["message"], r.text
        r = http.post("/v1/search", json={**body, "filter": {"in_stock": True}, "where": "in_stock"})
        assert r.status_code == 400 and "not both" in r.json()["error"]["message"]


def test_add_and_delete_change_what_a_filter_finds_on_serving_shards(catalogue, start_stack):
    tmp, x, ids, meta = catalogue
    home = tmp / "home"
    stack = start_stack(tmp / "idx", env={"IMSEARCH_HOME": str(home), "IMSEARCH_RELOAD_INTERVAL_S": "0.5"})
    q = random_unit_vectors(4, DIM, seed=6, clusters=30)
    with SearchClient(stack.router.address) as client:
        assert client.search(q[0], k=K, where='category == "boots"').hits == []  # a value no row has yet
        # an add introduces a value of category that no row had
        extra = random_unit_vectors(40, DIM, seed=7, clusters=30)
        write_fake_embeddings(tmp / "new", extra, first_row=10_000,
                              metadata=[{"category": "boots", "price": 50.0, "in_stock": True}] * 40)
        manifest, added, _ = add_to_index(str(tmp / "idx"), str(tmp / "new"), Settings(home=home))
        new_ids = set(read_embeddings(LocalStore(tmp / "new")).ids.tolist())
        boots = wait_for(lambda: client.search(q[0], k=K, where='category == "boots"'), manifest.version)
        assert added == 40 and len(boots.hits) == K and {h.id for h in boots.hits} <= new_ids
        # a delete of every "rare" row empties the category
        rare = [int(i) for i, m in zip(ids, meta) if m["category"] == "rare"]
        assert rare
        manifest, removed, _ = delete_from_index(str(tmp / "idx"), rare, Settings(home=home))
        gone = wait_for(lambda: client.search(q[1], k=K, where='category == "rare"'), manifest.version)
        assert removed == len(rare) and gone.hits == [] and gone.coverage == 1.0
        assert len(client.search(q[1], k=K, where='category != "rare"').hits) == K


def wait_for(search, version: str, timeout: float = 30.0):
    """The answer once every shard serves `version` (shard servers follow CURRENT every reload interval)."""
    deadline = time.monotonic() + timeout
    while True:
        reply = search()
        if reply.index_version == version or time.monotonic() > deadline:
            assert reply.index_version == version, f"shards still answer from {reply.index_version}"
            return reply
        time.sleep(0.3)
