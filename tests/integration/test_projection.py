"""A projected index (centred PCA learned at build) served by real processes: the router projects model
vectors with the projection of the version it pins the fan-out to, or, started without --index, the shards
project them; either way every kind of query answers as the in-process searcher does."""

from __future__ import annotations

import numpy as np
import pytest
from grpc import RpcError, StatusCode

from services.common.config import Settings
from services.common.store import LocalStore
from services.embedder.embeddings import read_embeddings
from services.indexer.build import build_index
from services.searcher.client import SearchClient
from services.searcher.feedback import requery
from services.searcher.local import IndexSearcher
from tests.helpers import random_unit_vectors, write_fake_embeddings

MODEL_DIM, PCA_DIM = 64, 16


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("projected")
    write_fake_embeddings(tmp / "emb", random_unit_vectors(2000, MODEL_DIM, seed=3, clusters=30))
    m = build_index(str(tmp / "emb"), str(tmp / "idx"), shards=2, pca_dim=PCA_DIM, settings=Settings(home=tmp / "h"))
    assert m.dim == PCA_DIM and m.projection is not None
    return tmp


@pytest.mark.parametrize("router_index", [True, False], ids=["router-projects", "shards-project"])
def test_every_kind_of_query_on_a_projected_index_answers_as_in_process(index, start_stack, tmp_path,
                                                                      router_index):
    settings = Settings(home=index / "h")
    local = IndexSearcher(str(index / "idx"), settings)
    ids = read_embeddings(LocalStore(index / "emb")).ids
    model_queries = random_unit_vectors(6, MODEL_DIM, seed=4, clusters=30)
    stack = start_stack(index / "idx", router_index=router_index, env={"IMSEARCH_HOME": str(tmp_path / "home")})
    with SearchClient(stack.router.address) as client:
        batch = client.search_batch(list(model_queries), k=10)
        one = client.search(model_queries[0], k=10)
        by_id = client.search(int(ids[7]), k=5)
        projected = local.to_index_space(model_queries[:1])
        if router_index:  # index-space vectors (as fetched) are taken as they are
            as_index = client.search(projected[0], k=10)
            assert [h.id for h in as_index.hits] == [h.id for h in one.hits]
            feedback = client.search(model_queries[0], k=10, relevant=[int(ids[1])], not_relevant=[int(ids[2])])
            want = local.search(requery(projected[0], local.fetch([int(ids[1]), int(ids[2])]), 1, settings), k=10)
            assert [h.id for h in feedback.hits] == [h.id for h in want[0]]
        with pytest.raises(RpcError) as bad:
            client.search(np.ones(24, np.float32), k=3)
    expected = local.search(model_queries, k=10)
    assert [[h.id for h in r.hits] for r in batch] == [[h.id for h in e] for e in expected]
    assert [h.id for h in one.hits] == [h.id for h in expected[0]]
    assert by_id.hits[0].id == int(ids[7])  # a stored vector is in the index's space already
    assert bad.value.code() == StatusCode.INVALID_ARGUMENT, bad.value.details()
