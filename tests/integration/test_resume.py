"""kill -9 `imsearch embed` midway — in-process and on Ray with 2 model actors — or at a named crash
point, run the same command again: it resumes, embeds every image exactly once and loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from services.common.store import LocalStore
from services.embedder.embeddings import read_embeddings
from tests.helpers import encode, pattern

ROOT = Path(__file__).resolve().parents[2]
N, PART = 120, 10


def embed_cmd(src: Path, out: Path, engine: str = "local") -> list[str]:
    return [sys.executable, "-m", "services.cli", "embed", str(src), "--out", str(out), "--engine", engine, "--json"]


def write_catalogue(src: Path, n: int) -> None:
    src.mkdir()
    for i in range(n):
        (src / f"img-{i:04d}.png").write_bytes(encode(pattern(64, 48, seed=i)))


def markers(out: Path) -> int:
    return len(list((out / "done").glob("*.json"))) if (out / "done").is_dir() else 0


def test_kill_9_midway_then_rerun_embeds_the_rest_exactly_once(tmp_path):
    src = tmp_path / "catalogue"
    src.mkdir()
    for i in range(N):
        (src / f"img-{i:04d}.png").write_bytes(encode(pattern(64, 48, seed=i)))
    (src / "img-0050.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # one corrupt image among them
    out = tmp_path / "emb"
    env = {**os.environ, "IMSEARCH_HOME": str(tmp_path / "home"), "IMSEARCH_PART_ROWS": str(PART)}

    proc = subprocess.Popen(embed_cmd(src, out), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while len(list((out / "done").glob("*.json")) if (out / "done").is_dir() else []) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no parts written"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert not (out / "embeddings.json").exists()  # the killed run never claimed to be complete
    finished_before = len(list((out / "done").glob("*.json")))
    assert finished_before < N // PART

    rerun = subprocess.run(embed_cmd(src, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["resumed"] >= finished_before * PART  # those images were not embedded again
    assert summary["total"] == N and summary["embedded"] == N - 1

    emb = read_embeddings(LocalStore(out))
    assert len(emb.ids) == N - 1 and len(set(emb.ids.tolist())) == N - 1
    assert sorted(Path(u).name for u in emb.uris) == sorted(f"img-{i:04d}.png" for i in range(N) if i != 50)
    assert pq.read_table(out / "parts").num_rows == N  # parts/ stays a plain parquet dataset
    meta = json.loads((out / "embeddings.json").read_text())
    assert sum(p["rows"] for p in meta["parts"]) == N and len(meta["parts"]) == N // PART
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert [Path(e["uri"]).name for e in errors] == ["img-0050.png"]

    again = subprocess.run(embed_cmd(src, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert json.loads(again.stdout)["resumed"] == N  # a finished catalogue: nothing to embed


def test_kill_9_of_a_ray_run_with_two_actors_then_rerun_embeds_every_image_exactly_once(tmp_path):
    src, out = tmp_path / "catalogue", tmp_path / "emb"
    write_catalogue(src, 60)
    env = {**os.environ, "IMSEARCH_HOME": str(tmp_path / "home"), "IMSEARCH_PART_ROWS": "5",
           "IMSEARCH_BATCH_SIZE": "5", "IMSEARCH_RAY_ACTORS": "2"}
    # Its own session: the private Ray instance the run starts is cleaned up with it after the test (Ray's
    # dashboard and runtime-env agents outlive a kill -9 of the driver).
    proc = subprocess.Popen(embed_cmd(src, out, "ray"), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while markers(out) < 2:  # two chunks finished: the actors are running and writing
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no parts written"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # the driver, as `kill -9 PID` would
        proc.wait(10)
        finished = markers(out)
        assert 2 <= finished < 12 and not (out / "embeddings.json").exists()
        rerun = subprocess.run(embed_cmd(src, out, "ray"), cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=300, start_new_session=True)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert rerun.returncode == 0, rerun.stderr
    assert "deprecated" not in rerun.stderr, rerun.stderr  # Ray's own API as Ray documents it today
    # no Ray notice or error line (token authentication, core_worker.cc's actor-restart error, progress bars)
    assert [line for line in rerun.stderr.splitlines() if line.strip()] == [], rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["engine"] == "ray" and summary["resumed"] == finished * 5 and summary["embedded"] == 60
    emb = read_embeddings(LocalStore(out))
    assert sorted(Path(u).name for u in emb.uris) == [f"img-{i:04d}.png" for i in range(60)]  # each once
    assert len(set(emb.ids.tolist())) == 60


def test_kill_9_of_a_ray_run_just_after_its_first_timed_piece_keeps_it_with_the_default_chunk_size(tmp_path):
    """IMSEARCH_PART_ROWS stays 5,000 (more than the catalogue): before pieces, nothing survived this. The kill
    lands at a known point — as soon as the first piece's marker is on disk — not after a fixed sleep: with the
    inference runtimes the whole run once finished inside the 40 s the test used to wait."""
    src, out = tmp_path / "catalogue", tmp_path / "emb"
    write_catalogue(src, 3000)
    env = {**os.environ, "IMSEARCH_HOME": str(tmp_path / "home"), "IMSEARCH_PART_SECONDS": "5"}
    cmd = [sys.executable, "-m", "services.cli", "embed", str(src), "--out", str(out), "--engine", "ray"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while markers(out) < 1:  # the first piece written because part_seconds passed, not because a chunk ended
            assert proc.poll() is None, "the run ended before the kill: " + proc.stderr.read()
            assert time.monotonic() < deadline, "no piece written"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert not (out / "embeddings.json").exists()  # the kill interrupted the run
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    from services.embedder.embeddings import plan_chunks, resume_state
    from services.embedder.pipeline import list_images

    chunks = plan_chunks(list_images(str(src)), 5000)
    kept = resume_state(LocalStore(out), chunks).written(chunks[0])
    print(f"kill -9 after the first piece: {kept} images kept")
    assert 1 <= kept < 3000


@pytest.mark.parametrize("point", ["embed.part-written", "embed.marker-written"])
def test_a_crash_between_part_and_marker_loses_nothing_and_embeds_nothing_twice(tmp_path, point):
    src, out = tmp_path / "catalogue", tmp_path / "emb"
    write_catalogue(src, 30)
    env = {**os.environ, "IMSEARCH_HOME": str(tmp_path / "home"), "IMSEARCH_PART_ROWS": "10"}
    crashed = subprocess.run(embed_cmd(src, out), cwd=ROOT, env={**env, "IMSEARCH_CRASH_AT": point},
                             capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -9, crashed.stderr  # died at the point, with the first part on disk
    assert len(list((out / "parts").glob("*.parquet"))) == 1 and markers(out) == (point == "embed.marker-written")
    rerun = subprocess.run(embed_cmd(src, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["resumed"] == (10 if point == "embed.marker-written" else 0) and summary["embedded"] == 30
    emb = read_embeddings(LocalStore(out))
    assert len(emb.uris) == len(set(emb.uris)) == 30


def test_a_damaged_part_is_embedded_again_and_the_summary_says_so(tmp_path):
    src, out = tmp_path / "catalogue", tmp_path / "emb"
    write_catalogue(src, 30)
    env = {**os.environ, "IMSEARCH_HOME": str(tmp_path / "home"), "IMSEARCH_PART_ROWS": "10"}
    first = subprocess.run(embed_cmd(src, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    part = sorted((out / "parts").glob("*.parquet"))[1]
    part.write_bytes(part.read_bytes()[:-40] + b"\0" * 40)  # bit rot in a finished part
    (out / "embeddings.json").unlink()  # as if the run had been killed before it finished
    rerun = subprocess.run(embed_cmd(src, out)[:-1], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert ("10 embedded, 0 skipped in this run; 20 done by an earlier run (30 embedded, 0 skipped in all); "
            "1 chunk(s) of an earlier run embedded again") in rerun.stdout, rerun.stdout
    assert "damaged part" in rerun.stdout
    emb = read_embeddings(LocalStore(out))  # every part verifies against embeddings.json
    assert len(emb.uris) == len(set(emb.uris)) == 30
