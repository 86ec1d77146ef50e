"""The gate sample `imsearch embed` leaves beside the embeddings (gatesample.py): made once per model, none when
asked for none, made again when a run died between its two files or its record is damaged."""

import numpy as np
import pytest

from services.common.config import Settings
from services.common.errors import Corrupt
from services.common.store import LocalStore
from services.embedder import gatesample
from services.embedder.pipeline import embed_catalogue
from tests.helpers import encode, pattern


@pytest.fixture()
def photos(tmp_path):
    (tmp_path / "photos").mkdir()
    for i in range(30):
        (tmp_path / "photos" / f"{i:02d}.png").write_bytes(encode(pattern(96, 72, seed=i)))
    (tmp_path / "photos" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return tmp_path


def settings(tmp_path, **kw) -> Settings:
    return Settings(home=tmp_path / "home", model="lite0-gem", ray_min_images=10**9, **kw)


def test_embed_leaves_a_sample_of_photos_and_copies_the_unreadable_left_out(photos):
    s = settings(photos, qe_gate_sample=20)
    summary = embed_catalogue(str(photos / "photos"), str(photos / "emb"), settings=s)
    sample = gatesample.read(LocalStore(photos / "emb"))
    assert summary.gate_sample == len(sample.copies) == len(sample.originals)
    assert 19 <= len(sample.copies) <= 20  # 20 chosen of 31 files; the broken one, if chosen, left out
    cos = np.einsum("nd,nd->n", sample.originals, sample.copies)
    assert 0.2 < cos.mean() < 0.999  # a copy is near its photo and not the photo itself
    assert np.ptp(cos) > 0.01  # edits of different strength, not one transform
    again = embed_catalogue(str(photos / "photos"), str(photos / "emb"), settings=s)
    assert again.gate_sample == summary.gate_sample and again.resumed == 31
    np.testing.assert_array_equal(gatesample.read(LocalStore(photos / "emb")).copies, sample.copies)


def test_no_sample_when_asked_for_none(photos):
    embed_catalogue(str(photos / "photos"), str(photos / "emb"), settings=settings(photos, qe_gate_sample=0))
    assert gatesample.read(LocalStore(photos / "emb")) is None
    assert not (photos / "emb" / gatesample.SAMPLE_KEY).exists()


def test_a_run_killed_between_the_vectors_and_the_record_makes_the_sample_again_on_the_rerun(photos):
    s = settings(photos, qe_gate_sample=10)
    embed_catalogue(str(photos / "photos"), str(photos / "emb"), settings=s)
    (photos / "emb" / gatesample.RECORD_KEY).unlink()  # as if killed after the npz, before its record
    (photos / "emb" / gatesample.SAMPLE_KEY).write_bytes(b"half written")
    assert gatesample.read(LocalStore(photos / "emb")) is None
    embed_catalogue(str(photos / "photos"), str(photos / "emb"), settings=s)
    assert len(gatesample.read(LocalStore(photos / "emb")).copies) == 10


def test_a_damaged_record_is_made_again_and_damaged_vectors_are_refused_by_name(photos):
    s = settings(photos, qe_gate_sample=10)
    embed_catalogue(str(photos / "photos"), str(photos / "emb"), settings=s)
    record = photos / "emb" / gatesample.RECORD_KEY
    record.write_text(record.read_text().replace('"count": 10', '"count": 11'))
    assert gatesample.record(LocalStore(photos / "emb")) is None
    embed_catalogue(str(photos / "photos"), str(photos / "emb"), settings=s)
    assert gatesample.record(LocalStore(photos / "emb"))["count"] == 10
    npz = photos / "emb" / gatesample.SAMPLE_KEY
    npz.write_bytes(npz.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(Corrupt, match="gate-sample.npz does not match the checksum"):
        gatesample.read(LocalStore(photos / "emb"))


def test_a_transparent_photos_copy_is_made_as_the_embedder_sees_the_photo_on_its_background():
    """The copy was once made from the bytes with the alpha channel dropped: transparent pixels turned black,
    while the embedder composites them on white — a copy of a cut-out was another picture than its photo."""
    import io

    from PIL import Image

    from services.common.images import BACKGROUND

    img = Image.new("RGBA", (100, 80), (0, 0, 0, 0))
    img.paste((200, 30, 30, 255), (30, 20, 70, 60))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    for seed in range(5):
        copy = np.asarray(Image.open(io.BytesIO(gatesample.copy_of(buf.getvalue(), np.random.default_rng(seed),
                                                                      Settings()))).convert("RGB"), np.float32)
        corners = np.stack([copy[1, 1], copy[1, -2], copy[-2, 1], copy[-2, -2]])
        assert (np.abs(corners - np.array(BACKGROUND)) < 60).all(axis=1).sum() >= 3, (seed, corners)
