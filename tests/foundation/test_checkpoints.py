"""Checkpoints hold only trainable state, are atomic, refuse the wrong method/backbone, and resume exactly."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch

from tests.foundation.toy_method import ResidualEpsModule, loader
from xa_lightning.errors import UserError
from xa_lightning.training import (
    AtomicCheckpointIO,
    atomic_torch_save,
    load_checkpoint_state,
    load_method,
    safe_torch_load,
)


def make_trainer(tmp_path, max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        **kwargs,
    )


def adapter_tensors(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.adapter.state_dict().items()}


def test_checkpoint_holds_only_adapter_state(tmp_path):
    module = ResidualEpsModule()
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(module, train_dataloaders=loader())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    ckpt = torch.load(path, weights_only=True)  # loads without executing code
    assert ckpt["state_dict"], "adapter state missing"
    assert all(k.startswith("adapter.") for k in ckpt["state_dict"])
    assert set(ckpt["state_dict"]) == {f"adapter.{k}" for k in module.adapter.state_dict()}
    assert ckpt["xa"]["method"] == "residual_eps_test"
    assert ckpt["xa"]["backbones"] == {"backbone": module.backbone.id}
    # The file does not grow with the frozen backbone: it is far smaller than the backbone's weights.
    backbone_bytes = sum(p.numel() * p.element_size() for p in module.backbone.parameters())
    adapter_bytes = sum(p.numel() * p.element_size() for p in module.adapter.parameters())
    assert os.path.getsize(path) < adapter_bytes * 4 + 200_000 < backbone_bytes
    # Frozen backbone received no gradients; the adapter did train.
    assert all(p.grad is None for p in module.backbone.parameters())
    assert module.adapter.net[-1].weight.abs().sum() > 0


def test_wrong_method_or_backbone_is_refused(tmp_path):
    module = ResidualEpsModule()
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit(module, train_dataloaders=loader())
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)

    other_backbone = ResidualEpsModule(family="pixart_alpha")
    with pytest.raises(UserError, match="trained on backbones"):
        other_backbone.on_load_checkpoint(safe_torch_load(path))

    class OtherMethod(ResidualEpsModule):
        method = "another_method"

    with pytest.raises(UserError, match="is for method 'residual_eps_test'"):
        make_trainer(tmp_path, max_steps=2).fit(OtherMethod(), train_dataloaders=loader(), ckpt_path=str(path))


def test_resume_equals_uninterrupted_run(tmp_path):
    """Kill after an epoch, resume from ModelCheckpoint's last.ckpt: same weights as never stopping.

    (Mid-epoch resumes restart the epoch's data with non-stateful loaders: Lightning's behaviour.)
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    straight = ResidualEpsModule()
    make_trainer(tmp_path / "straight", max_steps=8, enable_checkpointing=False).fit(
        straight, train_dataloaders=loader()
    )

    first = ResidualEpsModule()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2, save_last=True, save_top_k=-1)
    make_trainer(tmp_path / "resumed", max_steps=4, callbacks=[saver]).fit(first, train_dataloaders=loader())

    resumed = ResidualEpsModule()
    make_trainer(tmp_path / "resumed", max_steps=8, enable_checkpointing=False).fit(
        resumed, train_dataloaders=loader(), ckpt_path=str(tmp_path / "ckpts" / "last.ckpt")
    )

    for key, value in adapter_tensors(straight).items():
        torch.testing.assert_close(adapter_tensors(resumed)[key], value, rtol=0, atol=1e-6)
    assert resumed.samples_seen == straight.samples_seen == 16


def test_atomic_save_keeps_previous_checkpoint_when_killed(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"state_dict": {"adapter.w": torch.ones(3)}}, path)

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt  # as if the job were killed mid-write

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"state_dict": {"adapter.w": torch.zeros(3)}}, path)
    monkeypatch.undo()

    loaded = safe_torch_load(path)
    torch.testing.assert_close(loaded["state_dict"]["adapter.w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "temporary file left behind"


def test_unreadable_checkpoint_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"cannot read checkpoint .*bad\.ckpt safely"):
        safe_torch_load(bad)
    with pytest.raises(UserError, match="does not exist"):
        safe_torch_load(tmp_path / "missing.ckpt")


def test_export_adapter_round_trip(tmp_path):
    module = ResidualEpsModule()
    make_trainer(tmp_path, max_steps=2).fit(module, train_dataloaders=loader())
    out = module.export_adapter(tmp_path / "adapter")
    assert (out / "diffusion_pytorch_model.safetensors").is_file()

    # diffusers' own loader reads it (what a diffusers user would do) ...
    reloaded = type(module.adapter).from_pretrained(out)
    for key, value in module.adapter.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value)
    # ... and our loader checks method and backbone first.
    fresh = ResidualEpsModule()
    fresh.load_adapter(out)
    x = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(fresh.adapter(x), module.adapter(x))
    with pytest.raises(UserError, match="trained on backbones"):
        ResidualEpsModule(family="pixart_alpha").load_adapter(out)


def test_load_method_rebuilds_from_checkpoint_config(tmp_path):
    module = ResidualEpsModule()
    module.run_config = {"method": {"_target_": f"{ResidualEpsModule.__module__}.ResidualEpsModule"}}
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(module, train_dataloaders=loader())
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)

    rebuilt = load_method(path)
    assert isinstance(rebuilt, ResidualEpsModule)
    for key, value in module.adapter.state_dict().items():
        torch.testing.assert_close(rebuilt.adapter.state_dict()[key], value)


def test_checkpoint_state_loads_into_a_built_module_after_the_checks(tmp_path):
    """What ``xa-train train=false ckpt_path=...`` and ``load_method`` share: checks first, then the adapter."""
    module = ResidualEpsModule()
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(module, train_dataloaders=loader())
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    checkpoint = safe_torch_load(tmp_path / "m.ckpt")

    fresh = ResidualEpsModule()
    assert load_checkpoint_state(fresh, checkpoint, source="m.ckpt") is fresh
    for key, value in adapter_tensors(module).items():
        assert torch.equal(fresh.adapter.state_dict()[key], value)
    assert fresh.samples_seen == module.samples_seen == 4
    other = ResidualEpsModule(family="pixart_alpha")
    untouched = adapter_tensors(other)
    with pytest.raises(UserError, match="m.ckpt was trained on backbones"):
        load_checkpoint_state(other, checkpoint, source="m.ckpt")
    for key, value in untouched.items():
        assert torch.equal(other.adapter.state_dict()[key], value)
