"""Image-prompt injection into the upgraded model: every cross-attention layer j outputs

    Attn(q, k_text, v_text) + lambda * Attn(q, k^_j, v^_j)

(both before the layer's ``to_out``), for a UNet (SDXL) and for a DiT (PixArt-alpha) alike.

How: :class:`ImageInjection` installs an :class:`ImageAttnProcessor` in every cross-attention layer through
``xa_lightning.backbones.surgery.install_processors``. The processor runs the processor it replaced
unchanged for the text part - PixArt's T5 padding mask, SDXL's text tokens, whatever attention backend -
and adds ``lambda * to_out.weight @ Attn(q, k^_j, v^_j)`` (``to_out`` is linear; its bias is already in the
text part). The image tokens therefore never enter the text attention, and the T5 mask never applies to
them. With lambda = 0, or outside :meth:`ImageInjection.conditioned`, the layer returns exactly what the
original processor returns: the frozen model bit for bit.

How the image keys / values reach the layers: either for a block of code (``with
injection.conditioned(...)``: what the pipelines use, since PixArt's pipeline passes no attention kwargs), or
with the denoiser call itself, ``cross_attention_kwargs={"ip_hidden_states": condition}`` (training: gradient
checkpointing re-runs the forward during backward, outside any ``with`` block, and must see the same keys).
``ip_hidden_states`` is the name diffusers passes silently by the self-attention processors that ignore it.

Processors are plain callables, not ``nn.Module`` s: the weights stay in the adapter, the denoiser's
``state_dict`` stays the frozen model's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xa_lightning.backbones.surgery import AttentionLayer, Surgery, attention_layers, install_processors

if TYPE_CHECKING:  # pragma: no cover
    from diffusers.models.attention_processor import Attention


@dataclass
class ImageCondition:
    """Per-layer image keys / values for one batch, optionally the unconditional ones (CFG), and lambda.

    A denoiser call of batch B uses ``keys``; one of batch 2B (a pipeline's classifier-free guidance,
    ``[unconditional; conditional]``) uses ``cat([negative_keys, keys])``.
    """

    keys: Sequence[Tensor]
    values: Sequence[Tensor]
    scale: float = 1.0
    negative_keys: Sequence[Tensor] | None = None
    negative_values: Sequence[Tensor] | None = None

    def layer(self, index: int, batch_size: int) -> tuple[Tensor, Tensor]:
        keys, values = self.keys[index], self.values[index]
        if keys.shape[0] == batch_size:
            return keys, values
        if self.negative_keys is not None and 2 * keys.shape[0] == batch_size:
            return (
                torch.cat([self.negative_keys[index], keys]),
                torch.cat([self.negative_values[index], values]),
            )
        raise ValueError(
            f"the denoiser runs a batch of {batch_size} but the image condition holds {keys.shape[0]} samples"
            + ("" if self.negative_keys is not None else " (no unconditional image for classifier-free guidance)")
        )


def image_attention(
    attn: Attention, hidden_states: Tensor, keys: Tensor, values: Tensor, temb: Tensor | None
) -> Tensor:
    """``to_out.weight @ Attn(to_q(hidden), keys, values)`` in the layer's output shape (no bias, no residual)."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape = hidden_states.shape
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.flatten(2).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    batch_size, heads = hidden_states.shape[0], attn.heads
    query = attn.to_q(hidden_states)
    head_dim = query.shape[-1] // heads

    def split(x: Tensor) -> Tensor:
        return x.to(query.dtype).view(batch_size, -1, heads, head_dim).transpose(1, 2)

    query, keys, values = split(query), split(keys), split(values)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        keys = attn.norm_k(keys)
    out = F.scaled_dot_product_attention(query, keys, values, dropout_p=0.0, is_causal=False, scale=attn.scale)
    out = out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim)
    out = F.linear(out, attn.to_out[0].weight) / attn.rescale_output_factor
    if len(shape) == 4:
        out = out.transpose(1, 2).reshape(shape)
    return out


