"""ControlNet and T2I-Adapter plugins on a diffusers UNet: residuals change it, scale 0 leaves it bit-identical;
build_plugin builds tiny ones and refuses bad input in one line."""

from __future__ import annotations

import pytest
import torch

from xa_lightning.errors import UserError
from xa_lightning.plugins import (
    build_plugin,
    canny_control_image,
    controlnet_residuals,
    merge_unet_kwargs,
    t2i_adapter_residuals,
)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.full((2,), 400),
        torch.randn(2, 77, 32, generator=g),
        torch.rand(2, 3, 64, 64, generator=g),
    )


def _unet(unet, x, t, states, **kwargs):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=states, **merge_unet_kwargs(kwargs)).sample


def test_controlnet_residuals_drive_the_unet_and_scale_zero_is_exact(base_backbone):
    unet = base_backbone.denoiser
    controlnet = build_plugin("controlnet", unet, base_backbone.vae_scale_factor, seed=0)
    x, t, states, control = _inputs()
    plain = _unet(unet, x, t, states)
    with torch.no_grad():
        on = controlnet_residuals(controlnet, x, t, states, control, scale=1.0)
        off = controlnet_residuals(controlnet, x, t, states, control, scale=0.0)
    assert set(on) == {"down_block_additional_residuals", "mid_block_additional_residual"}
    assert (_unet(unet, x, t, states, **on) - plain).abs().max() > 1e-4
    assert torch.equal(_unet(unet, x, t, states, **off), plain)


def test_t2i_adapter_features_drive_the_unet_and_scale_zero_is_exact(base_backbone):
    unet = base_backbone.denoiser
    adapter = build_plugin("t2i_adapter", unet, base_backbone.vae_scale_factor, seed=0)
    x, t, states, image = _inputs()
    plain = _unet(unet, x, t, states)
    with torch.no_grad():
        features = t2i_adapter_residuals(adapter, image, scale=1.0)
        zero = t2i_adapter_residuals(adapter, image, scale=0.0)
    assert len(features) == len(unet.down_blocks)
    merged = merge_unet_kwargs({"down_intrablock_additional_residuals": features})
    assert merged["down_intrablock_additional_residuals"] is not features  # the UNet pops from its copy
    assert (_unet(unet, x, t, states, down_intrablock_additional_residuals=features) - plain).abs().max() > 1e-4
    assert len(features) == len(unet.down_blocks)  # ... so the caller's list survives the call
    assert torch.equal(_unet(unet, x, t, states, down_intrablock_additional_residuals=zero), plain)


def test_build_plugin_kinds_and_errors(base_backbone, tmp_path):
    unet = base_backbone.denoiser
    assert build_plugin("none", unet, 8) is None
    lora = build_plugin("lora", unet, 8)
    assert lora and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in lora)
    with pytest.raises(UserError, match="plugin kind 'ip_adapterr'"):
        build_plugin("ip_adapterr", unet, 8)
    with pytest.raises(UserError, match="cannot load controlnet"):
        build_plugin("controlnet", unet, 8, path=str(tmp_path / "missing"), local_files_only=True)
    with pytest.raises(UserError, match="does not exist"):
        build_plugin("lora", unet, 8, path=str(tmp_path / "missing.safetensors"))


def test_canny_control_image_matches_opencv():
    import cv2
    import numpy as np

    g = torch.Generator().manual_seed(0)
    images = (torch.rand(2, 3, 32, 32, generator=g) * 255).to(torch.uint8)
    maps = canny_control_image(images)
    assert maps.shape == (2, 3, 32, 32) and maps.dtype == torch.float32
    expected = cv2.Canny(np.ascontiguousarray(images[1].permute(1, 2, 0).numpy()), 100, 200) / 255.0
    assert torch.equal(maps[1, 0], torch.from_numpy(expected).float())
