"""``xa-bench data``: can the data keep up with training?

Reports decoded samples/s per worker for the LAION loader (WebDataset shards -> decode -> crop ->
tensors), samples/s reading the latent cache, and a tiny-backbone training step time beside them (the
samples/s training consumes). Uses the demo shards unless ``--urls`` points at real ones. The last
line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def _loader_rate(loader: Any) -> dict[str, float]:
    """Samples/s over one epoch of ``loader``, after its first batch (worker start-up is not counted)."""
    iterator = iter(loader)
    next(iterator)
    samples, start = 0, time.perf_counter()
    for batch in iterator:
        samples += len(batch["caption"])
    elapsed = time.perf_counter() - start
    return {"samples": samples, "seconds": elapsed, "samples_per_s": samples / elapsed if elapsed > 0 else 0.0}


def laion_rate(
    urls: Sequence[str] | str, workers: int, batches: int, batch_size: int, resolution: int, filters: dict | None = None
) -> dict[str, float]:
    from xa_lightning.data import LaionDataModule

    datamodule = LaionDataModule(
        urls=urls,
        resolution=resolution,
        batch_size=batch_size,
        num_workers=workers,
        epoch_samples=(batches + 1) * batch_size,
        val_fraction=0.0,
        shuffle_buffer=64,
        filters=filters or {},
        log_counts=False,
        persistent_workers=False,
    )
    datamodule.setup()
    result = _loader_rate(datamodule.train_dataloader())
    result["samples_per_s_per_worker"] = result["samples_per_s"] / max(1, workers)
    result["workers"] = workers
    return result


def main(argv: Sequence[str] | None = None) -> None:
    from xa_lightning.runtime import device_name

    parser = argparse.ArgumentParser(prog="xa-bench data", description=__doc__.splitlines()[0])
    parser.add_argument("--urls", default=None, help="LAION shards (brace pattern); default: the demo shards")
    parser.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--batches", type=int, default=8, help="batches timed per measurement")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--backbone", default="sd15", help="tiny backbone family for the cache and the step time")
    parser.add_argument("--no-cache", action="store_true", help="skip the cache measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(list(argv or []))
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("xa_lightning.data").setLevel(logging.ERROR)  # per-reason warnings would clutter

    result: dict[str, Any] = {
        "benchmark": "data",
        "device": device_name("cpu"),
        "batch_size": args.batch_size,
        "resolution": args.resolution,
    }
    with tempfile.TemporaryDirectory(prefix="xa-bench-data-") as tmp:
        tmp_path = Path(tmp)
        urls = args.urls
        if urls is None:
            from xa_lightning.data.demo import build_laion_demo

            root = build_laion_demo(tmp_path / "laion", num_shards=2, per_shard=24)
            urls = sorted(str(p) for p in root.glob("*.tar"))
            result["source"] = "demo shards"
        else:
            result["source"] = urls
        result["laion"] = {
            str(w): laion_rate(urls, int(w), args.batches, args.batch_size, args.resolution)
            for w in args.workers.split(",")
        }
        result["laion_samples_per_s_per_worker"] = max(r["samples_per_s_per_worker"] for r in result["laion"].values())

        step = _train_step(args.backbone, args.batch_size, args.resolution)
        if step is not None:
            result["train_step_s"] = step
            result["train_samples_per_s"] = args.batch_size / step
        if not args.no_cache:
            cache = _cache_rate(tmp_path, urls, args)
            if cache is not None:
                result["cache"] = cache
                result["cache_samples_per_s"] = cache["samples_per_s"]
        if "train_samples_per_s" in result:
            best_loader = max(r["samples_per_s"] for r in result["laion"].values())
            result["workers_needed"] = result["train_samples_per_s"] / max(
                result["laion_samples_per_s_per_worker"], 1e-9
            )
            result["data_keeps_up"] = best_loader >= result["train_samples_per_s"]
    print(json.dumps(result))


def _train_step(family: str, batch_size: int, resolution: int) -> float | None:
    """Median forward+backward time of the tiny denoiser at this batch size and resolution."""
    try:
        from xa_lightning.backbones import build_backbone
    except ImportError:
        return None
    backbone = build_backbone(family, "tiny")
    size = resolution // backbone.vae_scale_factor
    latents = torch.randn(batch_size, backbone.latent_channels, size, size, requires_grad=True)
    cond = backbone.encode_text(["a photo"] * batch_size)
    added = backbone.added_cond_kwargs(cond)
    t = torch.full((batch_size,), 500, dtype=torch.long)
    times = []
    for _ in range(4):
        start = time.perf_counter()
        backbone.predict(latents, t, cond, added).float().square().mean().backward()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def _cache_rate(tmp_path: Path, urls: Any, args: argparse.Namespace) -> dict[str, float] | None:
    try:
        from xa_lightning.backbones import build_backbone
    except ImportError:
        return None
    from xa_lightning.data import LaionDataModule
    from xa_lightning.data.cache import build_cache

    spec = {"family": args.backbone, "flavour": "tiny"}
    cache = {
        "enabled": False,
        "dir": str(tmp_path / "cache"),
        "backbone": spec,
        "dtype": "fp16",
        "shard_size": 64,
        "splits": ["train"],
    }
    from xa_lightning.data.laion import expand_urls

    first_shard = expand_urls(urls)[:1]  # encoding is not what is measured: keep it short
    datamodule = LaionDataModule(
        urls=first_shard,
        resolution=args.resolution,
        batch_size=args.batch_size,
        num_workers=0,
        val_fraction=0.0,
        filters={},
        log_counts=False,
        cache=cache,
        epoch_samples=(args.batches + 1) * args.batch_size,
    )
    build_cache(datamodule, spec, build_backbone(args.backbone, "tiny"), progress=False)
    cache["enabled"] = True
    reader = LaionDataModule(
        urls=first_shard,
        resolution=args.resolution,
        batch_size=args.batch_size,
        num_workers=0,
        val_fraction=0.0,
        filters={},
        log_counts=False,
        cache=cache,
    )
    reader.setup()
    return _loader_rate(reader.train_dataloader())


if __name__ == "__main__":
    main()
