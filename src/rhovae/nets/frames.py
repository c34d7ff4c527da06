"""The frames model's networks: one encoder and one decoder applied to every frame of a sequence.

Data are sequences ``x (B, T, *frame)`` whose missing values are NaN. The encoder reads each frame
with its missing values set to 0 and its observation mask beside it (so "0 because missing" and "0
because dark" differ), gives per-frame features, then mixes each frame's features with its two
neighbours' by a width-3 convolution along time (GP-VAE's encoder for HMNIST does the same with its
window of 3 frames). The posterior head (:class:`rhovae.posteriors.TrajectoryHead`) turns the features
``(B, T, F)`` into ``q(z | x)`` over C latent trajectories ``(B, C, T)``; the decoder maps each frame's
code ``z[:, :, t]`` back to that frame's likelihood parameters, independently in time.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from rhovae.errors import RhovaeError
from rhovae.nets.conv import ConvDecoder, ConvEncoder
from rhovae.nets.mlp import MLPDecoder

__all__ = ["FRAME_NETS", "FrameDecoder", "FrameEncoder"]

#: the per-frame networks ``--frame-net`` names
FRAME_NETS = ("mlp", "conv")


def _frame_net_check(net: str, frame: tuple[int, ...]) -> None:
    if net not in FRAME_NETS:
        raise RhovaeError(f"unknown frame-net {net!r}; choose one of: {', '.join(FRAME_NETS)}")
    if net == "conv" and len(frame) != 3:
        raise RhovaeError(
            f"frame-net conv needs image frames (C, H, W), got frames of shape {frame}; use --frame-net mlp"
        )


class FrameEncoder(nn.Module):
    """``x (B, T, *frame)`` with NaN where missing ``-> (B, T, hidden)`` features.

    Per frame: the values (missing ones as 0) and the observation mask, through an MLP (one hidden layer
    of ``hidden`` units, ReLU) or the paper's cnn encoder on the values and mask as two channel groups;
    then ``Conv1d(hidden, hidden, 3, padding=1)`` along time and ReLU.
    """

    def __init__(self, data_shape: tuple[int, ...], hidden: int = 400, net: str = "mlp") -> None:
        super().__init__()
        if len(data_shape) < 2:
            raise RhovaeError(f"frame sequences have shape (T, *frame), got items of shape {data_shape}")
        self.frames, self.frame_shape = data_shape[0], tuple(data_shape[1:])
        _frame_net_check(net, self.frame_shape)
        self.out_features = hidden
        if net == "mlp":
            self.frame_net: nn.Module = nn.Sequential(
                nn.Flatten(), nn.Linear(2 * math.prod(self.frame_shape), hidden), nn.ReLU()
            )
        else:
            c, h, w = self.frame_shape
            if min(h, w) < 4:
                raise RhovaeError(
                    f"frame-net conv needs frames of at least 4x4, got {h}x{w}; use --frame-net mlp"
                )
            self.frame_net = ConvEncoder((2 * c, h, w), hidden)
        self.net = net
        self.time = nn.Conv1d(hidden, hidden, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        observed = ~x.isnan()
        values = x.masked_fill(~observed, 0.0)
        b, t = x.shape[:2]
        frames = values.reshape(b * t, *self.frame_shape)
        flags = observed.to(x.dtype).reshape(b * t, *self.frame_shape)
        joined = frames.new_empty((b * t, 2 * frames.shape[1], *self.frame_shape[1:]))
        joined[:, : frames.shape[1]], joined[:, frames.shape[1] :] = frames, flags
        h = self.frame_net(joined).view(b, t, -1)
        return self.time(h.transpose(1, 2)).relu().transpose(1, 2)


class FrameDecoder(nn.Module):
    """``z (N, C, T) -> (N, T, *frame)`` likelihood parameters, each frame from its own code ``z[:, :, t]``
    (the mlp: Linear, ReLU, Linear; conv: the paper's cnn decoder)."""

    def __init__(
        self, channels: int, data_shape: tuple[int, ...], hidden: int = 400, net: str = "mlp"
    ) -> None:
        super().__init__()
        self.frames, self.frame_shape = data_shape[0], tuple(data_shape[1:])
        _frame_net_check(net, self.frame_shape)
        if net == "mlp":
            self.frame_net: nn.Module = MLPDecoder(channels, self.frame_shape, hidden)
        else:
            self.frame_net = ConvDecoder(channels, self.frame_shape)  # type: ignore[arg-type]

    def forward(self, z: Tensor) -> Tensor:
        n, c, t = z.shape
        out = self.frame_net(z.transpose(1, 2).reshape(n * t, c))
        return out.view(n, t, *self.frame_shape)
