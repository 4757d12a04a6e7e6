"""X-Adapter training as a LightningModule: frozen base + upgraded models, trainable mapping layers.

One training step (null-text training, the paper's Sec. 3.2):

    the same image at both resolutions -> base VAE -> z_b ; upgraded VAE -> z_u
    t (shared by default), different noises n_b, n_u
    base UNet(z_b noised, t, caption)  --decoder taps-->  mapper  --residuals-->
    upgraded UNet(z_u noised, t, "" + pooled "" + micro-conditioning, residuals)  -> prediction
    loss = MSE(prediction, n_u  or  v(z_u, n_u, t))       only the mapper has gradients
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from xa_lightning.backbones.surgery import capture_outputs
from xa_lightning.config import coerce_options
from xa_lightning.errors import UserError
from xa_lightning.methods.x_adapter.config import MapperOptions, PluginOptions, SamplingOptions, TrainingOptions
from xa_lightning.methods.x_adapter.injection import ResidualInjector
from xa_lightning.methods.x_adapter.mapper import XAdapterMapper
from xa_lightning.methods.x_adapter.sampling import XAdapterSampling
from xa_lightning.training import AdapterModule

BASE_FAMILIES = ("sd15",)
UPGRADED_FAMILIES = ("sdxl", "sd15")


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


def check_data_resolutions(resolution: int, extra_resolutions: Sequence[int], base: Any, upgraded: Any) -> None:
    """``data.resolution`` must be the base model's native size and ``data.extra_resolutions`` must hold the
    upgraded model's: one-line UserErrors naming the key and the value to set."""
    if int(resolution) != base.resolution:
        raise UserError(
            f"data.resolution={resolution} but the base model {base.id} works at {base.resolution} px; set "
            f"data.resolution={base.resolution}"
        )
    if upgraded.resolution not in [int(r) for r in extra_resolutions or ()]:
        raise UserError(
            f"data.extra_resolutions={list(extra_resolutions or ())} lacks the upgraded model's "
            f"{upgraded.resolution} px ({upgraded.id}); set data.extra_resolutions=[{upgraded.resolution}]"
        )


