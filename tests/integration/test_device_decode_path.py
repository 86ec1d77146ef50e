"""The GPU ingestion path (JPEGs decoded in the model stage) run on the CPU device: the same
vectors as the Pillow path, and a JPEG whose data is broken becomes an error row."""

import numpy as np

from services.common.config import Settings
from services.embedder.stages import EmbedStage, decode_batch
from tests.helpers import encode, jpeg_with_orientation, pattern


def test_deferred_jpegs_embed_like_pillow_decoded_ones(tmp_path):
    files = {"a.jpg": encode(pattern(320, 240, seed=1), "JPEG", quality=95),
             "b.jpg": jpeg_with_orientation(pattern(300, 200, seed=2), 6),
             "c.png": encode(pattern(200, 200, seed=3)),  # not a JPEG: Pillow decodes it either way
             "d.jpg": encode(pattern(400, 300, seed=4), "JPEG")[:-3000]}  # header fine, data cut short
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    batch = {"uri": np.array([str(tmp_path / n) for n in files], dtype=object)}
    settings = Settings(home=tmp_path / "home", device="cpu", runtime="torch")  # the GPU path runs torch's model
    stage = EmbedStage("lite0-gem", settings=settings)
    plain = stage(decode_batch(batch, 224, settings))
    deferred_input = decode_batch(batch, 224, settings, defer_jpeg=True)
    assert [len(b) > 0 for b in deferred_input["jpeg"]] == [True, True, False, True]
    assert (deferred_input["width"][:2] == [320, 200]).all()  # sizes from the header, EXIF-rotated
    deferred = stage(deferred_input)
    assert list(deferred) == list(plain)
    cos = (plain["vector"][:3] * deferred["vector"][:3]).sum(1)
    assert (cos > 0.97).all(), cos
    assert not deferred["error"][0] and not deferred["error"][1]
    assert deferred["error"][3] and not deferred["vector"][3].any()
