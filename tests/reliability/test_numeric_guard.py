"""A non-finite loss or gradient skips the optimizer step and is counted; too many in a row stop the run with
one line; non-finite weights are never written (checkpoint or export)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from tests.foundation.toy_method import FixedLatents, ResidualEpsModule
from xa_lightning.errors import UserError
from xa_lightning.training import AdapterCheckpoint, AtomicCheckpointIO, NumericGuard, safe_torch_load


class PoisonedLatents(FixedLatents):
    """The toy data, with NaN latents in the batches of the given (1-based) steps (batch size 2, no shuffle)."""

    def __init__(self, nan_steps: set[int]) -> None:
        super().__init__()
        self.nan_steps = nan_steps

    def __getitem__(self, i: int) -> dict:
        sample = super().__getitem__(i)
        if i // 2 + 1 in self.nan_steps:
            sample["latents"] = torch.full_like(sample["latents"], float("nan"))
        return sample


class WeightsPerStep(L.Callback):
    def __init__(self) -> None:
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after[trainer.global_step] = {k: v.clone() for k, v in pl_module.adapter.state_dict().items()}


def fit(tmp_path, nan_steps: set[int], max_steps: int, max_consecutive: int = 5):
    module = ResidualEpsModule()
    weights = WeightsPerStep()
    guard = NumericGuard(max_consecutive=max_consecutive)
    saver = AdapterCheckpoint(
        dirpath=tmp_path / "checkpoints",
        filename="step{step}",
        auto_insert_metric_name=False,
        every_n_train_steps=1,
        save_last=True,
    )
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[guard, weights, saver],
        plugins=[AtomicCheckpointIO()],
    )
    loader = DataLoader(PoisonedLatents(nan_steps), batch_size=2, shuffle=False)
    return module, trainer, weights, guard, loader


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_step_is_skipped_counted_and_never_saved(tmp_path):
    module, trainer, weights, guard, loader = fit(tmp_path, nan_steps={2}, max_steps=4)
    trainer.fit(module, train_dataloaders=loader)

    assert trainer.global_step == 4
    assert same(weights.after[2], weights.after[1]), "the NaN step changed the adapter"
    assert not same(weights.after[3], weights.after[2]), "training did not go on after the NaN step"
    assert all(torch.isfinite(v).all() for state in weights.after.values() for v in state.values())
    assert guard.skipped == 1 and guard.in_a_row == 0
    assert float(trainer.callback_metrics["train/skipped_nonfinite"]) == 1.0
    optimizer_steps = {int(s["step"]) for s in trainer.optimizers[0].state.values()}
    assert optimizer_steps == {3}, "AdamW must not count the skipped step"
    for step in (1, 2, 3, 4):
        saved = safe_torch_load(tmp_path / "checkpoints" / f"step{step}.ckpt")["state_dict"]
        assert all(torch.isfinite(v).all() for v in saved.values())
    step2 = safe_torch_load(tmp_path / "checkpoints" / "step2.ckpt")
    assert same({k[len("adapter.") :]: v for k, v in step2["state_dict"].items()}, weights.after[1])
    assert step2["callbacks"]["NumericGuard"]["skipped"] == 1  # the count survives a resume


def test_too_many_in_a_row_stop_with_one_line_naming_step_and_checkpoint(tmp_path):
    module, trainer, _, guard, loader = fit(tmp_path, nan_steps={2, 3, 4}, max_steps=4, max_consecutive=2)
    with pytest.raises(UserError) as info:
        trainer.fit(module, train_dataloaders=loader)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("step 3: 2 non-finite losses or gradients in a row")
    assert str(tmp_path / "checkpoints" / "last.ckpt") in message
    last = safe_torch_load(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2 and all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_non_finite_weights_are_never_written(tmp_path):
    module, trainer, _, _, loader = fit(tmp_path, nan_steps=set(), max_steps=1)
    trainer.fit(module, train_dataloaders=loader)
    good = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    with torch.no_grad():
        module.adapter.net[0].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(UserError, match=r"not finite at step 1 \(adapter\.net\.0\.weight\).*previous one is kept"):
        trainer.save_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == good
    with pytest.raises(UserError, match="not finite"):
        module.export_adapter(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
