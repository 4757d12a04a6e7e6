"""Runs of the demo experiments on tiny backbones, for comparing an interrupted run with an uninterrupted one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from xa_lightning.config import compose
from xa_lightning.train import build
from xa_lightning.training import AdapterCheckpoint


class StepRecorder(L.Callback):
    """global step -> (training loss, batch keys) of every step this trainer runs."""

    def __init__(self) -> None:
        self.steps: dict[int, tuple[float, list[str]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps[trainer.global_step] = (float(outputs["loss"]), list(batch["key"]))


def demo_config(experiment: str, out_dir: Path, *overrides: str):
    return compose(
        "train",
        [
            f"experiment={experiment}",
            "logger=none",
            "callbacks=none",
            f"paths.output_dir={out_dir}",
            "+trainer.enable_progress_bar=false",
            "+trainer.enable_model_summary=false",
            *overrides,
        ],
    )


def fit_demo(
    experiment: str, out_dir: Path, max_steps: int, *overrides: str, save_every: int | None = None, ckpt_path=None
) -> tuple[Any, Any, dict[int, tuple[float, list[str]]]]:
    """(module, datamodule, recorded steps) of ``max_steps`` steps; checkpoints every ``save_every`` steps."""
    trainer, model, datamodule = build(demo_config(experiment, out_dir, f"trainer.max_steps={max_steps}", *overrides))
    recorder = StepRecorder()
    trainer.callbacks.append(recorder)
    if save_every:
        trainer.callbacks.append(
            AdapterCheckpoint(dirpath=out_dir / "checkpoints", every_n_train_steps=save_every, save_last=True)
        )
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return model, datamodule, recorder.steps


def adapter_state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.adapter.state_dict().items()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
