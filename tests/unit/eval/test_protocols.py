"""Protocol building blocks, without a model (vectors given; indexes in-process)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.common.errors import InvalidInput
from services.eval import protocols as p


def test_summarise_hand_case_and_queries_without_relevant_items_left_out():
    rels = [np.array([1, 0, 1]), np.array([0, 1, 0]), np.array([0, 0, 0])]
    out = p.summarise(rels, [2, 1, 0])  # the third query's class has no other member
    assert out["queries"] == 2
    assert out["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 2) / 2)
    assert out["P@1"] == pytest.approx(0.5)
    assert out["R@10"] == pytest.approx(1.0)
    with pytest.raises(InvalidInput):
        p.summarise([np.array([0])], [0])


def test_exact_relevance_ranks_class_mates_among_all_others_without_the_query_itself():
    v = np.eye(3, dtype=np.float32)
    v[1] = [0.8, 0.6, 0]
    rel = p.exact_relevance(v, ["x", "x", "y"])
    assert [r.tolist() for r in rel] == [[True, False], [True, False], [False, False]]  # a: b first, then c
    rng = np.random.default_rng(0)  # against argsort, at random
    x = rng.standard_normal((50, 8)).astype(np.float32)
    labels = [f"c{i % 5}" for i in range(50)]
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1)[:, :-1]
    want = np.array(labels)[order] == np.array(labels)[:, None]
    assert np.array_equal(np.stack(p.exact_relevance(x, labels, batch=7)), want)


def _image(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), colour).save(path)


def test_copy_queries_name_their_source_and_distractors_none(tmp_path):
    _image(tmp_path / "a.jpg", (200, 30, 30))
    _image(tmp_path / "b.jpg", (30, 30, 200))
    queries = p.make_copy_queries([tmp_path / "a.jpg"], [tmp_path / "b.jpg"], seed=1)
    assert [q.source for q in queries] == [str((tmp_path / "a.jpg").resolve()), None]
    assert all(len(q.edits) == 2 and q.image[:2] == b"\xff\xd8" for q in queries)  # JPEG bytes


def test_ground_truth_files_are_checked(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"query": ["q1", "q2"], "uri": ["x.jpg", "y.jpg"]}), tmp_path / "q.parquet")
    (tmp_path / "gt.json").write_text(json.dumps({"q1": ["a.jpg"]}))
    with pytest.raises(InvalidInput, match="no ground truth"):
        p.read_ground_truth(str(tmp_path / "q.parquet"), str(tmp_path / "gt.json"))
    (tmp_path / "gt.json").write_text("{not json")
    with pytest.raises(InvalidInput, match="ground truth"):
        p.read_ground_truth(str(tmp_path / "q.parquet"), str(tmp_path / "gt.json"))
    pq.write_table(pa.table({"name": ["q1"]}), tmp_path / "bad.parquet")
    with pytest.raises(InvalidInput, match="lacks columns"):
        p.read_ground_truth(str(tmp_path / "bad.parquet"), str(tmp_path / "gt.json"))


def test_classes_metrics_read_by_id_equal_the_same_metrics_computed_by_brute_force(tmp_path, monkeypatch):
    """The id-based, vectorised ranking of a real (in-process) index gives the metrics a per-uri brute force
    gives on the same vectors; the query itself is never among its results."""
    from services.common.config import Settings
    from services.common.folders import LabelledImage
    from services.indexer.build import build_index
    from services.searcher.local import IndexSearcher
    from tests.helpers import random_unit_vectors, write_fake_embeddings

    monkeypatch.chdir(tmp_path)  # the fake catalogue's uris are relative: img/<row>.jpg
    n, classes = 600, 12
    x = random_unit_vectors(n, 16, seed=5, clusters=classes)
    write_fake_embeddings(tmp_path / "emb", x)
    settings = Settings(home=tmp_path / "h")
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=3, settings=settings)
    labels = [f"c{(x[i] @ x[:classes].T).argmax()}" for i in range(n)]  # a label per vector, near-class-like
    items = [LabelledImage(Path(f"img/{i}.jpg"), lab) for i, lab in enumerate(labels)]
    result = p.classes_eval(IndexSearcher(str(tmp_path / "idx"), settings), items, vectors=x)

    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1)[:, :-1]
    lab = np.array(labels)
    rel = lab[order] == lab[:, None]
    n_rel = rel.sum(1)
    ap = (np.cumsum(rel, 1) / np.arange(1, n) * rel).sum(1) / np.maximum(n_rel, 1)
    assert result.metrics["mAP"] == pytest.approx(ap[n_rel > 0].mean(), abs=1e-6)
    assert result.metrics["P@1"] == pytest.approx(rel[n_rel > 0, 0].mean())
    assert result.metrics["mAP_exact"] == pytest.approx(result.metrics["mAP"], abs=1e-6)  # a Flat index
    assert not any(u.endswith(f"/img/{q}.jpg") for q in (0, 1, 599) for u in result.ranked.uris[q])
    assert result.ranked.uris[0][0].endswith(f"img/{order[0, 0]}.jpg")
