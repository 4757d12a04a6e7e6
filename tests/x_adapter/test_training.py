"""The LightningModule: null-text training, gradients only in the mapper, loss falls, checkpoints, samplers."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch.utils.data import DataLoader

from xa_lightning.errors import UserError
from xa_lightning.methods.x_adapter import XAdapterMapper, XAdapterModule


def image_batch(base_res: int = 64, upgraded_res: int = 128) -> dict:
    """Two real photos (scikit-image) at both resolutions, with SDXL micro-conditioning, like the datamodule."""
    from skimage import data

    photos = [torch.from_numpy(data.astronaut()), torch.from_numpy(data.coffee())]
    pixels = {}
    for res in (base_res, upgraded_res):
        views = [
            F.interpolate(
                p.permute(2, 0, 1)[None].float(), size=(res, res), mode="bilinear", antialias=True, align_corners=False
            )[0]
            for p in photos
        ]
        pixels[res] = torch.stack(views) / 127.5 - 1
    return {
        "pixels": pixels[base_res],
        f"pixels_{upgraded_res}": pixels[upgraded_res],
        "caption": ["an astronaut in a white suit", "a cup of coffee on a table"],
        "original_size": torch.tensor([[512, 512], [400, 600]]),
        "crop_top_left": torch.zeros(2, 2, dtype=torch.long),
        "target_size": torch.full((2, 2), base_res),
        f"crop_top_left_{upgraded_res}": torch.zeros(2, 2, dtype=torch.long),
        f"target_size_{upgraded_res}": torch.full((2, 2), upgraded_res),
        "key": ["a", "b"],
    }


def make_module(base, upgraded, lr: float = 1e-3, **kwargs) -> XAdapterModule:
    return XAdapterModule(
        base_backbone=base, upgraded_backbone=upgraded, optimizer=functools.partial(torch.optim.AdamW, lr=lr), **kwargs
    )


@pytest.fixture(scope="module")
def batch():
    return image_batch()


def loss_at(module: XAdapterModule, batch: dict, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return module.compute_loss(batch)[0]


def test_zero_initialised_mapper_gives_exactly_the_upgraded_models_loss(base_backbone, upgraded_backbone, batch):
    module = make_module(base_backbone, upgraded_backbone)
    with_mapper = loss_at(module, batch, seed=0)
    # The same draws without any hook: the frozen upgraded model alone on the null-text prompt.
    torch.manual_seed(0)
    with torch.no_grad():
        up_latents = upgraded_backbone.encode_images(batch["pixels_128"])
        base_latents = base_backbone.encode_images(batch["pixels"])
        t = torch.randint(0, 1000, (2,))
        torch.randn_like(base_latents)
        noise = torch.randn_like(up_latents)
        noisy = upgraded_backbone.noise_scheduler.add_noise(up_latents, noise, t)
        cond = upgraded_backbone.encode_text(["", ""])
        added = upgraded_backbone.added_cond_kwargs(
            cond, batch["original_size"], batch["crop_top_left_128"], batch["target_size_128"]
        )
        alone = F.mse_loss(upgraded_backbone.predict(noisy, t, cond, added), noise)
    assert torch.equal(with_mapper, alone)


def test_only_the_mapper_receives_gradients(base_backbone, upgraded_backbone, batch):
    module = make_module(base_backbone, upgraded_backbone)
    torch.manual_seed(0)
    loss, logs = module.compute_loss(batch)
    loss.backward()
    assert set(logs) == {f"residual_rms/{i}" for i in range(3)}
    named = dict(module.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable == {f"adapter.{n}" for n, _ in module.adapter.named_parameters()}
    assert all(p.grad is None for n, p in named.items() if not n.startswith("adapter."))
    assert all(module.adapter.stages[i].zero_out.weight.grad.abs().sum() > 0 for i in range(3))
    assert [g["name"] for g in module.param_groups()] == ["adapter"]


def record_input_ids(encoders) -> tuple[list[torch.Tensor], list]:
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        seen.append((args[0] if args else kwargs["input_ids"]).detach().cpu())

    return seen, [e.register_forward_pre_hook(hook, with_kwargs=True) for e in encoders]


@pytest.mark.parametrize("null_text", [True, False])
def test_upgraded_text_encoders_see_the_empty_prompt(base_backbone, upgraded_backbone, batch, null_text):
    module = make_module(base_backbone, upgraded_backbone, training={"null_text": null_text})
    upgraded_seen, upgraded_hooks = record_input_ids(upgraded_backbone.text_encoders)
    base_seen, base_hooks = record_input_ids(base_backbone.text_encoders)
    try:
        loss_at(module, batch, seed=0)
    finally:
        for handle in upgraded_hooks + base_hooks:
            handle.remove()
    assert len(upgraded_seen) == 2 and len(base_seen) == 1
    for tokenizer, ids in zip(upgraded_backbone.tokenizers, upgraded_seen):
        prompts = ["", ""] if null_text else batch["caption"]
        expected = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        assert torch.equal(ids, expected)
    tokenizer = base_backbone.tokenizers[0]
    assert torch.equal(
        base_seen[0],
        tokenizer(
            batch["caption"],
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids,
    )


def cached_batch(base, upgraded, batch: dict) -> dict:
    """The batch as the data cache yields it: both models' latents and the base caption embeddings."""
    with torch.no_grad():
        return {
            "latents": base.encode_images(batch["pixels"]),
            "latents_128": upgraded.encode_images(batch["pixels_128"]),
            "prompt_embeds": base.encode_text(batch["caption"]).prompt_embeds,
            **{k: v for k, v in batch.items() if not k.startswith("pixels")},
        }


