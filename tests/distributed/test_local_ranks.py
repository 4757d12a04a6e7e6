"""``local_ranks`` around ``trainer.fit`` in the process that started the other local ranks (real processes,
Lightning's real launcher): a failed rank fails the job, rank 0's failure stops the others, nothing is left
behind for the next job of a sweep; and a process that cannot be re-run is told how to start."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

from xa_lightning import distributed
from xa_lightning.errors import UserError


def trainer_with_ranks(tmp_path, *commands: list[str]) -> SimpleNamespace:
    launcher = _SubprocessScriptLauncher(LightningEnvironment(), num_processes=1 + len(commands), num_nodes=1)
    launcher.procs.extend(subprocess.Popen(command) for command in commands)
    return SimpleNamespace(strategy=SimpleNamespace(launcher=launcher), default_root_dir=str(tmp_path))


@pytest.fixture
def started_by_the_cli(monkeypatch):
    monkeypatch.setattr(distributed, "_main_module", lambda: distributed.CLI_MODULE)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_a_rank_that_failed_fails_the_job_and_the_launcher_environment_is_restored(tmp_path, started_by_the_cli):
    trainer = trainer_with_ranks(tmp_path, [sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(RuntimeError, match=r"rank 1 exited with status 3; its log: .*train_ddp_process_1\.log"):
        with distributed.local_ranks(trainer):
            os.environ.update(MASTER_PORT="12345", LOCAL_RANK="0")  # what Lightning's launcher sets
    assert "MASTER_PORT" not in os.environ and "LOCAL_RANK" not in os.environ
    assert trainer.strategy.launcher.procs == []  # Lightning's observer no longer watches them


def test_rank_0_failing_stops_the_other_ranks(tmp_path, started_by_the_cli):
    trainer = trainer_with_ranks(tmp_path, ["sleep", "300"])
    (waiting,) = trainer.strategy.launcher.procs
    with pytest.raises(ValueError, match="rank 0 failed"):
        with distributed.local_ranks(trainer):
            raise ValueError("rank 0 failed")
    assert waiting.poll() is not None


def test_ranks_cannot_be_started_from_another_program(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "_main_module", lambda: "pytest")
    trainer = trainer_with_ranks(tmp_path)
    trainer.strategy.launcher.num_processes = 2
    with pytest.raises(UserError, match=r"start multi-process training with xa-train or python -m xa_lightning\.cli"):
        with distributed.local_ranks(trainer):
            pass


def test_ranks_keep_rank_0s_hydra_settings_but_not_its_run_layout():
    kept = ["hydra.job.chdir=true", "hydra/job_logging=disabled", "hydra.verbose=true"]
    dropped = ["hydra.mode=MULTIRUN", "hydra.run.dir=x", "hydra.sweep.subdir=1", "hydra/launcher=slurm"]
    dropped += [
        "hydra.launcher.partition=gpu",
        "hydra.job.name=train",
        "hydra.output_subdir=null",
        "+hydra.sweeper.n_trials=3",
    ]
    assert [o for o in kept + dropped if not distributed._defines_the_run(o)] == kept
