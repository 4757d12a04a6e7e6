"""Load the official X-Adapter release (``X_Adapter_v1.bin``) into :class:`XAdapterMapper`.

The official mapper (showlab/X-Adapter, ``model/adapter.py``) keeps all residual blocks of all stages in
one flat list and the output convs in another::

    body.{stage * R + j}.up_opt.op.{weight,bias}     stride-2 transposed conv (first block of a stage only)
    body.{stage * R + j}.in_conv.{weight,bias}       channel change (first block, when channels differ)
    body.{stage * R + j}.block1.{weight,bias}        3x3 conv
    body.{stage * R + j}.block2.{weight,bias}        kxk conv
    zero_out.{stage}.{weight,bias}                   zero-initialised 1x1 conv

Ours nests them per stage (``stages.{stage}.blocks.{j}.{upsample,in_conv,conv1,conv2}``,
``stages.{stage}.zero_out``). The converter reads the stage count, blocks per stage, channels, kernel
size and upsampling from the tensors' shapes, so it also converts mappers trained with other settings;
variants the release never used (timestep embedding, GroupNorm, skip convs, SPADE) are refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from xa_lightning.errors import UserError
from xa_lightning.methods.x_adapter.mapper import XAdapterMapper
from xa_lightning.weights import read_state_dict

# The release's pairs: SD1.5 up_blocks 1..3 -> SDXL mid block, up_blocks 0..1.
OFFICIAL_BASE_BLOCKS = ("up_blocks.1", "up_blocks.2", "up_blocks.3")
OFFICIAL_UPGRADED_BLOCKS = ("mid_block", "up_blocks.0", "up_blocks.1")

_BODY_KEY = re.compile(r"^body\.(\d+)\.(up_opt\.op|in_conv|block1|block2)\.(weight|bias)$")
_OUT_KEY = re.compile(r"^zero_out\.(\d+)\.(weight|bias)$")
_OURS = {"up_opt.op": "upsample", "in_conv": "in_conv", "block1": "conv1", "block2": "conv2"}
_UNSUPPORTED = ("timestep_proj", "norm1", "skep", "gamma", "beta", "time_embedding", "down_opt")


def _strip_wrappers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept ``{"state_dict": ...}`` and ``module.`` / ``adapter.`` prefixes (DDP / wrapper saves)."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "adapter."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def convert_official_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    source: str = "state dict",
    base_blocks: Sequence[str] = OFFICIAL_BASE_BLOCKS,
    upgraded_blocks: Sequence[str] = OFFICIAL_UPGRADED_BLOCKS,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Official key layout -> (``XAdapterMapper`` config kwargs, our state dict)."""
    state_dict = _strip_wrappers(state_dict)
    bad = sorted(k for k in state_dict if any(part in k.split(".") for part in _UNSUPPORTED))
    if bad:
        raise UserError(
            f"{source}: key {bad[0]!r} belongs to an official mapper variant (timestep / norm / skip "
            "conv / SPADE) that X_Adapter_v1 does not use and this converter does not support"
        )
    body: dict[int, dict[str, torch.Tensor]] = {}
    outs: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if match := _BODY_KEY.match(key):
            body.setdefault(int(match[1]), {})[f"{match[2]}.{match[3]}"] = value
        elif match := _OUT_KEY.match(key):
            outs.setdefault(int(match[1]), {})[match[2]] = value
        else:
            raise UserError(
                f"{source}: unexpected key {key!r}; expected the official X-Adapter layout "
                "(body.N.block1.weight, ..., zero_out.N.weight)"
            )
    num_stages = len(outs)
    if (
        num_stages == 0
        or not body
        or sorted(outs) != list(range(num_stages))
        or sorted(body) != list(range(len(body)))
        or len(body) % num_stages
    ):
        raise UserError(
            f"{source}: the official layout needs zero_out.0..S-1 and S*R body blocks; "
            f"found {num_stages} zero_out and {len(body)} body entries"
        )
    blocks_per_stage = len(body) // num_stages
    if len(base_blocks) != num_stages or len(upgraded_blocks) != num_stages:
        raise UserError(f"{source} has {num_stages} stages; pass as many base_blocks / upgraded_blocks")

    in_channels, out_channels, resample = [], [], []
    converted: dict[str, torch.Tensor] = {}
    kernel_size = int(body[0]["block2.weight"].shape[-1])
    for stage in range(num_stages):
        first = body[stage * blocks_per_stage]
        out_channels.append(int(outs[stage]["weight"].shape[0]))
        if "in_conv.weight" in first:
            in_channels.append(int(first["in_conv.weight"].shape[1]))
        else:
            in_channels.append(int(first["block1.weight"].shape[1]))
        resample.append("transpose" if "up_opt.op.weight" in first else "none")
        for j in range(blocks_per_stage):
            for name, value in body[stage * blocks_per_stage + j].items():
                module, param = name.rsplit(".", 1)
                converted[f"stages.{stage}.blocks.{j}.{_OURS[module]}.{param}"] = value
        for param, value in outs[stage].items():
            converted[f"stages.{stage}.zero_out.{param}"] = value
    config = dict(
        in_channels=in_channels,
        out_channels=out_channels,
        resample=resample,
        base_blocks=list(base_blocks),
        upgraded_blocks=list(upgraded_blocks),
        num_res_blocks=blocks_per_stage,
        kernel_size=kernel_size,
        fusion_type="add",
    )
    return config, converted


def load_official_mapper(
    path_or_state_dict: str | Path | Mapping[str, torch.Tensor],
    base_blocks: Sequence[str] = OFFICIAL_BASE_BLOCKS,
    upgraded_blocks: Sequence[str] = OFFICIAL_UPGRADED_BLOCKS,
) -> XAdapterMapper:
    """An :class:`XAdapterMapper` holding the official weights (``.bin`` / ``.pt`` / ``.safetensors``)."""
    if isinstance(path_or_state_dict, Mapping):
        state_dict, source = path_or_state_dict, "state dict"
    else:
        source = str(path_or_state_dict)
        state_dict = read_state_dict(
            path_or_state_dict,
            "X-Adapter weights",
            fix="download X_Adapter_v1.bin from the official release and pass its path",
        )
    config, converted = convert_official_state_dict(state_dict, source, base_blocks, upgraded_blocks)
    mapper = XAdapterMapper(**config)
    mapper.load_state_dict(converted, strict=True)
    return mapper
