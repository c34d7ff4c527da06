"""The paper's MLP ("vanilla") VAE backbones: pixels-400 encoder and z-400-pixels decoder, ReLU."""

from __future__ import annotations

import math

from torch import Tensor, nn


class MLPEncoder(nn.Module):
    """``(B, C, H, W) -> (B, hidden)``: flatten, Linear, ReLU."""

    def __init__(self, image_shape: tuple[int, int, int], hidden: int = 400) -> None:
        super().__init__()
        self.out_features = hidden
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(image_shape), hidden), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MLPDecoder(nn.Module):
    """``(B, d) -> (B, C, H, W)`` logits: Linear, ReLU, Linear."""

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], hidden: int = 400) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, math.prod(image_shape))
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).view(z.shape[:-1] + self.image_shape)
