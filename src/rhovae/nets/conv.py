"""The paper's CNN VAE backbones: two 4x4 stride-2 convolutions (64, 128 filters) and two dense layers.

Encoder ``(B, C, H, W) -> (B, hidden)``: conv 64 -> conv 128 -> flatten -> Linear(., 1024) -> Linear(1024,
hidden), ReLU between. The decoder mirrors it with transposed convolutions and reproduces any H, W >= 4
exactly (output padding is computed from the encoder's sizes). Unlike the reference code's
``padding=15`` variant (over 100M parameters in its first dense layer), padding is 1, so on 28x28 the
flattened map is 128x7x7.

Weights are He-initialised (``kaiming_normal_`` for ReLU, zero biases). With torch's default
initialisation the activations shrink ~2.5x per layer (std 0.03 after the second convolution on MNIST),
and the first Adam steps at lr 1e-3 push every unit of the second convolution below zero within ten
steps: the encoder's output is then the same for every image and the posterior collapses (KL < 0.03
nats after 40 epochs on mnist-5k, with or without KL warm-up). He initialisation keeps the units alive.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rhovae.errors import RhovaeError


def channels_last(x: Tensor) -> Tensor:
    """``x`` in channels-last layout: oneDNN's (and cuDNN's) faster path for these convolutions. On a
    2-core CPU it cuts a 1,000-sample IWAE decoder pass by 20-45 % (benchmarks/bench_models.py)."""
    return x.contiguous(memory_format=torch.channels_last)


def he_init(module: nn.Module) -> None:
    """He (Kaiming) normal weights for ReLU layers and zero biases, for every conv and linear layer."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _down(size: int) -> int:
    """Output size of a 4x4, stride-2, padding-1 convolution."""
    return (size + 2 - 4) // 2 + 1


class ConvEncoder(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], hidden: int = 400, dense: int = 1024) -> None:
        super().__init__()
        c, h, w = image_shape
        h2, w2 = _down(_down(h)), _down(_down(w))
        if min(h2, w2) < 1:
            raise RhovaeError(f"the cnn model needs images of at least 4x4, got {h}x{w}; use --model mlp")
        self.out_features = hidden
        self.net = nn.Sequential(
            nn.Conv2d(c, 64, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(64, 128, 4, 2, 1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(128 * h2 * w2, dense),
            nn.ReLU(),
            nn.Linear(dense, hidden),
            nn.ReLU(),
        )
        he_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(channels_last(x))


class ConvDecoder(nn.Module):
    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], dense: int = 1024) -> None:
        super().__init__()
        c, h, w = image_shape
        h1, w1 = _down(h), _down(w)
        h2, w2 = _down(h1), _down(w1)
        self.map_shape = (128, h2, w2)
        self.dense = nn.Sequential(
            nn.Linear(latent_dim, dense), nn.ReLU(), nn.Linear(dense, 128 * h2 * w2), nn.ReLU()
        )
        # a transposed 4x4/2/1 convolution maps n to 2n + output_padding
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(128, 64, 4, 2, 1, output_padding=(h1 - 2 * h2, w1 - 2 * w2)),
            nn.ReLU(),
            nn.ConvTranspose2d(64, c, 4, 2, 1, output_padding=(h - 2 * h1, w - 2 * w1)),
        )
        he_init(self)

    def forward(self, z: Tensor) -> Tensor:
        lead = z.shape[:-1]
        x = self.dense(z.reshape(-1, z.shape[-1])).view(-1, *self.map_shape)
        out = self.deconv(channels_last(x)).contiguous()  # users get the usual layout back
        return out.view(*lead, *out.shape[1:])


# --- spatial latents: the encoder ends in a feature map, the decoder starts from the latent map ---------


def map_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """The latent map sizes ``(H, W)`` the spatial cnn can give for ``height x width`` images: the input
    size and each size after another stride-2 convolution, down to 1x1 (the paper's two 4x4 ones, then
    3x3 ones that round up: 28 -> 14 -> 7 -> 4 -> 2 -> 1)."""
    sizes = [(height, width)]
    while max(sizes[-1]) > 1:
        step = _down if len(sizes) <= 2 else _half_up
        nxt = (step(sizes[-1][0]), step(sizes[-1][1]))
        if min(nxt) < 1:
            break
        sizes.append(nxt)
    return sizes


