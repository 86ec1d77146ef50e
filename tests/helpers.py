"""Test helpers: generated images of every awkward kind, and synthetic embeddings."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


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


def random_unit_vectors(n: int, d: int, seed: int = 0, clusters: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if clusters:
        centres = rng.normal(size=(clusters, d))
        x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.normal(size=(n, d))
    else:
        x = rng.normal(size=(n, d))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_fake_embeddings(root, vectors: np.ndarray, name: str = "fake", error_rows: int = 0, part_rows: int = 500):
    """An embeddings folder as `imsearch embed` writes it, from given vectors (no model needed)."""
    import hashlib
    from pathlib import Path

    from services.common.embeddings import PartWriter
    from services.common.store import LocalStore
    from services.embedder.models import ModelSpec

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    weights = root / f"{name}.weights"
    weights.write_bytes(name.encode())
    spec = ModelSpec(name, "none", str(weights), vectors.shape[1])
    n = len(vectors)
    sha = [hashlib.sha256(f"{name}-{i}".encode()).hexdigest() for i in range(n)]
    batch = {"uri": np.array([f"img/{i}.jpg" for i in range(n)], dtype=object),
             "sha256": np.array(sha, dtype=object), "width": np.full(n, 64), "height": np.full(n, 48),
             "error": np.array([""] * n, dtype=object), "vector": vectors}
    writer = PartWriter(LocalStore(root), spec, part_rows)
    writer.add(batch)
    if error_rows:
        writer.add({"uri": np.array([f"bad/{i}.jpg" for i in range(error_rows)], dtype=object),
                    "sha256": np.array([""] * error_rows, dtype=object), "width": np.zeros(error_rows),
                    "height": np.zeros(error_rows), "error": np.array(["not an image: test"] * error_rows, dtype=object),
                    "vector": np.zeros((error_rows, vectors.shape[1]), np.float32)})
    writer.close("test")
    return spec
