"""Shared tiny models for the SUN tests: the real tiny SD1.5 backbone (16 cross-attention layers, 8x8
latents, CLIP tokenizer with 77 tokens) and helpers."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from xa_lightning.backbones import build_backbone
from xa_lightning.methods.sun import SUNAdapter


@pytest.fixture(scope="session")
def backbone():
    return build_backbone("sd15", "tiny", seed=0)


@pytest.fixture(scope="session")
def other_unet(backbone):
    """A different 'fine-tune' of the same architecture: same config, other weights."""
    torch.manual_seed(123)
    return UNet2DConditionModel.from_config(backbone.denoiser.config).requires_grad_(False).eval()


@pytest.fixture
def unet(backbone):
    """The backbone's UNet, returned to its original processors after each test."""
    unet = backbone.denoiser
    original = dict(unet.attn_processors)
    yield unet
    unet.set_attn_processor(original)


def random_adapter(unet, seed: int = 0, **kwargs) -> SUNAdapter:
    """An adapter with non-trivial weights (as after training): random projections, alpha/beta off 1/0."""
    torch.manual_seed(seed)
    adapter = SUNAdapter.from_unet(unet, projection_init="random", **kwargs)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if name.endswith(("alpha", "beta")):
                param.add_(0.2 * torch.randn_like(param))
    return adapter


def text_states(backbone, prompts, negatives):
    with torch.no_grad():
        return (backbone.encode_text(prompts).prompt_embeds, backbone.encode_text(negatives).prompt_embeds)
