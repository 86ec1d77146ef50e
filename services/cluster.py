"""`imsearch cluster up|status|down`: the whole system on one machine as real processes — Redis, an S3
server, a Ray head, the embedder, shard servers with replicas, the router and the gateway — with the
same settings model (IMSEARCH_* env) as docker-compose and Kubernetes. The state (pids, ports,
addresses) is kept in WORKDIR/cluster.json, so `status` and `down` work from another shell.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from services.common.errors import InvalidInput, NotFound
from services.common.procs import free_port, wait_http, wait_serving
from services.common.store import atomic_write

STATE = "cluster.json"


@dataclass
class Proc:
    name: str
    kind: str  # grpc | http | redis | s3 | ray
    port: int
    pid: int
    log: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def _spawn(name: str, kind: str, argv: list[str], port: int, logs: Path, env: dict) -> Proc:
    """Start a detached process (its own session: Ctrl-C in this shell does not reach it)."""
    log = logs / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Proc(name, kind, port, proc.pid, str(log))


def _python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _check(p: Proc, tls_ca: str | None, timeout: float) -> None:
    """Until healthy: gRPC health, HTTP /readyz, or an open port, by the part's kind."""
    handle = _Handle(p.pid)
    if p.kind == "grpc":
        wait_serving(p.address, timeout, proc=handle, tls_ca=tls_ca)
    elif p.kind == "http":
        wait_http(f"http://{p.address}/readyz", handle, timeout)
    else:
        _wait_port(p, timeout)


def _wait(p: Proc, tls_ca: str | None, timeout: float = 180.0) -> None:
    """_check, or fail naming the part's log and showing its end."""
    try:
        _check(p, tls_ca, timeout)
    except Exception as e:
        tail = Path(p.log).read_text(errors="replace")[-1500:] if Path(p.log).exists() else ""
        raise RuntimeError(f"{p.name} did not come up ({e}); end of {p.log}:\n{tail}") from None


