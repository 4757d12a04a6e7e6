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

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xa_lightning.errors import UserError
from xa_lightning.metrics.base import (
    OTHER_SAMPLER,
    REAL_STATISTICS,
    REFERENCES,
    EvaluationMetric,
    MetricContext,
    dist_info,
)
from xa_lightning.metrics.config import EvaluationConfig
from xa_lightning.metrics.fid import (
    FeatureStatistics,
    InceptionStatistics,
    compute_statistics,
    frechet_distance,
    stats_path,
)
from xa_lightning.metrics.images import list_image_files, load_image, resize_square, to_uint8, to_unit_float
from xa_lightning.metrics.registry import METRICS
from xa_lightning.paths import repo_root

log = logging.getLogger(__name__)

# Prompts of an evaluation that has neither eval.prompts_file nor a datamodule (`xa-eval ckpt_path=...`).
DEMO_PROMPTS = "evaluation/prompts/demo.txt"

Sampler = Callable[[list[str], list[int], Tensor | None], Tensor]


def _gather_objects(obj: Any) -> list[Any]:
    rank, world = dist_info()
    if world == 1:
        return [obj]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def real_statistics(
    real_images: Any, cfg: EvaluationConfig, device: str | torch.device, limit: int, progress: bool = False
) -> FeatureStatistics:
    """Inception statistics of the first ``limit`` real images, computed once (sharded over ranks, reduced).

    ``real_images``: statistics, a folder or ``.npz`` path, a uint8 tensor or a list of images; None
    reads ``eval.fid.reference_stats``.
    """
    if isinstance(real_images, FeatureStatistics):
        return real_images
    if real_images is None:
        if cfg.fid.reference_stats:
            return FeatureStatistics.load(stats_path(cfg.fid.reference_stats))
        raise UserError(
            f"eval.metrics has {', '.join(cfg.metrics_needing(REAL_STATISTICS))} but there are no real images: "
            "the datamodule has no real_images(n), eval.real_dir is unset and eval.fid.reference_stats is unset"
        )
    if isinstance(real_images, (str, os.PathLike)) and str(real_images).endswith(".npz"):
        return FeatureStatistics.load(real_images)
    return compute_statistics(
        real_images,
        batch_size=max(cfg.batch_size, 16),
        weights_dir=cfg.fid.weights_dir,
        device=device,
        keep_features_up_to=max(cfg.fid.low_rank_max_images, 10_000),  # KID needs the real features
        limit=limit,
        progress=progress,
    )


def prepare_evaluation(cfg: EvaluationConfig, datamodule: Any = None, device: str | torch.device = "cpu") -> None:
    """Check everything an evaluation needs before anything is generated: the prompt / reference / real
    sources the config sets (or, unset, that the datamodule provides them), the reference statistics file,
    and every metric's weights and models (fetched where they may be). A problem is a one-line UserError."""
    # A source set in the config wins over the datamodule's (a paper table pairs COCO captions with
    # COCO control maps while training on LAION); each set path must exist.
    if cfg.prompts_file:
        resolve_path(cfg.prompts_file, "eval.prompts_file")
    if cfg.references_dir:
        resolve_path(cfg.references_dir, "eval.references_dir")
    elif cfg.needs_references() and not hasattr(datamodule, "eval_references"):
        raise UserError(
            "eval.references_dir is unset and the datamodule has no eval_references(n), but "
            f"eval.metrics has {', '.join(cfg.metrics_needing(REFERENCES))}"
        )
    if cfg.real_dir:
        resolve_path(cfg.real_dir, "eval.real_dir")
    elif cfg.needs_real_images() and not hasattr(datamodule, "real_images"):
        raise UserError(
            f"eval.metrics has {', '.join(cfg.metrics_needing(REAL_STATISTICS))} but there are no real "
            "images: set eval.real_dir or eval.fid.reference_stats (the datamodule has no real_images(n))"
        )
    if cfg.needs_real_statistics() and cfg.fid.reference_stats and not stats_path(cfg.fid.reference_stats).is_file():
        FeatureStatistics.load(stats_path(cfg.fid.reference_stats))  # the one-line error naming the file
    device = torch.device(device)
    for name in cfg.metrics:
        METRICS[name].prepare(cfg, device)
    if cfg.pairs:
        InceptionStatistics.prepare(cfg, device)


def _check_images(images: Any, sampler: str, expected: int) -> Tensor:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        what = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"sampler {sampler!r} returned {what}; samplers must return uint8 (B, 3, H, W)")
    if images.shape[0] != expected:
        raise ValueError(f"sampler {sampler!r} returned {images.shape[0]} images for {expected} prompts")
    return images


