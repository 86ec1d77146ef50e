"""Embedding pipeline throughput vs the raw model forward pass (same model, batch, device, size).

The pipeline reads files, hashes, decodes, resizes, embeds and writes parquet; the baseline
embeds the same images already decoded in memory. Prints images/s of both and their ratio.
Usage: python -m benchmarks.bench_embed [--images 256] [--batch 32] [--engine local|ray] [--rounds 3]
       [--models lite0-gem,lite1-gem,lite2-gem]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from services.common.config import Settings
from services.embedder.models import load_embedder
from services.embedder.pipeline import embed_catalogue
from services.embedder.stages import decode_batch
from services.eval.datasets import flatten, skimage_photos
from services.eval.transforms import random_copy


def make_catalogue(folder: Path, n: int) -> None:
    """n distinct JPEGs (~640 px) made from scikit-image's photos by random edits (an edit can repeat
    an earlier file exactly, e.g. JPEG q30 of the same photo: the pipeline would skip it)."""
    rng = np.random.default_rng(0)
    photos = [flatten(p.path) for p in skimage_photos()]
    folder.mkdir(parents=True)
    seen: set[bytes] = set()
    i = 0
    while len(seen) < n:
        img, _ = random_copy(photos[i % len(photos)], rng, n_edits=2)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        if buf.getvalue() not in seen:
            seen.add(buf.getvalue())
            (folder / f"{len(seen):06d}.jpg").write_bytes(buf.getvalue())
        i += 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--engine", default="local")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default="lite0-gem", help="comma-separated; each is timed on the same images, "
                                                          "and its speed given as a ratio to the first")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_catalogue(tmp / "images", args.images)
        first = None
        for model in args.models.split(","):
            raw, pipe, ratios, size, device = run_model(model, tmp, args)
            first = first or pipe
            cores = os.cpu_count() or 1
            print(f"model {model}, {size}px, batch {args.batch}, device {device}, {args.images} images, "
                  f"engine {args.engine}")
            print(f"raw forward {raw:.1f} img/s; pipeline {pipe:.1f} img/s ({pipe / cores:.1f} img/s per core); "
                  f"ratio {np.median(ratios):.2f} (median of rounds: {', '.join(f'{x:.2f}' for x in ratios)}); "
                  f"pipeline speed vs {args.models.split(',')[0]}: {pipe / first:.2f}", flush=True)


def run_model(model: str, tmp: Path, args) -> tuple[float, float, list[float], int, str]:
    embedder = load_embedder(model, device="auto")
    size = embedder.spec.image_size
    settings = Settings(home=tmp / "home", batch_size=args.batch, model=model)
    # The baseline: the same images, already decoded in memory (content changes the forward's
    # speed a little: random pixels run ~6% faster here than photos).
    uris = np.array(sorted(str(p) for p in (tmp / "images").iterdir()), dtype=object)
    pixels = decode_batch({"uri": uris}, size, settings)["pixels"]
    embedder.embed(pixels[:args.batch])  # warm-up
    # Warm-up as for the raw loop: one-time costs (imports, first parquet write, thread pools) are
    # paid once per process, not per image.
    embed_catalogue(list(uris[:args.batch]), str(tmp / f"warm-{model}"), engine=args.engine, settings=settings)
    # Rounds alternate the two loops so that this machine's speed drift (±15 % between minutes)
    # hits both alike; the ratio reported is the median of the per-round ratios.
    raws, pipes = [], []
    for r in range(args.rounds):
        start = time.perf_counter()
        for i in range(0, args.images, args.batch):
            embedder.embed(pixels[i:i + args.batch])
        raws.append(args.images / (time.perf_counter() - start))
        start = time.perf_counter()
        summary = embed_catalogue(str(tmp / "images"), str(tmp / f"emb-{model}-{r}"), engine=args.engine,
                                  settings=settings)
        pipes.append(summary.embedded / (time.perf_counter() - start))
        if summary.embedded != args.images:
            raise SystemExit(f"catalogue not fully embedded: {summary.line()}")
    ratios = [p / r for p, r in zip(pipes, raws)]
    return float(np.median(raws)), float(np.median(pipes)), ratios, size, str(embedder.device)


if __name__ == "__main__":
    main()
