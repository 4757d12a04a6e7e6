"""Real processes and real signals: ``xa-train`` killed with SIGKILL and resumed from its ``last.ckpt`` ends
where the uninterrupted run ends; SIGTERM (preemption) writes a checkpoint and exits 0.

The two ``xa-train`` processes start together (their imports overlap); the comparison runs go in-process.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from xa_lightning import cli
from xa_lightning.training import safe_torch_load

COMMON = [
    "experiment=demo/sun",
    "data.epoch_samples=8",  # epochs of 4 batches: the resumed part crosses an epoch boundary
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "trainer.log_every_n_steps=1",
    "export_adapter=false",
]
KILL_RUN = [*COMMON, "trainer.max_steps=10", "~callbacks.evaluation", "logger=csv"]
TERM_RUN = [*COMMON, "trainer.max_steps=1000", "logger=none"]  # logger=none with the default callbacks


def start(argv: list[str], run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "xa_lightning.cli", "train", *argv, f"hydra.run.dir={run_dir}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"xa-train ended early ({process.returncode}): {process.stderr.read()[-3000:]}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.2)


def losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")}


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return safe_torch_load(path)["state_dict"]


@pytest.mark.slow
def test_sigkill_then_resume_equals_the_uninterrupted_run_and_sigterm_saves_and_exits_0(tmp_path):
    killed_dir, term_dir = tmp_path / "killed", tmp_path / "preempted"
    killed, preempted = start(KILL_RUN, killed_dir), start(TERM_RUN, term_dir)

    wait_for(term_dir / "checkpoints" / "step0000002.ckpt", preempted)
    preempted.send_signal(signal.SIGTERM)
    wait_for(killed_dir / "checkpoints" / "step0000004.ckpt", killed)
    killed.send_signal(signal.SIGKILL)

    out, err = preempted.communicate(timeout=300)
    assert preempted.returncode == 0, err[-3000:]
    summary = json.loads(next(line for line in reversed(out.splitlines()) if line.startswith("{")))
    assert summary["preempted"] == "SIGTERM" and summary["checkpoint"] == str(term_dir / "checkpoints" / "last.ckpt")
    saved = safe_torch_load(term_dir / "checkpoints" / "last.ckpt")
    assert 2 <= saved["global_step"] == summary["step"] < 1000
    assert "Traceback" not in err and not (term_dir / "metrics.json").exists(), "a preempted job does not evaluate"

    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    # the kill may land while step 4's last.ckpt is written: then the previous one (step 2) is whole
    stopped_at = safe_torch_load(killed_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert 2 <= stopped_at < 10

    resumed_dir, straight_dir = tmp_path / "resumed", tmp_path / "straight"
    resume = f"ckpt_path={killed_dir / 'checkpoints' / 'last.ckpt'}"
    assert cli.train_main([*KILL_RUN, resume, f"hydra.run.dir={resumed_dir}"]) == 0
    assert cli.train_main([*KILL_RUN, f"hydra.run.dir={straight_dir}"]) == 0

    assert not [p for p in (killed_dir / "checkpoints").iterdir() if ".tmp-" in p.name], "stale temp file kept"
    straight_weights = adapter(straight_dir / "checkpoints" / "last.ckpt")
    resumed_weights = adapter(resumed_dir / "checkpoints" / "last.ckpt")
    for key, value in straight_weights.items():
        assert (resumed_weights[key] - value).abs().max() <= 1e-6, key
    straight_losses, resumed_losses = losses(straight_dir), losses(resumed_dir)
    assert sorted(resumed_losses) == [s for s in sorted(straight_losses) if s >= stopped_at]
    for step, loss in resumed_losses.items():
        assert loss == pytest.approx(straight_losses[step], abs=1e-6), step
