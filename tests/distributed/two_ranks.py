"""Two forked CPU ranks (gloo) training a demo experiment for two steps: the harness of the strategy tests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from xa_lightning.config import compose, instantiate

from ..data.helpers import quiet_trainer


def fit_on_two_ranks(strategy: Any, out: Path, experiment: str, callbacks: Sequence[Any], **kwargs: Any) -> list[dict]:
    """Fit ``experiment`` with ``strategy`` on 2 CPU ranks; the callbacks write ``out/rank<r>.json``, returned."""
    out.mkdir()
    cfg = compose("train", [f"experiment={experiment}", "data.batch_size=2"])
    torch.manual_seed(0)
    module, datamodule = instantiate(cfg.method), instantiate(cfg.data)
    quiet_trainer(
        devices=2, strategy=strategy, max_steps=2, limit_val_batches=0, callbacks=list(callbacks), **kwargs
    ).fit(module, datamodule=datamodule)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
