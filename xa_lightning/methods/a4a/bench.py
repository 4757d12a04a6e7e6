"""``xa-bench a4a``: what A4A costs on top of the upgraded model, both measured side by side in one process.

* inference: seconds per image of the A4A pipeline (reference encoding, PTA, A4A modules, image branch in every
  cross-attention layer) vs the plain upgraded model's pipeline at the same steps, CFG and size (``ratio`` =
  plain / A4A; the paper's claim is a small overhead: target >= 1 / 1.1);
* training: one A4A step (``compute_loss`` on a cached batch: image features -> PTA -> A4A -> the upgraded
  model's forward and backward, AdamW step) vs a forward and backward of the plain upgraded model on the same
  latents and text (``train_ratio``), and the peak memory of each (``memory_ratio``);
* levers (``--levers``): each switched on and off from the base settings with the rest unchanged: ``bf16``
  (frozen models in bf16, the adapter and the loss in fp32), ``sdpa`` (fused attention vs the plain math),
  ``channels_last``, ``gradient_checkpointing`` (in the upgraded model), ``compile`` (``torch.compile`` of the
  frozen denoiser; minutes of compilation on a CPU, so not among the CPU defaults). ``effect`` = off / on:
  above 1 the lever saves that much time or memory.

No base model runs, by design. Random weights: tiny on the CPU; ``--flavour full_shape`` is the real
architecture (SDXL: 2.6 B parameters; ``--resolution 256 --dtype bf16`` keeps a CPU step to seconds and the
process to ~17 GB, most of it A4A's 325 M-parameter fp32 adapter with its AdamW state beside SDXL).
JSON as the last line.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Sequence
from typing import Any

import torch

from xa_lightning.benchmarking import (
    LEVERS,
    compare_levers,
    default_device,
    median_seconds,
    parse_levers,
    peak_memory_mib,
)

INFERENCE_TARGET = 1 / 1.1  # A4A inference at most 1.1x the plain upgraded model's


def measure(args: argparse.Namespace, device: str, settings: dict[str, Any]) -> dict[str, float]:
    """Inference and training figures of A4A and of the plain upgraded model, built with ``settings``."""
    from xa_lightning.backbones import build_backbone
    from xa_lightning.methods.a4a.lit_module import A4AModule
    from xa_lightning.training.utils import generators

    backbone = build_backbone(
        args.family,
        args.flavour,
        dtype=settings["dtype"],
        vae_dtype="fp32" if args.family == "sdxl" else None,  # the SDXL VAE overflows in half precision
        device=device,
        attention=settings["attention"],
        channels_last=settings["channels_last"],
        compile=settings["compile"],
    )
    module = A4AModule(
        upgraded_backbone=backbone,
        pta={"kind": args.pta},
        sampling={"steps": args.steps},
        training={"gradient_checkpointing": settings["gradient_checkpointing"]},
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-5),
    )
    module.to(device).train()
    optimizer = module.configure_optimizers()
    batch, resolution = args.batch_size, args.resolution or backbone.resolution
    prompts = ["a portrait photo of a person, studio light"] * batch
    generator = torch.Generator().manual_seed(0)
    references = torch.rand(batch, 3, 224, 224, generator=generator).to(device)

    # training: a cached batch (latents + text), as with the data cache; only the image branch differs
    size = resolution // backbone.vae_scale_factor
    latents = torch.randn(batch, backbone.latent_channels, size, size, generator=generator).to(device)
    with torch.no_grad():
        cond = backbone.encode_text(prompts)
    sizes = torch.tensor([[resolution, resolution]] * batch, device=device)
    cached = {"latents": latents, "prompt_embeds": cond.prompt_embeds, "reference": references, "caption": prompts}
    cached |= {"original_size": sizes, "target_size": sizes, "crop_top_left": torch.zeros_like(sizes)}
    if cond.pooled_prompt_embeds is not None:
        cached["pooled_prompt_embeds"] = cond.pooled_prompt_embeds
    if cond.attention_mask is not None:
        cached["prompt_attention_mask"] = cond.attention_mask
    added = backbone.added_cond_kwargs(cond, original_size=sizes, target_size=sizes)
    timesteps = torch.full((batch,), 500, device=device, dtype=torch.long)

    def a4a_step() -> None:
        loss, _ = module.compute_loss(cached)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def plain_step() -> None:
        noisy = latents.detach().clone().requires_grad_(True)  # frozen model: the input carries the gradient
        backbone.predict(noisy, timesteps, cond, added).float().square().mean().backward()

    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale, height=resolution, width=resolution)
    if args.family == "pixart_alpha":
        call["clean_caption"] = False
    a4a_pipe, plain_pipe = module.a4a_pipeline(), backbone.pipeline()
    for pipe in (a4a_pipe, plain_pipe):
        pipe.set_progress_bar_config(disable=True)

    def a4a_inference() -> object:
        with torch.no_grad():
            return a4a_pipe(prompts, ip_adapter_image=references, generator=generators(range(batch)), **call)

    def plain_inference() -> object:
        with torch.no_grad():
            return plain_pipe(prompt=prompts, generator=generators(range(batch)), **call)

    repeats, warmup = args.repeats, args.warmup
    figures = {
        "a4a_s_per_image": median_seconds(a4a_inference, repeats, device, warmup) / batch,
        "upgraded_s_per_image": median_seconds(plain_inference, repeats, device, warmup) / batch,
        "a4a_step_s": median_seconds(a4a_step, repeats, device, warmup),
        "upgraded_step_s": median_seconds(plain_step, repeats, device, warmup),
        "a4a_step_peak_mib": peak_memory_mib(a4a_step, device),
        "upgraded_step_peak_mib": peak_memory_mib(plain_step, device),
    }
    figures["adapter_params_m"] = sum(p.numel() for p in module.adapter.parameters()) / 1e6
    figures["resolution"] = resolution
    return figures


def main(argv: Sequence[str]) -> int:
    from xa_lightning.runtime import device_name

    parser = argparse.ArgumentParser(prog="xa-bench a4a", description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sdxl", choices=("sdxl", "pixart_alpha"), help="the upgraded model")
    parser.add_argument("--flavour", default=None, help="tiny (default on CPU) or full_shape (default on GPU)")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: the backbone's native)")
    parser.add_argument("--dtype", default=None, help="frozen models' dtype (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps of both pipelines")
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--levers", default="default", help=f"default, none or a comma list of {', '.join(LEVERS)}")
    parser.add_argument("--pta", default="plain", choices=("plain", "plus"), help="the random PTA's projection")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args(list(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device()
    args.flavour = args.flavour or ("full_shape" if device == "cuda" else "tiny")
    base = {
        "dtype": args.dtype or ("bf16" if device == "cuda" else "fp32"),
        "attention": "sdpa",
        "channels_last": False,
        "compile": False,
        "gradient_checkpointing": False,
    }
    levers = parse_levers(args.levers, device)
    table = compare_levers(lambda settings: measure(args, device, settings), base, levers)
    figures = table["base"]
    inference_ratio = figures["upgraded_s_per_image"] / figures["a4a_s_per_image"]
    result = {
        "benchmark": "a4a",
        "device": device_name(device),
        "family": args.family,
        "flavour": args.flavour,
        "resolution": figures["resolution"],
        "pta": args.pta,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "settings": base,
        "adapter_params_m": figures["adapter_params_m"],
        "inference": {
            "a4a_s_per_image": figures["a4a_s_per_image"],
            "upgraded_s_per_image": figures["upgraded_s_per_image"],
            "ratio": inference_ratio,
        },
        "training": {
            "a4a_step_s": figures["a4a_step_s"],
            "upgraded_step_s": figures["upgraded_step_s"],
            "ratio": figures["upgraded_step_s"] / figures["a4a_step_s"],
        },
        # CUDA: allocator peak; CPU: the profiler's tensor allocations (both above the level before the step)
        "peak_memory_mib": {
            "a4a_step": figures["a4a_step_peak_mib"],
            "upgraded_step": figures["upgraded_step_peak_mib"],
        },
        "memory_ratio": figures["upgraded_step_peak_mib"] / max(figures["a4a_step_peak_mib"], 1e-9),
        "levers": table["levers"],
        "ratio": inference_ratio,
        "target": INFERENCE_TARGET,
        "meets_target": inference_ratio >= INFERENCE_TARGET,
        "train_ratio": figures["upgraded_step_s"] / figures["a4a_step_s"],
    }
    print(json.dumps(result))
    return 0
