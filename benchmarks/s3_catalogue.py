"""The ingestion commands end to end on a catalogue in S3 (moto's S3 server on loopback, the minio
client), timing each step:

  embed s3://catalogue/images → s3://catalogue/emb (killed midway with SIGKILL, then rerun),
  index build → index add (a second batch of images) → index delete → index rollback.

The images are JPEG variants of scikit-image's photos. --model tiny uses a small timm backbone
with random weights (see bench_ingest) so 10k images take minutes here; lite0-gem works the same.
Usage: python -m benchmarks.s3_catalogue [--images 10000] [--model tiny|lite0-gem]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_ingest import make_catalogue, tiny_model
from services.stack.part import free_port

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--added", type=int, default=500, help="images in the second batch (index add)")
    ap.add_argument("--model", default="tiny")
    args = ap.parse_args()
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per S3 request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "IMSEARCH_HOME": str(tmp / "home"), "IMSEARCH_S3_ENDPOINT": f"127.0.0.1:{port}",
               "IMSEARCH_S3_ACCESS_KEY": "testing", "IMSEARCH_S3_SECRET_KEY": "testing",
               "IMSEARCH_S3_REGION": "us-east-1", "IMSEARCH_PART_ROWS": "1000"}
        if args.model == "tiny":
            env.update(tiny_model(tmp))
        os.environ.update(env)
        from services.common.config import get_settings
        from services.common.store import S3Store

        get_settings.cache_clear()
        t = time.perf_counter()
        make_catalogue(tmp / "local", args.images + args.added)
        images, new = S3Store("catalogue", "images"), S3Store("catalogue", "new")
        for i in range(args.images + args.added):
            name = f"{i:06d}.jpg"
            (images if i < args.images else new).put_bytes(name, (tmp / "local" / name).read_bytes())
        print(f"uploaded {args.images} + {args.added} images to s3://catalogue in {time.perf_counter() - t:.0f}s")

        def cli(*a: str, check: bool = True) -> tuple[float, str]:
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "services.cli", *a], cwd=ROOT, env=env, capture_output=True,
                               text=True)
            if check and p.returncode != 0:
                raise SystemExit(p.stderr)
            return time.perf_counter() - t, p.stdout.strip()

        embed = ["embed", "s3://catalogue/images", "--out", "s3://catalogue/emb", "--engine", "local", "--json"]
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", *embed], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        emb = S3Store("catalogue", "emb")
        while len(emb.list("done")) < max(1, args.images // 1000 // 2):
            if proc.poll() is not None:
                raise SystemExit("embed ended before it could be killed")
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_after = time.perf_counter() - t
        seconds, out = cli(*embed)
        summary = json.loads(out)
        print(f"embed: killed (SIGKILL) after {killed_after:.0f}s, rerun {seconds:.0f}s: {summary['embedded']} "
              f"embedded of {summary['total']}, {summary['resumed']} resumed from the killed run")
        seconds, _ = cli("embed", "s3://catalogue/new", "--out", "s3://catalogue/emb-new", "--engine", "local")
        print(f"embed of the second batch: {seconds:.0f}s")
        from services.embedder.embeddings import read_embeddings

        gone = tmp / "gone.txt"
        gone.write_text("\n".join(map(str, read_embeddings(S3Store("catalogue", "emb-new")).ids[:3].tolist())))
        for step in (["index", "build", "s3://catalogue/emb", "--out", "s3://catalogue/idx", "--shards", "4"],
                     ["index", "add", "s3://catalogue/idx", "s3://catalogue/emb-new"],
                     ["index", "delete", "s3://catalogue/idx", "--ids", str(gone)],
                     ["index", "versions", "s3://catalogue/idx"], ["index", "rollback", "s3://catalogue/idx"],
                     ["info", "s3://catalogue/idx"]):
            seconds, out = cli(*step)
            print(f"$ imsearch {' '.join(step)}   ({seconds:.1f}s)\n{out}")
    server.stop()


if __name__ == "__main__":
    main()
