"""Plugins in evaluation: every one is on only while a sampler runs (training sees the plain models), the
IP-Adapter as a base plugin, remix, the SDEdit baseline, and the data-resolution check."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tests.x_adapter.test_pipeline import record_timesteps
from tests.x_adapter.test_training import image_batch, loss_at
from xa_lightning.backbones import build_backbone
from xa_lightning.errors import UserError
from xa_lightning.methods.x_adapter import XAdapterModule
from xa_lightning.plugins import tiny_lora_state_dict

SAMPLING = {"steps": 2, "guidance_scale": 2.0, "adapter_guidance_start": 0.5}


def make_module(base, upgraded, plugin=None, **kwargs) -> XAdapterModule:
    module = XAdapterModule(
        base_backbone=base,
        upgraded_backbone=upgraded,
        sampling=kwargs.pop("sampling", SAMPLING),
        plugin=plugin or {"kind": "none"},
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        **kwargs,
    )
    with torch.no_grad():  # a non-zero ("trained") mapper, so the base model reaches the upgraded one
        for index, stage in enumerate(module.adapter.stages):
            stage.zero_out.weight.fill_(0.01 * (index + 1))
    return module


@pytest.fixture(scope="module")
def batch():
    return image_batch()


def references(seed: int, count: int = 1) -> torch.Tensor:
    return torch.rand(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def kohya_lora(base, seed: int = 0, rank: int = 2) -> dict[str, torch.Tensor]:
    """A kohya / A1111 LoRA with UNet (``lora_unet_*``) AND text-encoder (``lora_te_*``) keys."""
    generator = torch.Generator().manual_seed(seed)
    targets = {"lora_unet_": (base.denoiser, ("attn2.to_k", "attn2.to_v"))}
    targets["lora_te_"] = (base.text_encoders[0], ("self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj"))
    state: dict[str, torch.Tensor] = {}
    for prefix, (model, suffixes) in targets.items():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.endswith(suffixes):
                key = prefix + ("text_model." + name if prefix == "lora_te_" else name).replace(".", "_")
                state[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.3
                state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.3
                state[f"{key}.alpha"] = torch.tensor(float(rank))
    return state


def test_a_kohya_lora_is_off_in_training_text_encoder_included(tmp_path, upgraded_backbone, batch):
    """The LoRA's lora_te_* part lives in the base text encoder: after an evaluation, training captions must
    be encoded by the plain encoder again (the loss, and the embeddings themselves, as before)."""
    fresh_base = build_backbone("sd15", "tiny", seed=0)  # its own text encoder: the LoRA stays in it
    save_file(kohya_lora(fresh_base), tmp_path / "style.safetensors")
    module = make_module(fresh_base, upgraded_backbone, {"kind": "lora", "path": str(tmp_path / "style.safetensors")})
    captions = batch["caption"]
    with torch.no_grad():
        plain_embeds = fresh_base.encode_text(captions).prompt_embeds
    plain_loss = loss_at(module, batch, seed=3)

    module.sample_base(["a red fox"], [0], None)
    with module.plugins_active(), torch.no_grad():  # the file reached both the UNet and the text encoder
        assert not torch.equal(fresh_base.encode_text(captions).prompt_embeds, plain_embeds)
        assert not torch.equal(loss_at(module, batch, seed=3), plain_loss)
    with torch.no_grad():
        assert torch.equal(fresh_base.encode_text(captions).prompt_embeds, plain_embeds)
    assert torch.equal(loss_at(module, batch, seed=3), plain_loss)
    assert not any(p.requires_grad for p in fresh_base.parameters())


def test_remix_lora_acts_on_the_upgraded_model_only_while_sampling(tmp_path, base_backbone, fresh_upgraded, batch):
    save_file(tiny_lora_state_dict(fresh_upgraded.denoiser, seed=4), tmp_path / "xl_style.safetensors")
    plain = make_module(base_backbone, fresh_upgraded)
    prompts, seeds = ["a red fox"], [0]
    upgraded_samplers = ("x_adapter", "upgraded", "sdedit")
    before = {name: plain.evaluation_samplers()[name](prompts, seeds, None) for name in upgraded_samplers}
    plain_loss = loss_at(plain, batch, seed=3)
    remix = make_module(
        base_backbone, fresh_upgraded, {"kind": "none", "upgraded_lora": str(tmp_path / "xl_style.safetensors")}
    )
    remix.adapter.load_state_dict(plain.adapter.state_dict())
    for name in upgraded_samplers:
        assert not torch.equal(remix.evaluation_samplers()[name](prompts, seeds, None), before[name]), name
    assert torch.equal(loss_at(remix, batch, seed=3), plain_loss)  # the upgraded LoRA is off in training


def test_ip_adapter_base_plugin_changes_the_output_only_through_the_reference(base_backbone, upgraded_backbone, batch):
    module = make_module(base_backbone, upgraded_backbone, {"kind": "ip_adapter", "scale": 1.0})
    unet = base_backbone.denoiser
    processors = dict(unet.attn_processors)
    plain_loss = loss_at(module, batch, seed=3)
    prompts, seeds = ["a portrait", "a portrait"], [0, 1]
    face_a, face_b = references(0), references(1)
    first = module.sample_x_adapter(prompts, seeds, torch.cat([face_a, face_a]))
    assert torch.equal(module.sample_x_adapter(prompts, seeds, torch.cat([face_a, face_a])), first)
    other = module.sample_x_adapter(prompts, seeds, torch.cat([face_a, face_b]))
    assert torch.equal(other[0], first[0]) and not torch.equal(other[1], first[1])  # per image, its own reference
    base_a, base_ab = (
        module.sample_base(prompts, seeds, torch.cat(faces)) for faces in ([face_a, face_a], [face_a, face_b])
    )
    assert torch.equal(base_a[0], base_ab[0]) and not torch.equal(base_a[1], base_ab[1])

    zero = make_module(base_backbone, upgraded_backbone, {"kind": "ip_adapter", "scale": 0.0})
    none = make_module(base_backbone, upgraded_backbone)
    zero.adapter.load_state_dict(module.adapter.state_dict())
    none.adapter.load_state_dict(module.adapter.state_dict())
    assert torch.equal(
        zero.sample_x_adapter(prompts, seeds, torch.cat([face_a, face_b])), none.sample_x_adapter(prompts, seeds, None)
    )
    # sampling left the base UNet as it was: the same processor objects, the same training loss
    assert dict(unet.attn_processors) == processors and unet.encoder_hid_proj is None
    assert torch.equal(loss_at(module, batch, seed=3), plain_loss)
    with pytest.raises(UserError, match="references"):
        module.sample_x_adapter(prompts, seeds, None)


def test_ip_adapter_file_needs_its_image_encoder(tmp_path):
    from xa_lightning.methods.x_adapter import PluginOptions

    (tmp_path / "ip-adapter_sd15.bin").write_bytes(b"")
    with pytest.raises(UserError, match="method.plugin.image_encoder is required"):
        PluginOptions(kind="ip_adapter", path=str(tmp_path / "ip-adapter_sd15.bin"))


def test_sdedit_restarts_the_upgraded_model_at_x_adapters_t0_from_the_base_image(
    base_backbone, upgraded_backbone, monkeypatch
):
    module = make_module(
        base_backbone, upgraded_backbone, sampling={**SAMPLING, "steps": 4, "scheduler": "dpmsolver++"}
    )
    prompts, seeds = ["a red fox", "a blue house"], [3, 4]
    x_adapter_calls, hook = record_timesteps(upgraded_backbone.denoiser)
    try:
        x_adapter = module.sample_x_adapter(prompts, seeds)
    finally:
        hook.remove()

    handed_over = {}
    original = module.sdedit_pipeline

    def spy():
        pipe = original()

        def call(*args, **kwargs):
            handed_over.update(kwargs)
            return pipe(*args, **kwargs)

        return call

    monkeypatch.setattr(module, "sdedit_pipeline", spy)
    sdedit_calls, hook = record_timesteps(upgraded_backbone.denoiser)
    try:
        sdedit = module.sample_sdedit(prompts, seeds)
    finally:
        hook.remove()
    # the upgraded model runs exactly X-Adapter's stage-2 timesteps (t0 = timesteps[N - int(N * alpha)] ..)
    assert sdedit_calls == x_adapter_calls and len(sdedit_calls) == 2
    assert handed_over["strength"] == 0.5
    # ... from the base sampler's image (X-Adapter's stage 1 for these seeds), upscaled like the hand-over
    base = module.sample_base(prompts, seeds).float() / 255
    upscaled = torch.nn.functional.interpolate(base, size=(128, 128), mode="bicubic", antialias=True).clamp(0, 1)
    torch.testing.assert_close(handed_over["image"], upscaled, atol=1 / 255, rtol=0)
    assert sdedit.shape == x_adapter.shape and not torch.equal(sdedit, x_adapter)


class _Data(L.LightningDataModule):
    def __init__(self, batch: dict, resolution: int, extra_resolutions: list[int]) -> None:
        super().__init__()
        self.batch, self.resolution, self.extra_resolutions = batch, resolution, extra_resolutions

    def train_dataloader(self):
        return torch.utils.data.DataLoader([self.batch], batch_size=None)


@pytest.mark.parametrize(
    "resolution, extra, match",
    [(32, [128], "data.resolution=32 .* set data.resolution=64"), (64, [256], r"set data.extra_resolutions=\[128\]")],
)
def test_data_resolutions_are_checked_against_the_models_before_training(
    base_backbone, upgraded_backbone, resolution, extra, match, tmp_path
):
    """A mismatched size would be resized inside the mapper's hooks without a word: refuse it at setup."""
    module = make_module(base_backbone, upgraded_backbone)
    batch = image_batch(resolution, extra[0])
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(UserError, match=match):
        trainer.fit(module, datamodule=_Data(batch, resolution, extra))


def test_a_real_base_model_never_gets_a_random_tiny_plugin(base_backbone, upgraded_backbone):
    real = type(base_backbone)(
        denoiser=base_backbone.denoiser,
        vae=base_backbone.vae,
        text_encoders=list(base_backbone.text_encoders),
        tokenizers=base_backbone.tokenizers,
        scheduler_config=base_backbone.scheduler_config,
        flavour="pretrained",
        source="/models/stable-diffusion-v1-5",
    )
    with pytest.raises(UserError, match="method.plugin.path is not set for the ip_adapter plugin of a real base"):
        make_module(real, upgraded_backbone, {"kind": "ip_adapter"})
