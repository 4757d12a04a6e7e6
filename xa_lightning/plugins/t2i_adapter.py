"""T2I-Adapter as a base-model plugin: its features for the UNet and a tiny random one."""

from __future__ import annotations

import torch
from torch import nn


def t2i_adapter_residuals(adapter: nn.Module, adapter_image: torch.Tensor, scale: float = 1.0) -> list[torch.Tensor]:
    """T2I-Adapter features scaled by ``scale`` (timestep-independent: compute once per sampling run).

    A diffusers UNet takes them as ``down_intrablock_additional_residuals``.
    """
    dtype = next(adapter.parameters()).dtype
    return [state * scale for state in adapter(adapter_image.to(dtype))]


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
