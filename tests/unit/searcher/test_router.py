import pytest

from services.common.errors import InvalidInput
from services.searcher.collections import parse_shards
from services.searcher.remote import shard_budget


def test_parse_shards_groups_and_replicas():
    assert parse_shards("a:1|b:1, a:2") == [["a:1", "b:1"], ["a:2"]]
    for bad in ("", "a:1,,a:2", " | "):
        with pytest.raises(InvalidInput):
            parse_shards(bad)


def test_a_shard_template_expands_to_every_shard_and_its_replicas():
    assert parse_shards("s-{i}.a:1|s-{i}.b:1", 3) == [["s-0.a:1", "s-0.b:1"], ["s-1.a:1", "s-1.b:1"],
                                                     ["s-2.a:1", "s-2.b:1"]]
    for spec, count in (("s-{i}:1", None), ("s-0:1", 2), ("s-{i}:1,t:1", 2), ("s-{i}:1", 0)):
        with pytest.raises(InvalidInput):
            parse_shards(spec, count)


def test_shard_budget_leaves_room_before_the_client_deadline():
    assert shard_budget(None, 2.0) == 2.0
    assert shard_budget(10.0, 2.0) == 2.0
    assert shard_budget(1.0, 2.0) == pytest.approx(0.89)
    assert 0 < shard_budget(0.0, 2.0) < 0.01


def test_the_coarse_assignment_of_a_fan_out_runs_on_one_openmp_thread(tmp_path, monkeypatch):
    """Before: it ran in the loop's default pool with every core's OpenMP team, whose threads spin on after so
    short a search (a few queries x the centroids): 828 vs 1,249 single queries/s over 4 shard servers."""
    import asyncio

    import faiss
    import numpy as np

    from protos.imsearch.v1 import imsearch_pb2 as pb
    from services.common.config import Settings
    from services.index import faiss_util
    from services.searcher.remote import RemoteShards

    if faiss.omp_get_max_threads() < 2:
        pytest.skip("one core: every thread has one OpenMP thread")
    quantizer = faiss.IndexFlatIP(8)
    quantizer.add(np.eye(8, dtype=np.float32))
    threads, flat_search = [], faiss_util.flat_search

    def recording(index, queries, k):
        threads.append(faiss.omp_get_max_threads())
        return flat_search(index, queries, k)

    monkeypatch.setattr(faiss_util, "flat_search", recording)

    async def fan_out() -> pb.ShardSearchRequest:
        shards = RemoteShards([], Settings(home=tmp_path), None, str(tmp_path / "idx"))
        shards.coarse["v1"] = (quantizer, 2)
        request = pb.ShardSearchRequest(k=3)
        try:
            await shards._fan_out(request, np.eye(8, dtype=np.float32)[:3], asyncio.get_running_loop().time() + 5, "v1")
        finally:
            await shards.close()
        return request

    request = asyncio.run(fan_out())
    assert threads == [1]
    assert len(request.assign) > 0  # the assignment went out with the request


def test_a_new_versions_files_are_read_once_however_many_requests_want_them_and_off_the_default_pool(tmp_path):
    """Before: every request arriving before a version's projection was loaded read the manifest and projection
    again, on the default thread pool that query images are embedded on."""
    import asyncio
    import threading

    from services.common.config import Settings
    from services.indexer.build import build_index
    from services.searcher.remote import RemoteShards
    from tests.helpers import random_unit_vectors, write_fake_embeddings

    settings = Settings(home=tmp_path / "home")
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(400, 8, seed=1))
    manifest = build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), settings=settings, pca_dim=4)
    shards = RemoteShards([], settings, None, str(tmp_path / "idx"))
    reads, manifest_of = [], shards._manifest

    def counted(version):
        reads.append(threading.current_thread().name)
        return manifest_of(version)

    shards._manifest = counted

    async def many():
        try:
            return await asyncio.gather(*(shards.space(manifest.version) for _ in range(20)))
        finally:
            await shards.close()

    spaces = asyncio.run(many())
    assert len(reads) == 1 and reads[0].startswith("version-files")
    assert all(s[0].version == manifest.version and s[1] is not None for s in spaces)  # the projection came too
