"""The image branch in the upgraded model: lambda = 0 (or no image) is the frozen model bit for bit on the SDXL
UNet and the PixArt-alpha DiT; lambda != 0 adds exactly Attn(q, k^, v^) through to_out; PixArt's T5 mask
applies to the text tokens only; removing the processors gives the model back."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from xa_lightning.methods.a4a import ImageInjection

from .conftest import make_module, tiny_batch


def _inputs(backbone, batch_size: int = 2):
    batch = tiny_batch(backbone, batch_size)
    with torch.no_grad():
        latents = backbone.encode_images(batch["pixels"])
        cond = backbone.encode_text(batch["caption"])
    timesteps = torch.tensor([999, 300][:batch_size])
    return batch, torch.randn_like(latents), timesteps, cond


def test_lambda_zero_is_the_frozen_model_bit_for_bit(upgraded):
    batch, noisy, timesteps, cond = _inputs(upgraded)
    layers = upgraded.cross_attention_layers()
    processors = {layer.name: layer.module.processor for layer in layers}
    with torch.no_grad():
        frozen = upgraded.predict(noisy, timesteps, cond)
        module = make_module(upgraded)  # installs the image branch in every cross-attention layer
        assert module.injection.installed and len(module.injection.layers) == len(layers)
        keys, values = module.image_keys_values(module.image_features(batch["reference"]))
        installed_no_image = upgraded.predict(noisy, timesteps, cond)
        with module.injection.conditioned(keys, values, scale=0.0):
            lambda_zero = upgraded.predict(noisy, timesteps, cond)
        condition = module.injection.condition_for(keys, values, scale=0.0)
        lambda_zero_kwargs = upgraded.predict(
            noisy, timesteps, cond, cross_attention_kwargs={"ip_hidden_states": condition}
        )
        with module.injection.conditioned(keys, values, scale=1.0):
            lambda_one = upgraded.predict(noisy, timesteps, cond)
    assert torch.equal(installed_no_image, frozen)
    assert torch.equal(lambda_zero, frozen) and torch.equal(lambda_zero_kwargs, frozen)
    assert not torch.allclose(lambda_one, frozen, atol=1e-4), "the image branch changed nothing"
    module.injection.remove()
    assert all(layer.module.processor is processors[layer.name] for layer in layers)
    with torch.no_grad():
        assert torch.equal(upgraded.predict(noisy, timesteps, cond), frozen)


def test_the_image_branch_is_attention_on_the_image_keys_through_to_out(sdxl):
    """One SDXL layer: output = original processor + lambda * to_out.W @ Attn(to_q(h), k^, v^)."""
    layer = sdxl.cross_attention_layers()[3]
    attn = layer.module
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 16, layer.query_dim, generator=generator)
    text = torch.randn(2, 77, layer.cross_attention_dim, generator=generator)
    injection = ImageInjection(sdxl.denoiser)
    keys = [torch.randn(2, 4, d, generator=generator) for d in injection.layer_dims]
    values = [torch.randn(2, 4, d, generator=generator) for d in injection.layer_dims]
    with torch.no_grad(), injection.conditioned(keys, values, scale=0.7):
        out = attn(hidden, encoder_hidden_states=text)
        heads = attn.heads

        def split(x):
            return x.view(2, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        image = F.scaled_dot_product_attention(split(attn.to_q(hidden)), split(keys[3]), split(values[3]))
        image = image.transpose(1, 2).reshape(2, -1, layer.inner_dim)
        expected = AttnProcessor2_0()(attn, hidden, text) + 0.7 * F.linear(image, attn.to_out[0].weight)
    assert torch.allclose(out, expected, atol=1e-5)
    injection.remove()


def test_pixart_t5_mask_applies_to_text_tokens_only(pixart):
    """With the image branch on, padded T5 positions still do nothing; the image tokens are never masked."""
    batch, noisy, timesteps, cond = _inputs(pixart)
    mask = cond.attention_mask
    assert (mask == 0).any(), "the test needs padded prompts"
    module = make_module(pixart)
    garbage = cond.prompt_embeds.clone()
    garbage[mask == 0] = 1e3  # only padded positions change
    cond_garbage = type(cond)(garbage, cond.pooled_prompt_embeds, mask)
    with torch.no_grad():
        keys, values = module.image_keys_values(module.image_features(batch["reference"]))
        with module.injection.conditioned(keys, values):
            clean = pixart.predict(noisy, timesteps, cond)
            padded = pixart.predict(noisy, timesteps, cond_garbage)
        assert torch.allclose(clean, padded, atol=1e-5)
        without_image = pixart.predict(noisy, timesteps, cond)
    assert not torch.allclose(clean, without_image, atol=1e-4)

    # one block by hand: masked text attention + unmasked image attention, through to_out
    layer = module.injection.layers[1]
    attn = layer.module
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 16, layer.query_dim, generator=generator)
    text = torch.randn(2, mask.shape[1], layer.cross_attention_dim, generator=generator)
    bias = (1 - mask.float()) * -10000.0  # what PixArt's transformer hands its cross-attention
    with torch.no_grad(), module.injection.conditioned(keys, values):
        out = attn(hidden, encoder_hidden_states=text, attention_mask=bias.unsqueeze(1))
        heads = attn.heads

        def split(x):
            return x.view(2, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        image = F.scaled_dot_product_attention(split(attn.to_q(hidden)), split(keys[1]), split(values[1]))
        image = image.transpose(1, 2).reshape(2, -1, layer.inner_dim)
        text_part = AttnProcessor2_0()(attn, hidden, text, attention_mask=bias.unsqueeze(1))
        expected = text_part + F.linear(image, attn.to_out[0].weight)
    assert torch.allclose(out, expected, atol=1e-5)


def test_classifier_free_guidance_batches_use_the_unconditional_image(sdxl):
    """A denoiser batch of 2B reads [unconditional; conditional] keys, as the pipelines order them."""
    injection = ImageInjection(sdxl.denoiser)
    layers = injection.layers
    generator = torch.Generator().manual_seed(0)
    keys = [torch.randn(1, 4, d, generator=generator) for d in injection.layer_dims]
    negative = [torch.zeros(1, 4, d) for d in injection.layer_dims]
    condition = injection.condition_for(keys, keys, 1.0, negative, negative)
    doubled_k, _ = condition.layer(0, 2)
    assert torch.equal(doubled_k[0], negative[0][0]) and torch.equal(doubled_k[1], keys[0][0])
    assert condition.layer(len(layers) - 1, 1)[0] is keys[-1]
    injection.remove()
