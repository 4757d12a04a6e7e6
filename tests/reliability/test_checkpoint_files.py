"""Checkpoint files under crashes and full disks: stale temporaries removed, a full disk fails before
writing, ``keep_last_k`` prunes, ``ckpt_path=last`` matches the run name exactly and passes over a cut
file, a restarted job continues from its own directory."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import namedtuple

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from tests.foundation.toy_method import ResidualEpsModule, loader
from xa_lightning.errors import UserError
from xa_lightning.train import find_last_checkpoint, resolve_ckpt_path
from xa_lightning.training import (
    AdapterCheckpoint,
    AtomicCheckpointIO,
    atomic_torch_save,
    checkpoint_io,
    safe_torch_load,
)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporary_files_of_killed_saves_are_removed_at_the_next_start(tmp_path):
    atomic_torch_save({"state_dict": {"adapter.w": torch.ones(2)}}, tmp_path / "last.ckpt")
    stale = tmp_path / f".last.ckpt.tmp-{dead_pid()}"
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f".step0000002.ckpt.tmp-{os.getppid()}"  # a save still running in a live process
    live.write_bytes(b"being written")

    AtomicCheckpointIO().load_checkpoint(tmp_path / "last.ckpt")  # a resume from this directory

    assert not stale.exists() and live.exists()


def test_a_full_disk_fails_before_writing_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"adapter.w": torch.ones(2)}}, path)
    good = path.read_bytes()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint_io.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 2**20, 2**20))

    with pytest.raises(UserError) as info:
        io.save_checkpoint({"state_dict": {"adapter.w": torch.zeros(2**20)}}, path)

    message = str(info.value)
    assert "\n" not in message and f"not enough free space in {tmp_path}" in message
    assert "the previous last.ckpt is kept" in message and "callbacks.model_checkpoint.dirpath" in message
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_keep_last_k_keeps_the_newest_periodic_checkpoints(tmp_path):
    saver = AdapterCheckpoint(
        dirpath=tmp_path, filename="step{step}", auto_insert_metric_name=False, every_n_train_steps=1, keep_last_k=2
    )
    saver.save_last = True
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[saver],
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(ResidualEpsModule(), train_dataloaders=loader())
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt", "step3.ckpt", "step4.ckpt"]
    with pytest.raises(UserError, match="keep_last_k=-2"):
        AdapterCheckpoint(keep_last_k=-2)


def checkpoint(path, step: int) -> None:
    atomic_torch_save({"global_step": step, "state_dict": {"adapter.w": torch.full((2,), float(step))}}, path)


def test_ckpt_path_last_matches_the_run_name_exactly_and_passes_over_a_cut_file(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    ours = tmp_path / "outputs" / "2025-01-01" / "10-00-00_sun" / "checkpoints"
    theirs = tmp_path / "outputs" / "2025-01-01" / "11-00-00_demo_sun" / "checkpoints"  # newer, other run
    sweep_job = tmp_path / "multirun" / "2025-01-01" / "09-00-00_sun" / "0" / "checkpoints"
    for directory, step in ((sweep_job, 2), (ours, 4), (theirs, 9)):
        directory.mkdir(parents=True)
        checkpoint(directory / "last.ckpt", step)
    os.utime(sweep_job / "last.ckpt", (1, 1))

    assert find_last_checkpoint("sun") == ours.parent.relative_to(tmp_path) / "checkpoints" / "last.ckpt"
    assert safe_torch_load(find_last_checkpoint("demo_sun"))["global_step"] == 9

    # the newest last.ckpt was cut short (a copy, a full disk): reported, and the newest whole one is used
    checkpoint(ours / "step0000004.ckpt", 4)
    os.utime(ours / "step0000004.ckpt", (100, 100))
    data = (ours / "last.ckpt").read_bytes()
    (ours / "last.ckpt").write_bytes(data[: len(data) // 2])
    found = find_last_checkpoint("sun")
    assert found.name == "step0000004.ckpt"
    assert "last.ckpt is unreadable (cut short" in caplog.text
    with pytest.raises(UserError, match="no checkpoints/last.ckpt of an earlier run named 'su'"):
        find_last_checkpoint("su")


def test_a_restarted_job_continues_from_its_own_directory(tmp_path):
    own = tmp_path / "checkpoints"
    own.mkdir()
    cfg = OmegaConf.create({"ckpt_path": None, "auto_resume": True, "run_name": "x"})
    assert resolve_ckpt_path(cfg, own) is None  # a fresh run
    checkpoint(own / "last.ckpt", 6)
    assert resolve_ckpt_path(cfg, own) == str(own / "last.ckpt")
    cfg.auto_resume = False
    assert resolve_ckpt_path(cfg, own) is None
