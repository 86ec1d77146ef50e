"""`imsearch eval` as a user runs it, on real images (Debian's tuxpaint stamps, scikit-image photos),
against a real sharded IVF-PQ index built from the data; the report directory is checked file by file."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from services.eval.datasets import skimage_photos, split_classes, tuxpaint_stamps, write_class_folder
from tests.integration.test_cli import assert_one_line_error, run

CLASSES, PER_CLASS = 6, 10
REPORT_FILES = ("metrics.json", "summary.md", "summary.html", "per_class.csv", "pr_curves.png", "tsne.png",
                "umap.png", "gallery_worst.png", "gallery_best.png")


@pytest.fixture(scope="module")
def classes_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    stamps = tuxpaint_stamps(min_per_class=PER_CLASS)
    biggest = [c for c, _ in Counter(s.label for s in stamps).most_common(CLASSES)]
    items = [s for c in biggest for s in [s for s in stamps if s.label == c][:PER_CLASS]]
    write_class_folder(items, tmp / "data")
    proc = run("eval", "--protocol", "classes", "--data", str(tmp / "data"), "--out", str(tmp / "report"),
               "--index-factory", "IVF4,PQ16x4", "--shards", "2", "--plots", "--json", env_home=tmp / "home")
    assert proc.returncode == 0, proc.stderr
    return tmp, json.loads(proc.stdout.strip().splitlines()[-1]), items


def test_classes_metrics_beat_chance_and_the_index_tracks_exact_search(classes_run):
    _, metrics, items = classes_run
    assert metrics["queries"] == len(items) == CLASSES * PER_CLASS
    for key in ("mAP", "mAP@10", "P@1", "P@10", "R@10", "ANMRR", "mAP_exact"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics)
    chance = (PER_CLASS - 1) / (len(items) - 1)  # a random ranking's expected precision
    assert metrics["mAP"] > 2 * chance, metrics
    assert metrics["P@1"] > 2 * chance, metrics
    assert metrics["ANMRR"] < 0.8, metrics  # 1 = nothing relevant in the first K
    assert metrics["mAP_index_over_exact"] > 0.8, metrics  # a 4-bit PQ on 60 vectors: coarse, not broken
    assert metrics["depth"] == metrics["index_vectors"] == len(items)


def test_classes_report_files(classes_run):
    tmp, metrics, _ = classes_run
    report = tmp / "report"
    for name in REPORT_FILES:
        assert (report / name).is_file(), name
    for name in [n for n in REPORT_FILES if n.endswith(".png")]:
        with Image.open(report / name) as img:
            assert img.width >= 300 and img.height >= 90, (name, img.size)
            assert len(img.convert("RGB").getcolors(1 << 20) or []) > 20, name  # drawn, not blank
    saved = json.loads((report / "metrics.json").read_text())
    assert saved["metrics"]["mAP"] == pytest.approx(metrics["mAP"])
    assert saved["index"]["shards"] == 2 and saved["index"]["factory"].startswith("IVF4,PQ16x4")
    assert len(saved["per_class"]) == CLASSES
    assert all(set(row) >= {"class", "precision", "recall", "f1", "AP"} for row in saved["per_class"])
    summary = (report / "summary.md").read_text()
    assert "mAP" in summary and "tsne.png" in summary


def test_labelled_protocol_with_revisited_ground_truth(classes_run):
    tmp, _, items = classes_run
    files = sorted((tmp / "data").rglob("*.jpg"))
    by_class: dict[str, list[str]] = {}
    for f in files:
        by_class.setdefault(f.parent.relative_to(tmp / "data").as_posix(), []).append(str(f))
    queries = [(f"q{i}", members[0]) for i, members in enumerate(by_class.values())]
    pq.write_table(pa.table({"query": [q for q, _ in queries], "uri": [u for _, u in queries]}), tmp / "q.parquet")
    gt = {q: {"easy": by_class[Path(u).parent.relative_to(tmp / "data").as_posix()][:5],
              "hard": by_class[Path(u).parent.relative_to(tmp / "data").as_posix()][5:], "junk": []}
          for q, u in queries}
    (tmp / "gt.json").write_text(json.dumps(gt))
    proc = run("eval", str(tmp / "report" / "work" / "index"), "--protocol", "labelled", "--queries",
               str(tmp / "q.parquet"), "--ground-truth", str(tmp / "gt.json"), "--out", str(tmp / "labelled"),
               "--json", env_home=tmp / "home")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["queries"] == CLASSES
    for key in ("mAP", "mAP_easy", "mAP_medium", "mAP_hard"):
        assert 0.0 < metrics[key] <= 1.0, (key, metrics)
    assert (tmp / "labelled" / "metrics.json").is_file()


def test_copydetect_on_real_photos(tmp_path):
    """A file that is not an image among the photos is skipped with embed's reason, not a traceback."""
    data = tmp_path / "photos"
    write_class_folder(skimage_photos(), data)
    (data / "broken.jpg").write_bytes(b"this is not a JPEG")
    proc = run("eval", "--protocol", "copydetect", "--data", str(data), "--out", str(tmp_path / "report"),
               "--json", env_home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "report" / "tsne.png").exists()  # maps only with --plots
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["skipped_files"] == 1
    n = len(skimage_photos())
    assert metrics["distractors"] == len(range(0, n, 5)) and metrics["copies"] == n - metrics["distractors"]
    assert metrics["uAP"] > 0.5 and metrics["recall@1"] > 0.6, metrics
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["skipped_files"] == {str(data / "broken.jpg"): "not an image: unknown or unsupported format"}
    assert set(saved["recall@1_by_edit"]) <= {"crop", "rescale", "jpeg30", "rotate", "colour", "flip", "blur", "text"}


