"""kill -9 during `imsearch index build` or `index publish`: CURRENT still names a complete,
checksum-valid version that loads and answers."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.common.config import Settings
from services.common.store import LocalStore
from services.index.versions import list_versions, load_current
from services.indexer.build import build_index
from services.searcher.local import IndexSearcher
from tests.helpers import random_unit_vectors, write_fake_embeddings

ROOT = Path(__file__).resolve().parents[2]
DIM = 32


def start(*args: str, home: Path) -> subprocess.Popen:
    env = {**os.environ, "IMSEARCH_HOME": str(home)}
    return subprocess.Popen([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def assert_serves(idx: Path, home: Path, version: str) -> None:
    searcher = IndexSearcher(str(idx), Settings(home=home))  # loading verifies every checksum
    assert searcher.version == version
    assert searcher.search(random_unit_vectors(1, DIM, seed=5), k=3)[0]


def test_kill_9_during_build_leaves_the_published_version_serving(tmp_path):
    home, idx = tmp_path / "home", tmp_path / "idx"
    write_fake_embeddings(tmp_path / "small", random_unit_vectors(500, DIM, seed=1))
    first = build_index(str(tmp_path / "small"), str(idx), shards=2, settings=Settings(home=home))
    write_fake_embeddings(tmp_path / "big", random_unit_vectors(60_000, DIM, seed=2, clusters=50))
    proc = start("index", "build", str(tmp_path / "big"), "--out", str(idx), "--shards", "4", home=home)
    deadline = time.monotonic() + 120
    while len(list_versions(LocalStore(idx))) < 2 and not any(  # kill once the new version's files appear
            p.suffix == ".faiss" for v in (idx / "versions").iterdir() if v.name != first.version
            for p in v.iterdir()):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    # Killed while writing shard files (or, at worst, just after it flipped): either way CURRENT
    # names a whole version, and a half-written one is never published.
    current = load_current(LocalStore(idx)).version
    assert current == first.version or (idx / "versions" / current / "manifest.json").is_file()
    assert_serves(idx, home, current)


def test_kill_9_during_publish_at_random_moments_never_breaks_current(tmp_path):
    home, idx = tmp_path / "home", tmp_path / "idx"
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(300, DIM, seed=3))
    versions = [build_index(str(tmp_path / "emb"), str(idx), settings=Settings(home=home), version=f"v{i}",
                            publish_it=i == 0).version for i in range(3)]
    rng = random.Random(0)
    for attempt in range(8):
        proc = start("index", "publish", str(idx), versions[attempt % 3], home=home)
        time.sleep(rng.uniform(0.0, 1.5))  # the fault: a kill at an arbitrary moment of the run
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        current = load_current(LocalStore(idx))  # parses, and its checksum matches the pointer
        assert current.version in versions
    assert_serves(idx, home, load_current(LocalStore(idx)).version)
