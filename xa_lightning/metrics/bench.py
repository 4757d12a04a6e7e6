"""``xa-bench fid``: our FID vs clean-fid's folder computation (same weights, same images), and memory.

Throughput: two folders of N images; ours = streaming statistics (clean resize + Inception) + our
Frechet distance; baseline = clean-fid's own folder path (``get_folder_features`` on both folders +
``frechet_distance``, i.e. ``compute_fid(fdir1, fdir2)``). ``ratio`` = clean-fid seconds / ours.

Preprocessing: clean-fid's "clean" resize of ``--preprocess-images`` generated-size images (512 and 1024
px), one image at a time on the main thread (clean-fid's per-image path, what we did before) vs ours
(the batch on the worker pool); same function, so equal outputs (checked); the best of 3 runs each.

Memory: the metric's state after 1k vs 10k images. Generating and embedding 10k images takes hours
on a CPU, so the state is fed synthetic 2048-d feature batches (``update_features``), which is all
the state ever sees; the JSON says so. Last line of output: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TARGET_RATIO = 1.0  # our streaming FID at least as fast as clean-fid's folder computation


def _write_images(folder: Path, count: int, seed: int, size: int = 128) -> None:
    import numpy as np
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.hubble_deep_field()]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        photo = photos[int(rng.integers(len(photos)))]
        side = int(min(photo.shape[:2]) * rng.uniform(0.3, 0.9))
        top, left = rng.integers(0, photo.shape[0] - side + 1), rng.integers(0, photo.shape[1] - side + 1)
        crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.BICUBIC)
        noisy = np.clip(np.asarray(crop, dtype=np.float32) + rng.normal(0, 8, (size, size, 3)), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(folder / f"{index:05d}.png")


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _state_bytes(metric: Any) -> int:
    total = 0
    for name in metric._defaults:
        value = getattr(metric, name)
        for tensor in value if isinstance(value, list) else [value]:
            total += tensor.numel() * tensor.element_size()
    return total


def _memory(counts: Sequence[int], device: str, batch: int = 250) -> dict[str, Any]:
    import torch

    from xa_lightning.metrics.fid import FrechetInceptionDistance, InceptionStatistics

    results: dict[str, Any] = {}
    for count in counts:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        sizes = [min(batch, count - done) for done in range(0, count, batch)]
        start = time.perf_counter()
        reals = InceptionStatistics(feature_extractor=lambda x: x, keep_features_up_to=1024).to(device)
        generator = torch.Generator(device=device).manual_seed(count)
        for size in sizes:
            reals.update_features(torch.rand(size, 2048, generator=generator, device=device))
        metric = FrechetInceptionDistance(feature_extractor=lambda x: x, reference=reals.statistics()).to(device)
        generator = torch.Generator(device=device).manual_seed(count)  # the same features, shifted
        for size in sizes:
            metric.update_features(torch.rand(size, 2048, generator=generator, device=device) * 0.9 + 0.05)
        update_seconds = time.perf_counter() - start
        rss_after_updates = _rss_mb()
        value = float(metric.compute())
        entry = {
            "state_mb": round((_state_bytes(reals) + _state_bytes(metric)) / 2**20, 1),
            "rss_after_updates_mb": round(rss_after_updates, 1),
            "rss_after_compute_mb": round(_rss_mb(), 1),
            "update_features_per_s": round(2 * count / update_seconds, 1),
            "fid": value,
        }
        if device.startswith("cuda"):
            entry["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        results[str(count)] = entry
        del metric, reals
    return results


def _best_of(repeats: int, function: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """The fastest of ``repeats`` runs (seconds) and its result: the least disturbed by other jobs."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function(*args)
        best = min(best, time.perf_counter() - start)
    return best, result


def _preprocessing(extractor: Any, count: int, sizes: Sequence[int] = (512, 1024)) -> dict[str, Any]:
    """clean-fid's resize one image at a time on the main thread vs the batch on the worker pool."""
    import numpy as np
    import torch

    from xa_lightning.metrics.images import to_numpy_nhwc, worker_count

    def serial_resize(images: torch.Tensor) -> list[np.ndarray]:
        return [extractor.resize_image(image) for image in to_numpy_nhwc(images)]

    results: dict[str, Any] = {"workers": worker_count(), "repeats": 3}
    for size in sizes:
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
        extractor.preprocess(images[:2])  # warm-up: pool threads, PIL
        serial_seconds, serial = _best_of(3, serial_resize, images)
        ours_seconds, ours = _best_of(3, extractor.preprocess, images)
        equal = bool(np.array_equal(np.stack(serial).transpose(0, 3, 1, 2), ours.numpy()))
        results[str(size)] = {
            "serial_ms_per_image": round(1000 * serial_seconds / count, 2),
            "pool_ms_per_image": round(1000 * ours_seconds / count, 2),
            "ratio": round(serial_seconds / ours_seconds, 3),
            "identical": equal,
        }
    return results


