"""The frozen diffusion model behind one small interface (see docs/contracts.md, "Backbones")."""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import diffusers
import torch
from diffusers import DDPMScheduler
from torch import Tensor, nn

from xa_lightning.backbones import surgery
from xa_lightning.backbones.surgery import AttentionLayer
from xa_lightning.errors import UserError

SizeLike = Tensor | Sequence[int] | None


@dataclass
class TextConditioning:
    """Text conditioning for one batch of prompts.

    ``prompt_embeds``: ``(B, L, D)`` cross-attention context. ``pooled_prompt_embeds``: ``(B, P)`` (SDXL's
    projected OpenCLIP pooled output, else None). ``attention_mask``: ``(B, L)`` 1 = token, 0 = padding
    (PixArt's T5 context, else None).
    """

    prompt_embeds: Tensor
    pooled_prompt_embeds: Tensor | None = None
    attention_mask: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    def __len__(self) -> int:
        return self.batch_size

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextConditioning:
        """Move to ``device``; cast the float tensors (never the mask) to ``dtype``."""

        def move(tensor: Tensor | None, cast: bool) -> Tensor | None:
            if tensor is None:
                return None
            return tensor.to(device=device, dtype=dtype if cast else None)

        return TextConditioning(
            move(self.prompt_embeds, True), move(self.pooled_prompt_embeds, True), move(self.attention_mask, False)
        )

    def __getitem__(self, index: int | slice | Tensor | Sequence[int]) -> TextConditioning:
        """Select samples along the batch dimension (an int keeps the dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return TextConditioning(**{k: None if v is None else v[index] for k, v in values.items()})

    @staticmethod
    def cat(items: Sequence[TextConditioning]) -> TextConditioning:
        """Concatenate along the batch dimension (e.g. ``[negative, positive]`` for classifier-free guidance)."""
        if not items:
            raise ValueError("TextConditioning.cat needs at least one item")
        merged: dict[str, Tensor | None] = {}
        for f in fields(TextConditioning):
            parts = [getattr(item, f.name) for item in items]
            if all(p is None for p in parts):
                merged[f.name] = None
            elif any(p is None for p in parts):
                raise ValueError(f"TextConditioning.cat: '{f.name}' is set on some items only")
            else:
                merged[f.name] = torch.cat(parts, dim=0)
        return TextConditioning(**merged)

    def repeat_interleave(self, repeats: int) -> TextConditioning:
        """Each sample ``repeats`` times in a row (several images per prompt)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return TextConditioning(
            **{k: None if v is None else v.repeat_interleave(repeats, dim=0) for k, v in values.items()}
        )


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(value: str | torch.dtype | None, key: str = "backbone.dtype") -> torch.dtype | None:
    """``"fp32" | "fp16" | "bf16"`` (or a ``torch.dtype``) -> ``torch.dtype``; None stays None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise UserError(f"{key}={value!r} is not a dtype; use one of {', '.join(_DTYPES)}")
    return _DTYPES[value]


def _broadcast_sizes(size: SizeLike, default: tuple[int, int], batch: int, device: torch.device) -> Tensor:
    """A ``(B, 2)`` float tensor from None (= ``default``), a pair, or a ``(2,)`` / ``(B, 2)`` tensor."""
    tensor = torch.as_tensor(default if size is None else size, device=device)
    tensor = tensor.to(device=device, dtype=torch.float32)
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.shape[-1] != 2:
        raise ValueError(f"expected sizes of shape (B, 2) or (2,), got {tuple(tensor.shape)}")
    return tensor.expand(batch, 2)


def _to_own_dtype(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)


def _cast_vae_inputs(vae: nn.Module) -> None:
    """Let a VAE kept in another dtype (``vae_dtype=fp32`` beside an fp16 denoiser, for SDXL) take latents and
    pixels of any dtype, also inside diffusers pipelines, which pass the denoiser's dtype straight to it."""
    for part in ("encoder", "post_quant_conv", "decoder"):
        module = getattr(vae, part, None)
        if isinstance(module, nn.Module) and any(True for _ in module.parameters()):
            module.register_forward_pre_hook(_to_own_dtype)


