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


class _Payload:
    """What a hostile weights file carries: an object whose unpickling runs a command."""

    def __reduce__(self):
        import os

        return os.system, ("touch " + str(_Payload.marker),)


def test_a_weights_file_or_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    """Before: torch.load(weights_only=False) on any path a manifest or a model name could give: loading the file
    ran whatever it carried."""
    _Payload.marker = tmp_path / "ran"
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    torch.save({**state, "extra": _Payload()}, tmp_path / "evil.pth")
    torch.save({"meta": {"name": "x"}, "backbone": state, "trap": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(InvalidInput, match="not loadable as weights only"):
        Embedder(resolve_spec("timm:resnet18", tmp_path / "evil.pth"), device="cpu")
    with pytest.raises(InvalidInput, match="not loadable as weights only"):
        resolve_spec(str(tmp_path / "evil.pt"))
    assert not _Payload.marker.exists()


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


def test_descriptor_options_after_an_at(tmp_path):
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "r18.pth")
    plain = resolve_spec("timm:resnet18", tmp_path / "r18.pth")
    ms = resolve_spec("timm:resnet18@p=4,ms", tmp_path / "r18.pth")
    assert (ms.gem_p, ms.scales, ms.name) == (4.0, (1.0, 2 ** -0.5, 0.5), "timm:resnet18@p=4,ms")
    assert len({plain.fingerprint, ms.fingerprint, resolve_spec("timm:resnet18@p=4", tmp_path / "r18.pth")
                .fingerprint}) == 3  # every option changes the vector space
    assert resolve_spec("timm:resnet18@scales=1+0.5,size=128", tmp_path / "r18.pth").image_size == 128
    for bad in ("p=0", "ms=2", "scales=1+9", "size=5", "colour=red", "p=x"):
        with pytest.raises(InvalidInput, match="model option"):
            resolve_spec(f"timm:resnet18@{bad}", tmp_path / "r18.pth")


def test_multi_scale_descriptor_is_the_normalised_sum_of_scales(tmp_path):
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "r18.pth")
    pixels = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    single = Embedder(resolve_spec("timm:resnet18", tmp_path / "r18.pth"), device="cpu")
    both = Embedder(resolve_spec("timm:resnet18@scales=1+0.5", tmp_path / "r18.pth"), device="cpu")
    # the half-scale descriptor computed by hand: resize the normalised input, embed with the 1x model
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() - single.mean) / single.std
    x_half = torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True,
                                             align_corners=False)
    with torch.no_grad():
        v_half = torch.nn.functional.normalize(single.pool(single.backbone.forward_features(x_half)), dim=1)
    total = single.embed(pixels) + v_half.numpy()
    expected = total / np.linalg.norm(total, axis=1, keepdims=True)
    assert both.embed(pixels) == pytest.approx(expected, abs=1e-5)


def test_a_transformer_from_a_weights_file_is_described_by_its_class_token(tmp_path):
    """DINO- or CLIP-style weights as a file: `timm:<vit arch>@norm=...`; the descriptor is the class token."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    spec = resolve_spec("timm:vit_tiny_patch16_224@norm=imagenet", tmp_path / "vit.pth")
    assert spec.dim == 192 and spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    assert resolve_spec("timm:vit_tiny_patch16_224@norm=clip", tmp_path / "vit.pth").fingerprint != spec.fingerprint
    emb = Embedder(spec, device="cpu")
    pixels = np.random.default_rng(2).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() - emb.mean) / emb.std
    with torch.no_grad():
        cls = torch.nn.functional.normalize(vit.eval().forward_features(x)[:, 0], dim=1).numpy()
    assert emb.embed(pixels) == pytest.approx(cls, abs=1e-5)
    with pytest.raises(InvalidInput, match="norm=half"):
        resolve_spec("timm:vit_tiny_patch16_224@norm=mine", tmp_path / "vit.pth")
