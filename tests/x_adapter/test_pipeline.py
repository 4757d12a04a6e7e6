"""Two-stage sampling: the shared schedule, plugins on the base model, remix, scales that switch things off."""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from tests.x_adapter.helpers import make_mapper, make_pipeline
from xa_lightning.errors import UserError
from xa_lightning.methods.x_adapter.config import SamplingOptions, smallest_adapter_guidance_start
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
    kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
    return pipe("a watercolor fox", negative_prompt="blurry", **kwargs).images


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


@pytest.mark.parametrize("steps, alpha, smallest", [(2, 0.4, 0.5), (50, 0.01, 0.02), (49, 0.02, 0.0205)])
def test_an_alpha_leaving_no_stage_two_step_is_a_user_error(
    base_backbone, upgraded_backbone, mapper, steps, alpha, smallest
):
    """int(N * alpha) == 0 would hand an empty batch on; the error names the key and the smallest valid value."""
    pipe = make_pipeline(base_backbone, upgraded_backbone, mapper)
    with pytest.raises(UserError, match=rf"^adapter_guidance_start={alpha} .*\[{smallest}, 1\]") as error:
        run(pipe, num_inference_steps=steps, adapter_guidance_start=alpha)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match=rf"method.sampling.adapter_guidance_start={alpha} .*\[{smallest}, 1\]"):
        SamplingOptions(steps=steps, adapter_guidance_start=alpha)
    assert int(steps * smallest) == 1 and SamplingOptions(steps=steps, adapter_guidance_start=smallest)


def test_the_smallest_valid_alpha_leaves_exactly_one_step():
    for steps in range(1, 301):
        smallest = smallest_adapter_guidance_start(steps)
        assert int(steps * smallest) == 1 and int(steps * round(smallest - 1e-4, 4)) == 0, steps


def _stage_one(pipe, seed: int = 0, **plugin) -> tuple[torch.Tensor, torch.Generator]:
    """Stage 1's result and the generator after it (a full run continues with that generator's stream)."""
    generator = torch.Generator().manual_seed(seed)
    latents = pipe.sample_base(
        "a watercolor fox",
        negative_prompt="blurry",
        num_inference_steps=STEPS,
        guidance_scale=3.0,
        generator=generator,
        output_type="latent",
        **plugin,
    )
    return latents, generator


PLUGINS = {
    "controlnet": (
        lambda base: {"controlnet": tiny_controlnet(base.denoiser, base.vae_scale_factor, seed=0)},
        {"control_image": CONTROL, "controlnet_conditioning_scale": 1.0},
        {"control_image": CONTROL, "controlnet_conditioning_scale": 0.0},
    ),
    "t2i_adapter": (
        lambda base: {"t2i_adapter": tiny_t2i_adapter(base.denoiser, base.vae_scale_factor, seed=0)},
        {"adapter_image": CONTROL},
        {"adapter_image": CONTROL, "t2i_adapter_conditioning_scale": 0.0},
    ),
    "lora": (lambda base: {}, {}, {}),
}


@pytest.mark.parametrize("kind", list(PLUGINS))
def test_the_plugin_acts_in_stage_two_through_the_mapper(base_backbone, fresh_base, upgraded_backbone, mapper, kind):
    """Stage 2 from ONE stage-1 result, with and without the plugin: what the plugin adds in stage 2 alone
    (at alpha 0.5 most of its effect arrives through the stage-1 image, which this comparison removes)."""
    components, plugin_on, plugin_off = PLUGINS[kind]
    base = fresh_base if kind == "lora" else base_backbone
    pipe = make_pipeline(base, upgraded_backbone, mapper, **components(base))
    if kind == "lora":
        pipe.load_base_lora(tiny_lora_state_dict(base.denoiser, seed=0), "style", scale=1.0)
    stage_one, generator = _stage_one(pipe, **plugin_on)
    # stage1_latents + the generator's continued stream reproduce the full two-stage run exactly
    assert torch.equal(run(pipe, **plugin_on), run(pipe, stage1_latents=stage_one, generator=generator, **plugin_on))

    def stage_two(plugin: bool, condition_scale: float = 1.0) -> torch.Tensor:
        if kind == "lora":
            pipe.set_lora_scale("style", 1.0 if plugin else 0.0)
        kwargs = plugin_on if plugin else plugin_off
        return run(pipe, stage1_latents=stage_one, adapter_condition_scale=condition_scale, **kwargs)

    contribution = (stage_two(True) - stage_two(False)).abs().max()
    assert contribution > 1e-4, contribution  # measured ~1.3e-3; a plugin missing from stage 2 gives exactly 0
    # the upgraded model sees the base model (and its plugin) only through the mapper's residuals
    assert torch.equal(stage_two(True, condition_scale=0.0), stage_two(False, condition_scale=0.0))


