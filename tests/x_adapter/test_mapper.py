"""Mapping layers: shapes derived from the UNets, zero init, gradients, fusion types, other model pairs."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from tests.x_adapter.helpers import latent_size, make_mapper
from xa_lightning.backbones.surgery import capture_outputs
from xa_lightning.errors import UserError
from xa_lightning.methods.x_adapter.injection import ResidualInjector
from xa_lightning.methods.x_adapter.mapper import XAdapterMapper, derive_mapping, unet_block_shapes


def _inputs(backbone, batch: int = 2, seed: int = 0, size: tuple[int, int] | None = None):
    generator = torch.Generator().manual_seed(seed)
    h, w = size or latent_size(backbone)
    latents = torch.randn(batch, 4, h, w, generator=generator)
    cond = backbone.encode_text(["a red fox"] * batch)
    added = backbone.added_cond_kwargs(cond, target_size=(h * 8, w * 8), original_size=(h * 8, w * 8))
    return latents, torch.full((batch,), 500), cond, added


def _block_outputs(backbone, names, size=None):
    latents, t, cond, added = _inputs(backbone, size=size)
    with torch.no_grad(), capture_outputs(backbone.denoiser, names) as captured:
        backbone.predict(latents, t, cond, added)
    return captured


@pytest.mark.parametrize("size", [None, (12, 10)])
def test_derived_block_shapes_match_a_real_forward(base_backbone, upgraded_backbone, size):
    for backbone in (base_backbone, upgraded_backbone):
        lat = size or latent_size(backbone)
        shapes = unet_block_shapes(backbone.denoiser, lat)
        blocks = shapes["encoder"] + shapes["decoder"]
        captured = _block_outputs(backbone, [b.name for b in blocks], size=lat)
        for block in blocks:
            assert tuple(captured[block.name].shape[1:]) == (block.channels, *block.size), block.name


def test_default_pairs_are_the_papers(base_backbone, upgraded_backbone):
    mapper = make_mapper(base_backbone, upgraded_backbone)
    assert list(mapper.config.base_blocks) == ["up_blocks.1", "up_blocks.2", "up_blocks.3"]
    assert list(mapper.config.upgraded_blocks) == ["mid_block", "up_blocks.0", "up_blocks.1"]
    # The tiny pair is a 2x pair like 512 -> 1024: only the last stage upsamples, as in the official mapper.
    assert list(mapper.config.resample) == ["none", "none", "transpose"]
    assert list(mapper.config.out_channels) == [128, 128, 64]


def test_zero_initialised_mapper_leaves_upgraded_output_bit_identical(base_backbone, upgraded_backbone):
    mapper = make_mapper(base_backbone, upgraded_backbone)
    base_features = _block_outputs(base_backbone, mapper.config.base_blocks)
    latents, t, cond, added = _inputs(upgraded_backbone, seed=1)
    with torch.no_grad():
        reference = upgraded_backbone.predict(latents, t, cond, added)
        injector = ResidualInjector(mapper, upgraded_backbone.denoiser)
        with injector.active():
            injector.set_base_features([base_features[n] for n in mapper.config.base_blocks], scale=1.0)
            fused = upgraded_backbone.predict(latents, t, cond, added)
            assert len(injector.mapped) == mapper.num_stages  # the hooks ran
    assert torch.equal(fused, reference)


@pytest.mark.parametrize("fusion_type", ["add", "spade"])
def test_gradients_reach_every_stage_and_nothing_else(base_backbone, upgraded_backbone, fusion_type):
    mapper = make_mapper(base_backbone, upgraded_backbone, fusion_type=fusion_type)
    base_features = _block_outputs(base_backbone, mapper.config.base_blocks)
    latents, t, cond, added = _inputs(upgraded_backbone, seed=1)
    injector = ResidualInjector(mapper, upgraded_backbone.denoiser)
    with injector.active():
        injector.set_base_features([base_features[n] for n in mapper.config.base_blocks])
        prediction = upgraded_backbone.predict(latents, t, cond, added)
    prediction.square().mean().backward()
    for index in range(mapper.num_stages):
        outputs = ["zero_out"] if fusion_type == "add" else ["gamma", "beta"]
        for name in outputs:
            grad = getattr(mapper.stages[index], name).weight.grad
            assert grad is not None and grad.abs().sum() > 0, (index, name)
    assert all(p.grad is None for p in upgraded_backbone.parameters())
    assert all(p.grad is None for p in base_backbone.parameters())


def test_other_model_pair_and_non_square_sizes_work_without_code_changes(upgraded_backbone):
    """An SD2.1-shaped base (v-prediction era, linear projections, 1024-d text) at 768 px -> SDXL at 1024 px:
    latent 12 vs 16 (x4/3, not a power of two), and a non-square request at inference."""
    torch.manual_seed(0)
    sd21 = UNet2DConditionModel(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        sample_size=12,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
    )
    pairs = derive_mapping(sd21, upgraded_backbone.denoiser, (12, 12), latent_size(upgraded_backbone))
    assert [p.base.name for p in pairs] == ["up_blocks.0", "up_blocks.1", "up_blocks.2"]
    assert "interpolate" in {p.resample for p in pairs}
    mapper = XAdapterMapper.from_unets(sd21, upgraded_backbone.denoiser, (12, 12), latent_size(upgraded_backbone))
    with torch.no_grad(), capture_outputs(sd21, mapper.config.base_blocks) as captured:
        sd21(torch.randn(1, 4, 12, 10), 10, encoder_hidden_states=torch.randn(1, 77, 48))
    latents, t, cond, added = _inputs(upgraded_backbone, batch=1, size=(16, 14))
    with torch.no_grad():
        reference = upgraded_backbone.predict(latents, t, cond, added)
    injector = ResidualInjector(mapper, upgraded_backbone.denoiser)
    with injector.active():
        injector.set_base_features([captured[n] for n in mapper.config.base_blocks])
        fused = upgraded_backbone.predict(latents, t, cond, added)
    assert torch.equal(fused.detach(), reference)  # still zero-initialised
    fused.square().mean().backward()
    assert all(stage.zero_out.weight.grad.abs().sum() > 0 for stage in mapper.stages)


def test_encoder_and_both_insertion_places(base_backbone, upgraded_backbone):
    encoder = make_mapper(base_backbone, upgraded_backbone, insertion="encoder")
    assert all(name.startswith("down_blocks.") for name in encoder.config.upgraded_blocks)
    both = make_mapper(base_backbone, upgraded_backbone, insertion="both", seed=0)
    assert both.num_stages == encoder.num_stages + 3
    base_features = _block_outputs(base_backbone, both.config.base_blocks)
    latents, t, cond, added = _inputs(upgraded_backbone, seed=1)
    with torch.no_grad():
        reference = upgraded_backbone.predict(latents, t, cond, added)
        injector = ResidualInjector(both, upgraded_backbone.denoiser)
        with injector.active():
            injector.set_base_features([base_features[n] for n in both.config.base_blocks])
            fused = upgraded_backbone.predict(latents, t, cond, added)
    assert not torch.allclose(fused, reference)


def test_scale_zero_and_hook_removal_restore_the_upgraded_model(base_backbone, upgraded_backbone):
    mapper = make_mapper(base_backbone, upgraded_backbone, seed=3)
    base_features = [_block_outputs(base_backbone, mapper.config.base_blocks)[n] for n in mapper.config.base_blocks]
    latents, t, cond, added = _inputs(upgraded_backbone, seed=1)
    injector = ResidualInjector(mapper, upgraded_backbone.denoiser)
    with torch.no_grad():
        reference = upgraded_backbone.predict(latents, t, cond, added)
        with injector.active():
            injector.set_base_features(base_features, scale=0.0)
            assert torch.equal(upgraded_backbone.predict(latents, t, cond, added), reference)
            injector.set_base_features(base_features, scale=1.0)
            assert not torch.allclose(upgraded_backbone.predict(latents, t, cond, added), reference)
        assert torch.equal(upgraded_backbone.predict(latents, t, cond, added), reference)  # hooks gone


def test_two_stages_mapped_into_one_upgraded_block_both_fuse(base_backbone, upgraded_backbone):
    pairs = [["up_blocks.1", "up_blocks.0"], ["up_blocks.2", "up_blocks.0"]]
    mapper = make_mapper(base_backbone, upgraded_backbone, seed=0, block_pairs=pairs)
    base_features = [_block_outputs(base_backbone, mapper.config.base_blocks)[n] for n in mapper.config.base_blocks]
    latents, t, cond, added = _inputs(upgraded_backbone, seed=1)

    def fused() -> tuple[torch.Tensor, set[int]]:
        injector = ResidualInjector(mapper, upgraded_backbone.denoiser)
        with torch.no_grad(), injector.active():
            injector.set_base_features(base_features)
            return upgraded_backbone.predict(latents, t, cond, added), set(injector.mapped)

    both, stages = fused()
    assert stages == {0, 1}
    with torch.no_grad():
        reference = upgraded_backbone.predict(latents, t, cond, added)
        mapper.stages[1].zero_out.weight.zero_()
        mapper.stages[1].zero_out.bias.zero_()
    first_only, _ = fused()
    assert not torch.allclose(first_only, reference) and not torch.allclose(both, first_only)


def test_save_and_load_roundtrip(tmp_path, base_backbone, upgraded_backbone):
    mapper = make_mapper(base_backbone, upgraded_backbone, seed=1)
    mapper.save_pretrained(tmp_path / "mapper")
    loaded = XAdapterMapper.from_pretrained(tmp_path / "mapper")
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}
    assert public(loaded.config) == public(mapper.config)
    for a, b in zip(mapper.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_bad_configs_are_user_errors(base_backbone, upgraded_backbone):
    with pytest.raises(UserError, match="fusion_type"):
        make_mapper(base_backbone, upgraded_backbone, fusion_type="concat")
    with pytest.raises(UserError, match="insertion"):
        make_mapper(base_backbone, upgraded_backbone, insertion="middle")
    with pytest.raises(UserError, match="up_blocks.9"):
        make_mapper(base_backbone, upgraded_backbone, block_pairs=[["up_blocks.9", "mid_block"]])
