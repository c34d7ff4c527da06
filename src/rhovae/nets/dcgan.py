"""DCGAN-style backbones (Radford et al. 2016) as used for InfoVAE on 28x28 images.

Encoder: Conv(C->64, 4x4/2) LeakyReLU(0.2), Conv(64->128, 4x4/2) BatchNorm LeakyReLU, flatten,
Linear(., 1024) BatchNorm LeakyReLU: 1024 features. Decoder: Linear(d, 1024) BatchNorm ReLU,
Linear(1024, 128*h*w) BatchNorm ReLU, ConvTranspose(128->64) BatchNorm ReLU, ConvTranspose(64->C).
Any H, W >= 4 round-trips (output padding computed as in the CNN). BatchNorm uses batch statistics in
training only: evaluation, IWAE and pictures run in eval mode.
"""

from __future__ import annotations

from torch import Tensor, nn

from rhovae.errors import RhovaeError
from rhovae.nets.conv import _down, channels_last


def _sizes(image_shape: tuple[int, int, int]) -> tuple[int, int, int, int, int, int]:
    c, h, w = image_shape
    h1, w1 = _down(h), _down(w)
    h2, w2 = _down(h1), _down(w1)
    if min(h2, w2) < 1:
        raise RhovaeError(f"the infovae model needs images of at least 4x4, got {h}x{w}; use --model mlp")
    return h, w, h1, w1, h2, w2


class DCGANEncoder(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], hidden: int = 1024) -> None:
        super().__init__()
        *_, h2, w2 = _sizes(image_shape)
        self.out_features = hidden
        self.net = nn.Sequential(
            nn.Conv2d(image_shape[0], 64, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(64, 128, 4, 2, 1), nn.BatchNorm2d(128), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(128 * h2 * w2, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(channels_last(x))


class DCGANDecoder(nn.Module):
    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], hidden: int = 1024) -> None:
        super().__init__()
        h, w, h1, w1, h2, w2 = _sizes(image_shape)
        self.map_shape = (128, h2, w2)
        self.dense = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, 128 * h2 * w2), nn.BatchNorm1d(128 * h2 * w2), nn.ReLU(),
        )  # fmt: skip
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(128, 64, 4, 2, 1, output_padding=(h1 - 2 * h2, w1 - 2 * w2)),
            nn.BatchNorm2d(64), nn.ReLU(),
            nn.ConvTranspose2d(64, image_shape[0], 4, 2, 1, output_padding=(h - 2 * h1, w - 2 * w1)),
        )  # fmt: skip

    def forward(self, z: Tensor) -> Tensor:
        lead = z.shape[:-1]
        x = self.dense(z.reshape(-1, z.shape[-1])).view(-1, *self.map_shape)
        out = self.deconv(channels_last(x)).contiguous()  # users get the usual layout back
        return out.view(*lead, *out.shape[1:])
