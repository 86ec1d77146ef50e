"""The local copies of stored files, as several processes sharing one cache folder make and remove them."""

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from services.common import filecache
from services.common.checksums import sha256_bytes
from services.common.errors import Corrupt, NoSpace
from services.common.filecache import cached_path, forget_cached, verified_file
from services.common.store import TMP_PREFIX, LocalStore


class RemoteLike(LocalStore):
    """A store that is not local (so verified_file downloads) and downloads as minio's fget_object does:
    into `dest + '.part.minio'` opened "wb", then renamed onto dest. The first download pauses halfway
    until `resume` is set, so a second one runs start to end inside it (the race two writer processes
    sharing IMSEARCH_HOME ran into on S3)."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.halfway, self.resume = threading.Event(), threading.Event()
        self.calls = 0

    def local_path(self, key):
        return None

    def get_file(self, key, dest):
        data = self.get_bytes(key)
        self.calls += 1
        first = self.calls == 1
        tmp = f"{dest}.part.minio"
        with open(tmp, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            if first:
                self.halfway.set()
                self.resume.wait(10)
            f.write(data[len(data) // 2:])
        os.rename(tmp, dest)


def test_two_downloads_of_one_file_into_one_cache_at_once_both_verify(tmp_path):
    store = RemoteLike(tmp_path / "remote")
    data = os.urandom(1 << 16)
    store.put_bytes("v1/shard-00000.faiss", data)
    cache, results = tmp_path / "cache", {}

    def read(name):
        try:
            results[name] = verified_file(store, "v1/shard-00000.faiss", sha256_bytes(data), cache).read_bytes()
        except Exception as e:  # noqa: BLE001 - the assertion below shows what went wrong
            results[name] = e

    first = threading.Thread(target=read, args=("first",))
    first.start()
    assert store.halfway.wait(10)  # the first download is mid-file ...
    read("second")  # ... while a second runs whole
    store.resume.set()
    first.join(10)
    assert results == {"first": data, "second": data}
    assert [p.name for p in cache.iterdir()] == [f"{sha256_bytes(data)}.faiss"]  # no temp files left


def test_a_damaged_download_is_corrupt_and_not_kept_in_the_cache(tmp_path):
    store = RemoteLike(tmp_path / "remote")
    store.resume.set()
    store.put_bytes("k.faiss", b"what was written")
    with pytest.raises(Corrupt, match="checksum mismatch"):
        verified_file(store, "k.faiss", sha256_bytes(b"what the manifest says"), tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_download_without_room_on_the_disk_is_refused_before_it_starts(tmp_path, monkeypatch):
    store = RemoteLike(tmp_path / "remote")
    store.resume.set()
    data = os.urandom(1 << 10)
    store.put_bytes("v1/shard-00000.faiss", data)
    free = 300 << 20
    monkeypatch.setattr(filecache.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 40, 0, free))
    with pytest.raises(NoSpace, match=r"no room to download .*shard-00000.faiss \(100 MiB\) .*: 300 MiB free"):
        verified_file(store, "v1/shard-00000.faiss", sha256_bytes(data), tmp_path / "cache", size=100 << 20)
    assert store.calls == 0  # nothing downloaded
    assert verified_file(store, "v1/shard-00000.faiss", sha256_bytes(data), tmp_path / "cache", size=len(data))


def test_forgetting_a_dropped_version_keeps_a_file_a_served_version_shares_and_removes_dead_downloads(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    old, shared, new = (("v1/shard-0.faiss", "a" * 64), ("v1/shard-1.faiss", "b" * 64), ("v2/shard-0.faiss", "c" * 64))
    for key, sha in (old, shared, new):
        cached_path(cache, key, sha).write_bytes(b"x" * 10)
    dead, running = cache / f"{TMP_PREFIX}dead", cache / f"{TMP_PREFIX}running"
    dead.write_bytes(b"y" * 5)
    running.write_bytes(b"z")
    os.utime(dead, (time.time() - 2 * filecache.STALE_DOWNLOAD_S,) * 2)  # its process was killed long ago
    assert forget_cached(cache, [old, shared], keep={new[1], shared[1]}) == 15
    assert sorted(p.name for p in cache.iterdir()) == sorted([f"{shared[1]}.faiss", f"{new[1]}.faiss", running.name])
