"""`imsearch serve` on a real-model index: image queries from a client, the web page, then a clean SIGTERM stop."""

from __future__ import annotations

import time
import urllib.request

import psutil
import pytest
from grpc import RpcError, StatusCode
from PIL import Image

from protos.imsearch.v1 import imsearch_pb2 as pb
from services.common.config import Settings
from services.embedder.pipeline import embed_catalogue
from services.indexer.build import build_index
from services.searcher.client import SearchClient
from services.stack.part import Part, free_port, wait_http
from tests.helpers import DEFAULT_MODEL, encode, write_photos


@pytest.fixture()
def real_index(tmp_path):
    write_photos(tmp_path / "photos", 8)
    settings = Settings(home=tmp_path / "home")
    embed_catalogue(str(tmp_path / "photos"), str(tmp_path / "emb"), engine="local", settings=settings)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=2, settings=settings)
    return tmp_path


@pytest.mark.parametrize("mode", ["in-process", "shard-servers"])
def test_serve_answers_image_queries_and_stops_cleanly(real_index, mode):
    """By default the router searches the shards itself (one host); --shard-servers starts a process per shard."""
    tmp = real_index
    http_port = free_port()
    serve = Part.python("serve", "services.cli", ["serve", str(tmp / "idx"), "--http-port", str(http_port),
                                                  f"--{mode}"],
                        env={"IMSEARCH_HOME": str(tmp / "home")}, log=tmp / "serve.log")
    try:
        serve.start()
        wait_http(f"http://127.0.0.1:{http_port}/readyz")  # the web page comes up after the router
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=10) as page:
            assert b"<title>imsearch</title>" in page.read()
        target = sorted((tmp / "photos").iterdir())[5]
        query = encode(Image.open(target).resize((150, 110)), "JPEG", quality=40)
        with SearchClient(serve.address, timeout=30) as client:
            result = client.search(query, k=3)
            assert result.hits[0].uri == str(target) and result.coverage == 1.0
            with pytest.raises(RpcError) as e:
                client.search(b"\xff\xd8\xff broken jpeg")
            assert e.value.code() == StatusCode.INVALID_ARGUMENT and "corrupt" in e.value.details()
            info = client.stub.Info(pb.InfoRequest(), timeout=10)
            assert (info.model.name, info.factory, info.count, len(info.shards)) == (DEFAULT_MODEL, "Flat", 8, 2)
            shard_servers = [p for p in psutil.Process(serve.pid).children(recursive=True)
                             if "services.searcher shard" in " ".join(p.cmdline())]
            assert len(shard_servers) == (2 if mode == "shard-servers" else 0)
        serve.proc.terminate()
        assert serve.proc.wait(30) == 0
    finally:
        serve.stop()
    log = (tmp / "serve.log").read_text()
    assert ("2 shard server(s) up" if mode == "shard-servers" else "the router searches every shard in its own "
            "process") in log and "router serving" in log
    assert f"open http://127.0.0.1:{http_port}/" in log


def test_serve_with_two_collections_answers_each_from_its_own_index(real_index):
    """`imsearch serve --collection a=IDX --collection b=IDX2`: one router and page over both indexes."""
    tmp = real_index
    write_photos(tmp / "photos-b", 4)  # another catalogue, the same model
    settings = Settings(home=tmp / "home")
    embed_catalogue(str(tmp / "photos-b"), str(tmp / "emb-b"), engine="local", settings=settings)
    build_index(str(tmp / "emb-b"), str(tmp / "idx-b"), shards=1, settings=settings)
    serve = Part.python("serve", "services.cli", ["serve", "--collection", f"shoes={tmp / 'idx'}",
                                                  "--collection", f"bags={tmp / 'idx-b'}", "--http-port",
                                                  str(free_port())],
                        env={"IMSEARCH_HOME": str(tmp / "home")}, log=tmp / "serve.log")
    try:
        serve.start()
        target = sorted((tmp / "photos").iterdir())[2]
        query = encode(Image.open(target).resize((150, 110)), "PNG")
        with SearchClient(serve.address, timeout=30) as client:
            shoes, bags = (client.search(query, k=3, collection=name) for name in ("shoes", "bags"))
            assert shoes.hits[0].uri == str(target)
            assert {h.uri.rsplit("/", 2)[-2] for h in bags.hits} == {"photos-b"}
            assert client.info("bags").count == 4 and client.info().collections == ["shoes", "bags"]
        serve.proc.terminate()
        assert serve.proc.wait(30) == 0
    finally:
        serve.stop()
    assert "router serving collections shoes, bags" in (tmp / "serve.log").read_text()


def test_a_sigterm_while_the_stack_comes_up_stops_every_part_started_and_exits_cleanly(real_index):
    """The fault lands at a known point: the command has started the router and waits for it to be healthy
    (its "waiting for router" line). Before, the signal killed the command there (-15) and orphaned the router."""
    tmp = real_index
    serve = Part.python("serve", "services.cli", ["serve", str(tmp / "idx"), "--http-port", str(free_port())],
                        env={"IMSEARCH_HOME": str(tmp / "home")}, log=tmp / "serve.log")
    try:
        serve.spawn()
        deadline = time.monotonic() + 60
        while "waiting for router" not in (tmp / "serve.log").read_text():
            assert time.monotonic() < deadline and serve.proc.poll() is None, (tmp / "serve.log").read_text()
            time.sleep(0.02)
        started = psutil.Process(serve.pid).children(recursive=True)
        assert any("services.searcher router" in " ".join(p.cmdline()) for p in started)
        assert "router serving" not in (tmp / "serve.log").read_text()  # the fault lands before serving began
        serve.proc.terminate()
        assert serve.proc.wait(30) == 0
        _, alive = psutil.wait_procs(started, timeout=10)
        assert alive == []
    finally:
        serve.stop()
    assert "stopping router" in (tmp / "serve.log").read_text()