def _memory_isolated(counts: Sequence[int], device: str) -> dict[str, Any]:
    """Each count in a fresh process: RSS then reflects that run alone (the allocator keeps freed memory)."""
    import subprocess

    results: dict[str, Any] = {}
    for count in counts:
        code = (
            "import json, sys; from xa_lightning.metrics.bench import _memory; "
            f"print(json.dumps(_memory([{int(count)}], {device!r})))"
        )
        output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        results.update(json.loads(output.strip().splitlines()[-1]))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from xa_lightning.metrics.fid import compute_statistics, frechet_distance
    from xa_lightning.metrics.inception import get_inception
    from xa_lightning.metrics.weights import ensure_inception_weights
    from xa_lightning.runtime import device_name

    parser = argparse.ArgumentParser(prog="xa-bench fid")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=None, help="images per folder (default: 32 on CPU, 1000 on GPU)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--memory-counts", default="1000,10000", help="feature counts for the memory check")
    parser.add_argument("--skip-cleanfid", action="store_true", help="only ours (no baseline, no ratio)")
    parser.add_argument("--preprocess-images", type=int, default=16, help="images per size for the resize timing")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    device = args.device
    count = args.images or (1000 if device.startswith("cuda") else 32)

    result: dict[str, Any] = {"benchmark": "fid", "device": device_name(device), "images_per_folder": count}
    with tempfile.TemporaryDirectory(prefix="xa_bench_fid_") as tmp:
        real, fake = Path(tmp) / "real", Path(tmp) / "fake"
        _write_images(real, count, seed=0)
        _write_images(fake, count, seed=1)
        weights = ensure_inception_weights()
        extractor = get_inception(device=device)
        extractor(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))  # warm-up (TorchScript profiling runs)

        start = time.perf_counter()
        stats_real = compute_statistics(real, extractor, args.batch_size, device=device)
        stats_fake = compute_statistics(fake, extractor, args.batch_size, device=device)
        features_seconds = time.perf_counter() - start
        fid_ours = frechet_distance(stats_fake, stats_real)
        ours_seconds = time.perf_counter() - start
        result.update(
            ours_seconds=round(ours_seconds, 3),
            ours_images_per_s=round(2 * count / features_seconds, 2),
            fid_ours=fid_ours,
        )

        if not args.skip_cleanfid:
            import numpy as np
            from cleanfid.fid import frechet_distance as cleanfid_frechet
            from cleanfid.fid import get_folder_features
            from cleanfid.inception_torchscript import InceptionV3W

            model = InceptionV3W(str(weights.parent), download=False, resize_inside=False).to(device).eval()
            start = time.perf_counter()
            feats = [
                get_folder_features(
                    str(folder),
                    lambda x: model(x),
                    num_workers=0,
                    batch_size=args.batch_size,
                    device=torch.device(device),
                    mode="clean",
                    verbose=False,
                )
                for folder in (real, fake)
            ]
            cleanfid_features_seconds = time.perf_counter() - start
            fid_cleanfid = float(
                cleanfid_frechet(
                    feats[1].mean(0), np.cov(feats[1], rowvar=False), feats[0].mean(0), np.cov(feats[0], rowvar=False)
                )
            )
            cleanfid_seconds = time.perf_counter() - start
            result.update(
                cleanfid_seconds=round(cleanfid_seconds, 3),
                cleanfid_images_per_s=round(2 * count / cleanfid_features_seconds, 2),
                fid_cleanfid=fid_cleanfid,
                relative_difference=abs(fid_ours - fid_cleanfid) / max(abs(fid_cleanfid), 1e-12),
                ratio=round(cleanfid_seconds / ours_seconds, 3),
                feature_ratio=round(cleanfid_features_seconds / features_seconds, 3),
            )

        result["preprocessing"] = _preprocessing(extractor, args.preprocess_images)

    counts = [int(c) for c in args.memory_counts.split(",") if c]
    result["memory"] = {
        "method": "synthetic 2048-d feature batches through update_features (real and fake "
        "side), each count in a fresh process",
        **_memory_isolated(counts, device),
    }
    sizes = [result["memory"][str(c)]["state_mb"] for c in counts]
    result["memory_grows"] = bool(sizes and sizes[-1] > sizes[0])
    result["memory_flat"] = not result["memory_grows"]  # the claim: the state does not grow with the image count
    if "ratio" in result:
        result["target"] = TARGET_RATIO
        result["meets_target"] = result["ratio"] >= TARGET_RATIO
    result["notes"] = (
        "ratio: clean-fid end-to-end seconds / ours (both: two folders -> FID; clean-fid's scipy "
        "sqrtm dominates on CPU); feature_ratio: feature extraction only. preprocessing: clean-fid's resize "
        "per image on the main thread vs the batch on the worker pool. memory: state_mb is the "
        "metric state (sums + outer products; sets up to 1024 images also keep their features); "
        "rss_after_compute_mb includes what the distance computation kept (low-rank SVD up to 1024 images, eigh "
        "above); ru_maxrss is not reported: a child process inherits its parent's peak"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
