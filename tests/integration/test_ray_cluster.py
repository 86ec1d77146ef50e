"""A real two-node Ray cluster on this machine (`ray start --head` plus a second `ray start --address` node,
one CPU each, token authentication as a cluster should run): `imsearch embed --ray-address` puts model actors
on both nodes and every image comes back exactly once, in catalogue order."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from services.common.store import LocalStore
from services.embedder.embeddings import read_embeddings
from services.stack.part import Part, free_port
from tests.helpers import encode, pattern

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
N = 120

COUNT_NODES = "import ray; ray.init(address='{address}', logging_level='ERROR'); " \
              "print(sum(1 for n in ray.nodes() if n['Alive']))"


def ray_node(name: str, args: list[str], port: int, token: str, log: Path) -> Part:
    """`ray start --block` as a Part: its Ray processes are its descendants, stopped with it."""
    return Part(name, [RAY, "start", "--block", "--num-cpus", "1", "--disable-usage-stats", *args], port, "port",
                env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}, log=log)


def wait_for_nodes(address: str, env: dict, n: int, deadline: float, node: Part) -> None:
    while True:
        assert node.running(), node.log.read_text()[-3000:]  # the node did not start
        count = subprocess.run([sys.executable, "-c", COUNT_NODES.format(address=address)], env=env,
                               capture_output=True, text=True, timeout=120)
        if count.returncode == 0 and count.stdout.strip() == str(n):
            return
        assert time.monotonic() < deadline, (count.stderr[-2000:], node.log.read_text()[-2000:])
        time.sleep(1)


@pytest.fixture
def cluster(tmp_path):
    port, token = free_port(), secrets.token_hex(16)
    address = f"127.0.0.1:{port}"
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's unix sockets live under it (<= 107 bytes)
    head = ray_node("ray-head", ["--head", "--port", str(port), "--include-dashboard=false", "--temp-dir", temp],
                    port, token, tmp_path / "head.log")
    worker = ray_node("ray-worker", ["--address", address], port, token, tmp_path / "worker.log")
    env = {**os.environ, **head.env}
    try:
        deadline = time.monotonic() + 180
        head.start(timeout=120)  # its GCS port is open
        wait_for_nodes(address, env, 1, deadline, head)
        worker.spawn()  # no port of its own: ready when the head counts it
        wait_for_nodes(address, env, 2, deadline, worker)
        yield address, env
    finally:
        worker.stop(grace=20)
        head.stop(grace=20)
        shutil.rmtree(temp, ignore_errors=True)


def test_an_embed_on_a_two_node_cluster_runs_on_both_and_returns_every_row_once_in_order(cluster, tmp_path):
    address, env = cluster
    src, out = tmp_path / "catalogue", tmp_path / "emb"
    src.mkdir()
    for i in range(N):
        (src / f"img-{i:04d}.png").write_bytes(encode(pattern(64, 48, seed=i)))
    run = subprocess.run([sys.executable, "-m", "services.cli", "embed", str(src), "--out", str(out),
                          "--ray-address", address, "--batch-size", "8", "--json"], cwd=ROOT,
                         env={**env, "IMSEARCH_HOME": str(tmp_path / "home")}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    nodes = summary["nodes"]
    print(f"two-node embed: {summary['seconds']:.1f} s after start-up; per node: "
          + ", ".join(f"{n[:8]} {k} images ({k / summary['seconds']:.1f} img/s)" for n, k in nodes.items()))
    assert summary["engine"] == "ray" and summary["embedded"] == N
    assert len(nodes) == 2 and all(k > 0 for k in nodes.values()) and sum(nodes.values()) == N  # both worked
    emb = read_embeddings(LocalStore(out))
    assert emb.uris == [str(src / f"img-{i:04d}.png") for i in range(N)]  # catalogue order, each once
    assert len(set(emb.ids.tolist())) == N
