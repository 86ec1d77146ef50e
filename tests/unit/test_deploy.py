"""deploy/docker-compose.yml, deploy/k8s/ and deploy/observability/ against the code (no container runtime
here): every service command parses with that service's own argument parser, every port / probe / address
lines up, every IMSEARCH_* variable is a setting with a valid value, every imsearch CLI call names real
options, the rules pass promtool and name only metrics the code exports."""

from __future__ import annotations

import importlib
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import typer
import yaml
from prometheus_client import REGISTRY

from scripts import gen_k8s_observability
from services.cli import app
from services.common.config import SECRETS_DIR, Settings
from services.searcher.collections import CollectionSpec, parse_collections, shard_groups
from tests.helpers import need

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROCESSES = {"services.searcher shard", "services.searcher router", "services.embedder", "services.gateway"}


def process_of(words: list[str]) -> tuple[str, list[str]]:
    """`python -m` arguments (module, [role], args) -> (the process they start, its own args): the searcher's module
    starts a router or a shard server, named by its first argument."""
    module, *rest = words
    return (f"{module} {rest[0]}", rest[1:]) if module == "services.searcher" else (module, rest)


def parse(process: str, args: list[str]):
    """A process's args as its own parser (its package's __main__) reads them."""
    module, _, role = process.partition(" ")
    return importlib.import_module(f"{module}.__main__").build_parser().parse_args([role, *args] if role else args)


def container_process(container: dict) -> str:
    return process_of(container["command"][2:])[0]


def parsed(container: dict):
    """A k8s container's args as its service's own parser reads them (the shard number $(SHARD) as 0)."""
    return parse(*process_of(container["command"][2:] + [a.replace("$(SHARD)", "0") for a in container["args"]]))


def check_env(name: str, value: str | None) -> None:
    """An IMSEARCH_* variable must be a setting, and a literal value must validate."""
    assert name.startswith("IMSEARCH_"), name
    if name == SECRETS_DIR:
        return
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
    """service -> (process, parsed args) of the `python -m <module>` services."""
    out = {}
    for name, svc in compose.items():
        if svc.get("entrypoint") == ["python", "-m"] and svc.get("command"):
            process, args = process_of(svc["command"])
            assert process in PROCESSES, (name, process)
            out[name] = (process, parse(process, args))
    return out


def test_compose_has_every_part(compose):
    assert {"minio", "redis", "ray-head", "ray-worker", "embedder", "shard-0", "shard-1", "router",
            "gateway"} <= set(compose)
    assert {m for m, _ in compose_commands(compose).values()} == PROCESSES


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
    shard_numbers = sorted(args.shard for name, (m, args) in commands.items() if m == "services.searcher shard")
    assert shard_numbers == list(range(len(shard_numbers)))
    assert {args.index for _, args in commands.values() if hasattr(args, "index") and args.index} == \
        {"s3://imsearch/idx"}
    env = {**compose["router"]["environment"]}
    assert env["IMSEARCH_REDIS_URL"].startswith("redis://redis:")
    assert env["IMSEARCH_S3_ENDPOINT"] == "minio:9000"  # MinIO's API port, on the compose network


COMPOSE_FILES = ["docker-compose.yml", "docker-compose.collections.yml"]


def test_compose_publishes_only_the_gateway(compose):
    """The router's published port let anyone on the host past the API keys, collection limits, rate and body
    limits; Ray's dashboard (its Jobs API runs any code) and MinIO were published on every interface."""
    for file in COMPOSE_FILES:
        services = yaml.safe_load((DEPLOY / file).read_text())["services"]
        published = {name for name, svc in services.items() if svc.get("ports")}
        assert published <= {"gateway"}, (file, published)
    assert compose["gateway"]["ports"] == ["8080:8080"]
    head = compose["ray-head"]["entrypoint"]
    assert head[head.index("--dashboard-host") + 1] == "127.0.0.1"


def test_the_debug_file_publishes_on_the_loopback_only():
    services = yaml.safe_load((DEPLOY / "docker-compose.debug.yml").read_text())["services"]
    ports = [p for svc in services.values() for p in svc.get("ports", [])]
    assert {"127.0.0.1:50050:50050", "127.0.0.1:8265:8265", "127.0.0.1:9000:9000"} <= set(ports)
    assert all(p.startswith("127.0.0.1:") for p in ports), ports


