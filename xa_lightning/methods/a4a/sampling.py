"""A4A's evaluation samplers and the pipeline glue behind them (mixed into :class:`A4AModule`).

In order: the method (``a4a``; ``from_scratch`` for the IP-Adapter* baseline), then the baselines of the
paper's Table 1 and figures, all with the same prompts, seeds, references, steps and CFG:

* ``upgraded``: the plain upgraded model (no image prompt);
* ``pta_um``: the upgraded model with its own published IP-Adapter, loaded by diffusers (SDXL only);
* ``pta_base``: the base model (SD1.5) with the PTA, loaded by diffusers (when ``method.base_backbone`` is set).

The diffusers baselines get their image embeddings from the same tensor preprocessing A4A uses, one
reference per prompt (``ip_adapter_image_embeds``: diffusers' ``ip_adapter_image`` would share one image
across a batch of prompts).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from xa_lightning.errors import UserError
from xa_lightning.methods.a4a.modules import stand_in_image_encoder
from xa_lightning.methods.a4a.pipeline import A4APipeline
from xa_lightning.plugins.ip_adapter import (
    ImageEncoder,
    IPAdapterLayout,
    IPAdapterModel,
    load_image_encoder,
    load_into_unet,
    random_ip_adapter,
    read_ip_adapter,
)
from xa_lightning.training import Sampler
from xa_lightning.training.utils import generators, to_uint8

if TYPE_CHECKING:  # pragma: no cover
    from xa_lightning.backbones import Backbone
    from xa_lightning.methods.a4a.attention import ImageInjection
    from xa_lightning.methods.a4a.config import PTAOptions, SamplingOptions
    from xa_lightning.methods.a4a.modules import A4AAdapter

# The random stand-in for the upgraded model's own IP-Adapter is seeded apart from the PTA's.
_PTA_UM_SEED_OFFSET = 1000


def _require_references(references: Tensor | None, sampler: str) -> None:
    """An image-prompted sampler without its images would quietly sample the plain model: refuse instead."""
    if references is None:
        raise UserError(
            f"A4A sampler {sampler!r} prompts with an image: give a reference per prompt (xa-sample "
            "references_dir=<folder>; evaluation: eval.references_dir or a datamodule with references)"
        )


class A4ASampling:
    """The samplers of :class:`~xa_lightning.methods.a4a.lit_module.A4AModule`.

    Reads the module's ``upgraded`` / ``base`` backbones, ``adapter``, ``frozen_pta``, ``pta_encoder``,
    ``pta_layout``, ``injection``, ``variant``, ``pta_options`` and ``sampling``.
    """

    upgraded: Backbone
    base: Backbone | None
    adapter: A4AAdapter | IPAdapterModel
    frozen_pta: IPAdapterModel | None
    pta_encoder: ImageEncoder
    pta_layout: IPAdapterLayout | None
    injection: ImageInjection
    variant: str
    pta_options: PTAOptions
    sampling: SamplingOptions

    # ------------------------------------------------------------------ generation
    def _generate(
        self, pipe: Any, backbone: Backbone, prompts: Sequence[str], seeds: Sequence[int], **kwargs: Any
    ) -> Tensor:
        options = self.sampling
        if options.negative_prompt:
            kwargs["negative_prompt"] = [options.negative_prompt] * len(prompts)
        if backbone.family == "pixart_alpha":  # caption cleaning needs optional packages: same text everywhere
            kwargs["clean_caption"] = False
        pipe.set_progress_bar_config(disable=not options.progress)
        with torch.no_grad():
            images = pipe(
                prompt=list(prompts),
                num_inference_steps=options.steps,
                guidance_scale=options.guidance_scale,
                generator=generators(seeds),
                height=backbone.resolution,
                width=backbone.resolution,
                output_type="pt",
                **kwargs,
            ).images
        return to_uint8(images)

    def a4a_pipeline(self) -> A4APipeline:
        """The upgraded model's pipeline with this adapter and the PTA's image encoder (shares the injection)."""
        return A4APipeline(
            self.upgraded.pipeline(), self.adapter, self.pta_encoder, self.frozen_pta, injection=self.injection
        )

    def sample_method(self, prompts: list[str], seeds: list[int], references: Tensor | None = None) -> Tensor:
        _require_references(references, self.variant)
        return self._generate(
            self.a4a_pipeline(), self.upgraded, prompts, seeds, ip_adapter_image=references, scale=self.sampling.scale
        )

    def sample_upgraded(self, prompts: list[str], seeds: list[int], references: Tensor | None = None) -> Tensor:
        return self._generate(self.upgraded.pipeline(), self.upgraded, prompts, seeds)

    # ------------------------------------------------------------------ diffusers' IP-Adapter baselines
    def _diffusers_ip_adapter(
        self,
        backbone: Backbone,
        layout: IPAdapterLayout,
        encoder: ImageEncoder,
        key: str,
        prompts: Sequence[str],
        seeds: Sequence[int],
        references: Tensor,
    ) -> Tensor:
        pipe = backbone.pipeline()
        encoder.to(backbone.device)
        hidden = layout.kind == "plus"
        with torch.no_grad():
            features = encoder.features(references, hidden).to(backbone.dtype)
            if self.sampling.guidance_scale > 1:  # diffusers' layout: [unconditional; conditional]
                negative = encoder.unconditional(features.shape[0], hidden).to(backbone.dtype)
                features = torch.cat([negative, features])
        with load_into_unet(backbone.denoiser, layout, scale=self.sampling.scale, key=key):
            return self._generate(pipe, backbone, prompts, seeds, ip_adapter_image_embeds=[features.unsqueeze(1)])

    def pta_um(self) -> tuple[IPAdapterLayout, ImageEncoder]:
        """The upgraded model's own IP-Adapter and encoder (loaded once; random ones for a random model)."""
        cache = self.__dict__.setdefault("_pta_um_cache", {})
        if "pta_um" not in cache:
            options = self.sampling
            if options.pta_um_weights:
                layout = read_ip_adapter(options.pta_um_weights, key="method.sampling.pta_um_weights")
                encoder = load_image_encoder(
                    options.pta_um_image_encoder, key="method.sampling.pta_um_image_encoder", dtype=self.upgraded.dtype
                )
            else:  # random backbones only (checked when the module is built)
                seed = self.pta_options.seed + _PTA_UM_SEED_OFFSET
                encoder = stand_in_image_encoder(self.upgraded.flavour, seed)
                layout = random_ip_adapter(self.upgraded.denoiser, encoder, seed=seed).to_layout()
            cache["pta_um"] = (layout, encoder)
        return cache["pta_um"]

    def sample_pta_um(self, prompts: list[str], seeds: list[int], references: Tensor | None = None) -> Tensor:
        _require_references(references, "pta_um")
        layout, encoder = self.pta_um()
        return self._diffusers_ip_adapter(
            self.upgraded, layout, encoder, "method.sampling.pta_um_weights", prompts, seeds, references
        )

    def sample_pta_base(self, prompts: list[str], seeds: list[int], references: Tensor | None = None) -> Tensor:
        _require_references(references, "pta_base")
        return self._diffusers_ip_adapter(
            self.base, self.pta_layout, self.pta_encoder, "method.pta.weights", prompts, seeds, references
        )

    # ------------------------------------------------------------------ the list
    def evaluation_samplers(self) -> OrderedDict[str, Sampler]:
        """The method first (``a4a`` or ``from_scratch``), then ``upgraded``, ``pta_um``, ``pta_base`` as configured."""
        options = self.sampling
        samplers: OrderedDict[str, Callable[..., Tensor]] = OrderedDict({self.variant: self.sample_method})
        if options.upgraded:
            samplers["upgraded"] = self.sample_upgraded
        if options.pta_um:
            samplers["pta_um"] = self.sample_pta_um
        if options.pta_base and self.base is not None and self.pta_layout is not None:
            samplers["pta_base"] = self.sample_pta_base
        return samplers
