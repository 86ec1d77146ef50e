"""Post-processing of the model's vectors on real photos (README "Post-processing"): each row is the
product's own code (services.index.projection, services.index.descriptors) applied to one set of
embeddings, scored two ways, because image search is used for both:

* category retrieval (classes protocol): every photo queries all the others, relevant = same class;
  full-ranking mAP and P@1, exact search;
* near-duplicate retrieval (copy detection): 800 catalogue photos, 200 held out as distractors; each
  query an edited copy (two of crop, rescale, JPEG q30, rotation, colour, mirror, blur, text); μAP of
  the top-1 scores pooled, recall@1.

The projection is learned on the whole catalogue, as `imsearch index build` learns it.
Data: ../shared/data/caltech101-dev (50 classes, 2,608 photos), embedded once per model into OUT/<model>/
(the embedding's img/s is printed when it runs: the backbone's speed on this machine).
Usage: python -m benchmarks.postprocess [--data DIR] [--out DIR] [--model lite0-gem|lite1-gem|lite2-gem|...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from services.common.config import Settings
from services.common.images import decode_image
from services.common.store import LocalStore
from services.embedder.embeddings import read_embeddings
from services.embedder.pipeline import embed_catalogue
from services.embedder.runtime import load_embedder
from services.eval.protocols import make_copy_queries
from services.index import descriptors, projection

ROOT = Path(__file__).resolve().parents[1]
ROWS = [  # (label, pca dims (0: none), whitening power, DBA neighbours, αQE neighbours)
    ("as the model gives them (GeM p=3, L2)", 0, 0.0, 0, 0),
    *[(f"centred PCA {d}", d, 0.0, 0, 0) for d in (384, 256, 192, 128, 64)],
    *[(f"centred PCA {d}, whitening power {a:g}", d, a, 0, 0) for d in (256, 128) for a in (0.25, 0.5, 1.0)],
    ("centred PCA 256 + αQE 5", 256, 0.0, 0, 5),
    ("centred PCA 128 + αQE 5", 128, 0.0, 0, 5),
    ("centred PCA 128 + DBA 10", 128, 0.0, 10, 0),
    ("centred PCA 128 + DBA 10 + αQE 10", 128, 0.0, 10, 10),
]


def class_scores(db: np.ndarray, queries: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(mAP, P@1): every row queries all the others."""
    sims = queries @ db.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1)[:, :-1]
    rel = labels[order] == labels[:, None]
    n_rel = rel.sum(1)
    precision = np.cumsum(rel, 1) / np.arange(1, rel.shape[1] + 1)
    ap = (precision * rel).sum(1) / np.maximum(n_rel, 1)
    return float(ap[n_rel > 0].mean()), float(rel[:, 0].mean())


def copy_scores(db: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(μAP, recall@1) of top-1 predictions pooled by score; truth -1 marks a distractor."""
    sims = queries @ db.T
    correct = sims.argmax(1) == truth
    c = correct[np.argsort(-sims.max(1))]
    n_copies = int((truth >= 0).sum())
    return float((np.cumsum(c) / np.arange(1, len(c) + 1) * c).sum() / n_copies), float(correct[:n_copies].mean())


def expand(db: np.ndarray, queries: np.ndarray, n: int, exclude_self: bool) -> np.ndarray:
    """αQE with the n best database vectors of each query (itself left out when the query is in db)."""
    sims = queries @ db.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    top = np.argsort(-sims, axis=1)[:, :n]
    return descriptors.alpha_qe(queries, db[top], np.take_along_axis(sims, top, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "caltech101-dev"))
    ap.add_argument("--out", default="/tmp/imsearch-postprocess")
    ap.add_argument("--model", default="lite0-gem")
    args = ap.parse_args()
    out, settings = Path(args.out) / args.model, Settings(home=Path(args.out) / "home", ray_min_images=10**9)
    if not (out / "emb" / "embeddings.json").exists():
        start = time.perf_counter()
        summary = embed_catalogue(args.data, str(out / "emb"), model=args.model, engine="local", settings=settings)
        print(f"embedded with {args.model}: {summary.embedded_now / (time.perf_counter() - start):.1f} img/s "
              "(decode + model, this machine)")
    emb = read_embeddings(LocalStore(out / "emb"))
    x, labels = emb.vectors, np.array([Path(u).parent.name for u in emb.uris])
    order = np.random.default_rng(1).permutation(len(x))
    catalogue, distractors = order[:800], order[800:1000]
    copies_file = out / "copies.npy"
    if not copies_file.exists():
        queries = make_copy_queries([Path(emb.uris[i]) for i in catalogue], [Path(emb.uris[i]) for i in distractors])
        model = load_embedder(emb.meta["model"]["name"], None, "cpu")
        size = model.spec.image_size
        pixels = [decode_image(q.image, size, 10**8, 10**8).pixels for q in queries]
        np.save(copies_file, np.concatenate([model.embed(np.stack(pixels[i:i + 32]))
                                             for i in range(0, len(pixels), 32)]))
    copies = np.load(copies_file)
    truth = np.array(list(range(len(catalogue))) + [-1] * len(distractors))
    print(f"{len(x)} photos, {len(set(labels))} classes; copy detection: {len(catalogue)} catalogue, "
          f"{len(distractors)} distractors\n")
    print("| post-processing | dims | category mAP | category P@1 | copy μAP | copy recall@1 |")
    print("|---|---|---|---|---|---|")
    for label, dims, power, dba, qe in ROWS:
        project = projection.train(x, dims, power).apply if dims else (lambda v: v)
        db, cdb = project(x), project(x[catalogue])  # the photo collection; the copy-detection catalogue
        if dba:
            db, cdb = descriptors.dba(db, dba), descriptors.dba(cdb, dba)
        queries, copy_queries = project(x), project(copies)
        if qe:
            queries, copy_queries = expand(db, queries, qe, True), expand(cdb, copy_queries, qe, False)
        m, p1 = class_scores(db, queries, labels)
        u, r1 = copy_scores(cdb, copy_queries, truth)
        print(f"| {label} | {dims or x.shape[1]} | {m:.4f} | {p1:.4f} | {u:.4f} | {r1:.4f} |", flush=True)

if __name__ == "__main__":
    main()
