"""Encoder/decoder backbones. An encoder maps ``(B, C, H, W)`` to features ``(B, F)``
(``out_features`` says F); a decoder maps ``(B, d)`` to the likelihood's parameters ``(B, C, H, W)``.
"""

from rhovae.nets.conv import ConvDecoder, ConvEncoder
from rhovae.nets.mlp import MLPDecoder, MLPEncoder

__all__ = ["ConvDecoder", "ConvEncoder", "MLPDecoder", "MLPEncoder"]
