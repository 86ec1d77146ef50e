"""deploy/docker-compose.yml and deploy/k8s/ against the code (no container runtime here): every service
command parses with that service's own argument parser, every port / probe / address lines up, every
IMSEARCH_* variable is a setting with a valid value, every imsearch CLI call names real options."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import typer
import yaml

from services.cli import app
from services.common.config import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MODULES = {"services.searcher.shard", "services.searcher.router", "services.embedder", "services.gateway"}


def parser_of(module: str):
    mod = importlib.import_module(module if module != "services.embedder" else "services.embedder.__main__")
    if module == "services.gateway":
        mod = importlib.import_module("services.gateway.__main__")
    return mod.build_parser()


def check_env(name: str, value: str | None) -> None:
    """An IMSEARCH_* variable must be a setting, and a literal value must validate."""
    assert name.startswith("IMSEARCH_"), name
    field = name[len("IMSEARCH_"):].lower()
    assert field in Settings.model_fields, f"{name} is not a setting the code reads"
    if value is not None:
        value = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))  # compose default of ${VAR:-default}
        Settings(**{field: value})


def cli_call_ok(words: list[str]) -> None:
    """`imsearch <command> [<sub>] ... --opt ...`: the command exists and takes every --option."""
    group = typer.main.get_command(app)
    command, rest = group, words[1:]
    while hasattr(command, "commands"):  # a group (typer's own, not a click.Group subclass)
        assert rest and rest[0] in command.commands, f"no command {rest[:1]} in {words}"
        command, rest = command.commands[rest[0]], rest[1:]
    options = {o for p in command.params for o in p.opts}
    for word in rest:
        if word.startswith("--"):
            assert word.split("=")[0] in options, f"{words[:3]}: no option {word}"


def address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


# ---------------------------------------------------------------------------------------------- compose

@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]


def compose_commands(compose) -> dict[str, tuple[str, object]]:
    """service -> (module, parsed args) of the `python -m <module>` services."""
    out = {}
    for name, svc in compose.items():
        if svc.get("entrypoint") == ["python", "-m"] and svc.get("command"):
            module, *args = svc["command"]
            assert module in MODULES, (name, module)
            out[name] = (module, parser_of(module).parse_args(args))
    return out


def test_compose_has_every_part(compose):
    assert {"minio", "redis", "ray-head", "ray-worker", "embedder", "shard-0", "shard-1", "router",
            "gateway"} <= set(compose)
    assert {m for m, _ in compose_commands(compose).values()} == MODULES


def test_compose_ports_probes_and_addresses_line_up(compose):
    commands = compose_commands(compose)
    ports = {name: args.port for name, (_, args) in commands.items()}
    for name, (module, args) in commands.items():
        test = " ".join(compose[name]["healthcheck"]["test"])
        assert "imsearch health" in test and (f"localhost:{args.port}" in test), (name, test)
        cli_call_ok(["imsearch", *compose[name]["healthcheck"]["test"][2:3]])
        assert args.host == "0.0.0.0", f"{name} must listen on all interfaces in a container"
    router = commands["router"][1]
    for group in router.shards.split(","):
        for replica in group.split("|"):
            host, port = address(replica)
            assert host in compose and ports[host] == port, replica
    host, port = address(router.embedder)
    assert ports[host] == port
    host, port = address(commands["gateway"][1].router)
    assert host == "router" and port == ports["router"]
    shard_numbers = sorted(args.shard for name, (m, args) in commands.items() if m == "services.searcher.shard")
    assert shard_numbers == list(range(len(shard_numbers)))
    assert {args.index for _, args in commands.values() if hasattr(args, "index") and args.index} == \
        {"s3://imsearch/idx"}
    env = {**compose["router"]["environment"]}
    assert env["IMSEARCH_REDIS_URL"].startswith("redis://redis:")
    assert compose["minio"]["ports"][0].startswith(env["IMSEARCH_S3_ENDPOINT"].split(":")[1])


def test_compose_env_is_settings(compose):
    for name, svc in compose.items():
        for key, value in (svc.get("environment") or {}).items():
            if key.startswith("IMSEARCH_"):
                check_env(key, value)


def test_compose_ingest_job_uses_real_cli_options(compose):
    script = compose["ingest"]["command"][0]
    for call in script.split("&&"):
        cli_call_ok(shlex.split(call))


# ---------------------------------------------------------------------------------------------- k8s

@pytest.fixture(scope="module")
def k8s():
    docs = [d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def workloads(k8s):
    for (kind, name), doc in k8s.items():
        if kind in ("Deployment", "StatefulSet"):
            yield kind, name, doc, doc["spec"]["template"]["spec"]["containers"][0]


def test_k8s_has_every_part(k8s):
    kinds = {(k, n) for k, n in k8s}
    assert {("StatefulSet", "shard"), ("Deployment", "router"), ("Deployment", "gateway"),
            ("Deployment", "embedder"), ("RayJob", "imsearch-ingest"), ("ConfigMap", "imsearch-config"),
            ("Secret", "imsearch-secrets")} <= kinds
    assert k8s[("RayJob", "imsearch-ingest")]["apiVersion"].startswith("ray.io/")  # KubeRay


def test_k8s_commands_ports_probes(k8s):
    services = {n: d for (k, n), d in k8s.items() if k == "Service"}
    for kind, name, doc, c in workloads(k8s):
        assert c["command"][:2] == ["python", "-m"] and c["command"][2] in MODULES, name
        args = parser_of(c["command"][2]).parse_args([a.replace("$(SHARD)", "0") for a in c["args"]])
        container_ports = {p["containerPort"] for p in c["ports"]}
        assert args.port in container_ports and args.host == "0.0.0.0", name
        for probe in ("readinessProbe", "livenessProbe"):
            spec = c[probe]
            port = spec["grpc"]["port"] if "grpc" in spec else spec["httpGet"]["port"]
            assert port == args.port, (name, probe)
            if name == "gateway":
                assert spec["httpGet"]["path"] in ("/readyz", "/healthz")
            else:
                assert "grpc" in spec, f"{name}: gRPC services are probed with gRPC health"
        svc = services[doc["spec"].get("serviceName", name)]
        assert svc["spec"]["selector"] == doc["spec"]["selector"]["matchLabels"]
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= container_ports, name
        assert c["resources"]["requests"], f"{name} has no resource requests"


def test_k8s_addresses_reach_real_pods(k8s):
    shard = k8s[("StatefulSet", "shard")]
    router = next(c for _, n, _, c in workloads(k8s) if n == "router")
    args = parser_of("services.searcher.router").parse_args(router["args"])
    pods = {f"shard-{i}.shard" for i in range(shard["spec"]["replicas"])}
    named = [address(r) for g in args.shards.split(",") for r in g.split("|")]
    assert {h for h, _ in named} == pods and {p for _, p in named} == {50061}
    assert address(args.embedder) == ("embedder", 50051)
    gateway = next(c for _, n, _, c in workloads(k8s) if n == "gateway")
    assert address(parser_of("services.gateway").parse_args(gateway["args"]).router) == ("router", 50050)
    assert "pod-index" in str(shard["spec"]["template"]["spec"]["containers"][0]["env"][0])  # shard = ordinal


def test_k8s_env_settings_and_secrets(k8s):
    secret_keys = set(k8s[("Secret", "imsearch-secrets")]["stringData"])
    for key, value in k8s[("ConfigMap", "imsearch-config")]["data"].items():
        check_env(key, value)

    def containers():
        for _, _, _, c in workloads(k8s):
            yield c
        job = k8s[("RayJob", "imsearch-ingest")]["spec"]["rayClusterSpec"]
        for group in [job["headGroupSpec"], *job["workerGroupSpecs"]]:
            yield from group["template"]["spec"]["containers"]

    for c in containers():
        for e in c.get("env", []):
            if not e["name"].startswith("IMSEARCH_"):
                continue
            check_env(e["name"], e.get("value"))
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == "imsearch-secrets" and ref["key"] in secret_keys, e
            if any(w in e["name"] for w in ("KEY", "TOKEN", "SECRET")):
                assert ref, f"{e['name']} must come from the Secret, not a literal"


def test_gpu_requests_and_ingest_job(k8s):
    embedder = next(c for _, n, _, c in workloads(k8s) if n == "embedder")
    assert embedder["resources"]["limits"]["nvidia.com/gpu"] == 1
    job = k8s[("RayJob", "imsearch-ingest")]["spec"]
    workers = job["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == 1
    for call in job["entrypoint"].split("&&"):
        cli_call_ok(shlex.split(call))