def test_loss_falls_on_a_fixed_batch(base_backbone, upgraded_backbone, batch):
    """20 steps on one image with a fixed pair of noise / timestep draws (alternating): the mapper must fit
    them (the frozen upgraded model is random, so this is the only way its error can fall)."""
    module = make_module(base_backbone, upgraded_backbone, lr=3e-3, training={"cached_upgraded_latents": True})
    fixed = cached_batch(base_backbone, upgraded_backbone, {k: v[:1] for k, v in batch.items()})
    optimizer = module.configure_optimizers()
    draws = (0, 1)
    before = torch.stack([loss_at(module, fixed, s) for s in draws]).mean()
    for step in range(20):
        torch.manual_seed(draws[step % len(draws)])
        loss, _ = module.compute_loss(fixed)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = torch.stack([loss_at(module, fixed, s) for s in draws]).mean()
    assert after < 0.8 * before, (before.item(), after.item())


def test_mixed_precision_step(base_backbone, upgraded_backbone, batch):
    """bf16 autocast (what trainer.precision=bf16-mixed does): mapper weights and gradients stay fp32."""
    module = make_module(base_backbone, upgraded_backbone)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = module.compute_loss({k: v[:1] for k, v in batch.items()})
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    grads = [p.grad for p in module.adapter.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert module.adapter.stages[0].zero_out.weight.grad.abs().sum() > 0


def test_v_prediction_upgraded_model_regresses_the_velocity(base_backbone, upgraded_backbone, batch):
    module = make_module(base_backbone, upgraded_backbone)
    original = upgraded_backbone.noise_scheduler
    upgraded_backbone.noise_scheduler = DDPMScheduler.from_config(original.config, prediction_type="v_prediction")
    try:
        v_loss = loss_at(module, batch, seed=0)
        torch.manual_seed(0)
        with torch.no_grad():
            latents = upgraded_backbone.encode_images(batch["pixels_128"])
            t = torch.randint(0, 1000, (2,))
            torch.randn_like(base_backbone.encode_images(batch["pixels"]))
            noise = torch.randn_like(latents)
            noisy = upgraded_backbone.noise_scheduler.add_noise(latents, noise, t)
            cond = upgraded_backbone.encode_text(["", ""])
            added = upgraded_backbone.added_cond_kwargs(
                cond, batch["original_size"], batch["crop_top_left_128"], batch["target_size_128"]
            )
            prediction = upgraded_backbone.predict(noisy, t, cond, added)
            velocity = upgraded_backbone.noise_scheduler.get_velocity(latents, noise, t)
    finally:
        upgraded_backbone.noise_scheduler = original
    assert torch.equal(v_loss, F.mse_loss(prediction, velocity))
    assert not torch.equal(v_loss, F.mse_loss(prediction, noise))


def test_gradient_checkpointing_gives_the_same_gradients(base_backbone, upgraded_backbone, batch):
    grads = []
    for checkpointing in (False, True):
        module = make_module(base_backbone, upgraded_backbone, training={"gradient_checkpointing": checkpointing})
        module.adapter.load_state_dict(make_module(base_backbone, upgraded_backbone).adapter.state_dict())
        with torch.no_grad():  # a non-zero mapper so every stage gets a gradient
            for stage in module.adapter.stages:
                stage.zero_out.weight.fill_(0.01)
        torch.manual_seed(0)
        module.compute_loss(batch)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.adapter.parameters()]))
        upgraded_backbone.denoiser.disable_gradient_checkpointing()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert grads[0].abs().sum() > 0


def test_cached_latents_need_the_upgraded_vae(base_backbone, upgraded_backbone, batch):
    cached = cached_batch(base_backbone, upgraded_backbone, batch)
    with pytest.raises(UserError, match="cached_upgraded_latents"):
        loss_at(make_module(base_backbone, upgraded_backbone), cached, seed=0)
    trusting = make_module(base_backbone, upgraded_backbone, training={"cached_upgraded_latents": True})
    assert torch.equal(loss_at(trusting, cached, seed=0), loss_at(trusting, batch, seed=0))
    with pytest.raises(UserError, match="extra_resolutions"):
        loss_at(trusting, {k: v for k, v in batch.items() if k != "pixels_128"}, seed=0)


