"""A4APipeline (SDXL and PixArt-alpha) and the evaluation samplers: scale 0 is the plain upgraded model, the
image prompt works per prompt, the pipeline reloads from disk; the baselines run through diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from xa_lightning.methods.a4a import A4APipeline
from xa_lightning.plugins.ip_adapter import IPAdapterModel, save_ip_adapter

from .conftest import make_module


def _images(pipe, prompts, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    count = len(prompts) * kwargs.get("num_images_per_prompt", 1)
    generator = [torch.Generator().manual_seed(i) for i in range(count)]
    kwargs.setdefault("num_inference_steps", 2)
    if "transformer" in pipe.components:
        kwargs["clean_caption"] = False
    return pipe(prompt=prompts, generator=generator, guidance_scale=3.0, output_type="pt", **kwargs).images


def _face(seed: int = 0, size: int = 40) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8))


def test_scale_zero_is_the_plain_pipeline_and_references_go_per_prompt(upgraded):
    module = make_module(upgraded)
    pipe = A4APipeline(upgraded.pipeline(), module.adapter, module.pta_encoder, module.frozen_pta)
    prompts = ["a portrait", "a portrait"]
    plain = _images(upgraded.pipeline(), prompts)
    assert torch.equal(_images(pipe, prompts, ip_adapter_image=_face(), scale=0.0), plain)
    one_for_all = _images(pipe, prompts, ip_adapter_image=_face())
    assert not torch.allclose(one_for_all, plain, atol=1e-3)
    assert torch.equal(_images(pipe, prompts, ip_adapter_image=[_face(), _face()]), one_for_all)
    per_prompt = _images(pipe, prompts, ip_adapter_image=[_face(), _face(1)])
    assert torch.equal(per_prompt[0], one_for_all[0]) and not torch.equal(per_prompt[1], one_for_all[1])
    assert _images(pipe, ["a portrait"], ip_adapter_image=_face(), num_images_per_prompt=2).shape[0] == 2
    assert not module.injection.condition  # nothing left behind after a call


def test_from_pretrained_reproduces_the_training_modules_pipeline(sdxl, tmp_path):
    module = make_module(sdxl, adapter={"repeats": 1})
    sdxl.save_pretrained(tmp_path / "sdxl")
    module.export_adapter(tmp_path / "adapter")
    module.pta_encoder.encoder.save_pretrained(tmp_path / "image_encoder")
    module.pta_encoder.processor.save_pretrained(tmp_path / "image_encoder")
    save_ip_adapter(module.pta_layout, tmp_path / "ip-adapter_sd15.safetensors")

    loaded = A4APipeline.from_pretrained(
        tmp_path / "sdxl", tmp_path / "adapter", tmp_path / "image_encoder", tmp_path / "ip-adapter_sd15.safetensors"
    )
    reference = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    ours = _images(module.a4a_pipeline(), ["a face"], ip_adapter_image=reference)
    assert torch.allclose(_images(loaded, ["a face"], ip_adapter_image=reference), ours, atol=1e-5)


def test_evaluation_samplers_and_the_diffusers_baselines(sdxl, sd15):
    module = make_module(sdxl, base_backbone=sd15, sampling={"steps": 2, "pta_um": True})
    samplers = module.evaluation_samplers()
    assert list(samplers) == ["a4a", "upgraded", "pta_um", "pta_base"]
    prompts, seeds = ["a face", "a man"], [0, 1]
    references = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    images = {name: sampler(prompts, seeds, references) for name, sampler in samplers.items()}
    for name, batch in images.items():
        size = sd15.resolution if name == "pta_base" else sdxl.resolution
        assert batch.dtype == torch.uint8 and batch.shape == (2, 3, size, size), name
    assert torch.equal(samplers["a4a"](prompts, seeds, references), images["a4a"])  # seeded: reproducible
    assert not torch.equal(images["a4a"], images["upgraded"])
    assert not torch.equal(images["pta_um"], images["upgraded"])
    # lambda 0 turns every image branch off: A4A and diffusers' IP-Adapter give the plain model back
    module.sampling.scale = 0.0
    assert torch.equal(samplers["a4a"](prompts, seeds, references), images["upgraded"])
    assert torch.equal(samplers["pta_um"](prompts, seeds, references), images["upgraded"])
    assert sdxl.denoiser.encoder_hid_proj is None and module.injection.installed  # diffusers' loading undone


@pytest.mark.parametrize("kind", ["plain", "plus"])
def test_from_scratch_variant_and_plus_pta_on_pixart(pixart, kind):
    scratch = make_module(pixart, variant="from_scratch", pta={"kind": kind}, sampling={"steps": 2})
    assert isinstance(scratch.adapter, IPAdapterModel) and scratch.frozen_pta is None
    assert [g["name"] for g in scratch.param_groups()] == ["from_scratch"]
    layer = scratch.injection.layers[0]
    assert torch.equal(scratch.adapter.to_k_ip[0].weight, layer.module.to_k.weight)  # IP-Adapter's init
    a4a = make_module(pixart, pta={"kind": kind}, sampling={"steps": 2})
    assert a4a.frozen_pta.config.kind == kind and a4a.adapter.config.num_tokens == (16 if kind == "plus" else 4)
    references = torch.rand(1, 3, 40, 40)
    for module in (scratch, a4a):
        images = module.evaluation_samplers()[module.variant](["a face"], [0], references)
        assert images.shape == (1, 3, pixart.resolution, pixart.resolution)
