"""``xa-bench a4a``: what A4A costs on top of the upgraded model, both measured in one process.

* inference: seconds per image of the A4A pipeline (reference encoding, PTA, A4A modules, image branch in
  every cross-attention layer) vs the plain upgraded model's pipeline at the same steps, CFG and size;
* training: one A4A step (image features -> PTA -> A4A -> the upgraded model's forward and backward) vs a
  forward and backward of the plain upgraded model on the same latents and text.

``ratio`` = plain / A4A (below 1: A4A's overhead). No base model runs in either, by design. Random weights
(tiny on the CPU, the real shapes on a GPU: ``full_shape``); JSON as the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence

import torch


def _median_seconds(work: Callable[[], object], repeats: int, device: str) -> float:
    work()  # warm-up (allocations, kernels)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: Sequence[str]) -> int:
    from xa_lightning.backbones import build_backbone
    from xa_lightning.methods.a4a.lit_module import A4AModule
    from xa_lightning.runtime import device_name
    from xa_lightning.training.utils import generators

    parser = argparse.ArgumentParser(prog="xa-bench a4a")
    parser.add_argument("--family", default="sdxl", choices=("sdxl", "pixart_alpha"), help="the upgraded model")
    parser.add_argument("--flavour", default=None, help="tiny (default on CPU) or full_shape (default on GPU)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps of both pipelines")
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pta", default="plain", choices=("plain", "plus"), help="the random PTA's projection")
    args = parser.parse_args(list(argv))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    flavour = args.flavour or ("full_shape" if device == "cuda" else "tiny")
    dtype = "bf16" if device == "cuda" else "fp32"

    backbone = build_backbone(args.family, flavour, dtype=dtype, device=device)
    module = A4AModule(upgraded_backbone=backbone, pta={"kind": args.pta}, sampling={"steps": args.steps})
    module.to(device)
    batch, resolution = args.batch_size, backbone.resolution
    prompts = ["a portrait photo of a person, studio light"] * batch
    references = torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale, height=resolution, width=resolution)
    a4a_pipe, plain_pipe = module.a4a_pipeline(), backbone.pipeline()
    for pipe in (a4a_pipe, plain_pipe):
        pipe.set_progress_bar_config(disable=True)
    if args.family == "pixart_alpha":
        call["clean_caption"] = False

    def a4a_inference() -> object:
        with torch.no_grad():
            return a4a_pipe(prompts, ip_adapter_image=references, generator=generators(range(batch)), **call)

    def plain_inference() -> object:
        with torch.no_grad():
            return plain_pipe(prompt=prompts, generator=generators(range(batch)), **call)

    # training: the same latents, timesteps and text for both; only the image branch differs
    size = resolution // backbone.vae_scale_factor
    latents = torch.randn(batch, backbone.latent_channels, size, size, device=device, dtype=backbone.dtype)
    with torch.no_grad():
        cond = backbone.encode_text(prompts)
    added = backbone.added_cond_kwargs(cond)
    timesteps = torch.full((batch,), 500, device=device, dtype=torch.long)

    def a4a_step() -> None:
        keys, values = module.image_keys_values(module.image_features(references))
        condition = module.injection.condition_for(keys, values)
        prediction = backbone.predict(
            latents, timesteps, cond, added, cross_attention_kwargs={"ip_hidden_states": condition}
        )
        prediction.float().square().mean().backward()
        module.adapter.zero_grad(set_to_none=True)

    def plain_step() -> None:
        noisy = latents.detach().requires_grad_(True)  # frozen model: the input carries the gradient
        backbone.predict(noisy, timesteps, cond, added).float().square().mean().backward()

    a4a_seconds = _median_seconds(a4a_inference, args.repeats, device) / batch
    plain_seconds = _median_seconds(plain_inference, args.repeats, device) / batch
    a4a_train = _median_seconds(a4a_step, args.repeats, device)
    plain_train = _median_seconds(plain_step, args.repeats, device)
    result = {
        "benchmark": "a4a",
        "device": device_name(device),
        "family": args.family,
        "flavour": flavour,
        "pta": args.pta,
        "batch_size": batch,
        "steps": args.steps,
        "inference": {
            "a4a_s_per_image": a4a_seconds,
            "upgraded_s_per_image": plain_seconds,
            "ratio": plain_seconds / a4a_seconds,
        },
        "training": {"a4a_step_s": a4a_train, "upgraded_step_s": plain_train, "ratio": plain_train / a4a_train},
        "adapter_params_m": sum(p.numel() for p in module.adapter.parameters()) / 1e6,
        "ratio": plain_seconds / a4a_seconds,
    }
    print(json.dumps(result))
    return 0
