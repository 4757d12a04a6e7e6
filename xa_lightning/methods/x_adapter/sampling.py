"""X-Adapter's evaluation samplers and the pipeline glue behind them (mixed into :class:`XAdapterModule`).

``x_adapter`` (the method: two-stage sampling with the base model's plugin), ``upgraded`` (the upgraded
model alone, its own diffusers pipeline) and ``base`` (the base model + plugin alone, X-Adapter's stage 1),
all with the same prompts, seeds, scheduler, steps and CFG.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from xa_lightning.errors import UserError
from xa_lightning.plugins import build_plugin, canny_control_image
from xa_lightning.training import Sampler
from xa_lightning.training.utils import generators, to_uint8

if TYPE_CHECKING:  # pragma: no cover
    from xa_lightning.backbones import Backbone
    from xa_lightning.methods.x_adapter.config import PluginOptions, SamplingOptions
    from xa_lightning.methods.x_adapter.mapper import XAdapterMapper
    from xa_lightning.methods.x_adapter.pipeline import XAdapterPipeline


class XAdapterSampling:
    """The samplers of :class:`~xa_lightning.methods.x_adapter.lit_module.XAdapterModule`.

    Reads the module's ``base`` / ``upgraded`` backbones, ``adapter`` (the mapper), ``sampling`` and
    ``plugin_options``; builds the pipeline and the plugin once, on first use (the module starts them as
    ``None``; a plugin model is then registered under the module, so it moves with it).
    """

    base: Backbone
    upgraded: Backbone
    adapter: XAdapterMapper
    sampling: SamplingOptions
    plugin_options: PluginOptions
    device: torch.device
    _pipeline: XAdapterPipeline | None
    _plugin: Any
    _plugin_built: bool

    def pipeline(self) -> XAdapterPipeline:
        """The two-stage :class:`XAdapterPipeline` over this module's backbones and mapper (+ plugin)."""
        from xa_lightning.methods.x_adapter.pipeline import XAdapterPipeline

        if self._pipeline is None:
            plugin = self._build_plugin()
            kind = self.plugin_options.kind
            pipe = XAdapterPipeline.from_backbones(
                self.base,
                self.upgraded,
                self.adapter,
                scheduler=self.sampling.scheduler,
                controlnet=plugin if kind == "controlnet" else None,
                t2i_adapter=plugin if kind == "t2i_adapter" else None,
            )
            pipe.set_progress_bar_config(disable=not self.sampling.progress)
            if kind == "lora":
                pipe.load_base_lora(
                    plugin, "plugin", scale=self.plugin_options.scale, lora_format=self.plugin_options.lora_format
                )
                self.base.requires_grad_(False)
                self.base.denoiser.disable_adapters()  # training stays plugin-free
            self._pipeline = pipe
        return self._pipeline

    def _build_plugin(self) -> Any:
        """The configured base-model plugin (built once; ``None`` for kind none)."""
        if not self._plugin_built:
            options = self.plugin_options
            self._plugin = build_plugin(
                options.kind, self.base.denoiser, self.base.vae_scale_factor, options.path, seed=options.seed
            )
            if isinstance(self._plugin, torch.nn.Module):
                self._plugin.requires_grad_(False).eval().to(self.device)
            self._plugin_built = True
        return self._plugin

    def _plugin_kwargs(self, references: torch.Tensor | None) -> dict[str, Any]:
        options = self.plugin_options
        wants_references = options.kind in ("controlnet", "t2i_adapter") or options.img2img_strength is not None
        if not wants_references:
            return {}
        if references is None:
            raise UserError(
                f"method.plugin (kind={options.kind}, img2img_strength={options.img2img_strength}) needs "
                "an image per prompt: give evaluation references (eval.references_dir, or a "
                "datamodule with eval_references)"
            )
        references = references.float().clamp(0, 1)
        kwargs: dict[str, Any] = {}
        if options.img2img_strength is not None:
            kwargs.update(image=references, strength=options.img2img_strength)
        condition = references
        if options.condition == "canny":
            condition = canny_control_image(to_uint8(references))
        if options.kind == "controlnet":
            kwargs.update(control_image=condition, controlnet_conditioning_scale=options.scale)
        elif options.kind == "t2i_adapter":
            kwargs.update(adapter_image=condition, t2i_adapter_conditioning_scale=options.scale)
        return kwargs

    def _lora_active(self, active: bool) -> None:
        if self.plugin_options.kind == "lora":
            (self.base.denoiser.enable_adapters if active else self.base.denoiser.disable_adapters)()

    def _negatives(self, count: int) -> list[str]:
        return [self.sampling.negative_prompt] * count

    def _base_prompts(self, prompts: Sequence[str]) -> list[str]:
        suffix = self.sampling.base_prompt_suffix
        return [f"{p}, {suffix}" if suffix else p for p in prompts]

    def sample_x_adapter(
        self, prompts: list[str], seeds: list[int], references: torch.Tensor | None = None
    ) -> torch.Tensor:
        """X-Adapter: base model + plugin guide the upgraded model (two-stage sampling)."""
        pipe, s = self.pipeline(), self.sampling
        self._lora_active(True)
        try:
            images = pipe(
                list(prompts),
                base_prompt=self._base_prompts(prompts),
                negative_prompt=self._negatives(len(prompts)),
                num_inference_steps=s.steps,
                guidance_scale=s.guidance_scale,
                base_guidance_scale=s.base_guidance_scale,
                adapter_guidance_start=s.adapter_guidance_start,
                adapter_condition_scale=s.adapter_condition_scale,
                fusion_guidance_scale=s.fusion_guidance_scale,
                generator=generators(seeds),
                output_type="pt",
                **self._plugin_kwargs(references),
            ).images
        finally:
            self._lora_active(False)
        return to_uint8(images)

    def sample_base(self, prompts: list[str], seeds: list[int], references: torch.Tensor | None = None) -> torch.Tensor:
        """Baseline: the base model + plugin alone (what X-Adapter's stage 1 produces), same seeds."""
        pipe, s = self.pipeline(), self.sampling
        self._lora_active(True)
        try:
            images = pipe.sample_base(
                self._base_prompts(prompts),
                negative_prompt=self._negatives(len(prompts)),
                num_inference_steps=s.steps,
                guidance_scale=s.guidance_scale if s.base_guidance_scale is None else s.base_guidance_scale,
                generator=generators(seeds),
                **self._plugin_kwargs(references),
            )
        finally:
            self._lora_active(False)
        return to_uint8(images)

    def sample_upgraded(
        self, prompts: list[str], seeds: list[int], references: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Baseline: the upgraded model alone (its own diffusers pipeline, same scheduler, steps and CFG)."""
        s = self.sampling
        scheduler = self.pipeline().scheduler.__class__.from_config(self.pipeline().scheduler.config)
        pipe = self.upgraded.pipeline(scheduler=scheduler)
        pipe.set_progress_bar_config(disable=not s.progress)
        size = self.upgraded.resolution
        # Latents out, decoded by the backbone: it casts to the VAE's dtype (an fp32 SDXL VAE beside a bf16
        # UNet would make the pipeline's own decode fail).
        latents = pipe(
            list(prompts),
            negative_prompt=self._negatives(len(prompts)),
            num_inference_steps=s.steps,
            guidance_scale=s.guidance_scale,
            generator=generators(seeds),
            height=size,
            width=size,
            output_type="latent",
        ).images
        with torch.no_grad():
            pixels = self.upgraded.decode_latents(latents)
        return to_uint8(pixels.float() / 2 + 0.5)

    def evaluation_samplers(self) -> OrderedDict[str, Sampler]:
        """``x_adapter`` (the method), ``upgraded`` (e.g. SDXL alone), ``base`` (e.g. SD1.5 + plugin)."""
        return OrderedDict(x_adapter=self.sample_x_adapter, upgraded=self.sample_upgraded, base=self.sample_base)
