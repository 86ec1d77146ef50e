"""`imsearch eval`: pick the protocol, build an index from the data when none is given, write the report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from services.common.config import Settings
from services.common.errors import InvalidInput
from services.common.folders import class_folder, image_files
from services.common.store import open_store, read_uri
from services.embedder.embeddings import read_embeddings
from services.embedder.pipeline import embed_catalogue
from services.eval import protocols as p
from services.eval import report
from services.indexer.build import build_index
from services.searcher.local import IndexSearcher

PROTOCOLS = ("classes", "unseen-classes", "copydetect", "labelled")
DISTRACTOR_EVERY = 5  # copydetect without an index: every 5th image is held out as a distractor


@dataclass
class EvalOptions:
    protocol: str = "classes"
    index: str | None = None
    data: str | None = None
    out: Path = Path("eval-report")
    queries: str | None = None
    ground_truth: str | None = None
    distractors: str | None = None
    factory: str | None = None
    shards: int = 1
    pca: int | None = None  # projection of the index built from --data (None: the build's defaults)
    whiten: float | None = None
    depth: int | None = None
    seed: int = 0
    model: str | None = None
    predictions: int = 1
    score_norm: str = "none"
    qe: int | None = None  # αQE neighbours for every query (0: off; None: gated, as searches are)
    dba: int | None = None  # DBA neighbours of the index built from --data (None: the build's default)
    plots: bool = False  # t-SNE and UMAP maps of the vectors (minutes on thousands of images)


def prepare_index(paths: list[Path], work: Path, opts: EvalOptions, settings: Settings,
                  step: Callable[[str], None]) -> str:
    """Embed the catalogue and build a real (sharded, IVF/PQ when asked) index from it under work/."""
    step(f"embedding {len(paths)} catalogue images into {work / 'emb'}")
    embed_catalogue([str(x) for x in paths], str(work / "emb"), model=opts.model, engine="local", settings=settings)
    build_index(str(work / "emb"), str(work / "index"), opts.shards, opts.factory, settings=settings, step=step,
                dba=opts.dba, pca_dim=opts.pca, whiten=opts.whiten)
    return str(work / "index")


def stored_vectors(emb_url: str, uris: list[str], settings: Settings) -> np.ndarray | None:
    """The catalogue's own embeddings in `uris` order (saves embedding the same images again)."""
    emb = read_embeddings(open_store(emb_url, settings))
    row = {p.norm_uri(u): i for i, u in enumerate(emb.uris)}
    if not all(u in row for u in uris):
        return None  # duplicates or failed images: embed the queries instead
    return emb.vectors[[row[u] for u in uris]]


def run_eval(opts: EvalOptions, settings: Settings, step: Callable[[str], None],
             progress: Callable[[int], None] | None = None) -> dict:
    if opts.protocol not in PROTOCOLS:
        raise InvalidInput(f"unknown protocol {opts.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if opts.protocol == "labelled":
        return _labelled(opts, settings, progress)
    if not opts.data:
        raise InvalidInput(f"--data is required for the {opts.protocol} protocol")
    opts.out.mkdir(parents=True, exist_ok=True)
    if opts.protocol in ("classes", "unseen-classes"):
        items = class_folder(opts.data)
        if opts.protocol == "unseen-classes":
            check_unseen(opts.model, {it.label for it in items})
        vectors = None
        index = opts.index
        if index is None:
            index = prepare_index([it.path for it in items], opts.out / "work", opts, settings, step)
            vectors = stored_vectors(str(opts.out / "work" / "emb"), [p.norm_uri(str(it.path)) for it in items],
                                     settings)
        searcher = IndexSearcher(index, settings)
        step(f"{len(items)} queries against {searcher.manifest.count} vectors ({searcher.manifest.factory})")
        result = p.classes_eval(searcher, items, opts.depth, progress, vectors=vectors, qe=opts.qe, step=step)
        report.classes_report(result, opts.out, f"classes protocol: {opts.data}", _about(searcher, opts), step,
                              opts.plots)
        return result.metrics
    files = image_files(opts.data)
    if opts.index is None:
        catalogue = [x for i, x in enumerate(files) if i % DISTRACTOR_EVERY]
        distractors = [x for i, x in enumerate(files) if not i % DISTRACTOR_EVERY]
        index = prepare_index(catalogue, opts.out / "work", opts, settings, step)
    else:
        catalogue, index = files, opts.index
        distractors = image_files(opts.distractors) if opts.distractors else []
    if not catalogue:
        raise InvalidInput(f"no images found in {opts.data}")
    searcher = IndexSearcher(index, settings)
    skipped: dict[str, str] = {}
    queries = p.make_copy_queries(catalogue, distractors, opts.seed, skipped=skipped)
    for path, why in skipped.items():
        step(f"skipped {path}: {why}")
    step(f"{len(queries)} copy queries ({len(distractors)} distractors) against {searcher.manifest.count} vectors")
    result = p.copydetect_eval(searcher, queries, predictions=opts.predictions, score_norm=opts.score_norm,
                               progress=progress, qe=opts.qe, step=step)
    result.metrics["skipped_files"] = len(skipped)  # which and why: in metrics.json
    report.copydetect_report(result, opts.out, f"copy detection: {opts.data}",
                             _about(searcher, opts) | {"skipped_files": skipped}, step)
    return result.metrics


def check_unseen(model: str | None, labels: set[str]) -> None:
    """unseen-classes: the fine-tuned model must not have trained on any class evaluated here."""
    from services.embedder.spec import resolve_spec

    seen = set(resolve_spec(model).extra.get("train_classes", [])) if model else set()
    if seen & labels:
        raise InvalidInput(f"the model trained on {len(seen & labels)} of the classes evaluated here "
                           f"(e.g. {sorted(seen & labels)[:3]}): not an unseen-classes evaluation")


def _labelled(opts: EvalOptions, settings: Settings, progress) -> dict:
    if not (opts.index and opts.queries and opts.ground_truth):
        raise InvalidInput("the labelled protocol needs INDEX, --queries and --ground-truth")
    queries, gt = p.read_ground_truth(opts.queries, opts.ground_truth)
    searcher = IndexSearcher(opts.index, settings)
    metrics = p.labelled_eval(searcher, [(q, read_uri(u, settings)) for q, u in queries], gt, opts.depth, progress)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "metrics.json").write_text(json.dumps({"metrics": metrics, **_about(searcher, opts)}, indent=1))
    report.write_summary(opts.out, f"labelled queries: {opts.queries}",
                         [("metrics", report.table(report.metrics_rows(metrics)))], [])
    return metrics


def _about(searcher: IndexSearcher, opts: EvalOptions) -> dict:
    man = searcher.manifest
    return {"index": {"url": searcher.store.url, "version": man.version, "factory": man.factory,
                      "shards": len(man.shards), "nprobe": man.nprobe, "model": man.model.get("name"),
                      "fingerprint": man.model.get("fingerprint")},
            "protocol": opts.protocol, "data": opts.data, "seed": opts.seed, "qe": opts.qe,
            "dba": man.params.get("dba", 0), "pca_dim": man.params.get("pca_dim", 0),
            "whiten_power": man.params.get("whiten_power", 0)}
