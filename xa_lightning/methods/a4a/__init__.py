"""A4A ("Adapter for Adapter"): an SD1.5 IP-Adapter (the PTA) transferred to SDXL or PixArt-alpha.

See README.md in this folder. Public API:

- :class:`A4AAdapter` (diffusers ``ModelMixin``): Coupling Space Projection, Upgraded Space Mapping (K and V),
  Alignment, and the PTA when it is fine-tuned.
- :class:`ImageInjection`, :class:`ImageAttnProcessor`: Attn(q, text) + lambda Attn(q, k^, v^) in every
  cross-attention layer of a UNet or a DiT, through the shared surgery layer.
- :class:`A4APipeline`: the upgraded model's diffusers pipeline + A4A + the PTA's image encoder.
- :class:`A4AModule`: the LightningModule (``method=a4a``); its options in :mod:`.config`.
"""

from xa_lightning.methods.a4a.attention import ImageAttnProcessor, ImageCondition, ImageInjection
from xa_lightning.methods.a4a.config import (
    AdapterOptions,
    LearningRates,
    PTAOptions,
    SamplingOptions,
    TrainingOptions,
)
from xa_lightning.methods.a4a.lit_module import A4AModule
from xa_lightning.methods.a4a.modules import A4AAdapter, UpgradedSpaceMapping, coupling_dim, image_keys_values
from xa_lightning.methods.a4a.pipeline import A4APipeline

__all__ = [
    "A4AAdapter",
    "A4AModule",
    "A4APipeline",
    "AdapterOptions",
    "ImageAttnProcessor",
    "ImageCondition",
    "ImageInjection",
    "LearningRates",
    "PTAOptions",
    "SamplingOptions",
    "TrainingOptions",
    "UpgradedSpaceMapping",
    "coupling_dim",
    "image_keys_values",
]
