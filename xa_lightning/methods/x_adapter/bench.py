"""``xa-bench x-adapter``: what X-Adapter costs over the upgraded model alone.

Training: one X-Adapter step (base forward + mapper + upgraded forward/backward + AdamW step) against
plain upgraded-model denoising steps on the same cached batch (latents + caption embeddings): forward +
backward to the input (what training anything inside the upgraded model costs; ``ratio``) and a
forward alone (``forward_ratio``); time and peak memory. X-Adapter's backward stops at the first mapped
block, so its step can cost less than a full backward through the upgraded UNet. Inference: two-stage
X-Adapter sampling against the upgraded model's own diffusers pipeline, same steps and CFG. Tiny backbones
on the CPU, ``full_shape`` ones (real architectures, random weights) when a GPU is present.
Prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def peak_memory(device: str) -> Iterator[dict[str, float]]:
    """Peak memory above the level at entry, in MiB: CUDA allocator on GPU; on CPU the sampled process RSS
    after returning freed memory to the OS (glibc ``malloc_trim``), an approximation."""
    result: dict[str, float] = {}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result["peak_mib"] = (torch.cuda.max_memory_allocated() - start) / 2**20
        return
    import psutil

    _release_freed_memory()  # freed blocks back to the OS, so the RSS peak measures this block's allocations
    process = psutil.Process()
    start = process.memory_info().rss
    peak = [start]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            stop.wait(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_mib"] = max(peak[0] - start, 0) / 2**20


def _release_freed_memory() -> None:
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the CPU figure is then a lower bound
        pass


def timed(fn: Callable[[], Any], steps: int, device: str) -> float:
    """Median seconds of ``steps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv: Sequence[str] | None = None) -> int:
    from xa_lightning.backbones import build_backbone
    from xa_lightning.methods.x_adapter.lit_module import XAdapterModule
    from xa_lightning.runtime import device_name

    parser = argparse.ArgumentParser(prog="xa-bench x-adapter", description=__doc__)
    parser.add_argument("--flavour", default=None, help="tiny (default on CPU) or full_shape (default on GPU)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (median reported)")
    parser.add_argument("--sample-steps", type=int, default=None, help="sampling steps (10 tiny, 30 full_shape)")
    parser.add_argument("--alpha", type=float, default=0.8, help="adapter_guidance_start")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args(list(argv or []))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    flavour = args.flavour or ("full_shape" if device == "cuda" else "tiny")
    dtype = "bf16" if device == "cuda" else "fp32"
    sample_steps = args.sample_steps or (10 if flavour == "tiny" else 30)
    # The SDXL VAE overflows in half precision: keep it fp32, as real SDXL training does.
    base = build_backbone("sd15", flavour, dtype=dtype, device=device)
    upgraded = build_backbone("sdxl", flavour, dtype=dtype, vae_dtype="fp32", device=device)
    module = XAdapterModule(
        base_backbone=base,
        upgraded_backbone=upgraded,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-5),
        training={"gradient_checkpointing": args.gradient_checkpointing, "cached_upgraded_latents": True},
        sampling={"steps": sample_steps, "adapter_guidance_start": args.alpha, "guidance_scale": 7.5},
    )
    module.to(device)
    optimizer = module.configure_optimizers()

    size_b, size_u, batch = base.latent_size, upgraded.latent_size, args.batch_size
    generator = torch.Generator(device="cpu").manual_seed(0)
    captions = ["a photograph of an astronaut riding a horse"] * batch
    with torch.no_grad():
        cached = {
            "latents": torch.randn(batch, 4, size_b, size_b, generator=generator).to(device, base.dtype),
            f"latents_{upgraded.resolution}": torch.randn(batch, 4, size_u, size_u, generator=generator).to(
                device, upgraded.dtype
            ),
            "prompt_embeds": base.encode_text(captions).prompt_embeds,
            "caption": captions,
        }
        cond = upgraded.encode_text(captions)
        added = upgraded.added_cond_kwargs(cond)

    def x_adapter_step() -> None:
        loss, _ = module.compute_loss(cached)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    latents = cached[f"latents_{upgraded.resolution}"]
    t = torch.full((batch,), 500, device=device, dtype=torch.long)

    def plain_step() -> None:
        noisy = latents.detach().clone().requires_grad_(True)  # gradients through the frozen model, as adapters need
        prediction = upgraded.predict(noisy, t, cond, added)
        torch.nn.functional.mse_loss(prediction.float(), torch.zeros_like(prediction, dtype=torch.float32)).backward()

    def forward_only() -> None:
        with torch.no_grad():
            upgraded.predict(latents, t, cond, added)

    if args.gradient_checkpointing:
        upgraded.denoiser.enable_gradient_checkpointing()
    for warm_up in (plain_step, x_adapter_step, forward_only):  # allocator / RSS reach their working size
        warm_up()
    gc.collect()
    with peak_memory(device) as plain_memory:
        plain_s = timed(plain_step, args.steps, device)
    gc.collect()
    with peak_memory(device) as xa_memory:
        x_adapter_s = timed(x_adapter_step, args.steps, device)
    gc.collect()
    with peak_memory(device) as forward_memory:
        forward_s = timed(forward_only, args.steps, device)

    prompts, seeds = ["a photograph of an astronaut riding a horse"], [0]
    with torch.no_grad():
        two_stage_s = timed(lambda: module.sample_x_adapter(prompts, seeds), 1, device)
        upgraded_s = timed(lambda: module.sample_upgraded(prompts, seeds), 1, device)

    result = {
        "benchmark": "x-adapter",
        "device": device_name(device),
        "flavour": flavour,
        "dtype": dtype,
        "batch_size": batch,
        "gradient_checkpointing": args.gradient_checkpointing,
        "mapper_params_m": sum(p.numel() for p in module.adapter.parameters()) / 1e6,
        "train_step_s": {"x_adapter": x_adapter_s, "upgraded_forward_backward": plain_s, "upgraded_forward": forward_s},
        # CUDA: allocator peak; CPU: sampled process RSS above the level at start (approximate)
        "train_peak_mib": {
            "x_adapter": xa_memory["peak_mib"],
            "upgraded_forward_backward": plain_memory["peak_mib"],
            "upgraded_forward": forward_memory["peak_mib"],
        },
        "sampling": {
            "steps": sample_steps,
            "adapter_guidance_start": args.alpha,
            "guidance_scale": 7.5,
            "x_adapter_two_stage_s": two_stage_s,
            "upgraded_only_s": upgraded_s,
        },
        # baseline cost / our cost (below 1: X-Adapter costs more than the upgraded model alone)
        "ratio": plain_s / x_adapter_s,
        "forward_ratio": forward_s / x_adapter_s,
        "memory_ratio": plain_memory["peak_mib"] / xa_memory["peak_mib"] if xa_memory["peak_mib"] else None,
        "sampling_ratio": upgraded_s / two_stage_s,
    }
    print(json.dumps(result))
    return 0
