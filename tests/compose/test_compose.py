"""deploy/docker-compose.yml as an operator runs it, on this machine's podman (podman-compose, with
deploy/podman/compose.podman.yml swapping in the stand-ins for images Docker Hub would give): the ingest job
embeds and indexes real photos (Debian's tuxpaint stamps) into the S3 container, the shards load them, the
gateway answers image and id searches from the host; nothing but the gateway is reachable from the host, and a
router call without the token is refused; a shard killed under load costs flagged partial answers and no 5xx,
and its restart (the compose restart policy) brings full coverage back; `down -v` leaves nothing running."""

from __future__ import annotations

import io
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from services.common.config import Settings
from services.common.store import open_store
from services.eval.datasets import flatten, tuxpaint_stamps
from services.stack.part import free_port

ROOT = Path(__file__).resolve().parents[2]
FILES = ["deploy/docker-compose.yml", "deploy/podman/compose.podman.yml"]
PHOTOS = 40
SERVING = ["embedder", "shard-0", "shard-1", "router", "gateway"]


class Compose:
    """podman-compose for one project, with the credentials an operator exports."""

    def __init__(self, tmp: Path):
        self.project = f"imsearch-ct-{secrets.token_hex(3)}"
        self.s3_port = free_port()
        override = tmp / "test.yml"  # the test reaches S3 from the host, on the loopback only
        override.write_text(json.dumps({"services": {"minio": {"ports": [f"127.0.0.1:{self.s3_port}:9000"]}}}))
        (tmp / "token").write_text(secrets.token_hex(32))
        self.env = {**os.environ, "IMSEARCH_S3_ACCESS_KEY": "imsearch", "IMSEARCH_S3_SECRET_KEY": secrets.token_hex(12),
                    "IMSEARCH_CACHE_SECRET": secrets.token_hex(16), "IMSEARCH_AUTH_TOKEN_FILE": str(tmp / "token"),
                    "CONTAINERS_CONF": str(ROOT / "deploy/podman/containers.conf")}
        self.files = [*FILES, str(override)]
        self.tmp = tmp

    def __call__(self, *args: str, timeout: float = 600, profile: str | None = None) -> subprocess.CompletedProcess:
        command = [shutil.which("podman-compose") or str(Path(os.sys.executable).parent / "podman-compose"),
                   "-p", self.project, *[a for f in self.files for a in ("-f", f)],
                   *(["--profile", profile] if profile else []), *args]
        done = subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, (args, done.stdout[-3000:], done.stderr[-3000:])
        return done

    def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=120)
        assert not check or done.returncode == 0, (args, done.stderr[-2000:])
        return done

    def serve(self, *more: str) -> None:
        """The serving services up, once the index is in S3; until the gateway is ready."""
        self("up", "-d", *SERVING, *more)
        wait(lambda: httpx.get(f"{self.gateway}/readyz", timeout=5).status_code == 200, "the gateway ready", 300)

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def store(self, prefix: str):
        settings = Settings(s3_endpoint=f"127.0.0.1:{self.s3_port}", s3_access_key=self.env["IMSEARCH_S3_ACCESS_KEY"],
                            s3_secret_key=self.env["IMSEARCH_S3_SECRET_KEY"], home=self.tmp / "home")
        return open_store(f"s3://imsearch/{prefix}", settings)


def wait(check, what: str, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        else:
            last = None
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f} s (last: {last!r})")
        time.sleep(1)


def refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not shutil.which("podman"):
        pytest.fail("podman is not installed (make compose-test installs it)")
    tmp = tmp_path_factory.mktemp("compose")
    c = Compose(tmp)
    try:
        c("up", "-d", "minio", "redis", "redis-limits")
        images = c.store("images")
        wait(lambda: images.list("") is not None, "the S3 container answering")
        c.photos = tuxpaint_stamps()[:PHOTOS]
        for i, item in enumerate(c.photos):
            images.put_bytes(f"{i:03d}.jpg", jpeg(item.path))
        c("run", "--rm", "--no-deps", "ingest", timeout=900, profile="jobs")
        c.gateway = "http://127.0.0.1:8080"
        c.serve()
        yield c
    finally:
        logs = subprocess.run(["podman", "logs", "--tail", "30", c.container("router")], capture_output=True,
                              text=True, env=c.env)
        print(logs.stdout[-3000:], logs.stderr[-3000:])
        c("down", "-v", timeout=300)
        ours = f"label=io.podman.compose.project={c.project}"
        left = c.podman("ps", "-a", "--format", "{{.Names}}", "--filter", ours)
        volumes = c.podman("volume", "ls", "--format", "{{.Name}}", "--filter", ours)
        assert left.stdout.strip() == "" and volumes.stdout.strip() == "", (left.stdout, volumes.stdout)


def jpeg(path: Path, side: int | None = None, quality: int = 90) -> bytes:
    img = flatten(path)
    buf = io.BytesIO()
    (img.resize((side, side)) if side else img).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def search_image(c: Compose, data: bytes, **form) -> httpx.Response:
    return httpx.post(f"{c.gateway}/v1/search", files={"image": ("q.jpg", data)},
                      data={"k": "5", **{k: str(v) for k, v in form.items()}}, timeout=60)


