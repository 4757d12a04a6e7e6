"""Full-shape architectures on the meta device: the published parameter counts and layer counts."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from transformers.initialization import no_init_weights

from xa_lightning.backbones import build_backbone

# Published sizes: SD1.5 UNet 859.5M, SDXL UNet 2.567B, PixArt-alpha XL/2 ~611M; VAE 83.65M;
# CLIP ViT-L/14 text 123.1M; OpenCLIP bigG text (with projection) 694.7M.
PUBLISHED = {
    "sd15": {"denoiser": 859.52e6, "vae": 83.65e6, "text": [123.06e6], "cross_attention": 16, "decoder": 5},
    "sdxl": {"denoiser": 2567.46e6, "vae": 83.65e6, "text": [123.06e6, 694.66e6], "cross_attention": 70, "decoder": 4},
    "pixart_alpha": {"denoiser": 611.35e6, "vae": 83.65e6, "text": None, "cross_attention": 28, "decoder": 14},
}


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", sorted(PUBLISHED))
def test_full_shape_matches_the_published_architecture(family: str):
    # Meta device: nothing is allocated on this CPU box; random init of meta tensors is skipped (it is slow).
    with init_empty_weights(), no_init_weights():
        backbone = build_backbone(family, "full_shape")
    expected = PUBLISHED[family]
    assert all(p.device.type == "meta" for p in backbone.parameters())
    assert count(backbone.denoiser) == pytest.approx(expected["denoiser"], rel=1e-4)
    assert count(backbone.vae) == pytest.approx(expected["vae"], rel=1e-3)
    if expected["text"] is not None:
        assert [count(e) for e in backbone.text_encoders] == pytest.approx(expected["text"], rel=1e-3)
    assert len(backbone.cross_attention_layers()) == expected["cross_attention"]
    assert len(backbone.decoder_blocks()) == expected["decoder"]
    assert backbone.resolution == (512 if family == "sd15" else 1024)
    assert backbone.id == f"{family}:full_shape"
    if family == "pixart_alpha":
        assert backbone.denoiser.use_additional_conditions  # 1024-MS is resolution/aspect conditioned
        encoder = backbone.text_encoders[0].config
        assert (encoder.d_model, encoder.num_layers, encoder.num_heads, encoder.d_ff) == (4096, 24, 64, 10240)
        dims = {layer.query_dim for layer in backbone.cross_attention_layers()}
        assert dims == {1152}
    if family == "sdxl":
        dims = sorted({layer.query_dim for layer in backbone.cross_attention_layers()})
        assert dims == [640, 1280]
        assert {layer.cross_attention_dim for layer in backbone.cross_attention_layers()} == {2048}


def test_full_shape_can_be_initialised_directly_on_a_device():
    """``device=`` builds a full-shape model in place (on a GPU: no slow CPU init); "meta" allocates nothing."""
    backbone = build_backbone("sd15", "full_shape", device="meta", dtype="bf16")
    assert {p.device.type for p in backbone.parameters()} == {"meta"}
    assert backbone.dtype == torch.bfloat16 and backbone.vae.dtype == torch.bfloat16
    assert count(backbone.denoiser) == pytest.approx(PUBLISHED["sd15"]["denoiser"], rel=1e-4)