def test_compose_credentials_have_no_defaults_and_the_token_comes_from_a_secret_file(compose):
    """`${VAR:-minioadmin}` and `${IMSEARCH_AUTH_TOKEN:-}` started a stack with well-known MinIO credentials and
    an open router: now compose refuses to start without each, naming it."""
    for file in COMPOSE_FILES:
        text = (DEPLOY / file).read_text()
        assert "minioadmin" not in text and "IMSEARCH_AUTH_TOKEN:" not in text, file
        for credential in ("IMSEARCH_S3_ACCESS_KEY", "IMSEARCH_S3_SECRET_KEY", "IMSEARCH_CACHE_SECRET",
                           "IMSEARCH_AUTH_TOKEN_FILE"):
            uses = re.findall(r"\$\{" + credential + r"(:?[-?])", text)
            assert set(uses) <= {":?"}, (file, credential, uses)
    secrets = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["secrets"]
    assert secrets["imsearch_auth_token"]["file"].startswith("${IMSEARCH_AUTH_TOKEN_FILE:?")
    for name, (process, _) in compose_commands(compose).items():
        assert "imsearch_auth_token" in compose[name]["secrets"], name
        assert compose[name]["environment"]["IMSEARCH_SECRETS_DIR"] == "/run/secrets", name


def test_the_secret_file_compose_mounts_is_the_token_the_services_read(tmp_path, monkeypatch):
    from services.common.config import get_settings

    (tmp_path / "imsearch_auth_token").write_text("s3cret-token-from-a-file\n")
    monkeypatch.setenv("IMSEARCH_SECRETS_DIR", str(tmp_path))
    monkeypatch.delenv("IMSEARCH_AUTH_TOKEN", raising=False)
    get_settings.cache_clear()
    try:
        assert get_settings().token() == "s3cret-token-from-a-file"
    finally:
        get_settings.cache_clear()


def test_compose_env_is_settings(compose):
    for name, svc in compose.items():
        for key, value in (svc.get("environment") or {}).items():
            if key.startswith("IMSEARCH_"):
                check_env(key, value)


def merged(base: dict, override: dict) -> dict:
    """Compose's merge of a second file: mappings merged key by key, anything else (commands, lists) replaced,
    except that depends_on and environment merge."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def test_the_compose_collections_file_serves_two_collections(compose):
    doc = yaml.safe_load((DEPLOY / "docker-compose.collections.yml").read_text())
    services = merged(compose, doc["services"])
    commands = compose_commands(services)
    router = commands["router"][1]
    target = next(c["target"] for c in services["router"]["configs"])
    assert str(router.collections) == target and router.shards is None
    assert services["gateway"]["environment"]["IMSEARCH_COLLECTIONS"] == target
    assert [c["target"] for c in services["gateway"]["configs"]] == [target]
    specs = parse_collections((DEPLOY / doc["configs"]["collections"]["file"]).read_text())
    assert [s.name for s in specs] == ["products", "bags"]
    for spec in specs:
        for group in shard_groups(spec):
            for replica in group:
                host, port = address(replica)
                module, args = commands[host]
                assert module == "services.searcher shard" and args.port == port and args.index == spec.index
        assert address(spec.embedder) == ("embedder", commands["embedder"][1].port)
    for name, svc in services.items():
        for key, value in (svc.get("environment") or {}).items():
            if key.startswith("IMSEARCH_"):
                check_env(key, value)
    for call in doc["services"]["ingest-bags"]["command"][0].split("&&"):
        cli_call_ok(shlex.split(call))


def test_compose_ingest_job_uses_real_cli_options(compose):
    script = compose["ingest"]["command"][0]
    for call in script.split("&&"):
        cli_call_ok(shlex.split(call))


# ---------------------------------------------------------------------------------------------- k8s
# The manifests as Kubernetes gets them: rendered by `kubectl kustomize` (offline), the base (one replica of
# every shard) and the replicated overlay (two).

LAYOUTS = ["base", "overlays/replicated", "overlays/collections"]


def render(layout: str) -> dict:
    kubectl = need("kubectl", "kubectl kustomize renders deploy/k8s")
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s" / layout)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.fixture(scope="module", params=LAYOUTS)
def k8s(request):
    return render(request.param)


def workloads(k8s):
    for (kind, name), doc in k8s.items():
        if kind in ("Deployment", "StatefulSet"):
            yield kind, name, doc, doc["spec"]["template"]["spec"]["containers"][0]


def shard_sets(k8s) -> list[dict]:
    return [doc for kind, _, doc, c in workloads(k8s) if container_process(c) == "services.searcher shard"]


def router_args(k8s):
    router = next(c for _, n, _, c in workloads(k8s) if n == "router")
    return parse("services.searcher router", router["args"])


def test_every_layout_lists_every_file():
    """A manifest no kustomization names would never be applied."""
    rendered = set()
    for layout in LAYOUTS:
        rendered |= set(render(layout))
    files = [d for f in (DEPLOY / "k8s").rglob("*.yaml") if f.name != "kustomization.yaml"
             for d in yaml.safe_load_all(f.read_text()) if d]
    for d in files:
        kind, name = d["kind"], d["metadata"]["name"]
        assert any(k == kind and n.startswith(name) for k, n in rendered), f"{kind} {name} is never rendered"


def test_k8s_has_every_part(k8s):
    kinds = {(k, n) for k, n in k8s}
    assert {("Deployment", "router"), ("Deployment", "gateway"), ("Deployment", "embedder"),
            ("RayJob", "imsearch-ingest"), ("ConfigMap", "imsearch-config"), ("Secret", "imsearch-secrets"),
            ("PrometheusRule", "imsearch")} <= kinds
    assert shard_sets(k8s), "no shard StatefulSet"
    assert k8s[("RayJob", "imsearch-ingest")]["apiVersion"].startswith("ray.io/")  # KubeRay


def test_k8s_commands_ports_probes(k8s):
    services = {n: d for (k, n), d in k8s.items() if k == "Service"}
    for kind, name, doc, c in workloads(k8s):
        assert c["command"][:2] == ["python", "-m"] and container_process(c) in PROCESSES, name
        args = parsed(c)
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
        assert doc["spec"]["selector"]["matchLabels"].items() <= doc["spec"]["template"]["metadata"]["labels"].items()
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= container_ports, name
        assert c["resources"]["requests"], f"{name} has no resource requests"


def test_no_two_workloads_select_the_same_pods(k8s):
    """Replicas of the shard set are separate StatefulSets: a selector matching another set's pods would
    let one controller adopt the other's pods."""
    sets = list(workloads(k8s))
    for _, a, doc_a, _ in sets:
        for _, b, doc_b, _ in sets:
            if a != b:
                selector = doc_a["spec"]["selector"]["matchLabels"].items()
                assert not selector <= doc_b["spec"]["template"]["metadata"]["labels"].items(), (a, b)


