"""Small pieces every method's training and sampling code shares."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from xa_lightning.errors import UserError


def generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One seeded generator per image: image i is the same whatever batch it is generated in."""
    return [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] ``(B, 3, H, W)`` -> uint8 on the CPU (what samplers return)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def check_init_weights(path: str | None, required: bool, key: str, expected: str) -> Path | None:
    """Validate a method's ``init_weights`` option: None (allowed unless ``required``) or an existing path.

    ``key`` is the config key (``method.adapter.init_weights``); ``expected`` what it should point to.
    """
    if path in (None, ""):
        if required:
            raise UserError(f"{key} is required by this experiment: set it to {expected}")
        return None
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise UserError(f"{key}={path} does not exist; point it to {expected}")
    return resolved


def seeded_noisy_latents(scheduler: Any, latents: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noisy latents, timesteps)`` with noise and timesteps drawn from ``seed`` instead of the global RNG, so a
    probe of the model (``adapted_prediction`` / ``frozen_prediction``) repeats exactly and leaves training's
    random stream alone."""
    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    steps = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(latents.device)
    return scheduler.add_noise(latents, noise, timesteps), timesteps
