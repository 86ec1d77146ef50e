"""Real image sets available offline: scikit-image's photos and Debian's tuxpaint stamps."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from services.common.errors import NotFound
from services.common.folders import LabelledImage
from services.common.images import BACKGROUND
from services.common.transforms import crop, flip, grayscale, random_copy

TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")
# Synthetic patterns, and the right half of a stereo pair (a near-copy of motorcycle_left).
SKIMAGE_SKIP = {"chessboard_GRAY", "chessboard_RGB", "motorcycle_right", "lbpcascade_frontalface_opencv"}


def skimage_photos() -> list[LabelledImage]:
    """The photos scikit-image ships in its wheel (no download); label = file stem."""
    import skimage.data

    root = Path(skimage.data.__file__).parent
    files = sorted(p for p in root.iterdir() if p.suffix in (".png", ".jpg") and p.stem not in SKIMAGE_SKIP)
    return [LabelledImage(p, p.stem) for p in files]


def tuxpaint_stamps(root: Path = TUXPAINT_STAMPS, min_per_class: int = 1) -> list[LabelledImage]:
    """Stamp photos (PNG cut-outs), label = category/subfolder, symbols left out."""
    if not root.is_dir():
        raise NotFound(f"{root} not found: apt-get install tuxpaint-stamps-default")
    items, seen = [], set()
    for p in sorted(root.rglob("*.png")):
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if p.relative_to(root).parts[0] != "symbols" and digest not in seen:  # the package ships a few twice
            seen.add(digest)
            items.append(LabelledImage(p, "/".join(p.relative_to(root).parts[:2])))
    counts: dict[str, int] = {}
    for it in items:
        counts[it.label] = counts.get(it.label, 0) + 1
    return [it for it in items if counts[it.label] >= min_per_class]


def flatten(path: Path, max_side: int = 640) -> Image.Image:
    """RGB image with any transparency composited on a plain background, at most max_side."""
    img = Image.open(path)
    img.seek(0)
    img = img.convert("RGBA")
    bg = Image.new("RGBA", img.size, BACKGROUND + (255,))
    img = Image.alpha_composite(bg, img).convert("RGB")
    img.thumbnail((max_side, max_side))
    return img


def write_demo_catalogue(out: Path, seed: int = 0) -> tuple[list[Path], Path]:
    """skimage photos + mirrored / grey / cropped variants as a catalogue; one edited copy as query.

    Returns (catalogue files, query file).
    """
    rng = np.random.default_rng(seed)
    cat, qdir = out / "catalogue", out / "queries"
    cat.mkdir(parents=True, exist_ok=True)
    qdir.mkdir(parents=True, exist_ok=True)
    files = []
    for item in skimage_photos():
        img = flatten(item.path)
        edits = [("", None), ("-mirror", flip), ("-crop", crop)]
        if np.ptp(np.asarray(img, np.int16), axis=2).any():  # a grey copy of a grey photo is a duplicate
            edits.append(("-grey", grayscale))
        for name, edit in edits:
            path = cat / f"{item.label}{name}.jpg"
            (edit(img, rng) if edit else img).save(path, quality=90)
            files.append(path)
    query, edits = random_copy(flatten(next(i.path for i in skimage_photos() if i.label == "chelsea")), rng)
    qpath = qdir / f"chelsea-{'-'.join(edits)}.jpg"
    query.save(qpath, quality=90)
    return files, qpath


def write_class_folder(items: list[LabelledImage], out: Path) -> int:
    """Each image as a JPEG under out/<label>/, transparency composited on the plain background."""
    for i, item in enumerate(items):
        folder = out / item.label
        folder.mkdir(parents=True, exist_ok=True)
        flatten(item.path).save(folder / f"{item.path.stem}-{i:04d}.jpg", quality=92)
    return len(items)


def split_classes(items: list[LabelledImage]) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """Classes alternately into train and test halves (sorted by name): the unseen-classes protocol."""
    classes = sorted({it.label for it in items})
    train = set(classes[0::2])
    return [it for it in items if it.label in train], [it for it in items if it.label not in train]