class _Repeat(torch.utils.data.Dataset):
    def __init__(self, batch: dict, length: int = 4) -> None:
        self.items = [{k: v[i % 2] for k, v in batch.items()} for i in range(length)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def test_checkpoint_and_export_hold_only_the_mapper(tmp_path, base_backbone, upgraded_backbone, batch):
    module = make_module(base_backbone, upgraded_backbone)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)],
    )
    trainer.fit(module, DataLoader(_Repeat(batch), batch_size=2))
    checkpoint = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    mapper_keys = {f"adapter.{k}" for k in module.adapter.state_dict()}
    assert set(checkpoint["state_dict"]) == mapper_keys
    assert checkpoint["xa"]["method"] == "x_adapter"
    assert checkpoint["xa"]["backbones"] == {"base": "sd15:tiny", "upgraded": "sdxl:tiny"}
    exported = module.export_adapter(tmp_path / "adapter")
    reloaded = XAdapterMapper.from_pretrained(exported)
    for key, value in module.adapter.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value)
    # the exported mapper is accepted as init_weights of a new run (and refused for other settings)
    again = make_module(base_backbone, upgraded_backbone, mapper={"init_weights": str(exported)})
    assert torch.equal(again.adapter.stages[0].zero_out.weight, module.adapter.stages[0].zero_out.weight)
    with pytest.raises(UserError, match="does not fit"):
        make_module(base_backbone, upgraded_backbone, mapper={"init_weights": str(exported), "num_res_blocks": 2})


def test_evaluation_samplers_and_plugin_free_training(fresh_base, upgraded_backbone, batch):
    module = make_module(
        fresh_base,
        upgraded_backbone,
        sampling={"steps": 2, "guidance_scale": 2.0, "adapter_guidance_start": 0.5},
        plugin={"kind": "lora", "scale": 1.0},
    )
    with torch.no_grad():  # a non-zero mapper, so base features (and a base LoRA) reach the loss
        for stage in module.adapter.stages:
            stage.zero_out.weight.fill_(0.01)
    before = loss_at(module, batch, seed=3)
    samplers = module.evaluation_samplers()
    assert list(samplers) == ["x_adapter", "upgraded", "base", "sdedit"]
    prompts, seeds = ["a red fox", "a blue house"], [1, 2]
    images = {name: sampler(prompts, seeds, None) for name, sampler in samplers.items()}
    assert images["x_adapter"].shape == images["upgraded"].shape == images["sdedit"].shape == (2, 3, 128, 128)
    assert images["base"].shape == (2, 3, 64, 64)
    assert all(image.dtype == torch.uint8 for image in images.values())
    assert torch.equal(samplers["base"](prompts[:1], seeds[:1], None), images["base"][:1])  # per-seed determinism
    # the LoRA is on only while sampling: training stays plugin-free
    assert torch.equal(loss_at(module, batch, seed=3), before)
    with module.plugins_active():
        assert not torch.equal(loss_at(module, batch, seed=3), before)
    assert torch.equal(loss_at(module, batch, seed=3), before)


def test_controlnet_tile_plugin_takes_the_evaluation_references(base_backbone, upgraded_backbone, batch):
    module = make_module(
        base_backbone,
        upgraded_backbone,
        sampling={"steps": 2, "guidance_scale": 1.0, "adapter_guidance_start": 0.5},
        plugin={"kind": "controlnet", "condition": "canny", "img2img_strength": 0.5, "scale": 1.0},
    )
    references = (batch["pixels"] + 1) / 2  # photos in [0, 1]: canny maps for the ControlNet, init images
    x_adapter = module.sample_x_adapter(["an astronaut"], [0], references[:1])
    base = module.sample_base(["an astronaut"], [0], references[:1])
    assert x_adapter.shape == (1, 3, 128, 128) and base.shape == (1, 3, 64, 64)
    other = module.sample_base(["an astronaut"], [0], references[1:])  # another reference, another image
    assert not torch.equal(base, other)
    with pytest.raises(UserError, match="references"):
        module.sample_x_adapter(["an astronaut"], [0], None)


def test_bad_method_settings_are_user_errors(base_backbone, upgraded_backbone):
    with pytest.raises(UserError, match="fusion_type"):
        make_module(base_backbone, upgraded_backbone, mapper={"fusion_type": "concat"})
    with pytest.raises(UserError, match="method.training.typo"):
        make_module(base_backbone, upgraded_backbone, training={"typo": 1})
    with pytest.raises(UserError, match="does not exist"):
        make_module(base_backbone, upgraded_backbone, plugin={"kind": "lora", "path": "/nonexistent/style.safetensors"})
    with pytest.raises(UserError, match="base model"):
        make_module(upgraded_backbone, upgraded_backbone)
