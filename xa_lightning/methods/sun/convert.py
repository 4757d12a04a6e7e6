"""Converter between the official SpeedUpNet weight file and :class:`SUNAdapter`.

The official release (williechai/speedup-plugin-for-stable-diffusions, ``sun_adapter_sdv15_4step*.safetensors``)
stores the state dict of ``nn.ModuleList(unet.attn_processors.values())``: keys are numbered by the
position of the layer's processor among ALL attention processors (self-attention included, which holds
no weights), so SD1.5's 16 cross-attention layers are ``1, 3, ..., 31``::

    {i}.to_k_neg.weight  {i}.to_v_neg.weight  {i}.to_k_neg_alpha  {i}.to_k_neg_beta
    {i}.to_k_extra_pos.weight  {i}.to_v_extra_pos.weight  {i}.to_k_extra_pos_alpha  {i}.to_k_extra_pos_beta
    {i}.scale   (only with its ``param_scale``; unused by its forward pass, dropped here)

Ours is ``layers.{k}.to_k_neg.weight``, ``layers.{k}.neg_alpha`` ... with ``k`` the cross-attention layer's
rank. The numbering is derived from the target UNet, so other architectures convert too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xa_lightning.backbones.surgery import attention_layers
from xa_lightning.errors import UserError
from xa_lightning.methods.sun.adapter import SUNAdapter
from xa_lightning.weights import read_state_dict

# official suffix -> ours
_NEGATIVE_KEYS = {
    "to_k_neg.weight": "to_k_neg.weight",
    "to_v_neg.weight": "to_v_neg.weight",
    "to_k_neg_alpha": "neg_alpha",
    "to_k_neg_beta": "neg_beta",
}
_POSITIVE_KEYS = {
    "to_k_extra_pos.weight": "to_k_pos.weight",
    "to_v_extra_pos.weight": "to_v_pos.weight",
    "to_k_extra_pos_alpha": "pos_alpha",
    "to_k_extra_pos_beta": "pos_beta",
}
_IGNORED = {"scale"}
_OFFICIAL_KEY = re.compile(
    r"^(?:.*\.)?(\d+)\.(" + "|".join(re.escape(k) for k in [*_NEGATIVE_KEYS, *_POSITIVE_KEYS, *_IGNORED]) + r")$"
)


def official_indices(unet: nn.Module, layer_names: Sequence[str] | None = None) -> list[int]:
    """Each cross-attention layer's number in the official file: its position in ``unet.attn_processors``."""
    positions = {layer.name: i for i, layer in enumerate(attention_layers(unet, "all"))}
    names = list(layer_names) if layer_names is not None else [layer.name for layer in attention_layers(unet, "cross")]
    return [positions[name] for name in names]


def has_positive_branch(official: Mapping[str, Any]) -> bool:
    return any(".to_k_extra_pos" in key for key in official)


def official_to_sun(official: Mapping[str, torch.Tensor], indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """Official state dict -> ``SUNAdapter`` state dict (``indices[k]`` = official number of our layer k)."""
    rank = {index: k for k, index in enumerate(indices)}
    ours: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in official.items():
        match = _OFFICIAL_KEY.match(key)
        if match is None:
            unknown.append(key)
            continue
        index, suffix = int(match.group(1)), match.group(2)
        if suffix in _IGNORED:
            continue
        if index not in rank:
            raise UserError(
                f"SUN weight key {key!r} is for attention processor {index}, which is not a "
                f"cross-attention layer of this UNet (those are {list(indices)}); "
                "use weights made for this UNet architecture"
            )
        ours[f"layers.{rank[index]}.{_NEGATIVE_KEYS.get(suffix) or _POSITIVE_KEYS[suffix]}"] = value
    if unknown:
        raise UserError(
            f"SUN weight file has keys that are not SpeedUpNet's (e.g. {unknown[0]!r}); "
            "pass the official sun_adapter_*.safetensors or an xa-lightning SUN export"
        )
    return ours


def sun_to_official(ours: Mapping[str, torch.Tensor], indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """``SUNAdapter`` state dict -> the official layout (inverse of :func:`official_to_sun`)."""
    inverse = {v: k for k, v in {**_NEGATIVE_KEYS, **_POSITIVE_KEYS}.items()}
    official: dict[str, torch.Tensor] = {}
    for key, value in ours.items():
        match = re.match(r"^layers\.(\d+)\.(.+)$", key)
        if match is None or match.group(2) not in inverse:
            raise ValueError(f"not a SUNAdapter key: {key!r}")
        official[f"{indices[int(match.group(1))]}.{inverse[match.group(2)]}"] = value
    return official


def load_official_adapter(
    path_or_state: str | Path | Mapping[str, torch.Tensor],
    unet: nn.Module,
    num_negative_tokens: int = 77,
    **adapter_kwargs: Any,
) -> SUNAdapter:
    """A :class:`SUNAdapter` for ``unet`` holding the official release's weights (not yet installed)."""
    if isinstance(path_or_state, Mapping):
        official = path_or_state
    else:
        official = read_state_dict(
            path_or_state,
            "SUN weights",
            fix="download the official sun_adapter_*.safetensors or point to an exported adapter",
        )
    adapter = SUNAdapter.from_unet(
        unet,
        num_negative_tokens=num_negative_tokens,
        use_positive_branch=has_positive_branch(official),
        projection_init="random",
        **adapter_kwargs,
    )
    state = official_to_sun(official, official_indices(unet, adapter.config.layer_names))
    expected = adapter.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(
            f"SUN weight file lacks {missing[0]} (and {len(missing) - 1} more); "
            "it was not made for this UNet architecture"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise UserError(
                f"SUN weight {key} has shape {tuple(value.shape)}, this UNet needs "
                f"{tuple(expected[key].shape)}; use weights made for this UNet architecture"
            )
    adapter.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return adapter
