"""Small pieces every method's training and sampling code shares."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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
