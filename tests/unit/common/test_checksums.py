"""The one checksum-verified read, as several processes sharing one cache folder run it."""

import os
import threading
from pathlib import Path

import pytest

from services.common.checksums import sha256_bytes, verified_file
from services.common.errors import Corrupt
from services.common.store import LocalStore


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
