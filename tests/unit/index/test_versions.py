"""CURRENT moves only by compare-and-swap: a change either lands in the published version or is refused; gc,
publish and rollback never leave CURRENT naming a version whose files are gone."""

from __future__ import annotations

import json
import multiprocessing
import os
import time

import pytest

from services.common.config import Settings
from services.common.errors import Conflict, Corrupt, InvalidInput, NotFound
from services.common.store import LocalStore
from services.embedder.embeddings import read_embeddings
from services.index.layout import version_prefix
from services.index.versions import (
    advance,
    check_new_version,
    current_pointer,
    gc,
    list_versions,
    load_current,
    publish,
    read_pointer,
    rollback,
)
from services.indexer.build import build_index
from services.indexer.update import delete_from_index
from services.searcher.local import IndexSearcher
from tests.helpers import random_unit_vectors, write_fake_embeddings


@pytest.fixture()
def index(tmp_path):
    """A 2-shard Flat index of 300 vectors at tmp/idx published as v1; returns (tmp, settings, ids)."""
    settings = Settings(home=tmp_path / "home")
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(300, 8, seed=1))
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=2, settings=settings, version="v1")
    return tmp_path, settings, read_embeddings(LocalStore(tmp_path / "emb")).ids.tolist()


def held_ids(root, settings) -> set[int]:
    searcher = IndexSearcher(str(root), settings)
    return {int(i) for s in searcher.shards for i in s.ids}


def test_a_flip_from_a_pointer_someone_moved_is_refused_naming_the_winner(index):
    tmp, settings, _ = index
    store = LocalStore(tmp / "idx")
    stale = read_pointer(store)
    build_index(str(tmp / "emb"), str(tmp / "idx"), settings=settings, version="v2")  # another writer wins
    data = store.get_bytes(f"{version_prefix('v1')}/manifest.json")
    with pytest.raises(Conflict, match=r"v2 \(generation 2\) is published now") as refused:
        advance(store, stale, "v1", data)
    assert refused.value.winner.version == "v2" and load_current(store).version == "v2"


def test_a_delete_racing_another_delete_is_redone_on_top_of_it_and_both_land(index):
    """The lost update: delete A reads CURRENT, delete B publishes meanwhile; A's flip must not undo B."""
    tmp, settings, ids = index
    raced, said = [], []

    def step(msg: str) -> None:  # the window between A reading CURRENT and flipping it
        said.append(msg)
        if msg.startswith("loading") and not raced:
            raced.append(delete_from_index(str(tmp / "idx"), ids[10:13], settings))

    delete_from_index(str(tmp / "idx"), ids[:3], settings, step)
    assert raced and any("published meanwhile: redoing the change" in m for m in said)
    assert not held_ids(tmp / "idx", settings) & set(ids[:3] + ids[10:13])  # both deletes are in
    assert len(held_ids(tmp / "idx", settings)) == 294
    assert len(list_versions(LocalStore(tmp / "idx"))) == 3  # v1, B's, A's redone: the lost attempt is gone


def test_a_build_that_started_before_a_delete_does_not_publish_over_it(index):
    tmp, settings, ids = index

    def step(msg: str) -> None:
        if msg.startswith("adding"):  # mid-build, a takedown delete is published
            delete_from_index(str(tmp / "idx"), ids[:2], settings)

    with pytest.raises(Conflict, match="kept staged as v3"):
        build_index(str(tmp / "emb"), str(tmp / "idx"), settings=settings, version="v3", step=step)
    assert not held_ids(tmp / "idx", settings) & set(ids[:2])  # the delete stands
    assert "v3" in list_versions(LocalStore(tmp / "idx"))  # the build's work is kept, staged


