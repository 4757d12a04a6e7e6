"""SUN distillation as a LightningModule: frozen SD-family UNet + trainable SUN adapter + MSC loss."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from xa_lightning.config import coerce_options
from xa_lightning.errors import UserError
from xa_lightning.methods.sun.adapter import SCALE_PARAMETERS, SUNAdapter
from xa_lightning.methods.sun.attention import concat_negative
from xa_lightning.methods.sun.config import DistillationConfig, SamplingOptions, SUNAdapterOptions, TeacherOptions
from xa_lightning.methods.sun.msc import SUNDistillation
from xa_lightning.methods.sun.pipeline import load_sun_adapter
from xa_lightning.methods.sun.sampling import SUNSampling
from xa_lightning.methods.sun.teacher import CFGTeacher, NegativePromptBank
from xa_lightning.training import AdapterModule
from xa_lightning.training.utils import seeded_noisy_latents

SUPPORTED_FAMILIES = ("sd15",)


class SUNModule(SUNSampling, AdapterModule):
    """SpeedUpNet distillation: the student is the frozen UNet + SUN (no CFG, ``student_steps`` steps),
    the teacher the same frozen UNet with CFG and a sampled negative prompt (DPM-Solver++, 25 steps).
    Only the SUN adapter trains. The loss is here; the evaluation samplers come from :class:`SUNSampling`.

    Args:
        backbone: a :class:`~xa_lightning.backbones.Backbone` or its config (``backbone: ${backbone}``).
        adapter / teacher / distillation / sampling: :class:`SUNAdapterOptions`, :class:`TeacherOptions`,
            :class:`DistillationConfig`, :class:`SamplingOptions` (or mappings).
        optimizer / lr_scheduler: partials taking the parameter groups / the optimizer.
        name: the run name experiments give (``run_name``).
    """

    method = "sun"

    def __init__(
        self,
        backbone: Any,
        adapter: SUNAdapterOptions | Mapping[str, Any] | None = None,
        teacher: TeacherOptions | Mapping[str, Any] | None = None,
        distillation: DistillationConfig | Mapping[str, Any] | None = None,
        sampling: SamplingOptions | Mapping[str, Any] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        name: str = "sun",
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.run_name = name
        self.adapter_options = coerce_options(adapter, SUNAdapterOptions, "method.adapter")
        self.teacher_options = coerce_options(teacher, TeacherOptions, "method.teacher")
        self.distillation_config = coerce_options(distillation, DistillationConfig, "method.distillation")
        self.sampling = coerce_options(sampling, SamplingOptions, "method.sampling")
        # cheap checks first (the options checked themselves): fail before loading gigabytes of frozen weights
        options = self.teacher_options
        self.negative_prompts = NegativePromptBank(
            options.negative_prompts, empty_probability=options.empty_negative_probability
        )
        family = backbone.family if isinstance(backbone, torch.nn.Module) else dict(backbone).get("family")
        if family not in SUPPORTED_FAMILIES:
            raise UserError(
                f"SUN supports backbone.family in {SUPPORTED_FAMILIES}, not {family!r}; use backbone=sd15 / sd15_tiny"
            )

        if not isinstance(backbone, torch.nn.Module):
            from xa_lightning.backbones import backbone_from_config

            backbone = backbone_from_config(backbone)
        self.add_backbone("backbone", backbone)
        unet = backbone.denoiser
        num_tokens = int(backbone.tokenizers[0].model_max_length)
        self.adapter = self._build_adapter(unet, num_tokens)
        self.adapter.install(unet)

        self.teacher = CFGTeacher(
            unet,
            backbone.scheduler_config,
            self.adapter,
            num_steps=options.num_steps,
            guidance_scale=options.guidance_scale,
            guidance_scale_range=options.guidance_scale_range,
        )
        self.distillation = SUNDistillation(self.distillation_config, self.teacher, backbone.scheduler_config)
        self._negative_cache: dict[str, torch.Tensor] = {}

    def _build_adapter(self, unet: torch.nn.Module, num_tokens: int) -> SUNAdapter:
        options = self.adapter_options
        kwargs = dict(num_negative_tokens=num_tokens, norm_scope=options.norm_scope, norm_eps=options.norm_eps)
        if options.init_weights:
            # the weights bring their own layer config (norm scope, positive branch); options only apply to new ones
            adapter = load_sun_adapter(options.init_weights, unet, num_negative_tokens=num_tokens)
            if adapter.config.num_negative_tokens != num_tokens:
                raise UserError(
                    f"method.adapter.init_weights={options.init_weights} reads "
                    f"{adapter.config.num_negative_tokens} negative tokens, the tokenizer gives "
                    f"{num_tokens}; use weights made for this text encoder"
                )
            return adapter.to(unet.device)
        return SUNAdapter.from_unet(
            unet,
            use_positive_branch=options.use_positive_branch,
            alpha_init=options.alpha_init,
            beta_init=options.beta_init,
            projection_init=options.projection_init,
            **kwargs,
        )

    # ------------------------------------------------------------------ text
    def param_groups(self) -> list[dict[str, Any]]:
        """One group, or with ``method.adapter.scale_lr`` two: ``projections`` (the optimizer's lr) and
        ``scales`` (alpha / beta at ``scale_lr``); LearningRateMonitor logs each by name."""
        scale_lr = self.adapter_options.scale_lr
        if scale_lr is None:
            return super().param_groups()
        named = [(n, p) for n, p in self.adapter.named_parameters() if p.requires_grad]
        scales = [p for n, p in named if n.rsplit(".", 1)[-1] in SCALE_PARAMETERS]
        projections = [p for n, p in named if n.rsplit(".", 1)[-1] not in SCALE_PARAMETERS]
        return [
            {"params": projections, "name": "projections"},
            {"params": scales, "name": "scales", "lr": float(scale_lr)},
        ]

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone.encode_text(list(prompts)).prompt_embeds

    def encode_negatives(self, prompts: Sequence[str]) -> torch.Tensor:
        """Negative prompts come from a fixed list: encode each once (the text encoder is frozen)."""
        missing = sorted({p for p in prompts if p not in self._negative_cache})
        if missing:
            for prompt, embeds in zip(missing, self.encode_prompts(missing)):
                self._negative_cache[prompt] = embeds
        device = self.backbone.device
        stacked = torch.stack([self._negative_cache[p] for p in prompts])
        if stacked.device != device:  # the module moved (CPU -> GPU) after caching
            self._negative_cache = {k: v.to(device) for k, v in self._negative_cache.items()}
            stacked = stacked.to(device)
        return stacked

    # ------------------------------------------------------------------ training
    def student(self, latents: torch.Tensor, timestep: Any, encoder_states: torch.Tensor) -> torch.Tensor:
        """One call of the UNet with SUN: ``encoder_states = cat([prompt, negative], tokens)``."""
        unet = self.backbone.denoiser
        out = unet(latents.to(unet.dtype), timestep, encoder_hidden_states=encoder_states.to(unet.dtype)).sample
        return out.to(latents.dtype)

    def _probe_inputs(self, batch: Mapping[str, Any], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noisy latents, timesteps (drawn from ``seed``) and the captions' embeddings of one batch."""
        backbone = self.backbone
        with torch.no_grad():
            latents = (
                batch["latents"].float() if "latents" in batch else backbone.encode_images(batch["pixels"].float())
            )
            noisy, timesteps = seeded_noisy_latents(backbone.noise_scheduler, latents, seed)
            prompt = (
                batch["prompt_embeds"].to(backbone.device)
                if "prompt_embeds" in batch
                else self.encode_prompts(batch["caption"])
            )
        return noisy, timesteps, prompt.float()

    def adapted_prediction(self, batch: Mapping[str, Any], strength: float, seed: int = 0) -> torch.Tensor:
        """The UNet with SUN at ``strength`` (its correction scaled), the sampling negative prompt beside the prompt."""
        noisy, timesteps, prompt = self._probe_inputs(batch, seed)
        negative = self.encode_negatives([self.sampling.negative_prompt] * noisy.shape[0]).float()
        previous = self.adapter.scale
        self.adapter.set_scale(strength)
        try:
            return self.student(noisy, timesteps, concat_negative(prompt, negative))
        finally:
            self.adapter.set_scale(previous)

    def frozen_prediction(self, batch: Mapping[str, Any], seed: int = 0) -> torch.Tensor:
        """The UNet with SUN taken out, on the prompt alone."""
        noisy, timesteps, prompt = self._probe_inputs(batch, seed)
        unet = self.backbone.denoiser
        self.adapter.uninstall(unet)
        try:
            return self.student(noisy, timesteps, prompt)
        finally:
            self.adapter.install(unet)

    def compute_loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        backbone = self.backbone
        with torch.no_grad():
            if "latents" in batch:
                latents = batch["latents"].float()
            else:
                latents = backbone.encode_images(batch["pixels"].float())
            if "prompt_embeds" in batch:
                prompt_embeds = batch["prompt_embeds"].to(backbone.device)
            else:
                prompt_embeds = self.encode_prompts(batch["caption"])
        batch_size = latents.shape[0]
        negative_embeds = self.encode_negatives(self.negative_prompts.sample(batch_size))
        scales = self.teacher.sample_guidance_scales(batch_size, latents.device)
        loss, logs = self.distillation(self.student, latents, prompt_embeds.float(), negative_embeds.float(), scales)
        logs["guidance_scale"] = scales.mean()
        return loss, logs
