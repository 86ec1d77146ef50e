"""kill -9 `imsearch embed` midway, run the same command again: it resumes and loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from services.common.store import LocalStore
from services.embedder.embeddings import read_embeddings
from tests.helpers import encode, pattern

ROOT = Path(__file__).resolve().parents[2]
N, PART = 120, 10


def embed_cmd(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "services.cli", "embed", str(src), "--out", str(out), "--engine", "local",
            "--json"]


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
