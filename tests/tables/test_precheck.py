"""The CLI's up-front check accepts every Hydra sweep syntax and composes a sweep's first job, table sweeps too."""

from __future__ import annotations

import pytest

from xa_lightning import cli
from xa_lightning.config import compose, validate


@pytest.mark.parametrize(
    "override,key,first",
    [
        ("seed=3,4", "seed", 3),
        ("seed=range(5,8)", "seed", 5),
        ("seed=choice(7,8)", "seed", 7),
        ("method.optimizer.lr=interval(1e-5,1e-3)", "method.optimizer.lr", 1e-5),
        ("method.optimizer.lr=tag(log,interval(1e-5,1e-3))", "method.optimizer.lr", 1e-5),
        ("backbone=glob(sdxl_t*)", "backbone.family", "sdxl"),
    ],
)
def test_every_sweep_syntax_composes_its_first_job(override, key, first):
    from omegaconf import OmegaConf

    cfg = compose("train", [override], multirun=True)
    validate(cfg)
    assert OmegaConf.select(cfg, key) == first


def test_a_sweep_over_nothing_is_one_line():
    from xa_lightning.errors import UserError

    with pytest.raises(UserError, match=r"^experiment=glob\(demo/s\*\) sweeps over nothing; check the pattern$"):
        compose("train", ["experiment=glob(demo/s*)"], multirun=True)


def test_an_experiment_s_own_grid_and_a_table_sweep_compose_their_first_job():
    grid = compose("train", ["experiment=sun/ablation_objective"], multirun=True)
    assert grid.method.distillation.objective == "msc"
    table = compose("train", ["+table=sun_steps", "table.scale=tiny"])  # the table file sets hydra.mode
    assert (table.table.run, table.seed, table.backbone.flavour) == ("steps_1", 0, "tiny")
    chosen = compose("train", ["+table=sun_steps", "+table_run=sun_steps/paper/steps_8", "seed=7"])
    assert (chosen.table.run, chosen.seed, chosen.method.sampling.steps, chosen.eval.seed) == ("steps_8", 7, 8, 7)
    # the run's experiment has its own grid (objective: msc,cfg_eps,weighted); one table run pins it
    pinned = compose("train", ["+table=sun_ablations", "+table_run=sun_ablations/paper/cfg_eps"], multirun=True)
    assert (pinned.table.run, pinned.method.distillation.objective) == ("cfg_eps", "cfg_eps")


def test_a_bad_table_sweep_stops_at_the_door_with_one_line(tmp_path, capsys):
    assert cli.train_main(["-m", "+table=sun_step", f"hydra.sweep.dir={tmp_path / 'a'}"]) == 2
    assert cli.train_main(["-m", "+table=sun_steps", "trainer.max_stepz=1", f"hydra.sweep.dir={tmp_path / 'b'}"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[0].startswith("xa-train: error: table=sun_step is not a config option; available:")
    assert errors[1] == (
        "xa-train: error: unknown config key 'trainer.max_stepz'; check its spelling (to add a new key on purpose "
        "use +trainer.max_stepz=...)"
    )
    assert not any(tmp_path.iterdir())


def test_a_command_registers_only_the_tables_it_names():
    """Hydra deep-copies every ConfigStore node on each compose: registering all tables' runs up front made
    every compose slower and `xa-train --help` take half a minute. Only the named table's runs are added."""
    from hydra.core.config_store import ConfigStore

    from xa_lightning.reporting import sweeps

    assert sweeps.tables_named(["+table=sun_steps", "table.scale=tiny", "seed=0,1"]) == {"sun_steps"}
    assert sweeps.tables_named(["+table_run=a4a_table1/tiny/a4a,a4a_table1/tiny/upgraded"]) == {"a4a_table1"}
    assert sweeps.tables_named(["experiment=demo/sun", "table_name=x"]) == set()
    cfg = compose("train", ["+table=sun_ablations", "table.scale=tiny"], multirun=True)
    assert cfg.table.name == "sun_ablations"
    assert "sun_ablations" in ConfigStore.instance().repo["table_run"]
