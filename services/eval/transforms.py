"""Copy-detection transforms: the edits a near-duplicate query typically went through."""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

Transform = Callable[[Image.Image, np.random.Generator], Image.Image]


def crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Keep 70-90% of each side at a random offset."""
    w, h = img.size
    f = rng.uniform(0.7, 0.9)
    cw, ch = max(1, int(w * f)), max(1, int(h * f))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch))


def rescale(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    f = rng.uniform(0.4, 0.7)
    return img.resize((max(8, int(img.width * f)), max(8, int(img.height * f))), Image.Resampling.BILINEAR)


def jpeg(img: Image.Image, rng: np.random.Generator, quality: int = 30) -> Image.Image:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def rotate(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    angle = rng.uniform(5, 12) * rng.choice([-1, 1])
    return img.convert("RGB").rotate(angle, Image.Resampling.BILINEAR, expand=False, fillcolor=(255, 255, 255))


def colour(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    img = ImageEnhance.Color(img.convert("RGB")).enhance(rng.uniform(0.5, 1.5))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.25))
    return ImageEnhance.Contrast(img).enhance(rng.uniform(0.75, 1.25))


def flip(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.mirror(img)


def blur(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 2.5)))


def grayscale(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.grayscale(img).convert("RGB")


COPY_EDITS: dict[str, Transform] = {"crop": crop, "rescale": rescale, "jpeg30": jpeg, "rotate": rotate,
                                    "colour": colour}


def random_copy(img: Image.Image, rng: np.random.Generator, edits: dict[str, Transform] = COPY_EDITS,
                n_edits: int = 2) -> tuple[Image.Image, list[str]]:
    """Apply n distinct edits in random order (JPEG last, as a re-upload would)."""
    names = list(rng.choice(sorted(edits), size=min(n_edits, len(edits)), replace=False))
    names.sort(key=lambda n: n == "jpeg30")
    out = img.convert("RGB")
    for name in names:
        out = edits[name](out, rng)
    return out, names
