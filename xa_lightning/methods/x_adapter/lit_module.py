"""X-Adapter training as a LightningModule: frozen base + upgraded models, trainable mapping layers.

One training step (null-text training, the paper's Sec. 3.2):

    the same image at both resolutions -> base VAE -> z_b ; upgraded VAE -> z_u
    t (shared by default), different noises n_b, n_u
    base UNet(z_b noised, t, caption)  --decoder taps-->  mapper  --residuals-->
    upgraded UNet(z_u noised, t, "" + pooled "" + micro-conditioning, residuals)  -> prediction
    loss = MSE(prediction, n_u  or  v(z_u, n_u, t))       only the mapper has gradients
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from xa_lightning.config import coerce_options
from xa_lightning.errors import UserError
from xa_lightning.methods.x_adapter.injection import ResidualInjector, capture_block_outputs
from xa_lightning.methods.x_adapter.mapper import FUSION_TYPES, INSERTION_PLACES, XAdapterMapper
from xa_lightning.methods.x_adapter.plugins import PLUGIN_KINDS, build_plugin, canny_control_image
from xa_lightning.training import AdapterModule, Sampler

BASE_FAMILIES = ("sd15",)
UPGRADED_FAMILIES = ("sdxl", "sd15")


@dataclass
class MapperOptions:
    """How the mapping layers are built (``method.mapper``), see :class:`XAdapterMapper`.

    ``insertion``: decoder (paper) | encoder | both. ``num_stages``: mapped blocks per place (paper: 3).
    ``block_pairs``: explicit ``[[base_block, upgraded_block], ...]`` instead of the derived pairs.
    ``init_weights``: start from the official ``X_Adapter_v1.bin`` or an exported mapper directory;
    ``require_init_weights``: refuse to run without them (evaluation experiments).
    """

    insertion: str = "decoder"
    num_stages: int = 3
    block_pairs: list[list[str]] | None = None
    num_res_blocks: int = 3
    kernel_size: int = 3
    fusion_type: str = "add"
    init_weights: str | None = None
    require_init_weights: bool = False

    def __post_init__(self) -> None:
        if self.require_init_weights and not self.init_weights:
            raise UserError(
                "method.mapper.init_weights is required by this experiment (it evaluates a trained "
                "mapper): pass X_Adapter_v1.bin or a run's adapter/ export, or set X_ADAPTER_WEIGHTS"
            )
        if self.insertion not in INSERTION_PLACES:
            raise UserError(f"method.mapper.insertion={self.insertion!r} is not one of {INSERTION_PLACES}")
        if self.fusion_type not in FUSION_TYPES:
            raise UserError(f"method.mapper.fusion_type={self.fusion_type!r} is not one of {FUSION_TYPES}")
        if self.init_weights is not None and not Path(self.init_weights).exists():
            raise UserError(
                f"method.mapper.init_weights={self.init_weights} does not exist; give X_Adapter_v1.bin "
                "or an exported adapter directory"
            )


@dataclass
class TrainingOptions:
    """The training recipe (``method.training``).

    ``null_text``: the upgraded model gets the empty prompt (paper); false: the caption (ablation).
    ``timesteps``: shared (one t for both models, paper default) | independent.
    ``gradient_checkpointing``: recompute the upgraded UNet's and the mapper's activations in backward.
    ``cached_upgraded_latents``: with a data cache, trust ``latents_<R>`` as the UPGRADED VAE's latents
    (a cache written with the base backbone holds base-VAE latents at R: those are wrong for SDXL).
    """

    null_text: bool = True
    timesteps: str = "shared"
    gradient_checkpointing: bool = False
    cached_upgraded_latents: bool = False

    def __post_init__(self) -> None:
        if self.timesteps not in ("shared", "independent"):
            raise UserError(f"method.training.timesteps={self.timesteps!r} must be shared or independent")


@dataclass
class SamplingOptions:
    """Two-stage sampling for evaluation (``method.sampling``); official defaults: DPM-Solver++ 50 steps,
    CFG 7.5, alpha (adapter_guidance_start) 0.7-1.0 per plugin, condition scale 1.0-1.5.

    ``base_prompt_suffix`` is appended to the base model's prompts only (a LoRA's trigger words, as the
    official LoRA example does with a separate SD1.5 prompt).
    """

    steps: int = 50
    scheduler: str = "dpmsolver++"
    guidance_scale: float = 7.5
    base_guidance_scale: float | None = None
    adapter_guidance_start: float = 0.8
    adapter_condition_scale: float = 1.0
    fusion_guidance_scale: float | None = None
    negative_prompt: str = ""
    base_prompt_suffix: str = ""
    progress: bool = False


@dataclass
class PluginOptions:
    """The base model's plugin in evaluation (``method.plugin``); training is always plugin-free.

    ``kind``: none | controlnet | t2i_adapter | lora. ``path``: hub id / local dir / LoRA file; null builds
    a tiny random one from the base UNet (demo, tests). ``scale``: conditioning scale / LoRA weight.
    ``condition``: how evaluation references become the ControlNet / T2I-Adapter input: identity (the
    references ARE control maps, e.g. canny maps: what edge_f1 compares against) | canny (OpenCV canny of
    reference photos). ``img2img_strength``: stage 1 starts from the reference image noised to this strength
    (ControlNet tile: the reference is both the control and the init image).
    """

    kind: str = "none"
    path: str | None = None
    scale: float = 1.0
    condition: str = "identity"
    img2img_strength: float | None = None
    lora_format: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in PLUGIN_KINDS:
            raise UserError(f"method.plugin.kind={self.kind!r} is not one of {PLUGIN_KINDS}")
        if self.condition not in ("identity", "canny"):
            raise UserError(f"method.plugin.condition={self.condition!r} must be identity or canny")
        if self.img2img_strength is not None and not 0.0 < self.img2img_strength <= 1.0:
            raise UserError(f"method.plugin.img2img_strength={self.img2img_strength} must be in (0, 1] or null")
        looks_local = self.path is not None and (
            self.path.startswith((".", "/", "~")) or Path(self.path).suffix in (".safetensors", ".bin", ".pt")
        )
        if looks_local and not Path(self.path).expanduser().exists():
            raise UserError(f"method.plugin.path={self.path} does not exist")


def _coerce(value: Any, cls: type, key: str) -> Any:
    return coerce_options(value, cls, f"method.{key}")


def _build_backbone(spec: Any, key: str) -> torch.nn.Module:
    if isinstance(spec, torch.nn.Module):
        return spec
    if spec is None:
        raise UserError(
            f"method.{key} is not set; give it a backbone config (in conf/method/x_adapter.yaml: "
            f"defaults: [/backbone@{key}: <option>])"
        )
    from xa_lightning.backbones import backbone_from_config

    return backbone_from_config(spec)


class XAdapterModule(AdapterModule):
    """X-Adapter: trains the mapping layers that let a base model (SD1.5) and its plugins guide a frozen
    upgraded model (SDXL). Both backbones are frozen; only ``self.adapter`` (:class:`XAdapterMapper`) trains.

    Args:
        base_backbone / upgraded_backbone: ``Backbone`` objects or their configs.
        mapper / training / sampling / plugin: :class:`MapperOptions`, :class:`TrainingOptions`,
            :class:`SamplingOptions`, :class:`PluginOptions` (or mappings of them).
        optimizer / lr_scheduler: partials taking the parameter groups / the optimizer.
        name: the run name experiments give.
    """

    method = "x_adapter"

    def __init__(
        self,
        base_backbone: Any = None,
        upgraded_backbone: Any = None,
        mapper: MapperOptions | Mapping[str, Any] | None = None,
        training: TrainingOptions | Mapping[str, Any] | None = None,
        sampling: SamplingOptions | Mapping[str, Any] | None = None,
        plugin: PluginOptions | Mapping[str, Any] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        name: str = "x_adapter",
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)
        self.run_name = name
        self.mapper_options = _coerce(mapper, MapperOptions, "mapper")
        self.training_options = _coerce(training, TrainingOptions, "training")
        self.sampling = _coerce(sampling, SamplingOptions, "sampling")
        self.plugin_options = _coerce(plugin, PluginOptions, "plugin")

        base = _build_backbone(base_backbone, "base_backbone")
        upgraded = _build_backbone(upgraded_backbone, "upgraded_backbone")
        if base.family not in BASE_FAMILIES:
            raise UserError(
                f"method.base_backbone.family={base.family!r}: X-Adapter's base model must be a "
                f"UNet with one text encoder ({', '.join(BASE_FAMILIES)})"
            )
        if upgraded.family not in UPGRADED_FAMILIES:
            raise UserError(
                f"method.upgraded_backbone.family={upgraded.family!r}: X-Adapter maps into a UNet "
                f"({', '.join(UPGRADED_FAMILIES)}); DiT upgraded models are not supported"
            )
        self.base = self.add_backbone("base", base)
        self.upgraded = self.add_backbone("upgraded", upgraded)
        self.adapter = self._build_mapper()
        if self.training_options.gradient_checkpointing:
            upgraded.denoiser.enable_gradient_checkpointing()
            self.adapter.enable_gradient_checkpointing()
        self._pipeline: Any = None
        self._plugin: Any = None
        self._plugin_built = False

    # ------------------------------------------------------------------ mapper
    @property
    def injector(self) -> ResidualInjector:
        """Hooks that fuse the current ``self.adapter``'s residuals into the upgraded UNet."""
        return ResidualInjector(self.adapter, self.upgraded.denoiser)

    def _build_mapper(self) -> XAdapterMapper:
        options = self.mapper_options
        base_size = (self.base.latent_size, self.base.latent_size)
        upgraded_size = (self.upgraded.latent_size, self.upgraded.latent_size)
        mapper = XAdapterMapper.from_unets(
            self.base.denoiser,
            self.upgraded.denoiser,
            base_size,
            upgraded_size,
            insertion=options.insertion,
            num_stages=options.num_stages,
            block_pairs=options.block_pairs,
            num_res_blocks=options.num_res_blocks,
            kernel_size=options.kernel_size,
            fusion_type=options.fusion_type,
        )
        if options.init_weights is None:
            return mapper
        path = Path(options.init_weights)
        if path.is_dir():
            try:
                loaded = XAdapterMapper.from_pretrained(path)
            except (OSError, ValueError) as error:
                raise UserError(
                    f"method.mapper.init_weights={path} is not an exported mapper ({error}); give the "
                    "adapter/ directory of an X-Adapter run or X_Adapter_v1.bin"
                ) from None
        else:
            from xa_lightning.methods.x_adapter.converter import load_official_mapper

            loaded = load_official_mapper(path, mapper.config.base_blocks, mapper.config.upgraded_blocks)
        mine = {
            k: list(v) if isinstance(v, (list, tuple)) else v for k, v in mapper.config.items() if not k.startswith("_")
        }
        theirs = {
            k: list(v) if isinstance(v, (list, tuple)) else v for k, v in loaded.config.items() if not k.startswith("_")
        }
        if mine != theirs:
            differing = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise UserError(
                f"method.mapper.init_weights={path} does not fit these backbones / mapper settings "
                f"(differs in {', '.join(differing)}); use the backbones it was trained for"
            )
        return loaded

    # ------------------------------------------------------------------ training
    def _upgraded_resolution_key(self, batch: Mapping[str, Any], prefix: str) -> str | None:
        key = f"{prefix}_{self.upgraded.resolution}"
        if key in batch:
            return key
        others = sorted(k for k in batch if k.startswith(prefix + "_") and k[len(prefix) + 1 :].isdigit())
        return others[0] if len(others) == 1 else None

    def _latents(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, str]:
        """(base latents, upgraded latents, resolution key suffix) from pixels or the data cache."""
        if "pixels" in batch:
            base_latents = self.base.encode_images(batch["pixels"])
        elif "latents" in batch:
            base_latents = batch["latents"]
        else:
            raise UserError("the batch has neither pixels nor latents; X-Adapter needs an image datamodule")
        pixels_key = self._upgraded_resolution_key(batch, "pixels")
        if pixels_key is not None:
            return base_latents, self.upgraded.encode_images(batch[pixels_key]), pixels_key.split("_", 1)[1]
        latents_key = self._upgraded_resolution_key(batch, "latents")
        if latents_key is not None and self.training_options.cached_upgraded_latents:
            return base_latents, batch[latents_key], latents_key.split("_", 1)[1]
        if latents_key is not None:
            raise UserError(
                f"the data cache holds {latents_key} but X-Adapter cannot tell which VAE made it; "
                "set method.training.cached_upgraded_latents=true only if the upgraded backbone's VAE "
                "wrote it, else disable data.cache"
            )
        raise UserError(
            f"the batch has no pixels_{self.upgraded.resolution}: set data.extra_resolutions="
            f"[{self.upgraded.resolution}] (the upgraded model's resolution)"
        )

    def _timesteps(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        base_steps = self.base.noise_scheduler.config.num_train_timesteps
        upgraded_steps = self.upgraded.noise_scheduler.config.num_train_timesteps
        if self.training_options.timesteps == "shared":
            t = torch.randint(0, min(base_steps, upgraded_steps), (batch_size,), device=device)
            return t, t
        return (
            torch.randint(0, base_steps, (batch_size,), device=device),
            torch.randint(0, upgraded_steps, (batch_size,), device=device),
        )

    def _micro_conditioning(self, batch: Mapping[str, Any], suffix: str) -> dict[str, Any]:
        def pick(*keys: str) -> Any:
            return next((batch[k] for k in keys if k in batch), None)

        return {
            "original_size": pick("original_size"),
            "crop_top_left": pick(f"crop_top_left_{suffix}"),
            "target_size": pick(f"target_size_{suffix}"),
        }

    def compute_loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        captions = list(batch["caption"])
        batch_size = len(captions)
        with torch.no_grad():
            base_latents, upgraded_latents, suffix = self._latents(batch)
            device = upgraded_latents.device
            base_t, upgraded_t = self._timesteps(batch_size, device)
            base_noise = torch.randn_like(base_latents)
            upgraded_noise = torch.randn_like(upgraded_latents)  # a different noise for each model
            base_noisy = self.base.noise_scheduler.add_noise(base_latents, base_noise, base_t)
            upgraded_noisy = self.upgraded.noise_scheduler.add_noise(upgraded_latents, upgraded_noise, upgraded_t)

            if "prompt_embeds" in batch:  # data cache: caption embeddings of the base text encoder
                from xa_lightning.backbones import TextConditioning

                base_cond = TextConditioning(prompt_embeds=batch["prompt_embeds"])
            else:
                base_cond = self.base.encode_text(captions)
            upgraded_prompts = [""] * batch_size if self.training_options.null_text else captions
            upgraded_cond = self.upgraded.encode_text(upgraded_prompts)
            added_cond = self.upgraded.added_cond_kwargs(upgraded_cond, **self._micro_conditioning(batch, suffix))

            base_blocks = list(self.adapter.config.base_blocks)
            with capture_block_outputs(self.base.denoiser, base_blocks) as captured:
                self.base.predict(base_noisy, base_t, base_cond)
            features = [captured[name] for name in base_blocks]

        injector = self.injector
        with injector.active():
            injector.set_base_features(features)
            prediction = self.upgraded.predict(upgraded_noisy, upgraded_t, upgraded_cond, added_cond)
            mapped = dict(injector.mapped)
        if self.upgraded.prediction_type == "v_prediction":
            target = self.upgraded.noise_scheduler.get_velocity(upgraded_latents, upgraded_noise, upgraded_t)
        else:
            target = upgraded_noise
        loss = F.mse_loss(prediction.float(), target.float())
        logs: dict[str, Any] = {}
        for stage, value in mapped.items():
            first = value if isinstance(value, torch.Tensor) else value[0]
            logs[f"residual_rms/{stage}"] = first.detach().float().square().mean().sqrt()
        return loss, logs

    # ------------------------------------------------------------------ sampling
    def pipeline(self) -> Any:
        """The two-stage :class:`XAdapterPipeline` over this module's backbones and mapper (+ plugin)."""
        from xa_lightning.methods.x_adapter.pipeline import XAdapterPipeline

        if self._pipeline is None:
            plugin = self._build_plugin()
            kind = self.plugin_options.kind
            self._pipeline = XAdapterPipeline.from_backbones(
                self.base,
                self.upgraded,
                self.adapter,
                scheduler=self.sampling.scheduler,
                controlnet=plugin if kind == "controlnet" else None,
                t2i_adapter=plugin if kind == "t2i_adapter" else None,
            )
            self._pipeline.set_progress_bar_config(disable=not self.sampling.progress)
            if kind == "lora":
                self._pipeline.load_base_lora(
                    plugin, "plugin", scale=self.plugin_options.scale, lora_format=self.plugin_options.lora_format
                )
                self.base.requires_grad_(False)
                self.base.denoiser.disable_adapters()  # training stays plugin-free
        return self._pipeline

    def _build_plugin(self) -> Any:
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
            condition = canny_control_image((references * 255).round().to(torch.uint8).cpu())
        if options.kind == "controlnet":
            kwargs.update(control_image=condition, controlnet_conditioning_scale=options.scale)
        elif options.kind == "t2i_adapter":
            kwargs.update(adapter_image=condition, t2i_adapter_conditioning_scale=options.scale)
        return kwargs

    def _lora_active(self, active: bool) -> None:
        if self.plugin_options.kind == "lora":
            (self.base.denoiser.enable_adapters if active else self.base.denoiser.disable_adapters)()

    @staticmethod
    def _to_uint8(images: torch.Tensor) -> torch.Tensor:
        return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()

    @staticmethod
    def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
        return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]

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
                generator=self._generators(seeds),
                output_type="pt",
                **self._plugin_kwargs(references),
            ).images
        finally:
            self._lora_active(False)
        return self._to_uint8(images)

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
                generator=self._generators(seeds),
                **self._plugin_kwargs(references),
            )
        finally:
            self._lora_active(False)
        return self._to_uint8(images)

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
            generator=self._generators(seeds),
            height=size,
            width=size,
            output_type="latent",
        ).images
        with torch.no_grad():
            pixels = self.upgraded.decode_latents(latents)
        return self._to_uint8(pixels.float() / 2 + 0.5)

    def evaluation_samplers(self) -> OrderedDict[str, Sampler]:
        """``x_adapter`` (the method), ``upgraded`` (e.g. SDXL alone), ``base`` (e.g. SD1.5 + plugin)."""
        return OrderedDict(x_adapter=self.sample_x_adapter, upgraded=self.sample_upgraded, base=self.sample_base)
