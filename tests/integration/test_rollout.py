"""Publishing a new index version while queries run: no request fails, no answer mixes versions."""

from __future__ import annotations

import threading
import time

from services.common.config import Settings
from services.eval.synthetic import write_embeddings
from services.indexer.build import build_index
from services.searcher.client import SearchClient
from tests.helpers import random_unit_vectors

DIM = 16


def test_publish_under_load(tmp_path, start_stack):
    settings = Settings(home=tmp_path / "home")
    write_embeddings(tmp_path / "emb1", random_unit_vectors(2000, DIM, seed=1), name="one", uri_prefix="v1")
    write_embeddings(tmp_path / "emb2", random_unit_vectors(2500, DIM, seed=2), name="two", uri_prefix="v2")
    first = build_index(str(tmp_path / "emb1"), str(tmp_path / "idx"), shards=2, settings=settings)
    env = {"IMSEARCH_HOME": str(tmp_path / "home"), "IMSEARCH_RELOAD_INTERVAL_S": "0.2"}
    router = start_stack(tmp_path / "idx", router_index=False, env=env).router
    records, errors, stop = [], [], threading.Event()

    def load():
        queries = random_unit_vectors(500, DIM, seed=3)
        with SearchClient(router.address, timeout=10) as client:
            i = 0
            while not stop.is_set():
                try:
                    r = client.search(queries[i % len(queries)], k=10)
                    records.append((r.index_version, {h.uri.split("/")[0] for h in r.hits}, r.coverage))
                except Exception as e:  # any failure is a test failure, counted below
                    errors.append(repr(e))
                i += 1

    try:
        worker = threading.Thread(target=load)
        worker.start()
        while len(records) < 50 and worker.is_alive():
            time.sleep(0.01)
        second = build_index(str(tmp_path / "emb2"), str(tmp_path / "idx"), shards=2, settings=settings)
        deadline = time.monotonic() + 60
        while not any(v == second.version for v, _, _ in records[-20:]) and time.monotonic() < deadline:
            time.sleep(0.05)
        n = len(records)
        while len(records) < n + 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        worker.join(30)
    finally:
        stop.set()
    prefix = {first.version: {"v1"}, second.version: {"v2"}}
    assert not errors, errors[:3]
    assert {v for v, _, _ in records} == {first.version, second.version}
    assert all(uris == prefix[v] for v, uris, _ in records)  # never a mix of versions in one answer
    assert all(c == 1.0 for _, _, c in records)
    assert records[-1][0] == second.version
