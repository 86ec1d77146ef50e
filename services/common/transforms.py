"""Copy-detection transforms: the edits a near-duplicate query typically went through."""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

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


def text(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A caption over the image (as a meme or watermark would add), about 1/12 of its height."""
    out = img.convert("RGB")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(10, out.height // 12))
    words = ["SALE", "copyright", "look at this", "#tbt", "imsearch", "2026"]
    caption = " ".join(rng.choice(words, size=2))
    x, y = int(rng.uniform(0, out.width * 0.3)), int(rng.uniform(0, out.height * 0.8))
    colour_ = tuple(int(c) for c in rng.integers(0, 256, 3))
    draw.text((x, y), caption, fill=colour_, font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    return out


COPY_EDITS: dict[str, Transform] = {"crop": crop, "rescale": rescale, "jpeg30": jpeg, "rotate": rotate,
                                    "colour": colour}
# The copy-detection protocol's full set (the list): adds mirror, blur and a text overlay.
ALL_EDITS: dict[str, Transform] = COPY_EDITS | {"flip": flip, "blur": blur, "text": text}


def random_copy(img: Image.Image, rng: np.random.Generator, edits: dict[str, Transform] = COPY_EDITS,
                n_edits: int = 2) -> tuple[Image.Image, list[str]]:
    """Apply n distinct edits in random order (JPEG last, as a re-upload would)."""
    names = list(rng.choice(sorted(edits), size=min(n_edits, len(edits)), replace=False))
    names.sort(key=lambda n: n == "jpeg30")
    out = img.convert("RGB")
    for name in names:
        out = edits[name](out, rng)
    return out, names
