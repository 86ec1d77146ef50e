"""`imsearch cluster up|status|down`: the whole system on one machine as detached processes — Redis, an S3
server, a Ray head, the embedder, shard servers with replicas, the router and the gateway — with the same
settings model (IMSEARCH_* env) as docker-compose and Kubernetes. The state (pids, ports, logs) is kept in
WORKDIR/cluster.json, so `status` and `down` work from another shell."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

from services.common.errors import InvalidInput
from services.common.store import atomic_write
from services.stack.part import Part, alive, binary
from services.stack.stack import STATE, Stack, StackSpec, read_state, stop_all


def pick_s3(choice: str) -> str:
    """auto: MinIO when its server is installed, else moto's, else none."""
    if choice not in ("auto", "minio", "moto", "none"):
        raise InvalidInput(f"--s3 must be auto, minio, moto or none, not {choice!r}")
    if choice == "auto":
        return "minio" if binary("minio") else "moto" if binary("moto_server") else "none"
    return choice


def secure_env(workdir: Path) -> dict[str, str]:
    """TLS on every gRPC hop (a self-signed certificate, its own CA) and one bearer token for every call,
    handed to the processes as files (IMSEARCH_SECRETS_DIR), never on a command line or in a log."""
    from services.stack.tls import self_signed

    crt, key = self_signed(workdir / "tls")
    folder = workdir / "secrets"
    folder.mkdir(mode=0o700, exist_ok=True)
    token = folder / "imsearch_auth_token"
    if not token.exists():
        atomic_write(token, secrets.token_urlsafe(32).encode())
        token.chmod(0o600)
    return {"IMSEARCH_TLS_CERT": str(crt), "IMSEARCH_TLS_KEY": str(key), "IMSEARCH_TLS_CA": str(crt),
            "IMSEARCH_SECRETS_DIR": str(folder)}


def tls_ca(workdir: Path) -> str | None:
    """The CA health checks verify the parts with: the cluster's own (--secure), else the caller's."""
    ca = workdir / "tls" / "tls.crt"
    return str(ca) if ca.exists() else os.environ.get("IMSEARCH_TLS_CA")


def up(index: str, workdir: Path, replicas: int = 2, s3: str = "auto", ray: bool = True, http_port: int = 0,
       step: Callable[[str], None] = print, secure: bool = False) -> list[Part]:
    """Start everything detached, wait until each part is healthy, keep the state; returns the parts."""
    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / STATE).exists() and any(alive(p.pid) for p in read_state(workdir)):
        raise InvalidInput(f"a cluster is already running from {workdir} (imsearch cluster down first)")
    shutil.rmtree(workdir / "tls", ignore_errors=True)  # a cluster started without --secure leaves none
    spec = StackSpec(index, replicas=replicas, embedder=True, redis=True, s3=pick_s3(s3), ray=ray, gateway=True,
                     gateway_port=http_port, env=secure_env(workdir) if secure else {})
    return Stack(spec, workdir, detached=True, step=step).up().parts


def status(workdir: Path) -> list[tuple[Part, bool, str]]:
    """(part, healthy, detail) for every part."""
    out, ca = [], tls_ca(workdir)
    for p in read_state(workdir):
        if not p.running():
            out.append((p, False, "not running"))
            continue
        try:
            p.check(3, ca)
            out.append((p, True, "healthy"))
        except Exception as e:  # noqa: BLE001 - status reports any failure as unhealthy
            out.append((p, False, f"unhealthy: {str(e).splitlines()[0][:80]}"))
    return out


def down(workdir: Path, step: Callable[[str], None] = print, grace: float = 20.0) -> int:
    """SIGTERM every part (front to back), SIGKILL what is left after `grace`; returns how many stopped."""
    running = [p for p in reversed(read_state(workdir)) if p.running()]
    stop_all(running, grace, step)
    (workdir / STATE).unlink(missing_ok=True)
    return len(running)
