"""X-Adapter's evaluation samplers and the pipeline glue behind them (mixed into :class:`XAdapterModule`).

``x_adapter`` (the method: two-stage sampling with the base model's plugin), ``upgraded`` (the upgraded
model alone, its own diffusers pipeline), ``base`` (the base model + plugin alone, X-Adapter's stage 1) and
``sdedit`` (SDEdit: stage 1 upscaled, re-noised to X-Adapter's ``t0`` and finished by the upgraded model
alone), all with the same prompts, seeds, scheduler, steps and CFG.

Every plugin (the base model's ControlNet / T2I-Adapter / LoRA / IP-Adapter and the remix LoRA of the
upgraded model) is on only while a sampler runs (:meth:`XAdapterSampling.plugins_active`): training sees
the plain models.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
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
    _image_encoder: Any

    def pipeline(self) -> XAdapterPipeline:
        """The two-stage :class:`XAdapterPipeline` over this module's backbones and mapper (+ plugin)."""
        from xa_lightning.methods.x_adapter.pipeline import XAdapterPipeline

        if self._pipeline is None:
            plugin = self._build_plugin()
            options = self.plugin_options
            pipe = XAdapterPipeline.from_backbones(
                self.base,
                self.upgraded,
                self.adapter,
                scheduler=self.sampling.scheduler,
                controlnet=plugin if options.kind == "controlnet" else None,
                t2i_adapter=plugin if options.kind == "t2i_adapter" else None,
            )
            pipe.set_progress_bar_config(disable=not self.sampling.progress)
            if options.kind == "lora":
                pipe.load_base_lora(plugin, "plugin", scale=options.scale, lora_format=options.lora_format)
            if options.upgraded_lora is not None:
                pipe.load_upgraded_lora(options.upgraded_lora, "remix", scale=options.upgraded_lora_scale)
            self.base.requires_grad_(False)  # peft adds LoRA weights as trainable parameters
            self.upgraded.requires_grad_(False)
            pipe.set_loras_enabled(False)  # training stays plugin-free
            self._pipeline = pipe
        return self._pipeline

    def _build_plugin(self) -> Any:
        """The configured base-model plugin (built once; ``None`` for kind none)."""
        if not self._plugin_built:
            options = self.plugin_options
            # Tiny plugins are drawn from their own seed: leave the training run's global RNG stream alone.
            with torch.random.fork_rng(devices=[]):
                if options.kind == "ip_adapter":
                    self._image_encoder = self._build_image_encoder()
                self._plugin = build_plugin(
                    options.kind,
                    self.base.denoiser,
                    self.base.vae_scale_factor,
                    options.path,
                    seed=options.seed,
                    image_encoder=self._image_encoder,
                )
            if isinstance(self._plugin, torch.nn.Module):
                self._plugin.requires_grad_(False).eval().to(self.device)
            self._plugin_built = True
        return self._plugin

    def _build_image_encoder(self) -> Any:
        from xa_lightning.plugins.ip_adapter import load_image_encoder, tiny_image_encoder

        options = self.plugin_options
        if options.image_encoder is None:
            encoder = tiny_image_encoder(options.seed)
        else:
            encoder = load_image_encoder(options.image_encoder, key="method.plugin.image_encoder")
        return encoder.requires_grad_(False).to(self.device)

    @contextlib.contextmanager
    def plugins_active(self) -> Iterator[XAdapterPipeline]:
        """The pipeline with every plugin switched on (LoRAs, the IP-Adapter in the base UNet); off again after."""
        pipe = self.pipeline()
        options = self.plugin_options
        with contextlib.ExitStack() as stack:
            if options.kind == "ip_adapter":
                stack.enter_context(pipe.load_base_ip_adapter(self._build_plugin(), scale=options.scale))
            pipe.set_loras_enabled(True)
            stack.callback(pipe.set_loras_enabled, False)
            yield pipe

    def _plugin_kwargs(self, references: torch.Tensor | None) -> dict[str, Any]:
        options = self.plugin_options
        wants_references = options.kind in ("controlnet", "t2i_adapter", "ip_adapter") or (
            options.img2img_strength is not None
        )
        if not wants_references:
            return {}
        if references is None:
            raise UserError(
                f"method.plugin (kind={options.kind}, img2img_strength={options.img2img_strength}) needs "
                "an image per prompt: xa-sample references_dir=<folder>; evaluation: eval.references_dir "
                "or a datamodule with eval_references"
            )
        references = references.float().clamp(0, 1)
        kwargs: dict[str, Any] = {}
        if options.img2img_strength is not None:
            kwargs.update(image=references, strength=options.img2img_strength)
        condition = references
        if options.condition == "canny":
            condition = canny_control_image(to_uint8(references))
        if options.kind == "controlnet":
            kwargs.update(
                control_image=condition,
                controlnet_conditioning_scale=options.scale,
                guess_mode=options.guess_mode,
                control_guidance_start=options.control_guidance_start,
                control_guidance_end=options.control_guidance_end,
            )
        elif options.kind == "t2i_adapter":
            kwargs.update(adapter_image=condition, t2i_adapter_conditioning_scale=options.scale)
        elif options.kind == "ip_adapter":
            hidden_states = self._build_plugin().kind == "plus"
            with torch.no_grad():
                features = self._image_encoder.features(references, hidden_states)
                unconditional = self._image_encoder.unconditional(len(references), hidden_states)
            kwargs.update(ip_adapter_image_embeds=features, negative_ip_adapter_image_embeds=unconditional)
        return kwargs

    def _negatives(self, count: int) -> list[str]:
        return [self.sampling.negative_prompt] * count

    def _base_prompts(self, prompts: Sequence[str]) -> list[str]:
        suffix = self.sampling.base_prompt_suffix
        return [f"{p}, {suffix}" if suffix else p for p in prompts]

    def _base_guidance_scale(self) -> float:
        s = self.sampling
        return s.guidance_scale if s.base_guidance_scale is None else s.base_guidance_scale

    def _upgraded_scheduler(self) -> Any:
        """A fresh scheduler of the pipeline's class and config (the baselines sample like X-Adapter)."""
        scheduler = self.pipeline().scheduler
        return scheduler.__class__.from_config(scheduler.config)

    def _decode_upgraded(self, latents: torch.Tensor) -> torch.Tensor:
        # Decoded by the backbone: it casts to the VAE's dtype (an fp32 SDXL VAE beside a bf16 UNet would
        # make a diffusers pipeline's own decode fail).
        with torch.no_grad():
            pixels = self.upgraded.decode_latents(latents)
        return to_uint8(pixels.float() / 2 + 0.5)

    def sample_x_adapter(
        self, prompts: list[str], seeds: list[int], references: torch.Tensor | None = None
    ) -> torch.Tensor:
        """X-Adapter: base model + plugin guide the upgraded model (two-stage sampling)."""
        s = self.sampling
        with self.plugins_active() as pipe:
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
        return to_uint8(images)

    def sample_base(self, prompts: list[str], seeds: list[int], references: torch.Tensor | None = None) -> torch.Tensor:
        """Baseline: the base model + plugin alone (what X-Adapter's stage 1 produces), same seeds."""
        s = self.sampling
        with self.plugins_active() as pipe:
            images = pipe.sample_base(
                self._base_prompts(prompts),
                negative_prompt=self._negatives(len(prompts)),
                num_inference_steps=s.steps,
                guidance_scale=self._base_guidance_scale(),
                generator=generators(seeds),
                **self._plugin_kwargs(references),
            )
        return to_uint8(images)

    def sample_upgraded(
        self, prompts: list[str], seeds: list[int], references: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Baseline: the upgraded model alone (its own diffusers pipeline, same scheduler, steps and CFG)."""
        s = self.sampling
        pipe = self.upgraded.pipeline(scheduler=self._upgraded_scheduler())
        pipe.set_progress_bar_config(disable=not s.progress)
        size = self.upgraded.resolution
        with self.plugins_active():  # the remix LoRA, when there is one
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
        return self._decode_upgraded(latents)

    def sdedit_pipeline(self) -> Any:
        """The upgraded model's diffusers image-to-image pipeline (SDXL img2img), on this module's components."""
        from diffusers import AutoPipelineForImage2Image

        pipe = AutoPipelineForImage2Image.from_pipe(self.upgraded.pipeline(scheduler=self._upgraded_scheduler()))
        pipe.set_progress_bar_config(disable=not self.sampling.progress)
        return pipe

    def sample_sdedit(
        self, prompts: list[str], seeds: list[int], references: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Baseline "SDEdit + SDXL" (X-Adapter Table 1): the base model + plugin generate (X-Adapter's stage 1,
        same seeds); the image is upscaled like X-Adapter's hand-over, re-noised to X-Adapter's ``t0``
        (``strength = adapter_guidance_start``: both start at step ``N - int(N * alpha)``) and the upgraded
        model alone finishes it."""
        from xa_lightning.methods.x_adapter.pipeline import upscale_for_stage_two

        s = self.sampling
        draws = generators(seeds)  # stage 1's noise, then img2img's: one stream per image, as in x_adapter
        with self.plugins_active() as pipe:
            base_images = pipe.sample_base(
                self._base_prompts(prompts),
                negative_prompt=self._negatives(len(prompts)),
                num_inference_steps=s.steps,
                guidance_scale=self._base_guidance_scale(),
                generator=draws,
                **self._plugin_kwargs(references),
            )
            size = (self.upgraded.resolution, self.upgraded.resolution)
            upscaled = upscale_for_stage_two(base_images * 2 - 1, size) / 2 + 0.5
            latents = self.sdedit_pipeline()(
                list(prompts),
                image=upscaled,
                strength=s.adapter_guidance_start,
                negative_prompt=self._negatives(len(prompts)),
                num_inference_steps=s.steps,
                guidance_scale=s.guidance_scale,
                generator=draws,
                output_type="latent",
            ).images
        return self._decode_upgraded(latents)

    def evaluation_samplers(self) -> OrderedDict[str, Sampler]:
        """``x_adapter`` (the method), ``upgraded`` (e.g. SDXL alone), ``base`` (e.g. SD1.5 + plugin),
        ``sdedit`` (SD1.5 + plugin, then SDEdit with the upgraded model)."""
        return OrderedDict(
            x_adapter=self.sample_x_adapter,
            upgraded=self.sample_upgraded,
            base=self.sample_base,
            sdedit=self.sample_sdedit,
        )
