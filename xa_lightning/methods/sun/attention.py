"""SUN's cross-attention: a negative-prompt branch (and an optional extra positive branch) beside the
layer's own text attention, combined through Attention Normalization.

How the negative prompt reaches the layers: the encoder hidden states carry the negative prompt's
embeddings *appended along the token axis*, ``cat([prompt_embeds, negative_embeds], dim=1)`` with the
negative part exactly ``num_negative_tokens`` long (77 for CLIP). One UNet call of batch B therefore sees
both prompts: no classifier-free-guidance batch doubling. This is the layout of the official release and
it travels through every diffusers pipeline unchanged (``prompt_embeds=...``, ``num_images_per_prompt``
repeats it, LoRA/peft wrap the projections underneath). Self-attention never sees encoder states, so it
keeps its own processor. Models that must not see the negative tokens (a ControlNet's cross-attention)
get :class:`PositiveOnlyAttnProcessor`, which drops them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover
    from diffusers.models.attention_processor import Attention

    from xa_lightning.methods.sun.adapter import SUNAdapter, SUNLayer


def attention_normalization(
    branch: torch.Tensor,
    reference: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    scope: str = "sample",
    eps: float = 1e-6,
) -> torch.Tensor:
    """``alpha * (||reference|| / ||branch||) * branch + beta`` with norms taken per sample.

    ``branch`` and ``reference`` are ``(B, N, C)``; ``alpha`` and ``beta`` are per channel ``(C,)``.
    ``scope="sample"`` takes one norm per sample over tokens and channels; ``"token"`` one per sample and
    token. Neither mixes samples of a batch (the official code takes one norm over the whole batch,
    which makes a sample's output depend on its batch mates). ``eps`` bounds the division, so an all-zero
    branch maps to ``beta``.
    """
    dims = (1, 2) if scope == "sample" else (2,)
    # Norms in fp32: a sum of squares over 4096x320 activations overflows fp16.
    reference_norm = reference.float().norm(dim=dims, keepdim=True)
    branch_norm = branch.float().norm(dim=dims, keepdim=True).clamp_min(eps)
    ratio = (reference_norm / branch_norm).to(branch.dtype)
    alpha, beta = (p.to(device=branch.device, dtype=branch.dtype) for p in (alpha, beta))
    return alpha * (branch * ratio) + beta


def _attend(
    attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Multi-head scaled dot-product attention of ``(B, N, C)`` tensors, heads merged back."""
    batch_size = query.shape[0]
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=attn.scale
    )
    return out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)


def _prepare_mask(attn: Attention, mask: torch.Tensor | None, key_length: int, batch_size: int) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = attn.prepare_attention_mask(mask, key_length, batch_size)
    return mask.view(batch_size, attn.heads, -1, mask.shape[-1])


