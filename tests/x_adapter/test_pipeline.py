"""Two-stage sampling: the shared schedule, plugins on the base model, remix, scales that switch things off."""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from tests.x_adapter.helpers import make_mapper, make_pipeline
from xa_lightning.errors import UserError
from xa_lightning.plugins import tiny_controlnet, tiny_lora_state_dict, tiny_t2i_adapter

STEPS, ALPHA = 2, 0.5
CONTROL = torch.linspace(0, 1, 64 * 64 * 3).reshape(1, 3, 64, 64)  # a deterministic "edge map"


def run(pipe, seed: int = 0, **kwargs) -> torch.Tensor:
    kwargs = {
        "num_inference_steps": STEPS,
        "adapter_guidance_start": ALPHA,
        "guidance_scale": 3.0,
        "output_type": "latent",
        **kwargs,
    }
    return pipe(
        "a watercolor fox", negative_prompt="blurry", generator=torch.Generator().manual_seed(seed), **kwargs
    ).images


@pytest.fixture(scope="module")
def mapper(base_backbone, upgraded_backbone):
    return make_mapper(base_backbone, upgraded_backbone, seed=0)  # a non-zero ("trained") mapper


@pytest.fixture(scope="module")
def reference(base_backbone, upgraded_backbone, mapper):
    """The output without any plugin."""
    return run(make_pipeline(base_backbone, upgraded_backbone, mapper))


def record_timesteps(unet) -> tuple[list[int], object]:
    calls: list[int] = []

    def hook(module, args, kwargs):
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        calls.append(int(torch.as_tensor(timestep).flatten()[0]))

    return calls, unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("base_spacing", ["leading", "trailing"])
def test_stage_two_continues_the_same_schedule_for_both_models(base_backbone, upgraded_backbone, mapper, base_spacing):
    steps, alpha = 6, 0.5
    pipe = make_pipeline(base_backbone, upgraded_backbone, mapper, scheduler="dpmsolver++")
    # A base scheduler configured differently must still be walked on the upgraded model's timesteps.
    pipe.base_scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.base_scheduler.config, timestep_spacing=base_spacing
    )
    base_calls, base_hook = record_timesteps(base_backbone.denoiser)
    upgraded_calls, upgraded_hook = record_timesteps(upgraded_backbone.denoiser)
    try:
        run(pipe, num_inference_steps=steps, adapter_guidance_start=alpha, output_type="latent")
    finally:
        base_hook.remove()
        upgraded_hook.remove()
    schedule = pipe.scheduler.timesteps.tolist()
    stage_two = schedule[steps - int(steps * alpha) :]
    assert len(schedule) == steps and schedule == sorted(schedule, reverse=True)
    assert upgraded_calls == stage_two  # t0 .. last, once each
    assert base_calls == schedule + stage_two  # stage 1: all of them; stage 2: continues at t0, no restart at T


def test_adapter_condition_scale_zero_equals_a_zero_mapper(base_backbone, upgraded_backbone, mapper, reference):
    zero_scale = run(make_pipeline(base_backbone, upgraded_backbone, mapper), adapter_condition_scale=0.0)
    zero_mapper = run(make_pipeline(base_backbone, upgraded_backbone, make_mapper(base_backbone, upgraded_backbone)))
    assert torch.equal(zero_scale, zero_mapper)
    assert not torch.allclose(zero_scale, reference, atol=1e-3)  # and the trained mapper does change things


def test_controlnet_on_the_base_changes_the_output_and_scale_zero_removes_it(
    base_backbone, upgraded_backbone, mapper, reference
):
    controlnet = tiny_controlnet(base_backbone.denoiser, base_backbone.vae_scale_factor, seed=0)
    pipe = make_pipeline(base_backbone, upgraded_backbone, mapper, controlnet=controlnet)
    controlled = run(pipe, control_image=CONTROL, controlnet_conditioning_scale=1.0)
    off = run(pipe, control_image=CONTROL, controlnet_conditioning_scale=0.0)
    assert (controlled - reference).abs().max() > 1e-3
    assert torch.equal(off, reference)


