"""The README's sweeps through the real CLI entry, in-process, on tiny backbones.

* a table sweep (``-m +table=sun_steps table.scale=tiny``) where one job fails: the other still runs, the
  failure lands in ``failed.json``, the sweep exits 1, and ``xa-tables --table`` fills the cell from it;
* the README's Optuna line (2 trials): each trial returns its run's ``optimized_metric`` and the sweeper
  writes the best parameters;
* ``hydra/launcher=slurm`` composes and instantiates submitit's SLURM launcher (nothing is submitted);
* the demo's figures (labelled sampler grid, loss curve) and results page from a finished run.
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import yaml
from PIL import Image

from xa_lightning import cli, demo
from xa_lightning.reporting.runs import read_run

pytestmark = pytest.mark.slow
TINY_EVAL = ["eval.metrics=[fid]", "eval.num_images=2", "eval.batch_size=2"]


@pytest.fixture(scope="module")
def table_sweep(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("table_sweep") / "sweep"
    code = cli.train_main(
        [
            "-m",
            "+table=sun_steps",
            "table.scale=tiny",
            "+table_run=sun_steps/tiny/steps_1",
            "trainer.max_steps=1",
            "trainer.log_every_n_steps=1",
            "+trainer.max_time=bad,null",  # job 0: Lightning refuses the duration when the trainer is built
            *TINY_EVAL,
            f"hydra.sweep.dir={sweep}",
        ]
    )
    return code, sweep


def test_a_failing_job_does_not_stop_the_others(table_sweep, capsys):
    code, sweep = table_sweep
    assert code == 1
    failed, done = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert failed.name == "0_seed0_sun_steps_steps_1" and done.name == "1_seed0_sun_steps_steps_1"
    error = json.loads((failed / "failed.json").read_text())["error"]
    assert error.startswith("MisconfigurationException: `Timer(duration='bad')` is not a valid duration.")
    assert not (failed / "metrics.json").exists()
    record = read_run(done)
    assert record.failure is None and record.metrics["eval/sun/fid"] > 0
    assert record.table == {
        "name": "sun_steps",
        "scale": "tiny",
        "run": "steps_1",
        "runs": ["steps_1"],
        "experiment": "demo/sun",
    }
    assert (record.config_value("method.sampling.steps"), record.config_value("eval.seed"), record.seed) == (1, 0, 0)


def test_xa_tables_fills_the_table_from_the_sweep(table_sweep, tmp_path, capsys):
    _, sweep = table_sweep
    metrics = json.loads((sweep / "1_seed0_sun_steps_steps_1" / "metrics.json").read_text())["metrics"]
    capsys.readouterr()
    assert cli.tables_main(["--table", "sun_steps", str(sweep), "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tables"][0]
    assert summary["scale"] == "tiny" and summary["runs_found"] == 2
    lines = {(r["row"], r["column"]): r for r in _csv(tmp_path / "sun_steps.csv")}
    fid = lines["sun_1", "fid"]
    assert fid["status"] == "ok" and fid["n"] == "1"
    assert float(fid["mean"]) == pytest.approx(metrics["eval/sun/fid"])
    assert lines["sun_4", "fid"]["status"] == "missing"
    assert (tmp_path / "sun_steps.png").is_file()


def test_the_demo_draws_a_labelled_grid_and_the_loss_curve_of_a_run(table_sweep):
    _, sweep = table_sweep
    run = sweep / "1_seed0_sun_steps_steps_1"
    figures = demo.method_figures("sun", run)
    assert set(figures) == {"grid", "loss"}
    with Image.open(figures["grid"]) as grid:
        assert grid.size[0] > grid.size[1] > 200  # 4 prompts across, 2 samplers down
    page = demo.results_page(sweep, {}, {"sun": {"code": 0, "seconds": 1.0, "figures": figures}}, [])
    assert "![sun grid](1_seed0_sun_steps_steps_1/grid.png)" in page
    assert "![sun loss](1_seed0_sun_steps_steps_1/loss.png)" in page
    assert "tiny models with random weights" in page


def _csv(path):
    import csv

    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_readme_optuna_sweep_returns_optimized_metric_and_writes_the_best_parameters(tmp_path):
    sweep = tmp_path / "optuna"
    code = cli.train_main(
        [
            "-m",
            "hydra/sweeper=tpe",
            "optimized_metric=eval/sun/fid",
            "method.optimizer.lr=interval(1e-5,1e-3)",
            "hydra.sweeper.n_trials=2",
            "trainer.max_steps=1",
            *TINY_EVAL,
            f"hydra.sweep.dir={sweep}",
        ]
    )
    assert code == 0
    trials = {}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        lr = float(next(o for o in overrides if o.startswith("method.optimizer.lr=")).split("=", 1)[1])
        trials[lr] = read_run(job).metrics["eval/sun/fid"]
    assert len(trials) == 2 and all(1e-5 <= lr <= 1e-3 for lr in trials)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best_lr = min(trials, key=trials.get)
    assert best["best_value"] == pytest.approx(trials[best_lr])
    assert best["best_params"]["method.optimizer.lr"] == pytest.approx(best_lr)


class CrashingTrial(L.Callback):
    """A job that crashes at its first step (as out-of-memory or a CUDA fault would): not a UserError."""

    def __init__(self, crash: bool = False) -> None:
        self.crash = crash

    def on_train_start(self, trainer, pl_module) -> None:
        if self.crash:
            raise RuntimeError("simulated crash of a trial")


def test_a_crashed_optuna_trial_does_not_stop_the_study(tmp_path, capsys):
    """A trial that crashes is told to Optuna as failed and the other trials still run (Optuna's default
    max_failure_rate 0 stopped the study at the first crash); the best parameters come from the others."""
    sweep = tmp_path / "optuna"
    code = cli.train_main(
        [
            "-m",
            "hydra/sweeper=tpe",
            "optimized_metric=eval/sun/fid",
            f"+callbacks.crash._target_={__name__}.CrashingTrial",
            "+callbacks.crash.crash=choice(true,false)",
            "hydra.sweeper.n_trials=4",
            "trainer.max_steps=1",
            *TINY_EVAL,
            f"hydra.sweep.dir={sweep}",
        ]
    )
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    failed = [job for job in jobs if (job / "failed.json").is_file()]
    assert len(jobs) == 4 and 0 < len(failed) < 4, "expected a mix of crashed and finished trials"
    assert code != 0
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_params"]["+callbacks.crash.crash"] is False


def test_the_slurm_launcher_config_composes_and_instantiates_its_launcher():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from xa_lightning.config import config_dir, register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(
                config_name="train",
                overrides=[
                    "hydra/launcher=slurm",
                    "trainer=ddp",
                    "trainer.devices=8",
                    "trainer.num_nodes=2",
                    "hydra.launcher.partition=gpu",
                    "hydra.launcher.account=myproj",
                    "experiment=x_adapter/sd15_to_sdxl",
                ],
                return_hydra_config=True,
            )
            launcher = instantiate(cfg.hydra.launcher)
    finally:
        GlobalHydra.instance().clear()
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    assert isinstance(launcher, SlurmLauncher)
    params = launcher.params
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (2, 8, 8)
    assert (params["partition"], params["account"]) == ("gpu", "myproj")
