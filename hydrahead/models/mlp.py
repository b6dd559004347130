"""A small MLP backbone for feature inputs (pre-extracted or synthetic features)."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Features (B x input_dim) -> embedding (B x embed_dim).

    ``depth`` hidden layers of Linear -> LayerNorm -> GELU, then a Linear neck.
    LayerNorm rather than BatchNorm: it uses no batch statistics, so the output for a
    sample does not depend on how the global batch is split over ranks.
    """

    input_kind = "features"

    def __init__(self, input_dim: int, embed_dim: int, hidden_dim: int = 256, depth: int = 2):
        super().__init__()
        if depth < 0:
            raise ValueError(f"MLP depth must be >= 0, got {depth}")
        self.input_dim = input_dim
        self.embed_dim = embed_dim
        layers: list[nn.Module] = []
        width = input_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU()]
            width = hidden_dim
        self.trunk = nn.Sequential(*layers)
        self.neck = nn.Linear(width, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.trunk(x))