def test_guess_mode_with_cfg_and_control_guidance_window_equal_diffusers(base_backbone, upgraded_backbone, mapper):
    """Stage 1 with guess mode, CFG and a control window is diffusers' StableDiffusionControlNetPipeline: the
    ControlNet runs on the conditional half only (zeros for the unconditional one), inside the window."""
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline

    controlnet = tiny_controlnet(base_backbone.denoiser, base_backbone.vae_scale_factor, seed=2)
    pipe = make_pipeline(base_backbone, upgraded_backbone, mapper, controlnet=controlnet)
    steps, noise = 4, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    seen_batches: list[int] = []
    hook = controlnet.register_forward_pre_hook(lambda module, args: seen_batches.append(args[0].shape[0]))
    common = {
        "negative_prompt": "blurry",
        "num_inference_steps": steps,
        "guidance_scale": 3.0,
        "controlnet_conditioning_scale": 1.3,
        "guess_mode": True,
        "control_guidance_start": 0.25,
        "control_guidance_end": 0.75,
        "output_type": "latent",
    }
    try:
        ours = pipe.sample_base("a watercolor fox", base_latents=noise, control_image=CONTROL, **common)
    finally:
        hook.remove()
    assert seen_batches == [1] * steps  # the conditional half (the window zeroes the scale, not the call)
    reference = StableDiffusionControlNetPipeline(
        vae=base_backbone.vae,
        text_encoder=base_backbone.text_encoders[0],
        tokenizer=base_backbone.tokenizers[0],
        unet=base_backbone.denoiser,
        controlnet=controlnet,
        scheduler=DDIMScheduler.from_config(pipe.base_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    theirs = reference("a watercolor fox", image=CONTROL, latents=noise.clone(), **common).images
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # the window matters: the ControlNet acting on every step gives another result
    everywhere = pipe.sample_base(
        "a watercolor fox",
        base_latents=noise,
        control_image=CONTROL,
        **{**common, "control_guidance_start": 0.0, "control_guidance_end": 1.0},
    )
    assert not torch.allclose(everywhere, ours, atol=1e-4)
    with pytest.raises(UserError, match="control_guidance_start"):
        pipe.sample_base(
            "a fox", control_image=CONTROL, control_guidance_start=0.8, control_guidance_end=0.5, num_inference_steps=2
        )


def test_a_one_channel_t2i_adapter_reads_the_controls_luminance(base_backbone, upgraded_backbone, mapper, reference):
    """Canny / sketch T2I-Adapters take one grayscale channel (diffusers feeds them an "L" image)."""
    from diffusers import T2IAdapter

    torch.manual_seed(0)
    channels = [int(block.resnets[0].out_channels) for block in base_backbone.denoiser.down_blocks]
    adapter = T2IAdapter(in_channels=1, channels=channels, num_res_blocks=1, downscale_factor=8)
    pipe = make_pipeline(base_backbone, upgraded_backbone, mapper, t2i_adapter=adapter)
    gray = CONTROL.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    assert (run(pipe, adapter_image=gray) - reference).abs().max() > 1e-3
    features = []
    hook = adapter.register_forward_pre_hook(lambda module, args: features.append(args[0]))
    run(pipe, adapter_image=gray)
    hook.remove()
    torch.testing.assert_close(features[0], gray[:, :1], rtol=1e-6, atol=1e-6)  # luma of a gray image is itself
