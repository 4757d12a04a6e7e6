"""Generate with every sampler on a fixed prompt / seed / reference set and score the images.

:func:`evaluate_samplers` is the one scoring path: the evaluation callback (during training), the
checkpoint evaluation of ``xa-eval`` and the tests all use it. A sampler is
``sampler(prompts, seeds, references) -> uint8 (B, 3, H, W)`` (docs/contracts.md); references are
passed as float ``(B, 3, r, r)`` in [0, 1] like the data batches' ``reference``.

Distributed: under an initialised ``torch.distributed`` process group each rank generates images
``rank, rank + world, ...``; metric states are reduced across ranks (torchmetrics), per-image scores
and the logged images are gathered on every rank (they are small), so every rank returns the same
result and rank 0 can write it.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xa_lightning.errors import UserError
from xa_lightning.metrics.config import EvaluationConfig
from xa_lightning.metrics.fid import (
    FeatureStatistics,
    FrechetInceptionDistance,
    KernelInceptionDistance,
    frechet_distance,
    get_inception,
    stats_path,
)
from xa_lightning.metrics.images import iterate_batches, list_image_files, load_image, to_uint8, to_unit_float

Sampler = Callable[[list[str], list[int], Tensor | None], Tensor]


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather_objects(obj: Any) -> list[Any]:
    rank, world = dist_info()
    if world == 1:
        return [obj]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------- reals
def real_statistics(
    real_images: Any, cfg: EvaluationConfig, device: str | torch.device, progress: bool = False
) -> FeatureStatistics:
    """Inception statistics of the real set, computed once (sharded over ranks, reduced)."""
    from tqdm.auto import tqdm

    if isinstance(real_images, FeatureStatistics):
        return real_images
    if real_images is None:
        if cfg.fid.reference_stats:
            return FeatureStatistics.load(stats_path(cfg.fid.reference_stats))
        raise UserError(
            "eval.metrics has fid/kid but there are no real images: the datamodule has no "
            "real_images(n), eval.real_dir is unset and eval.fid.reference_stats is unset"
        )
    rank, world = dist_info()
    limit = cfg.fid.num_real_images
    if isinstance(real_images, (str, os.PathLike)):
        if str(real_images).endswith(".npz"):
            return FeatureStatistics.load(real_images)
        files = list_image_files(real_images, "eval.real_dir")[:limit]
        mine: Any = (load_image(f) for f in files[rank::world])
        total = len(files[rank::world])
    elif isinstance(real_images, Tensor):
        real_images = real_images[:limit] if limit else real_images
        mine = real_images[rank::world]
        total = mine.shape[0]
    else:
        items = list(real_images)
        flat = [image for item in items for image in (item if item.ndim == 4 else item.unsqueeze(0))]
        flat = flat[:limit] if limit else flat
        mine = flat[rank::world]
        total = len(mine)
    metric = FrechetInceptionDistance(
        get_inception(cfg.fid.weights_dir, device), low_rank_max_images=max(cfg.fid.low_rank_max_images, 10_000)
    ).to(device)
    bar = tqdm(total=total, desc="FID real statistics", unit="img", leave=False, disable=not progress or rank != 0)
    for batch in iterate_batches(mine, max(cfg.batch_size, 16)):
        metric.update(batch.to(device), real=True)
        bar.update(batch.shape[0])
    bar.close()
    return metric.statistics(real=True)


# ---------------------------------------------------------------------------------------------- metrics
def _load_clip(cfg: EvaluationConfig, device: torch.device) -> Any:
    """The shared CLIP model when a CLIP metric is configured (warns once when it is random-init)."""
    from xa_lightning.metrics.clip_score import get_clip

    if not any(m in cfg.metrics for m in ("clip_score", "clip_image_similarity", "style_similarity")):
        return None
    return get_clip(
        cfg.clip.model,
        cfg.clip.pretrained,
        cache_dir=cfg.clip.cache_dir,
        device=device,
        require_pretrained=cfg.clip.require_pretrained,
    )


def _sampler_metrics(
    cfg: EvaluationConfig,
    device: torch.device,
    reals: FeatureStatistics | None,
    is_style_reference: bool,
    wants_features: bool,
    clip: Any,
) -> OrderedDict[str, Any]:
    """The metric objects for one sampler (shared models: Inception, CLIP, face embedder)."""
    from xa_lightning.metrics.clip_score import ClipImageSimilarity, ClipScore, StyleSimilarity

    metrics: OrderedDict[str, Any] = OrderedDict()
    extractor = get_inception(cfg.fid.weights_dir, device) if wants_features else None
    if wants_features:
        metrics["fid"] = FrechetInceptionDistance(
            extractor,
            reference=reals if "fid" in cfg.metrics else None,
            low_rank_max_images=cfg.fid.low_rank_max_images,
        ).to(device)
    for name in cfg.metrics:
        if name == "kid":
            metrics["kid"] = KernelInceptionDistance(
                extractor, reference=reals, subsets=cfg.fid.kid_subsets, subset_size=cfg.fid.kid_subset_size
            ).to(device)
        elif name == "clip_score":
            metrics[name] = ClipScore(clip).to(device)
        elif name == "clip_image_similarity":
            metrics[name] = ClipImageSimilarity(clip).to(device)
        elif name == "style_similarity" and not is_style_reference:
            metrics[name] = StyleSimilarity(clip).to(device)
        elif name == "ida":
            from xa_lightning.metrics.ida import IdentityAlignment, build_face_embedder

            embedder = build_face_embedder(cfg.ida.backend, cfg.ida.model_dir, **cfg.ida.embedder_kwargs())
            metrics[name] = IdentityAlignment(embedder, missing_face=cfg.ida.missing_face).to(device)
        elif name == "edge_f1":
            from xa_lightning.metrics.condition import EdgeF1

            metrics[name] = EdgeF1(cfg.edge.low_threshold, cfg.edge.high_threshold, cfg.edge.radius).to(device)
    return metrics


def _log_name(name: str, metric: Any) -> str:
    return getattr(metric, "log_name", name)


def _check_images(images: Any, sampler: str, expected: int) -> Tensor:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        what = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"sampler {sampler!r} returned {what}; samplers must return uint8 (B, 3, H, W)")
    if images.shape[0] != expected:
        raise ValueError(f"sampler {sampler!r} returned {images.shape[0]} images for {expected} prompts")
    return images


# ---------------------------------------------------------------------------------------------- main
@torch.no_grad()
def evaluate_samplers(
    samplers: Mapping[str, Sampler],
    prompts: Sequence[str],
    seeds: Sequence[int],
    references: Tensor | Sequence[Tensor] | None,
    real_images: Any,
    metric_cfg: EvaluationConfig | Mapping | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    log_images: int | None = None,
) -> dict[str, Any]:
    """Generate ``len(prompts)`` images per sampler and score them with the configured metrics.

    ``references``: None or per-image references ``(N, 3, r, r)`` (uint8 or float in [0, 1]);
    ``real_images``: None, a ``FeatureStatistics``, a folder / ``.npz`` path, a uint8 ``(M, 3, H, W)``
    tensor or a list of images (FID/KID reals; computed once, returned for reuse).

    Returns ``{"metrics": {"<sampler>/<metric>": float, "<a>_vs_<b>/fid": float},
    "per_image": {sampler: {metric: [N floats]}}, "images": {sampler: uint8 (k, 3, H, W)},
    "prompts", "seeds", "references" (first k), "real_statistics", "untrained": [metric names],
    "num_images"}`` where k = ``log_images``.
    """
    from tqdm.auto import tqdm

    cfg = EvaluationConfig.coerce(metric_cfg)
    device = torch.device(device) if device is not None else _default_device()
    progress = cfg.progress if progress is None else progress
    keep = cfg.log_images if log_images is None else log_images
    rank, world = dist_info()

    names = list(samplers) if cfg.samplers is None else cfg.samplers
    for name in (
        names
        + [n for pair in cfg.pairs for n in pair]
        + ([cfg.style_reference] if cfg.style_reference and "style_similarity" in cfg.metrics else [])
    ):
        if name not in samplers:
            raise UserError(
                f"eval: sampler {name!r} (eval.samplers / eval.pairs / eval.style_reference) is not "
                f"one of the method's samplers: {', '.join(samplers)}"
            )
    if cfg.style_reference and "style_similarity" in cfg.metrics and cfg.style_reference not in names:
        names.append(cfg.style_reference)
    prompts, seeds = [str(p) for p in prompts], [int(s) for s in seeds]
    count = len(prompts)
    if count == 0 or len(seeds) != count:
        raise ValueError(f"need as many seeds as prompts (>0), got {count} prompts and {len(seeds)} seeds")
    if references is not None:
        if len(references) != count:
            raise ValueError(f"{len(references)} references for {count} prompts")
    elif cfg.needs_references():
        wanted = [m for m in cfg.metrics if m in ("clip_image_similarity", "ida", "edge_f1")]
        raise UserError(
            f"eval.metrics has {', '.join(wanted)} but there are no references: the datamodule has "
            "no eval_references(n) and eval.references_dir is unset"
        )

    wants_features = "fid" in cfg.metrics or "kid" in cfg.metrics or bool(cfg.pairs)
    reals = None
    if "fid" in cfg.metrics or "kid" in cfg.metrics:
        reals = real_statistics(real_images, cfg, device, progress)
    clip = _load_clip(cfg, device)
    metrics = {
        name: _sampler_metrics(
            cfg,
            device,
            reals,
            name == cfg.style_reference,
            wants_features
            and ("fid" in cfg.metrics or "kid" in cfg.metrics or any(name in pair for pair in cfg.pairs)),
            clip,
        )
        for name in names
    }

    my_indices = list(range(rank, count, world))
    per_image: dict[str, dict[str, dict[int, float]]] = {name: {} for name in names}
    kept_images: dict[str, dict[int, Tensor]] = {name: {} for name in names}
    batches = [my_indices[i : i + cfg.batch_size] for i in range(0, len(my_indices), cfg.batch_size)]
    bar = tqdm(batches, desc="evaluation", unit="batch", leave=False, disable=not progress or rank != 0)
    for batch in bar:
        batch_prompts = [prompts[i] for i in batch]
        batch_seeds = [seeds[i] for i in batch]
        batch_refs = None
        if references is not None:
            batch_refs = (
                torch.stack([references[i] for i in batch]) if not isinstance(references, Tensor) else references[batch]
            )
        refs_uint8 = to_uint8(batch_refs) if batch_refs is not None else None
        refs_for_sampler = to_unit_float(batch_refs).to(device) if batch_refs is not None else None
        generated: dict[str, Tensor] = {}
        for name in names:
            generated[name] = _check_images(
                samplers[name](batch_prompts, batch_seeds, refs_for_sampler), name, len(batch)
            ).detach()
        for name in names:
            images = generated[name]
            scores: dict[str, Tensor] = {}
            features = None
            for metric_name, metric in metrics[name].items():
                if metric_name in ("fid", "kid"):
                    if features is None:
                        features = metric.extract(images)
                    metric.update_features(features)
                elif metric_name == "clip_score":
                    scores[metric.log_name] = metric.accumulate(metric.score(images, batch_prompts))
                elif metric_name in ("clip_image_similarity", "edge_f1"):
                    scored = metric.score(images, refs_uint8)
                    metric.accumulate(scored)
                    scores[_log_name(metric_name, metric)] = scored
                elif metric_name == "style_similarity":
                    scores[metric.log_name] = metric.accumulate(metric.score(images, generated[cfg.style_reference]))
                elif metric_name == "ida":
                    scored = metric.score(images, refs_uint8)
                    metric.accumulate(scored)
                    scores["ida"] = scored[0]
                    scores["face_detected"] = scored[1].double()
            for key, values in scores.items():
                for index, value in zip(batch, values.tolist()):
                    per_image[name].setdefault(key, {})[index] = float(value)
            for position, index in enumerate(batch):
                if index < keep:
                    kept_images[name][index] = images[position].cpu()
    bar.close()

    results: dict[str, float] = {}
    untrained: list[str] = []
    for name in names:
        for metric_name, metric in metrics[name].items():
            if metric_name == "fid" and "fid" not in cfg.metrics:
                continue  # only kept for the pairwise FID
            label = _log_name(metric_name, metric)
            results[f"{name}/{label}"] = float(metric.compute())
            if metric_name == "kid":
                results[f"{name}/kid_std"] = float(metric.last_std)
            if hasattr(metric, "extra_scalars"):
                for key, value in metric.extra_scalars().items():
                    results[f"{name}/{key}"] = float(value)
            if hasattr(metric, "trained") and not metric.trained and label not in untrained:
                untrained.append(label)
    for a, b in cfg.pairs:
        stats_a, stats_b = metrics[a]["fid"].statistics(), metrics[b]["fid"].statistics()
        results[f"{a}_vs_{b}/fid"] = frechet_distance(stats_a, stats_b, cfg.fid.low_rank_max_images)

    # Per-image values and the first images: small, so every rank gets everything.
    merged_scores: dict[str, dict[str, list[float]]] = {}
    merged_images: dict[str, Tensor] = {}
    for name in names:
        parts = _gather_objects(per_image[name])
        table: dict[str, dict[int, float]] = {}
        for part in parts:
            for key, values in part.items():
                table.setdefault(key, {}).update(values)
        merged_scores[name] = {key: [values.get(i, math.nan) for i in range(count)] for key, values in table.items()}
        image_parts = _gather_objects(kept_images[name])
        collected: dict[int, Tensor] = {}
        for part in image_parts:
            collected.update(part)
        if collected:
            merged_images[name] = torch.stack([collected[i] for i in sorted(collected)])
    shown = min(keep, count)
    shown_references = None
    if references is not None and shown:
        first = references[:shown] if isinstance(references, Tensor) else torch.stack(list(references[:shown]))
        shown_references = to_uint8(first).cpu()
    return {
        "metrics": results,
        "per_image": merged_scores,
        "images": merged_images,
        "prompts": prompts[:shown],
        "seeds": seeds[:shown],
        "references": shown_references,
        "real_statistics": reals,
        "untrained": untrained,
        "num_images": count,
        "samplers": names,
    }


# ---------------------------------------------------------------------------------------------- inputs
def read_prompts(path: str | os.PathLike, what: str = "eval.prompts_file") -> list[str]:
    """Non-empty, non-comment lines of a prompt file."""
    file = resolve_path(path, what)
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UserError(f"{what}: {file} has no prompts (one per line)")
    return prompts


def resolve_path(path: str | os.PathLike, what: str) -> Path:
    """An existing path: as given, or relative to the checkout (evaluation/... works from any cwd)."""
    candidate = Path(path).expanduser()
    if candidate.exists():
        return candidate
    if not candidate.is_absolute():
        root = Path(__file__).resolve().parents[2]
        if (root / candidate).exists():
            return root / candidate
    raise UserError(
        f"{what}: {path} does not exist; fix the path (relative paths are tried against the "
        "working directory and the checkout)"
    )


def load_references(folder: str | os.PathLike, count: int, resolution: int) -> Tensor:
    """The first ``count`` images of a folder, centre-cropped and resized, float (count, 3, r, r) in [0, 1]."""
    from xa_lightning.metrics.images import resize_square

    files = list_image_files(resolve_path(folder, "eval.references_dir"), "eval.references_dir")[:count]
    images = [resize_square(load_image(f).unsqueeze(0), resolution)[0] for f in files]
    return torch.stack(images).float() / 255.0


def build_evaluation_set(cfg: EvaluationConfig, datamodule: Any = None) -> dict[str, Any]:
    """Prompts, seeds, references and real images for one evaluation, from the datamodule or the config files.

    With references, reference ``i // images_per_reference`` goes with image ``i`` (and so does its
    prompt when the datamodule aligns prompts with references); seeds are ``cfg.seed + i``.
    """
    count = cfg.num_images
    per_reference = cfg.images_per_reference
    references = None
    need_refs = cfg.needs_references() or per_reference > 1
    n_refs = math.ceil(count / per_reference)
    if need_refs and datamodule is not None and hasattr(datamodule, "eval_references"):
        references = datamodule.eval_references(n_refs)
    if references is None and cfg.references_dir:
        references = load_references(cfg.references_dir, n_refs, cfg.reference_resolution)
    if references is not None and len(references) < n_refs:
        count = len(references) * per_reference
    n_prompts = len(references) if references is not None else count
    if datamodule is not None and hasattr(datamodule, "eval_prompts"):
        base_prompts = list(datamodule.eval_prompts(n_prompts))
    elif cfg.prompts_file:
        base_prompts = read_prompts(cfg.prompts_file)
    else:
        raise UserError(
            "eval.prompts_file is unset and the datamodule has no eval_prompts(n); set "
            "eval.prompts_file=evaluation/prompts/demo.txt"
        )
    if references is not None:
        prompts = [base_prompts[(i // per_reference) % len(base_prompts)] for i in range(count)]
        references = to_unit_float(references)[[i // per_reference for i in range(count)]]
    else:
        prompts = [base_prompts[i % len(base_prompts)] for i in range(count)]
    real: Any = None
    if ("fid" in cfg.metrics or "kid" in cfg.metrics) and not cfg.fid.reference_stats:
        n_real = cfg.fid.num_real_images or count
        if datamodule is not None and hasattr(datamodule, "real_images"):
            real = datamodule.real_images(n_real)
        elif cfg.real_dir:
            real = str(resolve_path(cfg.real_dir, "eval.real_dir"))
    return {
        "prompts": prompts,
        "seeds": [cfg.seed + i for i in range(count)],
        "references": references,
        "real_images": real,
    }
