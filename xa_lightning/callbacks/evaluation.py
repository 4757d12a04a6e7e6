"""The evaluation callback: every N steps and at the end, generate a fixed set and score it."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch

from xa_lightning.callbacks.loggers import comparison_grid, log_grid, log_scalars, log_wandb_table
from xa_lightning.config import coerce_options
from xa_lightning.metrics.config import EvaluationConfig
from xa_lightning.metrics.evaluate import build_evaluation_set, evaluate_samplers, prepare_evaluation
from xa_lightning.metrics.fid import FeatureStatistics, stats_path

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(_json_safe(data), handle, indent=2, allow_nan=False)
            handle.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class EvaluationCallback(L.Callback):
    """Generate a fixed prompt / seed / reference set with the method's samplers and score it.

    Every ``every_n_steps`` optimizer steps and at the end of training (``at_end``) it calls
    ``pl_module.evaluation_samplers()`` (the first sampler is the method, the others its baselines),
    generates in eval mode without gradients and with the global RNG state preserved (evaluation
    does not change the training run), scores with the configured metrics
    (:func:`~xa_lightning.metrics.evaluate_samplers`) and

    * logs ``eval/<sampler>/<metric>`` (and ``eval/<a>_vs_<b>/fid`` for ``pairs``) to every logger and
      into ``trainer.callback_metrics`` (checkpoint monitors, sweeper objectives);
    * logs one image grid (a row per sampler, references on top) and, with a W&B logger, a table of
      prompt / seed / reference / images / per-image scores;
    * writes ``metrics.json`` (latest values, per-image scores, history) into ``output_dir`` or the
      run directory (``trainer.default_root_dir``).

    Prompts, references and real images come from the datamodule when it has ``eval_prompts(n)``,
    ``eval_references(n)`` and ``real_images(n)``, else from ``prompts_file``, ``references_dir`` and
    ``real_dir``. Under DDP every rank generates its share; metrics reduce across ranks; rank 0 logs
    and writes.

    Args:
        config: an :class:`~xa_lightning.metrics.EvaluationConfig` or a mapping of its fields
            (the ``eval`` config group).
        **overrides: individual fields to override (e.g. ``every_n_steps=100``).
    """

    def __init__(self, config: EvaluationConfig | Mapping[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__()
        base = EvaluationConfig.coerce(config)
        if overrides:
            current = {f.name: getattr(base, f.name) for f in dataclasses.fields(EvaluationConfig)}
            base = coerce_options({**current, **overrides}, EvaluationConfig, "callbacks.evaluation")
        self.config = base
        self.history: list[dict[str, Any]] = []
        self.last_result: dict[str, Any] | None = None
        self._evaluated_steps: set[int] = set()
        self._eval_set: dict[str, Any] | None = None
        self._real_statistics: Any = None

    # ------------------------------------------------------------------ validation up front
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Fail before training starts (nothing half-written) when the evaluation cannot run."""
        if stage != "fit":
            return
        if not callable(getattr(pl_module, "evaluation_samplers", None)):
            raise TypeError(
                f"{type(pl_module).__name__} has no evaluation_samplers(); the evaluation callback "
                "needs it (see xa_lightning.training.AdapterModule)"
            )
        cfg = self.config
        # The rank's device: insightface and the shared models load where the evaluation will run.
        prepare_evaluation(cfg, getattr(trainer, "datamodule", None), trainer.strategy.root_device)
        if cfg.needs_real_statistics() and cfg.fid.reference_stats:
            self._real_statistics = FeatureStatistics.load(stats_path(cfg.fid.reference_stats))

    # ------------------------------------------------------------------ hooks
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        every = self.config.every_n_steps
        step = trainer.global_step
        if every and step > 0 and step % every == 0 and step not in self._evaluated_steps:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.config.at_end:
            self.evaluate(trainer, pl_module, final=True)

    # ------------------------------------------------------------------ the evaluation
    def evaluation_set(self, trainer: L.Trainer) -> dict[str, Any]:
        """Prompts, seeds, references and real images: built once, identical for every evaluation."""
        if self._eval_set is None:
            self._eval_set = build_evaluation_set(self.config, getattr(trainer, "datamodule", None))
        return self._eval_set

    def metrics_path(self, trainer: L.Trainer) -> Path:
        return Path(self.config.output_dir or trainer.default_root_dir) / METRICS_FILE

    def evaluate(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *, final: bool = False, force: bool = False
    ) -> dict[str, Any]:
        """Run one evaluation now (all ranks must call it); returns the ``eval/...`` scalars.

        A second call at the same global step returns the earlier result unless ``force``.
        """
        step = int(trainer.global_step)
        if step in self._evaluated_steps and not force and self.last_result is not None:
            if final and self.history and not self.history[-1]["final"]:
                self.history[-1]["final"] = True  # the periodic evaluation was the last one
                if trainer.is_global_zero:
                    self._write_metrics(trainer, self.last_result, self.last_result["scalars"], step, True)
            return self.last_result["scalars"]
        eval_set = self.evaluation_set(trainer)
        samplers = pl_module.evaluation_samplers()
        was_training = pl_module.training
        device = pl_module.device
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        pl_module.eval()
        try:
            with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
                result = evaluate_samplers(
                    samplers,
                    eval_set["prompts"],
                    eval_set["seeds"],
                    eval_set["references"],
                    self._real_statistics if self._real_statistics is not None else eval_set["real_images"],
                    self.config,
                    device=device,
                    progress=self.config.progress,
                )
        finally:
            pl_module.train(was_training)
        self._real_statistics = result["real_statistics"]
        self._evaluated_steps.add(step)
        scalars = {f"eval/{key}": value for key, value in result["metrics"].items()}
        for key, value in scalars.items():
            trainer.callback_metrics[key] = torch.tensor(value, dtype=torch.float64)
        # Sample Count (samples seen over all ranks) is the x-axis of A4A's curves: recorded exactly per evaluation
        samples_seen = int(getattr(pl_module, "samples_seen", 0))
        entry = {
            "step": step,
            "epoch": int(trainer.current_epoch),
            "samples_seen": samples_seen,
            "final": final,
            "metrics": scalars,
        }
        self.history.append(entry)
        self.last_result = {**result, "scalars": scalars, "step": step}
        if trainer.is_global_zero:
            self._report(trainer, result, scalars, step, final)
        if result["untrained"]:
            log.warning(
                "evaluation: %s computed with a random-init CLIP encoder (weights unavailable offline); "
                "logged with the suffix _untrained",
                ", ".join(result["untrained"]),
            )
        return scalars

    def _report(
        self, trainer: L.Trainer, result: dict[str, Any], scalars: dict[str, float], step: int, final: bool
    ) -> None:
        loggers = list(trainer.loggers)
        # the step metric of eval/* on W&B (define_metric): logged with the scores, so the x value is exact
        seen = float(getattr(trainer.lightning_module, "samples_seen", 0))
        log_scalars(loggers, {**scalars, "train/samples_seen": seen}, step)
        rows, labels = [], []
        if result.get("references") is not None:
            rows.append(result["references"])
            labels.append("references")
        for sampler in result["samplers"]:
            if sampler in result["images"]:
                rows.append(result["images"][sampler])
                labels.append(sampler)
        run_dir = self.metrics_path(trainer).parent
        if rows:
            caption = f"step {step}; rows: {', '.join(labels)}"
            log_grid(loggers, comparison_grid(rows), "eval/samples", step, caption, fallback_dir=run_dir)
        log_wandb_table(loggers, result, "eval/table", step)
        self._write_metrics(trainer, result, scalars, step, final)

    def _write_metrics(
        self, trainer: L.Trainer, result: dict[str, Any], scalars: dict[str, float], step: int, final: bool
    ) -> None:
        write_json_atomic(
            self.metrics_path(trainer),
            {
                "step": step,
                "epoch": int(trainer.current_epoch),
                "final": final,
                "metrics": scalars,
                "untrained": result["untrained"],
                "num_images": result["num_images"],
                "samplers": result["samplers"],
                "per_image": result["per_image"],
                "prompts": result["prompts"],
                "seeds": result["seeds"],
                "config": self.config.to_dict(),
                "history": self.history,
            },
        )

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "evaluated_steps": sorted(self._evaluated_steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self._evaluated_steps = set(state_dict.get("evaluated_steps", []))
