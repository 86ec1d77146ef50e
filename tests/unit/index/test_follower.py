"""One follower of the published version for every reader: it serves the version CURRENT names once loaded, keeps
the one before for pinned requests, releases older ones, and keeps serving through what it cannot read or load."""

from __future__ import annotations

import json

import pytest

from services.common.config import Settings
from services.common.errors import Corrupt, NotFound
from services.common.store import LocalStore
from services.index.follower import VersionFollower
from services.index.layout import POINTER_KEY
from services.index.versions import rollback
from services.indexer.build import build_index
from tests.helpers import random_unit_vectors, write_fake_embeddings


@pytest.fixture()
def root(tmp_path):
    """An index published as v1 (v2 and v3 are built by the tests)."""
    settings = Settings(home=tmp_path / "home")
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(60, 8, seed=1))
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), settings=settings, version="v1")
    return tmp_path, settings


def publish(tmp, settings, version: str) -> None:
    build_index(str(tmp / "emb"), str(tmp / "idx"), settings=settings, version=version)


def test_it_serves_the_version_current_names_and_keeps_the_one_before_for_pinned_requests(root):
    tmp, settings = root
    store, loads = LocalStore(tmp / "idx"), []

    def load(manifest):
        loads.append(manifest.version)
        return f"loaded {manifest.version}"

    follower: VersionFollower[str] = VersionFollower()
    assert follower.check(store, load) == [] and follower.latest == "v1"
    assert follower.check(store, load) == [] and loads == ["v1"]  # nothing moved: nothing loaded again
    publish(tmp, settings, "v2")
    assert follower.check(store, load) == []
    assert (follower.latest, follower.get(), follower.get("v1")) == ("v2", "loaded v2", "loaded v1")
    assert follower.pick("v1") == "loaded v1" and follower.pick("v0") == "loaded v2"  # gone: the newest
    publish(tmp, settings, "v3")
    assert follower.check(store, load) == ["loaded v1"]  # released, for the caller to free
    assert list(follower.held()) == ["v2", "v3"] and follower.get("v1") is None


def test_a_rollback_to_the_version_before_serves_it_again_without_loading_it(root):
    tmp, settings = root
    store, loads = LocalStore(tmp / "idx"), []
    publish(tmp, settings, "v2")
    follower = VersionFollower("v1", "one")
    follower.check(store, lambda m: loads.append(m.version) or "two")
    rollback(store, settings.file_cache())
    assert follower.check(store, lambda m: loads.append(m.version) or "again") == []
    assert loads == ["v2"] and follower.latest == "v1" and follower.get() == "one"
    assert list(follower.held()) == ["v2", "v1"]


def test_a_version_that_cannot_load_is_remembered_and_the_one_served_goes_on(root):
    tmp, settings = root
    store = LocalStore(tmp / "idx")
    follower = VersionFollower("v1", "one")
    publish(tmp, settings, "v2")

    def broken(manifest):
        raise Corrupt(f"{manifest.version}: shard-00000.faiss is damaged")

    with pytest.raises(Corrupt):
        follower.check(store, broken)
    assert (follower.latest, follower.get(), follower.published) == ("v1", "one", "v2")
    assert follower.failed_version == "v2" and "damaged" in follower.failed_error and follower.lag() > 0
    follower.check(store, lambda m: "two")
    assert (follower.latest, follower.failed_version, follower.failed_error, follower.lag()) == ("v2", "", "", 0.0)


def test_a_damaged_or_missing_pointer_is_an_error_of_its_own_and_nothing_moves(root):
    """Before: shard servers read CURRENT with their own json.loads, past index.versions and its Corrupt."""
    tmp, _ = root
    store = LocalStore(tmp / "idx")
    follower = VersionFollower("v1", "one")
    store.put_bytes(POINTER_KEY, b'{"version": ')
    with pytest.raises(Corrupt, match="CURRENT"):
        follower.read(store)
    store.put_bytes(POINTER_KEY, json.dumps({"version": 7}).encode())
    with pytest.raises(Corrupt):
        follower.read(store)
    store.delete(POINTER_KEY)
    with pytest.raises(NotFound):
        follower.check(store, lambda m: "never")
    assert (follower.latest, follower.get(), follower.failed_version) == ("v1", "one", "")