class ImageAttnProcessor:
    """One cross-attention layer with the image branch: the original processor + lambda * image attention."""

    def __init__(self, injection: ImageInjection, index: int, original: Any) -> None:
        self.injection = injection
        self.index = index
        self.original = original

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        ip_hidden_states: ImageCondition | None = None,
    ) -> Tensor:
        extra = {} if temb is None else {"temb": temb}
        output = self.original(
            attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **extra
        )
        condition = ip_hidden_states if isinstance(ip_hidden_states, ImageCondition) else self.injection.condition
        if condition is None or condition.scale == 0:
            return output
        keys, values = condition.layer(self.index, hidden_states.shape[0])
        return output + condition.scale * image_attention(attn, hidden_states, keys, values, temb).to(output.dtype)


class ImageInjection:
    """The image branch in every cross-attention layer of a denoiser (UNet or DiT), in layer order.

    ``install()`` puts the processors in (``remove()`` / the returned surgery takes them out);
    ``with injection.conditioned(keys, values, scale): denoiser(...)`` sets what they add. Outside that block
    the denoiser is the frozen model.
    """

    def __init__(self, denoiser: nn.Module) -> None:
        self.denoiser = denoiser
        self.layers: list[AttentionLayer] = attention_layers(denoiser, "cross")
        if not self.layers:
            raise ValueError(f"{type(denoiser).__name__} has no cross-attention layers")
        self.condition: ImageCondition | None = None
        self._surgery: Surgery | None = None

    @property
    def layer_dims(self) -> list[int]:
        """Inner width of each layer's keys and values (what the image keys / values must have)."""
        return [layer.inner_dim for layer in self.layers]

    @property
    def installed(self) -> bool:
        return all(
            isinstance(layer.module.processor, ImageAttnProcessor) and layer.module.processor.injection is self
            for layer in self.layers
        )

    def install(self) -> Surgery:
        if self._surgery is not None and self._surgery.active and self.installed:
            return self._surgery
        index = {layer.name: i for i, layer in enumerate(self.layers)}
        self._surgery = install_processors(
            self.denoiser,
            lambda layer: ImageAttnProcessor(self, index[layer.name], layer.module.processor),
            layers=self.layers,
        )
        return self._surgery

    def remove(self) -> None:
        if self._surgery is not None:
            self._surgery.remove()
            self._surgery = None

    def condition_for(
        self,
        keys: Sequence[Tensor],
        values: Sequence[Tensor],
        scale: float = 1.0,
        negative_keys: Sequence[Tensor] | None = None,
        negative_values: Sequence[Tensor] | None = None,
    ) -> ImageCondition:
        """A checked :class:`ImageCondition` (one key / value tensor per layer, of that layer's width); installs
        the processors if they are not in (pass it as ``cross_attention_kwargs={"ip_hidden_states": ...}``)."""
        if len(keys) != len(self.layers) or len(values) != len(self.layers):
            raise ValueError(f"{len(keys)} image keys for {len(self.layers)} cross-attention layers")
        for layer, key in zip(self.layers, keys):
            if key.shape[-1] != layer.inner_dim:
                raise ValueError(f"image keys of width {key.shape[-1]} for {layer.name} (inner dim {layer.inner_dim})")
        if not self.installed:
            self.install()
        return ImageCondition(list(keys), list(values), float(scale), negative_keys, negative_values)

    @contextmanager
    def conditioned(
        self,
        keys: Sequence[Tensor],
        values: Sequence[Tensor],
        scale: float = 1.0,
        negative_keys: Sequence[Tensor] | None = None,
        negative_values: Sequence[Tensor] | None = None,
    ) -> Iterator[ImageCondition]:
        """Inside the block, layer j adds ``scale * Attn(q, keys[j], values[j])``."""
        previous = self.condition
        self.condition = self.condition_for(keys, values, scale, negative_keys, negative_values)
        try:
            yield self.condition
        finally:
            self.condition = previous
