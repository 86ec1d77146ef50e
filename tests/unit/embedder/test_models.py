import numpy as np
import pytest
import timm
import torch

from services.common.errors import Incompatible, InvalidInput
from services.embedder.models import Embedder, pick_device, resolve_spec


def test_timm_backbone_loads_weights_from_a_file(tmp_path):
    model = timm.create_model("resnet18", pretrained=False)
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    spec = resolve_spec("timm:resnet18", tmp_path / "r18.pth")
    assert spec.dim == 512 and len(spec.fingerprint) == 16
    emb = Embedder(spec, device="cpu")
    out = emb.embed(np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
    assert out.shape == (2, 512) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-4)
    # The loaded weights are the file's, not a fresh random init.
    assert torch.equal(emb.backbone.conv1.weight, model.conv1.weight)
    with pytest.raises(InvalidInput, match="N x H x W x 3"):
        emb.embed(np.zeros((2, 64, 64), np.uint8))
    assert emb.embed(np.zeros((0, 64, 64, 3), np.uint8)).shape == (0, 512)


def test_mismatched_weights_are_refused(tmp_path):
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(Incompatible, match="do not match"):
        Embedder(resolve_spec("timm:resnet34", tmp_path / "r18.pth"), device="cpu")


def test_fingerprint_follows_the_weights(tmp_path):
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / f"{seed}.pth")
    a, b = resolve_spec("timm:resnet18", tmp_path / "0.pth"), resolve_spec("timm:resnet18", tmp_path / "1.pth")
    assert a.fingerprint != b.fingerprint


def test_device_check():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():  # on a GPU machine asking for cuda is valid
        with pytest.raises(InvalidInput, match="no CUDA"):
            pick_device("cuda")
