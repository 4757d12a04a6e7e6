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


def find_last_checkpoint(run_name: str, roots: tuple[str, ...] = ("outputs", "multirun")) -> Path:
    """The newest ``last.ckpt`` of an earlier run with this run_name (what ``ckpt_path=last`` means)."""
    candidates = []
    for root in roots:
        root_path = Path(root)
        if root_path.is_dir():
            for ckpt in root_path.glob("**/checkpoints/last.ckpt"):
                run_dir = ckpt.parent.parent
                names = {run_dir.name, run_dir.parent.name}  # single run dir, or sweep dir / job number
                if any(n.endswith(f"_{run_name}") for n in names):
                    candidates.append(ckpt)
    if not candidates:
        raise UserError(
            f"ckpt_path=last: no earlier run named {run_name!r} with checkpoints/last.ckpt under "
            f"{', '.join(roots)}; pass ckpt_path=<file.ckpt> or start without ckpt_path"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime)


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    if cfg.get("ckpt_path") in (None, ""):
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

    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.method)
    model.run_config = OmegaConf.to_container(cfg, resolve=True)
    _set_wandb_group(cfg)
    callbacks = instantiate_list(cfg.get("callbacks"))
    loggers = instantiate_list(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
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
            trainer.fit(model, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg))
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
    print(json.dumps(summary))
    if cfg.get("optimized_metric"):
        if cfg.optimized_metric not in metrics:
            raise UserError(
                f"optimized_metric={cfg.optimized_metric} was not logged; "
                f"logged: {', '.join(sorted(metrics)) or 'nothing'}"
            )
        return metrics[cfg.optimized_metric]
    return None