def test_publish_and_rollback_verify_the_target_before_flipping(index):
    tmp, settings, _ = index
    store = LocalStore(tmp / "idx")
    build_index(str(tmp / "emb"), str(tmp / "idx"), shards=2, settings=settings, version="v2", publish_it=False)
    (tmp / "idx" / "versions" / "v2" / "shard-00001.faiss").write_bytes(b"damaged")
    with pytest.raises(Corrupt, match="shard-00001.faiss"):
        publish(store, "v2", settings.home / "cache")
    assert load_current(store).version == "v1"

    build_index(str(tmp / "emb"), str(tmp / "idx"), settings=settings, version="v3")
    (tmp / "idx" / "versions" / "v1" / "shard-00000.docs.parquet").unlink()  # the version before loses a file
    with pytest.raises(NotFound, match="shard-00000.docs.parquet"):
        rollback(store, settings.home / "cache")
    assert load_current(store).version == "v3"


def test_gc_keeps_current_history_and_young_versions_and_removes_old_and_orphans(index):
    tmp, settings, _ = index
    store = LocalStore(tmp / "idx")
    for v in ("v2", "v3", "v4"):
        build_index(str(tmp / "emb"), str(tmp / "idx"), settings=settings, version=v)
    build_index(str(tmp / "emb"), str(tmp / "idx"), settings=settings, version="staged", publish_it=False)
    orphan = tmp / "idx" / "versions" / "killed"  # a build killed before its manifest
    orphan.mkdir()
    (orphan / "shard-00000.faiss").write_bytes(b"half")
    (orphan / ".tmp-shard-00001.faiss-1234").write_bytes(b"half")

    assert gc(store, keep=1, grace_s=3600) == []  # everything is younger than the grace period
    removed = gc(store, keep=1, grace_s=3600, now=time.time() + 7200)
    assert removed == ["killed", "staged", "v1", "v2"]
    assert list_versions(store) == ["v3", "v4"] and not orphan.exists()
    pointer = current_pointer(store)
    assert pointer.version == "v4" and pointer.history == ["v3"] and pointer.deleting == []
    assert rollback(store, settings.home / "cache").version == "v3"  # what rollback can reach is whole


def test_gc_removes_a_ray_build_staging_left_untouched_for_the_grace_period(index):
    tmp, _, _ = index
    store = LocalStore(tmp / "idx")
    for name in ("abandoned", "recent"):
        store.put_bytes(f"builds/{name}/plan.json", b"{}")
        store.put_bytes(f"builds/{name}/shard-00000.json", b"{}")
    old = time.time() - 7200
    for f in (tmp / "idx" / "builds" / "abandoned").iterdir():
        os.utime(f, (old, old))
    said: list[str] = []
    gc(store, keep=1, grace_s=3600, step=said.append)
    assert not (tmp / "idx" / "builds" / "abandoned").exists()
    assert sorted(p.name for p in (tmp / "idx" / "builds" / "recent").iterdir()) == ["plan.json", "shard-00000.json"]
    assert said == ["removing the abandoned build staged at builds/abandoned"]
    assert load_current(store).version == "v1"  # the versions are gc's as before


def test_a_version_gc_is_removing_cannot_be_published(index):
    tmp, settings, _ = index
    store = LocalStore(tmp / "idx")
    build_index(str(tmp / "emb"), str(tmp / "idx"), settings=settings, version="v2", publish_it=False)
    pointer = read_pointer(store)
    marked = json.loads(pointer.to_bytes()) | {"deleting": ["v2"], "generation": pointer.generation + 1}
    store.put_if("CURRENT", json.dumps(marked).encode(), pointer.token)  # gc killed after marking v2
    with pytest.raises(Conflict, match="being removed"):
        publish(store, "v2", settings.home / "cache")
    assert gc(store, keep=2, grace_s=3600) == ["v2"]  # the next gc finishes it, young or not
    assert list_versions(store) == ["v1"] and current_pointer(store).deleting == []


def _increment(root: str, times: int, wins) -> None:
    store, won = LocalStore(root), 0
    while won < times:
        data, token = store.get_versioned("counter")
        try:
            store.put_if("counter", str(int(data) + 1).encode(), token)
            won += 1
        except Conflict:
            continue
    wins.put(won)


