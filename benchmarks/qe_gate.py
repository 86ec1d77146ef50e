"""The query-expansion gate on real photos (README Quality, "Query expansion, gated"): category mAP and copy
detection as τ sweeps from never to always, and where the rule the build uses (services/index/gate.py) puts τ.

Both protocols as benchmarks/postprocess.py runs them, exact search on the index's own space (centred PCA 256,
learned on the whole collection as a build learns it):
* category: every photo queries all the others (relevant = same class), gated by its best hit but itself;
* copies: 800 photos as the catalogue, 200 as distractors, each query an edited copy (two edits of the
  copy-detection protocol, seed 0); μAP of the pooled top-1 scores, recall@1. An expanded query keeps its
  first round's best hit first and its hits are scored by the query itself, as searches answer them
  (expansion.answer_expanded); the last column shows the copy figures had they not.
* repeats: 200 of the catalogue photos held three times (the photo and two edited copies, seeds 1 and 2), each
  queried with its seed-0 copy: the share of its three in the top 3 — what the gate protects now that a copy's
  first hit survives expansion.
The rule's τ comes from the gate sample `imsearch embed` wrote beside the embeddings (256 photos of the
collection and one synthetic copy of each, another seed than the copy queries'), as a build learns it.
Data: ../shared/data/caltech101-dev, embedded once per model into OUT/<model>/.
Usage: python -m benchmarks.qe_gate [--data DIR] [--out DIR] [--model lite1-gem] [--neighbours 10]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from services.common.config import Settings
from services.common.images import decode_image
from services.common.store import LocalStore
from services.embedder import gatesample
from services.embedder.embeddings import read_embeddings
from services.embedder.pipeline import embed_catalogue
from services.embedder.runtime import load_embedder
from services.eval.protocols import make_copy_queries
from services.index import gate, projection
from services.searcher.expansion import answer_expanded, expand, keep_best_first, to_expand

ROOT = Path(__file__).resolve().parents[1]
TAUS = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85]


def top(queries: np.ndarray, db: np.ndarray, n: int, own: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top n (ids, scores) of each query; own: a query's own row, left out (-1: none)."""
    sims = queries @ db.T
    if own is not None:
        sims[np.arange(len(queries))[own >= 0], own[own >= 0]] = -np.inf
    ids = np.argsort(-sims, axis=1)[:, :n]
    return ids, np.take_along_axis(sims, ids, 1)


def gated(queries: np.ndarray, db: np.ndarray, tau: float, n: int, own: np.ndarray | None = None):
    """(searched queries, expanded per query, first-round ids, first-round scores) as a search runs the gate
    (own: left out, as an evaluation leaves a photo out of its own ranking)."""
    ids, scores = top(queries, db, n, own)
    expanded = to_expand(ids, scores, tau)
    out = queries.copy()
    rows = np.flatnonzero(expanded)
    out[rows] = expand(queries[rows], ids[rows], scores[rows], db[ids[rows]].reshape(-1, db.shape[1]))
    return out, expanded, ids, scores


def category_map(db: np.ndarray, labels: np.ndarray, tau: float, n: int) -> tuple[float, float]:
    own = np.arange(len(db))
    queries, expanded, first, _ = gated(db, db, tau, n, own)
    sims = queries @ db.T
    sims[own, own] = -np.inf
    rows = np.flatnonzero(expanded)
    sims[rows, first[rows, 0]] = np.inf  # an expanded query keeps its best hit first, as a search does
    rel = labels[np.argsort(-sims, axis=1)[:, :-1]] == labels[:, None]
    n_rel = rel.sum(1)
    ap = (np.cumsum(rel, 1) / np.arange(1, rel.shape[1] + 1) * rel).sum(1) / np.maximum(n_rel, 1)
    return float(ap[n_rel > 0].mean()), float(expanded.mean())


def copy_figures(cdb: np.ndarray, copies: np.ndarray, truth: np.ndarray, tau: float, n: int):
    """(μAP, recall@1, share of copies expanded, μAP and recall@1 had expanded queries kept the expanded
    ranking's first hit and scores)."""
    queries, expanded, first_ids, first_scores = gated(copies, cdb, tau, n)
    ids, scores = top(queries, cdb, 10)
    known = {int(i): cdb[i] for i in np.unique(ids)}
    rows = np.flatnonzero(expanded)
    served_scores, served_ids = scores.copy(), ids.copy()
    served_scores[rows], served_ids[rows] = answer_expanded(copies[rows], [first_scores[rows], first_ids[rows]],
                                                            [scores[rows], ids[rows]], known)
    n_copies = int((truth >= 0).sum())

    def micro_ap(first: np.ndarray, correct: np.ndarray) -> float:
        c = correct[np.argsort(-first)]
        return float((np.cumsum(c) / np.arange(1, len(c) + 1) * c).sum() / n_copies)

    served, naive = served_ids[:, 0] == truth, ids[:, 0] == truth
    return (micro_ap(served_scores[:, 0], served), float(served[truth >= 0].mean()),
            float(expanded[truth >= 0].mean()), micro_ap(scores[:, 0], naive), float(naive[truth >= 0].mean()))


