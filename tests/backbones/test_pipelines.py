"""Each tiny backbone drives its family's real diffusers pipeline."""

from __future__ import annotations

import diffusers
import torch

from xa_lightning.backbones import Backbone

PIPELINES = {
    "sd15": diffusers.StableDiffusionPipeline,
    "sdxl": diffusers.StableDiffusionXLPipeline,
    "pixart_alpha": diffusers.PixArtAlphaPipeline,
}


def test_pipeline_generates_images_that_depend_on_the_prompt(backbone: Backbone, family: str):
    pipe = backbone.pipeline()
    assert isinstance(pipe, PIPELINES[family])
    assert pipe.vae is backbone.vae and backbone.denoiser in list(pipe.components.values())
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a cat", "a cat", "a red car on a bridge"]
    generators = [torch.Generator().manual_seed(0) for _ in prompts]  # same start noise for every image
    images = pipe(prompts, num_inference_steps=2, generator=generators, output_type="pt").images
    size = backbone.resolution
    assert images.shape == (3, 3, size, size)
    assert images.min() >= 0 and images.max() <= 1 and torch.isfinite(images).all()
    assert torch.allclose(images[0], images[1], atol=1e-5)  # same prompt, same noise
    assert (images[0] - images[2]).abs().mean() > 1e-3  # another prompt, another image


def test_pipeline_accepts_another_scheduler(tiny_backbone):
    backbone = tiny_backbone("sd15")
    scheduler = diffusers.DDIMScheduler.from_config(backbone.scheduler_config, steps_offset=1, clip_sample=False)
    pipe = backbone.pipeline(scheduler)
    assert pipe.scheduler is scheduler
    # The model's own scheduler is a fresh instance each time (a sampling loop never leaks into another).
    assert type(backbone.pipeline().scheduler).__name__ == "PNDMScheduler"
    assert backbone.pipeline().scheduler is not backbone.pipeline().scheduler
