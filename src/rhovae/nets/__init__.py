"""Encoder/decoder backbones. An encoder maps ``(B, C, H, W)`` to features ``(B, F)``
(``out_features`` says F); a decoder maps ``(..., d)`` to the likelihood's parameters ``(..., C, H, W)``.
"""

from rhovae.nets.burgess import BurgessDecoder, BurgessEncoder
from rhovae.nets.conv import ConvDecoder, ConvEncoder, SpatialConvDecoder, SpatialConvEncoder
from rhovae.nets.dcgan import DCGANDecoder, DCGANEncoder
from rhovae.nets.mlp import MLPDecoder, MLPEncoder

__all__ = [
    "BurgessDecoder",
    "BurgessEncoder",
    "ConvDecoder",
    "ConvEncoder",
    "SpatialConvDecoder",
    "SpatialConvEncoder",
    "DCGANDecoder",
    "DCGANEncoder",
    "MLPDecoder",
    "MLPEncoder",
]
