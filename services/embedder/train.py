"""Metric-learning fine-tuning (pytorch-metric-learning losses and miners, injected by name).

The backbone's last stages and GeM's p are trained on a folder of class subfolders; the checkpoint
carries its ModelSpec (`meta`) so `imsearch embed --model model.pt` and the searchers load it as any
other model, and its training record (losses, classes seen) for the unseen-classes protocol.
"""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from services.common.errors import InvalidInput
from services.common.folders import class_folder
from services.common.images import decode_image
from services.common.plots import pyplot
from services.embedder.gem import GeM, l2n
from services.embedder.models import _load_backbone, pick_device
from services.embedder.spec import resolve_spec

LOSSES = ("triplet", "contrastive", "multisimilarity", "proxyanchor")
MINERS = ("hard", "semihard", "pair", "none")
PRE_SIZE = 1.15  # images are decoded once at 115% of the input side, then randomly cropped each epoch


def pml():
    """pytorch-metric-learning, kept from importing faiss.contrib.torch_utils: that module rewrites
    faiss.Index.search for the whole process (without the `params` argument the searchers pass)."""
    sys.modules.setdefault("faiss.contrib.torch_utils", None)  # PML imports it inside try/except
    import pytorch_metric_learning.distances
    import pytorch_metric_learning.losses
    import pytorch_metric_learning.miners
    import pytorch_metric_learning.samplers

    return pytorch_metric_learning


def make_loss(name: str, num_classes: int, dim: int):
    losses = pml().losses

    makers = {"triplet": lambda: losses.TripletMarginLoss(margin=0.1),
              "contrastive": lambda: losses.ContrastiveLoss(pos_margin=1.0, neg_margin=0.5,
                                                            distance=_cosine()),
              "multisimilarity": lambda: losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5),
              "proxyanchor": lambda: losses.ProxyAnchorLoss(num_classes, dim, margin=0.1, alpha=32)}
    if name not in makers:
        raise InvalidInput(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return makers[name]()


def _cosine():
    return pml().distances.CosineSimilarity()


def make_miner(name: str):
    miners = pml().miners

    makers = {"hard": lambda: miners.BatchHardMiner(),
              "semihard": lambda: miners.TripletMarginMiner(margin=0.1, type_of_triplets="semihard"),
              "pair": lambda: miners.PairMarginMiner(pos_margin=0.8, neg_margin=0.5, distance=_cosine()),
              "none": lambda: None}
    if name not in makers:
        raise InvalidInput(f"unknown miner {name!r}; choose one of {', '.join(MINERS)}")
    return makers[name]()


@dataclass
class TrainConfig:
    base: str = "lite0-gem"
    weights: str | None = None  # for a timm:<arch> base
    loss: str = "multisimilarity"
    miner: str = "none"
    epochs: int = 10
    batch_size: int = 32
    per_class: int = 4  # images of one class in a batch (MPerClassSampler)
    lr: float = 1e-4
    train_stages: int = 2  # the backbone's last block stages (plus its head conv) that learn
    seed: int = 0
    device: str = "auto"


@dataclass
class TrainRecord:
    config: dict
    classes: list[str]
    images: int
    losses: list[float] = field(default_factory=list)  # mean loss per epoch
    gem_p: list[float] = field(default_factory=list)
    seconds: float = 0.0


class Trainee(nn.Module):
    """Backbone + learnable GeM + L2 norm; only the last stages and the head need gradients."""

    def __init__(self, spec, train_stages: int):
        super().__init__()
        self.backbone = _load_backbone(spec)
        self.pool = GeM(p=spec.gem_p, learn_p=True)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0)
        for p in self.backbone.parameters():
            p.requires_grad = False
        stages = stages_of(self.backbone)
        learn = stages[len(stages) - train_stages:] + [m for n, m in self.backbone.named_children()
                                                       if n in ("conv_head", "bn2", "norm_pre", "head")]
        for module in learn:
            for p in module.parameters():
                p.requires_grad = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # uint8 NCHW
        return l2n(self.pool(self.backbone.forward_features((x.float() - self.mean) / self.std)))


def stages_of(backbone: nn.Module) -> list[nn.Module]:
    """The block stages of a timm backbone, input to output (EfficientNet/MobileNet `blocks`,
    ConvNeXt `stages`, ResNet `layer1..4`)."""
    for name in ("blocks", "stages"):
        if hasattr(backbone, name):
            return list(getattr(backbone, name))
    layers = [getattr(backbone, f"layer{i}") for i in range(1, 5) if hasattr(backbone, f"layer{i}")]
    if not layers:
        raise InvalidInput(f"do not know the stages of {type(backbone).__name__} to fine-tune")
    return layers


