"""``build_backbone``: tiny / full_shape (architectures in code, random init) and pretrained (from_pretrained)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from typing import Any

import torch
from diffusers import AutoencoderKL, PixArtTransformer2DModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from xa_lightning.errors import UserError

from . import architectures as arch
from .backbone import FAMILIES, Backbone, parse_dtype
from .config import ATTENTION_NAMES, FLAVOURS, BackboneConfig
from .loading import load_pretrained_components
from .tokenizer import clip_tokenizer


def _seeded(seed: int, build: Any, *args: Any) -> Any:
    torch.manual_seed(seed)  # each part seeded on its own: adding a part never changes the others' weights
    return build(*args)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _architecture_components(family: str, flavour: str, seed: int) -> dict[str, Any]:
    """Denoiser, VAE, text encoders, tokenizers and scheduler config built from the configs in code."""
    tiny = flavour == "tiny"
    if family == "sd15":
        unet_config, text_config = (
            (arch.TINY_SD15_UNET, arch.TINY_CLIP_TEXT) if tiny else (arch.SD15_UNET, arch.CLIP_L_TEXT)
        )
        vae_config = arch.tiny_vae(64, 0.18215) if tiny else arch.SD15_VAE
        return {
            "denoiser": _seeded(seed, UNet2DConditionModel.from_config, unet_config),
            "vae": _seeded(seed, AutoencoderKL.from_config, vae_config),
            "text_encoders": [_seeded(seed, CLIPTextModel, CLIPTextConfig(**text_config))],
            "tokenizers": [clip_tokenizer()],
            "scheduler_config": arch.SD15_SCHEDULER,
        }
    if family == "sdxl":
        unet_config = arch.TINY_SDXL_UNET if tiny else arch.SDXL_UNET
        text_configs = (
            (arch.TINY_CLIP_TEXT, arch.TINY_OPEN_CLIP_TEXT) if tiny else (arch.CLIP_L_TEXT, arch.OPEN_CLIP_BIGG_TEXT)
        )
        vae_config = arch.tiny_vae(128, 0.13025, force_upcast=True) if tiny else arch.SDXL_VAE
        return {
            "denoiser": _seeded(seed, UNet2DConditionModel.from_config, unet_config),
            "vae": _seeded(seed, AutoencoderKL.from_config, vae_config),
            "text_encoders": [
                _seeded(seed, CLIPTextModel, CLIPTextConfig(**text_configs[0])),
                # seed + 1: the two tiny encoders have equal shapes; one seed would make them near-copies.
                _seeded(seed + 1, CLIPTextModelWithProjection, CLIPTextConfig(**text_configs[1])),
            ],
            "tokenizers": [clip_tokenizer(), clip_tokenizer(pad_token="!")],
            "scheduler_config": arch.SDXL_SCHEDULER,
        }
    if family == "pixart_alpha":
        transformer_config = arch.TINY_PIXART_TRANSFORMER if tiny else arch.PIXART_TRANSFORMER
        text_config = arch.TINY_T5_ENCODER if tiny else arch.T5_XXL_ENCODER
        vae_config = arch.tiny_vae(64, 0.18215) if tiny else arch.PIXART_VAE
        # No T5 sentencepiece model exists offline; the pipeline only needs the tokenizer interface, so PixArt
        # prompts are tokenized with the real CLIP BPE at PixArt's 120 tokens (pretrained loads the real T5 one).
        return {
            "denoiser": _seeded(seed, PixArtTransformer2DModel.from_config, transformer_config),
            "vae": _seeded(seed, AutoencoderKL.from_config, vae_config),
            "text_encoders": [_seeded(seed, T5EncoderModel, T5Config(**text_config))],
            "tokenizers": [clip_tokenizer(model_max_length=arch.PIXART_MAX_LENGTH)],
            "scheduler_config": arch.PIXART_SCHEDULER,
        }
    raise AssertionError(family)


def build_backbone(
    family: str,
    flavour: str = "tiny",
    path: str | None = None,
    seed: int = 0,
    dtype: str | torch.dtype = "fp32",
    local_files_only: bool | None = None,
    *,
    vae_dtype: str | torch.dtype | None = None,
    variant: str | None = None,
    revision: str | None = None,
    device: str | torch.device | None = None,
    attention: str = "sdpa",
    channels_last: bool = False,
    compile: bool = False,
) -> Backbone:
    """Build a frozen :class:`Backbone`.

    - ``family``: ``"sd15" | "sdxl" | "pixart_alpha"``.
    - ``flavour``: ``"tiny"`` (small random model, seeded, same classes as the real one), ``"full_shape"`` (the
      real architecture, random init, for benchmarks without weights) or ``"pretrained"`` (``from_pretrained``
      from ``path``: a hub id or a local diffusers directory; default: the family's official hub id).
    - ``dtype``: of the denoiser and text encoders; ``vae_dtype``: of the VAE (default ``dtype``; keep the SDXL
      VAE in fp32 when the rest is fp16, it overflows).
    - ``local_files_only``: True never goes online; None/False go online only when a hub id is missing locally
      and ``HF_HUB_OFFLINE`` is unset.
    - ``device``: where to put it; a ``full_shape`` model is initialised directly there (fast on GPU), a tiny one
      is built on CPU first so its weights do not depend on the device.
    - ``attention``, ``channels_last``, ``compile``: speed levers, see :func:`apply_levers`.
    """
    if family not in FAMILIES:
        raise UserError(f"backbone.family={family!r} is unknown; use one of {', '.join(FAMILIES)}")
    if flavour not in FLAVOURS:
        raise UserError(f"backbone.flavour={flavour!r} is unknown; use one of {', '.join(FLAVOURS)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"backbone.seed={seed!r} must be an integer")
    torch_dtype = parse_dtype(dtype, "backbone.dtype")
    torch_vae_dtype = parse_dtype(vae_dtype, "backbone.vae_dtype") or torch_dtype
    backbone_class = FAMILIES[family]

    if flavour == "pretrained":
        source = path or backbone_class.default_path
        components = load_pretrained_components(
            backbone_class,
            source,
            torch_dtype=torch_dtype,
            vae_dtype=torch_vae_dtype,
            variant=variant,
            revision=revision,
            local_files_only=local_files_only,
        )
    else:
        if path is not None:
            raise UserError(
                f"backbone.path is only used with backbone.flavour=pretrained (flavour is {flavour}); "
                "set backbone.path=null or backbone.flavour=pretrained"
            )
        # A full-shape model is initialised where it will run (minutes less for 2.5 B parameters on a GPU); a tiny
        # one on CPU, so its weights do not depend on the device. (torch.device as a context manager slows every
        # torch call, so it is only entered when needed.)
        in_place = flavour == "full_shape" and device is not None
        # Random full-shape weights are initialised in the wanted dtype: half the memory of fp32-then-cast in
        # bf16 (SDXL: 7 instead of 14 GB at the peak), so the real architectures fit a CPU box for benchmarks.
        with (
            torch.device(device) if in_place else contextlib.nullcontext(),
            _default_dtype(torch_dtype) if flavour == "full_shape" else contextlib.nullcontext(),
        ):
            components = _architecture_components(family, flavour, seed)
        source = f"seed={seed}"

    backbone = backbone_class(**components, flavour=flavour, source=source)
    # Cast only what differs (diffusers warns on every dtype cast of a model).
    for module, wanted in [(backbone.denoiser, torch_dtype), (backbone.vae, torch_vae_dtype)] + [
        (encoder, torch_dtype) for encoder in backbone.text_encoders
    ]:
        if next(module.parameters()).dtype != wanted:
            module.to(dtype=wanted)
    if device is not None:
        backbone.to(device)
    return apply_levers(backbone, attention=attention, channels_last=channels_last, compile=compile)


def apply_levers(
    backbone: Backbone, attention: str = "sdpa", channels_last: bool = False, compile: bool = False
) -> Backbone:
    """Speed levers of the frozen parts (none changes what they compute beyond floating-point rounding).

    ``attention="math"``: every attention of the denoiser, the VAE and the text encoders computed as plain
    matmul-softmax-matmul instead of PyTorch's fused ``scaled_dot_product_attention`` (the reference the
    fused kernels are measured against). ``channels_last``: the denoiser's and the VAE's 4-D weights in NHWC
    layout, which tensor-core convolutions prefer (inputs follow the weights' layout). ``compile``:
    ``torch.compile`` the denoiser's forward in place (compiled at its first call, recompiled when a method
    swaps its attention processors).
    """
    if attention not in ATTENTION_NAMES:
        raise UserError(f"backbone.attention={attention!r} is unknown; use one of {', '.join(ATTENTION_NAMES)}")
    if attention == "math":
        from diffusers.models.attention_processor import AttnProcessor

        backbone.denoiser.set_attn_processor(AttnProcessor())
        backbone.vae.set_attn_processor(AttnProcessor())
        for encoder in backbone.text_encoders:
            encoder.set_attn_implementation("eager")
    if channels_last:
        for module in (backbone.denoiser, backbone.vae):
            module.to(memory_format=torch.channels_last)
    if compile:
        backbone.denoiser.compile()
    return backbone


def backbone_from_config(cfg: Mapping[str, Any] | BackboneConfig | Any, **overrides: Any) -> Backbone:
    """Build from a Hydra/OmegaConf node or dict with the keys of :class:`BackboneConfig` (validated against it;
    unknown keys are an error)."""
    if isinstance(cfg, BackboneConfig):
        config = cfg
    else:
        try:
            from omegaconf import DictConfig, OmegaConf

            values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        except ImportError:  # pragma: no cover - omegaconf ships with hydra
            values = dict(cfg)
        config = BackboneConfig.from_dict(values)
    values = asdict(config)
    return build_backbone(
        values["family"],
        values["flavour"],
        path=values["path"],
        seed=values["seed"],
        dtype=values["dtype"],
        vae_dtype=values["vae_dtype"],
        variant=values["variant"],
        revision=values["revision"],
        attention=values["attention"],
        channels_last=values["channels_last"],
        compile=values["compile"],
        **overrides,
    )