def _sampler_names(samplers: Mapping[str, Sampler], cfg: EvaluationConfig) -> list[str]:
    """The samplers to run: ``eval.samplers`` (or all), plus the style reference when a metric needs it."""
    names = list(samplers) if cfg.samplers is None else list(cfg.samplers)
    style = [cfg.style_reference] if cfg.metrics_needing(OTHER_SAMPLER) else []
    for name in names + [n for pair in cfg.pairs for n in pair] + style:
        if name not in samplers:
            raise UserError(
                f"eval: sampler {name!r} (eval.samplers / eval.pairs / eval.style_reference) is not "
                f"one of the method's samplers: {', '.join(samplers)}"
            )
    return names + [name for name in style if name not in names]


def _check_inputs(cfg: EvaluationConfig, prompts: list[str], seeds: list[int], references: Any) -> None:
    count = len(prompts)
    if count == 0 or len(seeds) != count:
        raise ValueError(f"need as many seeds as prompts (>0), got {count} prompts and {len(seeds)} seeds")
    if references is not None and len(references) != count:
        raise ValueError(f"{len(references)} references for {count} prompts")
    if references is None and cfg.needs_references():
        raise UserError(
            f"eval.metrics has {', '.join(cfg.metrics_needing(REFERENCES))} but there are no references: the "
            "datamodule has no eval_references(n) and eval.references_dir is unset"
        )


def _select(references: Tensor | Sequence[Tensor] | None, indices: list[int]) -> Tensor | None:
    if references is None:
        return None
    return references[indices] if isinstance(references, Tensor) else torch.stack([references[i] for i in indices])


def _generate(
    samplers: Mapping[str, Sampler], names: list[str], prompts: list[str], seeds: list[int], references: Any
) -> dict[str, Tensor]:
    """Every sampler's uint8 images for one batch (references as float in [0, 1], the data contract's)."""
    given = None if references is None else to_unit_float(references)
    return {name: _check_images(samplers[name](prompts, seeds, given), name, len(prompts)).detach() for name in names}


