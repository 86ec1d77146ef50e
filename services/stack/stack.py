"""A serving stack from one description: shard servers (× replicas) of an index, the router, and as asked
Redis, an S3 server, a Ray head, the Embedder service and the HTTP gateway, each a real process.

Every way of running more than one part starts here: `imsearch serve` (attached: the parts are children of
the command and stop with it), `imsearch cluster up` (detached: the parts outlive the command, their state
kept in WORKDIR/cluster.json), the integration tests and the benchmarks.

Parts start in tiers and each tier is waited on until healthy before the next: backing services and shard
servers (loading in parallel), then the router, then the gateway. A part that fails to come up stops the
ones already started and names itself with the end of its log.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from services.common.errors import InvalidInput, NotFound
from services.common.store import atomic_write
from services.stack.part import Part, binary, free_port, reap

STATE = "cluster.json"
S3_KINDS = ("none", "minio", "moto")


@dataclass
class StackSpec:
    index: str  # the index root the shards (and the router and gateway) serve
    shards: list[int] | None = None  # shard numbers to serve; None: every shard of the published version
    replicas: int = 1  # shard servers per shard
    router_index: bool = True  # router --index: assigns IVF lists once, embeds images with the index's model
    embedder: bool | str = False  # True: start the Embedder service; "host:port": use that one
    redis: bool = False  # a Redis query cache for the router
    s3: str = "none"  # an S3 server beside the stack: none | minio | moto
    ray: bool = False  # a Ray head (for `imsearch embed --ray-address`)
    gateway: bool = False  # the HTTP gateway and web page
    host: str = "127.0.0.1"  # address the services bind
    router_port: int = 0  # 0: a free port
    gateway_port: int = 0
    shard_port: int = 0  # the first shard server's port, the others follow; 0: free ports
    metrics_port: int | None = None  # the router's Prometheus port; None: IMSEARCH_METRICS_PORT as set
    service_metrics: bool = False  # a Prometheus port for every shard server and the embedder (in its Part's env)
    python: str | None = None  # the interpreter of the services (another install); None: this one
    in_process: bool = False  # the router searches every shard itself (one host): no shard servers
    collections: dict[str, str] = field(default_factory=dict)  # name -> index root: several named collections
    # (each with its own shard servers; the router and gateway follow a collections file); `index` is unused then
    env: dict[str, str] = field(default_factory=dict)  # IMSEARCH_* for every part
    router_env: dict[str, str] = field(default_factory=dict)  # ... and for the router only

    def __post_init__(self):
        if self.s3 not in S3_KINDS:
            raise InvalidInput(f"s3 must be one of {', '.join(S3_KINDS)}, not {self.s3!r}")
        if not 1 <= self.replicas <= 8:
            raise InvalidInput(f"replicas must be between 1 and 8, got {self.replicas}")


class Stack:
    """`with Stack(spec, workdir).up() as s:` … `s.router.address`, `s.shards[1][0].kill()`, `s.gateway.url`."""

    def __init__(self, spec: StackSpec, workdir: Path | None = None, detached: bool = False,
                 step: Callable[[str], None] | None = None):
        self.spec, self.workdir, self.detached = spec, workdir, detached
        self.step = step or (lambda msg: None)
        self.parts: list[Part] = []
        self.shards: list[list[Part]] = []  # the first collection's shard servers (or the one index's)
        self.collection_shards: dict[str, list[list[Part]]] = {}
        self.collections_file: Path | None = None
        self.router = self.gateway = self.redis = self.s3 = self.ray = self.embedder = None
        self.tls_ca = {**os.environ, **spec.env}.get("IMSEARCH_TLS_CA") or None

    def _part(self, part: Part) -> Part:
        part.env = {**self.spec.env, **part.env}
        part.detached = self.detached
        if self.workdir is not None:
            (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
            part.log = self.workdir / "logs" / f"{part.name}.log"
        self.parts.append(part.spawn())
        self._save()  # as we go: `cluster down` can clean up after a failed `up`
        return part

    def _service(self, name: str, module: str, args: list[str], port: int = 0, env: dict | None = None,
                 health: str = "grpc") -> Part:
        return self._part(Part.python(name, module, [*args, "--host", self.spec.host], port or free_port(),
                                      health=health, env={"IMSEARCH_METRICS_PORT": "0", **(env or {})},
                                      python=self.spec.python))

    def _metrics_env(self) -> dict | None:
        return {"IMSEARCH_METRICS_PORT": str(free_port())} if self.spec.service_metrics else None

    def up(self, timeout: float = 180.0) -> "Stack":
        """Start every part, tier by tier, each waited on until healthy; on any failure stop them all."""
        try:
            self._backing()
            self._start_shards()
            self._wait(self.parts)
            self._start_router()
            self._wait([self.router], timeout)
            if self.spec.gateway:
                index = next(iter(self.spec.collections.values()), self.spec.index)
                env = {"IMSEARCH_COLLECTIONS": str(self.collections_file)} if self.collections_file else None
                self.gateway = self._service("gateway", "services.gateway", [
                    "--router", self.router.address, "--index", index], self.spec.gateway_port, env, health="http")
                self._wait([self.gateway], timeout)
        except BaseException:
            self.down()
            raise
        return self

    def _backing(self) -> None:
        spec = self.spec
        if spec.redis:
            self.redis = self._part(Part.redis())
        if spec.s3 != "none":
            self.s3 = self._part(s3_part(spec.s3, self.workdir))
        if spec.ray:
            self.ray = self._part(ray_part())
        if spec.embedder is True:
            self.embedder = self._service("embedder", "services.embedder", [], env=self._metrics_env())

    def _start_shards(self) -> None:
        if self.spec.in_process:
            return
        port = self.spec.shard_port
        for name, index in (self.spec.collections or {"": self.spec.index}).items():
            numbers = self.spec.shards if self.spec.shards is not None else shard_numbers(index)
            groups = []
            for n in numbers:
                group = []
                for r in range(self.spec.replicas):
                    env = self._metrics_env()
                    group.append(self._service(f"{name + '-' if name else ''}shard-{n}-{r}", "services.searcher",
                                               ["shard", "--index", index, "--shard", str(n)], port, env))
                    port = port + 1 if port else 0
                groups.append(group)
            self.collection_shards[name] = groups
        self.shards = next(iter(self.collection_shards.values()))

    def write_collections(self, names: list[str] | None = None) -> Path:
        """The collections file the router and gateway follow, naming `names` (default: every collection of
        the spec): rewriting it adds or removes collections while they serve."""
        from services.searcher.collections import CollectionSpec, collections_json

        if self.collections_file is None:
            folder = self.workdir or Path(tempfile.mkdtemp(prefix="imsearch-stack-"))
            folder.mkdir(parents=True, exist_ok=True)
            self.collections_file = folder / "collections.json"
        specs = [CollectionSpec(name, self._shards_arg(name), self.spec.collections[name]
                                if self.spec.router_index or self.spec.in_process else None)
                 for name in (self.spec.collections if names is None else names)]
        atomic_write(self.collections_file, collections_json(specs).encode())
        return self.collections_file

    def _start_router(self) -> None:
        spec = self.spec
        if spec.collections:
            args = ["--collections", str(self.write_collections())]
        else:
            args = ["--shards", self._shards_arg("")]
        if (spec.router_index or spec.in_process) and not spec.collections:
            args += ["--index", spec.index]
        if spec.embedder:
            args += ["--embedder", self.embedder.address if self.embedder else spec.embedder]
        given = "IMSEARCH_CACHE_SECRET" in {**os.environ, **spec.env, **spec.router_env}
        env = {k: v for k, v in {"IMSEARCH_METRICS_PORT": None if spec.metrics_port is None else str(spec.metrics_port),
                                 "IMSEARCH_REDIS_URL": f"redis://{self.redis.address}/0" if self.redis else None,
                                 # the stack's own Redis: a key of the stack's for its seal, whatever host it serves
                                 "IMSEARCH_CACHE_SECRET": secrets.token_hex(32) if self.redis and not given else None,
                                 }.items() if v is not None}
        self.router = self._part(Part.python("router", "services.searcher", ["router", *args, "--host", spec.host],
                                             spec.router_port or free_port(), env={**env, **spec.router_env},
                                             python=spec.python))

    def _shards_arg(self, collection: str) -> str:
        from services.searcher.collections import LOCAL

        return LOCAL if self.spec.in_process else shards_arg(self.collection_shards[collection])

    def _wait(self, parts: list[Part], timeout: float = 180.0) -> None:
        for p in parts:
            self.step(f"waiting for {p.name}")
            p.wait(timeout, self.tls_ca)

    def down(self, grace: float = 15.0) -> int:
        """Stop every part, last started first; returns how many were running."""
        running = [p for p in reversed(self.parts) if p.running()]
        stop_all(running, grace, self.step)
        if self.workdir is not None and self.detached:
            (self.workdir / STATE).unlink(missing_ok=True)
        return len(running)

    def _save(self) -> None:
        if self.detached and self.workdir is not None:
            atomic_write(self.workdir / STATE, json.dumps([p.state() for p in self.parts], indent=1).encode())

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc) -> None:
        self.down()


def shards_arg(groups: list[list[Part]]) -> str:
    """Shard servers as a router's --shards names them: replicas '|'-separated, shards ','-separated."""
    return ",".join("|".join(p.address for p in group) for group in groups)


