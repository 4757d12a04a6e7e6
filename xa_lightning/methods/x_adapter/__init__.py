"""X-Adapter: SD1.5 plugins (ControlNet, LoRA, T2I-Adapter) drive SDXL through trained mapping layers.

See README.md in this folder. Public API:

- :class:`XAdapterMapper` (diffusers ``ModelMixin``): the mapping layers; ``from_unets`` derives the stages
  from two UNets' block shapes; :func:`derive_mapping`, :func:`unet_block_shapes`.
- :class:`ResidualInjector`: fuses mapped residuals into the upgraded UNet (forward hooks, no forked UNet).
- :class:`XAdapterPipeline`: two-stage sampling with base-model plugins and remix LoRAs.
- :func:`load_official_mapper`, :func:`convert_official_state_dict`: the official ``X_Adapter_v1.bin``.
- :class:`XAdapterModule`: the LightningModule (``method=x_adapter``); its options in ``config.py``.

The plugins it carries (ControlNet, T2I-Adapter, LoRA) live in :mod:`xa_lightning.plugins`.
"""

from xa_lightning.methods.x_adapter.config import MapperOptions, PluginOptions, SamplingOptions, TrainingOptions
from xa_lightning.methods.x_adapter.convert import convert_official_state_dict, load_official_mapper
from xa_lightning.methods.x_adapter.injection import ResidualInjector
from xa_lightning.methods.x_adapter.lit_module import XAdapterModule
from xa_lightning.methods.x_adapter.mapper import (
    BlockShape,
    MappingPair,
    XAdapterMapper,
    derive_mapping,
    unet_block_shapes,
)
from xa_lightning.methods.x_adapter.pipeline import XAdapterPipeline, XAdapterPipelineOutput

__all__ = [
    "BlockShape",
    "MapperOptions",
    "MappingPair",
    "PluginOptions",
    "ResidualInjector",
    "SamplingOptions",
    "TrainingOptions",
    "XAdapterMapper",
    "XAdapterModule",
    "XAdapterPipeline",
    "XAdapterPipelineOutput",
    "convert_official_state_dict",
    "derive_mapping",
    "load_official_mapper",
    "unet_block_shapes",
]
