"""Two DDP ranks (gloo on the CPU) started from the real command line, for every method.

One process tree each: ``xa-train`` (the console script) for SUN with a tiny evaluation at the end, and
``python -m xa_lightning.cli train -m`` for X-Adapter and A4A as one sweep. A probe callback
(:mod:`tests.distributed.probe`) writes what each rank saw into the run directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
TWO_CPU_RANKS = [
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.precision=32-true",
    "trainer.max_steps=2",
    "+callbacks.rank_probe._target_=tests.distributed.probe.RankProbe",
]


def run_cli(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def probes(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / "rank_probe" / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def adapter_digest(export_dir: Path) -> str:
    """The probe's digest of the exported weights (same names, same order, same bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(export_dir / "diffusion_pytorch_model.safetensors").items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_two_ranks_ran_one_job(run_dir: Path) -> list[dict]:
    ranks = probes(run_dir)
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert ranks[0]["pid"] != ranks[1]["pid"]
    assert {r["run_dir"] for r in ranks} == {str(run_dir.resolve())}, "both ranks work in the job's directory"
    assert ranks[0]["adapter_sha256"] == ranks[1]["adapter_sha256"], "the adapter differs between the ranks"
    assert adapter_digest(run_dir / "adapter") == ranks[0]["adapter_sha256"], "the export is not the trained adapter"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert len(ranks[0]["keys"]) == len(ranks[1]["keys"]) > 0
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"]), "the ranks trained on the same samples"
    # train/loss is averaged over the ranks: both log the same value, the mean of their own last losses
    assert ranks[0]["logged_loss"] == ranks[1]["logged_loss"]
    own_last = [r["losses"][-1] for r in ranks]
    assert own_last[0] != own_last[1]
    assert ranks[0]["logged_loss"] == pytest.approx(sum(own_last) / 2, rel=1e-5)
    assert (run_dir / "train_ddp_process_1.log").is_file(), "rank 1 logs beside rank 0"
    return ranks


def summary_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith('{"run_dir"')]


@pytest.mark.slow
def test_sun_on_two_ranks_from_the_console_script(tmp_path):
    xa_train = Path(sys.executable).parent / "xa-train"
    tiny_eval = ["eval.num_images=4", "eval.batch_size=2", "eval.metrics=[fid]"]
    result = run_cli([str(xa_train), "experiment=demo/sun", *TWO_CPU_RANKS, *tiny_eval], tmp_path)

    run_dirs = list((tmp_path / "outputs").glob("*/*"))
    assert len(run_dirs) == 1, run_dirs
    assert not (tmp_path / "multirun").exists()
    run_dir = run_dirs[0]
    ranks = check_two_ranks_ran_one_job(run_dir)
    (summary,) = summary_lines(result.stdout)  # rank 0 alone prints it
    assert Path(summary["run_dir"]).resolve() == run_dir.resolve()
    assert summary["metrics"]["train/loss"] == pytest.approx(ranks[0]["logged_loss"])
    # the evaluation ran sharded over both ranks, which agree on the result that rank 0 wrote
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written["num_images"] == 4
    for key in ("eval/sun/fid", "eval/teacher/fid", "eval/sun_vs_teacher/fid"):
        assert ranks[0]["eval"][key] == ranks[1]["eval"][key] == pytest.approx(written["metrics"][key])


@pytest.mark.slow
def test_x_adapter_and_a4a_on_two_ranks_from_python_m_in_one_sweep(tmp_path):
    command = [sys.executable, "-m", "xa_lightning.cli", "train", "-m", "experiment=demo/x_adapter,demo/a4a"]
    result = run_cli([*command, *TWO_CPU_RANKS, "eval.at_end=false"], tmp_path)

    assert not (tmp_path / "outputs").exists(), "a rank left the sweep for a run directory of its own"
    assert len(list((tmp_path / "multirun").glob("*/*/multirun.yaml"))) == 1, "a rank started a second sweep"
    configs = (tmp_path / "multirun").glob("*/*/*/.hydra/config.yaml")
    job_dirs = sorted((path.parent.parent for path in configs), key=lambda job_dir: int(job_dir.name))
    assert [path.name for path in job_dirs] == ["0", "1"]
    assert all(path.parent.name.endswith(name) for path, name in zip(job_dirs, ("x_adapter", "a4a"), strict=True))
    for job_dir in job_dirs:
        check_two_ranks_ran_one_job(job_dir)
    assert [Path(s["run_dir"]).resolve() for s in summary_lines(result.stdout)] == [d.resolve() for d in job_dirs]
