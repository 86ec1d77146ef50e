"""How long `imsearch eval --protocol classes` takes past embedding (README "Performance"): N labelled
vectors in C classes (clustered synthetic vectors standing in for embedded photos: the ranking and the
metrics do not look at pixels) in a real sharded index; timed: ranking every image against the index at
full depth, the exact-search baseline, the metrics, per-class figures and the report (no --plots).
Usage: python -m benchmarks.eval_scale [--n 10000] [--classes 100] [--shards 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from services.common.config import Settings
from services.common.folders import LabelledImage
from services.eval import protocols, report
from services.eval.synthetic import clustered_unit_vectors, write_embeddings
from services.indexer.build import build_index
from services.searcher.local import IndexSearcher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--shards", type=int, default=2)
    args = ap.parse_args()
    x = clustered_unit_vectors(args.n, args.dim, seed=0, clusters=args.classes, noise=0.8)
    labels = [f"class-{int(c)}" for c in (x @ x[:args.classes].T).argmax(1)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.chdir(tmp)  # the synthetic catalogue's uris are relative (img/<row>.jpg)
        write_embeddings(tmp / "emb", x)
        settings = Settings(home=tmp / "home", pca_dim=0)
        build_index(str(tmp / "emb"), str(tmp / "idx"), shards=args.shards, settings=settings, step=lambda s: None)
        searcher = IndexSearcher(str(tmp / "idx"), settings)
        items = [LabelledImage(Path(f"img/{i}.jpg"), lab) for i, lab in enumerate(labels)]
        start = time.perf_counter()
        result = protocols.classes_eval(searcher, items, vectors=x)
        ranked = time.perf_counter() - start
        report.classes_report(result, tmp / "report", "eval_scale", step=lambda s: None)
        total = time.perf_counter() - start
    print(f"classes protocol, {args.n} images / {args.classes} classes, {searcher.manifest.factory} in "
          f"{args.shards} shards: metrics in {ranked:.1f} s, with the report {total:.1f} s "
          f"(mAP {result.metrics['mAP']:.4f}, exact {result.metrics['mAP_exact']:.4f})")


if __name__ == "__main__":
    main()
