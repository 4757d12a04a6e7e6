"""Send evaluation results to whatever loggers are attached: scalars, an image grid, a W&B table.

Each logger gets what it can show: TensorBoard ``add_image``, W&B ``Image`` and ``Table``, and for
loggers without image support (CSV, ...) a PNG written into the logger's run directory.

:class:`WandbLogger` (``conf/logger/wandb.yaml``) makes a W&B run a dashboard: tagged with the paper
table and run it belongs to, evaluation curves against Sample Count, every image captioned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from torch import Tensor

from xa_lightning.metrics.images import make_grid, resize_square, save_png, to_numpy_hwc

SAMPLES_SEEN = "train/samples_seen"  # logged by every method's training step: the papers' Sample Count


def table_tags(table: Mapping[str, Any] | None) -> list[str]:
    """W&B tags of a job of ``xa-train -m +table=<name>``: its table, run(s) and scale."""
    if not table:
        return []
    tags = [f"table:{table['name']}"] if table.get("name") else []
    tags += [f"run:{run}" for run in table.get("runs") or [table.get("run")] if run]
    if table.get("scale") == "tiny":
        tags.append("tiny")
    return tags


class WandbLogger(LightningWandbLogger):
    """Lightning's W&B logger as a dashboard.

    * ``table``: the job's ``table`` config node (``+table=<name>`` sweeps) adds the tags
      ``table:<name>``, ``run:<run>`` (and ``tiny``) to ``tags``; runs are grouped by sweep (``group``,
      set by ``xa-train``).
    * Evaluation metrics (``eval/*``) are plotted against ``train/samples_seen`` (``define_metric``;
      each evaluation row takes the latest Sample Count), training metrics against the step.

    Everything else is Lightning's ``WandbLogger`` (offline unless ``WANDB_MODE=online``).
    """

    def __init__(self, *args: Any, table: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        from xa_lightning.config import to_plain

        table = to_plain(table)
        tags = [*(to_plain(kwargs.pop("tags", None)) or []), *table_tags(table)]
        super().__init__(*args, tags=list(dict.fromkeys(tags)) or None, **kwargs)
        self._dashboard_defined = False

    @property
    def experiment(self) -> Any:
        run = super().experiment
        if not self._dashboard_defined and callable(getattr(run, "define_metric", None)):
            run.define_metric(SAMPLES_SEEN)
            run.define_metric("eval/*", step_metric=SAMPLES_SEEN, step_sync=True)
            self._dashboard_defined = True
        return run


def image_caption(sampler: str, prompt: str, seed: int) -> str:
    return f"{sampler} | {prompt} | seed {seed}"


def comparison_grid(rows: Sequence[Tensor]) -> Tensor:
    """One uint8 grid: a row per image set (references, then each sampler), same columns, same size."""
    side = min(min(images.shape[-2:]) for images in rows)
    columns = max(images.shape[0] for images in rows)
    cells = []
    for images in rows:
        images = resize_square(images.cpu(), side)
        if images.shape[0] < columns:  # pad short rows with white
            pad = torch.full((columns - images.shape[0], 3, side, side), 255, dtype=torch.uint8)
            images = torch.cat([images, pad])
        cells.append(images)
    return make_grid(torch.cat(cells), columns=columns)


def logger_dir(logger: Any) -> Path | None:
    for attr in ("log_dir", "save_dir"):
        try:
            value = getattr(logger, attr, None)
        except Exception:  # some loggers compute these lazily and may fail
            value = None
        if value:
            return Path(value)
    return None


def log_scalars(loggers: Sequence[Any], scalars: dict[str, float], step: int) -> None:
    for logger in loggers:
        logger.log_metrics(dict(scalars), step=step)
        save = getattr(logger, "save", None)
        if callable(save):  # CSV writes its file on save(): make the numbers visible now
            save()


def log_grid(
    loggers: Sequence[Any], grid: Tensor, key: str, step: int, caption: str, fallback_dir: Path | None
) -> list[Path]:
    """Log the grid to each logger; returns the PNG files written for loggers without images."""
    written: list[Path] = []
    for logger in loggers:
        if isinstance(logger, LightningWandbLogger):
            logger.log_image(key=key, images=[to_numpy_hwc(grid)], step=step, caption=[caption])
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, global_step=step)
        else:
            folder = logger_dir(logger) or fallback_dir
            if folder is None:
                continue
            name = key.replace("/", "_")
            written.append(save_png(grid, folder / "eval_images" / f"{name}_step{step:07d}.png"))
    if not loggers and fallback_dir is not None:
        written.append(save_png(grid, fallback_dir / "eval_images" / f"{key.replace('/', '_')}_step{step:07d}.png"))
    return written


def log_wandb_table(loggers: Sequence[Any], result: dict[str, Any], key: str, step: int) -> bool:
    """W&B: a table of prompt x sampler (prompt, seed, reference, and per sampler its image and per-image
    scores), and each sampler's images as ``eval/images/<sampler>``, every image captioned with its
    sampler, prompt and seed. False when no W&B logger is attached."""
    targets = [lg for lg in loggers if isinstance(lg, LightningWandbLogger)]
    if not targets:
        return False
    import wandb

    prompts, seeds = result["prompts"], result["seeds"]
    references = result.get("references")
    samplers = [s for s in result["samplers"] if s in result["images"]]
    score_keys = {s: sorted(result["per_image"].get(s, {})) for s in samplers}
    columns = ["index", "prompt", "seed"] + (["reference"] if references is not None else [])
    for sampler in samplers:
        columns += [sampler] + [f"{sampler}/{k}" for k in score_keys[sampler]]
    rows = []
    for index in range(len(prompts)):
        row: list[Any] = [index, prompts[index], seeds[index]]
        if references is not None:
            row.append(wandb.Image(to_numpy_hwc(references[index]), caption=f"reference | seed {seeds[index]}"))
        for sampler in samplers:
            images = result["images"][sampler]
            caption = image_caption(sampler, prompts[index], seeds[index])
            row.append(wandb.Image(to_numpy_hwc(images[index]), caption=caption) if index < images.shape[0] else None)
            for score_key in score_keys[sampler]:
                value = result["per_image"][sampler][score_key][index]
                row.append(None if value is None or (isinstance(value, float) and math.isnan(value)) else value)
        rows.append(row)
    for logger in targets:
        logger.log_table(key=key, columns=columns, data=rows, step=step)
        for sampler in samplers:
            images = result["images"][sampler][: len(prompts)]
            logger.log_image(
                key=f"eval/images/{sampler}",
                images=[to_numpy_hwc(image) for image in images],
                caption=[image_caption(sampler, prompts[i], seeds[i]) for i in range(images.shape[0])],
                step=step,
            )
    return True
