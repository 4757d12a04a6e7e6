"""Logs the skipped / converted sample counts of the trainer's DataModule as ``data/<name>``."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from xa_lightning.data.counters import COUNTER_NAMES, as_dict

log = logging.getLogger("xa_lightning.data")


class SkippedSamplesLogger(L.Callback):
    """Every ``trainer.log_every_n_steps`` steps and at the end of each epoch, sums the DataModule's
    skip / conversion counters over all ranks and logs the non-zero ones as ``data/skipped_<reason>``
    and ``data/converted_<reason>`` (cumulative counts since the start of the run).

    Works with any DataModule that has ``counter_tensors() -> (per_rank, replicated)`` (the
    xa-lightning DataModules add this callback themselves).
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        self.every_n_steps = every_n_steps
        self.last: dict[str, int] = {}

    def _totals(self, trainer: L.Trainer) -> dict[str, int] | None:
        datamodule = getattr(trainer, "datamodule", None)
        counter_tensors = getattr(datamodule, "counter_tensors", None)
        if not callable(counter_tensors):
            return None
        per_rank, replicated = counter_tensors()
        per_rank = per_rank.to(torch.float64)
        if trainer.world_size > 1:
            # every rank reaches this point at the same step, so the collective cannot hang
            per_rank = trainer.strategy.reduce(per_rank.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        return as_dict(per_rank.round().long() + replicated)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        totals = self._totals(trainer)
        if totals is None:
            return
        self.last = totals
        for name in COUNTER_NAMES:
            if name in totals:
                pl_module.log(
                    f"data/{name}", float(totals[name]), on_step=True, on_epoch=False, rank_zero_only=True, batch_size=1
                )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        every = self.every_n_steps or max(1, int(trainer.log_every_n_steps))
        if (trainer.global_step % every) == 0:
            self._log(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        totals = self._totals(trainer)
        if totals is None:
            return
        self.last = totals
        if totals and trainer.is_global_zero:
            summary = ", ".join(f"{k}={v}" for k, v in sorted(totals.items()))
            log.info("data: epoch %d sample counts: %s", trainer.current_epoch, summary)
        for name, value in totals.items():
            pl_module.log(
                f"data/{name}",
                float(value),
                on_step=False,
                on_epoch=True,
                rank_zero_only=True,
                batch_size=1,
                reduce_fx="max",
            )
