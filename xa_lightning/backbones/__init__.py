"""Frozen diffusion backbones (SD1.5, SDXL, PixArt-alpha) behind one small interface.

See docs/contracts.md ("Backbones") and this folder's README.md.
"""

from .backbone import (
    FAMILIES,
    Backbone,
    PixArtAlphaBackbone,
    SD15Backbone,
    SDXLBackbone,
    TextConditioning,
)
from .config import FLAVOURS, BackboneConfig
from .factory import backbone_from_config, build_backbone
from .surgery import AttentionLayer, Surgery

__all__ = [
    "FAMILIES",
    "FLAVOURS",
    "Backbone",
    "BackboneConfig",
    "AttentionLayer",
    "Surgery",
    "PixArtAlphaBackbone",
    "SD15Backbone",
    "SDXLBackbone",
    "TextConditioning",
    "backbone_from_config",
    "build_backbone",
]
