import json

import pytest

from services.common.errors import Corrupt, InvalidInput, NotFound
from services.common.store import LocalStore
from services.index.manifest import Manifest, ShardEntry, write_manifest
from services.index.versions import advance, load_current, read_pointer


def publish(store, m: Manifest) -> None:
    advance(store, read_pointer(store), m.version, write_manifest(store, m))


def manifest(version="v1") -> Manifest:
    return Manifest(version=version, created_at="2026-11-23T00:00:00Z", model={"name": "m", "fingerprint": "f"},
                    dim=8, factory="Flat", params={"kind": "flat"}, count=3,
                    shards=[ShardEntry(shard=0, file="shard-00000.faiss", sha256="ab", bytes=10, count=3,
                                       docs_file="shard-00000.docs.parquet", docs_sha256="cd")])


def test_round_trip():
    m = manifest()
    assert Manifest.from_bytes(m.to_bytes()) == m


def test_publish_then_load(tmp_path):
    store = LocalStore(tmp_path)
    publish(store, manifest("v1"))
    publish(store, manifest("v2"))
    assert load_current(store).version == "v2"
    assert store.exists("versions/v1/manifest.json")  # old versions are kept


def test_no_index_is_not_found(tmp_path):
    with pytest.raises(NotFound, match="no index"):
        load_current(LocalStore(tmp_path))


def test_tampered_manifest_fails_its_checksum(tmp_path):
    store = LocalStore(tmp_path)
    publish(store, manifest())
    data = json.loads(store.get_bytes("versions/v1/manifest.json"))
    data["count"] = 999
    store.put_bytes("versions/v1/manifest.json", json.dumps(data).encode())
    with pytest.raises(Corrupt, match="checksum"):
        load_current(store)


def test_garbage_and_future_formats_are_refused():
    with pytest.raises(Corrupt, match="not a valid manifest"):
        Manifest.from_bytes(b'{"version": 1}')
    future = manifest().model_copy(update={"format": 99}).to_bytes()
    with pytest.raises(InvalidInput, match="format 99"):
        Manifest.from_bytes(future)