class _Handle:
    """The bit of Popen that wait_serving / wait_http use, for a pid this process did not start."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self):
        return None if alive(self.pid) else 1


def _wait_port(p: Proc, timeout: float) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", p.port)) == 0:
                return
        if not alive(p.pid) or time.monotonic() > deadline:
            raise TimeoutError(f"port {p.port} not open")
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie counts as gone (an exited process whose parent has not reaped it yet) once its last
        # thread is: a main thread that exits first shows Z while the others are still running
        zombie = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        return not zombie or len(os.listdir(f"/proc/{pid}/task")) > 1
    except FileNotFoundError:  # reaped between the looks
        return False
    except (OSError, IndexError):
        return True


def binary(name: str) -> str | None:
    """A program installed beside this Python (the venv's bin, not always on PATH), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def pick_s3(choice: str) -> str:
    if choice not in ("auto", "minio", "moto", "none"):
        raise InvalidInput(f"--s3 must be auto, minio, moto or none, not {choice!r}")
    if choice == "auto":
        return "minio" if binary("minio") else "moto" if binary("moto_server") else "none"
    if choice != "none" and not binary("minio" if choice == "minio" else "moto_server"):
        raise NotFound(f"--s3 {choice}: its server binary is not installed")
    return choice


def secure_env(workdir: Path) -> dict[str, str]:
    """TLS on every gRPC hop (a self-signed certificate, its own CA) and one bearer token for every call,
    handed to the processes as files (IMSEARCH_SECRETS_DIR), never on a command line or in a log."""
    import secrets

    from services.common.tls import self_signed

    crt, key = self_signed(workdir / "tls")
    folder = workdir / "secrets"
    folder.mkdir(mode=0o700, exist_ok=True)
    token = folder / "imsearch_auth_token"
    if not token.exists():
        atomic_write(token, secrets.token_urlsafe(32).encode())
        token.chmod(0o600)
    return {"IMSEARCH_TLS_CERT": str(crt), "IMSEARCH_TLS_KEY": str(key), "IMSEARCH_TLS_CA": str(crt),
            "IMSEARCH_SECRETS_DIR": str(folder)}


def _tls_ca(workdir: Path) -> str | None:
    """The CA health checks verify the parts with: the cluster's own (--secure), else the caller's."""
    ca = workdir / "tls" / "tls.crt"
    return str(ca) if ca.exists() else os.environ.get("IMSEARCH_TLS_CA")


def up(index: str, workdir: Path, shards_replicas: int = 2, s3: str = "auto", ray: bool = True,
       http_port: int = 0, step=print, secure: bool = False) -> list[Proc]:
    """Start everything, wait until each part is healthy, write the state; returns the processes.
    secure: TLS and a bearer token between all parts (secure_env)."""
    from services.common.config import get_settings
    from services.common.store import open_store
    from services.indexer.manifest import load_current

    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / STATE).exists() and any(alive(p.pid) for p in read_state(workdir)):
        raise InvalidInput(f"a cluster is already running from {workdir} (imsearch cluster down first)")
    settings = get_settings()
    manifest = load_current(open_store(index, settings))
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    shutil.rmtree(workdir / "tls", ignore_errors=True)  # a cluster started without --secure leaves none
    env = {**os.environ, **(secure_env(workdir) if secure else {})}
    tls_ca = _tls_ca(workdir)
    procs: list[Proc] = []

    def start(name, kind, argv, port, extra_env=None):
        p = _spawn(name, kind, argv, port, logs, {**env, **(extra_env or {})})
        procs.append(p)
        write_state(workdir, procs)  # as we go: `down` can clean up after a failed `up`
        return p

    try:
        redis = start("redis", "redis", ["redis-server", "--port", str(port := free_port()), "--bind", "127.0.0.1",
                                         "--save", "", "--appendonly", "no"], port)
        s3_kind = pick_s3(s3)
        if s3_kind == "minio":
            port = free_port()
            start("s3", "s3", [binary("minio"), "server", str(workdir / "minio"), "--address", f"127.0.0.1:{port}"],
                  port)
        elif s3_kind == "moto":
            port = free_port()
            start("s3", "s3", [binary("moto_server"), "-H", "127.0.0.1", "-p", str(port)], port)
        if ray:
            if not binary("ray"):
                raise NotFound("the `ray` command is not installed (pip install 'ray[data]'), or use --no-ray")
            port = free_port()
            start("ray-head", "ray", [binary("ray"), "start", "--head", "--block", "--port", str(port), "--num-cpus",
                                      str(os.cpu_count() or 1), "--include-dashboard", "false",
                                      "--disable-usage-stats"], port)
        embedder = start("embedder", "grpc", _python("services.embedder", "--port", str(port := free_port())), port)
        shards = []
        for entry in manifest.shards:
            group = [start(f"shard-{entry.shard}-{r}", "grpc", _python(
                "services.searcher.shard", "--index", index, "--shard", str(entry.shard), "--port",
                str(port := free_port())), port, {"IMSEARCH_METRICS_PORT": "0"}) for r in range(shards_replicas)]
            shards.append("|".join(p.address for p in group))
        for p in procs:
            step(f"waiting for {p.name}")
            _wait(p, tls_ca)
        router = start("router", "grpc", _python("services.searcher.router", "--shards", ",".join(shards),
                                                 "--embedder", embedder.address, "--index", index, "--port",
                                                 str(port := free_port())), port,
                       {"IMSEARCH_REDIS_URL": f"redis://{redis.address}/0"})
        _wait(router, tls_ca)
        gateway = start("gateway", "http", _python("services.gateway", "--router", router.address, "--index", index,
                                                   "--port", str(port := http_port or free_port())), port)
        _wait(gateway, tls_ca)
    except BaseException:
        down(workdir, step=lambda m: None)
        raise
    return procs


def write_state(workdir: Path, procs: list[Proc]) -> None:
    atomic_write(workdir / STATE, json.dumps([asdict(p) for p in procs], indent=1).encode())


def read_state(workdir: Path) -> list[Proc]:
    try:
        return [Proc(**p) for p in json.loads((workdir / STATE).read_text())]
    except FileNotFoundError:
        raise NotFound(f"no cluster state in {workdir} (start one with imsearch cluster up)") from None


def status(workdir: Path) -> list[tuple[Proc, bool, str]]:
    """(process, healthy, detail) for every part."""
    out, tls_ca = [], _tls_ca(workdir)
    for p in read_state(workdir):
        if not alive(p.pid):
            out.append((p, False, "not running"))
            continue
        try:
            _check(p, tls_ca, 3)
            out.append((p, True, "healthy"))
        except Exception as e:  # noqa: BLE001 - status reports any failure as unhealthy
            out.append((p, False, f"unhealthy: {str(e).splitlines()[0][:80]}"))
    return out


def _wait_gone(procs: list[Proc], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while any(alive(p.pid) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)


def down(workdir: Path, step=print, grace: float = 20.0) -> int:
    """SIGTERM every part (front to back), SIGKILL what is left after `grace`; returns how many stopped."""
    procs = read_state(workdir)
    running = [p for p in reversed(procs) if alive(p.pid)]
    for p in running:
        step(f"stopping {p.name} (pid {p.pid})")
        try:
            os.killpg(p.pid, signal.SIGTERM)  # its session: ray start's own children too
        except ProcessLookupError:
            pass
    _wait_gone(running, grace)
    for p in running:
        if alive(p.pid):
            os.killpg(p.pid, signal.SIGKILL)
    _wait_gone(running, 10.0)  # SIGKILL is delivered, not done: a process may take a moment to exit
    (workdir / STATE).unlink(missing_ok=True)
    return len(running)
