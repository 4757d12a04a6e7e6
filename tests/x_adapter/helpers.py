"""Helpers shared by the X-Adapter tests."""

from __future__ import annotations

import torch

from xa_lightning.methods.x_adapter.mapper import XAdapterMapper
from xa_lightning.methods.x_adapter.pipeline import XAdapterPipeline


def latent_size(backbone) -> tuple[int, int]:
    return (backbone.latent_size, backbone.latent_size)


def make_mapper(base, upgraded, seed: int | None = None, std: float = 0.05, **kwargs) -> XAdapterMapper:
    """A mapper for the two backbones; with ``seed``, its zero convs are drawn at random (a 'trained' one)."""
    mapper = XAdapterMapper.from_unets(
        base.denoiser, upgraded.denoiser, latent_size(base), latent_size(upgraded), **kwargs
    )
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in mapper.named_parameters():
                if any(part in name for part in ("zero_out", "gamma", "beta")):
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
    return mapper


def make_pipeline(base, upgraded, mapper, scheduler: str = "ddim", **plugins) -> XAdapterPipeline:
    pipe = XAdapterPipeline.from_backbones(base, upgraded, mapper, scheduler=scheduler, **plugins)
    pipe.set_progress_bar_config(disable=True)
    return pipe