class Backbone(nn.Module):
    """A frozen text-to-image diffusion model: denoiser, VAE, text encoder(s), tokenizer(s), noise schedule.

    All parameters have ``requires_grad=False`` and every part stays in eval mode, also after ``.train()``
    (Lightning calls it on the whole module tree). Build one with :func:`build_backbone`.
    Subclasses (one per family) implement the family-specific text encoding, conditioning and pipeline.
    """

    family: ClassVar[str]
    default_path: ClassVar[str]  # hub id used by flavour="pretrained" when no path is given
    denoiser_subfolder: ClassVar[str]  # "unet" or "transformer"
    text_encoder_subfolders: ClassVar[tuple[str, ...]]
    tokenizer_subfolders: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        *,
        denoiser: nn.Module,
        vae: diffusers.AutoencoderKL,
        text_encoders: Sequence[nn.Module],
        tokenizers: Sequence[Any],
        scheduler_config: dict[str, Any],
        flavour: str,
        source: str | None = None,
        image_encoder: nn.Module | None = None,
        feature_extractor: Any = None,
    ) -> None:
        super().__init__()
        self.flavour = flavour
        self.source = source  # hub id / directory (pretrained) or "seed=<n>" (tiny, full_shape)
        self.denoiser = denoiser
        self.vae = vae
        self.text_encoders = nn.ModuleList(text_encoders)
        self.tokenizers = list(tokenizers)
        # Optional image encoder (CLIP vision) and its processor, for image-prompt plugins (IP-Adapter, A4A);
        # set with :meth:`set_image_encoder`, passed to the family's pipeline, frozen like the rest.
        self.image_encoder = image_encoder
        self.feature_extractor = feature_extractor
        # Keep the class name (which sampler), drop diffusers' bookkeeping keys.
        self.scheduler_config = {
            k: v for k, v in dict(scheduler_config).items() if not k.startswith("_") or k == "_class_name"
        }
        self.noise_scheduler = self._training_scheduler(self.scheduler_config)
        _cast_vae_inputs(vae)
        self.requires_grad_(False)
        self.train(False)

    def set_image_encoder(self, image_encoder: nn.Module | None, feature_extractor: Any = None) -> None:
        """Fill (or clear) the image-encoder slot; the encoder is frozen and kept in eval mode."""
        if image_encoder is not None:
            image_encoder.requires_grad_(False).eval()
        self.image_encoder = image_encoder
        self.feature_extractor = feature_extractor

    # ------------------------------------------------------------------------------------------- identity
    @property
    def id(self) -> str:
        """``"<family>:<flavour>"``, recorded in checkpoints to refuse loading onto another backbone."""
        return f"{self.family}:{self.flavour}"

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's dtype (the VAE may differ, see ``vae_dtype``)."""
        return next(self.denoiser.parameters()).dtype

    @property
    def prediction_type(self) -> str:
        """What ``predict`` returns and the loss targets: ``"epsilon"`` or ``"v_prediction"``."""
        return self.noise_scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def latent_size(self) -> int:
        """Native latent side length (denoiser ``sample_size``)."""
        return int(self.denoiser.config.sample_size)

    @property
    def resolution(self) -> int:
        """Native pixel resolution: 512 (SD1.5), 1024 (SDXL, PixArt-1024); tiny: 64 / 128 / 64."""
        return self.latent_size * self.vae_scale_factor

    def train(self, mode: bool = True) -> Backbone:
        """Frozen: every part stays in eval mode whatever ``mode`` is (dropout off, deterministic)."""
        del mode
        return super().train(False)

    def extra_repr(self) -> str:
        return f"id={self.id!r}, source={self.source!r}, resolution={self.resolution}"

    # ----------------------------------------------------------------------------------------- schedulers
    @staticmethod
    def _training_scheduler(config: dict[str, Any]) -> DDPMScheduler:
        accepted = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
        values = {k: v for k, v in config.items() if k in accepted}
        # Latents are not confined to [-1, 1]: never clip x0 (DDPM's default would for SDXL's config).
        values["clip_sample"] = False
        return DDPMScheduler.from_config(values)

    def inference_scheduler(self) -> diffusers.SchedulerMixin:
        """A fresh instance of the model's own sampling scheduler (PNDM / Euler / DPM-Solver++)."""
        scheduler_class = getattr(diffusers, self.scheduler_config.get("_class_name", "DDPMScheduler"))
        return scheduler_class.from_config(self.scheduler_config)

    # --------------------------------------------------------------------------------------------- text
    def _prompt_list(self, prompts: str | Sequence[str]) -> list[str]:
        if isinstance(prompts, str):
            return [prompts]
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("encode_text expects a string or a sequence of strings")
        return prompts

    def _tokenize(self, tokenizer: Any, prompts: list[str], max_length: int) -> Any:
        return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")

    def encode_text(self, prompts: str | Sequence[str]) -> TextConditioning:
        """Prompts -> :class:`TextConditioning` on the text encoders' device, as the family's pipeline does."""
        raise NotImplementedError

    def added_cond_kwargs(
        self,
        cond: TextConditioning,
        original_size: SizeLike = None,
        crop_top_left: SizeLike = None,
        target_size: SizeLike = None,
    ) -> dict[str, Tensor] | None:
        """Extra denoiser conditioning (SDXL micro-conditioning, PixArt resolution); None where there is none.

        Sizes are ``(h, w)`` / ``(top, left)`` in pixels: ``(B, 2)`` tensors, pairs, or None (= native).
        """
        return None

    # ------------------------------------------------------------------------------------------ denoise
    def _batch_timesteps(self, timesteps: Tensor | int | float, batch: int, device: torch.device) -> Tensor:
        timesteps = torch.as_tensor(timesteps, device=device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        return timesteps

    def _cast_added_cond(self, added_cond: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
        if added_cond is None:
            return None
        return {
            k: v.to(device=self.device, dtype=self.dtype) if isinstance(v, Tensor) and v.is_floating_point() else v
            for k, v in added_cond.items()
        }

    def predict(
        self,
        noisy_latents: Tensor,
        timesteps: Tensor | int | float,
        cond: TextConditioning,
        added_cond: dict[str, Tensor] | None = None,
        **denoiser_kwargs: Any,
    ) -> Tensor:
        """The denoiser's prediction (``prediction_type``) in ``noisy_latents``' dtype.

        ``timesteps``: scalar or ``(B,)``. ``added_cond``: from :meth:`added_cond_kwargs`; None = native sizes.
        ``denoiser_kwargs`` go to the diffusers model unchanged (e.g. ``cross_attention_kwargs``,
        ``down_block_additional_residuals``); cast tensors in them to ``self.dtype`` yourself.
        """
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------- VAE
    def encode_images(self, pixels: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Pixels in [-1, 1] ``(B, 3, H, W)`` -> latents ``(B, 4, H/8, W/8)`` times the VAE scaling factor.

        Uses the posterior mean (deterministic, what the data cache stores); ``sample=True`` draws from it.
        Returned in ``pixels``' dtype.
        """
        vae = self.vae
        posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        latents = posterior.sample(generator) if sample else posterior.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(pixels.dtype)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Inverse of :meth:`encode_images`: scaled latents -> pixels in [-1, 1], in ``latents``' dtype."""
        vae = self.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        unscaled = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + shift
        pixels = vae.decode(unscaled, return_dict=False)[0]
        return pixels.clamp(-1.0, 1.0).to(latents.dtype)

    # -------------------------------------------------------------------------------------- feature taps
    def decoder_blocks(self) -> list[tuple[str, nn.Module]]:
        """Decoder blocks in forward order, named by their path inside ``denoiser``."""
        raise NotImplementedError

    def capture(self, names: str | Sequence[str]) -> AbstractContextManager[dict[str, Tensor]]:
        """Record the hidden-state outputs of named denoiser blocks (see :func:`surgery.capture_outputs`)."""
        return surgery.capture_outputs(self.denoiser, names)

    def add_to_outputs(self, additions: dict[str, Tensor | Callable[[Tensor], Tensor]]) -> AbstractContextManager[None]:
        """Add residuals to named denoiser blocks' hidden states (see :func:`surgery.add_to_outputs`)."""
        return surgery.add_to_outputs(self.denoiser, additions)

    def cross_attention_layers(self) -> list[AttentionLayer]:
        """Every cross-attention (text) layer of the denoiser, in ``denoiser.attn_processors`` order.

        Real counts: SD1.5 16, SDXL 70, PixArt-alpha 28. See :func:`surgery.attention_layers`.
        """
        return surgery.attention_layers(self.denoiser, "cross")

    # --------------------------------------------------------------------------------------- pipelines
    def pipeline(self, scheduler: diffusers.SchedulerMixin | None = None) -> diffusers.DiffusionPipeline:
        """The family's diffusers pipeline sharing this backbone's modules (default: the model's scheduler)."""
        raise NotImplementedError

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write the diffusers layout (model_index.json + unet|transformer / vae / text_encoder* / tokenizer* /
        scheduler) that ``build_backbone(family, flavour="pretrained", path=directory)`` loads.

        Written to a temporary sibling and renamed into place, so a failure leaves nothing half-written.
        """
        target = Path(directory).expanduser().resolve()
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise UserError(
                f"cannot save backbone to {target}: it exists and is not an empty directory; choose a new path"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            self.pipeline().save_pretrained(str(staging), safe_serialization=True)
            if target.exists():
                target.rmdir()
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target


# ====================================================================================== UNet families
class _UNetBackbone(Backbone):
    denoiser_subfolder = "unet"

    def predict(
        self,
        noisy_latents: Tensor,
        timesteps: Tensor | int | float,
        cond: TextConditioning,
        added_cond: dict[str, Tensor] | None = None,
        **denoiser_kwargs: Any,
    ) -> Tensor:
        if added_cond is None:
            added_cond = self.added_cond_kwargs(cond)
        batch = noisy_latents.shape[0]
        prediction = self.denoiser(
            noisy_latents.to(device=self.device, dtype=self.dtype),
            self._batch_timesteps(timesteps, batch, self.device),
            encoder_hidden_states=cond.prompt_embeds.to(device=self.device, dtype=self.dtype),
            added_cond_kwargs=self._cast_added_cond(added_cond),
            return_dict=False,
            **denoiser_kwargs,
        )[0]
        return prediction.to(noisy_latents.dtype)

    def decoder_blocks(self) -> list[tuple[str, nn.Module]]:
        """``mid_block``, ``up_blocks.0``, ``up_blocks.1``, ... (outputs at increasing resolution)."""
        blocks: list[tuple[str, nn.Module]] = []
        if self.denoiser.mid_block is not None:
            blocks.append(("mid_block", self.denoiser.mid_block))
        blocks += [(f"up_blocks.{i}", block) for i, block in enumerate(self.denoiser.up_blocks)]
        return blocks


class SD15Backbone(_UNetBackbone):
    """Stable Diffusion 1.5: UNet (4 blocks, 768-d context), CLIP ViT-L/14 text encoder, VAE x0.18215."""

    family = "sd15"
    # The original runwayml/stable-diffusion-v1-5 repo was withdrawn from the Hub in 2024; this is its
    # maintained mirror with the same files (a local copy of either works through backbone.path).
    default_path = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    text_encoder_subfolders = ("text_encoder",)
    tokenizer_subfolders = ("tokenizer",)

    def encode_text(self, prompts: str | Sequence[str]) -> TextConditioning:
        tokenizer, encoder = self.tokenizers[0], self.text_encoders[0]
        ids = self._tokenize(tokenizer, self._prompt_list(prompts), tokenizer.model_max_length).input_ids
        return TextConditioning(prompt_embeds=encoder(ids.to(encoder.device))[0])

    def pipeline(self, scheduler: diffusers.SchedulerMixin | None = None) -> diffusers.StableDiffusionPipeline:
        return diffusers.StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoders[0],
            tokenizer=self.tokenizers[0],
            unet=self.denoiser,
            scheduler=scheduler or self.inference_scheduler(),
            safety_checker=None,
            feature_extractor=self.feature_extractor,
            image_encoder=self.image_encoder,
            requires_safety_checker=False,
        )


class SDXLBackbone(_UNetBackbone):
    """SDXL base: UNet (3 blocks, text_time conditioning), CLIP ViT-L + OpenCLIP bigG encoders, VAE x0.13025."""

    family = "sdxl"
    default_path = "stabilityai/stable-diffusion-xl-base-1.0"
    text_encoder_subfolders = ("text_encoder", "text_encoder_2")
    tokenizer_subfolders = ("tokenizer", "tokenizer_2")

    def encode_text(self, prompts: str | Sequence[str]) -> TextConditioning:
        """Penultimate hidden states of both encoders, concatenated; pooled = bigG's projected output."""
        prompts = self._prompt_list(prompts)
        hidden_states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = self._tokenize(tokenizer, prompts, tokenizer.model_max_length).input_ids
            output = encoder(ids.to(encoder.device), output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])
            pooled = output[0]  # text_embeds of CLIPTextModelWithProjection (the last encoder)
        return TextConditioning(prompt_embeds=torch.cat(hidden_states, dim=-1), pooled_prompt_embeds=pooled)

    def added_cond_kwargs(
        self,
        cond: TextConditioning,
        original_size: SizeLike = None,
        crop_top_left: SizeLike = None,
        target_size: SizeLike = None,
    ) -> dict[str, Tensor]:
        """``text_embeds`` (pooled) and ``time_ids`` = (original h, w, crop top, left, target h, w)."""
        if cond.pooled_prompt_embeds is None:
            raise ValueError("SDXL needs pooled_prompt_embeds; encode the prompts with this backbone's encode_text")
        batch, device = cond.batch_size, cond.prompt_embeds.device
        native = (self.resolution, self.resolution)
        time_ids = torch.cat(
            [
                _broadcast_sizes(original_size, native, batch, device),
                _broadcast_sizes(crop_top_left, (0, 0), batch, device),
                _broadcast_sizes(target_size, native, batch, device),
            ],
            dim=1,
        )
        return {"text_embeds": cond.pooled_prompt_embeds, "time_ids": time_ids.to(cond.prompt_embeds.dtype)}

    def pipeline(self, scheduler: diffusers.SchedulerMixin | None = None) -> diffusers.StableDiffusionXLPipeline:
        # No invisible watermark: evaluation compares pixels, and the package is optional.
        return diffusers.StableDiffusionXLPipeline(
            vae=self.vae,
            text_encoder=self.text_encoders[0],
            text_encoder_2=self.text_encoders[1],
            tokenizer=self.tokenizers[0],
            tokenizer_2=self.tokenizers[1],
            unet=self.denoiser,
            scheduler=scheduler or self.inference_scheduler(),
            image_encoder=self.image_encoder,
            feature_extractor=self.feature_extractor,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )


# ========================================================================================= PixArt (DiT)
class PixArtAlphaPipeline(diffusers.PixArtAlphaPipeline):
    """diffusers' PixArtAlphaPipeline, except that resolution binning is off by default where diffusers has no
    aspect-ratio bins (transformer sample sizes other than 32/64/128, i.e. tiny models), instead of raising.

    Same class name on purpose: ``save_pretrained`` writes ``"_class_name": "PixArtAlphaPipeline"``, so the
    saved directory loads with plain diffusers.
    """

    _BINNED_SAMPLE_SIZES = (32, 64, 128)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.transformer.config.sample_size not in self._BINNED_SAMPLE_SIZES:
            kwargs.setdefault("use_resolution_binning", False)
        return super().__call__(*args, **kwargs)


class PixArtAlphaBackbone(Backbone):
    """PixArt-alpha: DiT-XL/2 transformer (28 blocks, learned sigma), T5-v1.1-XXL text encoder, SD VAE."""

    family = "pixart_alpha"
    default_path = "PixArt-alpha/PixArt-XL-2-1024-MS"
    denoiser_subfolder = "transformer"
    text_encoder_subfolders = ("text_encoder",)
    tokenizer_subfolders = ("tokenizer",)
    max_sequence_length: ClassVar[int] = 120  # as PixArtAlphaPipeline

    @property
    def uses_additional_conditions(self) -> bool:
        return bool(self.denoiser.use_additional_conditions)

    def encode_text(self, prompts: str | Sequence[str]) -> TextConditioning:
        """T5 last hidden states over 120 tokens, with the padding mask (1 = token)."""
        tokenizer, encoder = self.tokenizers[0], self.text_encoders[0]
        tokens = self._tokenize(tokenizer, self._prompt_list(prompts), self.max_sequence_length)
        mask = tokens.attention_mask.to(encoder.device)
        embeds = encoder(tokens.input_ids.to(encoder.device), attention_mask=mask)[0]
        return TextConditioning(prompt_embeds=embeds, attention_mask=mask)

    def added_cond_kwargs(
        self,
        cond: TextConditioning,
        original_size: SizeLike = None,
        crop_top_left: SizeLike = None,
        target_size: SizeLike = None,
    ) -> dict[str, Tensor] | None:
        """``resolution`` (h, w) and ``aspect_ratio`` h/w of the target image, for the 1024-MS model; else None."""
        if not self.uses_additional_conditions:
            return None
        batch, device = cond.batch_size, cond.prompt_embeds.device
        native = (self.resolution, self.resolution)
        resolution = _broadcast_sizes(target_size, native, batch, device)
        aspect_ratio = resolution[:, :1] / resolution[:, 1:]
        dtype = cond.prompt_embeds.dtype
        return {"resolution": resolution.to(dtype), "aspect_ratio": aspect_ratio.to(dtype)}

    def predict(
        self,
        noisy_latents: Tensor,
        timesteps: Tensor | int | float,
        cond: TextConditioning,
        added_cond: dict[str, Tensor] | None = None,
        **denoiser_kwargs: Any,
    ) -> Tensor:
        """Epsilon; the learned-sigma (variance) channels are dropped."""
        if added_cond is None:
            added_cond = self.added_cond_kwargs(cond)
        batch = noisy_latents.shape[0]
        mask = cond.attention_mask.to(self.device) if cond.attention_mask is not None else None
        prediction = self.denoiser(
            noisy_latents.to(device=self.device, dtype=self.dtype),
            encoder_hidden_states=cond.prompt_embeds.to(device=self.device, dtype=self.dtype),
            encoder_attention_mask=mask,
            timestep=self._batch_timesteps(timesteps, batch, self.device),
            added_cond_kwargs=self._cast_added_cond(added_cond),
            return_dict=False,
            **denoiser_kwargs,
        )[0]
        channels = self.denoiser.config.in_channels
        if prediction.shape[1] == 2 * channels:
            prediction = prediction[:, :channels]
        return prediction.to(noisy_latents.dtype)

    def decoder_blocks(self) -> list[tuple[str, nn.Module]]:
        """The second half of the transformer blocks (a DiT has no up path; these play the decoder's role)."""
        blocks = self.denoiser.transformer_blocks
        return [(f"transformer_blocks.{i}", blocks[i]) for i in range(len(blocks) // 2, len(blocks))]

    def pipeline(self, scheduler: diffusers.SchedulerMixin | None = None) -> diffusers.PixArtAlphaPipeline:
        return PixArtAlphaPipeline(
            tokenizer=self.tokenizers[0],
            text_encoder=self.text_encoders[0],
            vae=self.vae,
            transformer=self.denoiser,
            scheduler=scheduler or self.inference_scheduler(),
        )


FAMILIES: dict[str, type[Backbone]] = {
    SD15Backbone.family: SD15Backbone,
    SDXLBackbone.family: SDXLBackbone,
    PixArtAlphaBackbone.family: PixArtAlphaBackbone,
}