def freeze_batchnorm(module: nn.Module) -> None:
    """Batches of a few classes give poor batch statistics: BatchNorm keeps its pretrained ones."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.eval()


def load_images(paths: list[Path], size: int) -> torch.Tensor:
    """uint8 N x 3 x S x S, S = PRE_SIZE * input side (decoded once, augmented every epoch)."""
    side = int(round(size * PRE_SIZE))
    out = np.stack([decode_image(p.read_bytes(), side, 1 << 30, 1 << 28).pixels for p in paths])
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def augment(size: int):
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                       v2.ColorJitter(0.3, 0.3, 0.2, 0.02)])


def train(data: str | Path, out: str | Path, cfg: TrainConfig,
          progress: Callable[[int, int, float], None] | None = None) -> TrainRecord:
    """Fine-tune cfg.base on the class folder `data`; writes the checkpoint `out` (and its loss curve)."""
    samplers = pml().samplers

    if cfg.epochs < 1 or cfg.per_class < 1 or cfg.batch_size < 2 * cfg.per_class or cfg.batch_size % cfg.per_class:
        raise InvalidInput("need epochs >= 1 and a batch of at least two classes: batch_size a multiple of "
                           "per_class, at least 2 * per_class")
    out = Path(out)
    if out.suffix not in (".pt", ".pth"):
        raise InvalidInput(f"checkpoint name must end in .pt or .pth, got {out.name}")
    torch.manual_seed(cfg.seed)
    spec = resolve_spec(cfg.base, cfg.weights)
    items = class_folder(data)
    classes = sorted({it.label for it in items})
    labels = torch.tensor([classes.index(it.label) for it in items])
    images = load_images([it.path for it in items], spec.image_size)
    device = pick_device(cfg.device)
    model = Trainee(spec, cfg.train_stages).to(device)
    loss_fn, miner = make_loss(cfg.loss, len(classes), spec.dim).to(device), make_miner(cfg.miner)
    groups = [{"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": cfg.lr},
              {"params": model.pool.parameters(), "lr": cfg.lr * 10}]
    if list(loss_fn.parameters()):  # proxies learn fast
        groups.append({"params": loss_fn.parameters(), "lr": cfg.lr * 100})
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    batch = min(cfg.batch_size, cfg.per_class * len(classes))  # the sampler fills a batch from distinct classes
    steps = len(labels) // batch
    if steps == 0:
        raise InvalidInput(f"{len(labels)} images are fewer than one batch of {batch}")
    sampler = samplers.MPerClassSampler(labels, cfg.per_class, batch_size=batch, length_before_new_iter=len(labels))
    aug = augment(spec.image_size)
    record = TrainRecord(asdict(cfg), classes, len(items))
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        model.backbone.apply(freeze_batchnorm)
        order = torch.tensor(list(iter(sampler)))
        epoch_losses = []
        for step in range(steps):
            idx = order[step * batch:(step + 1) * batch]
            x = torch.stack([aug(images[i]) for i in idx]).to(device)
            y = labels[idx].to(device)
            emb = model(x)
            loss = loss_fn(emb, y, miner(emb, y)) if miner is not None else loss_fn(emb, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            epoch_losses.append(float(loss.detach()))
            if progress:
                progress(epoch * steps + step + 1, cfg.epochs * steps, epoch_losses[-1])
        record.losses.append(float(np.mean(epoch_losses)) if epoch_losses else float("nan"))
        record.gem_p.append(float(model.pool.p.detach()))
    record.seconds = time.perf_counter() - start
    save_checkpoint(model, spec, record, out)
    return record


def save_checkpoint(model: Trainee, spec, record: TrainRecord, out: Path) -> None:
    """The fine-tuned model as an imsearch checkpoint (meta = its ModelSpec), written crash-safe,
    plus the loss curve (PNG) and the training record (JSON) beside it."""
    from services.common.store import atomic_write

    name = str(out.resolve())  # the model's name is its checkpoint: every process can load it by name
    meta = asdict(replace(spec, name=name, weights=name, extra={
        "gem_p_learned": record.gem_p[-1], "base": spec.name, "base_fingerprint": spec.fingerprint,
        "train_classes": record.classes, "train": record.config}))
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"meta": meta, "backbone": {k: v.cpu() for k, v in model.backbone.state_dict().items()},
                "record": asdict(record)}, buf)
    atomic_write(out, buf.getvalue())
    atomic_write(out.with_suffix(".json"), json.dumps(asdict(record), indent=1).encode())
    loss_curve(record, out.with_suffix(".loss.png"))


def loss_curve(record: TrainRecord, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(record.losses) + 1), record.losses, marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{record.config['loss']} loss (mean over the epoch)")
    ax.set_title(f"fine-tuning {record.config['base']} on {len(record.classes)} classes, {record.images} images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