def group_recall(cdb: np.ndarray, queries: np.ndarray, groups: np.ndarray, tau: float, n: int) -> float:
    """A catalogue holding each image three times (the photo and two edited copies): how many of a copy query's
    three are its top 3, as a search answers it — what finding every re-upload of an image asks."""
    searched, expanded, first_ids, first_scores = gated(queries, cdb, tau, n)
    ids, scores = top(searched, cdb, 3)
    rows = np.flatnonzero(expanded)
    ids[rows] = keep_best_first([first_scores[rows], first_ids[rows]], [scores[rows], ids[rows]])[1]
    return float(np.mean([np.isin(g, i).mean() for g, i in zip(groups, ids)]))


def embedded_copies(emb, catalogue, distractors, out: Path, seed: int = 0) -> np.ndarray:
    path = out / ("copies.npy" if seed == 0 else f"copies-{seed}.npy")
    if not path.exists():
        queries = make_copy_queries([Path(emb.uris[i]) for i in catalogue], [Path(emb.uris[i]) for i in distractors],
                                    seed=seed)
        model = load_embedder(emb.meta["model"]["name"], None, "cpu")
        size = model.spec.image_size
        pixels = [decode_image(q.image, size, 10**8, 10**8).pixels for q in queries]
        np.save(path, np.concatenate([model.embed(np.stack(pixels[i:i + 32])) for i in range(0, len(pixels), 32)]))
    return np.load(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "caltech101-dev"))
    ap.add_argument("--out", default="/tmp/imsearch-qe-gate")
    ap.add_argument("--model", default="lite1-gem")
    ap.add_argument("--neighbours", type=int, default=10)
    args = ap.parse_args()
    out, settings = Path(args.out) / args.model, Settings(home=Path(args.out) / "home", ray_min_images=10**9)
    start = time.perf_counter()
    summary = embed_catalogue(args.data, str(out / "emb"), model=args.model, engine="local", settings=settings)
    print(f"embedded with {args.model} ({summary.line()}; gate sample {summary.gate_sample}) in "
          f"{time.perf_counter() - start:.0f} s")
    emb = read_embeddings(LocalStore(out / "emb"))
    x, labels = emb.vectors, np.array([Path(u).parent.name for u in emb.uris])
    order = np.random.default_rng(1).permutation(len(x))
    catalogue, distractors = order[:800], order[800:1000]
    copies = embedded_copies(emb, catalogue, distractors, out)
    truth = np.array(list(range(len(catalogue))) + [-1] * len(distractors))
    space = projection.train(x, 256, 0.0).apply
    db, cdb, cq = space(x), space(x[catalogue]), space(copies)
    # three of each of 200 photos: the photo and copies of seeds 1 and 2; queried with the seed-0 copies
    twice = [space(embedded_copies(emb, catalogue[:200], [], out, seed)) for seed in (1, 2)]
    gdb = np.concatenate([cdb] + twice)
    groups = np.stack([np.arange(200), 800 + np.arange(200), 1000 + np.arange(200)], 1)
    sample = gatesample.read(LocalStore(out / "emb"))
    learned = gate.learn(space(sample.originals), space(sample.copies))
    scores = gate.copy_scores(space(sample.originals), space(sample.copies))
    print(f"{len(x)} photos, {len(set(labels))} classes; copies: {len(catalogue)} catalogue, {len(distractors)} "
          f"distractors; αQE {args.neighbours} neighbours")
    print(f"rule: τ = the {gate.QUANTILE:.0%} quantile of {len(scores)} synthetic copies' scores with their originals"
          f" = {learned.tau:.3f} (their median {np.median(scores):.3f})\n")
    print("| τ (expand when the best hit scores below) | category mAP | category queries expanded | copy μAP | "
          "copy recall@1 | copies expanded | copy μAP / recall@1, expansion as before (its own first hit and "
          "scores) | three of each image: in the top 3 |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [("never (qe=0)", -np.inf)] + [(f"{t:g}", t) for t in TAUS] + [("always (qe=10)", np.inf)]
    rows.append((f"**learned: {learned.tau:.3f}**", learned.tau))
    rows += [(f"{q:.0%} quantile: {np.quantile(scores, q):.3f}", float(np.quantile(scores, q)))
             for q in (0.05, 0.10, 0.20) if q != gate.QUANTILE]  # the rule's neighbours
    for name, tau in sorted(rows, key=lambda r: r[1]):
        m, e = category_map(db, labels, tau, args.neighbours)
        u, r1, ce, u_raw, r1_raw = copy_figures(cdb, cq, truth, tau, args.neighbours)
        g = group_recall(gdb, cq[:200], groups, tau, args.neighbours)
        print(f"| {name} | {m:.4f} | {e:.3f} | {u:.4f} | {r1:.4f} | {ce:.3f} | {u_raw:.4f} / {r1_raw:.4f} | "
              f"{g:.4f} |", flush=True)


if __name__ == "__main__":
    main()
