"""Shards searched in this process, following CURRENT: what they do with a version they cannot load."""

from __future__ import annotations

import asyncio

from services.common.config import Settings
from services.common.store import LocalStore
from services.index.versions import load_current
from services.indexer.build import build_index
from services.searcher.localshards import LocalShards, load
from tests.helpers import random_unit_vectors, write_fake_embeddings


def test_a_damaged_published_version_is_tried_again_after_a_growing_back_off_not_at_every_look(tmp_path):
    """Before: a shard server tried (and, on S3, downloaded) a damaged version at every look, every 2 s for ever."""
    settings = Settings(home=tmp_path / "home", reload_interval_s=0.05)
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(200, 8, seed=1))
    root = str(tmp_path / "idx")
    build_index(str(tmp_path / "emb"), root, shards=2, settings=settings, version="v1")
    v1 = load_current(LocalStore(tmp_path / "idx"))
    build_index(str(tmp_path / "emb"), root, shards=2, settings=settings, version="v2")
    (tmp_path / "idx" / "versions" / "v2" / "shard-00000.faiss").write_bytes(b"damaged")
    shards = LocalShards(load(root, 0, settings, manifest=v1), root, 0, settings)
    tries, load_version = [], shards._load

    def counted(manifest):
        tries.append(manifest.version)
        return load_version(manifest)

    shards._load = counted

    async def follow_for(seconds: float) -> None:
        watch = asyncio.get_running_loop().create_task(shards.watch(settings.reload_interval_s))
        await asyncio.sleep(seconds)
        watch.cancel()

    try:
        asyncio.run(follow_for(1.6))  # 32 looks at CURRENT
    finally:
        shards.pool.shutdown()
    assert 3 <= len(tries) <= 7, tries  # 0.05, 0.1, 0.2, 0.4, 0.8 s apart
    assert shards.version == "v1" and shards.follower.failed_version == "v2"
    assert "checksum" in shards.follower.failed_error
