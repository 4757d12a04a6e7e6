"""Callbacks every method shares."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from xa_lightning.training.module import AdapterModule


class AdapterExport(L.Callback):
    """At the end of fit, write the adapter as ``save_pretrained`` safetensors (rank 0 only)."""

    def __init__(self, dirpath: str, enabled: bool = True) -> None:
        self.dirpath = Path(dirpath)
        self.enabled = enabled

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and trainer.is_global_zero and isinstance(pl_module, AdapterModule):
            pl_module.export_adapter(self.dirpath)
