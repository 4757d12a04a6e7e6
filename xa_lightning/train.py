"""The xa-train task: instantiate data, method, callbacks, loggers and trainer from the config; fit."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from xa_lightning.config import instantiate
from xa_lightning.errors import UserError

log = logging.getLogger(__name__)


def instantiate_list(node: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` child of a group node (callbacks/, logger/)."""
    if not node:
        return []
    return [instantiate(child) for child in node.values() if isinstance(child, DictConfig) and "_target_" in child]


def _run_name_of(run_dir: Path) -> str:
    """``<time>_<run_name>`` -> ``run_name`` (the output layout of conf/hydra/default.yaml)."""
    return run_dir.name.partition("_")[2]


def newest_readable_checkpoint(candidates: list[Path], report: bool = True) -> Path | None:
    """The newest of ``candidates`` that is a whole checkpoint; cut files are reported and passed over."""
    from xa_lightning.training.checkpoint_io import unreadable_reason

    for ckpt in sorted(candidates, key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt"), reverse=True):
        reason = unreadable_reason(ckpt)
        if reason is None:
            return ckpt
        if report:
            log.warning("checkpoint %s is unreadable (%s); using the previous one", ckpt, reason)
    return None


def find_last_checkpoint(run_name: str, roots: tuple[str, ...] = ("outputs", "multirun"), report: bool = True) -> Path:
    """The newest readable checkpoint of earlier runs named exactly ``run_name`` (``ckpt_path=last``):
    their ``last.ckpt``, or a periodic one when a ``last.ckpt`` is cut short."""
    candidates = []
    for root in roots:
        root_path = Path(root)
        if root_path.is_dir():
            for checkpoints in root_path.glob("**/checkpoints"):
                run_dir = checkpoints.parent
                # a single run's dir, or a sweep job's (multirun/<date>/<time>_<run>/<job>)
                if run_name in (_run_name_of(run_dir), _run_name_of(run_dir.parent)):
                    candidates.extend(checkpoints.glob("*.ckpt"))
    found = newest_readable_checkpoint(candidates, report=report)
    if found is None:
        problem = "no readable checkpoint" if candidates else "no checkpoints/last.ckpt"
        raise UserError(
            f"ckpt_path=last: {problem} of an earlier run named {run_name!r} under "
            f"{', '.join(roots)}; pass ckpt_path=<file.ckpt> or start without ckpt_path"
        )
    return found


def resolve_ckpt_path(cfg: DictConfig, own_checkpoints: Path | None = None) -> str | None:
    """The checkpoint to resume from: ``ckpt_path`` (a file, or ``last``), else with ``auto_resume`` the
    newest checkpoint already in this run's own directory (a requeued job restarted in it)."""
    if cfg.get("ckpt_path") in (None, ""):
        if cfg.get("auto_resume") and own_checkpoints is not None and own_checkpoints.is_dir():
            own = newest_readable_checkpoint(list(own_checkpoints.glob("*.ckpt")))
            if own is not None:
                log.info("continuing from this run's own %s (auto_resume)", own)
                return str(own)
        return None
    if cfg.ckpt_path == "last":
        path = find_last_checkpoint(cfg.run_name)
        log.info("resuming from %s", path)
        return str(path)
    if not Path(cfg.ckpt_path).is_file():
        raise UserError(f"ckpt_path={cfg.ckpt_path} does not exist; pass an existing .ckpt or ckpt_path=last")
    return str(cfg.ckpt_path)


def _set_wandb_group(cfg: DictConfig) -> None:
    """Jobs of one sweep share a W&B group named after the sweep directory."""
    wandb_cfg = OmegaConf.select(cfg, "logger.wandb")
    if wandb_cfg is None or wandb_cfg.get("group"):
        return
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        group = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None
    except ValueError:  # not under Hydra (tests)
        group = None
    with open_dict(wandb_cfg):
        wandb_cfg.group = group or cfg.run_name


def build(cfg: DictConfig) -> tuple[Any, Any, Any]:
    """(trainer, model, datamodule) from a composed config; shared by xa-train, tests and the demo."""
    import lightning as L

    L.seed_everything(cfg.seed, workers=True)  # the same on every rank: identical models and data setup
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.method)
    model.run_config = OmegaConf.to_container(cfg, resolve=True)
    _set_wandb_group(cfg)
    callbacks = instantiate_list(cfg.get("callbacks"))
    loggers = instantiate_list(cfg.get("logger"))
    if not loggers:  # logger=none: a learning-rate monitor would have nowhere to write
        from lightning.pytorch.callbacks import LearningRateMonitor

        callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    # Training draws (noise, timesteps, negative prompts, guidance scales) from the global RNG: each DDP rank
    # gets its own stream, seed + global rank, so the ranks do not repeat each other's samples.
    L.seed_everything(cfg.seed + trainer.global_rank, workers=True, verbose=False)
    for logger in loggers:  # the composed config beside the metrics (W&B config panel, hparams.yaml)
        logger.log_hyperparams(model.run_config)
    return trainer, model, datamodule


def finish_loggers(trainer: Any) -> None:
    """One W&B run per Hydra job: close it so the next job of a multirun starts a new one."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            wandb.finish()


def run(cfg: DictConfig) -> float | None:
    trainer, model, datamodule = build(cfg)
    out_dir = Path(trainer.default_root_dir)
    try:
        if cfg.train:
            from xa_lightning.distributed import local_ranks
            from xa_lightning.training import Preempted
            from xa_lightning.training.callbacks import last_checkpoint_path

            ckpt_path = resolve_ckpt_path(cfg, last_checkpoint_path(trainer).parent)
            try:
                with local_ranks(trainer):  # DDP: waits for the other local ranks, or stops them
                    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
            except Preempted as stop:  # a signal: the checkpoint is written; exit cleanly (status 0)
                if trainer.is_global_zero:
                    print(
                        json.dumps(
                            {
                                "run_dir": str(out_dir),
                                "preempted": stop.signal_name,
                                "step": stop.step,
                                "checkpoint": str(stop.checkpoint),
                            }
                        )
                    )
                return None
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        elif cfg.evaluate:  # evaluate given weights (method init_weights, or ckpt_path) without training
            from xa_lightning.evaluate import evaluate_module
            from xa_lightning.training import load_checkpoint_state, safe_torch_load

            ckpt = resolve_ckpt_path(cfg)
            if ckpt:
                load_checkpoint_state(model, safe_torch_load(ckpt), source=ckpt)
            device = "cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu"
            metrics = evaluate_module(model, cfg.eval, cfg.data, out_dir, device=device)["metrics"]
        else:
            raise UserError("train=false and evaluate=false: nothing to do; set train=true or evaluate=true")
    finally:
        finish_loggers(trainer)
    summary = {"run_dir": str(out_dir), "metrics": metrics}
    if (out_dir / "metrics.json").is_file():
        summary["metrics_file"] = str(out_dir / "metrics.json")
    if trainer.is_global_zero:  # one summary line, whatever the number of ranks
        print(json.dumps(summary))
    if cfg.get("optimized_metric"):
        if cfg.optimized_metric not in metrics:
            raise UserError(
                f"optimized_metric={cfg.optimized_metric} was not logged; "
                f"logged: {', '.join(sorted(metrics)) or 'nothing'}"
            )
        return metrics[cfg.optimized_metric]
    return None
