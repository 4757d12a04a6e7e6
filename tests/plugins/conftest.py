"""Shared tiny models for the plugin tests: the real tiny SD1.5 backbone plugins ride on."""

from __future__ import annotations

import copy

import pytest

from xa_lightning.backbones import build_backbone


@pytest.fixture(scope="session")
def base_backbone():
    return build_backbone("sd15", "tiny", seed=0)


@pytest.fixture()
def fresh_base(base_backbone):
    """The backbone with its own copy of the UNet (what a LoRA modifies); the rest is shared."""
    return type(base_backbone)(
        denoiser=copy.deepcopy(base_backbone.denoiser),
        vae=base_backbone.vae,
        text_encoders=list(base_backbone.text_encoders),
        tokenizers=base_backbone.tokenizers,
        scheduler_config=base_backbone.scheduler_config,
        flavour=base_backbone.flavour,
        source=base_backbone.source,
    )
