"""A storage endpoint that accepts connections and never answers (an S3 server behind a proxy the test
hangs): the gateway keeps answering searches and /healthz within their deadlines, says "degraded", and
recovers; an embed run and a publish end with one line within the retry budget, CURRENT intact."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from services.common.config import get_settings
from services.common.store import S3Store, open_store
from services.embedder.embeddings import read_embeddings
from services.eval.synthetic import write_embeddings
from services.index.versions import load_current
from services.indexer.build import build_index
from tests.helpers import encode, pattern, random_unit_vectors

ROOT = Path(__file__).resolve().parents[2]
BUDGET = {"IMSEARCH_S3_RETRY_S": "3", "IMSEARCH_S3_TIMEOUT_S": "1"}


def catalogue_on_s3(tmp_path, n: int = 40) -> tuple[str, np.ndarray]:
    """n images in s3://photos and an index of them in s3://gray/idx (vectors made up: no model needed)."""
    photos = S3Store("photos", "", get_settings())
    for i in range(n):
        photos.put_bytes(f"{i}.jpg", encode(pattern(64, 48, seed=i), "JPEG"))
    x = random_unit_vectors(n, 16, seed=3)
    write_embeddings(tmp_path / "emb", x, uri_prefix="s3://photos")
    build_index(str(tmp_path / "emb"), "s3://gray/idx", shards=2, settings=get_settings())
    return "s3://gray/idx", x


def test_a_hung_store_does_not_hold_the_gateway(hanging_s3, start_stack, tmp_path):
    root, x = catalogue_on_s3(tmp_path)
    ids = read_embeddings(open_store(str(tmp_path / "emb"))).ids.tolist()
    env = {**BUDGET, "IMSEARCH_HOME": str(tmp_path / "home"), "IMSEARCH_S3_ENDPOINT": hanging_s3.endpoint,
           "IMSEARCH_GATEWAY_TIMEOUT_S": "2", "IMSEARCH_RELOAD_INTERVAL_S": "0.5"}
    gateway = start_stack(root, router_index=False, gateway=True, env=env).gateway
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        assert http.get(f"/v1/images/{ids[0]}").status_code == 200  # storage answers: a thumbnail
        hanging_s3.hang()

        def timed(method, path, **kw):
            start = time.monotonic()
            r = http.request(method, path, **kw)
            return r.status_code, time.monotonic() - start

        with ThreadPoolExecutor(16) as pool:  # thumbnails stuck on storage, searches and probes beside them
            thumbs = [pool.submit(timed, "GET", f"/v1/images/{i}") for i in ids[1:13]]
            time.sleep(0.3)
            health = [timed("GET", "/healthz") for _ in range(5)]
            searches = [timed("POST", "/v1/search", json={"vector": x[i].tolist(), "k": 3}) for i in range(5)]
            thumb_results = [f.result() for f in thumbs]
        assert all(code == 200 and s < 1.0 for code, s in health), health
        assert all(code == 200 and s < 2.0 for code, s in searches), searches
        assert all(code == 504 and s < 4.0 for code, s in thumb_results), thumb_results  # the gateway's deadline
        print(f"store hung: /healthz {max(s for _, s in health):.3f} s, vector searches "
              f"{max(s for _, s in searches):.3f} s, thumbnails 504 after {max(s for _, s in thumb_results):.2f} s")
        deadline = time.monotonic() + 10  # the storage reads give up within their budget: readiness says so
        while http.get("/readyz").json()["status"] != "degraded" and time.monotonic() < deadline:
            time.sleep(0.2)
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded", ready.text

        hanging_s3.resume()
        deadline = time.monotonic() + 15
        while http.get(f"/v1/images/{ids[20]}").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert http.get(f"/v1/images/{ids[21]}").status_code == 200
        assert http.get("/readyz").json()["status"] == "ready"


def cli(*args: str, home: Path, endpoint: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **BUDGET, "IMSEARCH_HOME": str(home),
                                            "IMSEARCH_S3_ENDPOINT": endpoint})
    return proc, time.monotonic() - start


def test_embed_and_publish_against_a_hung_store_end_in_one_line_within_the_budget(hanging_s3, tmp_path):
    root, _ = catalogue_on_s3(tmp_path)
    build_index(str(tmp_path / "emb"), root, shards=2, settings=get_settings(), version="staged", publish_it=False)
    before = load_current(open_store(root))
    src = tmp_path / "catalogue"
    src.mkdir()
    for i in range(6):
        (src / f"{i}.png").write_bytes(encode(pattern(48, 40, seed=i)))
    hanging_s3.hang()
    for args in (("embed", str(src), "--out", "s3://gray/emb-new", "--engine", "local"),
                 ("index", "publish", root, "staged")):
        proc, seconds = cli(*args, home=tmp_path / "home", endpoint=hanging_s3.endpoint)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "S3" in errors[0], errors
        assert seconds < 3 + 12, seconds  # the retry budget, plus the process's start (model load for embed)
        print(f"{args[0]} against a hung store: exit {proc.returncode} after {seconds:.1f} s: {errors[0]}")
    hanging_s3.resume()
    assert load_current(open_store(root)) == before  # CURRENT untouched, still whole
