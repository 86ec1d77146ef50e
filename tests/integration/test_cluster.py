"""`imsearch cluster up / status / down` as a user runs them: every part a real, detached process, with
TLS on every gRPC hop and a bearer token (--secure)."""

from __future__ import annotations

import os

import grpc
import httpx
import pytest

from protos.imsearch.v1 import imsearch_pb2 as pb
from protos.imsearch.v1 import imsearch_pb2_grpc as pb_grpc
from services.searcher.client import SearchClient
from services.stack.part import alive
from services.stack.stack import read_state
from tests.integration.test_cli import run


def test_cluster_up_status_search_down(catalogue, tmp_path):
    work = tmp_path / "cluster"
    home = tmp_path / "home"
    procs: dict = {}
    secrets = {"IMSEARCH_S3_SECRET_KEY": "s3-secret-e1f0", "IMSEARCH_GATEWAY_API_KEYS": "gw-key-77aa"}
    up = run("cluster", "up", str(catalogue / "idx"), "--workdir", str(work), "--replicas", "2", "--s3", "moto",
             "--secure", env_home=home, **secrets)
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
        token = (work / "secrets" / "imsearch_auth_token").read_text()
        check_grpc_security(procs["router"].address, str(work / "tls" / "tls.crt"), token)
        with httpx.Client(base_url=f"http://{procs['gateway'].address}", timeout=60,
                          headers={"x-api-key": secrets["IMSEARCH_GATEWAY_API_KEYS"]}) as http:
            image = http.post("/v1/search", files={"image": ("q.jpg", target.read_bytes(), "image/jpeg")}).json()
            assert image["results"][0]["uri"] == str(target)  # embedded by the embedder service
            os.kill(procs["shard-0-0"].pid, 9)  # a replica dies: the other answers
            again = http.post("/v1/search", json={"uri": str(target), "k": 3}).json()
            assert again["coverage"] == 1.0 and not again["partial"]

        status = run("cluster", "status", "--workdir", str(work), env_home=home)
        assert status.returncode == 1 and "not running" in status.stdout  # the dead replica is reported
    finally:
        down = run("cluster", "down", "--workdir", str(work), env_home=home)
    logs = "".join(f.read_text(errors="replace") for f in (work / "logs").iterdir()) + up.stdout + up.stderr
    for secret in [*secrets.values(), token]:
        assert secret not in logs  # no credentials in any log
    assert down.returncode == 0, down.stderr
    assert not [p.name for p in procs.values() if alive(p.pid)], down.stdout  # every process gone, Ray's included
    assert not (work / "cluster.json").exists()


def check_grpc_security(router: str, ca: str, token: str) -> None:
    """Plaintext is refused, TLS without the token is UNAUTHENTICATED, TLS with it answers."""
    with grpc.insecure_channel(router) as plain, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.SearcherStub(plain).Info(pb.InfoRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with SearchClient(router, tls_ca=ca) as anonymous, pytest.raises(grpc.RpcError) as denied:
        anonymous.stub.Info(pb.InfoRequest(), timeout=5)
    assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with SearchClient(router, token=token, tls_ca=ca) as client:
        assert client.stub.Info(pb.InfoRequest(), timeout=5, metadata=client.metadata).count > 0
