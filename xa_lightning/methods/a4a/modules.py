"""The A4A modules: Coupling Space Projection, Upgraded Space Mapping (one for K, one for V) and Alignment.

From the pretrained adapter's (PTA's) image tokens ``c`` (N tokens) to keys and values for every
cross-attention layer of the upgraded model, without running the base model::

    PTA layer i (of l):        k_i = W_k^i c, v_i = W_v^i c                  (N, d_i)   the PTA's own weights
    Coupling Space Projection: K = [P_k^1 k_1; ...; P_k^l k_l]               (l N, d_scm), V likewise
    Upgraded Space Mapping:    K~ (L N learnable tokens, N per upgraded layer), R times:
                               K~ += Attn(q = LN(K~), kv = [LN(K~); LN(K)]) (out-projection included)
                               K~ += FFN(K~)  (LN, Linear, GELU, Linear)     one such module for K, one for V
    Alignment:                 k^_j = A_k^j K~[j N : (j + 1) N]              (N, d_j)   upgraded layer j (of L)

``d_scm`` defaults to the least common multiple of the d_i (SD1.5: lcm(320, 640, 1280) = 1280). The paper
gives the blocks, not every detail: the residual connections around attention and FFN, the pre-norm
placement, separate projections for keys and values and the token init (``randn / sqrt(d_scm)``) are our
choices (methods/a4a/README.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from xa_lightning.errors import UserError
from xa_lightning.plugins.ip_adapter import (
    TINY_IMAGE_ENCODER,
    VIT_H_IMAGE_ENCODER,
    ImageEncoder,
    IPAdapterModel,
    random_image_encoder,
)


def coupling_dim(pta_dims: Sequence[int]) -> int:
    """The default coupling-space width: the least common multiple of the PTA's layer widths."""
    return math.lcm(*[int(d) for d in pta_dims])


class MappingBlock(nn.Module):
    """One repeat of the Upgraded Space Mapping: queries attend to [themselves; the coupled tokens], then an FFN."""

    def __init__(self, dim: int, heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.norm_queries = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.attention = Attention(
            query_dim=dim, cross_attention_dim=dim, heads=heads, dim_head=dim // heads, out_bias=True
        )
        self.ffn = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim)
        )

    def forward(self, queries: Tensor, context: Tensor) -> Tensor:
        normed = self.norm_queries(queries)
        tokens = torch.cat([normed, self.norm_context(context)], dim=1)
        queries = queries + self.attention(normed, encoder_hidden_states=tokens)
        return queries + self.ffn(queries)


class UpgradedSpaceMapping(nn.Module):
    """Learnable tokens (``num_queries`` = N per upgraded layer) refined by ``repeats`` :class:`MappingBlock` s."""

    def __init__(self, num_queries: int, dim: int, repeats: int, heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim) / math.sqrt(dim))
        self.blocks = nn.ModuleList(MappingBlock(dim, heads, ffn_mult) for _ in range(repeats))

    def forward(self, coupled: Tensor) -> Tensor:
        queries = self.queries.to(coupled.dtype).expand(coupled.shape[0], -1, -1)
        for block in self.blocks:
            queries = block(queries, coupled)
        return queries