def _merge_ranks(per_image: dict[str, dict[int, float]], count: int) -> dict[str, list[float]]:
    """Per-image values of all ranks, in image order (NaN where an image has none)."""
    table: dict[str, dict[int, float]] = {}
    for part in _gather_objects(per_image):
        for key, values in part.items():
            table.setdefault(key, {}).update(values)
    return {key: [values.get(i, math.nan) for i in range(count)] for key, values in table.items()}


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
    tensor or a list of images (FID/KID reals: the first ``eval.fid.num_real_images``, default as many
    as prompts; computed once, returned for reuse).

    Returns ``{"metrics": {"<sampler>/<metric>": float, "<a>_vs_<b>/fid": float},
    "per_image": {sampler: {metric: [N floats]}}, "images": {sampler: uint8 (k, 3, H, W)},
    "prompts", "seeds", "references" (first k), "real_statistics", "untrained": [metric names],
    "num_images", "samplers"}`` where k = ``log_images``.
    """
    from tqdm.auto import tqdm

    cfg = EvaluationConfig.coerce(metric_cfg)
    device = torch.device(device) if device is not None else _default_device()
    progress = cfg.progress if progress is None else progress
    keep = cfg.log_images if log_images is None else log_images
    rank, world = dist_info()
    names = _sampler_names(samplers, cfg)
    prompts, seeds = [str(p) for p in prompts], [int(s) for s in seeds]
    _check_inputs(cfg, prompts, seeds, references)
    count = len(prompts)

    reals = None
    if cfg.needs_real_statistics():
        reals = real_statistics(real_images, cfg, device, cfg.fid.num_real_images or count, progress)
    metrics: dict[str, list[EvaluationMetric]] = {}
    for name in names:
        built = [METRICS[metric].from_config(cfg, MetricContext(name, device, reals)) for metric in cfg.metrics]
        metrics[name] = [metric.to(device) for metric in built if metric is not None]
    # Pairwise FID: two samplers' feature statistics against each other.
    paired = dict.fromkeys(name for pair in cfg.pairs for name in pair)
    statistics = {name: InceptionStatistics.from_config(cfg, MetricContext(name, device)).to(device) for name in paired}

    per_image: dict[str, dict[str, dict[int, float]]] = {name: {} for name in names}
    kept: dict[str, dict[int, Tensor]] = {name: {} for name in names}
    mine = list(range(rank, count, world))
    batches = [mine[i : i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
    for batch in tqdm(batches, desc="evaluation", unit="batch", leave=False, disable=not progress or rank != 0):
        batch_prompts, batch_references = [prompts[i] for i in batch], _select(references, batch)
        generated = _generate(samplers, names, batch_prompts, [seeds[i] for i in batch], batch_references)
        references_uint8 = None if batch_references is None else to_uint8(batch_references)
        for name, images in generated.items():
            for metric in metrics[name]:
                other = OTHER_SAMPLER in metric.needs
                metric.update(images, batch_prompts, generated[cfg.style_reference] if other else references_uint8)
                for key, values in metric.last_scores.items():
                    per_image[name].setdefault(key, {}).update(zip(batch, values.tolist()))
            if name in statistics:
                statistics[name].update(images)
            kept[name].update({index: images[position].cpu() for position, index in enumerate(batch) if index < keep})

    results: dict[str, float] = {}
    untrained: list[str] = []
    for name in names:
        for metric in metrics[name]:
            results.update({f"{name}/{key}": value for key, value in metric.results().items()})
            if not metric.trained and metric.log_name not in untrained:
                untrained.append(metric.log_name)
    for a, b in cfg.pairs:
        pair = statistics[a].statistics(), statistics[b].statistics()
        results[f"{a}_vs_{b}/fid"] = frechet_distance(*pair, cfg.fid.low_rank_max_images)
    # Per-image values and the first images are small: every rank gets everything.
    images = {name: {i: image for part in _gather_objects(kept[name]) for i, image in part.items()} for name in names}
    shown = min(keep, count)
    shown_references = _select(references, list(range(shown))) if shown else None
    return {
        "metrics": results,
        "per_image": {name: _merge_ranks(per_image[name], count) for name in names},
        "images": {name: torch.stack([found[i] for i in sorted(found)]) for name, found in images.items() if found},
        "prompts": prompts[:shown],
        "seeds": seeds[:shown],
        "references": None if shown_references is None else to_uint8(shown_references).cpu(),
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
    if not candidate.is_absolute() and (repo_root() / candidate).exists():
        return repo_root() / candidate
    raise UserError(
        f"{what}: {path} does not exist; fix the path (relative paths are tried against the "
        "working directory and the checkout)"
    )


def load_references(
    folder: str | os.PathLike, count: int, resolution: int, what: str = "eval.references_dir"
) -> Tensor:
    """The first ``count`` images of a folder (sorted), centre-cropped and resized, float (count, 3, r, r) in [0, 1]."""
    files = list_image_files(resolve_path(folder, what), what)[:count]
    images = [resize_square(load_image(f).unsqueeze(0), resolution)[0] for f in files]
    return torch.stack(images).float() / 255.0


def build_evaluation_set(cfg: EvaluationConfig, datamodule: Any = None) -> dict[str, Any]:
    """Prompts, seeds, references and real images for one evaluation, from the datamodule or the config files.

    Each source set in the config (``prompts_file``, ``references_dir``, ``real_dir``) wins over the
    datamodule's; prompts default to :data:`DEMO_PROMPTS` when neither has any. With references, reference
    ``i // images_per_reference`` goes with image ``i``, and so does prompt ``i // images_per_reference``
    (the datamodule aligns its captions with its references; a prompt file's line k goes with the k-th
    file of ``references_dir`` in sorted order); seeds are ``cfg.seed + i``.
    """
    count = cfg.num_images
    per_reference = cfg.images_per_reference
    references = None
    need_refs = cfg.needs_references() or per_reference > 1
    n_refs = math.ceil(count / per_reference)
    if cfg.references_dir:
        references = load_references(cfg.references_dir, n_refs, cfg.reference_resolution)
    elif need_refs and datamodule is not None and hasattr(datamodule, "eval_references"):
        references = datamodule.eval_references(n_refs)
    if references is not None and len(references) < n_refs:
        count = len(references) * per_reference
    n_prompts = len(references) if references is not None else count
    if cfg.prompts_file:
        base_prompts = read_prompts(cfg.prompts_file)
    elif datamodule is not None and hasattr(datamodule, "eval_prompts"):
        base_prompts = list(datamodule.eval_prompts(n_prompts))
    else:
        log.info("eval: no eval.prompts_file and no datamodule; prompting with %s", DEMO_PROMPTS)
        base_prompts = read_prompts(DEMO_PROMPTS)
    if references is not None:
        prompts = [base_prompts[(i // per_reference) % len(base_prompts)] for i in range(count)]
        references = to_unit_float(references)[[i // per_reference for i in range(count)]]
    else:
        prompts = [base_prompts[i % len(base_prompts)] for i in range(count)]
    real: Any = None
    if cfg.needs_real_images():
        n_real = cfg.fid.num_real_images or count
        if cfg.real_dir:
            real = str(resolve_path(cfg.real_dir, "eval.real_dir"))
        elif datamodule is not None and hasattr(datamodule, "real_images"):
            real = datamodule.real_images(n_real)
    return {
        "prompts": prompts,
        "seeds": [cfg.seed + i for i in range(count)],
        "references": references,
        "real_images": real,
    }
