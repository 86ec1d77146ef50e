"""Ingestion at catalogue scale: resume overhead, memory as the catalogue grows, Ray actor scaling.

  * resume: embed a catalogue, then run the same command again over the finished output;
    prints the rerun's time ÷ the first run's (target < 5%).
  * memory: peak RSS of an embed process over N1 vs N2 images (target: flat).
  * actors: Ray engine with 1 vs 2 model actors, images/s ratio.

The images are JPEG variants of scikit-image's photos. --model tiny uses a small timm backbone with
random weights (saved to a file: nothing is downloaded) so that 50k images run in minutes; the
pipeline around the model — listing, reading, decoding, writing, resuming — is the same code.
Usage: python -m benchmarks.bench_ingest [--images 10000] [--memory 10000,50000] [--model tiny|lite0-gem]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_catalogue(folder: Path, n: int) -> None:
    """n small JPEGs: variants of scikit-image's photos (kept small so 50k fit on disk quickly)."""
    import numpy as np

    from services.common.transforms import random_copy
    from services.eval.datasets import flatten, skimage_photos

    rng = np.random.default_rng(0)
    photos = [flatten(p.path).resize((160, 120)) for p in skimage_photos()]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / f"{i:06d}.jpg"
        if not path.exists():
            img, _ = random_copy(photos[i % len(photos)], rng, n_edits=1)
            img.convert("RGB").save(path, quality=85)


def tiny_model(tmp: Path) -> dict:
    """A small timm backbone with random weights, saved so it loads offline like any timm model."""
    import timm
    import torch

    path = tmp / "tiny.pth"
    if not path.exists():
        torch.save(timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=0).state_dict(), path)
    return {"IMSEARCH_MODEL": "timm:mobilenetv3_small_050", "IMSEARCH_MODEL_WEIGHTS": str(path)}


def embed(src: Path, out: Path, env: dict, engine: str = "local") -> tuple[float, dict, int]:
    """Run `imsearch embed` as its own process: (seconds, summary, peak RSS in MiB, read from the
    kernel's high-water mark while it runs)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "embed", str(src), "--out", str(out), "--engine",
                             engine, "--json"], cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak = max(peak, int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))))
        except (OSError, StopIteration):
            pass
        time.sleep(0.1)
    out_text, err_text = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(err_text)
    return seconds, json.loads(out_text), peak // 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--memory", default="10000,50000", help="catalogue sizes to compare peak memory at")
    ap.add_argument("--model", default="tiny", help="tiny | lite0-gem")
    ap.add_argument("--actors", action="store_true", help="also compare 1 vs 2 Ray model actors")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {"IMSEARCH_HOME": str(tmp / "home"), "IMSEARCH_PART_ROWS": "1000"}
        if args.model == "tiny":
            env.update(tiny_model(tmp))
        sizes = [int(s) for s in args.memory.split(",") if s]
        make_catalogue(tmp / "images", max([args.images, *sizes]))

        def subset(n: int) -> Path:
            listing = tmp / f"list-{n}.txt"
            listing.write_text("\n".join(str(tmp / "images" / f"{i:06d}.jpg") for i in range(n)))
            return listing

        first, summary, _ = embed(subset(args.images), tmp / "emb", env)
        again, resumed, _ = embed(subset(args.images), tmp / "emb", env)
        print(f"model {args.model}, {args.images} images: first run {first:.1f}s "
              f"({summary['embedded'] / first:.1f} img/s), rerun over the finished output {again:.2f}s "
              f"({resumed['resumed']} already done): ratio {again / first:.3f} (target < 0.05)")
        peaks = {}
        for n in sizes:
            _, _, peaks[n] = embed(subset(n), tmp / f"emb-{n}", env)
            print(f"  peak RSS embedding {n} images: {peaks[n]} MiB")
        if len(sizes) == 2:
            print(f"peak memory {sizes[1]} ÷ {sizes[0]} images: {peaks[sizes[1]] / peaks[sizes[0]]:.2f} (flat = 1.0)")
        if args.actors:
            rates = {}
            for actors in (1, 2):
                seconds, s, _ = embed(subset(args.images), tmp / f"emb-ray-{actors}",
                                      {**env, "IMSEARCH_RAY_ACTORS": str(actors)}, engine="ray")
                rates[actors] = s["embedded"] / seconds
                print(f"  Ray, {actors} model actor(s): {rates[actors]:.1f} img/s (incl. Ray start-up)")
            print(f"2 ÷ 1 actors: {rates[2] / rates[1]:.2f}")


if __name__ == "__main__":
    main()
