"""Send evaluation results to whatever loggers are attached: scalars, an image grid, a W&B table.

Each logger gets what it can show: TensorBoard ``add_image``, W&B ``Image`` and ``Table``, and for
loggers without image support (CSV, ...) a PNG written into the logger's run directory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xa_lightning.metrics.images import make_grid, resize_square, save_png, to_numpy_hwc


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


def _wandb_logger_type() -> type | None:
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover
        return None
    return WandbLogger


def _tensorboard_logger_type() -> type | None:
    try:
        from lightning.pytorch.loggers import TensorBoardLogger
    except ImportError:  # pragma: no cover
        return None
    return TensorBoardLogger


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
    wandb_type, tensorboard_type = _wandb_logger_type(), _tensorboard_logger_type()
    written: list[Path] = []
    for logger in loggers:
        if wandb_type is not None and isinstance(logger, wandb_type):
            logger.log_image(key=key, images=[to_numpy_hwc(grid)], step=step, caption=[caption])
        elif tensorboard_type is not None and isinstance(logger, tensorboard_type):
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
    """A W&B table: prompt, seed, reference, and per sampler its image and per-image scores."""
    wandb_type = _wandb_logger_type()
    targets = [lg for lg in loggers if wandb_type is not None and isinstance(lg, wandb_type)]
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
            row.append(wandb.Image(to_numpy_hwc(references[index])))
        for sampler in samplers:
            images = result["images"][sampler]
            row.append(wandb.Image(to_numpy_hwc(images[index])) if index < images.shape[0] else None)
            for score_key in score_keys[sampler]:
                value = result["per_image"][sampler][score_key][index]
                row.append(None if value is None or (isinstance(value, float) and math.isnan(value)) else value)
        rows.append(row)
    for logger in targets:
        logger.log_table(key=key, columns=columns, data=rows, step=step)
    return True
