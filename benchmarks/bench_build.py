"""Index builds at catalogue scale (issue 20): the Ray build (one task per shard streaming its rows) against the
in-process build, with the peak RSS of every process, and the figures of a large build — time, index bytes per
vector, recall@10 at the tuned nprobe on held-out queries, QPS — with what the same settings need at 100M and 1B.

Writes an embeddings folder of N clustered 128-d vectors (a chunk at a time; kept in --work for later runs),
then runs `imsearch index build --engine E` as a subprocess per engine, sampling the RSS of it and of every
process under it (Ray's raylet, GCS and workers) every 0.2 s.

With --add M, then `imsearch index add --engine E` of M new vectors to a copy of each index built (the same
measures: the Ray add's driver holds neither the batch nor the shards).

    python -m benchmarks.bench_build --n 1000000 --engines local,ray [--add 1000000]
    python -m benchmarks.bench_build --n 10000000 --engines ray --shards 8 --search
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import psutil

from services.common.config import Settings
from services.common.store import LocalStore
from services.embedder.embeddings import read_meta, read_part, vectors_of
from services.eval.synthetic import write_embedding_chunks
from services.index.merge import merge_topk
from services.index.versions import load_current
from services.searcher.local import IndexSearcher

ROOT = Path(__file__).resolve().parents[1]
DIM, CLUSTERS, CHUNK = 128, 1000, 50_000


def centres(seed: int = 0) -> np.ndarray:
    """Clusters drawn around 50 themes: graded similarity, as real embeddings have (bench_filter's catalogue)."""
    rng = np.random.default_rng(seed)
    themes = rng.normal(size=(50, DIM)).astype(np.float32)
    return themes[rng.integers(0, 50, CLUSTERS)] + 0.8 * rng.normal(size=(CLUSTERS, DIM)).astype(np.float32)


def vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = centres()[rng.integers(0, CLUSTERS, n)] + 0.6 * rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def catalogue(work: Path, n: int, first_row: int = 0) -> Path:
    """n vectors whose rows (hence ids) start at first_row: a later batch of the same catalogue when not 0."""
    emb = work / (f"emb-{n}" if not first_row else f"emb-{n}-from-{first_row}")
    if not (emb / "embeddings.json").exists():
        t = time.perf_counter()
        seed = 1 + first_row // CHUNK
        chunks = (vectors(min(CHUNK, n - s), seed=seed + s // CHUNK) for s in range(0, n, CHUNK))
        write_embedding_chunks(emb, chunks, DIM, part_rows=CHUNK, first_row=first_row)
        print(f"# wrote {n} vectors in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return emb


class PeakRss(threading.Thread):
    """Peak RSS of a process and of every process under it, by role."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.root, self.peaks, self.total, self.stop = psutil.Process(pid), {}, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for p in procs:
                try:
                    rss, role = p.memory_info().rss, self.role(p)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total += rss
                self.peaks[role] = max(self.peaks.get(role, 0), rss)
            self.total = max(self.total, total)
            time.sleep(0.2)

    def role(self, p: psutil.Process) -> str:
        if p.pid == self.root.pid:
            return "driver"
        name = " ".join(p.cmdline())
        if "sample_and_train" in name:
            return "ray training worker"
        for role in ("raylet", "gcs_server", "build_shard", "add_shard", "default_worker", "dashboard", "RuntimeEnv"):
            if role in name or role in p.name():
                return "ray worker" if role in ("build_shard", "add_shard", "default_worker") else f"ray {role}"
        return "other"


def run(cmd: list[str], home: Path, what: str) -> tuple[float, PeakRss, str]:
    """An imsearch command as a subprocess: (seconds, its processes' peak RSS, its stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", *cmd], cwd=ROOT,
                            env={**os.environ, "IMSEARCH_HOME": str(home)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    rss = PeakRss(proc.pid)
    rss.start()
    out_, err = proc.communicate()
    seconds = time.perf_counter() - start
    rss.stop.set()
    if proc.returncode:
        raise SystemExit(f"{what} failed:\n{err[-3000:]}")
    return seconds, rss, out_


def peaks(rss: PeakRss) -> dict:
    return {"peak_rss_mib": {role: round(v / 2**20) for role, v in sorted(rss.peaks.items())},
            "peak_rss_total_mib": round(rss.total / 2**20)}


def build(emb: Path, out: Path, engine: str, shards: int, home: Path) -> dict:
    seconds, rss, out_ = run(["index", "build", str(emb), "--out", str(out), "--shards", str(shards), "--engine",
                              engine, "--json"], home, f"{engine} build")
    manifest = json.loads(out_)
    return {"engine": engine, "seconds": round(seconds, 1), **peaks(rss), "factory": manifest["factory"],
            "nprobe": manifest["nprobe"], "tuned_recall_at_10": manifest["tuning"]["recall_at_10"],
            "count": manifest["count"],
            "bytes_per_vector": round(sum(s["bytes"] for s in manifest["shards"]) / manifest["count"], 1)}


def add(index: Path, more: Path, engine: str, home: Path) -> dict:
    """`index add --engine engine` of the batch `more` to a copy of index."""
    copy = index.with_name(index.name + "-grown")
    subprocess.run(["rm", "-rf", str(copy)], check=True)
    subprocess.run(["cp", "-r", str(index), str(copy)], check=True)
    seconds, rss, out_ = run(["index", "add", str(copy), str(more), "--engine", engine], home, f"{engine} add")
    return {"engine": engine, "add_seconds": round(seconds, 1), **peaks(rss), "said": out_.strip()}


def exact_topk(emb: Path, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k over the whole catalogue, a part at a time (the catalogue need not fit in memory)."""
    store = LocalStore(emb)
    parts = []
    for i, part in enumerate(read_meta(store)["parts"]):
        table = read_part(store, part, ["id", "vector"])
        flat = faiss.IndexFlatIP(DIM)
        flat.add(vectors_of(table, DIM))
        d, rows = flat.search(queries, k)
        parts.append((i, d, table["id"].to_numpy()[rows]))
    return merge_topk(parts, k)[1]


def search_figures(index: Path, emb: Path, home: Path) -> dict:
    queries = vectors(1000, seed=10**6)  # held out: a seed no catalogue chunk uses
    truth = exact_topk(emb, queries[:200], 10)
    t = time.perf_counter()
    searcher = IndexSearcher(str(index), Settings(home=home))
    load_s = time.perf_counter() - t
    _, got, _, _ = searcher.search_arrays(queries[:200], 10, with_uris=False)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), truth.tolist())])
    t, done = time.perf_counter(), 0
    while time.perf_counter() - t < 5:
        for q in queries[:100]:
            searcher.search_arrays(q[None, :], 10, with_uris=False)
        done += 100
    single = done / (time.perf_counter() - t)
    t, done = time.perf_counter(), 0
    while time.perf_counter() - t < 5:
        searcher.search_arrays(queries, 10, with_uris=False)
        done += len(queries)
    batch = done / (time.perf_counter() - t)
    rss = psutil.Process().memory_info().rss
    return {"load_seconds": round(load_s, 1), "held_out_recall_at_10": round(float(recall), 4),
            "qps_single": round(single), "qps_batch_1000": round(batch), "searcher_rss_mib": round(rss / 2**20)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--engines", default="local,ray")
    ap.add_argument("--work", type=Path, default=Path("/tmp/imsearch-bench-build"))
    ap.add_argument("--search", action="store_true", help="also load the last index built: recall, QPS")
    ap.add_argument("--add", type=int, default=0, help="then add this many new vectors to each index built")
    args = ap.parse_args()
    emb = catalogue(args.work, args.n)
    results = {}
    for engine in args.engines.split(","):
        out = args.work / f"idx-{args.n}-{engine}"
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        results[engine] = build(emb, out, engine, args.shards, args.work / "home")
        print(json.dumps({"n": args.n, **results[engine]}), flush=True)
    if {"local", "ray"} <= set(results):
        print(json.dumps({"n": args.n, "ray_time_over_local": round(results["ray"]["seconds"] /
                                                                    results["local"]["seconds"], 2),
                          "ray_driver_rss_over_local": round(results["ray"]["peak_rss_mib"]["driver"] /
                                                             results["local"]["peak_rss_mib"]["driver"], 2)}))
    if args.add:
        more = catalogue(args.work, args.add, first_row=args.n)
        added = {e: add(args.work / f"idx-{args.n}-{e}", more, e, args.work / "home") for e in results}
        for engine, row in added.items():
            print(json.dumps({"n": args.n, "added": args.add, **row}), flush=True)
        if {"local", "ray"} <= set(added):
            print(json.dumps({"added": args.add, "ray_add_time_over_local": round(
                added["ray"]["add_seconds"] / added["local"]["add_seconds"], 2), "ray_add_driver_rss_over_local": round(
                added["ray"]["peak_rss_mib"]["driver"] / added["local"]["peak_rss_mib"]["driver"], 2)}))
    if args.search:
        m = load_current(LocalStore(out))
        per_vector = results[engine]["bytes_per_vector"]
        print(json.dumps({"n": args.n, "index": m.factory, **search_figures(out, emb, args.work / "home"),
                          "index_gib_at": {f"{n:.0e}": round(per_vector * n / 2**30, 1) for n in (1e8, 1e9)}}))


if __name__ == "__main__":
    main()
