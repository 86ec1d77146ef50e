"""Embedding pipeline throughput vs the raw model forward pass (same model, batch, device, size), per engine.

The pipeline reads files, hashes, decodes, resizes, embeds and writes parquet; the baseline
embeds the same images already decoded in memory. Prints images/s of each and their ratios: pipeline ÷ raw
forward per engine, and Ray ÷ in-process when both engines run. A Ray run includes starting its model actors
(each run starts its own, as `imsearch embed` does); the Ray instance is started once by the warm-up, as the
in-process engine's imports are.
--photo-px: the long side of the generated JPEGs (320: catalogue thumbnails; 1400: ~1.4-megapixel photos).
--runtime: what runs the model (IMSEARCH_RUNTIME: auto, onnxruntime, torch) in both the pipeline and its baseline;
--compare-runtimes: first the model's forward on each runtime, the same decoded images, rounds alternating:
img/s, the ratio to torch, and the largest difference of any descriptor component from torch's.
Usage: python -m benchmarks.bench_embed [--images 256] [--batch 32] [--engines local[,ray]] [--rounds 3]
       [--models lite0-gem,lite1-gem,lite2-gem] [--photo-px 640] [--runtime auto] [--compare-runtimes]
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
from services.common.transforms import random_copy
from services.embedder.models import torch_embedder
from services.embedder.pipeline import embed_catalogue
from services.embedder.runtime import RUNNERS, embedder_for, exported, installed_runtimes
from services.embedder.stages import decode_batch
from services.eval.datasets import flatten, skimage_photos


def make_catalogue(folder: Path, n: int, long_side: int = 640) -> None:
    """n distinct JPEGs with a long side of long_side px, made from scikit-image's photos by random edits
    (an edit can repeat an earlier file exactly, e.g. JPEG q30 of the same photo: the pipeline would skip
    it)."""
    rng = np.random.default_rng(0)
    photos = [flatten(p.path) for p in skimage_photos()]
    folder.mkdir(parents=True)
    seen: set[bytes] = set()
    i = 0
    while len(seen) < n:
        img, _ = random_copy(photos[i % len(photos)], rng, n_edits=2)
        scale = long_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
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
    ap.add_argument("--engines", "--engine", default="local", help="comma-separated: local, ray")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--photo-px", type=int, default=640, help="long side of the generated JPEGs")
    ap.add_argument("--runtime", default="auto", help="IMSEARCH_RUNTIME of the pipeline and its baseline")
    ap.add_argument("--compare-runtimes", action="store_true", help="torch vs each inference runtime, forward first")
    ap.add_argument("--models", default=Settings.model_fields["model"].default,
                    help="comma-separated; each is timed on the same images, and its speed given as a ratio to "
                         "the first")
    args = ap.parse_args()
    engines = args.engines.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_catalogue(tmp / "images", args.images, args.photo_px)
        first = None
        for model in args.models.split(","):
            if args.compare_runtimes:
                compare_runtimes(model, tmp, args)
            raw, pipes, size, device = run_model(model, tmp, args, engines)
            cores = os.cpu_count() or 1
            print(f"model {model}, {size}px, batch {args.batch}, device {device}, {args.images} JPEGs of "
                  f"{args.photo_px} px (long side), {args.rounds} alternating round(s)")
            print(f"raw forward {np.median(raw):.1f} img/s")
            for engine in engines:
                speed = float(np.median(pipes[engine]))
                first = first or speed
                ratios = [p / r for p, r in zip(pipes[engine], raw)]
                print(f"{engine}: pipeline {speed:.1f} img/s ({speed / cores:.1f} per core); pipeline ÷ raw forward "
                      f"{np.median(ratios):.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)}); "
                      f"speed vs the first model: {speed / first:.2f}", flush=True)
            if len(engines) > 1:
                ratios = [r / lo for r, lo in zip(pipes[engines[1]], pipes[engines[0]])]
                print(f"{engines[1]} ÷ {engines[0]}: {np.median(ratios):.2f} (rounds: "
                      f"{', '.join(f'{x:.2f}' for x in ratios)})", flush=True)


def compare_runtimes(model: str, tmp: Path, args) -> None:
    """The model's forward on torch and on each installed inference runtime, the same decoded images, rounds
    alternating; each runtime as a ratio to torch measured in the same rounds."""
    settings = Settings(home=tmp / "home", batch_size=args.batch, model=model, device="cpu")
    runners = {"torch": torch_embedder(model, device="cpu")}
    spec = runners["torch"].spec
    path = exported(spec, settings.model_cache())
    runners.update({name: RUNNERS[name](spec, path) for name in installed_runtimes()})
    uris = np.array(sorted(str(p) for p in (tmp / "images").iterdir()), dtype=object)
    pixels = decode_batch({"uri": uris}, spec.image_size, settings)["pixels"]
    out = {name: r.embed(pixels[:args.batch]) for name, r in runners.items()}  # warm-up, and the outputs
    speeds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            start = time.perf_counter()
            for i in range(0, len(pixels), args.batch):
                runner.embed(pixels[i:i + args.batch])
            speeds[name].append(len(pixels) / (time.perf_counter() - start))
    print(f"model {model} forward, {spec.image_size}px, batch {args.batch}, {len(pixels)} images, {args.rounds} "
          f"alternating round(s): torch {np.median(speeds['torch']):.1f} img/s", flush=True)
    for name in runners:
        if name == "torch":
            continue
        diff = float(np.abs(out[name] - out["torch"]).max())
        ratios = [o / t for o, t in zip(speeds[name], speeds["torch"])]
        print(f"  {name} fp32 {np.median(speeds[name]):.1f} img/s = {np.median(ratios):.2f} x torch (rounds: "
              f"{', '.join(f'{x:.2f}' for x in ratios)}); largest descriptor difference {diff:.1e}", flush=True)


def run_model(model: str, tmp: Path, args, engines: list[str]) -> tuple[list[float], dict, int, str]:
    settings = Settings(home=tmp / "home", batch_size=args.batch, model=model, runtime=args.runtime)
    embedder = embedder_for(model, None, settings)
    size = embedder.spec.image_size
    # The baseline: the same images, already decoded in memory (content changes the forward's
    # speed a little: random pixels run ~6% faster here than photos).
    uris = np.array(sorted(str(p) for p in (tmp / "images").iterdir()), dtype=object)
    pixels = decode_batch({"uri": uris}, size, settings)["pixels"]
    embedder.embed(pixels[:args.batch])  # warm-up
    # Warm-up as for the raw loop: one-time costs (imports, first parquet write, thread pools, the Ray
    # instance) are paid once per process, not per image.
    for engine in engines:
        embed_catalogue(list(uris[:args.batch]), str(tmp / f"warm-{model}-{engine}"), engine=engine,
                        settings=settings)
    # Rounds alternate the loops so that this machine's speed drift (±15 % between minutes)
    # hits all alike; ratios are medians of the per-round ratios.
    raws, pipes = [], {e: [] for e in engines}
    for r in range(args.rounds):
        start = time.perf_counter()
        for i in range(0, args.images, args.batch):
            embedder.embed(pixels[i:i + args.batch])
        raws.append(args.images / (time.perf_counter() - start))
        for engine in engines:
            start = time.perf_counter()
            summary = embed_catalogue(str(tmp / "images"), str(tmp / f"emb-{model}-{engine}-{r}"), engine=engine,
                                      settings=settings)
            pipes[engine].append(summary.embedded / (time.perf_counter() - start))
            if summary.embedded != args.images:
                raise SystemExit(f"catalogue not fully embedded: {summary.line()}")
    return raws, pipes, size, embedder.label()


if __name__ == "__main__":
    main()
