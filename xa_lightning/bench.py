"""xa-bench NAME [args]: benchmarks; each prints one JSON object as its last line of output.

Every JSON object has at least ``benchmark`` and ``device``; a benchmark that compares ours with a
baseline also reports both raw figures and ``ratio`` = baseline cost / our cost (above 1: ours is
faster or smaller).
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from collections.abc import Sequence

from xa_lightning.runtime import device_name

# name -> "module:function(argv)"; each method/area registers its own benchmark here.
BENCHMARKS: dict[str, str] = {
    "backbone": "xa_lightning.bench:backbone_bench",
    "data": "xa_lightning.data.bench:main",
    "fid": "xa_lightning.metrics.bench:main",
    "sun": "xa_lightning.methods.sun.bench:main",
    "x-adapter": "xa_lightning.methods.x_adapter.bench:main",
    "a4a": "xa_lightning.methods.a4a.bench:main",
}


def backbone_bench(argv: Sequence[str]) -> int:
    """Denoiser training step (forward + backward through a frozen model, as adapters need) per family."""
    import torch

    from xa_lightning.backbones import build_backbone

    parser = argparse.ArgumentParser(prog="xa-bench backbone")
    parser.add_argument("--flavour", default=None, help="tiny (default on CPU) or full_shape (default on GPU)")
    parser.add_argument("--families", default="sd15,sdxl,pixart_alpha")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(list(argv))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    flavour = args.flavour or ("full_shape" if device == "cuda" else "tiny")
    dtype = "bf16" if device == "cuda" else "fp32"
    result: dict = {
        "benchmark": "backbone",
        "device": device_name(device),
        "flavour": flavour,
        "batch_size": args.batch_size,
        "families": {},
    }
    for family in args.families.split(","):
        backbone = build_backbone(family, flavour, dtype=dtype, device=device)
        size = backbone.resolution // backbone.vae_scale_factor
        latents = torch.randn(
            args.batch_size,
            backbone.latent_channels,
            size,
            size,
            device=device,
            dtype=backbone.dtype,
            requires_grad=True,
        )
        cond = backbone.encode_text(["a photo of a cat"] * args.batch_size)
        added = backbone.added_cond_kwargs(cond)
        t = torch.full((args.batch_size,), 500, device=device, dtype=torch.long)
        times = []
        for _ in range(args.steps + 1):
            start = time.perf_counter()
            backbone.predict(latents, t, cond, added).float().square().mean().backward()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        result["families"][family] = {
            "step_s": sorted(times[1:])[len(times[1:]) // 2],
            "params_m": sum(p.numel() for p in backbone.denoiser.parameters()) / 1e6,
        }
        del backbone
    print(json.dumps(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: xa-bench NAME [args]   (NAME --help for its options)\nbenchmarks: " + ", ".join(BENCHMARKS))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        from xa_lightning.errors import UserError

        raise UserError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    module_name, _, attr = BENCHMARKS[name].partition(":")
    return int(getattr(importlib.import_module(module_name), attr)(rest) or 0)
