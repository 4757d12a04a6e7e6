"""Plugins: what rides on a frozen backbone and is loaded from its published files.

- :mod:`.controlnet`: ControlNet residuals for a diffusers UNet, canny control maps, a tiny ControlNet.
- :mod:`.t2i_adapter`: T2I-Adapter features, a tiny T2I-Adapter.
- :mod:`.lora`: LoRA in diffusers / peft / kohya layouts, loaded through diffusers' own loader.
- :mod:`.ip_adapter`: IP-Adapter files, loaded into a UNet through diffusers' own loader; its image encoder.
- :func:`build_plugin`: a plugin by kind, loaded from a hub id / local path or built tiny from the UNet.

Everything works on plain diffusers models and pipelines; weight files are read through
:mod:`xa_lightning.weights`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from xa_lightning.errors import UserError
from xa_lightning.plugins.controlnet import canny_control_image, controlnet_residuals, tiny_controlnet
from xa_lightning.plugins.lora import (
    LORA_FORMATS,
    detect_lora_format,
    load_lora,
    read_lora,
    set_lora_scales,
    tiny_lora_state_dict,
)
from xa_lightning.plugins.t2i_adapter import t2i_adapter_residuals, tiny_t2i_adapter

PLUGIN_KINDS = ("none", "controlnet", "t2i_adapter", "lora", "ip_adapter")


def merge_unet_kwargs(*kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """One set of UNet keyword arguments from several plugins' (ControlNet residuals, T2I-Adapter features)."""
    merged: dict[str, Any] = {}
    for item in kwargs:
        merged.update(item)
    if "down_intrablock_additional_residuals" in merged:  # the UNet pops from this list: give it a copy
        merged["down_intrablock_additional_residuals"] = list(merged["down_intrablock_additional_residuals"])
    return merged


def build_plugin(
    kind: str,
    unet: nn.Module,
    vae_scale_factor: int,
    path: str | None = None,
    seed: int = 0,
    local_files_only: bool | None = None,
    image_encoder: Any = None,
) -> Any:
    """A base-model plugin: loaded from ``path`` (hub id or local dir / file) or, without a path, built tiny.

    Returns the model (ControlNet / T2I-Adapter), a diffusers-layout LoRA state dict, an IP-Adapter in its
    published layout (``IPAdapterLayout``; a tiny one is shaped for ``image_encoder``, default the tiny CLIP
    vision encoder), or ``None``.
    """
    if kind not in PLUGIN_KINDS:
        raise UserError(f"plugin kind {kind!r} is not one of {PLUGIN_KINDS}")
    if kind == "none":
        return None
    if kind == "ip_adapter":
        from xa_lightning.plugins import ip_adapter

        if path is None:
            encoder = image_encoder if image_encoder is not None else ip_adapter.tiny_image_encoder(seed)
            return ip_adapter.random_ip_adapter(unet, encoder, seed=seed).to_layout()
        layout = ip_adapter.read_ip_adapter(path, key="method.plugin.path")
        ip_adapter.check_fits_unet(layout, unet, key=f"method.plugin.path={path}")
        return layout
    if path is None:
        if kind == "controlnet":
            return tiny_controlnet(unet, vae_scale_factor, seed)
        if kind == "t2i_adapter":
            return tiny_t2i_adapter(unet, vae_scale_factor, seed)
        return tiny_lora_state_dict(unet, seed=seed)
    if kind == "lora":
        return read_lora(path)
    from diffusers import ControlNetModel, T2IAdapter

    cls = ControlNetModel if kind == "controlnet" else T2IAdapter
    try:
        return cls.from_pretrained(path, local_files_only=bool(local_files_only)).to(dtype=unet.dtype)
    except (OSError, ValueError) as error:
        raise UserError(
            f"cannot load {kind} from {path!r} ({type(error).__name__}); pass a local diffusers "
            f"directory or a hub id reachable from this machine"
        ) from None


__all__ = [
    "LORA_FORMATS",
    "PLUGIN_KINDS",
    "build_plugin",
    "canny_control_image",
    "controlnet_residuals",
    "detect_lora_format",
    "load_lora",
    "merge_unet_kwargs",
    "read_lora",
    "set_lora_scales",
    "t2i_adapter_residuals",
    "tiny_controlnet",
    "tiny_lora_state_dict",
    "tiny_t2i_adapter",
]
