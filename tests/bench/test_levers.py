"""Speed and memory levers are switches that change how, not what: frozen models in bf16 beside an fp32 adapter
and an fp32 loss, attention math vs fused SDPA, channels-last, torch.compile (its effect on speed is ``xa-bench``'s)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from xa_lightning.backbones import Backbone, backbone_from_config, build_backbone
from xa_lightning.errors import UserError

from ..demo_methods import demo_module_and_batch

BF16_FROZEN = {
    "sun": ["backbone.dtype=bf16"],
    "x_adapter": ["method.base_backbone.dtype=bf16", "method.upgraded_backbone.dtype=bf16"],
    "a4a": ["backbone.dtype=bf16", "method.base_backbone.dtype=bf16"],
}


@pytest.mark.parametrize("name", sorted(BF16_FROZEN))
def test_bf16_frozen_models_train_an_fp32_adapter_with_an_fp32_loss(name):
    module, batch, _ = demo_module_and_batch(name, *BF16_FROZEN[name])
    backbones = [m for m in module.modules() if isinstance(m, Backbone)]
    frozen = [p for backbone in backbones for p in backbone.denoiser.parameters()]
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    module.train()
    loss, _ = module.compute_loss(batch)
    loss.backward()
    assert loss.dtype == torch.float32
    trained = [p for p in module.adapter.parameters() if p.requires_grad]
    assert trained and {p.dtype for p in trained} == {torch.float32}
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)
    assert all(torch.isfinite(p.grad).all() for p in trained)
    assert all(p.grad is None for p in frozen)


def _unet_output(backbone) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    size = backbone.latent_size
    latents = torch.randn(2, backbone.latent_channels, size, size, generator=generator)
    with torch.no_grad():
        cond = backbone.encode_text(["a red fox", "a lighthouse"])
        return backbone.predict(latents, 500, cond), cond.prompt_embeds


def test_math_attention_and_channels_last_compute_what_the_default_computes():
    reference = build_backbone("sd15", "tiny")
    assert all(isinstance(p, AttnProcessor2_0) for p in reference.denoiser.attn_processors.values())
    math = backbone_from_config({"family": "sd15", "attention": "math", "channels_last": True})
    assert all(isinstance(p, AttnProcessor) for p in math.denoiser.attn_processors.values())
    assert all(isinstance(p, AttnProcessor) for p in math.vae.attn_processors.values())
    assert math.text_encoders[0].config._attn_implementation == "eager"
    assert math.denoiser.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    (expected, expected_text), (got, got_text) = _unet_output(reference), _unet_output(math)
    torch.testing.assert_close(got_text, expected_text, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_compile_wraps_the_denoiser_forward_and_bad_levers_are_one_line_errors():
    backbone = backbone_from_config({"family": "pixart_alpha", "compile": True})
    assert backbone.denoiser._compiled_call_impl is not None  # compiled lazily, at the first call
    assert build_backbone("pixart_alpha", "tiny").denoiser._compiled_call_impl is None
    with pytest.raises(UserError, match=r"backbone\.attention='flash' is unknown; use one of sdpa, math"):
        backbone_from_config({"family": "sd15", "attention": "flash"})
    with pytest.raises(UserError, match=r"backbone\.compile='yes' must be true or false"):
        backbone_from_config({"family": "sd15", "compile": "yes"})
