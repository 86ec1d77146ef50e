"""Index writes that never lose an acknowledged change, as a user's processes run them (the CLI):

* 8 writer processes (adds and deletes of disjoint id sets) against one root, local and S3: every change a
  writer acknowledged is in the final version, every refused one is absent;
* every named crash point of build, add, delete, publish, rollback and gc, local and S3: the process dies
  there (SIGKILL, exit -9: the fault landed mid-command), CURRENT still names a whole, checksum-valid
  version, and the next command succeeds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.config import Settings
from services.common.store import LocalStore, open_store
from services.embedder.embeddings import read_embeddings
from services.index.versions import current_pointer, list_versions
from services.indexer.build import build_index
from services.searcher.local import IndexSearcher
from tests.helpers import random_unit_vectors, write_fake_embeddings

ROOT = Path(__file__).resolve().parents[2]
DIM = 16


def cli(*args: str, home: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "services.cli", *args], cwd=ROOT, text=True,
                            env={**os.environ, "IMSEARCH_HOME": str(home), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    return finish(cli(*args, home=home, **env))


def held(root: str, home: Path) -> set[int]:
    """The ids of the published version, every file of it checksum-verified on the way."""
    searcher = IndexSearcher(root, Settings(home=home))
    return {int(i) for s in searcher.shards for i in s.ids}


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """An index root: a folder, or a prefix on a real S3-protocol server (moto) started for the test."""
    if request.param == "local":
        return str(tmp_path / "idx")
    request.getfixturevalue("s3")
    return f"s3://writes/{request.node.name.replace('[', '-').replace(']', '')}"


@pytest.mark.parametrize("retries", ["10", "0"])
def test_eight_concurrent_writers_lose_no_acknowledged_change(root, tmp_path, retries):
    """retries 10: a writer that loses the race redoes its change on the winner; 0: it is refused instead."""
    home = tmp_path / "home"
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(2000, DIM, seed=1))
    build_index(str(tmp_path / "emb"), root, shards=2, settings=Settings(home=home))
    base_ids = read_embeddings(LocalStore(tmp_path / "emb")).ids.tolist()
    changes = []  # (kind, ids, process)
    for w in range(4):  # 4 adders of 25 new images each, 4 deleters of 5 catalogue ids each
        folder = tmp_path / f"new-{w}"
        write_fake_embeddings(folder, random_unit_vectors(25, DIM, seed=10 + w), first_row=5000 + 100 * w)
        changes.append(("add", set(read_embeddings(LocalStore(folder)).ids.tolist()), ("add", root, str(folder))))
        ids = base_ids[5 * w:5 * w + 5]
        (tmp_path / f"gone-{w}.txt").write_text("\n".join(map(str, ids)))
        changes.append(("delete", set(ids), ("delete", root, "--ids", str(tmp_path / f"gone-{w}.txt"))))
    procs = [cli("index", *args, home=home, IMSEARCH_WRITE_RETRIES=retries) for _, _, args in changes]
    results = [finish(p) for p in procs]

    final = held(root, home)
    lost, refused, retried = 0, 0, 0
    for (kind, ids, _), r in zip(changes, results):
        assert r.returncode in (0, 2), r.stderr
        retried += "redoing the change" in r.stderr
        applied = ids <= final if kind == "add" else not ids & final
        if r.returncode == 0:
            lost += not applied  # acknowledged, yet not in the final version
        else:
            assert "changed while this ran" in r.stderr, r.stderr  # refused: a Conflict, nothing else
            refused += 1
            assert not applied and (not ids & final if kind == "add" else ids <= final)
    assert lost == 0
    assert (retried if retries != "0" else refused) >= 1, [r.stderr for r in results]  # the writers really raced
    acked_adds = sum(r.returncode == 0 for (k, _, _), r in zip(changes, results) if k == "add")
    acked_deletes = sum(r.returncode == 0 for (k, _, _), r in zip(changes, results) if k == "delete")
    assert len(final) == 2000 + 25 * acked_adds - 5 * acked_deletes
    print(f"{root}, retries {retries}: 8 writers, {8 - refused} acknowledged, {refused} refused, "
          f"{retried} redone after losing a race, 0 acknowledged changes lost")


# command -> the crash points it passes
POINTS = {
    "build": ["index.shards-written", "index.manifest-written", "index.before-flip", "index.after-flip"],
    "add": ["index.shards-written", "index.manifest-written", "index.before-flip", "index.after-flip"],
    "delete": ["index.shards-written", "index.manifest-written", "index.before-flip", "index.after-flip"],
    "publish": ["index.before-flip", "index.after-flip"],
    "rollback": ["index.before-flip", "index.after-flip"],
    "gc": ["gc.marked", "gc.mid-delete", "index.before-flip", "index.after-flip"],
}
CASES = [(command, point) for command, points in POINTS.items() for point in points]


@pytest.mark.parametrize("command,point", CASES, ids=[f"{c}-{p}" for c, p in CASES])
def test_a_crash_at_every_named_point_leaves_a_whole_version_and_the_next_command_works(root, tmp_path,
                                                                                        command, point):
    home = tmp_path / "home"
    settings = Settings(home=home)
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(300, DIM, seed=1))
    write_fake_embeddings(tmp_path / "emb-new", random_unit_vectors(20, DIM, seed=2), first_row=300)
    for version, published in (("v1", True), ("v2", True), ("staged", False)):
        build_index(str(tmp_path / "emb"), root, shards=2, settings=settings, version=version, publish_it=published)
    ids = read_embeddings(LocalStore(tmp_path / "emb")).ids.tolist()
    new_ids = set(read_embeddings(LocalStore(tmp_path / "emb-new")).ids.tolist())
    (tmp_path / "gone.txt").write_text(f"{ids[0]}\n{ids[1]}\n")
    (tmp_path / "other.txt").write_text(f"{ids[2]}\n")
    args = {"build": ("build", str(tmp_path / "emb"), "--out", root, "--shards", "2"),
            "add": ("add", root, str(tmp_path / "emb-new")),
            "delete": ("delete", root, "--ids", str(tmp_path / "gone.txt")),
            "publish": ("publish", root, "staged"), "rollback": ("rollback", root),
            "gc": ("gc", root, "--keep", "0", "--grace", "0")}[command]
    store = open_store(root, settings)

    crashed = run("index", *args, home=home, IMSEARCH_CRASH_AT=point)
    assert crashed.returncode == -9, (crashed.returncode, crashed.stderr)  # died at the point, mid-command
    pointer = current_pointer(store)
    flipped = point == "index.after-flip" and command != "gc"
    assert (pointer.version != "v2") == flipped, pointer
    assert held(root, home)  # CURRENT names a whole version: every file there and matching its checksum

    # The next command: the same one again when the crash came before its change took effect, else another
    # change on top of it (gc is always run again: it finishes what the killed one marked).
    again = command == "gc" or not flipped
    follow = run("index", *(args if again else ("delete", root, "--ids", str(tmp_path / "other.txt"))), home=home)
    assert follow.returncode == 0, follow.stderr
    final = held(root, home)
    pointer = current_pointer(store)
    if command == "add":
        assert new_ids <= final
    elif command == "delete":
        assert not {ids[0], ids[1]} & final
    elif command == "publish":
        assert pointer.version == "staged" or pointer.history[0] == "staged"
    elif command == "rollback":
        assert pointer.version == "v1" or pointer.history[0] == "v1"
    elif command == "gc":
        assert list_versions(store) == ["v2"] and pointer.deleting == [] and pointer.version == "v2"
    elif command == "build":
        # v1, v2, staged, the next build or delete, and the killed build's version once its manifest was written
        assert len(list_versions(store)) == 4 + (point != "index.shards-written") and len(final) == 300 - (not again)

    # Killed builds leave no files behind once gc runs past the grace period.
    assert run("index", "gc", root, "--keep", "9", "--grace", "0", home=home).returncode == 0
    folders = {k.split("/")[1] for k in store.list("versions")}
    assert folders == set(list_versions(store)), folders