def _half_up(size: int) -> int:
    """Output size of a 3x3, stride-2, padding-1 convolution: ``ceil(size / 2)``."""
    return (size - 1) // 2 + 1


def downsamplings(image_shape: tuple[int, int, int], latent_shape: tuple[int, int, int]) -> int:
    """How many stride-2 convolutions take ``image_shape`` to the latent map's ``(H, W)``; a latent
    shape no count of them reaches is one line naming those that are reachable."""
    _, h, w = image_shape
    sizes = map_sizes(h, w)
    if tuple(latent_shape[1:]) not in sizes:
        shapes = ", ".join(f"C,{a},{b}" for a, b in sizes)
        raise RhovaeError(
            f"the cnn cannot produce a latent map of {latent_shape[1]}x{latent_shape[2]} from {h}x{w} "
            "images; "
            f"--latent-shape can be {shapes} (any C)"
        )
    return sizes.index(tuple(latent_shape[1:]))


#: channels of the spatial cnn's layers: the paper's 64 and 128, then 128 for further downsamplings
def _map_channels(image_channels: int, steps: int) -> list[int]:
    return [image_channels] + [64 if i == 0 else 128 for i in range(steps)]


class SpatialConvEncoder(nn.Module):
    """``(B, C_img, H_img, W_img) -> (B, 128, H, W)``: the paper's 4x4 stride-2 convolutions (64, then 128
    filters) until the latent map's size is reached, then a 3x3 convolution to 128 channels, ReLU
    between. Its features keep their positions: a map head turns each position's features into that
    position's posterior parameters (``out_features`` is the feature channels, ``out_shape`` the map)."""

    def __init__(self, image_shape: tuple[int, int, int], latent_shape: tuple[int, int, int]) -> None:
        super().__init__()
        steps = downsamplings(image_shape, latent_shape)
        channels = _map_channels(image_shape[0], steps)
        layers: list[nn.Module] = []
        for i in range(steps):
            kernel = 4 if i < 2 else 3
            layers += [nn.Conv2d(channels[i], channels[i + 1], kernel, 2, 1), nn.ReLU()]
        layers += [nn.Conv2d(channels[-1], 128, 3, 1, 1), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.out_features = 128
        self.out_shape = (128, *latent_shape[1:])
        he_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(channels_last(x))


class SpatialConvDecoder(nn.Module):
    """``z (N, C, H, W) -> (N, C_img, H_img, W_img)`` logits or means: a 3x3 convolution from the latent
    map, then the encoder's transposed convolutions back to the image size (output padding from the
    encoder's sizes, so any image size is reproduced exactly). Leading dimensions of z are kept."""

    def __init__(self, latent_shape: tuple[int, int, int], image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        c, h, w = image_shape
        steps = downsamplings(image_shape, latent_shape)
        channels = _map_channels(c, steps)
        sizes = map_sizes(h, w)
        self.latent_shape = tuple(latent_shape)
        layers: list[nn.Module] = [
            nn.Conv2d(latent_shape[0], channels[-1] if steps else 128, 3, 1, 1),
            nn.ReLU(),
        ]
        for i in reversed(range(steps)):
            # a transposed k x k / 2 / 1 convolution maps n to 2n + k - 4 + output_padding
            kernel = 4 if i < 2 else 3
            pad = tuple(sizes[i][a] - (2 * sizes[i + 1][a] + kernel - 4) for a in (0, 1))
            layers.append(nn.ConvTranspose2d(channels[i + 1], channels[i], kernel, 2, 1, output_padding=pad))
            if i:
                layers.append(nn.ReLU())
        if not steps:
            layers.append(nn.Conv2d(128, c, 3, 1, 1))
        self.net = nn.Sequential(*layers)
        he_init(self)

    def forward(self, z: Tensor) -> Tensor:
        lead = z.shape[:-3]
        out = self.net(channels_last(z.reshape(-1, *z.shape[-3:]))).contiguous()
        return out.view(*lead, *out.shape[1:])
