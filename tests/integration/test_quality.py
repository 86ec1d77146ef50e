"""Retrieval quality on real images: scikit-image photos + Debian tuxpaint stamp photos.

The catalogue is the originals; the queries are edited copies (crop, rescale, JPEG q30,
small rotation, colour shift; two per query). Figures are written to
test-artifacts/quality.json for the README.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from services.common.config import Settings
from services.common.store import LocalStore
from services.common.transforms import random_copy
from services.embedder.embeddings import read_embeddings
from services.embedder.pipeline import embed_catalogue
from services.eval.datasets import flatten, skimage_photos, tuxpaint_stamps
from services.indexer.build import build_index
from services.searcher.expansion import plan, to_expand
from services.searcher.local import IndexSearcher, gated_search

ROOT = Path(__file__).resolve().parents[2]
MAX_STAMPS = 400


@pytest.fixture(scope="module")
def real_set(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    stamps = tuxpaint_stamps()
    step = max(1, len(stamps) // MAX_STAMPS)
    items = skimage_photos() + stamps[::step][:MAX_STAMPS]
    rng = np.random.default_rng(42)
    (tmp / "catalogue").mkdir()
    (tmp / "queries").mkdir()
    for i, item in enumerate(items):
        img = flatten(item.path)
        img.save(tmp / "catalogue" / f"{i:04d}.jpg", quality=95)
        query, _ = random_copy(img, rng)
        query.save(tmp / "queries" / f"{i:04d}.jpg", quality=95)
    settings = Settings(home=tmp / "home")
    summary = embed_catalogue(str(tmp / "catalogue"), str(tmp / "emb"), engine="local", settings=settings)
    build_index(str(tmp / "emb"), str(tmp / "exact"), shards=1, factory="Flat", settings=settings)
    build_index(str(tmp / "emb"), str(tmp / "ivf"), shards=4, factory="IVF16,Flat", settings=settings)
    exact, ivf = IndexSearcher(str(tmp / "exact"), settings), IndexSearcher(str(tmp / "ivf"), settings)
    files = sorted((tmp / "queries").iterdir())
    vectors = np.concatenate([exact.embed_images([f.read_bytes() for f in files[i:i + 32]])
                              for i in range(0, len(files), 32)])
    return {"tmp": tmp, "n_stamps": len(items) - len(skimage_photos()), "summary": summary, "files": files,
            "vectors": vectors, "exact": exact, "ivf": ivf}


def precision_at_1(searcher: IndexSearcher, vectors: np.ndarray, files: list[Path]) -> float:
    hits = searcher.search(vectors, k=1)
    return float(np.mean([Path(h[0].uri).name == f.name for h, f in zip(hits, files)]))


def test_real_catalogue_is_big_enough_and_fully_embedded(real_set):
    assert real_set["n_stamps"] >= 200
    assert real_set["summary"].skipped == 0, real_set["summary"].line()


def test_edited_copies_find_their_original(real_set):
    p1_exact = precision_at_1(real_set["exact"], real_set["vectors"], real_set["files"])
    p1_ivf = precision_at_1(real_set["ivf"], real_set["vectors"], real_set["files"])
    exact_hits = real_set["exact"].search(real_set["vectors"], k=10)
    ivf_hits = real_set["ivf"].search(real_set["vectors"], k=10)
    agreement = float(np.mean([len({h.id for h in a} & {h.id for h in b}) / len(a)
                               for a, b in zip(exact_hits, ivf_hits)]))
    figures = {"queries": len(real_set["files"]), "stamps": real_set["n_stamps"],
               "precision_at_1_exact": round(p1_exact, 4), "precision_at_1_ivf_4_shards": round(p1_ivf, 4),
               "top10_agreement_ivf_vs_exact": round(agreement, 4),
               "ivf_nprobe": real_set["ivf"].manifest.nprobe}
    out = ROOT / "test-artifacts"
    out.mkdir(exist_ok=True)
    (out / "quality.json").write_text(json.dumps(figures, indent=1))
    print(figures)
    assert p1_exact >= 0.9, figures
    assert p1_ivf >= 0.9, figures
    assert agreement >= 0.95, figures


def test_catalogue_images_find_themselves_first(real_set):
    emb = read_embeddings(LocalStore(real_set["tmp"] / "emb"))
    hits = real_set["ivf"].search(emb.vectors[:50], k=1)
    assert [h[0].id for h in hits] == emb.ids[:50].tolist()


def test_the_gate_learned_from_the_catalogue_keeps_its_edited_copies_plain_and_expands_more_like_this(real_set):
    """The gate on real photos: τ learned at build from the embed run's synthetic copies (the copy-detection
    protocol's edits); the test's copies are others (two of crop, rescale, JPEG, rotation, colour, another seed).
    A catalogue photo's "more like this" — its best hit but itself — is what should expand."""
    exact = real_set["exact"]
    gate = exact.manifest.qe_gate
    assert gate is not None and gate.copies == 256, exact.manifest.qe_gate
    qe = plan(None, gate.tau, exact.settings)
    _, copies_expanded = gated_search(exact, exact.to_index_space(real_set["vectors"]), 10, None, qe)
    emb = read_embeddings(LocalStore(real_set["tmp"] / "emb"))
    D, I, _, _ = exact.search_arrays(exact.to_index_space(emb.vectors), 2)
    more_like_this = to_expand(I, D, gate.tau, emb.ids)
    _, itself = gated_search(exact, exact.to_index_space(emb.vectors[:50]), 10, None, qe)  # the photo as uploaded
    figures = {"tau": gate.tau, "copies_expanded": round(float(np.mean(copies_expanded)), 4),
               "more_like_this_expanded": round(float(np.mean(more_like_this)), 4)}
    print(figures)
    assert not itself.any()  # an exact copy: its best hit is itself
    assert np.mean(copies_expanded) <= 0.20, figures  # the rule lets 10 % of its own copies below τ
    assert np.mean(more_like_this) >= 0.25, figures
