"""The convolutional beta-VAE backbones of Higgins et al. (2017) / Burgess et al. (2018), on 64x64 inputs.

Encoder: four 4x4 stride-2 convolutions with 32, 32, 64, 64 filters (64 -> 32 -> 16 -> 8 -> 4), then
Linear(64*4*4, 256) and ReLU: 256 features for the posterior head. The decoder mirrors it. Images are
resized to 64x64 once, on the device, when the data is loaded (``Backbone.input_size``).
"""

from __future__ import annotations

from torch import Tensor, nn

from rhovae.errors import RhovaeError
from rhovae.nets.conv import channels_last

INPUT_SIZE = (64, 64)


def _check(image_shape: tuple[int, int, int]) -> int:
    c, h, w = image_shape
    if (h, w) != INPUT_SIZE:
        raise RhovaeError(f"the betavae model takes 64x64 images (resized when loading), got {h}x{w}")
    return c


class BurgessEncoder(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], hidden: int = 256) -> None:
        super().__init__()
        c = _check(image_shape)
        self.out_features = hidden
        self.net = nn.Sequential(
            nn.Conv2d(c, 32, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 32, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(64, 64, 4, 2, 1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 4 * 4, hidden), nn.ReLU(),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(channels_last(x))


class BurgessDecoder(nn.Module):
    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], hidden: int = 256) -> None:
        super().__init__()
        c = _check(image_shape)
        self.dense = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, 64 * 4 * 4), nn.ReLU()
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(64, 64, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(32, 32, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(32, c, 4, 2, 1),
        )  # fmt: skip

    def forward(self, z: Tensor) -> Tensor:
        lead = z.shape[:-1]
        x = self.dense(z.reshape(-1, z.shape[-1])).view(-1, 64, 4, 4)
        out = self.deconv(channels_last(x)).contiguous()  # users get the usual layout back
        return out.view(*lead, *out.shape[1:])
