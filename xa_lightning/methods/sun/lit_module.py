"""SUN distillation as a LightningModule: frozen SD-family UNet + trainable SUN adapter + MSC loss."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xa_lightning.config import coerce_options
from xa_lightning.errors import UserError
from xa_lightning.methods.sun.adapter import SUNAdapter
from xa_lightning.methods.sun.msc import DistillationConfig, SUNDistillation
from xa_lightning.methods.sun.pipeline import SUNPipeline, load_sun_adapter
from xa_lightning.methods.sun.teacher import CFGTeacher, NegativePromptBank, dpm_solver
from xa_lightning.training import AdapterModule, Sampler

SUPPORTED_FAMILIES = ("sd15",)


@dataclass
class SUNAdapterOptions:
    """How the adapter is built (``method.adapter``); see :meth:`SUNAdapter.from_unet`.

    ``init_weights``: start from trained weights instead: an official ``sun_adapter_*.safetensors`` or an
    xa-lightning adapter export directory (fine-tuning / evaluating released weights);
    ``require_init_weights``: refuse to start without them (evaluation-only experiments).
    """

    use_positive_branch: bool = False
    norm_scope: str = "sample"
    norm_eps: float = 1e-6
    alpha_init: float = 1.0
    beta_init: float = 0.0
    projection_init: str = "copy"
    init_weights: str | None = None
    require_init_weights: bool = False


@dataclass
class TeacherOptions:
    """The CFG teacher (``method.teacher``).

    ``guidance_scale_range`` ``[lo, hi]``: draw the teacher's CFG scale per sample (the student then
    learns the average behaviour over that range); null: always ``guidance_scale``.
    ``negative_prompts``: file with one negative prompt per line, one drawn per sample (null: the
    checkout's ``evaluation/negative_prompts.txt``);
    ``empty_negative_probability``: share of samples that get the empty negative prompt instead.
    """

    num_steps: int = 25
    guidance_scale: float = 7.5
    guidance_scale_range: list[float] | None = None
    negative_prompts: str | None = None
    empty_negative_probability: float = 0.1


@dataclass
class SamplingOptions:
    """Evaluation / sampling settings (``method.sampling``).

    ``steps``: the student's steps; ``negative_prompt``: used by the SUN sampler and by the teacher
    baseline alike (same prompts, seeds and negative prompt). ``plugin_unets``: name -> hub id or local
    directory of a fine-tuned UNet of the same architecture (a diffusers model dir, or a pipeline dir with
    ``unet/``); each adds the samplers ``sun_<name>`` (this adapter plugged in, no retraining) and
    ``teacher_<name>`` (that UNet with CFG, 25 steps).
    """

    steps: int = 4
    negative_prompt: str = "worst quality, low quality, blurry, watermark, text"
    progress: bool = False
    plugin_unets: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.plugin_unets = {str(k): str(v) for k, v in dict(self.plugin_unets or {}).items()}
        for name in self.plugin_unets:
            if not name.isidentifier():
                raise UserError(f"method.sampling.plugin_unets.{name}: use a plain name (letters, digits, _)")


_coerce = coerce_options


class SUNModule(AdapterModule):
    """SpeedUpNet distillation: the student is the frozen UNet + SUN (no CFG, ``student_steps`` steps),
    the teacher the same frozen UNet with CFG and a sampled negative prompt (DPM-Solver++, 25 steps).
    Only the SUN adapter trains.

    Args:
        backbone: a :class:`~xa_lightning.backbones.Backbone` or its config (``backbone: ${backbone}``).
        adapter / teacher / distillation / sampling: :class:`SUNAdapterOptions`, :class:`TeacherOptions`,
            :class:`~xa_lightning.methods.sun.msc.DistillationConfig`, :class:`SamplingOptions` (or mappings).
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
        self.adapter_options = _coerce(adapter, SUNAdapterOptions, "method.adapter")
        self.teacher_options = _coerce(teacher, TeacherOptions, "method.teacher")
        self.distillation_config = _coerce(distillation, DistillationConfig, "method.distillation")
        self.sampling = _coerce(sampling, SamplingOptions, "method.sampling")
        # cheap checks first: fail before loading gigabytes of frozen weights
        options = self.teacher_options
        if options.negative_prompts is None:  # the project's list, when running from a checkout
            from xa_lightning.config import repo_root

            default = repo_root() / "evaluation" / "negative_prompts.txt"
            options.negative_prompts = str(default) if default.is_file() else None
        self.negative_prompts = NegativePromptBank(
            options.negative_prompts, empty_probability=options.empty_negative_probability
        )
        init_weights = self.adapter_options.init_weights
        if self.adapter_options.require_init_weights and not init_weights:
            raise UserError(
                "method.adapter.init_weights is required by this experiment: set it to the official "
                "sun_adapter_*.safetensors or an xa-lightning SUN adapter export directory"
            )
        if init_weights and not Path(init_weights).exists():
            raise UserError(
                f"method.adapter.init_weights={init_weights} does not exist; point it to the official "
                "sun_adapter_*.safetensors or an adapter export directory"
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

    # ------------------------------------------------------------------ evaluation
    def _generate(self, pipe: Any, prompts: Sequence[str], seeds: Sequence[int], **kwargs: Any) -> torch.Tensor:
        resolution = self.backbone.resolution
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        with torch.no_grad():
            images = pipe(
                list(prompts),
                negative_prompt=[self.sampling.negative_prompt] * len(prompts),
                generator=generators,
                height=resolution,
                width=resolution,
                output_type="pt",
                **kwargs,
            ).images
        return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()

    def sun_pipeline(self) -> SUNPipeline:
        """The backbone's diffusers pipeline with SUN: 4 steps, DPM-Solver++ trailing, no CFG."""
        pipe = SUNPipeline(self.backbone.pipeline(), self.adapter, num_inference_steps=self.sampling.steps)
        pipe.set_progress_bar_config(disable=not self.sampling.progress)
        return pipe

    def teacher_pipeline(self) -> Any:
        """The frozen model's pipeline: DPM-Solver++ with the teacher's steps (use with CFG)."""
        pipe = self.backbone.pipeline(scheduler=dpm_solver(self.backbone.scheduler_config))
        pipe.set_progress_bar_config(disable=not self.sampling.progress)
        return pipe

    def sample_sun(self, prompts: list[str], seeds: list[int], references: torch.Tensor | None = None) -> torch.Tensor:
        return self._generate(self.sun_pipeline(), prompts, seeds)

    def sample_teacher(
        self, prompts: list[str], seeds: list[int], references: torch.Tensor | None = None
    ) -> torch.Tensor:
        with self.adapter.disabled():
            return self._generate(
                self.teacher_pipeline(),
                prompts,
                seeds,
                guidance_scale=self.teacher_options.guidance_scale,
                num_inference_steps=self.teacher_options.num_steps,
            )

    def plugin_unet(self, name: str) -> torch.nn.Module:
        """A fine-tuned UNet from ``sampling.plugin_unets`` (loaded once, frozen, never checkpointed)."""
        cache = self.__dict__.setdefault("_plugin_cache", {})
        backbone = self.backbone
        if name not in cache:
            from diffusers import UNet2DConditionModel

            source = self.sampling.plugin_unets[name]
            subfolder = "unet" if (Path(source) / "unet").is_dir() or not Path(source).exists() else None
            try:
                unet = UNet2DConditionModel.from_pretrained(source, subfolder=subfolder, torch_dtype=backbone.dtype)
            except (OSError, ValueError) as error:
                raise UserError(
                    f"method.sampling.plugin_unets.{name}={source}: cannot load a UNet from it "
                    f"({type(error).__name__}); give a diffusers UNet or pipeline directory / hub id"
                ) from error
            cache[name] = unet.requires_grad_(False).eval()
        unet = cache[name].to(backbone.device)
        self.adapter.check_compatible(unet)
        return unet

    def _plugin_pipeline(self, name: str, scheduler: Any = None) -> Any:
        import diffusers

        base = self.backbone.pipeline(scheduler=scheduler)
        return diffusers.StableDiffusionPipeline(
            **{**base.components, "unet": self.plugin_unet(name)}, requires_safety_checker=False
        )

    def _plugin_samplers(self, name: str) -> dict[str, Sampler]:
        def sun(prompts: list[str], seeds: list[int], references: torch.Tensor | None = None) -> torch.Tensor:
            pipe = SUNPipeline(self._plugin_pipeline(name), self.adapter, num_inference_steps=self.sampling.steps)
            pipe.set_progress_bar_config(disable=not self.sampling.progress)
            return self._generate(pipe, prompts, seeds)

        def teacher(prompts: list[str], seeds: list[int], references: torch.Tensor | None = None) -> torch.Tensor:
            pipe = self._plugin_pipeline(name, scheduler=dpm_solver(self.backbone.scheduler_config))
            pipe.set_progress_bar_config(disable=not self.sampling.progress)
            with self.adapter.disabled():
                return self._generate(
                    pipe,
                    prompts,
                    seeds,
                    guidance_scale=self.teacher_options.guidance_scale,
                    num_inference_steps=self.teacher_options.num_steps,
                )

        return {f"sun_{name}": sun, f"teacher_{name}": teacher}

    def evaluation_samplers(self) -> OrderedDict[str, Sampler]:
        """``sun``: the student (4 steps, no CFG); ``teacher``: 25-step DPM-Solver++ with CFG, same seeds;
        then ``sun_<name>`` / ``teacher_<name>`` for every fine-tuned UNet in ``sampling.plugin_unets``."""
        samplers: OrderedDict[str, Sampler] = OrderedDict(sun=self.sample_sun, teacher=self.sample_teacher)
        for name in self.sampling.plugin_unets:
            samplers.update(self._plugin_samplers(name))
        return samplers
