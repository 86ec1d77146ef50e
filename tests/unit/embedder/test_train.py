"""Fine-tuning on generated images with a small timm backbone: every loss and miner runs, the
checkpoint loads as a model by its name, and it carries its record."""

import json

import numpy as np
import pytest
import timm
import torch

from services.common.errors import InvalidInput
from services.embedder.runtime import load_embedder
from services.embedder.spec import resolve_spec
from services.embedder.train import LOSSES, TrainConfig, train
from tests.helpers import pattern

ARCH = "mobilenetv3_small_050"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    torch.save(timm.create_model(ARCH, pretrained=False).state_dict(), tmp / "w.pth")
    for c in range(3):
        (tmp / "data" / f"class{c}").mkdir(parents=True)
        for i in range(4):
            pattern(48, 48, seed=10 * c + i % 2).save(tmp / "data" / f"class{c}" / f"{i}.png")
    return tmp


def config(setup, **kw) -> TrainConfig:
    base = dict(base=f"timm:{ARCH}@size=64", weights=str(setup / "w.pth"), epochs=1, batch_size=8, per_class=2,
                device="cpu")
    return TrainConfig(**(base | kw))


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains_and_the_checkpoint_is_a_model(setup, loss):
    out = setup / f"{loss}.pt"
    record = train(setup / "data", out, config(setup, loss=loss, miner="semihard" if loss == "triplet" else "none"))
    assert len(record.losses) == 1 and np.isfinite(record.losses[0])
    assert record.classes == ["class0", "class1", "class2"] and record.images == 12
    emb = load_embedder(str(out.resolve()), device="cpu")  # loaded by name, as the searchers do
    vectors = emb.embed(np.zeros((2, 64, 64, 3), np.uint8))
    assert vectors.shape == (2, emb.spec.dim) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    spec = resolve_spec(str(out))
    assert spec.extra["train_classes"] == record.classes and spec.extra["train"]["loss"] == loss
    assert spec.fingerprint != resolve_spec(f"timm:{ARCH}@size=64", setup / "w.pth").fingerprint
    assert json.loads(out.with_suffix(".json").read_text())["losses"] == record.losses
    assert out.with_suffix(".loss.png").stat().st_size > 1000


def test_training_changes_the_last_stages_only(setup):
    out = setup / "stages.pt"
    train(setup / "data", out, config(setup, epochs=2, train_stages=1, lr=1e-2, miner="hard"))
    before = timm.create_model(ARCH, pretrained=False, num_classes=0, global_pool="")
    before.load_state_dict(torch.load(setup / "w.pth"), strict=False)
    after = torch.load(out, weights_only=False)["backbone"]
    first, last = "blocks.0.0.conv_dw.weight", f"blocks.{len(before.blocks) - 1}.0.conv.weight"
    assert torch.equal(after[first], before.state_dict()[first])  # frozen
    assert not torch.equal(after[last], before.state_dict()[last])  # learned


def test_bad_training_input(setup):
    with pytest.raises(InvalidInput, match="unknown loss"):
        train(setup / "data", setup / "x.pt", config(setup, loss="arcface2"))
    with pytest.raises(InvalidInput, match="unknown miner"):
        train(setup / "data", setup / "x.pt", config(setup, miner="random"))
    with pytest.raises(InvalidInput, match=".pt"):
        train(setup / "data", setup / "x.bin", config(setup))
    with pytest.raises(InvalidInput, match="batch"):
        train(setup / "data", setup / "x.pt", config(setup, batch_size=2))


def test_training_leaves_faiss_search_params_working(setup):
    """pytorch-metric-learning would import faiss.contrib.torch_utils, which drops search(params=...)."""
    import faiss

    from services.index import faiss_util

    train(setup / "data", setup / "p.pt", config(setup))
    index = faiss.index_factory(8, "IVF2,Flat", faiss.METRIC_INNER_PRODUCT)
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # unit vectors: each is its own best inner product
    index.train(x)
    index.add(x)
    _, I = faiss_util.search(index, x[:3], 1, nprobe=2)  # raised TypeError with torch_utils loaded
    assert I[:, 0].tolist() == [0, 1, 2]