def test_eval_bad_input(tmp_path):
    (tmp_path / "one" / "only").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(tmp_path / "one" / "only" / "a.jpg")
    assert_one_line_error(run("eval", "--data", str(tmp_path / "one"), "--out", str(tmp_path / "r"),
                              env_home=tmp_path / "home"), "two class subfolders")
    assert_one_line_error(run("eval", "--protocol", "nope", "--data", str(tmp_path), env_home=tmp_path / "home"),
                          "unknown protocol")
    assert_one_line_error(run("eval", "--data", str(tmp_path / "missing"), env_home=tmp_path / "home"),
                          "not found")
    assert_one_line_error(run("eval", "--protocol", "labelled", env_home=tmp_path / "home"), "--queries")


def test_train_then_evaluate_on_unseen_classes(tmp_path):
    stamps = tuxpaint_stamps(min_per_class=PER_CLASS)
    biggest = [c for c, _ in Counter(s.label for s in stamps).most_common(4)]
    pick = [s for c in biggest for s in [s for s in stamps if s.label == c][:8]]
    train_items, test_items = split_classes(pick)
    write_class_folder(train_items, tmp_path / "train")
    write_class_folder(test_items, tmp_path / "test")
    model = tmp_path / "model.pt"
    proc = run("train", "lite0-gem", "--data", str(tmp_path / "train"), "--out", str(model), "--loss", "triplet",
               "--miner", "semihard", "--epochs", "1", "--batch-size", "8", "--per-class", "4", "--json",
               env_home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["classes"] == sorted({it.label for it in train_items}) and len(record["losses"]) == 1
    assert model.with_suffix(".loss.png").is_file()
    proc = run("eval", "--protocol", "unseen-classes", "--data", str(tmp_path / "test"), "--model", str(model),
               "--out", str(tmp_path / "report"), "--json", env_home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["queries"] == len(test_items) and 0 < metrics["mAP"] <= 1
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["index"]["model"] == str(model.resolve())  # the index was embedded with the checkpoint
    # evaluating on a class the model trained on is refused
    assert_one_line_error(run("eval", "--protocol", "unseen-classes", "--data", str(tmp_path / "train"), "--model",
                              str(model), "--out", str(tmp_path / "r2"), env_home=tmp_path / "home"),
                          "not an unseen-classes evaluation")


def test_a_folder_of_class_subfolders_splits_into_train_and_test_classes(tmp_path):
    for c, colour in enumerate(("red", "green", "blue", "white")):
        for i in range(2):
            (tmp_path / "photos" / f"class{c}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40 + i, 30), colour).save(tmp_path / "photos" / f"class{c}" / f"{i}.png")
    proc = run("datasets", str(tmp_path / "photos"), str(tmp_path / "split"), "--split", env_home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    train = sorted(p.name for p in (tmp_path / "split" / "train").iterdir())
    test = sorted(p.name for p in (tmp_path / "split" / "test").iterdir())
    assert (train, test) == (["class0", "class2"], ["class1", "class3"])
    assert len(list((tmp_path / "split" / "train").rglob("*.jpg"))) == 4
    assert_one_line_error(run("datasets", str(tmp_path / "nowhere"), str(tmp_path / "x"), env_home=tmp_path / "home"),
                          "unknown data set")
