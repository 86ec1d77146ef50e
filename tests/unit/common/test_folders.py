"""Folders of images: which files count, and class subfolders as labels."""

from __future__ import annotations

import pytest
from PIL import Image

from services.common.errors import InvalidInput, NotFound
from services.common.folders import class_folder, image_files


def _image(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), colour).save(path)


def test_class_folder_labels_and_bad_folders(tmp_path):
    _image(tmp_path / "animals" / "birds" / "a.jpg", (255, 0, 0))
    _image(tmp_path / "food" / "b.png", (0, 255, 0))
    (tmp_path / "food" / "notes.txt").write_text("not an image")
    items = class_folder(tmp_path)
    assert [(it.path.name, it.label) for it in items] == [("a.jpg", "animals/birds"), ("b.png", "food")]
    with pytest.raises(NotFound):
        class_folder(tmp_path / "missing")
    with pytest.raises(InvalidInput, match="two class subfolders"):
        class_folder(tmp_path / "food")


def test_image_files_are_found_recursively_by_extension_in_any_case(tmp_path):
    _image(tmp_path / "x" / "a.JPG", (1, 2, 3))
    _image(tmp_path / "b.png", (1, 2, 3))
    (tmp_path / "c.txt").write_text("no")
    (tmp_path / "d.jpg").mkdir()  # a folder, not an image
    assert [p.name for p in image_files(tmp_path)] == ["b.png", "a.JPG"]
