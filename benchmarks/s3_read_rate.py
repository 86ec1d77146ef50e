"""The S3 catalogue read rate: imsearch's read path (read_uri: the shared per-process minio client with
bounded timeouts, retries and the operation budget) against a bare minio-client loop over the same
objects, in one run, against moto's S3 server in its own process on loopback. Rounds alternate so that
drift in the server hits both alike; the figure is the median of each.

The target is a ratio of at least 0.9 (one thread and 8 threads). For context it also times the old read
path: a new Minio client per image, with the bucket-region round trip that comes with it.
Usage: python -m benchmarks.s3_read_rate [--objects 400] [--rounds 5] [--threads 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from minio import Minio

from benchmarks.bench_ingest import make_catalogue
from services.stack.stack import s3_part

KEYS = {"IMSEARCH_S3_ACCESS_KEY": "testing", "IMSEARCH_S3_SECRET_KEY": "testing"}


def rate(read, names: list[str], threads: int) -> float:
    """Objects per second reading every name once."""
    t = time.perf_counter()
    if threads == 1:
        total = sum(len(read(n)) for n in names)
    else:
        with ThreadPoolExecutor(threads) as pool:
            total = sum(len(b) for b in pool.map(read, names))
    assert total > 0
    return len(names) / (time.perf_counter() - t)


def get(client: Minio, name: str) -> bytes:
    r = client.get_object("catalogue", name)
    try:
        return r.read()
    finally:
        r.close()
        r.release_conn()


def bare_reader(endpoint: str):
    """The plain minio-client loop: one client, get_object, read, release."""
    client = Minio(endpoint, access_key="testing", secret_key="testing", secure=False)
    return lambda name: get(client, name)


def old_reader(endpoint: str):
    """What read_uri did before: a new client for every object."""
    return lambda name: get(Minio(endpoint, access_key="testing", secret_key="testing", secure=False), name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server = s3_part("moto", tmp).start()
        try:
            endpoint = server.address
            os.environ.update({"IMSEARCH_S3_ENDPOINT": endpoint, "IMSEARCH_HOME": str(tmp / "home"), **KEYS})
            from services.common.config import get_settings
            from services.common.store import S3Store, read_uri

            get_settings.cache_clear()
            make_catalogue(tmp / "local", args.objects)
            names = sorted(p.name for p in (tmp / "local").iterdir())
            store = S3Store("catalogue", "")
            for n in names:
                store.put_bytes(n, (tmp / "local" / n).read_bytes())
            size = sum((tmp / "local" / n).stat().st_size for n in names) / len(names)
            print(f"{len(names)} JPEGs of {size / 1024:.0f} KiB on average in moto's S3 server ({endpoint}); "
                  f"{args.rounds} alternating rounds, median objects/s")

            bare = bare_reader(endpoint)

            def ours(name: str) -> bytes:
                return read_uri(f"s3://catalogue/{name}")

            for threads in (1, args.threads):
                rate(bare, names[:20], threads), rate(ours, names[:20], threads)  # warm both pools
                got: dict[str, list[float]] = {"bare": [], "ours": []}
                for _ in range(args.rounds):
                    got["bare"].append(rate(bare, names, threads))
                    got["ours"].append(rate(ours, names, threads))
                b, o = statistics.median(got["bare"]), statistics.median(got["ours"])
                old = rate(old_reader(endpoint), names, threads)
                print(f"threads={threads}: bare minio loop {b:.0f}/s, imsearch read_uri {o:.0f}/s, "
                      f"ratio {o / b:.2f} (target >= 0.9); a client per image (before) {old:.0f}/s")
                if o / b < 0.9:
                    print("  below target", file=sys.stderr)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
