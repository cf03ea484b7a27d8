"""Min-max normalisation to [-1, 1], as Diffusion Policy and LeRobot apply it to states and actions."""

from __future__ import annotations

import torch
from torch import nn

EPS = 1e-8  # LeRobot's: a constant dimension maps to -1 instead of dividing by zero


class MinMaxNormalizer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("min", torch.full((dim,), -1.0))
        self.register_buffer("max", torch.full((dim,), 1.0))

    @torch.no_grad()
    def fit(self, data: torch.Tensor) -> MinMaxNormalizer:
        flat = data.reshape(-1, data.shape[-1])
        self.min.copy_(flat.min(dim=0).values)
        self.max.copy_(flat.max(dim=0).values)
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.min) / (self.max - self.min + EPS) * 2 - 1

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 1) / 2 * (self.max - self.min + EPS) + self.min
