"""Trained state back into a method: a checkpoint's adapter into a built module (``xa-train train=false``),
or the whole method rebuilt from its checkpoint alone (``xa-eval``, ``xa-sample``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from xa_lightning.errors import UserError
from xa_lightning.training.checkpoint_io import safe_torch_load
from xa_lightning.training.module import AdapterModule


def load_checkpoint_state(module: AdapterModule, checkpoint: Mapping[str, Any], source: str) -> AdapterModule:
    """Load a checkpoint's adapter state into ``module`` after checking its method and backbones.

    ``source`` names the checkpoint in errors. Returns ``module`` (with ``samples_seen`` restored).
    """
    meta = checkpoint.get("xa") or {}
    module.check_compatible(meta, source=source)
    module.load_state_dict(checkpoint["state_dict"])
    module.samples_seen = int(meta.get("samples_seen", 0))
    return module


def load_method(ckpt_path: str | Path, method_overrides: dict[str, Any] | None = None) -> AdapterModule:
    """Instantiate the method recorded in a checkpoint and load its adapter state.

    The checkpoint stores the run's resolved config, so no config is needed beside it; frozen backbones
    are rebuilt from their own config (hub id / local dir / tiny seed), never read from the checkpoint.
    """
    from xa_lightning.config import instantiate

    checkpoint = safe_torch_load(ckpt_path)
    config = (checkpoint.get("xa") or {}).get("config")
    if not config or "method" not in config:
        raise UserError(f"{ckpt_path} records no run config; it was not written by xa-train")
    method_cfg = OmegaConf.create(config["method"])
    if method_overrides:
        method_cfg = OmegaConf.merge(method_cfg, method_overrides)
    module = instantiate(method_cfg)
    if not isinstance(module, AdapterModule):
        raise UserError(f"{ckpt_path}: method {method_cfg.get('_target_')} is not an xa-lightning AdapterModule")
    load_checkpoint_state(module, checkpoint, source=str(ckpt_path))
    module.run_config = config
    return module.eval()
