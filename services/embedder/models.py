"""Models: backbone + GeM pooling + L2 normalisation, loaded offline from a ModelSpec."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from services.common.errors import Incompatible, InvalidInput
from services.embedder.gem import GeM, l2n
from services.embedder.spec import (  # noqa: F401
    REGISTRY,
    ModelSpec,
    load_weights,
    register,
    resolve_spec,
    weights_sha256,
)


def pick_device(setting: str = "auto") -> torch.device:
    """The one device check: CUDA when asked for or available, CPU otherwise."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("device 'cuda' requested but no CUDA device is available")
    return torch.device("cuda" if setting != "cpu" and torch.cuda.is_available() else "cpu")


def _load_backbone(spec: ModelSpec) -> nn.Module:
    import timm

    model = timm.create_model(spec.arch, pretrained=False, num_classes=0, global_pool="")
    state = load_weights(spec.weights)
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

    runtime = "torch"

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def label(self) -> str:
        """The runtime, precision and device, as a run's first line says them."""
        return f"torch fp32 on {'the GPU' if self.on_gpu else 'the CPU'}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.permute(0, 3, 1, 2).float() - self.mean) / self.std
        if tuple(self.spec.scales) == (1.0,):
            return l2n(self.describe(self.backbone.forward_features(x)))
        total = 0
        for s in self.spec.scales:  # multi-scale: one descriptor per input scale, summed
            xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", antialias=True,
                                                  align_corners=False)
            total = total + l2n(self.describe(self.backbone.forward_features(xs)))
        return l2n(total)

    def describe(self, features: torch.Tensor) -> torch.Tensor:
        """A CNN's feature map (B, C, H, W) -> GeM; a transformer's tokens (B, N, C) -> its class token, as
        DINO- and CLIP-style retrieval uses it (the token mean when the model has none)."""
        if features.ndim == 3:
            return features[:, 0] if getattr(self.backbone, "num_prefix_tokens", 0) else features.mean(dim=1)
        return self.pool(features)

    @torch.inference_mode()
    def embed(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise InvalidInput(f"expected N x H x W x 3 pixels, got shape {pixels.shape}")
        if len(pixels) == 0:
            return np.zeros((0, self.spec.dim), np.float32)
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device, non_blocking=True)
        return self.forward(x).cpu().numpy().astype(np.float32)


@lru_cache(maxsize=4)
def torch_embedder(name: str, weights: str | None = None, device: str = "auto") -> Embedder:
    """The model in PyTorch, cached per process (loading costs seconds). What embeds is runtime.load_embedder's
    choice; this is torch's side of it (and what exports the graph)."""
    return Embedder(resolve_spec(name, weights), device)


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads (None: torch's default, every core)."""
    if threads:
        torch.set_num_threads(threads)
