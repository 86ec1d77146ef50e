"""αQE in the serving path, through real processes: the router's expanded search against exact search
(numpy: exact first round, the same αQE, exact second round), batches, the cache key, the HTTP edge."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from grpc import RpcError, StatusCode

from services.common.config import Settings
from services.common.store import LocalStore
from services.embedder.embeddings import read_embeddings
from services.index.descriptors import alpha_qe
from services.indexer.build import build_index
from services.searcher.client import SearchClient
from tests.helpers import random_unit_vectors, write_fake_embeddings

DIM, QE, K = 32, 5, 10


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qe")
    write_fake_embeddings(tmp / "emb", random_unit_vectors(6000, DIM, seed=21, clusters=60))
    # nprobe tuned to recall@10 0.99 of plain search: αQE's two rounds cannot beat the index they run on
    m = build_index(str(tmp / "emb"), str(tmp / "idx"), shards=2, factory="IVF64,Flat",
                    settings=Settings(home=tmp / "h", target_recall=0.99))
    assert 1 < m.nprobe < 64  # an approximate index: the router's rounds are not exact by construction
    emb = read_embeddings(LocalStore(tmp / "emb"))
    return tmp, emb.vectors, emb.ids


def exact_qe(x: np.ndarray, ids: np.ndarray, queries: np.ndarray) -> np.ndarray:
    sims = queries @ x.T
    top = np.argsort(-sims, axis=1)[:, :QE]
    expanded = alpha_qe(queries, x[top], np.take_along_axis(sims, top, 1))
    return ids[np.argsort(-(expanded @ x.T), axis=1)[:, :K]]


def test_expanded_search_through_the_router_matches_exact_expanded_search(catalogue, start_stack):
    tmp, x, ids = catalogue
    rng = np.random.default_rng(22)  # queries like the catalogue's photos: near one of its vectors
    queries = x[rng.choice(len(x), 60, replace=False)] + 0.05 * rng.standard_normal((60, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    stack = start_stack(tmp / "idx", redis=True, gateway=True, env={"IMSEARCH_HOME": str(tmp / "h")})
    with SearchClient(stack.router.address) as client:
        batch = client.search_batch(list(queries), k=K, qe=QE)
        single = client.search(queries[0], k=K, qe=QE)
        plain = client.search(queries[0], k=K)
        again = client.search(queries[0], k=K, qe=QE)
        with pytest.raises(RpcError) as too_many:
            client.search(queries[0], k=K, qe=51)
    with httpx.Client(base_url=stack.gateway.url, timeout=30) as http:
        over_http = http.post("/v1/search", json={"vector": queries[0].tolist(), "k": K, "qe": QE}).json()
        bad = http.post("/v1/search", json={"vector": queries[0].tolist(), "k": K, "qe": 51})
    want = exact_qe(x, ids, queries)
    got = [[h.id for h in r.hits] for r in batch]  # a query near a small IVF list may get fewer than K
    recall = np.mean([len(set(g) & set(w)) / K for g, w in zip(got, want)])
    print(f"router αQE {QE}, recall@{K} vs exact αQE: {recall:.3f}")
    assert recall >= 0.95, recall
    assert [h.id for h in single.hits] == got[0]
    assert [h.id for h in plain.hits] != got[0]  # the expansion changed the answer ...
    assert not plain.cached and again.cached  # ... so qe is part of the cache key: plain did not hit qe's
    assert [h["id"] for h in over_http["results"]] == got[0]
    assert too_many.value.code() == StatusCode.INVALID_ARGUMENT and "qe" in too_many.value.details()
    assert bad.status_code == 400 and "qe" in bad.json()["error"]["message"], bad.text
