"""Forward hooks that read base-model block outputs and add mapped residuals to the upgraded model.

X-Adapter needs two changes to the UNets' forward pass: record the outputs of some base-model blocks,
and fuse residuals into the outputs of some upgraded-model blocks. Both are done with
``register_forward_hook`` on the unmodified diffusers ``UNet2DConditionModel`` (no forked UNet), and
both are context managers, so the hooks are gone when the ``with`` block ends, even on errors.

Block outputs come in two shapes: ``mid_block`` / ``up_blocks.i`` return a tensor; ``down_blocks.i``
return ``(hidden_states, skip_states)`` where the last skip state is the same tensor as
``hidden_states``; a residual on a down block changes both, so the skip connection sees it too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from xa_lightning.methods.x_adapter.mapper import XAdapterMapper


def _hidden_of(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    if not isinstance(output, tuple):
        return hidden
    skips = output[1]
    if isinstance(skips, tuple) and len(skips) and skips[-1] is output[0]:
        skips = skips[:-1] + (hidden,)
    return (hidden, skips) + tuple(output[2:])


@contextlib.contextmanager
def capture_block_outputs(unet: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the hidden-state output of each named block during the forward passes inside the block."""
    features: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            features[name] = _hidden_of(output)

        return hook

    try:
        for name in dict.fromkeys(names):
            handles.append(unet.get_submodule(name).register_forward_hook(make_hook(name)))
        yield features
    finally:
        for handle in handles:
            handle.remove()


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

    def _hook(self, stage: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if not self.enabled or self.base_features is None:
                return output
            hidden = _hidden_of(output)
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
            return _replace_hidden(output, fused)

        return hook

    @contextlib.contextmanager
    def active(self) -> Iterator[ResidualInjector]:
        handles = []
        try:
            for stage, name in enumerate(self.mapper.config.upgraded_blocks):
                handles.append(self.unet.get_submodule(name).register_forward_hook(self._hook(stage)))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.set_base_features(None)


def _match_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    if tensor.shape[0] == batch:
        return tensor
    raise ValueError(f"mapped features have batch {tensor.shape[0]}, the upgraded block has {batch}")
