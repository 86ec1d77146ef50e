"""A shard whose next version cannot load (its file damaged after the publish): the lag is visible in Info and
the shard's metrics, the shard turns NOT_SERVING past IMSEARCH_MAX_VERSION_LAG_S, and every answer's hits,
uris and thumbnails still come from one version."""

from __future__ import annotations

import re
import time
import urllib.request

import httpx

from services.common.config import Settings
from services.common.images import thumbnail_jpeg
from services.common.store import LocalStore
from services.eval.synthetic import write_embeddings
from services.index.manifest import load_version
from services.index.versions import advance, read_pointer
from services.indexer.build import build_index
from services.searcher.client import SearchClient
from services.stack.part import healthy
from tests.helpers import encode, pattern, random_unit_vectors


def catalogue(tmp_path, name: str, seed: int):
    """30 real images under tmp/<name>/ and their (made-up) vectors as embeddings."""
    folder = tmp_path / name
    folder.mkdir()
    for r in range(30):
        (folder / f"{r}.jpg").write_bytes(encode(pattern(48, 40, seed=seed * 100 + r), "JPEG"))
    x = random_unit_vectors(30, 16, seed=seed)
    write_embeddings(tmp_path / f"emb-{name}", x, name=name, uri_prefix=str(folder))
    return x


def shard_metric(part, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{part.env['IMSEARCH_METRICS_PORT']}/metrics").read().decode()
    found = re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_shard_that_cannot_load_the_next_version_shows_its_lag_and_answers_stay_whole(tmp_path, start_stack):
    settings, root = Settings(home=tmp_path / "home"), tmp_path / "idx"
    x1, x2 = catalogue(tmp_path, "one", 1), catalogue(tmp_path, "two", 2)
    build_index(str(tmp_path / "emb-one"), str(root), shards=2, settings=settings, version="v1")
    env = {"IMSEARCH_HOME": str(tmp_path / "home"), "IMSEARCH_RELOAD_INTERVAL_S": "0.2",
           "IMSEARCH_MAX_VERSION_LAG_S": "2"}
    stack = start_stack(root, router_index=False, gateway=True, service_metrics=True, env=env)
    shard0, shard1 = stack.shards[0][0], stack.shards[1][0]

    # v2 is written and verified, then one of its files rots before shard 1 reads it; CURRENT moves to it.
    build_index(str(tmp_path / "emb-two"), str(root), shards=2, settings=settings, version="v2", publish_it=False)
    (root / "versions" / "v2" / "shard-00001.faiss").write_bytes(b"damaged")
    store = LocalStore(root)
    advance(store, read_pointer(store), "v2", load_version(store, "v2")[1])

    with SearchClient(stack.router.address, timeout=10) as client:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = {s.shard: s for s in client.info().shards}
            if info[1].failed_version == "v2" and info[0].index_version == "v2":
                break
            time.sleep(0.2)
        assert info[1].failed_version == "v2" and "checksum" in info[1].failed_error, info[1]
        assert info[1].index_version == "v1" and info[1].published_version == "v2" and info[1].version_lag_seconds > 0
        assert info[0].version_lag_seconds == 0 and info[0].failed_version == ""
        assert shard_metric(shard1, "imsearch_shard_version_lag_seconds") > 0
        assert shard_metric(shard1, "imsearch_shard_load_failures_total") >= 1
        assert shard_metric(shard0, "imsearch_shard_version_lag_seconds") == 0

    deadline = time.monotonic() + 15  # past the allowed lag, the lagging shard asks to be replaced
    while healthy(shard1.address, timeout=1) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not healthy(shard1.address, timeout=1) and healthy(shard0.address, timeout=1)

    with httpx.Client(base_url=stack.gateway.url, timeout=30) as http:
        for q in [*x1[:4], *x2[:4]]:
            body = http.post("/v1/search", json={"vector": q.tolist(), "k": 5}).json()
            assert body["index_version"] == "v1" and body["coverage"] == 1.0, body  # one version, whole
            for hit in body["results"]:
                assert hit["uri"].startswith(str(tmp_path / "one")), hit  # v1's images, never v2's
                assert hit["thumbnail"].endswith("?version=v1")
                thumb = http.get(hit["thumbnail"])
                assert thumb.status_code == 200
                assert thumb.content == thumbnail_jpeg(open(hit["uri"], "rb").read(), 256, 1 << 30, 1 << 30)
