"""Folders of images, as the embedder, training and evaluation all read them: which files are images, and a
folder of class subfolders (labelled images: the label is the subfolder)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.errors import InvalidInput, NotFound

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: str


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def image_files(root: str | Path) -> list[Path]:
    """Every image file under root (recursively), sorted."""
    return sorted(p for p in Path(root).rglob("*") if is_image_name(p.name) and p.is_file())


def class_folder(root: str | Path) -> list[LabelledImage]:
    """Images under root; label = the folder holding them, relative to root (e.g. animals/birds)."""
    root = Path(root)
    if not root.is_dir():
        raise NotFound(f"data folder {root} not found")
    items = [LabelledImage(p, p.parent.relative_to(root).as_posix()) for p in image_files(root) if p.parent != root]
    if len({it.label for it in items}) < 2:
        raise InvalidInput(f"{root} needs at least two class subfolders of images, found "
                           f"{len({it.label for it in items})}")
    return items
