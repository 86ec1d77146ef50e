"""Fixtures of the integration tests: a catalogue of real photos indexed once per module, and stacks of real
processes (shard servers, router, Redis, gateway) started through services.stack and always stopped."""

from __future__ import annotations

import time

import pytest

from services.common.config import Settings
from services.embedder.pipeline import embed_catalogue
from services.indexer.build import build_index
from services.stack.part import Part
from services.stack.stack import Stack, StackSpec
from tests.helpers import write_photos

SHARDS = 2


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """12 real photos embedded with the real model into a 2-shard index (tmp/photos, tmp/emb, tmp/idx)."""
    tmp = tmp_path_factory.mktemp("catalogue")
    write_photos(tmp / "photos", 12)
    settings = Settings(home=tmp / "home")
    embed_catalogue(str(tmp / "photos"), str(tmp / "emb"), engine="local", settings=settings)
    build_index(str(tmp / "emb"), str(tmp / "idx"), shards=SHARDS, settings=settings)
    return tmp


@pytest.fixture()
def start_stack(tmp_path):
    """start_stack(index_root, **StackSpec fields) -> a running Stack (logs in tmp_path/stack-N/logs);
    every stack started is stopped after the test."""
    stacks: list[Stack] = []

    def start(index, **spec) -> Stack:
        stack = Stack(StackSpec(str(index), **spec), tmp_path / f"stack-{len(stacks)}")
        stacks.append(stack)
        return stack.up()

    yield start
    for stack in reversed(stacks):
        stack.down()


@pytest.fixture()
def served(catalogue, start_stack):
    """The catalogue behind shard servers, a router embedding query images and the gateway:
    served(**env) -> the running Stack (IMSEARCH_* settings given to every part)."""

    def serve(**env: str) -> Stack:
        return start_stack(catalogue / "idx", gateway=True, env={
            "IMSEARCH_HOME": str(catalogue / "home"), "IMSEARCH_SHARD_TIMEOUT_S": "2", **env})

    return serve


@pytest.fixture()
def redis_server():
    """A real redis-server on a free port."""
    part = Part.redis().start()
    try:
        yield part
    finally:
        part.stop()


class HangingProxy:
    """A TCP proxy in front of a server that can be switched to hang: connections are still accepted, but
    nothing goes through in either direction — an endpoint that accepts calls and never answers."""

    def __init__(self, upstream_port: int):
        import socket
        import threading

        self.upstream, self.hung, self.open = upstream_port, threading.Event(), True
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        import socket
        import threading

        while self.open:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()
                continue
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst) -> None:
        src.settimeout(0.05)
        while self.open:
            if self.hung.is_set():  # hold the bytes: the peer sees a silent, open connection
                time.sleep(0.05)
                continue
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass

    def hang(self) -> None:
        self.hung.set()

    def resume(self) -> None:
        self.hung.clear()

    def close(self) -> None:
        self.open = False
        self.listener.close()


@pytest.fixture()
def hanging_s3(s3):
    """The test's S3 server (moto) behind a proxy that can hang (.hang() / .resume(); .endpoint)."""
    proxy = HangingProxy(s3.port)
    try:
        yield proxy
    finally:
        proxy.close()
