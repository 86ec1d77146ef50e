"""One host: a router that searches every shard in its own process (`--shards local`) answers as a router over
shard servers does — same API, same answers — and follows published versions under load without a failed
request or an answer that mixes versions."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from grpc import RpcError, StatusCode

from services.common.config import Settings
from services.common.store import LocalStore
from services.eval.synthetic import write_embeddings
from services.index.versions import rollback
from services.indexer.build import build_index
from services.indexer.update import add_to_index
from services.searcher.client import SearchClient
from tests.helpers import random_unit_vectors

DIM, N, SHARDS = 16, 6000, 3


@pytest.fixture()
def index(tmp_path):
    settings = Settings(home=tmp_path / "home", flat_max=1000)
    meta = [{"colour": ["red", "green", "blue"][i % 3]} for i in range(N)]
    write_embeddings(tmp_path / "emb", random_unit_vectors(N, DIM, seed=1, clusters=30), name="one",
                     uri_prefix="v1", metadata=meta)
    manifest = build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=SHARDS, settings=settings)
    assert manifest.params["kind"] == "ivf-flat"
    return tmp_path, settings, manifest


def test_the_in_process_router_gives_the_shard_servers_answers(index, start_stack):
    tmp, settings, manifest = index
    env = {"IMSEARCH_HOME": str(tmp / "home")}
    local = start_stack(tmp / "idx", in_process=True, env=env)
    remote = start_stack(tmp / "idx", env=env)
    assert local.shards == [] and len(remote.shards) == SHARDS
    assert not any(p.name.startswith("shard-") for p in local.parts)
    queries = random_unit_vectors(40, DIM, seed=7, clusters=30)
    with SearchClient(local.router.address, timeout=30) as a, SearchClient(remote.router.address, timeout=30) as b:
        got = [c.search_columns(list(queries), k=10) for c in (a, b)]
        assert np.array_equal(got[0].ids, got[1].ids) and np.allclose(got[0].scores, got[1].scores, atol=1e-5)
        assert np.array_equal(got[0].shards, got[1].shards)  # each hit names the shard that holds it
        single = [c.search(queries[3], k=5) for c in (a, b)]
        assert [h.id for h in single[0].hits] == [h.id for h in single[1].hits] and single[0].coverage == 1.0
        by_id = [c.search(int(single[0].hits[0].id), k=5) for c in (a, b)]  # a catalogue id: Fetch, then search
        assert [h.id for h in by_id[0].hits] == [h.id for h in by_id[1].hits]
        filtered = [c.search_batch(list(queries[:5]), k=10, where='colour == "red"') for c in (a, b)]
        assert [[h.id for h in r.hits] for r in filtered[0]] == [[h.id for h in r.hits] for r in filtered[1]]
        info = [c.info() for c in (a, b)]
        assert [(s.shard, s.count, s.sha256) for s in info[0].shards] == \
            [(s.shard, s.count, s.sha256) for s in info[1].shards]
        assert (info[0].count, info[0].index_version, info[0].factory) == (N, manifest.version, manifest.factory)
        with pytest.raises(RpcError) as e:
            a.search(123456789, k=5)
        assert e.value.code() == StatusCode.NOT_FOUND


def test_the_in_process_router_follows_an_add_and_a_rollback_under_load(index, start_stack):
    tmp, settings, first = index
    env = {"IMSEARCH_HOME": str(tmp / "home"), "IMSEARCH_RELOAD_INTERVAL_S": "0.2"}
    router = start_stack(tmp / "idx", in_process=True, env=env).router
    near = np.eye(DIM, dtype=np.float32)[0] + 0.01 * random_unit_vectors(50, DIM, seed=2)
    write_embeddings(tmp / "emb2", near / np.linalg.norm(near, axis=1, keepdims=True), name="one", uri_prefix="v2",
                     first_row=N)
    records, errors, stop = [], [], threading.Event()
    probe = np.eye(DIM, dtype=np.float32)[0]  # the added rows sit exactly here

    def load():
        with SearchClient(router.address, timeout=10) as client:
            while not stop.is_set():
                try:
                    r = client.search(probe, k=10)
                    records.append((r.index_version, {h.uri.split("/")[0] for h in r.hits}, r.coverage))
                except Exception as e:  # any failure is a test failure, counted below
                    errors.append(repr(e))

    def wait_for(version: str) -> None:
        deadline = time.monotonic() + 60
        while not any(v == version for v, _, _ in records[-10:]) and time.monotonic() < deadline:
            time.sleep(0.05)
        n = len(records)
        while len(records) < n + 30 and time.monotonic() < deadline:
            time.sleep(0.01)

    workers = [threading.Thread(target=load) for _ in range(3)]
    try:
        for w in workers:
            w.start()
        while len(records) < 50:
            time.sleep(0.01)
        second, added, _ = add_to_index(str(tmp / "idx"), str(tmp / "emb2"), settings=settings)
        assert added == 50
        wait_for(second.version)
        back = rollback(LocalStore(tmp / "idx"), settings.home / "cache")
        assert back.version == first.version
        wait_for(first.version)
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    assert not errors, errors[:3]
    versions = [v for v, _, _ in records]
    assert second.version in versions and versions[-1] == first.version
    assert all(c == 1.0 for _, _, c in records)
    assert all("v2" in uris for v, uris, _ in records if v == second.version)  # the added rows are found
    assert all(uris == {"v1"} for v, uris, _ in records if v == first.version)  # and gone after the rollback
