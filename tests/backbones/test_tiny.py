"""Tiny backbones: structure like the real models, seeded, frozen, and the Backbone contract's behaviour."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, PixArtTransformer2DModel, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

from xa_lightning.backbones import (
    FAMILIES,
    AttentionLayer,
    Backbone,
    TextConditioning,
    build_backbone,
)
from xa_lightning.errors import UserError

from .conftest import latents_for, pixels_for

EXPECTED = {
    # family: (resolution, latent size, VAE scaling factor, beta schedule, beta_start, beta_end)
    "sd15": (64, 8, 0.18215, "scaled_linear", 0.00085, 0.012),
    "sdxl": (128, 16, 0.13025, "scaled_linear", 0.00085, 0.012),
    "pixart_alpha": (64, 8, 0.18215, "linear", 0.0001, 0.02),
}


def test_families_are_the_three_supported():
    assert set(FAMILIES) == {"sd15", "sdxl", "pixart_alpha"}


def test_tiny_backbone_has_the_real_structure(backbone: Backbone, family: str):
    resolution, latent_size, scaling, schedule, beta_start, beta_end = EXPECTED[family]
    assert backbone.family == family and backbone.flavour == "tiny" and backbone.id == f"{family}:tiny"
    assert backbone.resolution == resolution and backbone.latent_size == latent_size
    assert backbone.vae_scale_factor == 8 and backbone.latent_channels == 4
    assert isinstance(backbone.vae, AutoencoderKL) and backbone.vae.config.scaling_factor == scaling
    assert isinstance(backbone.noise_scheduler, DDPMScheduler)
    config = backbone.noise_scheduler.config
    assert (config.num_train_timesteps, config.beta_schedule) == (1000, schedule)
    assert (config.beta_start, config.beta_end) == (beta_start, beta_end)
    assert backbone.prediction_type == "epsilon"
    assert all(isinstance(t, CLIPTokenizer) and len(t) == 49408 for t in backbone.tokenizers)

    if family == "sd15":
        unet = backbone.denoiser
        assert isinstance(unet, UNet2DConditionModel)
        assert [type(b).__name__ for b in unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
        assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
        assert [type(e) for e in backbone.text_encoders] == [CLIPTextModel]
    elif family == "sdxl":
        unet = backbone.denoiser
        assert [type(b).__name__ for b in unet.down_blocks] == ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2
        assert unet.config.addition_embed_type == "text_time"
        encoder_2 = backbone.text_encoders[1]
        assert [type(e) for e in backbone.text_encoders] == [CLIPTextModel, CLIPTextModelWithProjection]
        # The add-embedding input: pooled projection + 6 time ids, as the SDXL pipeline checks.
        expected_in = encoder_2.config.projection_dim + 6 * unet.config.addition_time_embed_dim
        assert unet.add_embedding.linear_1.in_features == expected_in
        assert unet.config.cross_attention_dim == sum(e.config.hidden_size for e in backbone.text_encoders)
        assert backbone.tokenizers[1].pad_token == "!"
    else:
        transformer = backbone.denoiser
        assert isinstance(transformer, PixArtTransformer2DModel)
        assert transformer.config.out_channels == 2 * transformer.config.in_channels  # learned sigma
        assert transformer.config.caption_channels == backbone.text_encoders[0].config.d_model
        assert not transformer.use_additional_conditions
        assert [type(e) for e in backbone.text_encoders] == [T5EncoderModel]


def _state(backbone: Backbone) -> dict[str, torch.Tensor]:
    return backbone.state_dict()


def test_same_seed_same_weights_other_seed_other_weights(tiny_backbone, family: str):
    cached = _state(tiny_backbone(family, 0))
    rebuilt = _state(build_backbone(family, "tiny", seed=0))
    assert cached.keys() == rebuilt.keys()
    assert all(torch.equal(cached[k], rebuilt[k]) for k in cached)
    other = _state(tiny_backbone(family, 1))
    for part in ["denoiser.", "vae.", "text_encoders.0."]:
        weights = [k for k in cached if k.startswith(part) and k.endswith("weight") and cached[k].numel() > 1]
        assert weights and any(not torch.equal(cached[k], other[k]) for k in weights), part


def test_frozen_and_stays_in_eval_mode(backbone: Backbone):
    assert all(not p.requires_grad for p in backbone.parameters())
    wrapper = nn.ModuleDict({"adapter": nn.Linear(2, 2), "backbone": backbone})
    wrapper.train()  # what Lightning does at the start of fitting
    try:
        assert wrapper["adapter"].training
        assert not any(m.training for m in backbone.modules())
    finally:
        wrapper.eval()


def test_predict_shapes_timesteps_and_gradients(backbone: Backbone):
    latents = latents_for(backbone).requires_grad_(True)
    cond = backbone.encode_text(["a cat", "a dog"])
    prediction = backbone.predict(latents, torch.tensor([10, 10]), cond)
    assert prediction.shape == latents.shape and prediction.dtype == latents.dtype
    # A scalar timestep is broadcast over the batch.
    assert torch.equal(prediction, backbone.predict(latents, 10, cond))
    # Gradients reach the input (an adapter upstream gets them) but no frozen parameter.
    prediction.square().mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())
    # Different timesteps and prompts matter.
    assert not torch.allclose(prediction, backbone.predict(latents, 900, cond))


def test_predict_is_the_denoiser_output(backbone: Backbone, family: str):
    latents, t = latents_for(backbone), torch.tensor([3, 700])
    cond = backbone.encode_text(["a cat", "a dog"])
    with torch.no_grad():
        ours = backbone.predict(latents, t, cond)
        if family == "pixart_alpha":
            raw = backbone.denoiser(
                latents,
                encoder_hidden_states=cond.prompt_embeds,
                encoder_attention_mask=cond.attention_mask,
                timestep=t,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            ).sample
            assert raw.shape[1] == 8
            expected = raw[:, :4]  # learned-sigma channels dropped
        else:
            expected = backbone.denoiser(
                latents,
                t,
                encoder_hidden_states=cond.prompt_embeds,
                added_cond_kwargs=backbone.added_cond_kwargs(cond),
            ).sample
    assert torch.equal(ours, expected)


def test_encode_text_matches_the_diffusers_pipeline(backbone: Backbone, family: str):
    prompts = ["a photo of an astronaut riding a horse", "a red car"]
    cond = backbone.encode_text(prompts)
    pipe = backbone.pipeline()
    with torch.no_grad():
        if family == "sd15":
            reference, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
            assert cond.prompt_embeds.shape == (2, 77, 32)
            assert cond.pooled_prompt_embeds is None and cond.attention_mask is None
            assert torch.equal(cond.prompt_embeds, reference)
        elif family == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
            assert cond.prompt_embeds.shape == (2, 77, 64) and cond.pooled_prompt_embeds.shape == (2, 32)
            assert torch.equal(cond.prompt_embeds, embeds) and torch.equal(cond.pooled_prompt_embeds, pooled)
        else:
            embeds, mask, _, _ = pipe.encode_prompt(
                prompts, do_classifier_free_guidance=False, device="cpu", clean_caption=False
            )
            assert cond.prompt_embeds.shape == (2, 120, 32) and cond.attention_mask.shape == (2, 120)
            assert torch.equal(cond.prompt_embeds, embeds) and torch.equal(cond.attention_mask, mask)
    assert not torch.allclose(cond.prompt_embeds[0], cond.prompt_embeds[1])
    assert backbone.encode_text("a red car").batch_size == 1


def test_pixart_attention_mask_marks_tokens_and_padding(tiny_backbone):
    backbone = tiny_backbone("pixart_alpha")
    cond = backbone.encode_text(["a cat", "a cat on a red sofa"])
    lengths = [len(backbone.tokenizers[0](p).input_ids) for p in ["a cat", "a cat on a red sofa"]]
    assert cond.attention_mask.sum(dim=1).tolist() == lengths == [4, 8]  # bos + words + eos
    assert cond.attention_mask[0, :4].all() and not cond.attention_mask[0, 4:].any()


def test_vae_round_trip_applies_the_scaling_factor(backbone: Backbone):
    pixels = pixels_for(backbone)
    latents = backbone.encode_images(pixels)
    size = backbone.resolution // 8
    assert latents.shape == (2, 4, size, size)
    scaling = backbone.vae.config.scaling_factor
    with torch.no_grad():
        expected = backbone.vae.encode(pixels).latent_dist.mean * scaling
    assert torch.allclose(latents, expected, atol=1e-6)
    sampled = backbone.encode_images(pixels, sample=True, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == latents.shape and not torch.equal(sampled, latents)

    decoded = backbone.decode_latents(latents)
    assert decoded.shape == pixels.shape and decoded.min() >= -1 and decoded.max() <= 1
    with torch.no_grad():
        reference = backbone.vae.decode(latents / scaling).sample.clamp(-1, 1)
    assert torch.allclose(decoded, reference, atol=1e-6)


def test_decoder_blocks_give_xadapter_a_2x_resolution_pair(tiny_backbone):
    """SD1.5 up_blocks 1..3 -> SDXL mid, up_blocks 0..1: same size, same size, SDXL twice as large."""
    sd15, sdxl = tiny_backbone("sd15"), tiny_backbone("sdxl")
    assert [n for n, _ in sd15.decoder_blocks()] == ["mid_block"] + [f"up_blocks.{i}" for i in range(4)]
    assert [n for n, _ in sdxl.decoder_blocks()] == ["mid_block"] + [f"up_blocks.{i}" for i in range(3)]
    shapes = {}
    for backbone in (sd15, sdxl):
        names = [n for n, _ in backbone.decoder_blocks()]
        cond = backbone.encode_text(["a cat"])
        with torch.no_grad(), backbone.capture(names) as features:
            backbone.predict(latents_for(backbone, batch=1), 500, cond)
        shapes[backbone.family] = {n: tuple(f.shape[-2:]) for n, f in features.items()}
    base, upgraded = shapes["sd15"], shapes["sdxl"]
    assert base["up_blocks.1"] == upgraded["mid_block"]
    assert base["up_blocks.2"] == upgraded["up_blocks.0"]
    assert tuple(2 * s for s in base["up_blocks.3"]) == upgraded["up_blocks.1"]


def test_pixart_decoder_blocks_are_the_second_half(tiny_backbone):
    backbone = tiny_backbone("pixart_alpha")
    names = [n for n, _ in backbone.decoder_blocks()]
    assert names == ["transformer_blocks.2", "transformer_blocks.3"]
    assert backbone.decoder_blocks()[0][1] is backbone.denoiser.transformer_blocks[2]


def test_capture_records_block_outputs_and_removes_its_hooks(backbone: Backbone):
    blocks = backbone.decoder_blocks()
    names = [n for n, _ in blocks]
    own: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda m, a, out, name=name: own.__setitem__(name, out)) for name, module in blocks
    ]
    hooks_before = sum(len(m._forward_hooks) for m in backbone.modules())
    cond = backbone.encode_text(["a cat"])
    latents = latents_for(backbone, batch=1)
    try:
        with torch.no_grad(), backbone.capture(names) as features:
            backbone.predict(latents, 500, cond)
    finally:
        for handle in handles:
            handle.remove()
    assert list(features) == names
    assert all(torch.equal(features[n], own[n]) for n in names)
    assert sum(len(m._forward_hooks) for m in backbone.modules()) == hooks_before - len(handles)
    recorded = {n: f.clone() for n, f in features.items()}
    with torch.no_grad():
        backbone.predict(latents_for(backbone, batch=1, seed=1), 500, cond)
    assert all(torch.equal(features[n], recorded[n]) for n in names)  # nothing records after exit
    with pytest.raises(KeyError, match="no_such_block"):
        with backbone.capture(["no_such_block"]):
            pass


def test_add_to_outputs_changes_the_prediction_only_inside_the_context(backbone: Backbone):
    name, module = backbone.decoder_blocks()[0]
    cond = backbone.encode_text(["a cat"])
    latents = latents_for(backbone, batch=1)
    with torch.no_grad():
        plain = backbone.predict(latents, 500, cond)
        with backbone.capture([name]) as features:
            backbone.predict(latents, 500, cond)
        with backbone.add_to_outputs({name: torch.zeros_like(features[name])}):
            unchanged = backbone.predict(latents, 500, cond)
        with backbone.add_to_outputs({name: torch.ones_like(features[name])}):
            shifted = backbone.predict(latents, 500, cond)
        with backbone.add_to_outputs({name: lambda output: -output}):  # a function of the output: zeroes it
            zeroed = backbone.predict(latents, 500, cond)
        after = backbone.predict(latents, 500, cond)
    assert torch.equal(unchanged, plain) and torch.equal(after, plain)
    assert not torch.allclose(zeroed, plain) and not torch.allclose(zeroed, shifted)
    assert not torch.allclose(shifted, plain)
    assert not module._forward_hooks


def test_cross_attention_layers_follow_attn_processors_order(backbone: Backbone, family: str):
    layers = backbone.cross_attention_layers()
    expected_count = {"sd15": 16, "sdxl": 17, "pixart_alpha": 4}[family]
    assert len(layers) == expected_count
    assert all(isinstance(layer, AttentionLayer) and isinstance(layer.module, Attention) for layer in layers)
    processors = list(backbone.denoiser.attn_processors)
    assert [layer.processor_name for layer in layers] == [p for p in processors if p.endswith("attn2.processor")]
    modules = dict(backbone.denoiser.named_modules())
    context_dim = backbone.encode_text("x").prompt_embeds.shape[-1]
    for layer in layers:
        assert modules[layer.name] is layer.module
        assert layer.module.to_q.in_features == layer.query_dim
        assert layer.module.to_k.in_features == layer.cross_attention_dim
        assert layer.heads * layer.head_dim == layer.module.to_q.out_features
        if family != "pixart_alpha":  # PixArt projects the T5 context to the model width first
            assert layer.cross_attention_dim == context_dim


def test_sdxl_micro_conditioning(tiny_backbone):
    backbone = tiny_backbone("sdxl")
    cond = backbone.encode_text(["a cat", "a dog"])
    native = backbone.added_cond_kwargs(cond)
    assert native["text_embeds"] is cond.pooled_prompt_embeds
    assert native["time_ids"].tolist() == [[128, 128, 0, 0, 128, 128]] * 2
    # Same values as diffusers' SDXL pipeline computes.
    pipe_ids = backbone.pipeline()._get_add_time_ids(
        (128, 128), (0, 0), (128, 128), torch.float32, text_encoder_projection_dim=32
    )
    assert torch.equal(native["time_ids"][:1], pipe_ids)
    custom = backbone.added_cond_kwargs(
        cond, original_size=torch.tensor([[300, 200], [64, 64]]), crop_top_left=(10, 20), target_size=None
    )
    assert custom["time_ids"].tolist() == [[300, 200, 10, 20, 128, 128], [64, 64, 10, 20, 128, 128]]
    latents = latents_for(backbone)
    with torch.no_grad():
        default = backbone.predict(latents, 500, cond)
        assert torch.equal(default, backbone.predict(latents, 500, cond, native))
        assert not torch.allclose(default, backbone.predict(latents, 500, cond, custom))


def test_added_cond_kwargs_is_none_without_extra_conditioning(tiny_backbone):
    for family in ("sd15", "pixart_alpha"):
        backbone = tiny_backbone(family)
        assert backbone.added_cond_kwargs(backbone.encode_text("x")) is None


def test_text_conditioning_batch_helpers():
    a = TextConditioning(torch.zeros(2, 3, 4), torch.zeros(2, 5), torch.ones(2, 3, dtype=torch.long))
    b = TextConditioning(torch.ones(1, 3, 4), torch.ones(1, 5), torch.zeros(1, 3, dtype=torch.long))
    both = TextConditioning.cat([a, b])
    assert len(both) == 3 and both.attention_mask[2].sum() == 0 and both.prompt_embeds[2].sum() == 12
    assert torch.equal(both[2].prompt_embeds, b.prompt_embeds) and both[0:2].batch_size == 2
    half = both.to(dtype=torch.float16)
    assert half.prompt_embeds.dtype == torch.float16 and half.attention_mask.dtype == torch.long
    assert len(b.repeat_interleave(3)) == 3
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        TextConditioning.cat([a, TextConditioning(torch.zeros(1, 3, 4))])


def test_dtype_options(tiny_backbone):
    backbone = build_backbone("pixart_alpha", "tiny", dtype="bf16", vae_dtype="fp32")
    assert backbone.dtype == torch.bfloat16 and backbone.text_encoders[0].dtype == torch.bfloat16
    assert backbone.vae.dtype == torch.float32
    latents = latents_for(backbone)
    prediction = backbone.predict(latents, 10, backbone.encode_text(["a", "b"]))
    assert prediction.dtype == torch.float32  # returned in the caller's dtype
    reference = tiny_backbone("pixart_alpha").predict(
        latents, 10, tiny_backbone("pixart_alpha").encode_text(["a", "b"])
    )
    assert torch.allclose(prediction, reference, atol=0.1)  # same weights, bf16 rounding only
    # The diffusers pipeline hands bf16 latents to the fp32 VAE: it must take them.
    pipe = backbone.pipeline()
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a cat", num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    with pytest.raises(UserError, match="backbone.dtype"):
        build_backbone("sd15", "tiny", dtype="float8")


def test_unknown_family_or_flavour_is_a_user_error():
    with pytest.raises(UserError, match="backbone.family='sd3'"):
        build_backbone("sd3", "tiny")
    with pytest.raises(UserError, match="backbone.flavour='small'"):
        build_backbone("sd15", "small")
    with pytest.raises(UserError, match="backbone.path"):
        build_backbone("sd15", "tiny", path="/some/dir")
