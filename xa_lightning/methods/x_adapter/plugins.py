"""Base-model plugins X-Adapter carries: ControlNet, T2I-Adapter and LoRA (diffusers / peft / kohya layouts).

Kept free of X-Adapter specifics so the module can move to a shared ``xa_lightning/plugins/`` later:
everything here works on plain diffusers models and pipelines.

- ControlNet / T2I-Adapter: :func:`controlnet_residuals` and :func:`t2i_adapter_residuals` return the
  keyword arguments a diffusers ``UNet2DConditionModel`` takes for them, so any sampling loop can add them.
- LoRA: :func:`read_lora` reads a file / directory / state dict in any of the three layouts and
  returns it in diffusers' layout; :func:`load_lora` puts it into a diffusers pipeline's UNet (and text
  encoder) through diffusers' own loader (peft backend), named, with a scale (0 removes its effect).
- :func:`build_plugin` loads a real plugin (hub id / local dir) or builds a tiny random one from the
  base UNet's shapes (tests, demo, benchmarks).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xa_lightning.errors import UserError

PLUGIN_KINDS = ("none", "controlnet", "t2i_adapter", "lora")
LORA_FORMATS = ("diffusers", "peft", "kohya")
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_PEFT_PREFIX = "base_model.model."
_TEXT_ENCODER_ROOTS = ("text_model.",)


# ---------------------------------------------------------------------------------------- ControlNet / T2I
def controlnet_residuals(
    controlnet: nn.Module,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    control_image: torch.Tensor,
    scale: float = 1.0,
    guess_mode: bool = False,
    added_cond_kwargs: dict | None = None,
) -> dict[str, Any]:
    """UNet kwargs (``down_block_additional_residuals``, ``mid_block_additional_residual``) of a ControlNet."""
    down, mid = controlnet(
        sample,
        timestep,
        encoder_hidden_states=encoder_hidden_states,
        controlnet_cond=control_image.to(sample.dtype),
        conditioning_scale=scale,
        guess_mode=guess_mode,
        added_cond_kwargs=added_cond_kwargs,
        return_dict=False,
    )
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def t2i_adapter_residuals(adapter: nn.Module, adapter_image: torch.Tensor, scale: float = 1.0) -> list[torch.Tensor]:
    """T2I-Adapter features scaled by ``scale`` (timestep-independent: compute once per sampling run)."""
    dtype = next(adapter.parameters()).dtype
    return [state * scale for state in adapter(adapter_image.to(dtype))]


def merge_unet_kwargs(*kwargs: Mapping[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for item in kwargs:
        merged.update(item)
    if "down_intrablock_additional_residuals" in merged:  # the UNet pops from this list: give it a copy
        merged["down_intrablock_additional_residuals"] = list(merged["down_intrablock_additional_residuals"])
    return merged


def canny_control_image(images: torch.Tensor, low: int = 100, high: int = 200) -> torch.Tensor:
    """Canny edge maps (OpenCV) of uint8 ``(B,3,H,W)`` images as float ``(B,3,H,W)`` in [0, 1]."""
    import cv2

    if images.dtype != torch.uint8:
        raise ValueError("canny_control_image expects uint8 images")
    maps = []
    for image in images.permute(0, 2, 3, 1).cpu().numpy():
        edges = cv2.Canny(np.ascontiguousarray(image), low, high)
        maps.append(torch.from_numpy(edges).float().div(255.0).expand(3, -1, -1))
    return torch.stack(maps)


# ---------------------------------------------------------------------------------------- LoRA
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


def _read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"cannot read LoRA weights {path}: {error}") from None


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
            weights = [
                path / n
                for n in (
                    "adapter_model.safetensors",
                    "adapter_model.bin",
                    "pytorch_lora_weights.safetensors",
                    "pytorch_lora_weights.bin",
                )
                if (path / n).is_file()
            ]
            if not weights:
                raise UserError(
                    f"LoRA directory {path} has no adapter_model.safetensors / pytorch_lora_weights.safetensors"
                )
            state_dict = _read_tensor_file(weights[0])
            if (path / "adapter_config.json").is_file():
                peft_config = json.loads((path / "adapter_config.json").read_text())
        elif path.is_file():
            state_dict = _read_tensor_file(path)
        else:
            raise UserError(f"LoRA weights {path} do not exist; pass a .safetensors file or a peft directory")
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


# ---------------------------------------------------------------------------------------- building plugins
def tiny_controlnet(unet: nn.Module, vae_scale_factor: int, seed: int = 0, zero_convs_std: float = 0.05) -> nn.Module:
    """A ControlNet copied from ``unet`` (diffusers ``ControlNetModel.from_unet``) with random zero convs.

    A real ControlNet starts with zero convs and learns them; a freshly copied one would do nothing, so
    tests and demos draw them at random to make the plugin's effect visible.
    """
    from diffusers import ControlNetModel

    downsamples = max(int(round(np.log2(vae_scale_factor))), 0)
    embedding_channels = tuple(16 * 2**i for i in range(downsamples + 1))
    generator = torch.Generator().manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding_channels)
    with torch.no_grad():
        for module in [
            *controlnet.controlnet_down_blocks,
            controlnet.controlnet_mid_block,
            controlnet.controlnet_cond_embedding.conv_out,
        ]:
            for param in module.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * zero_convs_std)
    return controlnet.to(dtype=unet.dtype)


def tiny_t2i_adapter(unet: nn.Module, vae_scale_factor: int, seed: int = 0) -> nn.Module:
    """A random ``T2IAdapter`` whose features fit ``unet``'s down blocks (one per block)."""
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    channels = [int(block.resnets[0].out_channels) for block in unet.down_blocks]
    return T2IAdapter(
        in_channels=3,
        channels=channels,
        num_res_blocks=1,
        downscale_factor=vae_scale_factor,
        adapter_type="full_adapter",
    ).to(dtype=unet.dtype)


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


def build_plugin(
    kind: str,
    unet: nn.Module,
    vae_scale_factor: int,
    path: str | None = None,
    seed: int = 0,
    local_files_only: bool | None = None,
) -> Any:
    """A base-model plugin: loaded from ``path`` (hub id or local dir) or, without a path, built tiny.

    Returns the model (ControlNet / T2I-Adapter), a diffusers-layout LoRA state dict, or ``None``.
    """
    if kind not in PLUGIN_KINDS:
        raise UserError(f"plugin kind {kind!r} is not one of {PLUGIN_KINDS}")
    if kind == "none":
        return None
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
