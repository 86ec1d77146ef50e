"""Service processes: start `python -m <module>`, wait on gRPC health, stop (SIGTERM) or kill -9.

Used by `imsearch serve` to run shard servers, and by the integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    """A port the OS says is free now (for local multi-process serving and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(address: str, timeout: float = 120.0, proc: subprocess.Popen | None = None,
                 tls_ca: str | Path | None = None) -> None:
    """Poll the standard health service until SERVING (or fail, showing the process's output)."""
    from services.common.server import open_channel

    deadline = time.monotonic() + timeout
    with open_channel(address, tls_ca, aio=False) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"service at {address} exited with {proc.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"service at {address} not SERVING after {timeout}s")
            time.sleep(0.05)


def start_all(services: list["Service"]) -> None:
    """Start every process first (they load in parallel), then wait until each is SERVING."""
    for s in services:
        s.start(wait=False)
    for s in services:
        wait_serving(s.address, proc=s.proc, tls_ca=s.tls_ca)


class Service:
    """`python -m <module> <args>` on a given port, as a real process."""

    def __init__(self, module: str, args: list[str], port: int, env: dict | None = None, log: Path | None = None):
        self.module, self.args, self.port = module, args, port
        self.env = {**os.environ, **(env or {})}
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.tls_ca = self.env.get("IMSEARCH_TLS_CA") or None  # health checks speak what the service speaks

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> "Service":
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", self.module, *self.args, "--port", str(self.port)],
                                     env=self.env, stdout=out, stderr=subprocess.STDOUT)
        if wait:
            wait_serving(self.address, proc=self.proc, tls_ca=self.tls_ca)
        return self

    def kill(self) -> None:
        """kill -9: no goodbye."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0,
              any_status: bool = False) -> None:
    """Poll url until it answers 200 (any_status: any HTTP answer at all), or fail if the process died
    or time ran out."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except urllib.error.HTTPError:
            if any_status:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready after {timeout:.0f} s")
        time.sleep(0.05)


class HttpService(Service):
    """A process serving HTTP (the gateway): ready once GET /readyz answers 200."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> "HttpService":
        super().start(wait=False)
        if wait:
            wait_http(f"{self.url}/readyz", self.proc)
        return self


class RedisServer:
    """A real redis-server on loopback (no persistence), ready once it answers PING."""

    def __init__(self, port: int):
        self.port, self.proc = port, None

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 20
        while True:  # wait on PING, not a sleep
            try:
                if client.ping():
                    return self
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