def split_negative(encoder_hidden_states: torch.Tensor, num_negative_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``cat([prompt, negative], dim=1)`` into its two parts."""
    total = encoder_hidden_states.shape[1]
    if total <= num_negative_tokens:
        raise ValueError(
            f"SUN expects prompt and negative-prompt embeddings concatenated along the token axis "
            f"(B, N + {num_negative_tokens}, C) but got {total} tokens; use SUNPipeline or "
            "xa_lightning.methods.sun.concat_negative(prompt_embeds, negative_embeds)"
        )
    split = total - num_negative_tokens
    return encoder_hidden_states[:, :split], encoder_hidden_states[:, split:]


def concat_negative(prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor) -> torch.Tensor:
    """The encoder-states layout SUN reads: prompt tokens followed by negative-prompt tokens."""
    if prompt_embeds.shape[0] != negative_embeds.shape[0]:
        raise ValueError(f"prompt batch {prompt_embeds.shape[0]} != negative batch {negative_embeds.shape[0]}")
    return torch.cat([prompt_embeds, negative_embeds.to(prompt_embeds.dtype)], dim=1)


class SUNAttnProcessor:
    """Processor of one cross-attention layer with SUN installed.

    ``Z = Zp + scale * (Zpos' - Zn')`` followed by the layer's ``to_out``, where ``Zp`` is the layer's own
    attention on the prompt, ``Zn = Attn(q, to_k_neg(neg), to_v_neg(neg))`` and ``Zn'`` its Attention
    Normalization against ``Zp`` (``Zpos'`` likewise for the optional extra positive branch on the
    prompt). The query is shared. While the adapter is disabled (the CFG teacher shares the UNet) it
    defers to the processor it replaced, so the frozen model is exactly the original one.

    Not an ``nn.Module`` on purpose: the weights live in the :class:`SUNAdapter`, so the UNet's
    ``state_dict`` stays the base model's.
    """

    def __init__(self, layer: SUNLayer, adapter: SUNAdapter, original: Any) -> None:
        self.layer = layer
        self.adapter = adapter
        self.original = original

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not self.adapter.enabled or encoder_hidden_states is None:
            return self.original(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                temb=temb,
            )
        config = self.adapter.config
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        prompt, negative = split_negative(encoder_hidden_states, config.num_negative_tokens)
        prompt_mask = negative_mask = None
        if attention_mask is not None and attention_mask.shape[-1] == encoder_hidden_states.shape[1]:
            split = prompt.shape[1]
            prompt_mask, negative_mask = attention_mask[..., :split], attention_mask[..., split:]
        elif attention_mask is not None:
            prompt_mask = attention_mask
        prompt_mask = _prepare_mask(attn, prompt_mask, prompt.shape[1], batch_size)
        negative_mask = _prepare_mask(attn, negative_mask, negative.shape[1], batch_size)

        layer = self.layer
        z_prompt = _attend(attn, query, attn.to_k(prompt), attn.to_v(prompt), prompt_mask)

        # The adapter may live in another dtype (fp32 weights beside an fp16 UNet) or on another device (a
        # pipeline with model CPU offload moves only the UNet): project where its weights are, attend here.
        def project(linear: torch.nn.Linear, states: torch.Tensor) -> torch.Tensor:
            weight = linear.weight
            return linear(states.to(device=weight.device, dtype=weight.dtype)).to(query.device, query.dtype)

        z_negative = _attend(
            attn, query, project(layer.to_k_neg, negative), project(layer.to_v_neg, negative), negative_mask
        )
        correction = -attention_normalization(
            z_negative, z_prompt, layer.neg_alpha, layer.neg_beta, config.norm_scope, config.norm_eps
        )
        if config.use_positive_branch:
            z_positive = _attend(
                attn, query, project(layer.to_k_pos, prompt), project(layer.to_v_pos, prompt), prompt_mask
            )
            correction = correction + attention_normalization(
                z_positive, z_prompt, layer.pos_alpha, layer.pos_beta, config.norm_scope, config.norm_eps
            )
        hidden_states = z_prompt + self.adapter.scale * correction

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class PositiveOnlyAttnProcessor:
    """Wraps a cross-attention processor so it sees only the prompt part of SUN's concatenated states.

    Installed on models that run beside a SUN UNet on the same ``prompt_embeds`` but were not trained
    with SUN (a ControlNet): without it they would attend over the negative prompt's tokens as if they
    were part of the prompt.
    """

    def __init__(self, original: Any, num_negative_tokens: int) -> None:
        self.original = original
        self.num_negative_tokens = num_negative_tokens

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None and encoder_hidden_states.shape[1] > self.num_negative_tokens:
            encoder_hidden_states = encoder_hidden_states[:, : -self.num_negative_tokens]
            if attention_mask is not None and attention_mask.shape[-1] > encoder_hidden_states.shape[1]:
                attention_mask = attention_mask[..., : encoder_hidden_states.shape[1]]
        return self.original(
            attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, temb=temb
        )
