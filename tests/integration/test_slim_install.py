"""The serving image as deploy/Dockerfile builds it (ROLE=serve): a fresh venv with requirements/serve.lock and
the project without dependencies runs shard servers, the router and the gateway — and has no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from services.common.config import Settings
from services.indexer.build import build_index
from tests.helpers import random_unit_vectors, write_fake_embeddings

ROOT = Path(__file__).resolve().parents[2]


def test_the_serve_install_serves_without_torch(tmp_path, start_stack):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    for args in (["-r", str(ROOT / "requirements" / "serve.lock")], ["--no-deps", str(ROOT)]):
        done = subprocess.run(pip + args, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
    python = str(venv / "bin" / "python")
    probe = subprocess.run([python, "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert probe.stdout.strip() == "None", probe  # not installed at all, let alone imported

    x = random_unit_vectors(500, 16, seed=1)
    write_fake_embeddings(tmp_path / "emb", x)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=2, settings=Settings(home=tmp_path / "home"))
    stack = start_stack(tmp_path / "idx", python=python, router_index=False, gateway=True,
                        env={"IMSEARCH_HOME": str(tmp_path / "home")})
    answer = httpx.post(stack.gateway.url + "/v1/search", json={"vector": x[7].tolist(), "k": 3}, timeout=30)
    assert answer.status_code == 200 and answer.json()["results"][0]["uri"] == "img/7.jpg", answer.text
    assert answer.json()["coverage"] == 1.0
