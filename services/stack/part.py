"""One part of a stack: a real process (a service, Redis, an S3 server, a Ray head) on a port, with the
health check that says it is ready, started attached (a child of this process) or detached (its own
session, outliving this process), stopped with SIGTERM then SIGKILL.

Liveness and process trees come from psutil (not /proc by hand, which macOS lacks): stopping a part stops
whatever it started, even a child that moved to a session of its own."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

HEALTH = ("grpc", "http", "redis", "port")


def free_port() -> int:
    """A port the OS says is free now (for local multi-process serving and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """Whether pid still runs. A zombie (exited, not yet reaped) counts as gone once its last thread is:
    a main thread that exits first shows Z while the others still run."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE or proc.num_threads() > 1
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def reap(procs: list[psutil.Process], grace: float) -> None:
    """SIGTERM the processes still running (psutil checks a pid was not reused), SIGKILL them after grace."""
    alive_ = [p for p in procs if p.is_running()]
    for p in alive_:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, left = psutil.wait_procs(alive_, timeout=grace)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=5)


def binary(name: str) -> str | None:
    """A program installed beside this Python (the venv's bin, not always on PATH), else on PATH."""
    import shutil

    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


@dataclass
class Part:
    name: str
    argv: list[str]
    port: int
    health: str = "grpc"  # grpc (the health service) | http (GET /readyz is 200) | redis (PING) | port (open)
    env: dict[str, str] = field(default_factory=dict)  # on top of this process's environment
    log: Path | None = None  # stdout + stderr; None: discarded
    pid: int = 0
    detached: bool = False
    proc: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    @classmethod
    def python(cls, name: str, module: str, args: list[str], port: int | None = None, python: str | None = None,
               **kw) -> "Part":
        """`python -m module args --port PORT` (a free port when none is given; this interpreter unless
        another is named)."""
        port = port or free_port()
        return cls(name, [python or sys.executable, "-m", module, *args, "--port", str(port)], port, **kw)

    @classmethod
    def redis(cls, port: int | None = None, **kw) -> "Part":
        """A real redis-server on loopback without persistence."""
        port = port or free_port()
        return cls("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], port, "redis", **kw)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> "Part":
        """Start the process without waiting for it to be ready."""
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(self.argv, env={**os.environ, **self.env}, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=self.detached)
        finally:
            if self.log:
                out.close()
        self.pid = self.proc.pid
        return self

    def start(self, timeout: float = 120.0, tls_ca: str | None = None) -> "Part":
        """Start the process and wait until it is healthy (a restart, after kill, too)."""
        return self.spawn().wait(timeout, tls_ca)

    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return bool(self.pid) and alive(self.pid)

    def wait(self, timeout: float = 120.0, tls_ca: str | None = None) -> "Part":
        """Until healthy; else an error naming the part, with the end of its log."""
        try:
            self.check(timeout, tls_ca)
        except (TimeoutError, RuntimeError) as e:
            tail = self.log.read_text(errors="replace")[-1500:] if self.log and self.log.exists() else ""
            raise RuntimeError(f"{self.name} did not come up ({e})" + (f"; end of {self.log}:\n{tail}" if tail else
                                                                        "")) from None
        return self

    def check(self, timeout: float, tls_ca: str | None = None) -> None:
        """Poll the part's health check until it passes, the process exits, or time runs out."""
        with contextlib.ExitStack() as resources:
            probe = self._probe(resources, tls_ca)
            deadline = time.monotonic() + timeout
            while not probe():
                if not self.running():
                    raise RuntimeError(f"the process exited (code {self.proc.returncode if self.proc else '?'})")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not healthy ({self.health} check) after {timeout:.0f} s")
                time.sleep(0.05)

    def _probe(self, resources: contextlib.ExitStack, tls_ca: str | None) -> Callable[[], bool]:
        if self.health == "grpc":  # one channel for every poll: reconnecting each time costs more than the check
            from services.common.server import open_channel

            stub = health_pb2_grpc.HealthStub(resources.enter_context(open_channel(self.address, tls_ca, aio=False)))
            return lambda: _grpc_serving(stub)
        return {"http": lambda: _http_ok(f"{self.url}/readyz"), "redis": lambda: _redis_ping(self.port),
                "port": lambda: _port_open(self.port)}[self.health]

    def send(self, sig: int) -> None:
        """A signal to the process (SIGSTOP / SIGCONT for gray failures); a detached part's whole session."""
        if self.running():
            os.killpg(self.pid, sig) if self.detached else os.kill(self.pid, sig)

    def descendants(self) -> list[psutil.Process]:
        """Every process this part started, however deep, wherever it went (a session of its own, as Ray's
        daemons take): read before a stop, since an orphan no longer shows whose it was."""
        try:
            return psutil.Process(self.pid).children(recursive=True) if self.running() else []
        except psutil.Error:
            return []

    def kill(self) -> None:
        """kill -9, the part and everything it started: no goodbye; returns once they are gone."""
        tree = self.descendants()
        self.send(signal.SIGKILL)
        self.wait_gone(10.0)
        reap(tree, 0.0)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM (a graceful drain), SIGKILL after `grace` seconds; then the same for whatever it started
        and left running."""
        if not self.running():
            return
        tree = self.descendants()
        self.send(signal.SIGTERM)
        if not self.wait_gone(grace):
            self.send(signal.SIGKILL)
            self.wait_gone(10.0)
        reap(tree, grace)

    def wait_gone(self, seconds: float) -> bool:
        """True once the process has exited (within `seconds`)."""
        if self.proc is not None:
            try:
                self.proc.wait(seconds)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + seconds
        while self.running():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def state(self) -> dict:
        """What `cluster status/down` need to find the part again from another process."""
        return {"name": self.name, "health": self.health, "port": self.port, "pid": self.pid,
                "log": str(self.log) if self.log else None, "detached": self.detached}

    @classmethod
    def from_state(cls, state: dict) -> "Part":
        log = state.get("log")
        return cls(state["name"], [], state["port"], state["health"], log=Path(log) if log else None,
                   pid=state["pid"], detached=state.get("detached", True))


def _grpc_serving(stub: health_pb2_grpc.HealthStub, timeout: float = 1.0) -> bool:
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _http_ok(url: str, any_status: bool = False, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status == 200
    except urllib.error.HTTPError:
        return any_status
    except OSError:
        return False


def healthy(target: str, tls_ca: str | None = None, timeout: float = 2.0) -> bool:
    """One look (`imsearch health`, container probes): a URL answers 200, or a gRPC service at host:port
    reports SERVING."""
    if target.startswith(("http://", "https://")):
        return _http_ok(target, timeout=timeout)
    from services.common.server import open_channel

    with open_channel(target, tls_ca, aio=False) as channel:
        return _grpc_serving(health_pb2_grpc.HealthStub(channel), timeout)


def _redis_ping(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.2).ping())
    except redis.exceptions.ConnectionError:
        return False


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_http(url: str, timeout: float = 120.0, any_status: bool = False) -> None:
    """Poll url until it answers 200 (any_status: any HTTP answer at all), for servers this process did not
    start as a Part (an in-thread S3 server, a page served by a Part's child)."""
    deadline = time.monotonic() + timeout
    while not _http_ok(url, any_status):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready after {timeout:.0f} s")
        time.sleep(0.05)
