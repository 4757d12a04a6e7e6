"""``xa-bench x-adapter``: what X-Adapter costs over the upgraded model alone.

Training: one X-Adapter step (base forward + mapper + upgraded forward/backward + AdamW step) against
plain upgraded-model denoising steps on the same cached batch (latents + caption embeddings): forward +
backward to the input (what training anything inside the upgraded model costs; ``ratio``; the paper's claim:
at most 1.3x, one extra no-grad base forward at half the resolution) and a forward alone (``forward_ratio``);
time and peak memory. X-Adapter's backward stops at the first mapped block, so its step can cost less than a
full backward through the upgraded UNet. Inference: two-stage X-Adapter sampling against the upgraded model's
own diffusers pipeline, same steps and CFG, at the native sizes (``--sample-steps 0`` skips it).

Levers (``--levers``), each switched on and off from the base settings with the rest unchanged: ``bf16``
(frozen models in bf16, the mapper and the loss in fp32), ``sdpa`` (fused attention vs the plain math),
``channels_last``, ``gradient_checkpointing`` (upgraded UNet and mapper), ``compile`` (``torch.compile`` of
the frozen denoisers; minutes of compilation on a CPU, so not among the CPU defaults). ``effect`` = off / on:
above 1 the lever saves that factor of time or memory.

Tiny backbones on the CPU, ``full_shape`` ones (real architectures, random weights) when a GPU is present;
``--flavour full_shape --resolution 256 --dtype bf16`` measures the real architectures on a CPU (SDXL at
256 px, SD1.5 at 128 px; ~15 GB). Prints one JSON object as the last line.
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

TRAIN_TARGET = 1 / 1.3  # the X-Adapter step at most 1.3x the plain upgraded forward-backward


def measure(args: argparse.Namespace, device: str, settings: dict[str, Any]) -> dict[str, float]:
    """Training (and, with ``--sample-steps``, sampling) figures of X-Adapter and the plain upgraded model."""
    from xa_lightning.backbones import build_backbone
    from xa_lightning.methods.x_adapter.lit_module import XAdapterModule

    levers = {key: settings[key] for key in ("attention", "channels_last", "compile")}
    base = build_backbone("sd15", args.flavour, dtype=settings["dtype"], device=device, **levers)
    # The SDXL VAE overflows in half precision: keep it fp32, as real SDXL training does.
    upgraded = build_backbone("sdxl", args.flavour, dtype=settings["dtype"], vae_dtype="fp32", device=device, **levers)
    module = XAdapterModule(
        base_backbone=base,
        upgraded_backbone=upgraded,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-5),
        training={"gradient_checkpointing": settings["gradient_checkpointing"], "cached_upgraded_latents": True},
        sampling={"steps": args.sample_steps or 10, "adapter_guidance_start": args.alpha, "guidance_scale": 7.5},
    )
    module.to(device).train()
    optimizer = module.configure_optimizers()

    resolution = args.resolution or upgraded.resolution
    base_resolution = args.base_resolution or resolution * base.resolution // upgraded.resolution
    size_b, size_u = base_resolution // base.vae_scale_factor, resolution // upgraded.vae_scale_factor
    batch = args.batch_size
    generator = torch.Generator(device="cpu").manual_seed(0)
    captions = ["a photograph of an astronaut riding a horse"] * batch
    sizes = torch.tensor([[resolution, resolution]] * batch, device=device)
    with torch.no_grad():
        cached = {
            "latents": torch.randn(batch, 4, size_b, size_b, generator=generator).to(device, base.dtype),
            f"latents_{resolution}": torch.randn(batch, 4, size_u, size_u, generator=generator).to(
                device, upgraded.dtype
            ),
            f"target_size_{resolution}": sizes,
            "original_size": sizes,
            "prompt_embeds": base.encode_text(captions).prompt_embeds,
            "caption": captions,
        }
        cond = upgraded.encode_text(captions)
        added = upgraded.added_cond_kwargs(cond, original_size=sizes, target_size=sizes)

    def x_adapter_step() -> None:
        loss, _ = module.compute_loss(cached)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    latents = cached[f"latents_{resolution}"]
    t = torch.full((batch,), 500, device=device, dtype=torch.long)

    def plain_step() -> None:
        noisy = latents.detach().clone().requires_grad_(True)  # gradients through the frozen model, as adapters need
        prediction = upgraded.predict(noisy, t, cond, added)
        torch.nn.functional.mse_loss(prediction.float(), torch.zeros_like(prediction, dtype=torch.float32)).backward()

    def forward_only() -> None:
        with torch.no_grad():
            upgraded.predict(latents, t, cond, added)

    repeats, warmup = args.steps, args.warmup
    figures = {
        "upgraded_forward_backward_s": median_seconds(plain_step, repeats, device, warmup),
        "x_adapter_step_s": median_seconds(x_adapter_step, repeats, device, warmup),
        "upgraded_forward_s": median_seconds(forward_only, repeats, device, warmup),
        # CUDA: allocator peak; CPU: the profiler's tensor allocations (both above the level before the step)
        "upgraded_forward_backward_peak_mib": peak_memory_mib(plain_step, device),
        "x_adapter_step_peak_mib": peak_memory_mib(x_adapter_step, device),
        "upgraded_forward_peak_mib": peak_memory_mib(forward_only, device),
        "mapper_params_m": sum(p.numel() for p in module.adapter.parameters()) / 1e6,
        "resolution": resolution,
        "base_resolution": base_resolution,
    }
    if args.sample_steps:
        prompts, seeds = ["a photograph of an astronaut riding a horse"], [0]
        with torch.no_grad():
            figures["x_adapter_two_stage_s"] = median_seconds(
                lambda: module.sample_x_adapter(prompts, seeds), 1, device
            )
            figures["upgraded_only_s"] = median_seconds(lambda: module.sample_upgraded(prompts, seeds), 1, device)
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    from xa_lightning.runtime import device_name

    parser = argparse.ArgumentParser(prog="xa-bench x-adapter", description=__doc__.splitlines()[0])
    parser.add_argument("--flavour", default=None, help="tiny (default on CPU) or full_shape (default on GPU)")
    parser.add_argument("--resolution", type=int, default=None, help="the upgraded model's pixels (default: native)")
    parser.add_argument("--base-resolution", type=int, default=None, help="the base model's (default: in proportion)")
    parser.add_argument("--dtype", default=None, help="frozen models' dtype (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--sample-steps", type=int, default=None, help="sampling steps (10 tiny, 30 full_shape; 0: none)"
    )
    parser.add_argument("--alpha", type=float, default=0.8, help="adapter_guidance_start")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on in the base settings")
    parser.add_argument("--levers", default="default", help=f"default, none or a comma list of {', '.join(LEVERS)}")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args(list(argv or []))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device()
    args.flavour = args.flavour or ("full_shape" if device == "cuda" else "tiny")
    if args.sample_steps is None:
        args.sample_steps = 10 if args.flavour == "tiny" else 30
    base_settings = {
        "dtype": args.dtype or ("bf16" if device == "cuda" else "fp32"),
        "attention": "sdpa",
        "channels_last": False,
        "compile": False,
        "gradient_checkpointing": args.gradient_checkpointing,
    }
    table = compare_levers(
        lambda settings: measure(args, device, settings), base_settings, parse_levers(args.levers, device)
    )
    figures = table["base"]
    plain_s, x_adapter_s, forward_s = (
        figures["upgraded_forward_backward_s"],
        figures["x_adapter_step_s"],
        figures["upgraded_forward_s"],
    )
    ratio = plain_s / x_adapter_s
    result = {
        "benchmark": "x-adapter",
        "device": device_name(device),
        "flavour": args.flavour,
        "dtype": base_settings["dtype"],
        "resolution": figures["resolution"],
        "base_resolution": figures["base_resolution"],
        "batch_size": args.batch_size,
        "gradient_checkpointing": args.gradient_checkpointing,
        "settings": base_settings,
        "mapper_params_m": figures["mapper_params_m"],
        "train_step_s": {"x_adapter": x_adapter_s, "upgraded_forward_backward": plain_s, "upgraded_forward": forward_s},
        "train_peak_mib": {
            "x_adapter": figures["x_adapter_step_peak_mib"],
            "upgraded_forward_backward": figures["upgraded_forward_backward_peak_mib"],
            "upgraded_forward": figures["upgraded_forward_peak_mib"],
        },
        # baseline cost / our cost (below 1: X-Adapter costs more than the upgraded model alone)
        "ratio": ratio,
        "target": TRAIN_TARGET,
        "meets_target": ratio >= TRAIN_TARGET,
        "forward_ratio": forward_s / x_adapter_s,
        "memory_ratio": figures["upgraded_forward_backward_peak_mib"] / max(figures["x_adapter_step_peak_mib"], 1e-9),
        "levers": table["levers"],
    }
    if args.sample_steps:
        result["sampling"] = {
            "steps": args.sample_steps,
            "adapter_guidance_start": args.alpha,
            "guidance_scale": 7.5,
            "x_adapter_two_stage_s": figures["x_adapter_two_stage_s"],
            "upgraded_only_s": figures["upgraded_only_s"],
        }
        result["sampling_ratio"] = figures["upgraded_only_s"] / figures["x_adapter_two_stage_s"]
    print(json.dumps(result))
    return 0
