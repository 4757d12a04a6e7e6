"""Fusing mapped base features into the upgraded model's block outputs.

X-Adapter changes the UNets' forward pass in two ways: it records the outputs of some base-model blocks
(``xa_lightning.backbones.surgery.capture_outputs``) and fuses residuals into the outputs of some
upgraded-model blocks (:class:`ResidualInjector` here). Both are forward hooks on the unmodified diffusers
``UNet2DConditionModel`` (no forked UNet) registered through the surgery layer, inside ``with`` blocks,
so they are gone when the block ends, even on errors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from xa_lightning.backbones.surgery import BlockHook, hidden_of, hook_blocks, replace_hidden
from xa_lightning.methods.x_adapter.mapper import XAdapterMapper


class ResidualInjector:
    """Fuses mapped base features into the upgraded UNet's block outputs (one hook per mapped block).

    Usage::

        injector = ResidualInjector(mapper, upgraded_unet)
        with injector.active():
            injector.set_base_features(base_features, scale=1.0)  # mapping runs lazily in the hooks
            prediction = upgraded_unet(...)

    The mapper runs inside the hook, when the upgraded block's output size is known (so non-square and
    odd sizes map exactly). Mapped features are computed once per stage per forward pass.
    """

    def __init__(self, mapper: XAdapterMapper, upgraded_unet: nn.Module) -> None:
        self.mapper = mapper
        self.unet = upgraded_unet
        self.base_features: list[torch.Tensor] | None = None
        self.scale: float | torch.Tensor = 1.0
        self.fusion_guidance_scale: float | None = None
        self.mapped: dict[int, Any] = {}
        self.enabled = True

    def set_base_features(
        self,
        features: Sequence[torch.Tensor] | None,
        scale: float | torch.Tensor = 1.0,
        fusion_guidance_scale: float | None = None,
    ) -> None:
        """Features for the next upgraded forward pass, in stage order; ``None`` disables fusion."""
        self.base_features = list(features) if features is not None else None
        self.scale = scale
        self.fusion_guidance_scale = fusion_guidance_scale
        self.mapped = {}

    def _fuse(self, stage: int, output: Any) -> Any:
        hidden = hidden_of(output)
        if stage not in self.mapped:
            self.mapped[stage] = self.mapper.stages[stage](
                self.base_features[stage].to(next(self.mapper.parameters()).dtype), tuple(hidden.shape[-2:])
            )
        mapped = self.mapped[stage]
        batch = hidden.shape[0]
        mapped = (
            _match_batch(mapped, batch)
            if isinstance(mapped, torch.Tensor)
            else tuple(_match_batch(m, batch) for m in mapped)
        )
        fused = self.mapper.fuse(stage, hidden, mapped, self.scale, self.fusion_guidance_scale)
        return replace_hidden(output, fused)

    def _hook(self, stages: Sequence[int]) -> BlockHook:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if not self.enabled or self.base_features is None:
                return output
            for stage in stages:  # stages mapped into the same block fuse in stage order
                output = self._fuse(stage, output)
            return output

        return hook

    @contextlib.contextmanager
    def active(self) -> Iterator[ResidualInjector]:
        stages_of: dict[str, list[int]] = {}
        for stage, name in enumerate(self.mapper.config.upgraded_blocks):
            stages_of.setdefault(name, []).append(stage)
        try:
            with hook_blocks(self.unet, {name: self._hook(stages) for name, stages in stages_of.items()}):
                yield self
        finally:
            self.set_base_features(None)


def _match_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    if tensor.shape[0] == batch:
        return tensor
    raise ValueError(f"mapped features have batch {tensor.shape[0]}, the upgraded block has {batch}")
