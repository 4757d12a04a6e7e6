"""ControlNet as a base-model plugin: its UNet residuals, canny control maps and a tiny random one.

Works on plain diffusers models: :func:`controlnet_residuals` returns the keyword arguments a diffusers
``UNet2DConditionModel`` takes for a ControlNet, so any sampling loop can add them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


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
