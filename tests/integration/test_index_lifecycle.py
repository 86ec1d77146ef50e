"""`imsearch index build|add|delete|publish|rollback|versions|gc` as a user runs them, with shard
servers following each change under load without a restart or a failed request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from services.common.config import Settings
from services.common.store import LocalStore
from services.index.versions import list_versions, load_current
from services.searcher.client import SearchClient
from services.searcher.local import IndexSearcher
from tests.helpers import random_unit_vectors, write_fake_embeddings

ROOT = Path(__file__).resolve().parents[2]
DIM = 16


def cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "IMSEARCH_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture()
def catalogue(tmp_path):
    x = random_unit_vectors(1200, DIM, seed=1, clusters=12)
    write_fake_embeddings(tmp_path / "emb", x[:1000])
    write_fake_embeddings(tmp_path / "emb-new", x[1000:], first_row=1000)  # same model, new images
    return tmp_path, x


def test_build_add_delete_stage_publish_rollback_gc(catalogue):
    tmp, x = catalogue
    idx, home = tmp / "idx", tmp / "home"
    ok(cli("index", "build", str(tmp / "emb"), "--out", str(idx), "--shards", "3", "--version", "v1", home=home))
    assert "added 200 vectors (0 already indexed): 1200" in ok(cli("index", "add", str(idx), str(tmp / "emb-new"),
                                                                 home=home))
    store = LocalStore(idx)
    after_add = load_current(store)
    searcher = IndexSearcher(str(idx), Settings(home=home))
    new_ids = [h.id for h in searcher.search(x[1100:1101], k=1)[0]]
    assert searcher.search(x[1100:1101], k=1)[0][0].uri == "img/1100.jpg"  # a new image is found

    (tmp / "gone.txt").write_text(f"{new_ids[0]}\n12345\n")
    said = ok(cli("index", "delete", str(idx), "--ids", str(tmp / "gone.txt"), home=home))
    assert "removed 1 vectors: 1199" in said and "12345" in said  # the unknown id is named
    after_delete = load_current(store)
    hits = IndexSearcher(str(idx), Settings(home=home)).search(x[1100:1101], k=5)[0]
    assert new_ids[0] not in [h.id for h in hits]

    staged = ok(cli("index", "build", str(tmp / "emb"), "--out", f"{idx}/v3", home=home))  # the form
    assert "staged" in staged and load_current(store).version == after_delete.version
    assert "published v3" in ok(cli("index", "publish", str(idx), "v3", home=home))
    assert load_current(store).count == 1000
    ok(cli("index", "rollback", str(idx), home=home))
    assert load_current(store).version == after_delete.version
    listing = ok(cli("index", "versions", str(idx), home=home))
    assert f"* {after_delete.version}" in listing and "v3" in listing and "v1" in listing

    ok(cli("index", "gc", str(idx), "--keep", "1", "--grace", "0", home=home))
    left = list_versions(store)
    assert after_delete.version in left and after_add.version in left and "v1" not in left
    assert IndexSearcher(str(idx), Settings(home=home)).search(x[:1], k=1)[0][0].uri == "img/0.jpg"


def test_bad_lifecycle_requests_are_one_line_errors(catalogue):
    tmp, _ = catalogue
    idx, home = tmp / "idx", tmp / "home"
    ok(cli("index", "build", str(tmp / "emb"), "--out", str(idx), "--version", "v1", home=home))
    for args, words in [
        (("index", "publish", str(idx), "nope"), "no version 'nope'"),
        (("index", "rollback", str(idx)), "no earlier version"),
        (("index", "add", str(idx), str(tmp / "emb")), "already indexed"),
        (("index", "build", str(tmp / "emb"), "--out", str(idx), "--version", "v1"), "already has a version"),
        (("index", "build", str(tmp / "emb"), "--out", str(idx), "--version", "../x"), "version name"),
    ]:
        proc = cli(*args, home=home)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    (tmp / "ids.txt").write_text("not-a-number\n")
    proc = cli("index", "delete", str(idx), "--ids", str(tmp / "ids.txt"), home=home)
    assert proc.returncode == 2 and "one integer id per line" in proc.stderr


def test_serving_shards_follow_add_and_delete_without_failing_a_request(catalogue, start_stack):
    tmp, x = catalogue
    idx, home = tmp / "idx", tmp / "home"
    ok(cli("index", "build", str(tmp / "emb"), "--out", str(idx), "--shards", "2", home=home))
    env = {"IMSEARCH_HOME": str(home), "IMSEARCH_RELOAD_INTERVAL_S": "0.2"}
    router = start_stack(idx, router_index=False, env=env).router
    failures, answers, stop = [], [], threading.Event()

    def load():
        with SearchClient(router.address, timeout=10) as client:
            i = 0
            while not stop.is_set():
                try:
                    r = client.search(x[1100 + i % 50], k=1)
                    answers.append((r.index_version, r.coverage, r.hits[0].uri if r.hits else None))
                except Exception as e:  # any failure fails the test
                    failures.append(repr(e))
                i += 1

    try:
        worker = threading.Thread(target=load)
        worker.start()
        ok(cli("index", "add", str(idx), str(tmp / "emb-new"), home=home))
        added = load_current(LocalStore(idx)).version
        deadline = time.monotonic() + 60
        while not any(v == added for v, _, _ in answers[-5:]) and time.monotonic() < deadline:
            time.sleep(0.05)
        (tmp / "gone.txt").write_text("\n".join(str(i) for i in
                                                IndexSearcher(str(idx), Settings(home=home)).shards[0].ids[:5]))
        ok(cli("index", "delete", str(idx), "--ids", str(tmp / "gone.txt"), home=home))
        deleted = load_current(LocalStore(idx)).version
        while not any(v == deleted for v, _, _ in answers[-5:]) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        worker.join(30)
    finally:
        stop.set()
    assert not failures, failures[:3]
    assert all(c == 1.0 for _, c, _ in answers)
    served = [v for v, _, _ in answers]
    assert added in served and deleted in served  # both changes reached the servers
    after_add = [u for v, _, u in answers if v == added]
    assert after_add and all(int(u[4:-4]) >= 1000 for u in after_add)  # the added images are what is found
    assert json.loads((idx / "CURRENT").read_text())["history"][0] == added