class XAdapterModule(XAdapterSampling, AdapterModule):
    """X-Adapter: trains the mapping layers that let a base model (SD1.5) and its plugins guide a frozen
    upgraded model (SDXL). Both backbones are frozen; only ``self.adapter`` (:class:`XAdapterMapper`) trains.
    The loss is here; the evaluation samplers come from :class:`XAdapterSampling`.

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
        options = self.plugin_options
        if options.kind != "none" and options.path is None and base.flavour == "pretrained":
            raise UserError(
                f"method.plugin.path is not set for the {options.kind} plugin of a real base model ({base.id}); "
                "give the plugin's file / hub id (a random tiny plugin stands in only on tiny backbones)"
            )
        self.base = self.add_backbone("base", base)
        self.upgraded = self.add_backbone("upgraded", upgraded)
        self.adapter = self._build_mapper()
        if self.training_options.gradient_checkpointing:
            upgraded.denoiser.enable_gradient_checkpointing()
            self.adapter.enable_gradient_checkpointing()
        # built on first use by the samplers (XAdapterSampling)
        self._pipeline = None
        self._plugin = None
        self._plugin_built = False
        self._image_encoder = None

    def setup(self, stage: str) -> None:
        """Check the data resolutions against the two models before the first step: the mapper was built for
        their native sizes, and its hooks would otherwise resize mismatched features silently."""
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and datamodule is not None and hasattr(datamodule, "resolution"):
            check_data_resolutions(
                datamodule.resolution, getattr(datamodule, "extra_resolutions", ()), self.base, self.upgraded
            )

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
        path = Path(options.init_weights).expanduser()
        if path.is_dir():
            try:
                loaded = XAdapterMapper.from_pretrained(path)
            except (OSError, ValueError) as error:
                raise UserError(
                    f"method.mapper.init_weights={path} is not an exported mapper ({error}); give the "
                    "adapter/ directory of an X-Adapter run or X_Adapter_v1.bin"
                ) from None
        else:
            from xa_lightning.methods.x_adapter.convert import load_official_mapper

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

    def _timesteps(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        base_steps = self.base.noise_scheduler.config.num_train_timesteps
        upgraded_steps = self.upgraded.noise_scheduler.config.num_train_timesteps

        def draw(high: int) -> torch.Tensor:
            if generator is None:  # training: torch's global RNG (checkpointed for exact resume)
                return torch.randint(0, high, (batch_size,), device=device)
            return torch.randint(0, high, (batch_size,), generator=generator).to(device)

        if self.training_options.timesteps == "shared":
            t = draw(min(base_steps, upgraded_steps))
            return t, t
        return draw(base_steps), draw(upgraded_steps)

    def _micro_conditioning(self, batch: Mapping[str, Any], suffix: str) -> dict[str, Any]:
        def pick(*keys: str) -> Any:
            return next((batch[k] for k in keys if k in batch), None)

        return {
            "original_size": pick("original_size"),
            "crop_top_left": pick(f"crop_top_left_{suffix}"),
            "target_size": pick(f"target_size_{suffix}"),
        }

    def _step_inputs(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        """Both models' noised latents and conditioning and the base model's features for one batch; noise and
        timesteps from ``generator`` (None: torch's global RNG, as training draws them)."""

        def noise_like(latents: torch.Tensor) -> torch.Tensor:
            if generator is None:
                return torch.randn_like(latents)
            return torch.randn(latents.shape, generator=generator).to(latents)

        captions = list(batch["caption"])
        batch_size = len(captions)
        with torch.no_grad():
            base_latents, upgraded_latents, suffix = self._latents(batch)
            device = upgraded_latents.device
            base_t, upgraded_t = self._timesteps(batch_size, device, generator)
            base_noise = noise_like(base_latents)
            upgraded_noise = noise_like(upgraded_latents)  # a different noise for each model
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
            with capture_outputs(self.base.denoiser, base_blocks) as captured:
                self.base.predict(base_noisy, base_t, base_cond)
            features = [captured[name] for name in base_blocks]
        return {
            "upgraded_latents": upgraded_latents,
            "upgraded_noise": upgraded_noise,
            "upgraded_noisy": upgraded_noisy,
            "upgraded_t": upgraded_t,
            "upgraded_cond": upgraded_cond,
            "added_cond": added_cond,
            "features": features,
        }

    def _upgraded_prediction(self, inputs: Mapping[str, Any], scale: float = 1.0) -> tuple[torch.Tensor, dict]:
        """The upgraded model's prediction with the mapped base features fused at ``scale``; (prediction, the
        mapped residuals by stage)."""
        injector = self.injector
        with injector.active():
            injector.set_base_features(inputs["features"], scale=scale)
            prediction = self.upgraded.predict(
                inputs["upgraded_noisy"], inputs["upgraded_t"], inputs["upgraded_cond"], inputs["added_cond"]
            )
            return prediction, dict(injector.mapped)

    def adapted_prediction(self, batch: Mapping[str, Any], strength: float, seed: int = 0) -> torch.Tensor:
        """The upgraded model with the mapper's residuals fused at ``strength``."""
        inputs = self._step_inputs(batch, torch.Generator().manual_seed(seed))
        return self._upgraded_prediction(inputs, scale=strength)[0]

    def frozen_prediction(self, batch: Mapping[str, Any], seed: int = 0) -> torch.Tensor:
        """The upgraded model alone (no hooks), on the same noisy latents and null-text conditioning."""
        inputs = self._step_inputs(batch, torch.Generator().manual_seed(seed))
        return self.upgraded.predict(
            inputs["upgraded_noisy"], inputs["upgraded_t"], inputs["upgraded_cond"], inputs["added_cond"]
        )

    def compute_loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        inputs = self._step_inputs(batch)
        prediction, mapped = self._upgraded_prediction(inputs)
        upgraded_latents, upgraded_noise, upgraded_t = (
            inputs["upgraded_latents"],
            inputs["upgraded_noise"],
            inputs["upgraded_t"],
        )
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
