"""SUNPipeline: 4 UNet calls per image, no CFG, negative prompt honoured, plug-in into other UNets and into
the img2img / inpaint / ControlNet pipelines of diffusers."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import (
    ControlNetModel,
    DPMSolverMultistepScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)

from xa_lightning.errors import UserError
from xa_lightning.methods.sun import SUNPipeline, concat_negative, shield_from_negative_tokens

from .conftest import random_adapter, text_states

PROMPTS = ["a watercolor fox in the snow", "a bowl of ramen"]


def _components(backbone, unet):
    return dict(
        vae=backbone.vae,
        text_encoder=backbone.text_encoders[0],
        tokenizer=backbone.tokenizers[0],
        unet=unet,
        scheduler=backbone.inference_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _generators(n=2):
    return [torch.Generator().manual_seed(10 + i) for i in range(n)]


class UNetCalls:
    def __init__(self, unet):
        self.batches: list[int] = []
        self.timesteps: list[int] = []
        self.handle = unet.register_forward_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs, out):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.batches.append(sample.shape[0])
        self.timesteps.append(int(torch.as_tensor(timestep).flatten()[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _run(pipe, **kwargs):
    kwargs.setdefault("generator", _generators(len(kwargs.get("prompt", PROMPTS))))
    kwargs.setdefault("prompt", PROMPTS)
    pipe.set_progress_bar_config(disable=True)
    return pipe(output_type="pt", **kwargs).images


def test_four_unet_calls_per_image_without_cfg(backbone, unet):
    pipe = SUNPipeline(StableDiffusionPipeline(**_components(backbone, unet)), random_adapter(unet))
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    with UNetCalls(unet) as calls:
        images = _run(pipe, negative_prompt=["blurry", "text"])
    assert images.shape == (2, 3, 64, 64)
    assert calls.batches == [2, 2, 2, 2]  # exactly 4 calls, batch B: no CFG doubling
    assert calls.timesteps == [999, 749, 499, 249]
    with UNetCalls(unet) as calls:
        _run(pipe, prompt=PROMPTS[:1], num_images_per_prompt=3, generator=None)
    assert calls.batches == [3, 3, 3, 3]
    with pytest.raises(UserError, match="guidance_scale"):
        _run(pipe, guidance_scale=7.5)


def test_negative_prompt_is_honoured(backbone, unet):
    pipe = SUNPipeline(StableDiffusionPipeline(**_components(backbone, unet)), random_adapter(unet))
    first = _run(pipe, negative_prompt=["blurry, low quality"] * 2)
    other = _run(pipe, negative_prompt=["cartoon, watermark"] * 2)
    assert (first - other).abs().max() > 1e-3
    torch.testing.assert_close(_run(pipe, negative_prompt=None), _run(pipe, negative_prompt=""), rtol=0, atol=0)
    # the same latents come out as from calling the UNet with the concatenated states directly
    positive, negative = text_states(backbone, PROMPTS, ["blurry, low quality"] * 2)
    torch.testing.assert_close(pipe.encode(PROMPTS, ["blurry, low quality"] * 2), concat_negative(positive, negative))


def test_plugs_into_a_differently_trained_unet(backbone, unet, other_unet):
    adapter = random_adapter(unet)
    base = _run(SUNPipeline(StableDiffusionPipeline(**_components(backbone, unet)), adapter))
    fine_tune = copy.deepcopy(other_unet)
    plain_pipe = StableDiffusionPipeline(**_components(backbone, fine_tune))
    plain_pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        plain_pipe.scheduler.config, timestep_spacing="trailing"
    )
    plain = _run(plain_pipe, num_inference_steps=4, guidance_scale=1.0)
    with UNetCalls(fine_tune) as calls:
        plugged = _run(SUNPipeline(StableDiffusionPipeline(**_components(backbone, fine_tune)), adapter))
    assert calls.batches == [2] * 4 and torch.isfinite(plugged).all()
    assert (plugged - plain).abs().max() > 1e-3  # SUN acts on the other UNet ...
    assert (plugged - base).abs().max() > 1e-3  # ... which is a different model than the base


def test_img2img_and_inpainting(backbone, unet):
    adapter = random_adapter(unet)
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    img2img = SUNPipeline(StableDiffusionImg2ImgPipeline(**_components(backbone, unet)), adapter)
    with UNetCalls(unet) as calls:
        out = _run(img2img, image=image, strength=0.5, negative_prompt="blurry")
    assert out.shape == (2, 3, 64, 64) and calls.batches == [2, 2] and calls.timesteps == [499, 249]
    inpaint = SUNPipeline(StableDiffusionInpaintPipeline(**_components(backbone, unet)), adapter)
    mask = torch.zeros(2, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    with UNetCalls(unet) as calls:
        out = _run(inpaint, image=image, mask_image=mask, strength=1.0, negative_prompt="blurry", height=64, width=64)
    assert out.shape == (2, 3, 64, 64) and calls.batches == [2] * 4


def test_controlnet_sees_only_the_prompt(backbone, unet):
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32)).eval()
    with torch.no_grad():  # a trained ControlNet: its zero-initialised output convolutions are not zero
        for param in controlnet.parameters():
            if not param.any():
                param.normal_(std=0.05)
    plain = copy.deepcopy(controlnet)
    pipe = SUNPipeline(
        StableDiffusionControlNetPipeline(**_components(backbone, unet), controlnet=controlnet), random_adapter(unet)
    )
    with UNetCalls(unet) as calls:
        out = _run(pipe, image=torch.rand(2, 3, 64, 64), negative_prompt="blurry")
    assert out.shape == (2, 3, 64, 64) and calls.batches == [2] * 4
    # the shielded ControlNet fed SUN's concatenated states equals a plain one fed the prompt alone
    for processor in plain.attn_processors.values():
        assert not hasattr(processor, "num_negative_tokens")
    positive, negative = text_states(backbone, PROMPTS, ["blurry"] * 2)
    x, cond = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        shielded = controlnet(
            x, 500, encoder_hidden_states=concat_negative(positive, negative), controlnet_cond=cond, return_dict=False
        )
        expected = plain(x, 500, encoder_hidden_states=positive, controlnet_cond=cond, return_dict=False)
        unshielded = plain(
            x, 500, encoder_hidden_states=concat_negative(positive, negative), controlnet_cond=cond, return_dict=False
        )
    torch.testing.assert_close(shielded[1], expected[1])
    assert (unshielded[1] - expected[1]).abs().max() > 1e-5
    shield_from_negative_tokens(controlnet, 77)  # idempotent
    assert all(
        not hasattr(p.original, "num_negative_tokens")
        for k, p in controlnet.attn_processors.items()
        if k.endswith("attn2.processor")
    )


def test_lora_on_the_unet_keeps_working(backbone, other_unet):
    from peft import LoraConfig

    fine_tune = copy.deepcopy(other_unet)
    adapter = random_adapter(fine_tune)
    pipe = SUNPipeline(StableDiffusionPipeline(**_components(backbone, fine_tune)), adapter)
    without = _run(pipe)
    fine_tune.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    with_lora = _run(pipe)
    assert torch.isfinite(with_lora).all() and (with_lora - without).abs().max() > 1e-4


def test_from_pretrained_local_dirs(tmp_path, backbone, unet):
    adapter = random_adapter(unet)
    StableDiffusionPipeline(**_components(backbone, unet)).save_pretrained(tmp_path / "base")
    adapter.save_pretrained(tmp_path / "sun")
    expected = _run(SUNPipeline(StableDiffusionPipeline(**_components(backbone, unet)), adapter))
    loaded = SUNPipeline.from_pretrained(tmp_path / "base", tmp_path / "sun")
    torch.testing.assert_close(_run(loaded), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="base model"):
        SUNPipeline.from_pretrained(tmp_path / "nothing-here", tmp_path / "sun", local_files_only=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        SUNPipeline.from_pretrained(tmp_path / "base", tmp_path / "empty")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("adapter_device, unet_device", [("cuda", "cpu"), ("cpu", "cuda")])
def test_adapter_on_another_device_than_the_embeddings(backbone, unet, adapter_device, unet_device):
    """The processor moves the states to the adapter's weights (device and dtype) and the result back: the same
    prediction as with everything on one device."""
    adapter = random_adapter(unet, use_positive_branch=True)
    adapter.install(unet)
    positive, negative = text_states(backbone, PROMPTS, ["blurry", "ugly"])
    states = concat_negative(positive, negative)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = unet(latents, 500, encoder_hidden_states=states).sample
        unet.to(unet_device)
        adapter.to(adapter_device)
        try:
            moved = unet(latents.to(unet_device), 500, encoder_hidden_states=states.to(unet_device)).sample
        finally:
            unet.to("cpu")
            adapter.to("cpu")
    torch.testing.assert_close(moved.cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_cpu_offload(backbone, other_unet):
    """With enable_model_cpu_offload the UNet waits on the CPU and runs on the GPU: SUN goes where it runs."""
    unet = copy.deepcopy(other_unet)
    pipe = SUNPipeline(StableDiffusionPipeline(**_components(backbone, unet)), random_adapter(unet))
    reference = _run(pipe)
    offloaded = SUNPipeline(StableDiffusionPipeline(**_components(copy.deepcopy(backbone), unet)), pipe.adapter)
    offloaded.pipe.enable_model_cpu_offload()
    torch.testing.assert_close(_run(offloaded).cpu(), reference, rtol=1e-3, atol=1e-3)
    assert next(offloaded.adapter.parameters()).device.type == "cuda"