def router_collections(k8s) -> list:
    """The collections the router serves: its --collections file (a mounted ConfigMap), or its --shards as the
    one default collection."""
    args = router_args(k8s)
    if not args.collections:
        return [CollectionSpec("default", args.shards, args.index, args.embedder, args.shard_count)]
    router = k8s[("Deployment", "router")]["spec"]["template"]["spec"]
    mount = next(m for m in router["containers"][0]["volumeMounts"] if str(args.collections).startswith(m["mountPath"]))
    volume = next(v for v in router["volumes"] if v["name"] == mount["name"])
    data = k8s[("ConfigMap", volume["configMap"]["name"])]["data"]
    return parse_collections(data[str(args.collections).removeprefix(mount["mountPath"]).lstrip("/")])


def test_the_router_asks_every_replica_of_every_shard(k8s):
    """The router's --shards (a template on {i}, expanded by the router's own parser) names pod i of every
    shard set of the collection's index for shard i, and each set has exactly --shard-count pods; with
    collections, so does each collection of the router's collections file."""
    specs = router_collections(k8s)
    sets = shard_sets(k8s)
    served = set()
    for spec in specs:
        groups = shard_groups(spec)
        mine = [s for s in sets if parsed(s["spec"]["template"]["spec"]["containers"][0]).index == spec.index]
        assert mine, f"no shard set serves {spec.index}"
        served |= {s["metadata"]["name"] for s in mine}
        for s in mine:
            assert s["spec"]["replicas"] == len(groups), f"{s['metadata']['name']} runs {s['spec']['replicas']} pods"
        for i, group in enumerate(groups):
            hosts = {address(r) for r in group}
            assert hosts == {(f"{s['metadata']['name']}-{i}.{s['spec']['serviceName']}", 50061) for s in mine}, i
        assert address(spec.embedder) == ("embedder", 50051)
    assert served == {s["metadata"]["name"] for s in sets}, "a shard set no collection asks"
    gateway = next(c for _, n, _, c in workloads(k8s) if n == "gateway")
    assert address(parse("services.gateway", gateway["args"]).router) == ("router", 50050)
    if router_args(k8s).collections:  # the gateway reads the same file (catalogues, thumbnails per collection)
        env = {e["name"]: e.get("value") for e in gateway["env"]}
        assert env["IMSEARCH_COLLECTIONS"] == str(router_args(k8s).collections)
        assert [m["mountPath"] for m in gateway["volumeMounts"]] == ["/etc/imsearch"]
    for s in sets:  # shard = the pod's ordinal
        assert "pod-index" in str(s["spec"]["template"]["spec"]["containers"][0]["env"][0])


