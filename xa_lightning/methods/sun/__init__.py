"""SpeedUpNet (SUN): CFG-free 4-step sampling through a negative-prompt cross-attention adapter, trained by
Multi-Step Consistency distillation from the frozen model with classifier-free guidance.

See README.md in this folder. Public API:

- :class:`SUNAdapter` (diffusers ``ModelMixin``): the per-layer weights; ``from_unet``, ``install``,
  ``uninstall``, ``disabled()``, ``set_scale``; :func:`concat_negative` builds its encoder states.
- :class:`SUNPipeline`: wraps any Stable Diffusion pipeline (txt2img, img2img, inpaint, ControlNet).
- :func:`load_official_adapter`, :func:`official_to_sun`, :func:`sun_to_official`: the official weight file.
- :class:`CFGTeacher`, :class:`NegativePromptBank`, :class:`SUNDistillation`, :class:`DistillationConfig`.
- :class:`SUNModule`: the LightningModule (``method=sun``); its options in ``config.py``.
"""

from xa_lightning.methods.sun.adapter import SUNAdapter, SUNLayer, shield_from_negative_tokens
from xa_lightning.methods.sun.attention import (
    PositiveOnlyAttnProcessor,
    SUNAttnProcessor,
    attention_normalization,
    concat_negative,
)
from xa_lightning.methods.sun.config import DistillationConfig, SamplingOptions, SUNAdapterOptions, TeacherOptions
from xa_lightning.methods.sun.convert import load_official_adapter, official_indices, official_to_sun, sun_to_official
from xa_lightning.methods.sun.lit_module import SUNModule
from xa_lightning.methods.sun.msc import SUNDistillation
from xa_lightning.methods.sun.pipeline import SUNPipeline, load_sun_adapter
from xa_lightning.methods.sun.teacher import CFGTeacher, NegativePromptBank, dpm_solver, trailing_timesteps

__all__ = [
    "CFGTeacher",
    "DistillationConfig",
    "NegativePromptBank",
    "PositiveOnlyAttnProcessor",
    "SUNAdapter",
    "SUNAdapterOptions",
    "SUNAttnProcessor",
    "SUNDistillation",
    "SUNLayer",
    "SUNModule",
    "SUNPipeline",
    "SamplingOptions",
    "TeacherOptions",
    "attention_normalization",
    "concat_negative",
    "dpm_solver",
    "load_official_adapter",
    "load_sun_adapter",
    "official_indices",
    "official_to_sun",
    "shield_from_negative_tokens",
    "sun_to_official",
    "trailing_timesteps",
]