def shard_numbers(index: str) -> list[int]:
    """The shards of the published version of an index."""
    from services.common.config import get_settings
    from services.common.store import open_store
    from services.index.versions import load_current

    return [e.shard for e in load_current(open_store(index, get_settings())).shards]


def stop_all(parts: list[Part], grace: float = 15.0, step: Callable[[str], None] = lambda msg: None) -> None:
    """SIGTERM every part at once (a detached part's whole session), SIGKILL what is left after `grace`;
    then the same for whatever they started that still runs (found through psutil, even in sessions of
    their own, as Ray's daemons are)."""
    trees = [proc for p in parts for proc in p.descendants()]  # before: an orphan no longer shows whose it was
    for p in parts:
        step(f"stopping {p.name} (pid {p.pid})")
        p.send(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in parts:
        if not p.wait_gone(max(0.0, deadline - time.monotonic())):
            p.kill()
    reap(trees, max(0.0, deadline - time.monotonic()))


def s3_part(kind: str, workdir: Path | None) -> Part:
    if not binary("minio" if kind == "minio" else "moto_server"):
        raise NotFound(f"--s3 {kind}: its server binary is not installed")
    port = free_port()
    if kind == "minio":
        data = (workdir or Path(".imsearch")) / "minio"
        return Part("s3", [binary("minio"), "server", str(data), "--address", f"127.0.0.1:{port}"], port, "port")
    return Part("s3", [binary("moto_server"), "-H", "127.0.0.1", "-p", str(port)], port, "port")


def ray_part() -> Part:
    if not binary("ray"):
        raise NotFound("the `ray` command is not installed (pip install 'ray[data]'), or use --no-ray")
    port = free_port()
    return Part("ray-head", [binary("ray"), "start", "--head", "--block", "--port", str(port), "--num-cpus",
                             str(os.cpu_count() or 1), "--include-dashboard", "false", "--disable-usage-stats"],
                port, "port")


def read_state(workdir: Path) -> list[Part]:
    """The parts of a detached stack, from its state file."""
    try:
        return [Part.from_state(p) for p in json.loads((workdir / STATE).read_text())]
    except FileNotFoundError:
        raise NotFound(f"no cluster state in {workdir} (start one with imsearch cluster up)") from None


class Stopped(BaseException):
    """SIGINT or SIGTERM to the command an attached stack belongs to: a BaseException, as KeyboardInterrupt is,
    so that it unwinds whatever the command is doing — Stack.up stops the parts it had started."""


@contextlib.contextmanager
def stop_signals():
    """For an attached stack, from before its first part starts until its last has stopped: the first SIGINT or
    SIGTERM raises Stopped wherever the command is (starting parts, or serving), later ones are ignored so that
    the parts stop in order (a second Ctrl-C does not orphan them). A stop asked for is a clean exit: Stopped
    ends here. Without this a SIGTERM before serving began killed the command and orphaned its parts."""
    fired = False

    def stop(*_):
        nonlocal fired
        if not fired:
            fired = True
            raise Stopped

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except Stopped:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_for_signal(stack: Stack, step: Callable[[str], None] = lambda msg: None, poll: float = 1.0) -> None:
    """Serve attached until SIGINT (Ctrl-C) or SIGTERM (under stop_signals); say so once when a part exits on its
    own."""
    gone: set[str] = set()
    try:
        while True:
            time.sleep(poll)
            for p in stack.parts:
                if p.name not in gone and not p.running():
                    gone.add(p.name)
                    step(f"{p.name} exited (code {p.proc.returncode if p.proc else '?'}); see {p.log}")
    except Stopped:
        return
