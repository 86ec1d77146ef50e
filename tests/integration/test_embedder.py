"""The real Lite0/1/2 backbones and the Ray pipeline (local Ray, real actors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from services.common.store import LocalStore
from services.embedder.embeddings import read_embeddings
from services.embedder.models import resolve_spec, torch_embedder
from services.embedder.pipeline import embed_catalogue
from services.eval.datasets import skimage_photos
from tests.helpers import encode, pattern

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.mark.parametrize("name,size", [("lite0-gem", 224), ("lite1-gem", 240), ("lite2-gem", 260)])
def test_lite_weights_load_in_order_and_classify_a_cat(name, size):
    """Our backbone + the package's own classifier must recognise scikit-image's cat (Chelsea), at the
    model's native input size."""
    embedder = torch_embedder(name, device="cpu")
    assert embedder.spec.image_size == size and embedder.spec.dim == 1280
    state = torch.load(embedder.spec.weights, map_location="cpu", weights_only=True)
    chelsea = next(i.path for i in skimage_photos() if i.label == "chelsea")
    pixels = np.array(Image.open(chelsea).convert("RGB").resize((size, size)))[None]
    with torch.inference_mode():
        x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() - embedder.mean) / embedder.std
        features = embedder.backbone.forward_features(x).mean(dim=(2, 3))
        logits = features @ state["_fc.weight"].T + state["_fc.bias"]
    assert int(logits.argmax()) in IMAGENET_CATS


def test_descriptors_are_unit_length_and_deterministic():
    embedder = torch_embedder("lite0-gem", device="cpu")
    pixels = np.stack([np.asarray(pattern(224, 224, seed=s)) for s in range(3)])
    a, b = embedder.embed(pixels), embedder.embed(pixels)
    assert a.shape == (3, 1280) and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-4)
    assert np.allclose(a, b, atol=1e-5)


def test_unknown_models_and_missing_weights_are_clear():
    from services.common.errors import InvalidInput

    with pytest.raises(InvalidInput, match="unknown model"):
        resolve_spec("resnet-from-nowhere")
    with pytest.raises(InvalidInput, match="never downloaded"):
        resolve_spec("timm:resnet18")


def test_ray_pipeline_matches_the_in_process_one(tmp_path, settings):
    (tmp_path / "imgs").mkdir()
    for i in range(10):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(encode(pattern(90, 70, seed=i)))
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8\xff nope")
    import ray

    local = embed_catalogue(str(tmp_path / "imgs"), str(tmp_path / "local"), engine="local", settings=settings)
    try:
        ray_run = embed_catalogue(str(tmp_path / "imgs"), str(tmp_path / "ray"), engine="ray", settings=settings)
    finally:
        ray.shutdown()
    assert ray_run.engine == "ray" and (ray_run.embedded, ray_run.skipped) == (local.embedded, local.skipped) == (10, 1)
    a, b = read_embeddings(LocalStore(tmp_path / "local")), read_embeddings(LocalStore(tmp_path / "ray"))
    va = dict(zip(a.uris, a.vectors))
    for uri, v in zip(b.uris, b.vectors):
        assert np.allclose(va[uri], v, atol=1e-4)
    assert b.errors.num_rows == 1
