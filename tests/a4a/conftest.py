"""Shared tiny models for the A4A tests: the real tiny SDXL and PixArt-alpha backbones (the upgraded models),
the tiny SD1.5 (the base, for the pta_base baseline only) and helpers."""

from __future__ import annotations

import functools

import pytest
import torch

from xa_lightning.backbones import build_backbone
from xa_lightning.methods.a4a import A4AModule


def _restoring(backbone):
    """The backbone, given back with its original attention processors after the test."""
    original = dict(backbone.denoiser.attn_processors)
    yield backbone
    backbone.denoiser.set_attn_processor(original)
    backbone.denoiser.disable_gradient_checkpointing()


@pytest.fixture(scope="session")
def _sdxl():
    return build_backbone("sdxl", "tiny", seed=0)


@pytest.fixture(scope="session")
def _pixart():
    return build_backbone("pixart_alpha", "tiny", seed=0)


@pytest.fixture(scope="session")
def sd15():
    return build_backbone("sd15", "tiny", seed=0)


@pytest.fixture
def sdxl(_sdxl):
    yield from _restoring(_sdxl)


@pytest.fixture
def pixart(_pixart):
    yield from _restoring(_pixart)


@pytest.fixture(params=["sdxl", "pixart"])
def upgraded(request):
    """Each upgraded family in turn (SDXL UNet, PixArt-alpha DiT)."""
    return request.getfixturevalue(request.param)


NO_DROPOUT = {"image_dropout": 0.0, "text_dropout": 0.0, "both_dropout": 0.0}


def make_module(upgraded, **kwargs) -> A4AModule:
    """An A4A module on a tiny upgraded backbone; random PTA; no condition dropout unless given."""
    kwargs.setdefault("training", dict(NO_DROPOUT))
    kwargs.setdefault("optimizer", functools.partial(torch.optim.AdamW, weight_decay=0.0))  # groups set their lr
    return A4AModule(upgraded_backbone=upgraded, **kwargs)


def tiny_batch(upgraded, batch_size: int = 2, seed: int = 0) -> dict:
    """A fixed training batch as the data modules yield it (64 px: 8x8 latents for both families)."""
    generator = torch.Generator().manual_seed(seed)
    captions = ["a smiling woman with short hair", "an old man with a beard", "a child in a red hat"]
    return {
        "pixels": torch.rand(batch_size, 3, 64, 64, generator=generator) * 2 - 1,
        "reference": torch.rand(batch_size, 3, 48, 48, generator=generator),
        "caption": captions[:batch_size],
        "original_size": torch.full((batch_size, 2), 64),
        "crop_top_left": torch.zeros(batch_size, 2, dtype=torch.long),
        "target_size": torch.full((batch_size, 2), 64),
        "key": [f"{i}.jpg" for i in range(batch_size)],
    }
