"""Shared tiny models for the X-Adapter tests: the real tiny backbones (sd15 base, sdxl upgraded)."""

from __future__ import annotations

import copy

import pytest

from xa_lightning.backbones import build_backbone


@pytest.fixture(scope="session")
def base_backbone():
    return build_backbone("sd15", "tiny", seed=0)


@pytest.fixture(scope="session")
def upgraded_backbone():
    return build_backbone("sdxl", "tiny", seed=0)


def _with_private_denoiser(backbone):
    """The same backbone with its own copy of the denoiser (what UNet LoRAs modify); the rest is shared."""
    return type(backbone)(
        denoiser=copy.deepcopy(backbone.denoiser),
        vae=backbone.vae,
        text_encoders=list(backbone.text_encoders),
        tokenizers=backbone.tokenizers,
        scheduler_config=backbone.scheduler_config,
        flavour=backbone.flavour,
        source=backbone.source,
    )


@pytest.fixture()
def fresh_base(base_backbone):
    """For tests that load plugins (LoRA) into the base UNet."""
    return _with_private_denoiser(base_backbone)


@pytest.fixture()
def fresh_upgraded(upgraded_backbone):
    return _with_private_denoiser(upgraded_backbone)
