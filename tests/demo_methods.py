"""A method built from its demo experiment, with one training batch: what the cross-method tests start from."""

from __future__ import annotations

from typing import Any

import torch

from xa_lightning.config import compose, instantiate


def demo_module_and_batch(name: str, *overrides: str) -> tuple[Any, dict[str, Any], Any]:
    """(module, one training batch of 2, datamodule) of ``experiment=demo/<name>`` with ``overrides``."""
    cfg = compose("train", [f"experiment=demo/{name}", "data.batch_size=2", *overrides])
    torch.manual_seed(0)
    module = instantiate(cfg.method)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return module, next(iter(datamodule.train_dataloader())), datamodule