def test_the_gateway_answers_image_and_id_searches_over_the_ingested_photos(stack):
    answer = search_image(stack, jpeg(stack.photos[7].path, 150, 60))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["results"][0]["uri"] == "s3://imsearch/images/007.jpg" and body["coverage"] == 1.0, body
    stack.version = body["index_version"]
    by_id = httpx.post(f"{stack.gateway}/v1/search", json={"id": body["results"][0]["id"], "k": 3}, timeout=30)
    assert by_id.status_code == 200 and by_id.json()["results"][0]["uri"] == "s3://imsearch/images/007.jpg"


def test_only_the_gateway_is_reachable_from_the_host_and_the_router_wants_its_token(stack):
    assert all(refused(port) for port in (50050, 8265, 9000, 6379, 50061)), "a port besides the gateway's is open"
    call = ("import grpc, sys; from protos.imsearch.v1 import imsearch_pb2 as pb, imsearch_pb2_grpc as rpc\n"
            "stub = rpc.SearcherStub(grpc.insecure_channel('router:50050'))\n"
            "try:\n    stub.Info(pb.InfoRequest(), timeout=10)\nexcept grpc.RpcError as e:\n    print(e.code().name)\n"
            "else:\n    print('ANSWERED')")
    done = stack.podman("exec", stack.container("gateway"), "python", "-c", call)
    assert done.stdout.strip() == "UNAUTHENTICATED", done.stdout + done.stderr


def test_a_killed_shard_costs_flagged_partial_answers_and_its_restart_full_coverage(stack):
    answers, stop = [], threading.Event()

    def load():
        rng = random.Random(0)
        while not stop.is_set():  # every query new: a repeated one would be answered from the query cache
            r = search_image(stack, jpeg(rng.choice(stack.photos).path, rng.randint(96, 224), rng.randint(40, 95)))
            answers.append((r.status_code, r.json().get("coverage") if r.status_code == 200 else None))

    worker = threading.Thread(target=load)
    worker.start()
    try:
        wait(lambda: len(answers) >= 5, "answers before the fault", 60)
        pid = stack.podman("inspect", "--format", "{{.State.Pid}}", stack.container("shard-1")).stdout.strip()
        os.kill(int(pid), 9)  # a crash, as the restart policy sees one (podman kill would be an operator's stop)
        before = len(answers)
        wait(lambda: any(cov is not None and cov < 1.0 for _, cov in answers[before:]),
             f"a flagged partial answer (answers since the kill: {answers[before:][:20]})", 60)
        wait(lambda: answers[-1][1] == 1.0 and stack.podman("inspect", "--format", "{{.RestartCount}}",
                                                           stack.container("shard-1")).stdout.strip() != "0",
             "full coverage after the restart", 180)
    finally:
        stop.set()
        worker.join(60)
    assert not [code for code, _ in answers if code >= 500], answers


def test_down_then_up_serves_the_same_index_version_from_the_volumes(stack):
    """Runs after the searches above (which noted the version). The S3 stand-in's data lives on its volume."""
    stack("down", timeout=300)
    assert stack.podman("ps", "-a", "--format", "{{.Names}}", "--filter",
                        f"label=io.podman.compose.project={stack.project}").stdout.strip() == ""
    stack("up", "-d", "minio", "redis", "redis-limits")
    index = stack.store("idx")
    wait(lambda: index.exists("CURRENT"), "the index back in S3")
    stack.serve()
    body = search_image(stack, jpeg(stack.photos[11].path, 160, 70)).json()
    assert body["index_version"] == stack.version and body["results"][0]["uri"] == "s3://imsearch/images/011.jpg"


def test_the_collections_override_serves_a_second_collection_beside_the_first(stack):
    """deploy/docker-compose.collections.yml added (its podman counterpart too): a `bags` collection with its own
    shard server and ingest job, the router and gateway following the collections file. Runs last."""
    stack("down", timeout=300)
    stack.files[1:1] = ["deploy/docker-compose.collections.yml"]
    stack.files.insert(3, "deploy/podman/compose.podman.collections.yml")
    stack("up", "-d", "minio", "redis", "redis-limits")
    wait(lambda: stack.store("idx").exists("CURRENT"), "the first collection back in S3")
    bags = tuxpaint_stamps()[PHOTOS:PHOTOS + 12]
    store = stack.store("images-bags")
    for i, item in enumerate(bags):
        store.put_bytes(f"{i:03d}.jpg", jpeg(item.path))
    stack("run", "--rm", "--no-deps", "ingest-bags", timeout=900, profile="jobs")
    stack.serve("shard-bags-0")
    answer = httpx.post(f"{stack.gateway}/v1/collections/bags/search", files={"image": ("q.jpg", jpeg(
        bags[5].path, 150, 60))}, data={"k": "3"}, timeout=60)
    assert answer.status_code == 200 and answer.json()["results"][0]["uri"] == "s3://imsearch/images-bags/005.jpg", \
        answer.text
    first = search_image(stack, jpeg(stack.photos[7].path, 150, 60)).json()  # the default collection, as before
    assert first["results"][0]["uri"] == "s3://imsearch/images/007.jpg" and first["index_version"] == stack.version
