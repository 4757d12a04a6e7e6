"""Frozen diffusion backbones (SD1.5, SDXL, PixArt-alpha) behind one small interface.

See docs/contracts.md ("Backbones") and this folder's README.md.
"""

from .backbone import (
    FAMILIES,
    Backbone,
    CrossAttentionLayer,
    PixArtAlphaBackbone,
    SD15Backbone,
    SDXLBackbone,
    TextConditioning,
)
from .config import FLAVOURS, BackboneConfig
from .factory import backbone_from_config, build_backbone

__all__ = [
    "FAMILIES",
    "FLAVOURS",
    "Backbone",
    "BackboneConfig",
    "CrossAttentionLayer",
    "PixArtAlphaBackbone",
    "SD15Backbone",
    "SDXLBackbone",
    "TextConditioning",
    "backbone_from_config",
    "build_backbone",
]
