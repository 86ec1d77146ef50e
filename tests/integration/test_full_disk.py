"""A full or read-only destination, as a user meets it: one line on stderr, exit 2, and what was there before
intact. The disk is a real 1 MiB tmpfs (mounted for the test, as root), else a file-size rlimit on the
command (EFBIG, which Python turns the limit's signal into)."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.config import Settings
from services.common.store import LocalStore
from services.embedder.embeddings import read_embeddings
from services.index.versions import load_current
from services.indexer.build import build_index
from tests.helpers import encode, pattern, random_unit_vectors, write_fake_embeddings

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 1 << 20


class Disk:
    """A small destination: `folder` on a 1 MiB tmpfs, or a plain folder written under RLIMIT_FSIZE."""

    def __init__(self, folder: Path):
        self.folder, self.file_limit = folder, LIMIT // 4
        folder.mkdir()
        try:
            self.mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={LIMIT}", "tmpfs", str(folder)],
                                          capture_output=True).returncode == 0
        except FileNotFoundError:  # no mount command
            self.mounted = False

    def fill(self, leave: int) -> None:
        """Leave only about `leave` bytes of room (without a tmpfs, a per-file cap can only stop the first
        file bigger than it: cap files at a fifth of `leave`)."""
        if self.mounted:
            free = os.statvfs(self.folder).f_bavail * os.statvfs(self.folder).f_frsize
            (self.folder / "filler").write_bytes(b"\0" * max(0, free - leave))
        self.file_limit = leave // 5

    def run(self, *args: str, home: Path, **env: str) -> subprocess.CompletedProcess:
        def limit():  # only when no tmpfs could be mounted: every file this command writes is capped instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.file_limit, self.file_limit))

        return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, preexec_fn=None if self.mounted else limit,
                              env={**os.environ, "IMSEARCH_HOME": str(home), **env})

    def read_only(self) -> None:
        if self.mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(self.folder)], check=True)
        elif os.geteuid() != 0:
            for path in [self.folder, *self.folder.rglob("*")]:
                path.chmod(0o555 if path.is_dir() else 0o444)
        else:
            pytest.skip("a read-only destination needs a tmpfs mount (root with mount rights) or a non-root user")

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.folder)], capture_output=True)


@pytest.fixture()
def disk(tmp_path):
    d = Disk(tmp_path / "disk")
    try:
        yield d
    finally:
        d.close()


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert all(w in errors[0] for w in words), errors[0]


def test_a_build_that_does_not_fit_leaves_the_published_version_and_says_so_in_one_line(disk, tmp_path):
    home, idx = tmp_path / "home", disk.folder / "idx"
    write_fake_embeddings(tmp_path / "small", random_unit_vectors(100, 256, seed=1))
    build_index(str(tmp_path / "small"), str(idx), settings=Settings(home=home), version="v1")
    write_fake_embeddings(tmp_path / "big", random_unit_vectors(3000, 256, seed=2))  # 3 MB of vectors
    proc = disk.run("index", "build", str(tmp_path / "big"), "--out", str(idx), home=home)
    one_line_error(proc, "no space left to write", str(idx))
    assert load_current(LocalStore(idx)).version == "v1"  # still published, and whole:
    assert disk.run("info", str(idx), "--verify", home=home).returncode == 0


def test_a_read_only_index_refuses_a_change_in_one_line(disk, tmp_path):
    home, idx = tmp_path / "home", disk.folder / "idx"
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(100, 16, seed=1))
    build_index(str(tmp_path / "emb"), str(idx), settings=Settings(home=home), version="v1")
    before = load_current(LocalStore(idx))
    (tmp_path / "gone.txt").write_text(f"{read_embeddings(LocalStore(tmp_path / 'emb')).ids[0]}\n")
    disk.read_only()
    proc = disk.run("index", "delete", str(idx), "--ids", str(tmp_path / "gone.txt"), home=home)
    one_line_error(proc, "cannot write", str(idx))
    assert load_current(LocalStore(idx)) == before


def test_embedding_into_a_full_disk_stops_in_one_line_and_a_rerun_with_room_finishes(disk, tmp_path):
    src = tmp_path / "catalogue"
    src.mkdir()
    for i in range(60):
        (src / f"img-{i:03d}.png").write_bytes(encode(pattern(48, 40, seed=i)))
    home, out = tmp_path / "home", disk.folder / "emb"
    disk.fill(150_000)  # room for two or three parts of 10 images (~52 kB each), not six
    proc = disk.run("embed", str(src), "--out", str(out), "--engine", "local", home=home, IMSEARCH_PART_ROWS="10")
    one_line_error(proc, "no space left to write", str(out))
    done = len(list((out / "done").glob("*.json"))) if (out / "done").is_dir() else 0
    assert done < 6  # it stopped partway
    roomy = tmp_path / "roomy"
    if out.is_dir():  # what it finished moves to a disk with room, and the run resumes there
        shutil.copytree(out, roomy)
    rerun = subprocess.run([sys.executable, "-m", "services.cli", "embed", str(src), "--out", str(roomy), "--engine",
                            "local", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "IMSEARCH_HOME": str(home), "IMSEARCH_PART_ROWS": "10"})
    assert rerun.returncode == 0, rerun.stderr
    assert '"embedded": 60' in rerun.stdout and f'"resumed": {done * 10}' in rerun.stdout, rerun.stdout
