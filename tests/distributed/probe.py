"""A callback the 2-rank CLI tests add (``+callbacks.rank_probe._target_=tests.distributed.probe.RankProbe``):
each rank writes what it saw to ``<run dir>/rank_probe/rank<r>.json``."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import lightning as L


class RankProbe(L.Callback):
    """Per rank: the batch keys it trained on, its own (unsynced) losses, the logged (synced) ``train/loss``,
    the evaluation's results (this callback runs after the evaluation callback), a digest of the adapter's
    weights at the end, and the run directory and process it ran in."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.keys.extend(str(key) for key in batch["key"])
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.adapter.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "pid": os.getpid(),
            "run_dir": str(Path(trainer.default_root_dir).resolve()),
            "keys": self.keys,
            "losses": self.losses,
            "logged_loss": float(trainer.callback_metrics["train/loss"]),
            "eval": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval/")},
            "adapter_sha256": digest.hexdigest(),
        }
        out = Path(trainer.default_root_dir) / "rank_probe" / f"rank{trainer.global_rank}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report))
