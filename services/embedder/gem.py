"""Generalized-mean (GeM) pooling, as in Radenović et al. / cnnimageretrieval-pytorch."""

from __future__ import annotations

import torch
from torch import nn


def gem(x: torch.Tensor, p: torch.Tensor | float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """(B, C, H, W) feature maps -> (B, C): (mean(x^p))^(1/p). p=1 is average, p->inf is max pooling."""
    # A mean over the two spatial axes rather than avg_pool2d with a kernel read off x's size: the same value, and
    # the graph exports (runtime.py) whatever the input size a multi-scale descriptor gives it.
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def l2n(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / (x.norm(p=2, dim=1, keepdim=True) + eps)


class GeM(nn.Module):
    """GeM with a learnable p (fine-tuning learns it; embedding uses it as is)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learn_p: bool = True):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p, requires_grad=learn_p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, p=self.p, eps=self.eps)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps}"
