"""Retrieval quality table on real images (README "Quality"): `imsearch eval` variants in one run.

Data: the photo stamps of Debian's tuxpaint-stamps-default (20 classes with >= 8 images, 397 images,
cut-outs composited on a plain background). Each row builds a real index from the data and evaluates
on it, exactly as `imsearch eval --data ... [options]` does.
The unseen-classes rows fine-tune on 10 of the 20 classes (alternate by name) and evaluate on the
other 10 only, as `imsearch train` + `imsearch eval --protocol unseen-classes` do.
Usage: python -m benchmarks.quality [--out DIR] [--only classes|copydetect|unseen] [--epochs 10]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from services.common.config import Settings
from services.embedder.train import TrainConfig, train
from services.eval.datasets import split_classes, tuxpaint_stamps, write_class_folder
from services.eval.run import EvalOptions, run_eval

CLASSES = [  # (label, EvalOptions changes)
    ("Lite0 GeM p=3, exact (Flat)", {}),
    ("same, IVF16,PQ64x8 in 2 shards", {"factory": "IVF16,PQ64x8", "shards": 2}),
    ("average pooling (GeM p=1)", {"model": "lite0-gem@p=1"}),
    ("multi-scale 1, 1/√2, 1/2", {"model": "lite0-gem@ms"}),
    ("αQE, 2 neighbours", {"qe": 2}),
    ("DBA, 2 neighbours", {"dba": 2}),
]
COPYDETECT = [
    ("Lite0 GeM p=3, exact, top-1 raw score", {}),
    ("top-10 of every query pooled", {"predictions": 10}),
    ("score normalisation: minus the 10th score", {"score_norm": "margin"}),
    ("multi-scale 1, 1/√2, 1/2", {"model": "lite0-gem@ms"}),
]


def run_rows(protocol: str, rows: list, data: Path, out: Path, keys: list[str]) -> None:
    print(f"\n{protocol} ({data})\n")
    print("| variant | " + " | ".join(keys) + " | s |")
    print("|---|" + "---|" * (len(keys) + 1))
    for i, (label, changes) in enumerate(rows):
        start = time.perf_counter()
        opts = EvalOptions(protocol=protocol, data=str(data), out=out / f"{protocol}-{i}", **changes)
        metrics = run_eval(opts, Settings(home=out / "home"), step=lambda m: None)
        cells = [f"{metrics[k]:.4f}" if isinstance(metrics[k], float) else str(metrics[k]) for k in keys]
        print(f"| {label} | " + " | ".join(cells) + f" | {time.perf_counter() - start:.0f} |", flush=True)


UNSEEN = [("contrastive", "pair"), ("triplet", "semihard"), ("multisimilarity", "none"), ("proxyanchor", "none")]


def run_unseen(data: Path, out: Path, epochs: int) -> None:
    items = tuxpaint_stamps(min_per_class=8)
    train_items, test_items = split_classes(items)
    for name, chosen in (("train", train_items), ("test", test_items)):
        if not (out / name).exists():
            write_class_folder(chosen, out / name)
    keys = ["mAP", "mAP@10", "P@1", "P@10", "ANMRR"]
    print(f"\nunseen-classes: train {len(train_items)} images / 10 classes, test {len(test_items)} images / "
          f"10 other classes, {epochs} epochs\n")
    print("| model | " + " | ".join(keys) + " | training s |")
    print("|---|" + "---|" * (len(keys) + 1))
    settings = Settings(home=out / "home")
    rows = [("pretrained Lite0 GeM", None, None)] + [(f"{loss} + {miner} miner", loss, miner) for loss, miner in UNSEEN]
    for label, loss, miner in rows:
        seconds, model = "-", None
        if loss:
            model = out / f"{loss}.pt"
            record = train(out / "train", model, TrainConfig(loss=loss, miner=miner, epochs=epochs))
            seconds, model = f"{record.seconds:.0f}", str(model.resolve())
        shutil.rmtree(out / f"unseen-{loss}", ignore_errors=True)  # a report of an earlier run's model
        opts = EvalOptions(protocol="unseen-classes", data=str(out / "test"), out=out / f"unseen-{loss}", model=model)
        metrics = run_eval(opts, settings, step=lambda m: None)
        print(f"| {label} | " + " | ".join(f"{metrics[k]:.4f}" for k in keys) + f" | {seconds} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None, help="keep the reports here (default: a temp dir)")
    ap.add_argument("--only", choices=["classes", "copydetect", "unseen"], default=None)
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        data = out / "tuxpaint"
        if not data.exists():
            write_class_folder(tuxpaint_stamps(min_per_class=8), data)
        if args.only in (None, "classes"):
            run_rows("classes", CLASSES, data, out, ["queries", "mAP", "mAP@10", "P@1", "P@10", "ANMRR",
                                                     "mAP_index_over_exact"])
        if args.only in (None, "copydetect"):
            run_rows("copydetect", COPYDETECT, data, out, ["copies", "distractors", "uAP", "recall@1",
                                                           "recall@10"])
        if args.only in (None, "unseen"):
            run_unseen(data, out, args.epochs)


if __name__ == "__main__":
    main()
