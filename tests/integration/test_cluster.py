"""`imsearch cluster up / status / down` as a user runs them: every part a real, detached process."""

from __future__ import annotations

import os

import httpx

from services.cluster import alive, read_state
from tests.integration.stack import catalogue  # noqa: F401 - a fixture
from tests.integration.test_cli import run


def test_cluster_up_status_search_down(catalogue, tmp_path):  # noqa: F811
    work = tmp_path / "cluster"
    home = tmp_path / "home"
    procs: dict = {}
    up = run("cluster", "up", str(catalogue / "idx"), "--workdir", str(work), "--replicas", "2", "--s3", "moto",
             env_home=home)
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        procs = {p.name: p for p in read_state(work)}
        assert {"redis", "s3", "ray-head", "embedder", "router", "gateway", "shard-0-0", "shard-0-1", "shard-1-0",
                "shard-1-1"} == set(procs)
        assert f"open http://{procs['gateway'].address}/" in up.stdout
        assert f"IMSEARCH_S3_ENDPOINT={procs['s3'].address}" in up.stdout

        status = run("cluster", "status", "--workdir", str(work), env_home=home)
        assert status.returncode == 0, status.stdout
        assert status.stdout.count("healthy") == len(procs)

        target = sorted((catalogue / "photos").iterdir())[1]
        with httpx.Client(base_url=f"http://{procs['gateway'].address}", timeout=60) as http:
            image = http.post("/v1/search", files={"image": ("q.jpg", target.read_bytes(), "image/jpeg")}).json()
            assert image["results"][0]["uri"] == str(target)  # embedded by the embedder service
            os.kill(procs["shard-0-0"].pid, 9)  # a replica dies: the other answers
            again = http.post("/v1/search", json={"uri": str(target), "k": 3}).json()
            assert again["coverage"] == 1.0 and not again["partial"]

        status = run("cluster", "status", "--workdir", str(work), env_home=home)
        assert status.returncode == 1 and "not running" in status.stdout  # the dead replica is reported
    finally:
        down = run("cluster", "down", "--workdir", str(work), env_home=home)
    assert down.returncode == 0, down.stderr
    assert not any(alive(p.pid) for p in procs.values())  # every process gone, Ray's included
    assert not (work / "cluster.json").exists()
