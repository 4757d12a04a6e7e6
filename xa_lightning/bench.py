"""xa-bench NAME [args]: benchmarks; each prints one JSON object as its last line of output.

Every JSON object has at least ``benchmark`` and ``device``; a benchmark that compares ours with a
baseline also reports both raw figures and ``ratio`` = baseline cost / our cost (above 1: ours is
faster or smaller).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

from xa_lightning.benchmarking import default_device, device_name

# name -> "module:function(argv)"; each method/area registers its own benchmark here.
BENCHMARKS: dict[str, str] = {
    "a4a": "xa_lightning.methods.a4a.bench:main",
    "backbone": "xa_lightning.bench:backbone_bench",
    "data": "xa_lightning.data.bench:main",
    "fid": "xa_lightning.metrics.bench:main",
    "sun": "xa_lightning.methods.sun.bench:main",
    "x-adapter": "xa_lightning.methods.x_adapter.bench:main",
    "all": "xa_lightning.bench:all_bench",
}
# What ``xa-bench all`` runs, in order: cheap first, each with its defaults (tiny models on a CPU, the full-shape
# models too where a GPU is present).
ALL_ORDER = ("backbone", "data", "sun", "x-adapter", "a4a", "fid")


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


def all_bench(argv: Sequence[str]) -> int:
    """Every benchmark with its defaults, one after another in this process; one summary JSON object (each
    benchmark's own last line under its name; a benchmark that fails is reported and the others still run)."""
    parser = argparse.ArgumentParser(prog="xa-bench all", description=all_bench.__doc__)
    parser.add_argument("--only", default=",".join(ALL_ORDER), help="comma list of benchmarks (default: all)")
    args = parser.parse_args(list(argv))
    names = [name for name in args.only.split(",") if name]
    unknown = [name for name in names if name not in ALL_ORDER]
    if unknown:
        from xa_lightning.errors import UserError

        raise UserError(f"xa-bench all --only: unknown benchmark {unknown[0]!r}; choose from {', '.join(ALL_ORDER)}")
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for name in names:
        start = time.perf_counter()
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured):
                code = main([name])
            lines = [line for line in captured.getvalue().splitlines() if line.strip()]
            results[name] = json.loads(lines[-1]) if code == 0 and lines else {"error": f"exit status {code}"}
        except Exception as exc:  # one failing benchmark must not hide the others' figures
            traceback.print_exc(file=sys.stderr)
            results[name] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        seconds[name] = round(time.perf_counter() - start, 1)
        sys.stdout.write(captured.getvalue())
        print(f"xa-bench all: {name} done in {seconds[name]} s", file=sys.stderr, flush=True)
    failed = sorted(name for name, result in results.items() if "error" in result)
    summary = {
        "benchmark": "all",
        "device": device_name(default_device()),
        "seconds": seconds,
        "failed": failed,
        "results": results,
    }
    print(json.dumps(summary))
    return 1 if failed else 0


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
