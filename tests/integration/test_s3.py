"""The full embed -> index -> search path against a real S3-protocol server (moto), via minio."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common.config import get_settings
from services.common.errors import NotFound, Unavailable
from services.common.store import S3Store, open_store
from services.embedder.embeddings import read_embeddings
from services.embedder.pipeline import embed_catalogue
from services.index.versions import load_current
from services.indexer.build import build_index
from services.searcher.local import IndexSearcher
from tests.helpers import encode, pattern

ROOT = Path(__file__).resolve().parents[2]


def test_store_protocol_on_s3(s3, settings):
    store = open_store("s3://bucket-a/some/prefix", settings)
    store.put_bytes("x/one.bin", b"1")
    store.put_bytes("x/two.bin", b"22")
    store.put_bytes("y.bin", b"333")
    assert store.get_bytes("x/two.bin") == b"22"
    assert store.list() == ["x/one.bin", "x/two.bin", "y.bin"]
    assert store.list("x") == ["x/one.bin", "x/two.bin"]
    assert store.exists("y.bin") and not store.exists("nope")
    with pytest.raises(NotFound):
        store.get_bytes("nope")
    store.delete("y.bin")
    assert not store.exists("y.bin")
    assert store.child("x").list() == ["one.bin", "two.bin"]


def test_embed_index_search_on_s3(s3, settings, tmp_path):
    images = S3Store("catalogue", "images", settings)
    for i in range(12):
        images.put_bytes(f"img-{i:02d}.png", encode(pattern(96, 80, seed=i)))
    images.put_bytes("broken.jpg", b"not really a jpeg")
    images.put_bytes("notes.txt", b"ignored: not an image extension")

    summary = embed_catalogue("s3://catalogue/images", "s3://work/emb/run-1", settings=settings)
    assert (summary.total, summary.embedded, summary.skipped) == (13, 12, 1)
    assert "not an image" in summary.line()

    manifest = build_index("s3://work/emb/run-1", "s3://work/idx", shards=3, settings=settings)
    assert manifest.count == 12 and len(manifest.shards) == 3
    assert load_current(open_store("s3://work/idx", settings)).version == manifest.version

    searcher = IndexSearcher("s3://work/idx", settings)
    query = encode(pattern(96, 80, seed=5).resize((80, 66)))  # a rescaled copy (on these synthetic block
    # images Lite1 is JPEG-sensitive: README "Backbones"; JPEG copies of real photos are in copydetect)
    hits = searcher.search(searcher.embed_images([query]), k=5)[0]
    assert hits[0].uri == "s3://catalogue/images/img-05.png"
    assert hits[0].score > hits[1].score
    assert {h.shard for h in hits} <= {0, 1, 2}


def test_s3_server_down_is_a_clear_unavailable_error_after_the_retries(s3, monkeypatch):
    monkeypatch.setenv("IMSEARCH_S3_RETRY_S", "1.5")
    get_settings.cache_clear()
    store = open_store("s3://bucket-b/p", get_settings())
    store.put_bytes("k", b"v")
    s3.stop()
    start = time.monotonic()
    with pytest.raises(Unavailable, match="cannot reach S3"):
        store.get_bytes("k")
    assert 1.0 < time.monotonic() - start < 15  # retried with backoff, then gave up


def test_embed_survives_the_s3_server_going_away_for_a_few_seconds(s3, tmp_path):
    """The embed job (a real process) writes to S3; the server stops mid-run and comes back."""
    src = tmp_path / "catalogue"
    src.mkdir()
    for i in range(60):
        (src / f"img-{i:03d}.png").write_bytes(encode(pattern(64, 48, seed=i)))
    env = {**os.environ, "IMSEARCH_HOME": str(tmp_path / "home"), "IMSEARCH_PART_ROWS": "5"}
    cmd = [sys.executable, "-m", "services.cli", "embed", str(src), "--out", "s3://work/emb", "--engine", "local",
           "--json"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = S3Store("work", "emb", get_settings())
    deadline = time.monotonic() + 240
    while (done := len(store.list("done"))) < 2:  # wait for real progress before pulling the plug
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    s3.stop()
    assert done <= 12 - 3, done  # the outage lands mid-run: chunks were still to be written to S3 (not only ...
    assert proc.poll() is None  # ... a run that had finished: with the model on OpenVINO 60 images take ~1 s)
    time.sleep(3)  # the outage itself
    s3.restart()
    out, errs = proc.communicate(timeout=300)
    assert proc.returncode == 0, errs
    assert json.loads(out)["embedded"] == 60
    emb = read_embeddings(store)
    assert len(set(emb.ids.tolist())) == 60


def _build_while_s3_stops(s3, emb: Path, home: Path, down_s: float, retry_s: str) -> subprocess.CompletedProcess:
    """`imsearch index build EMB --out s3://work/idx` in a process; the S3 server stops right before the
    build starts writing (after tuning) and comes back after down_s seconds."""
    env = {**os.environ, "IMSEARCH_HOME": str(home), "IMSEARCH_S3_RETRY_S": retry_s}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "index", "build", str(emb), "--shards", "2",
                             "--out", "s3://work/idx"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # the build reports its steps; writing starts after the nprobe line
        seen.append(line)
        if "nprobe" in line:
            s3.stop()
            break
    time.sleep(down_s)
    s3.restart()
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "".join(seen) + err)


def test_publishing_while_the_s3_server_is_down(s3, tmp_path):
    from tests.helpers import random_unit_vectors, write_fake_embeddings

    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(30_000, 64, seed=4, clusters=30))
    store = open_store("s3://work/idx")
    build_index(str(tmp_path / "emb"), "s3://work/idx", shards=2, version="v1")
    # a short outage while the new version is written: the writes retry, then it is published
    ok = _build_while_s3_stops(s3, tmp_path / "emb", tmp_path / "home", 3.0, "30")
    assert ok.returncode == 0, ok.stderr
    v2 = load_current(store)
    assert v2.version != "v1"
    IndexSearcher("s3://work/idx")  # every shard downloads and verifies against the manifest's sha256
    # an outage longer than the retry budget: a clear error, and CURRENT still names a complete version
    failed = _build_while_s3_stops(s3, tmp_path / "emb", tmp_path / "home", 15.0, "1")  # > urllib3 + ours
    assert failed.returncode == 2 and "error: cannot reach S3 server" in failed.stderr, failed.stderr
    assert load_current(store).version == v2.version
    searcher = IndexSearcher("s3://work/idx")
    assert searcher.manifest.count == 30_000


def test_put_if_is_a_compare_and_swap_on_the_s3_server(s3, settings):
    from services.common.errors import Conflict

    store = open_store("s3://cas/prefix", settings)
    store.put_if("CURRENT", b"one", None)  # If-None-Match: * creates it
    with pytest.raises(Conflict):
        store.put_if("CURRENT", b"again", None)  # ... only once
    data, token = store.get_versioned("CURRENT")
    store.put_if("CURRENT", b"two", token)  # If-Match the ETag read
    with pytest.raises(Conflict):
        store.put_if("CURRENT", b"three", token)  # the ETag moved on: refused
    assert store.get_bytes("CURRENT") == b"two" and data == b"one"
    assert store.modified("CURRENT") > time.time() - 60
    store.put_bytes("dir/a", b"a")
    store.put_bytes("dir/sub/b", b"b")
    store.delete_prefix("dir")
    assert store.list() == ["CURRENT"]


def test_on_s3_a_shard_server_caches_only_the_versions_it_serves_and_writers_keep_no_copies(s3, settings, tmp_path):
    """Every shard file ever downloaded stayed in IMSEARCH_HOME/cache: each version a shard server followed,
    each version an `index add` loaded, each version a publish checked."""
    import asyncio

    from services.common.filecache import cached_path
    from services.index.shards import shard_files
    from services.index.versions import rollback
    from services.indexer.update import add_to_index
    from services.searcher.localshards import LocalShards, load
    from tests.helpers import random_unit_vectors, write_fake_embeddings

    root, store, cache = "s3://work/idx", open_store("s3://work/idx", settings), settings.home / "cache"
    for n in range(3):
        write_fake_embeddings(tmp_path / f"emb{n}", random_unit_vectors(2_000, 32, seed=n), first_row=2_000 * n)

    def cached() -> set[str]:
        return {p.name for p in cache.iterdir()} if cache.is_dir() else set()

    def shard_0(manifest) -> set[str]:
        return {cached_path(cache, key, sha).name for key, sha in shard_files(manifest, manifest.shards[:1])}

    build_index(str(tmp_path / "emb0"), root, shards=2, settings=settings)
    v1 = load_current(store)
    assert cached() == set()  # a build writes its files and downloads none
    shards = LocalShards(load(root, 0, settings), root, 0, settings)
    assert cached() == shard_0(v1)
    versions = [v1]
    for n in (1, 2):
        before = cached()
        add_to_index(root, str(tmp_path / f"emb{n}"), settings)
        assert cached() == before  # the add loaded both shards, and kept none of those it downloaded
        versions.append(load_current(store))
        asyncio.run(shards.follow())
        assert set(shards.follower.held()) == {m.version for m in versions[-2:]}
        assert cached() == shard_0(versions[-2]) | shard_0(versions[-1])  # served: the newest and the one before
    assert len(shard_0(versions[0]) | shard_0(versions[1]) | shard_0(versions[2])) == 3  # every add changed it
    before = cached()
    assert rollback(store, cache).version == versions[1].version  # checks both of its shard files first
    assert cached() == before  # shard 1's, downloaded for the check, not kept
    shards.pool.shutdown()


class StrippingProxy:
    """An HTTP proxy in front of the S3 test server that drops If-Match and If-None-Match: what an S3-compatible
    server without conditional writes, or a proxy that strips the headers, does to them."""

    def __init__(self, upstream: str):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        host, port = upstream.rsplit(":", 1)

        class Handler(BaseHTTPRequestHandler):
            def forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("if-match", "if-none-match")}
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                conn.request(self.command, self.path, body or None, headers)
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                for k, v in reply.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_writers_refuse_an_s3_server_that_ignores_conditional_writes(s3, tmp_path, monkeypatch):
    """Before: the conditional PUTs of every compare-and-swap were sent and their effect assumed: behind a server
    that ignores them, two concurrent changes both 'succeeded' and one was silently lost."""
    from services.common.errors import NotSupported
    from tests.helpers import random_unit_vectors, write_fake_embeddings

    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(200, 8, seed=1))
    proxy = StrippingProxy(s3.endpoint)
    try:
        monkeypatch.setenv("IMSEARCH_S3_ENDPOINT", proxy.endpoint)
        get_settings.cache_clear()
        with pytest.raises(NotSupported, match=f"S3 server {proxy.endpoint} ignores conditional writes"):
            build_index(str(tmp_path / "emb"), "s3://strip/idx", settings=get_settings())
        assert open_store("s3://strip/idx", get_settings()).list() == []  # nothing written, no probe left
    finally:
        proxy.close()
    monkeypatch.setenv("IMSEARCH_S3_ENDPOINT", s3.endpoint)
    get_settings.cache_clear()
    build_index(str(tmp_path / "emb"), "s3://strip/idx", settings=get_settings())  # the server itself takes it
    assert load_current(open_store("s3://strip/idx", get_settings())).count == 200