def test_the_collections_layout_serves_two_collections():
    specs = router_collections(render("overlays/collections"))
    assert [s.name for s in specs] == ["products", "bags"]
    assert len({s.index for s in specs}) == 2


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


def test_every_service_is_scraped_on_the_port_that_serves_metrics(k8s):
    """Each ServiceMonitor selects a Service whose named port reaches the container port that serves
    /metrics: IMSEARCH_METRICS_PORT for the gRPC services, the HTTP port for the gateway."""
    metrics_port = int(k8s[("ConfigMap", "imsearch-config")]["data"]["IMSEARCH_METRICS_PORT"])
    monitors = [d for (k, _), d in k8s.items() if k == "ServiceMonitor"]
    services = [d for (k, _), d in k8s.items() if k == "Service"]
    scraped = set()
    for m in monitors:
        selector = m["spec"]["selector"]["matchLabels"].items()
        chosen = [s for s in services if selector <= s["metadata"].get("labels", {}).items()]
        assert chosen, f"{m['metadata']['name']} selects no Service"
        port_name = m["spec"]["endpoints"][0]["port"]
        for s in chosen:
            port = next(p for p in s["spec"]["ports"] if p["name"] == port_name)
            workload = next(d for _, _, d, _ in workloads(k8s)
                            if d["spec"]["selector"]["matchLabels"].items() >= s["spec"]["selector"].items())
            c = workload["spec"]["template"]["spec"]["containers"][0]
            args = parsed(c)
            assert port["targetPort"] == (args.port if container_process(c) == "services.gateway" else metrics_port)
            scraped.add(container_process(c))
    assert scraped == PROCESSES


def test_the_prometheus_rule_is_rules_yml():
    rule = render("base")[("PrometheusRule", "imsearch")]
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    assert (DEPLOY / "k8s" / "common" / "observability.yaml").read_text() == gen_k8s_observability.render(), \
        "deploy/k8s/common/observability.yaml is stale: run `make observability`"


# ---------------------------------------------------------------------------------------------- rules
# Prometheus rules and the Grafana dashboard (deploy/observability/); the integration test
# tests/integration/test_observability.py evaluates them on a real Prometheus.

RULES = DEPLOY / "observability" / "rules.yml"


def promtool(*args: str) -> str:
    tool = need("promtool", "Debian package prometheus")
    out = subprocess.run([tool, *args], capture_output=True, text=True, cwd=RULES.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_promtool_checks_the_rules():
    assert "SUCCESS" in promtool("check", "rules", RULES.name)


def test_promtool_unit_tests_pass():
    print(promtool("test", "rules", "rules_test.yml"))


def test_every_alert_has_a_unit_test_that_fires_it():
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((RULES.parent / "rules_test.yml").read_text())["tests"]
    fired = {c["alertname"] for t in tests for c in t.get("alert_rule_test", []) if c.get("exp_alerts")}
    assert alerts and alerts == fired, f"alerts no test fires: {alerts - fired}"


def test_rules_and_dashboard_name_only_metrics_the_code_exports():
    """A renamed metric would leave a dashboard panel empty and an alert silent: every imsearch_* name in
    the rules and the dashboard is a metric a service registers (or a recording rule)."""
    importlib.import_module("services.gateway.app")  # registers the gateway's metrics
    exported = {collector.name for collector in REGISTRY.collect()}  # a counter's family name has no _total
    recorded = {r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r}
    text = RULES.read_text() + (RULES.parent / "grafana-dashboard.json").read_text()
    names = set(re.findall(r"\b(imsearch_[a-z_]+|imsearch:[a-z0-9_:]+)", text))
    for name in names:
        family = re.sub(r"_(total|bucket|count|sum)$", "", name)
        assert family in exported or name in recorded, f"{name} is not exported"
    assert recorded <= names  # every recording rule is used by a panel or an alert


def test_the_dashboard_is_grafana_json_with_a_query_per_panel():
    board = json.loads((RULES.parent / "grafana-dashboard.json").read_text())
    panels = board["panels"]
    assert board["title"] and len(panels) >= 10
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
