"""Callbacks every method shares: adapter export, checkpoints, preemption and the numeric guard."""

from __future__ import annotations

import inspect
import logging
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from xa_lightning.errors import UserError
from xa_lightning.training.checkpoint_io import remove_stale_temp_files
from xa_lightning.training.module import AdapterModule

log = logging.getLogger(__name__)


class AdapterExport(L.Callback):
    """At the end of fit, write the adapter as ``save_pretrained`` safetensors (rank 0 only)."""

    def __init__(self, dirpath: str, enabled: bool = True) -> None:
        self.dirpath = Path(dirpath)
        self.enabled = enabled

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and trainer.is_global_zero and isinstance(pl_module, AdapterModule):
            pl_module.export_adapter(self.dirpath)


class AdapterCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint with ``keep_last_k``: keep only the newest k periodic checkpoints
    (-1: all; ``last.ckpt`` is always kept). Temporary files of saves a kill interrupted are removed at
    the start."""

    def __init__(self, *, keep_last_k: int = -1, **kwargs: Any) -> None:
        if int(keep_last_k) < -1:
            raise UserError(f"callbacks.model_checkpoint.keep_last_k={keep_last_k}: use -1 (keep all) or k >= 0")
        self.keep_last_k = int(keep_last_k)
        # "step" is always among ModelCheckpoint's monitor candidates: the top k by step are the newest k
        super().__init__(monitor="step", mode="max", save_top_k=self.keep_last_k, **kwargs)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath:
            remove_stale_temp_files(self.dirpath)


# ModelCheckpoint's own options (less the three keep_last_k sets) are passed through **kwargs: publish them
# so that config validation names a misspelt callbacks.model_checkpoint.<key> before anything runs.
AdapterCheckpoint.__signature__ = inspect.Signature(
    [inspect.Parameter("keep_last_k", inspect.Parameter.KEYWORD_ONLY, default=-1, annotation=int)]
    + [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for name, p in inspect.signature(ModelCheckpoint.__init__).parameters.items()
        if name not in ("self", "monitor", "mode", "save_top_k")
    ]
)


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where ``last.ckpt`` goes: the checkpoint callback's directory, else ``<run>/checkpoints``."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


class Preempted(SIGTERMException):
    """Training stopped on a signal after writing ``checkpoint`` at ``step`` (``xa-train`` exits 0)."""

    def __init__(self, signal_name: str, checkpoint: Path, step: int) -> None:
        super().__init__()
        self.signal_name, self.checkpoint, self.step = signal_name, checkpoint, step


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM / SIGUSR1 / SIGUSR2 (cluster preemption, SLURM's warning before the time limit), finish
    the current step, write ``last.ckpt`` and stop with :class:`Preempted`.

    The signal handler only records the signal; the checkpoint is written at the end of the step, where
    every rank agrees to stop (one small all-reduce per step under DDP) and where a resume continues
    exactly. Then a handler that was installed before training (submitit's, which requeues the SLURM job,
    or Lightning's SLURM requeue) runs, except Lightning's own SIGTERM handler, which this one replaces.
    """

    def __init__(self, signals: list[str] | tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGUSR2")) -> None:
        unknown = [name for name in signals if not isinstance(getattr(signal, str(name), None), signal.Signals)]
        if unknown:
            raise UserError(f"callbacks.preemption.signals: {unknown[0]!r} is not a signal name (e.g. SIGTERM)")
        self.signals = [signal.Signals[str(name)] for name in signals]
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _record(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum)
        log.warning("received %s: writing a checkpoint at the end of this step, then stopping", self.received.name)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning installs its handlers (which run just before on_train_start): ours replace them.
        self.received = None
        for signum in self.signals:
            try:
                self._previous[signum] = signal.signal(signum, self._record)
            except ValueError:  # not the main thread: nothing to install
                return

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        received = self.received or signal.SIGTERM  # a rank told to stop by another one
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        log.warning("%s: wrote %s at step %d; stopping", received.name, path, trainer.global_step)
        previous = self._previous.get(received)
        self._restore_handlers()
        lightning_sigterm = received == signal.SIGTERM and type(previous).__module__.startswith("lightning")
        if callable(previous) and not lightning_sigterm:
            previous(received, None)  # e.g. submitit requeues the job (and exits)
        raise Preempted(received.name, path, trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()


class NumericGuard(L.Callback):
    """A non-finite loss or gradient skips the optimizer step (the gradients are dropped) and is counted as
    ``train/skipped_nonfinite``; ``max_consecutive`` such steps in a row stop the run with one line naming
    the step and the last good checkpoint. Under DDP every rank decides alike. With fp16's gradient scaler,
    infinite gradients are the scaler's business (it skips those steps itself); the loss is still checked."""

    def __init__(self, max_consecutive: int = 5) -> None:
        if int(max_consecutive) < 1:
            raise UserError(f"callbacks.numeric_guard.max_consecutive={max_consecutive}: must be at least 1")
        self.max_consecutive = int(max_consecutive)
        self.skipped = 0
        self.in_a_row = 0
        self._bad_loss = False

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        # sticky over accumulated micro-batches until the optimizer step
        self._bad_loss = self._bad_loss or not bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad = self._bad_loss
        if not bad and params and getattr(trainer.precision_plugin, "scaler", None) is None:
            bad = not bool(torch.stack([torch.isfinite(p.grad).all() for p in params]).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        self._bad_loss = False
        if not bad:
            self.in_a_row = 0
        else:
            for p in params:
                p.grad = None  # the optimizer skips parameters without a gradient: no update, no moment change
            self.skipped += 1
            self.in_a_row += 1
            step = trainer.global_step + 1
            log.warning("step %d: non-finite loss or gradient; the optimizer step is skipped", step)
            if self.in_a_row >= self.max_consecutive:
                last = last_checkpoint_path(trainer)
                good = str(last) if last.is_file() else "none yet"
                raise UserError(
                    f"step {step}: {self.in_a_row} non-finite losses or gradients in a row; the run stops; "
                    f"last good checkpoint: {good}; lower method.optimizer.lr or check the data"
                )
        pl_module.log("train/skipped_nonfinite", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.in_a_row = int(state_dict.get("in_a_row", 0))
