"""The Ray index build (one task per shard, streaming its rows out of the embeddings parts) makes exactly the
index the in-process build makes, and a build killed after its first shard resumes when run again: finished
shards (verified by checksum) are kept, damaged ones built again. An `index add` on Ray (a task per shard)
grows the shards exactly as the in-process add does."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from services.common.config import Settings
from services.common.errors import InvalidInput
from services.common.store import LocalStore
from services.index.filters import parse_filter
from services.index.versions import load_current
from services.indexer.build import build_index
from services.indexer.update import add_to_index
from services.searcher.local import IndexSearcher
from tests.helpers import random_unit_vectors, write_fake_embeddings

ROOT = Path(__file__).resolve().parents[2]
N, DIM, SHARDS = 24_000, 32, 4
KILLED_SHARDS = 8  # on 2 CPUs at most 3 can be finished when the driver dies at its first


@pytest.fixture(scope="module", autouse=True)
def _stop_ray():
    """The in-process Ray builds here start a private Ray instance in the test process: stopped after them."""
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel")
    x = random_unit_vectors(N, DIM, seed=5, clusters=40)
    meta = [{"category": f"c{i % 9}", "price": float(i % 250), "title": f"item {i}"} for i in range(N)]
    write_fake_embeddings(tmp / "emb", x, part_rows=3000, metadata=meta, error_rows=5)
    settings = Settings(home=tmp / "home", flat_max=1000)
    local = {s: build_index(str(tmp / "emb"), str(tmp / f"local-{s}"), shards=s, settings=settings, engine="local",
                            version="v1") for s in (SHARDS, KILLED_SHARDS)}
    return tmp, settings, local


def same_files(a, b) -> bool:
    return [(e.shard, e.sha256, e.docs_sha256, e.count) for e in a.shards] == \
        [(e.shard, e.sha256, e.docs_sha256, e.count) for e in b.shards]


def test_the_ray_build_makes_the_same_shards_and_answers_as_the_local_build(catalogue):
    tmp, settings, built = catalogue
    local = built[SHARDS]
    said: list[str] = []
    ray_built = build_index(str(tmp / "emb"), str(tmp / "ray"), shards=SHARDS, settings=settings, engine="ray",
                            version="v1", step=said.append)
    assert any("Ray tasks" in s for s in said)
    assert any(s.startswith("training IVF") and "in a Ray task" in s for s in said)  # not in the driver
    assert local.params["kind"] == "ivf-flat" and local.count == N
    assert same_files(local, ray_built), "shard files differ between the local and the Ray build"
    assert (ray_built.nprobe, ray_built.tuning, ray_built.fields) == (local.nprobe, local.tuning, local.fields)
    assert ray_built.fields == {"category": "str", "price": "float"}  # title: a different string on most rows
    queries = random_unit_vectors(20, DIM, seed=9, clusters=40)
    where = parse_filter('category == "c3" and price < 100')
    got = [IndexSearcher(str(tmp / name), settings).search(queries, k=10, where=where)
           for name in (f"local-{SHARDS}", "ray")]
    assert [[(h.id, h.uri) for h in q] for q in got[0]] == [[(h.id, h.uri) for h in q] for q in got[1]]
    assert all(len(q) == 10 for q in got[0])
    assert not (tmp / "ray" / "builds").exists() or not any((tmp / "ray" / "builds").iterdir()), \
        "the staged plan outlived the build"


def test_the_ray_build_learns_the_projection_as_the_local_build_does(tmp_path):
    x = random_unit_vectors(6000, 64, seed=2, clusters=20)
    write_fake_embeddings(tmp_path / "emb", x, part_rows=1000)
    settings = Settings(home=tmp_path / "home")
    built = {engine: build_index(str(tmp_path / "emb"), str(tmp_path / engine), shards=2, settings=settings,
                                 engine=engine, pca_dim=16) for engine in ("local", "ray")}
    assert built["ray"].dim == built["local"].dim == 16
    assert [e.docs_sha256 for e in built["ray"].shards] == [e.docs_sha256 for e in built["local"].shards]
    queries = random_unit_vectors(10, 64, seed=3, clusters=20)
    got = [[[h.id for h in q] for q in IndexSearcher(str(tmp_path / e), settings).search(queries, k=10)]
           for e in ("local", "ray")]
    assert got[0] == got[1]


def build_cmd(tmp: Path, out: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", "index", "build", str(tmp / "emb"), "--out", str(tmp / out),
            "--shards", str(KILLED_SHARDS), "--engine", "ray", "--version", "v1"]


def run_build(tmp: Path, out: str, settings: Settings, crash: bool | str) -> subprocess.CompletedProcess:
    """The CLI in its own session; afterwards every process of that session is killed (Ray's workers have
    process groups of their own, and outlive a killed driver for a while). crash: True (after the first shard)
    or the crash point's name."""
    env = {**os.environ, "IMSEARCH_HOME": str(settings.home), "IMSEARCH_FLAT_MAX": str(settings.flat_max)}
    if crash:
        env["IMSEARCH_CRASH_AT"] = "index.shard-built" if crash is True else crash
    proc = subprocess.Popen(build_cmd(tmp, out), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out_, err = proc.communicate(timeout=300)
    finally:
        kill_session(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out_, err)


def kill_session(sid: int) -> None:
    left = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                p.kill()
                left.append(p)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            pass
    psutil.wait_procs(left, timeout=10)


def part_count(said: str) -> int:
    """The embeddings parts a build said it read."""
    return int(re.search(r"reading (\d+) embeddings part\(s\)", said).group(1))


def markers(root: Path) -> list[Path]:
    return sorted(root.glob("builds/*/shard-*.json"))


def test_a_ray_build_killed_after_its_first_shard_resumes_and_keeps_the_finished_shards(catalogue):
    tmp, settings, built = catalogue
    crashed = run_build(tmp, "killed", settings, crash=True)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert "shard" in crashed.stderr and "built:" in crashed.stderr  # the crash landed after a shard, as named
    finished = markers(tmp / "killed")
    assert 1 <= len(finished) < KILLED_SHARDS, f"the crash should land with some shards built, not {len(finished)}"
    assert not (tmp / "killed" / "CURRENT").exists()
    shard_file = lambda marker: tmp / "killed" / "versions" / "v1" / marker.name.replace(".json", ".faiss")  # noqa: E731
    kept = {m.name: shard_file(m).stat().st_mtime_ns for m in finished}

    rerun = run_build(tmp, "killed", settings, crash=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{len(finished)} of {KILLED_SHARDS} shard(s) already built and verified: kept" in rerun.stderr, \
        rerun.stderr
    assert "resuming the build of v1" in rerun.stderr
    assert f"building {KILLED_SHARDS - len(finished)} shard(s) in Ray tasks" in rerun.stderr
    for m in finished:  # not written again
        assert shard_file(m).stat().st_mtime_ns == kept[m.name]
    assert same_files(built[KILLED_SHARDS], load_current(LocalStore(tmp / "killed")))
    assert not markers(tmp / "killed")


def test_a_resumed_ray_build_builds_a_damaged_finished_shard_again(catalogue):
    tmp, settings, built = catalogue
    crashed = run_build(tmp, "damaged", settings, crash=True)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    finished = markers(tmp / "damaged")
    assert finished
    for marker in finished:  # every finished shard file damaged: all must be built again
        shard = tmp / "damaged" / "versions" / "v1" / marker.name.replace(".json", ".faiss")
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    rerun = run_build(tmp, "damaged", settings, crash=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stderr.count("building it again") == len(finished)
    assert "already built and verified" not in rerun.stderr
    assert same_files(built[KILLED_SHARDS], load_current(LocalStore(tmp / "damaged")))


def test_shard_tasks_read_their_own_split_rows_not_every_embeddings_part(catalogue):
    """Past 2 shards each part is split by shard once, and a shard task reads only its own split files: a build
    killed after its first shard finishes with the embeddings parts gone (before: every shard task read every
    part, S reads of the catalogue)."""
    tmp, settings, built = catalogue
    crashed = run_build(tmp, "split", settings, crash=True)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    n = part_count(crashed.stderr)
    assert f"splitting {n} embeddings part(s) by shard" in crashed.stderr, crashed.stderr[-2000:]
    assert len(list((tmp / "split").glob("builds/*/split/part-*.json"))) == n
    parts = sorted((tmp / "emb").rglob("*.parquet"))
    away = tmp / "parts-away"
    away.mkdir()
    for part in parts:
        shutil.move(part, away / part.name)
    try:
        rerun = run_build(tmp, "split", settings, crash=False)
    finally:
        for part in parts:
            shutil.move(away / part.name, part)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{n} of {n} part(s) already split and verified: kept" in rerun.stderr
    assert same_files(built[KILLED_SHARDS], load_current(LocalStore(tmp / "split")))
    assert not list((tmp / "split").glob("builds/*/split/*")), "the split files outlived the build"


def test_a_ray_build_killed_while_splitting_keeps_the_split_parts_and_splits_a_damaged_one_again(catalogue):
    tmp, settings, built = catalogue
    crashed = run_build(tmp, "splitting", settings, crash="index.part-split")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    parts = part_count(crashed.stderr)
    assert "split:" in crashed.stderr and "shard(s) in Ray tasks" not in crashed.stderr  # landed mid-split
    split = sorted((tmp / "splitting").glob("builds/*/split/part-*.json"))
    assert 1 <= len(split) < parts, f"the crash should land with some parts split, not {len(split)}"
    damaged = sorted((tmp / "splitting").glob(f"builds/*/split/{split[0].stem}-shard-00003.parquet"))[0]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    rerun = run_build(tmp, "splitting", settings, crash=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"part {int(split[0].stem[5:])}: split before, but" in rerun.stderr, rerun.stderr[-2000:]
    kept = len(split) - 1
    if kept:
        assert f"{kept} of {parts} part(s) already split and verified: kept" in rerun.stderr
    assert f"splitting {parts - kept} embeddings part(s)" in rerun.stderr
    assert same_files(built[KILLED_SHARDS], load_current(LocalStore(tmp / "splitting")))


def test_a_build_without_room_for_the_split_files_says_so_and_reads_the_parts_instead(catalogue, monkeypatch):
    tmp, settings, built = catalogue
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**40, 2**40 - 2**20, 2**20))
    said: list[str] = []
    grown = build_index(str(tmp / "emb"), str(tmp / "roomless"), shards=KILLED_SHARDS, settings=settings,
                        engine="ray", version="v1", step=said.append)
    assert any(s.startswith("not splitting the parts by shard: they would take ~4 MiB under") and
               "and 1 MiB is free" in s for s in said), said  # 24,000 rows × (32 × 4 + 64) bytes
    assert not any(s.startswith("splitting") for s in said)
    assert same_files(built[KILLED_SHARDS], grown)


def test_database_side_augmentation_is_refused_on_ray_with_the_reason(catalogue):
    tmp, settings, _ = catalogue
    with pytest.raises(InvalidInput, match="--dba needs every vector in one process"):
        build_index(str(tmp / "emb"), str(tmp / "dba"), settings=settings, engine="ray", dba=3)


def grown_copies(tmp: Path, names: list[str]) -> None:
    for name in names:
        shutil.copytree(tmp / f"local-{SHARDS}", tmp / name)


def test_a_ray_add_grows_the_shards_exactly_as_the_local_add_does(catalogue):
    tmp, settings, _ = catalogue
    grown_copies(tmp, ["add-local", "add-ray"])
    first, n = N - 1500, 6000  # 1,500 rows already indexed; a new category value; a field the index lacks
    meta = [{"category": "c-new" if i % 7 == 0 else f"c{i % 9}", "price": float(i % 250), "colour": "red"}
            for i in range(first, first + n)]
    write_fake_embeddings(tmp / "more", random_unit_vectors(n, DIM, seed=11, clusters=40), part_rows=1000,
                          first_row=first, metadata=meta)
    said: dict[str, list[str]] = {"local": [], "ray": []}
    got = {engine: add_to_index(str(tmp / f"add-{engine}"), str(tmp / "more"), settings, said[engine].append,
                                version="v2", engine=engine) for engine in ("local", "ray")}
    assert any("in Ray tasks" in s for s in said["ray"]) and not any("Ray" in s for s in said["local"])
    assert any(s.startswith("splitting 6 embeddings part(s) by shard") for s in said["ray"]), said["ray"]
    assert not list((tmp / "add-ray").glob("builds/*")), "the add's split files outlived it"
    assert got["ray"][1:] == got["local"][1:] == (4500, 1500)
    assert any("not filterable in this index" in s and "colour" in s for s in said["ray"])
    local, ray_grown = got["local"][0], got["ray"][0]
    assert ray_grown.count == local.count == N + 4500 and ray_grown.source == local.source
    assert same_files(local, ray_grown), "shard files differ between the local and the Ray add"
    queries = random_unit_vectors(20, DIM, seed=12, clusters=40)
    where = parse_filter('category == "c-new"')
    answers = [IndexSearcher(str(tmp / f"add-{e}"), settings).search(queries, k=10, where=where)
               for e in ("local", "ray")]
    assert [[h.id for h in q] for q in answers[0]] == [[h.id for h in q] for q in answers[1]]
    assert all(len(q) == 10 for q in answers[1])


def test_a_failed_ray_add_says_why_and_leaves_no_version_behind(catalogue):
    tmp, settings, _ = catalogue
    grown_copies(tmp, ["add-fail"])
    root = tmp / "add-fail"
    before = sorted(p.name for p in (root / "versions").iterdir())
    wrong = [{"category": "c1", "price": "cheap"} for _ in range(2000)]  # a string in the float field
    write_fake_embeddings(tmp / "wrong", random_unit_vectors(2000, DIM, seed=13), part_rows=500, first_row=N,
                          metadata=wrong)
    with pytest.raises(InvalidInput, match="field price holds float values in the index, str values here"):
        add_to_index(str(root), str(tmp / "wrong"), settings, engine="ray", version="v2")
    with pytest.raises(InvalidInput, match="every one of the 24000 embeddings .* is already indexed"):
        add_to_index(str(root), str(tmp / "emb"), settings, engine="ray", version="v2")  # shards' files were written
    assert sorted(p.name for p in (root / "versions").iterdir()) == before
    assert load_current(LocalStore(root)).version == "v1"
    assert not list(root.glob("builds/*")), "a failed add's split files outlived it"


def test_an_index_built_with_dba_is_added_to_locally_not_on_ray(tmp_path):
    settings = Settings(home=tmp_path / "home")
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(600, 16, seed=1), part_rows=300)
    write_fake_embeddings(tmp_path / "more", random_unit_vectors(300, 16, seed=2), part_rows=300, first_row=600)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=2, settings=settings, dba=3, pca_dim=0)
    with pytest.raises(InvalidInput, match="database-side augmentation .* add with --engine local"):
        add_to_index(str(tmp_path / "idx"), str(tmp_path / "more"), settings, engine="ray")
    said: list[str] = []  # past the Ray threshold the automatic engine would be Ray, but for DBA
    manifest, added, _ = add_to_index(str(tmp_path / "idx"), str(tmp_path / "more"),
                                      Settings(home=tmp_path / "home", index_ray_min_vectors=0), said.append)
    assert added == 300 and manifest.count == 900 and not any("Ray" in s for s in said)
