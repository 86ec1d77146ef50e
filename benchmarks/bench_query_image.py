"""What a user waits for when searching by photo: an image query through the HTTP gateway, one client, the router
embedding it (decode, the model's forward, the search) — with the model on torch (how it ran before the inference
runtimes) and on the runtime `auto` chooses, two stacks up at once, requests alternating between them so the
host's drift falls on both alike.

Builds a catalogue of generated JPEGs (real photos made into copies), embeds it, builds a one-shard index, starts
two stacks (router searching in its own process + gateway; IMSEARCH_RUNTIME=torch and =auto for their routers)
and posts the same JPEGs to both. Prints p50/p99 of each and the ratio of the p50s.

    python -m benchmarks.bench_query_image [--images 200] [--queries 60] [--photo-px 640]
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.bench_embed import make_catalogue
from services.common.config import Settings
from services.embedder.pipeline import embed_catalogue
from services.indexer.build import build_index
from services.stack.stack import Stack, StackSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200, help="catalogue size")
    ap.add_argument("--queries", type=int, default=60, help="timed queries per stack")
    ap.add_argument("--photo-px", type=int, default=640, help="long side of the JPEGs (catalogue and queries)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        make_catalogue(tmp / "images", args.images, args.photo_px)
        settings = Settings(home=tmp / "home")
        embed_catalogue(str(tmp / "images"), str(tmp / "emb"), engine="local", settings=settings)
        build_index(str(tmp / "emb"), str(tmp / "idx"), shards=1, settings=settings)
        queries = [p.read_bytes() for p in sorted((tmp / "images").iterdir())]
        env = {"IMSEARCH_HOME": str(tmp / "home"), "IMSEARCH_MODEL_CACHE_DIR": str(settings.model_cache())}
        runtimes = ("torch", "auto")
        stacks = {r: Stack(StackSpec(str(tmp / "idx"), in_process=True, gateway=True, env=env,
                                     router_env={"IMSEARCH_RUNTIME": r}), tmp / f"stack-{r}") for r in runtimes}
        try:
            for stack in stacks.values():
                stack.up()
            times = measure(stacks, queries, args.queries)
        finally:
            for stack in stacks.values():
                stack.down()
        said = {r: runtime_line(tmp / f"stack-{r}") for r in runtimes}
    p50 = {r: float(np.percentile(times[r], 50)) for r in runtimes}
    print(f"image query through the gateway, 1 client, {args.photo_px} px JPEGs, {args.images} images, "
          f"{args.queries} queries each, alternating:")
    for r in runtimes:
        print(f"  IMSEARCH_RUNTIME={r} ({said[r]}): p50 {p50[r]:.1f} ms, p99 {np.percentile(times[r], 99):.1f} ms")
    print(f"  auto ÷ torch p50: {p50['auto'] / p50['torch']:.2f}")


def measure(stacks: dict[str, Stack], queries: list[bytes], n: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {r: [] for r in stacks}
    with httpx.Client(timeout=60) as client:
        for i in range(n + 5):  # the first 5: warm-up (the model's first batches, connections)
            for runtime, stack in stacks.items():
                image = queries[i % len(queries)]
                start = time.perf_counter()
                answer = client.post(f"{stack.gateway.url}/v1/search", files={"image": ("q.jpg", image)},
                                     data={"k": "10"})
                spent = (time.perf_counter() - start) * 1000
                answer.raise_for_status()
                if i >= 5:
                    times[runtime].append(spent)
    return times


def runtime_line(workdir: Path) -> str:
    """What the router's log says runs its model."""
    log = (workdir / "logs" / "router.log").read_text(errors="replace")
    found = re.search(r"loaded: (\w+ \w+ on the [CG]PU)", log)
    return found.group(1) if found else "?"


if __name__ == "__main__":
    main()
