"""Two-stage X-Adapter sampling as a diffusers pipeline (usable without Lightning).

Stage 1 samples fully with the base model (SD1.5) and its plugins. The result is decoded, resized to the
upgraded model's resolution, encoded with the upgraded VAE and noised to ``t0 = timesteps[N - int(N *
alpha)]`` (``alpha = adapter_guidance_start``); the base latent is re-noised to the same ``t0``. Stage 2
runs both models together for the remaining ``int(N * alpha)`` steps of the SAME schedule: the base model
(with plugins) provides decoder features, the mapper turns them into residuals for the upgraded model
(SDXL), which produces the image. Both models use classifier-free guidance.

Deliberate differences from the official pipelines (showlab/X-Adapter):
- stage 2 continues the schedule from ``t0`` for the base model too. The official LoRA pipeline
  (``pipeline_sd_xl_adapter.py``) restarts the base model's schedule at ``T`` in stage 2, so base features
  and upgraded latents disagree in noise level; its ControlNet pipelines continue from ``t0`` as we do;
- without CFG the base model is fed its own latents (the official LoRA pipeline's no-CFG branch feeds it
  the upgraded latents; its ControlNet pipelines do not);
- both schedulers must produce the same timesteps; when their configs differ the base scheduler is given
  the upgraded scheduler's timesteps (or a clear error when it cannot take custom timesteps);
- ``control_guidance_start`` / ``control_guidance_end`` are fractions of the one N-step schedule, so a
  timestep gets the same ControlNet weight in both stages (the official ControlNet pipelines index stage
  2's steps from 0 against stage 1's length).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from xa_lightning.backbones.surgery import capture_outputs
from xa_lightning.errors import UserError
from xa_lightning.methods.x_adapter.config import check_adapter_guidance_start
from xa_lightning.methods.x_adapter.injection import ResidualInjector
from xa_lightning.methods.x_adapter.mapper import XAdapterMapper
from xa_lightning.plugins import (
    controlnet_residuals,
    load_lora,
    merge_unet_kwargs,
    set_lora_scales,
    t2i_adapter_residuals,
)

ImageInput = Any  # PIL image(s), numpy array(s) or tensors, as diffusers' VaeImageProcessor accepts


@dataclass
class XAdapterPipelineOutput(BaseOutput):
    """``images``: the upgraded model's output; ``base_images``: stage 1's base-model images (if asked)."""

    images: Any
    base_images: Any = None


def _vae_scale_factor(vae: Any) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


class XAdapterPipeline(DiffusionPipeline):
    """Two-stage X-Adapter text-to-image: base model + plugins guide the upgraded model through the mapper.

    Components: the base model's ``base_vae``, ``base_text_encoder``, ``base_tokenizer``, ``base_unet``,
    ``base_scheduler``; the upgraded model's ``vae``, ``text_encoder``(``_2``), ``tokenizer``(``_2``),
    ``unet``, ``scheduler``; the ``adapter`` (:class:`XAdapterMapper`); optional base-model plugins
    ``controlnet`` and ``t2i_adapter``. LoRAs: :meth:`load_base_lora` (plugin on the base model) and
    :meth:`load_upgraded_lora` (remix: a LoRA of the upgraded model at the same time).
    """

    model_cpu_offload_seq = "base_text_encoder->text_encoder->text_encoder_2->base_unet->unet->vae"
    _optional_components = ["text_encoder_2", "tokenizer_2", "controlnet", "t2i_adapter"]

    def __init__(
        self,
        base_vae: Any,
        base_text_encoder: Any,
        base_tokenizer: Any,
        base_unet: Any,
        base_scheduler: Any,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        unet: Any,
        scheduler: Any,
        adapter: XAdapterMapper,
        text_encoder_2: Any = None,
        tokenizer_2: Any = None,
        controlnet: Any = None,
        t2i_adapter: Any = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            base_vae=base_vae,
            base_text_encoder=base_text_encoder,
            base_tokenizer=base_tokenizer,
            base_unet=base_unet,
            base_scheduler=base_scheduler,
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            adapter=adapter,
            controlnet=controlnet,
            t2i_adapter=t2i_adapter,
        )
        self._helpers: dict[str, tuple[tuple[int, ...], Any]] = {}
        self._lora_scales: dict[str, dict[str, float]] = {"base": {}, "upgraded": {}}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_backbones(
        cls,
        base: Any,
        upgraded: Any,
        adapter: XAdapterMapper,
        scheduler: str = "dpmsolver++",
        controlnet: Any = None,
        t2i_adapter: Any = None,
    ) -> XAdapterPipeline:
        """Build from two ``xa_lightning.backbones.Backbone`` objects (sd15-like base, sdxl-like upgraded).

        ``scheduler``: ``"dpmsolver++"`` (official default), ``"ddim"`` or ``"euler"``; each model keeps
        its own noise schedule and prediction type.
        """

        def make(backbone: Any) -> Any:
            from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

            classes = {
                "dpmsolver++": DPMSolverMultistepScheduler,
                "ddim": DDIMScheduler,
                "euler": EulerDiscreteScheduler,
            }
            if scheduler not in classes:
                raise UserError(f"method.sampling.scheduler={scheduler!r} is not one of {sorted(classes)}")
            extra = {"algorithm_type": "dpmsolver++"} if scheduler == "dpmsolver++" else {}
            if scheduler == "ddim":
                extra = {"clip_sample": False, "set_alpha_to_one": False}
            return classes[scheduler].from_config(backbone.noise_scheduler.config, steps_offset=1, **extra)

        if len(base.text_encoders) != 1:
            raise UserError(
                f"the X-Adapter base model must have one text encoder (SD1.5 / SD2.1); "
                f"{getattr(base, 'id', 'base')} has {len(base.text_encoders)}"
            )
        encoders = list(upgraded.text_encoders) + [None]
        tokenizers = list(upgraded.tokenizers) + [None]
        return cls(
            base_vae=base.vae,
            base_text_encoder=base.text_encoders[0],
            base_tokenizer=base.tokenizers[0],
            base_unet=base.denoiser,
            base_scheduler=make(base),
            vae=upgraded.vae,
            text_encoder=encoders[0],
            tokenizer=tokenizers[0],
            text_encoder_2=encoders[1],
            tokenizer_2=tokenizers[1],
            unet=upgraded.denoiser,
            scheduler=make(upgraded),
            adapter=adapter,
            controlnet=controlnet,
            t2i_adapter=t2i_adapter,
        )

    # ------------------------------------------------------------------ helper pipelines (text, LoRA)
    def _helper(self, which: str) -> Any:
        """A diffusers SD / SDXL pipeline over our components: its encode_prompt and LoRA loader are reused.

        Built without a scheduler (the SD pipeline would rewrite an old scheduler config in place).
        """
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if which == "base":
            parts = dict(
                vae=self.base_vae,
                text_encoder=self.base_text_encoder,
                tokenizer=self.base_tokenizer,
                unet=self.base_unet,
            )
        else:
            parts = dict(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet)
            if self.text_encoder_2 is not None:
                parts.update(text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2)
        key = tuple(id(v) for v in parts.values())
        cached = self._helpers.get(which)
        if cached is not None and cached[0] == key:
            return cached[1]
        if "text_encoder_2" in parts:
            helper = StableDiffusionXLPipeline(**parts, scheduler=None, add_watermarker=False)
        else:
            helper = StableDiffusionPipeline(
                **parts, scheduler=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
        helper.set_progress_bar_config(disable=True)
        self._helpers[which] = (key, helper)
        return helper

    def load_base_lora(
        self, source: Any, adapter_name: str = "base_lora", scale: float = 1.0, lora_format: str | None = None
    ) -> None:
        """Load a base-model LoRA (diffusers / peft / kohya layout) into the base UNet (+ text encoder)."""
        load_lora(self._helper("base"), source, adapter_name, scale, lora_format)
        self._lora_scales["base"][adapter_name] = scale
        set_lora_scales(self._helper("base"), self._lora_scales["base"])

    def load_upgraded_lora(
        self, source: Any, adapter_name: str = "upgraded_lora", scale: float = 1.0, lora_format: str | None = None
    ) -> None:
        """Remix: load a LoRA of the upgraded model, active together with the base model's plugins."""
        load_lora(self._helper("upgraded"), source, adapter_name, scale, lora_format)
        self._lora_scales["upgraded"][adapter_name] = scale
        set_lora_scales(self._helper("upgraded"), self._lora_scales["upgraded"])

    def set_lora_scale(self, adapter_name: str, scale: float) -> None:
        """Change a loaded LoRA's weight; 0 removes its effect."""
        for which, scales in self._lora_scales.items():
            if adapter_name in scales:
                scales[adapter_name] = scale
                set_lora_scales(self._helper(which), scales)
                return
        raise UserError(
            f"no LoRA named {adapter_name!r} is loaded; loaded: "
            f"{sorted(n for s in self._lora_scales.values() for n in s)}"
        )

    def set_loras_enabled(self, enabled: bool) -> None:
        """Switch every loaded LoRA (base and upgraded model, UNets and text encoders) on or off; weights and
        scales stay loaded. Off, the models are exactly the plain ones (what training needs)."""
        from diffusers.loaders.lora_base import disable_lora_for_text_encoder, enable_lora_for_text_encoder
        from diffusers.models.modeling_utils import ModelMixin

        for which, scales in self._lora_scales.items():
            if not scales:
                continue
            helper = self._helper(which)
            for name in helper._lora_loadable_modules:
                model = getattr(helper, name, None)
                if model is None or not getattr(model, "peft_config", None):
                    continue  # e.g. a LoRA file with UNet keys only leaves the text encoder plain
                if isinstance(model, ModelMixin):
                    switch = model.enable_lora if enabled else model.disable_lora
                    switch()
                else:
                    (enable_lora_for_text_encoder if enabled else disable_lora_for_text_encoder)(model)

    # ------------------------------------------------------------------ prompts
    def _encode_base(
        self, prompts: list[str], negative: list[str] | None, device: torch.device, per_prompt: int, cfg: bool
    ) -> torch.Tensor:
        embeds, negative_embeds = self._helper("base").encode_prompt(
            prompts, device, per_prompt, cfg, negative_prompt=negative
        )
        return torch.cat([negative_embeds, embeds]) if cfg else embeds

    def _encode_upgraded(
        self,
        prompts: list[str],
        negative: list[str] | None,
        device: torch.device,
        per_prompt: int,
        cfg: bool,
        size: tuple[int, int],
    ) -> tuple[torch.Tensor, dict | None]:
        helper = self._helper("upgraded")
        if self.text_encoder_2 is None:
            embeds, negative_embeds = helper.encode_prompt(prompts, device, per_prompt, cfg, negative_prompt=negative)
            return (torch.cat([negative_embeds, embeds]) if cfg else embeds), None
        embeds, negative_embeds, pooled, negative_pooled = helper.encode_prompt(
            prompts,
            device=device,
            num_images_per_prompt=per_prompt,
            do_classifier_free_guidance=cfg,
            negative_prompt=negative,
        )
        # Micro-conditioning: original = target = the generated size, no crop (SDXL's defaults).
        time_ids = helper._get_add_time_ids(
            size,
            (0, 0),
            size,
            dtype=embeds.dtype,
            text_encoder_projection_dim=int(self.text_encoder_2.config.projection_dim),
        )
        time_ids = time_ids.to(device).repeat(embeds.shape[0], 1)
        if cfg:
            embeds, pooled = torch.cat([negative_embeds, embeds]), torch.cat([negative_pooled, pooled])
            time_ids = torch.cat([time_ids, time_ids])
        return embeds, {"text_embeds": pooled, "time_ids": time_ids}

    # ------------------------------------------------------------------ schedules
    def _aligned_timesteps(self, steps: int, device: torch.device) -> torch.Tensor:
        """Set both schedulers to ``steps`` steps with identical timesteps; return them."""
        self.scheduler.set_timesteps(steps, device=device)
        self.base_scheduler.set_timesteps(steps, device=device)
        timesteps = self.scheduler.timesteps
        if not torch.equal(self.base_scheduler.timesteps.cpu(), timesteps.cpu()):
            if "timesteps" not in inspect.signature(self.base_scheduler.set_timesteps).parameters:
                raise UserError(
                    "the base and upgraded schedulers give different timesteps and the base scheduler "
                    "takes no custom timesteps; use the same scheduler class and timestep_spacing"
                )
            self.base_scheduler.set_timesteps(timesteps=timesteps.cpu().tolist(), device=device)
        return timesteps

    @staticmethod
    def _cfg(prediction: torch.Tensor, scale: float, enabled: bool) -> torch.Tensor:
        if not enabled:
            return prediction
        uncond, cond = prediction.chunk(2)
        return uncond + scale * (cond - uncond)

    # ------------------------------------------------------------------ image conversions
    def _encode_image(self, vae: Any, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(device=vae.device, dtype=vae.dtype)
        latents = vae.encode(pixels).latent_dist.mode()  # the mode: a deterministic hand-over between stages
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def _decode_latents(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + shift
        return vae.decode(latents, return_dict=False)[0]

    def _prepare_condition(
        self,
        image: ImageInput,
        height: int,
        width: int,
        batch: int,
        cfg: bool,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        processor = VaeImageProcessor(
            vae_scale_factor=_vae_scale_factor(self.base_vae), do_convert_rgb=True, do_normalize=False
        )
        tensor = processor.preprocess(image, height=height, width=width).to(device=device, dtype=dtype)
        if tensor.shape[0] == 1:
            tensor = tensor.repeat(batch, 1, 1, 1)
        elif tensor.shape[0] != batch:
            tensor = tensor.repeat_interleave(batch // tensor.shape[0], dim=0)
        return torch.cat([tensor, tensor]) if cfg else tensor

    # ------------------------------------------------------------------ base model step (with plugins)
    def _base_forward(
        self, latents: torch.Tensor, t: torch.Tensor, base: dict[str, Any], control_scale: float
    ) -> torch.Tensor:
        """One base UNet call with its plugins, in the CFG batch layout ``[uncond, cond]`` when CFG is on."""
        cfg = base["cfg"]
        embeds = base["embeds"]
        model_input = torch.cat([latents, latents]) if cfg else latents
        model_input = self.base_scheduler.scale_model_input(model_input, t)
        kwargs: list[dict] = []
        if self.controlnet is not None and base["control"] is not None:
            if base["guess_mode"] and cfg:
                # As diffusers and the official pipelines: the ControlNet sees only the conditional half;
                # the unconditional half gets zero residuals.
                conditional = controlnet_residuals(
                    self.controlnet,
                    self.base_scheduler.scale_model_input(latents, t),
                    t,
                    embeds.chunk(2)[1],
                    base["control"].chunk(2)[1],
                    control_scale,
                    True,
                )
                kwargs.append(
                    {
                        "down_block_additional_residuals": [
                            torch.cat([torch.zeros_like(d), d]) for d in conditional["down_block_additional_residuals"]
                        ],
                        "mid_block_additional_residual": torch.cat(
                            [
                                torch.zeros_like(conditional["mid_block_additional_residual"]),
                                conditional["mid_block_additional_residual"],
                            ]
                        ),
                    }
                )
            else:
                kwargs.append(
                    controlnet_residuals(
                        self.controlnet, model_input, t, embeds, base["control"], control_scale, base["guess_mode"]
                    )
                )
        if self.t2i_adapter is not None and base["t2i_states"] is not None:
            kwargs.append({"down_intrablock_additional_residuals": base["t2i_states"]})
        if base["image_embeds"] is not None:
            kwargs.append({"added_cond_kwargs": {"image_embeds": base["image_embeds"]}})
        return self.base_unet(
            model_input, t, encoder_hidden_states=embeds, return_dict=False, **merge_unet_kwargs(*kwargs)
        )[0]

    # ------------------------------------------------------------------ stage 1 (shared by both entry points)
    def _prepare_base(
        self,
        prompts: list[str],
        negatives: list[str] | None,
        per_prompt: int,
        guidance_scale: float,
        height: int,
        width: int,
        control_image: ImageInput,
        guess_mode: bool,
        control_guidance: tuple[float, float],
        adapter_image: ImageInput,
        t2i_adapter_conditioning_scale: float,
        ip_adapter_image_embeds: torch.Tensor | None,
        negative_ip_adapter_image_embeds: torch.Tensor | None,
    ) -> dict[str, Any]:
        """Base prompt embeddings and plugin inputs, in the base model's CFG batch layout."""
        device = self._execution_device
        batch = len(prompts) * per_prompt
        cfg = guidance_scale > 1.0
        dtype = self.base_unet.dtype
        start, end = control_guidance
        if not 0.0 <= start < end <= 1.0:
            raise UserError(f"control_guidance_start={start}, control_guidance_end={end}: need 0 <= start < end <= 1")
        state: dict[str, Any] = {
            "cfg": cfg,
            "guidance_scale": guidance_scale,
            "batch": batch,
            "embeds": self._encode_base(prompts, negatives, device, per_prompt, cfg),
            "control": None,
            "guess_mode": guess_mode,
            "control_guidance": (start, end),
            "t2i_states": None,
            "image_embeds": None,
        }
        if control_image is not None:
            if self.controlnet is None:
                raise UserError("control_image was given but the pipeline has no controlnet")
            state["control"] = self._prepare_condition(control_image, height, width, batch, cfg, device, dtype)
        if adapter_image is not None:
            if self.t2i_adapter is None:
                raise UserError("adapter_image was given but the pipeline has no t2i_adapter")
            adapter_input = self._prepare_condition(adapter_image, height, width, batch, False, device, dtype)
            if self.t2i_adapter.config.in_channels == 1:  # sketch / canny adapters read one grayscale channel
                luma = torch.tensor([0.299, 0.587, 0.114], device=device, dtype=dtype).view(1, 3, 1, 1)
                adapter_input = (adapter_input * luma).sum(dim=1, keepdim=True)
            states = t2i_adapter_residuals(self.t2i_adapter, adapter_input, t2i_adapter_conditioning_scale)
            state["t2i_states"] = [torch.cat([s, s]) for s in states] if cfg else states
        if ip_adapter_image_embeds is not None:
            state["image_embeds"] = self._image_embeds(
                ip_adapter_image_embeds, negative_ip_adapter_image_embeds, batch, cfg, device, dtype
            )
        return state

    def _image_embeds(
        self,
        embeds: torch.Tensor,
        negative: torch.Tensor | None,
        batch: int,
        cfg: bool,
        device: torch.device,
        dtype: torch.dtype,
    ) -> list[torch.Tensor]:
        """The base IP-Adapter's image features as the UNet's ``image_embeds`` (zeros for the CFG negative)."""
        if getattr(self.base_unet, "encoder_hid_proj", None) is None:
            raise UserError(
                "ip_adapter_image_embeds was given but the base UNet has no IP-Adapter; load one with "
                "load_base_ip_adapter(...)"
            )

        def per_image(features: torch.Tensor) -> torch.Tensor:
            if batch % features.shape[0]:
                raise UserError(f"{features.shape[0]} IP-Adapter image embeddings for {batch} images")
            return features.repeat_interleave(batch // features.shape[0], dim=0).to(device=device, dtype=dtype)

        features = per_image(embeds)
        if cfg:
            unconditional = torch.zeros_like(features) if negative is None else per_image(negative)
            features = torch.cat([unconditional, features])
        from xa_lightning.plugins.ip_adapter import unet_image_embeds

        return unet_image_embeds(features)

    def load_base_ip_adapter(self, adapter: Any, scale: float = 1.0) -> Any:
        """Load an SD1.5 IP-Adapter (file, layout or model) into the base UNet through diffusers' loader.

        Returns the :class:`~xa_lightning.backbones.surgery.Surgery` that removes it again (bit for bit);
        generate with ``ip_adapter_image_embeds=`` (the CLIP image features of the reference).
        """
        from xa_lightning.plugins.ip_adapter import load_into_unet

        return load_into_unet(self.base_unet, adapter, scale, key="base IP-Adapter")

    @staticmethod
    def _control_scale(base: dict[str, Any], scale: float, position: int, total: int) -> float:
        """``scale`` at step ``position`` of the ``total``-step schedule: 0 outside the control guidance window
        (diffusers' ``controlnet_keep``)."""
        start, end = base["control_guidance"]
        return scale * (1.0 - float(position / total < start or (position + 1) / total > end))

    def _base_stage(
        self,
        base: dict[str, Any],
        num_inference_steps: int,
        height: int,
        width: int,
        generator: Any,
        base_latents: torch.Tensor | None,
        image: ImageInput,
        strength: float,
        control_scale: float,
        progress: Any,
        callback_on_step_end: Callable[[int, str, torch.Tensor], None] | None,
    ) -> torch.Tensor:
        """Stage 1: the base model (+ plugins) samples its whole schedule (or img2img from ``strength``)."""
        device, dtype, batch = self._execution_device, self.base_unet.dtype, base["batch"]
        scale_factor = _vae_scale_factor(self.base_vae)
        shape = (batch, self.base_unet.config.in_channels, height // scale_factor, width // scale_factor)
        start = 0
        if image is not None:
            pixels = VaeImageProcessor(vae_scale_factor=scale_factor).preprocess(image, height=height, width=width)
            if pixels.shape[0] != batch:
                pixels = pixels.repeat_interleave(batch // pixels.shape[0], dim=0)
            init = self._encode_image(self.base_vae, pixels).to(dtype)
            start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
            if start >= num_inference_steps:
                raise UserError(f"strength={strength} leaves no denoising steps; raise it")
            _begin_at(self.base_scheduler, start)
            timesteps = self.base_scheduler.timesteps[start * self.base_scheduler.order :]
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            latents = self.base_scheduler.add_noise(init, noise, timesteps[:1].repeat(batch))
        else:
            timesteps = self.base_scheduler.timesteps
            latents = (
                base_latents
                if base_latents is not None
                else randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            )
            latents = latents.to(device=device, dtype=dtype) * self.base_scheduler.init_noise_sigma
        for step, t in enumerate(timesteps):
            scale = self._control_scale(base, control_scale, start + step, num_inference_steps)
            prediction = self._cfg(self._base_forward(latents, t, base, scale), base["guidance_scale"], base["cfg"])
            latents = self.base_scheduler.step(prediction, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                callback_on_step_end(step, "base", latents)
            progress.update()
        return latents

    @staticmethod
    def _check_strength(strength: float) -> None:
        if not 0.0 < strength <= 1.0:
            raise UserError(f"strength={strength} must be in (0, 1]")

    @staticmethod
    def _as_list(value: Any, count: int) -> list[str] | None:
        if value is None:
            return None
        return [value] * count if isinstance(value, str) else list(value)

    def _base_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        default = self.base_unet.config.sample_size * _vae_scale_factor(self.base_vae)
        return height or default, width or default

    @torch.no_grad()
    def sample_base(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        generator: Any = None,
        base_latents: torch.Tensor | None = None,
        image: ImageInput = None,
        strength: float = 1.0,
        control_image: ImageInput = None,
        controlnet_conditioning_scale: float = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float = 0.0,
        control_guidance_end: float = 1.0,
        adapter_image: ImageInput = None,
        t2i_adapter_conditioning_scale: float = 1.0,
        ip_adapter_image_embeds: torch.Tensor | None = None,
        negative_ip_adapter_image_embeds: torch.Tensor | None = None,
        output_type: str = "pt",
    ) -> Any:
        """The base model + its plugins alone: exactly X-Adapter's stage 1 for the same arguments and seeds."""
        self._check_strength(strength)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        height, width = self._base_size(height, width)
        base = self._prepare_base(
            prompts,
            self._as_list(negative_prompt, len(prompts)),
            num_images_per_prompt,
            guidance_scale,
            height,
            width,
            control_image,
            guess_mode,
            (control_guidance_start, control_guidance_end),
            adapter_image,
            t2i_adapter_conditioning_scale,
            ip_adapter_image_embeds,
            negative_ip_adapter_image_embeds,
        )
        self._aligned_timesteps(num_inference_steps, self._execution_device)
        with self.progress_bar(total=num_inference_steps) as progress:
            latents = self._base_stage(
                base,
                num_inference_steps,
                height,
                width,
                generator,
                base_latents,
                image,
                strength,
                controlnet_conditioning_scale,
                progress,
                None,
            )
        if output_type == "latent":
            return latents
        return self._postprocess(self._decode_latents(self.base_vae, latents), output_type)

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        base_prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        base_negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        base_height: int | None = None,
        base_width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        base_guidance_scale: float | None = None,
        adapter_guidance_start: float = 0.8,
        adapter_condition_scale: float = 1.0,
        fusion_guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: Any = None,
        base_latents: torch.Tensor | None = None,
        stage1_latents: torch.Tensor | None = None,
        image: ImageInput = None,
        strength: float = 1.0,
        control_image: ImageInput = None,
        controlnet_conditioning_scale: float = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float = 0.0,
        control_guidance_end: float = 1.0,
        adapter_image: ImageInput = None,
        t2i_adapter_conditioning_scale: float = 1.0,
        ip_adapter_image_embeds: torch.Tensor | None = None,
        negative_ip_adapter_image_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_base_images: bool = False,
        return_dict: bool = True,
        callback_on_step_end: Callable[[int, str, torch.Tensor], None] | None = None,
    ) -> XAdapterPipelineOutput | tuple:
        """Generate images with the upgraded model guided by the base model (+ plugins) through X-Adapter.

        Args:
            prompt / negative_prompt: the upgraded model's prompts.
            base_prompt / base_negative_prompt: the base model's (default: the same as the upgraded ones).
            num_inference_steps: N, the schedule shared by both models.
            guidance_scale / base_guidance_scale: CFG of the upgraded / base model (> 1 enables it).
            adapter_guidance_start: alpha; stage 2 (X-Adapter) runs the last int(N * alpha) steps (at least 1).
            adapter_condition_scale: s in h + s * F(x) (0 = the upgraded model alone in stage 2).
            fusion_guidance_scale: g, optional; fused feature h + g * (s * F(x) - h), as in the official code.
            base_latents: stage 1's initial noise (default: drawn from ``generator``).
            stage1_latents: stage 1's RESULT (the base model's final latents, e.g. ``sample_base(...,
                output_type="latent")``): stage 1 is skipped and stage 2 starts from them, so stage-2 settings
                can be compared from one stage-1 result.
            image / strength: image-to-image for stage 1 (e.g. ControlNet tile: pass the image as
                ``image`` and ``control_image``).
            control_image / controlnet_conditioning_scale / guess_mode: the base ControlNet's input; with
                ``guess_mode`` and CFG the ControlNet sees only the conditional half (zeros for the other).
            control_guidance_start / control_guidance_end: the fractions of the N-step schedule in which the
                ControlNet acts (as diffusers' ControlNet pipelines; the same weight per timestep in both stages).
            adapter_image / t2i_adapter_conditioning_scale: the base T2I-Adapter's input.
            ip_adapter_image_embeds / negative_ip_adapter_image_embeds: CLIP image features of the reference
                (and of "no image", default zeros) for an IP-Adapter loaded with :meth:`load_base_ip_adapter`.
            output_type: "pil", "np", "pt" (float in [0, 1]) or "latent".
            return_base_images: also return stage 1's images (the base model + plugins alone).
            callback_on_step_end: called as ``fn(step, stage, latents)`` after each step.
        """
        stage2_steps = check_adapter_guidance_start(adapter_guidance_start, num_inference_steps)
        self._check_strength(strength)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        base_prompts = prompts if base_prompt is None else self._as_list(base_prompt, len(prompts))
        if len(base_prompts) != len(prompts):
            raise UserError("prompt and base_prompt must have the same length")
        negatives = self._as_list(negative_prompt, len(prompts))
        base_negatives = (
            self._as_list(base_negative_prompt, len(prompts)) if base_negative_prompt is not None else negatives
        )
        device = self._execution_device
        batch = len(prompts) * num_images_per_prompt
        scale_factor = _vae_scale_factor(self.vae)
        height = height or self.unet.config.sample_size * scale_factor
        width = width or self.unet.config.sample_size * scale_factor
        base_height, base_width = self._base_size(base_height, base_width)
        base_guidance_scale = guidance_scale if base_guidance_scale is None else base_guidance_scale
        upgraded_cfg = guidance_scale > 1.0

        base = self._prepare_base(
            base_prompts,
            base_negatives,
            num_images_per_prompt,
            base_guidance_scale,
            base_height,
            base_width,
            control_image,
            guess_mode,
            (control_guidance_start, control_guidance_end),
            adapter_image,
            t2i_adapter_conditioning_scale,
            ip_adapter_image_embeds,
            negative_ip_adapter_image_embeds,
        )
        embeds, added_cond = self._encode_upgraded(
            prompts, negatives, device, num_images_per_prompt, upgraded_cfg, (height, width)
        )
        timesteps = self._aligned_timesteps(num_inference_steps, device)
        if stage1_latents is not None:
            stage1_steps = 0
        elif image is None:
            stage1_steps = len(self.base_scheduler.timesteps)
        else:
            stage1_steps = min(int(num_inference_steps * strength), num_inference_steps)
        with self.progress_bar(total=stage1_steps + stage2_steps) as progress:
            if stage1_latents is None:
                base_x0 = self._base_stage(
                    base,
                    num_inference_steps,
                    base_height,
                    base_width,
                    generator,
                    base_latents,
                    image,
                    strength,
                    controlnet_conditioning_scale,
                    progress,
                    callback_on_step_end,
                )
            else:
                factor = _vae_scale_factor(self.base_vae)
                expected = (batch, self.base_unet.config.in_channels, base_height // factor, base_width // factor)
                if tuple(stage1_latents.shape) != expected:
                    raise UserError(
                        f"stage1_latents has shape {tuple(stage1_latents.shape)}; expected the base model's "
                        f"final latents {expected}"
                    )
                base_x0 = stage1_latents.to(device=device, dtype=self.base_unet.dtype)
            base_pixels = self._decode_latents(self.base_vae, base_x0).float().clamp(-1, 1)

            # ---- hand-over: resize to the upgraded resolution, encode, noise both latents to t0
            start = num_inference_steps - stage2_steps
            self._aligned_timesteps(num_inference_steps, device)  # fresh solver state for stage 2
            _begin_at(self.scheduler, start)
            _begin_at(self.base_scheduler, start)
            stage2_timesteps = timesteps[start * self.scheduler.order :]
            t0 = stage2_timesteps[:1].repeat(batch)
            resized = upscale_for_stage_two(base_pixels, (height, width))
            upgraded_dtype = self.unet.dtype
            upgraded_x0 = self._encode_image(self.vae, resized).to(upgraded_dtype)
            upgraded_noise = randn_tensor(upgraded_x0.shape, generator=generator, device=device, dtype=upgraded_dtype)
            upgraded_latents = self.scheduler.add_noise(upgraded_x0, upgraded_noise, t0)
            base_noise = randn_tensor(base_x0.shape, generator=generator, device=device, dtype=base_x0.dtype)
            latents = self.base_scheduler.add_noise(base_x0, base_noise, t0)

            # ---- stage 2: both models on the same timesteps t0 .. 0
            injector = ResidualInjector(self.adapter, self.unet)
            base_blocks = list(self.adapter.config.base_blocks)
            with injector.active():
                for step, t in enumerate(stage2_timesteps):
                    scale = self._control_scale(base, controlnet_conditioning_scale, start + step, num_inference_steps)
                    with capture_outputs(self.base_unet, base_blocks) as captured:
                        base_prediction = self._base_forward(latents, t, base, scale)
                    features = _align_cfg([captured[name] for name in base_blocks], base["cfg"], upgraded_cfg)
                    latents = self.base_scheduler.step(
                        self._cfg(base_prediction, base_guidance_scale, base["cfg"]), t, latents, return_dict=False
                    )[0]
                    model_input = torch.cat([upgraded_latents] * 2) if upgraded_cfg else upgraded_latents
                    model_input = self.scheduler.scale_model_input(model_input, t)
                    injector.set_base_features(features, adapter_condition_scale, fusion_guidance_scale)
                    prediction = self.unet(
                        model_input, t, encoder_hidden_states=embeds, added_cond_kwargs=added_cond, return_dict=False
                    )[0]
                    prediction = self._cfg(prediction, guidance_scale, upgraded_cfg)
                    upgraded_latents = self.scheduler.step(prediction, t, upgraded_latents, return_dict=False)[0]
                    if callback_on_step_end is not None:
                        callback_on_step_end(step, "x_adapter", upgraded_latents)
                    progress.update()

        if output_type == "latent":
            images = upgraded_latents
        else:
            images = self._postprocess(self._decode_latents(self.vae, upgraded_latents), output_type)
        base_images = (
            self._postprocess(base_pixels, output_type if output_type != "latent" else "pt")
            if return_base_images
            else None
        )
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, base_images)
        return XAdapterPipelineOutput(images=images, base_images=base_images)

    @staticmethod
    def _postprocess(pixels: torch.Tensor, output_type: str) -> Any:
        images = (pixels.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return array
        if output_type == "pil":
            return [PIL.Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
        raise UserError(f"output_type={output_type!r} is not one of pil, np, pt, latent")


def upscale_for_stage_two(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Stage 1's images (in [-1, 1]) at the upgraded model's resolution: bicubic, antialiased, clamped."""
    return F.interpolate(pixels, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)


def _begin_at(scheduler: Any, step: int) -> None:
    """Start a scheduler mid-schedule (sigma-indexed schedulers need it for add_noise and step)."""
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(step * scheduler.order)


def _align_cfg(features: Sequence[torch.Tensor], base_cfg: bool, upgraded_cfg: bool) -> list[torch.Tensor]:
    """Base features in the upgraded batch layout ([uncond, cond] when that model uses CFG)."""
    if base_cfg == upgraded_cfg:
        return list(features)
    if base_cfg:  # the upgraded model runs the conditional half only
        return [f.chunk(2)[1] for f in features]
    return [torch.cat([f, f]) for f in features]
