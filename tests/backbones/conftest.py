"""Tiny backbones built once per (family, seed) for the whole session."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from xa_lightning.backbones import Backbone, build_backbone
from xa_lightning.backbones.config import FAMILY_NAMES


@pytest.fixture(scope="session")
def tiny_backbone() -> Callable[..., Backbone]:
    """``tiny_backbone(family, seed=0)``: a cached tiny backbone (do not leave hooks or changes on it)."""
    cache: dict[tuple[str, int], Backbone] = {}

    def get(family: str, seed: int = 0) -> Backbone:
        if (family, seed) not in cache:
            cache[(family, seed)] = build_backbone(family, "tiny", seed=seed)
        return cache[(family, seed)]

    return get


@pytest.fixture(params=FAMILY_NAMES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def backbone(tiny_backbone: Callable[..., Backbone], family: str) -> Backbone:
    return tiny_backbone(family)


def latents_for(backbone: Backbone, batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    size = backbone.latent_size
    return torch.randn(batch, backbone.latent_channels, size, size, generator=generator)


def pixels_for(backbone: Backbone, batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    size = backbone.resolution
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