def test_put_if_is_a_compare_and_swap_between_processes(tmp_path):
    store = LocalStore(tmp_path)
    store.put_if("counter", b"0", None)
    with pytest.raises(Conflict):
        store.put_if("counter", b"0", None)  # create-only: it exists
    ctx = multiprocessing.get_context("spawn")
    wins = ctx.Queue()
    procs = [ctx.Process(target=_increment, args=(str(tmp_path), 50, wins)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert sum(wins.get(timeout=5) for _ in procs) == 200
    assert int(store.get_bytes("counter")) == 200  # no increment lost
    assert store.list() == ["counter"]  # the lock file is not a key


def test_publish_verifies_the_projection_too(tmp_path):
    settings = Settings(home=tmp_path / "home")
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(400, 32, seed=1))
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), settings=settings, version="v1", pca_dim=8)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), settings=settings, version="v2", pca_dim=8,
                publish_it=False)
    (tmp_path / "idx" / "versions" / "v2" / "projection.npz").write_bytes(b"damaged")
    with pytest.raises(Corrupt, match="projection.npz"):
        publish(LocalStore(tmp_path / "idx"), "v2", settings.home / "cache")
    assert load_current(LocalStore(tmp_path / "idx")).version == "v1"


def test_two_builds_asking_for_one_version_name_at_once_one_is_refused_and_the_index_stays_readable(index):
    """Before: the name was checked, then written: the second build went on, and whichever wrote last replaced
    the published version's files and manifest under CURRENT — every reader then failed on a checksum."""
    tmp, settings, ids = index
    store = LocalStore(tmp / "idx")
    write_fake_embeddings(tmp / "other", random_unit_vectors(100, 8, seed=9), first_row=5000)
    refused = []

    def step(msg: str) -> None:  # inside the first build's window: its name reserved, nothing written yet
        if msg.startswith("adding") and not refused:
            with pytest.raises(InvalidInput, match="'v2' is taken by another writer") as e:
                build_index(str(tmp / "other"), str(tmp / "idx"), settings=settings, version="v2")
            refused.append(e.value)

    build_index(str(tmp / "emb"), str(tmp / "idx"), shards=2, settings=settings, version="v2", step=step)
    assert refused and load_current(store).version == "v2"
    assert held_ids(tmp / "idx", settings) == set(ids)  # the first build's vectors, readable


def test_a_version_name_is_reserved_once_and_its_owner_may_take_it_again(index):
    tmp, _, _ = index
    store = LocalStore(tmp / "idx")
    assert check_new_version(store, "v9", owner="build-a") == "v9"
    assert check_new_version(store, "v9", owner="build-a") == "v9"  # the same build run again after a kill
    with pytest.raises(InvalidInput, match="taken by another writer"):
        check_new_version(store, "v9", owner="build-b")
    with pytest.raises(InvalidInput, match="already has a version 'v1'"):
        check_new_version(store, "v1")
    assert "v9" not in list_versions(store)  # reserved, not written: not a version yet


def test_a_publish_whose_reply_was_lost_while_another_writer_built_on_it_stands(index, monkeypatch):
    """Before: the retried PUT of a flip that had landed was refused (CURRENT had moved on, built on it), so the
    change deleted its own version — by then in the history the other writer published on — and redid itself."""
    from services.index.layout import POINTER_KEY
    from services.index.manifest import load_version

    tmp, settings, ids = index
    root, store = str(tmp / "idx"), LocalStore(tmp / "idx")
    landed = LocalStore.put_if
    armed = [True]

    def reply_lost(self, key, data, token):
        landed(self, key, data, token)
        if key == POINTER_KEY and armed[0]:
            armed[0] = False
            delete_from_index(root, ids[5:6], settings)  # another writer publishes on top, before our reply
            raise Conflict("precondition failed: the retried PUT of a write that had landed")

    monkeypatch.setattr(LocalStore, "put_if", reply_lost)
    ours, removed, _ = delete_from_index(root, ids[:1], settings)
    pointer = current_pointer(store)
    assert not armed[0] and removed == 1 and pointer.history[0] == ours.version
    for version in [pointer.version, *pointer.history]:  # every version rollback may go back to is whole
        load_version(store, version)
    assert not held_ids(tmp / "idx", settings) & {ids[0], ids[5]}  # both changes stand