def test_controlnet_tile_image_to_image(base_backbone, upgraded_backbone, mapper, reference):
    controlnet = tiny_controlnet(base_backbone.denoiser, base_backbone.vae_scale_factor, seed=1)
    pipe = make_pipeline(base_backbone, upgraded_backbone, mapper, controlnet=controlnet)
    base_calls, hook = record_timesteps(base_backbone.denoiser)
    try:
        tiled = run(pipe, image=CONTROL, strength=0.5, control_image=CONTROL)
    finally:
        hook.remove()
    assert len(base_calls) == STEPS // 2 + int(STEPS * ALPHA)  # stage 1 starts half-way
    assert tiled.shape == reference.shape and (tiled - reference).abs().max() > 1e-3


def test_t2i_adapter_on_the_base_changes_the_output_and_scale_zero_removes_it(
    base_backbone, upgraded_backbone, mapper, reference
):
    adapter = tiny_t2i_adapter(base_backbone.denoiser, base_backbone.vae_scale_factor, seed=0)
    pipe = make_pipeline(base_backbone, upgraded_backbone, mapper, t2i_adapter=adapter)
    assert (run(pipe, adapter_image=CONTROL) - reference).abs().max() > 1e-3
    assert torch.equal(run(pipe, adapter_image=CONTROL, t2i_adapter_conditioning_scale=0.0), reference)


def test_base_lora_and_remix_lora_each_change_the_output_and_scale_zero_removes_them(
    fresh_base, fresh_upgraded, mapper, reference
):
    pipe = make_pipeline(fresh_base, fresh_upgraded, mapper)
    pipe.load_base_lora(tiny_lora_state_dict(fresh_base.denoiser, seed=0), "base_style", scale=1.0)
    styled = run(pipe)
    assert (styled - reference).abs().max() > 1e-3
    # remix: a LoRA of the upgraded model at the same time as the base model's plugin
    pipe.load_upgraded_lora(tiny_lora_state_dict(fresh_upgraded.denoiser, seed=1), "xl_style", scale=1.0)
    remix = run(pipe)
    assert (remix - styled).abs().max() > 1e-3
    pipe.set_lora_scale("xl_style", 0.0)
    assert torch.equal(run(pipe), styled)
    pipe.set_lora_scale("base_style", 0.0)
    assert torch.equal(run(pipe), reference)
    with pytest.raises(UserError, match="no LoRA named"):
        pipe.set_lora_scale("missing", 1.0)


def test_separate_base_prompt_reaches_the_upgraded_model_through_the_mapper(
    base_backbone, upgraded_backbone, mapper, reference
):
    pipe = make_pipeline(base_backbone, upgraded_backbone, mapper)
    other = run(pipe, base_prompt="an oil painting of a castle")
    assert (other - reference).abs().max() > 1e-3
    assert torch.equal(run(pipe), reference)  # deterministic given the seed


def test_bad_arguments_are_user_errors(base_backbone, upgraded_backbone, mapper):
    pipe = make_pipeline(base_backbone, upgraded_backbone, mapper)
    with pytest.raises(UserError, match="adapter_guidance_start"):
        run(pipe, adapter_guidance_start=0.0)
    with pytest.raises(UserError, match="no controlnet"):
        run(pipe, control_image=CONTROL)
    with pytest.raises(UserError, match="scheduler"):
        make_pipeline(base_backbone, upgraded_backbone, mapper, scheduler="plms")


def test_sample_base_is_exactly_stage_one(base_backbone, upgraded_backbone, mapper):
    pipe = make_pipeline(base_backbone, upgraded_backbone, mapper)
    out = pipe(
        "a watercolor fox",
        num_inference_steps=STEPS,
        adapter_guidance_start=ALPHA,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(5),
        output_type="pt",
        return_base_images=True,
    )
    alone = pipe.sample_base(
        "a watercolor fox", num_inference_steps=STEPS, guidance_scale=3.0, generator=torch.Generator().manual_seed(5)
    )
    assert out.images.shape[-1] == 2 * alone.shape[-1]  # upgraded at 128 px, base at 64 px
    assert torch.equal(out.base_images, alone)
