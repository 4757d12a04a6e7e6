"""LoRA as a plugin: read diffusers / peft / kohya layouts, load through diffusers' own loader.

:func:`read_lora` reads a file / directory / state dict in any of the three layouts and returns it in
diffusers' layout; :func:`load_lora` puts it into a diffusers pipeline's UNet (and text encoder) through
diffusers' loader (peft backend), named, with a scale (0 removes its effect).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xa_lightning.errors import UserError
from xa_lightning.weights import read_state_dict

LORA_FORMATS = ("diffusers", "peft", "kohya")
LORA_WEIGHT_FILES = (
    "adapter_model.safetensors",
    "adapter_model.bin",
    "pytorch_lora_weights.safetensors",
    "pytorch_lora_weights.bin",
)
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_PEFT_PREFIX = "base_model.model."
_TEXT_ENCODER_ROOTS = ("text_model.",)


def detect_lora_format(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"kohya"`` (``lora_unet_*.lora_down.weight``), ``"peft"`` (no component prefix, ``lora_A``) or
    ``"diffusers"`` (``unet.`` / ``text_encoder.`` prefixes)."""
    keys = list(state_dict)
    if not keys:
        raise UserError("LoRA state dict is empty")
    if all(k.startswith(_KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys):
        return "diffusers"
    if all(".lora_A." in k or ".lora_B." in k or k.endswith(".alpha") for k in keys):
        return "peft"
    raise UserError(
        f"cannot tell the LoRA layout from key {keys[0]!r}; expected diffusers (unet.*), "
        "peft (*.lora_A.weight) or kohya (lora_unet_*.lora_down.weight) keys"
    )


def read_lora(
    source: str | Path | Mapping[str, torch.Tensor], lora_format: str | None = None, component: str | None = None
) -> dict[str, torch.Tensor]:
    """A LoRA in any supported layout -> a state dict diffusers' ``load_lora_weights`` accepts.

    ``source``: a state dict, a weights file, or a peft directory (``adapter_model.safetensors`` +
    ``adapter_config.json``). peft's ``lora_alpha / r`` scaling is folded into ``lora_B`` (exact), so the
    result loads with scaling 1. ``component`` (``unet`` / ``text_encoder``) names what a peft state dict
    belongs to; by default it is read from the keys.
    """
    peft_config: dict[str, Any] = {}
    if isinstance(source, Mapping):
        state_dict = dict(source)
    else:
        path = Path(source)
        if path.is_dir():
            weights = [path / name for name in LORA_WEIGHT_FILES if (path / name).is_file()]
            if not weights:
                raise UserError(
                    f"LoRA directory {path} has no adapter_model.safetensors / pytorch_lora_weights.safetensors"
                )
            path = weights[0]
            if (path.parent / "adapter_config.json").is_file():
                peft_config = json.loads((path.parent / "adapter_config.json").read_text())
        state_dict = read_state_dict(path, "LoRA file", fix="pass a .safetensors file or a peft directory")
    fmt = lora_format or detect_lora_format(state_dict)
    if fmt not in LORA_FORMATS:
        raise UserError(f"lora format {fmt!r} is not one of {LORA_FORMATS}")
    if fmt in ("diffusers", "kohya"):  # diffusers' own loader converts kohya keys
        return state_dict
    return _peft_to_diffusers(state_dict, peft_config, component)


def _peft_to_diffusers(
    state_dict: Mapping[str, torch.Tensor], peft_config: Mapping[str, Any], component: str | None
) -> dict[str, torch.Tensor]:
    rank = peft_config.get("r")
    alpha = peft_config.get("lora_alpha")
    alpha_pattern = peft_config.get("alpha_pattern") or {}
    rank_pattern = peft_config.get("rank_pattern") or {}
    if alpha_pattern or rank_pattern:
        raise UserError(
            "peft LoRA with alpha_pattern / rank_pattern is not supported; save it with uniform r and lora_alpha"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(".alpha"):
            continue
        key = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        key = key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        owner = component or ("text_encoder" if key.startswith(_TEXT_ENCODER_ROOTS) else "unet")
        if ".lora_B." in key and rank and alpha and alpha != rank:
            value = value * (float(alpha) / float(rank))
        out[f"{owner}.{key}"] = value
    return out


def load_lora(
    pipeline: Any,
    source: str | Path | Mapping[str, torch.Tensor],
    adapter_name: str,
    scale: float = 1.0,
    lora_format: str | None = None,
) -> None:
    """Load a LoRA into a diffusers pipeline (SD / SDXL LoRA loader mixins) under ``adapter_name``."""
    state_dict = read_lora(source, lora_format)
    if not hasattr(pipeline, "load_lora_weights"):
        raise TypeError(f"{type(pipeline).__name__} has no LoRA loader")
    try:  # (the SDXL loader maps kohya files' SGM block names with the UNet config itself)
        pipeline.load_lora_weights(state_dict, adapter_name=adapter_name)
    except (ValueError, KeyError, RuntimeError) as error:
        raise UserError(
            f"LoRA {source if not isinstance(source, Mapping) else adapter_name!r} does not fit this "
            f"model ({error}); check it was trained for this base model"
        ) from None
    set_lora_scales(pipeline, {adapter_name: scale})


def set_lora_scales(pipeline: Any, scales: Mapping[str, float]) -> None:
    """Activate the named LoRAs with these weights (0 = no effect); others loaded stay inactive."""
    pipeline.set_adapters(list(scales), adapter_weights=[float(s) for s in scales.values()])


def tiny_lora_state_dict(
    unet: nn.Module,
    rank: int = 4,
    seed: int = 0,
    target_modules: tuple[str, ...] = ("attn2.to_k", "attn2.to_v", "attn1.to_q"),
    std: float = 0.1,
) -> dict[str, torch.Tensor]:
    """A random LoRA for ``unet``'s linear layers ending in ``target_modules``, in diffusers' layout
    (``unet.<module>.lora_A.weight`` / ``lora_B.weight``, scaling 1); for tests, demos and benchmarks."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(target_modules):
            state[f"unet.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * std
            state[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * std
    if not state:
        raise ValueError(f"no linear layer of the UNet ends in {target_modules}")
    return state