class A4AAdapter(ModelMixin, ConfigMixin):
    """Everything A4A trains: projection, mapping (K and V), alignment, and the PTA when it is fine-tuned.

    ``forward(pta_keys, pta_values, image_tokens)`` takes the PTA's per-layer keys / values (``W_k^i c``,
    ``W_v^i c``) and its image tokens ``c`` and returns one key and one value tensor ``(B, N, d_j)`` per
    upgraded cross-attention layer.

    Args:
        pta_dims: d_i, the PTA's layer widths (SD1.5 IP-Adapter: 16 layers of 320 / 640 / 1280).
        upgraded_dims: d_j, the upgraded model's cross-attention inner widths (SDXL: 70 of 640 / 1280;
            PixArt-alpha: 28 of 1152).
        num_tokens: N, image tokens per layer (the PTA's: 4 plain, 16 plus).
        token_dim: width of the PTA's image tokens (768 for SD1.5); read by the projection ablation only.
        scm_dim: d_scm; None = lcm of ``pta_dims``.
        repeats / heads / ffn_mult: the mapping's R, attention heads and FFN width multiple.
        use_projection: false = ablation: the mapping reads the image tokens through one linear per K / V.
        use_mapping: false = ablation: upgraded layer j reads the coupled tokens of the PTA layer at the same
            relative depth.
        pta_config: the PTA's :class:`IPAdapterModel` arguments when it is fine-tuned (its weights are then
            part of this adapter, as ``pta``); None when it is frozen.
    """

    @register_to_config
    def __init__(
        self,
        pta_dims: Sequence[int] = (),
        upgraded_dims: Sequence[int] = (),
        num_tokens: int = 4,
        token_dim: int = 768,
        scm_dim: int | None = None,
        repeats: int = 2,
        heads: int = 8,
        ffn_mult: int = 4,
        use_projection: bool = True,
        use_mapping: bool = True,
        pta_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not pta_dims or not upgraded_dims:
            raise ValueError("A4AAdapter needs the PTA's and the upgraded model's layer widths")
        width = int(scm_dim) if scm_dim else coupling_dim(pta_dims)
        if width % heads:
            raise UserError(
                f"method.adapter.heads={heads} must divide the coupling-space width {width} "
                "(method.adapter.scm_dim, default: lcm of the PTA layer widths); choose a divisor"
            )
        inputs = [int(d) for d in pta_dims] if use_projection else [int(token_dim)]
        self.projection_k = nn.ModuleList(nn.Linear(d, width) for d in inputs)
        self.projection_v = nn.ModuleList(nn.Linear(d, width) for d in inputs)
        queries = len(upgraded_dims) * int(num_tokens)
        self.mapping_k = UpgradedSpaceMapping(queries, width, repeats, heads, ffn_mult) if use_mapping else None
        self.mapping_v = UpgradedSpaceMapping(queries, width, repeats, heads, ffn_mult) if use_mapping else None
        self.alignment_k = nn.ModuleList(nn.Linear(width, int(d)) for d in upgraded_dims)
        self.alignment_v = nn.ModuleList(nn.Linear(width, int(d)) for d in upgraded_dims)
        self.pta = IPAdapterModel(**pta_config) if pta_config else None

    @property
    def coupling_width(self) -> int:
        """d_scm as built (the config's ``scm_dim`` may be None: the lcm)."""
        return self.projection_k[0].out_features

    @property
    def num_layers(self) -> int:
        return len(self.alignment_k)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The asynchronous-learning-rate groups: ``projection_alignment``, ``mapping`` and (fine-tuned) ``pta``."""
        groups = {
            "projection_alignment": [
                *self.projection_k.parameters(),
                *self.projection_v.parameters(),
                *self.alignment_k.parameters(),
                *self.alignment_v.parameters(),
            ]
        }
        if self.mapping_k is not None:
            groups["mapping"] = [*self.mapping_k.parameters(), *self.mapping_v.parameters()]
        if self.pta is not None:
            groups["pta"] = list(self.pta.parameters())
        return groups

    def _couple(self, projections: nn.ModuleList, layer_states: Sequence[Tensor], image_tokens: Tensor) -> Tensor:
        """Coupling Space Projection: the PTA layers' keys (or values) in d_scm, stacked along tokens."""
        if not self.config.use_projection:
            return projections[0](image_tokens)
        if len(layer_states) != len(projections):
            raise ValueError(f"{len(layer_states)} PTA layers given, the adapter was built for {len(projections)}")
        return torch.cat([project(state) for project, state in zip(projections, layer_states)], dim=1)

    def _by_depth(self, coupled: Tensor) -> Tensor:
        """Without the mapping: upgraded layer j takes the N coupled tokens of the PTA layer at its relative depth."""
        tokens = self.config.num_tokens
        blocks = coupled.shape[1] // tokens
        layers = self.num_layers
        chosen = [round(j * (blocks - 1) / max(layers - 1, 1)) for j in range(layers)]
        return torch.cat([coupled[:, i * tokens : (i + 1) * tokens] for i in chosen], dim=1)

    def forward(
        self, pta_keys: Sequence[Tensor], pta_values: Sequence[Tensor], image_tokens: Tensor
    ) -> tuple[list[Tensor], list[Tensor]]:
        dtype = self.projection_k[0].weight.dtype
        pta_keys = [k.to(dtype) for k in pta_keys]
        pta_values = [v.to(dtype) for v in pta_values]
        image_tokens = image_tokens.to(dtype)
        coupled_k = self._couple(self.projection_k, pta_keys, image_tokens)
        coupled_v = self._couple(self.projection_v, pta_values, image_tokens)
        if self.mapping_k is not None:
            mapped_k, mapped_v = self.mapping_k(coupled_k), self.mapping_v(coupled_v)
        else:
            mapped_k, mapped_v = self._by_depth(coupled_k), self._by_depth(coupled_v)
        tokens = self.config.num_tokens
        keys = [align(mapped_k[:, j * tokens : (j + 1) * tokens]) for j, align in enumerate(self.alignment_k)]
        values = [align(mapped_v[:, j * tokens : (j + 1) * tokens]) for j, align in enumerate(self.alignment_v)]
        return keys, values


def uses_hidden_states(adapter: nn.Module, pta: IPAdapterModel | None) -> bool:
    """Whether the image projection reads CLIP's hidden states (IP-Adapter-Plus) or its image embedding."""
    if isinstance(adapter, IPAdapterModel):
        return adapter.uses_hidden_states
    source = adapter.pta if adapter.pta is not None else pta
    return bool(source is not None and source.uses_hidden_states)


def image_keys_values(
    adapter: A4AAdapter | IPAdapterModel, pta: IPAdapterModel | None, features: Tensor
) -> tuple[list[Tensor], list[Tensor]]:
    """CLIP features of the reference images -> keys and values for every upgraded cross-attention layer.

    A4A: the PTA's image projection and per-layer weights (``adapter.pta`` when fine-tuned, else the frozen
    ``pta``), then the A4A modules. The from-scratch IP-Adapter (``IPAdapterModel`` on the upgraded layers):
    its own projection and weights.
    """
    if isinstance(adapter, IPAdapterModel):
        return adapter.layer_keys_values(adapter.tokens(features))
    pta = adapter.pta if adapter.pta is not None else pta
    if pta is None:
        raise ValueError("A4A needs the PTA: pass the frozen IPAdapterModel (the adapter holds none)")
    tokens = pta.tokens(features)
    pta_keys, pta_values = pta.layer_keys_values(tokens)
    return adapter(pta_keys, pta_values, tokens)


# ------------------------------------------------------------------------------ random stand-ins for a PTA
def stand_in_image_encoder(flavour: str, seed: int) -> ImageEncoder:
    """A random CLIP image encoder for backbones without real weights: tiny, or ViT-H/14-shaped (full_shape)."""
    config = TINY_IMAGE_ENCODER if flavour == "tiny" else VIT_H_IMAGE_ENCODER
    return random_image_encoder(config, seed, flavour)


def sd15_unet_structure(flavour: str) -> nn.Module:
    """The SD1.5 UNet's structure (on the meta device: no weights) that a random PTA is shaped for."""
    from diffusers import UNet2DConditionModel

    from xa_lightning.backbones.architectures import SD15_UNET, TINY_SD15_UNET

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(TINY_SD15_UNET if flavour == "tiny" else SD15_UNET)
