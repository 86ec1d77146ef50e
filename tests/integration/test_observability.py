"""The dashboard and the rules against a real Prometheus scraping a real local stack (gateway, router with a
Redis cache, an embedder, two replicas of each of two shards) under search traffic: every dashboard query and
every recording rule returns a number, every alert rule evaluates cleanly and reads only series that exist,
and a healthy stack fires no alert. Prometheus is configured from deploy/observability/prometheus.yml (its
jobs, pointed at this stack's ports) with deploy/observability/rules.yml."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from services.stack.part import Part, free_port
from tests.helpers import encode, need, pattern

OBS = Path(__file__).resolve().parents[2] / "deploy" / "observability"
RULES = yaml.safe_load((OBS / "rules.yml").read_text())["groups"]


def scrape_config(stack, tmp_path: Path) -> Path:
    """prometheus.yml's jobs with this stack's targets, scraped and evaluated every second."""
    config = yaml.safe_load((OBS / "prometheus.yml").read_text())
    targets = {
        "imsearch-router": [f"127.0.0.1:{stack.spec.metrics_port}"],
        "imsearch-shard": [f"127.0.0.1:{p.env['IMSEARCH_METRICS_PORT']}" for group in stack.shards for p in group],
        "imsearch-embedder": [f"127.0.0.1:{stack.embedder.env['IMSEARCH_METRICS_PORT']}"],
        "imsearch-gateway": [f"127.0.0.1:{stack.gateway.port}"],
    }
    assert {job["job_name"] for job in config["scrape_configs"]} == set(targets), "a job this test does not fill"
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(OBS / name) for name in config["rule_files"]]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture()
def prometheus(tmp_path):
    """start(config) -> the base URL of a real Prometheus on a free port (stopped after the test)."""
    binary = need("prometheus", "Debian package prometheus")
    parts = []

    def start(config: Path) -> str:
        port = free_port()
        part = Part("prometheus", [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{port}"], port, health="port",
                    log=tmp_path / "prometheus.log")
        parts.append(part.spawn())
        part.wait(60)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while httpx.get(url + "/-/ready").status_code != 200:
            assert time.monotonic() < deadline, "prometheus never became ready"
            time.sleep(0.2)
        return url

    yield start
    for part in parts:
        part.stop()


class Traffic(threading.Thread):
    """Searches through the gateway until stopped: by a new image (the embedder decodes it, the router fans
    out), the same image again (a cache hit), by id, and a corrupt image (refused by the decoder, a 400)."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop, self.statuses = url, threading.Event(), []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            n = 0
            while not self.stop.is_set():
                image = encode(pattern(96, 96, n), "JPEG")  # a new query (a fan-out), then the same (a hit)
                for _ in range(2):
                    r = http.post("/v1/search", files={"image": ("q.jpg", image, "image/jpeg")}, data={"k": "3"})
                    self.statuses.append(r.status_code)
                if r.status_code == 200 and r.json()["results"]:
                    hit = r.json()["results"][0]["id_str"]
                    self.statuses.append(http.post("/v1/search", json={"id": hit, "k": 3}).status_code)
                bad = http.post("/v1/search", files={"image": ("q.jpg", b"\xff\xd8 not a jpeg", "image/jpeg")})
                self.statuses.append(bad.status_code)
                n += 1
                time.sleep(0.05)


def query(url: str, expr: str) -> list[dict]:
    answer = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def numbers(result: list[dict]) -> list[float]:
    return [float(r["value"][1]) for r in result if math.isfinite(float(r["value"][1]))]


def read_series(expr: str) -> set[str]:
    """The raw metric names an expression reads (recording rules' names are checked on their own)."""
    return set(re.findall(r"\b(?:imsearch_[a-z_]+|up)\b(?=[{\[\s)]|$)", expr))


def test_every_dashboard_query_and_rule_returns_data_from_a_real_stack(catalogue, start_stack, prometheus, tmp_path):
    stack = start_stack(catalogue / "idx", replicas=2, redis=True, embedder=True, gateway=True,
                        metrics_port=free_port(), service_metrics=True,
                        env={"IMSEARCH_HOME": str(catalogue / "home"), "IMSEARCH_SHARD_TIMEOUT_S": "2"})
    url = prometheus(scrape_config(stack, tmp_path))
    traffic = Traffic(stack.gateway.url)
    traffic.start()
    try:
        board = json.loads((OBS / "grafana-dashboard.json").read_text())
        panels = {p["title"]: t["expr"] for p in board["panels"] for t in p["targets"]}
        recorded = {r["record"]: r["expr"] for g in RULES for r in g["rules"] if "record" in r}
        alerts = {r["alert"]: r["expr"] for g in RULES for r in g["rules"] if "alert" in r}
        wanted = {**{f"panel {t}": e for t, e in panels.items()}, **{f"rule {n}": n for n in recorded}}
        read = set().union(*(read_series(e) for e in [*alerts.values(), *recorded.values(), *panels.values()]))
        wanted.update({f"series {name}": name for name in read})

        missing, deadline = dict(wanted), time.monotonic() + 90
        values: dict[str, list[float]] = {}
        while missing and time.monotonic() < deadline:
            for name, expr in list(missing.items()):
                got = numbers(query(url, expr))
                if got:
                    values[name] = got
                    del missing[name]
            time.sleep(1)
        assert not missing, f"no data after 90 s for: {sorted(missing)}; traffic statuses {set(traffic.statuses)}"
        for name in sorted(values):
            print(f"{name}: {[round(v, 4) for v in values[name][:4]]}")

        targets = httpx.get(url + "/api/v1/targets").json()["data"]["activeTargets"]
        down = [(t["scrapeUrl"], t["lastError"]) for t in targets if t["health"] != "up"]
        assert targets and not down, down
        assert len(targets) == 1 + 4 + 1 + 1  # router, 2 shards x 2 replicas, embedder, gateway

        groups = httpx.get(url + "/api/v1/rules").json()["data"]["groups"]
        rules = {r.get("name"): r for g in groups for r in g["rules"]}
        assert set(alerts) | set(recorded) <= set(rules), "Prometheus did not load every rule"
        for name in [*alerts, *recorded]:
            assert rules[name]["health"] == "ok", (name, rules[name].get("lastError"))
            assert rules[name].get("lastEvaluation", "").startswith("20"), f"{name} was never evaluated"
        firing = [n for n in alerts if rules[n]["state"] == "firing"]
        assert not firing, f"a healthy stack fires {firing}"
        assert {200, 400} <= set(traffic.statuses) and 500 not in traffic.statuses
    finally:
        traffic.stop.set()
        traffic.join(30)
