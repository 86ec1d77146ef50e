"""A served catalogue of real photos for the gateway and browser tests: shard servers, router, gateway."""

from __future__ import annotations

import pytest

from services.common.config import Settings
from services.common.procs import HttpService, Service, free_port, start_all
from services.embedder.pipeline import embed_catalogue
from services.eval.datasets import flatten, skimage_photos
from services.indexer.build import build_index

SHARDS = 2


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway")
    (tmp / "photos").mkdir()
    for item in skimage_photos()[:12]:
        flatten(item.path, 320).save(tmp / "photos" / f"{item.label}.jpg")
    settings = Settings(home=tmp / "home")
    embed_catalogue(str(tmp / "photos"), str(tmp / "emb"), engine="local", settings=settings)
    build_index(str(tmp / "emb"), str(tmp / "idx"), shards=SHARDS, settings=settings)
    return tmp


def start_stack(tmp, log_dir, **env_vars: str):
    """Shard servers + router (embedding query images) + gateway, each a process; returns them."""
    env = {"IMSEARCH_HOME": str(tmp / "home"), "IMSEARCH_SHARD_TIMEOUT_S": "2", **env_vars}
    shards = [Service("services.searcher.shard", ["--index", str(tmp / "idx"), "--shard", str(i)], free_port(), env,
                      log_dir / f"shard{i}.log") for i in range(SHARDS)]
    router = Service("services.searcher.router", ["--shards", ",".join(s.address for s in shards), "--index",
                                                  str(tmp / "idx")], free_port(), env, log_dir / "router.log")
    gateway = HttpService("services.gateway", ["--router", f"127.0.0.1:{router.port}", "--index", str(tmp / "idx")],
                          free_port(), env, log_dir / "gateway.log")
    start_all(shards)
    router.start()
    gateway.start()
    return shards, router, gateway


