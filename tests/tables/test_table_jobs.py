"""Every job of every table sweep composes, validates and runs what its table says.

One test per job (``+table_run=<table>/<scale>/<run>``, what ``xa-train -m +table=...`` launches): it
composes with the run's experiment, passes the CLI's up-front validation, carries the table's
bookkeeping (``table.runs``, ``eval.seed``), and every override of its runs holds in the composed config
(the builder matches runs by exactly that). Runs whose experiment does not exist yet are skipped, naming it.
Hydra composes a job in ~1 s here, so the ~80 jobs are marked slow.
"""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from xa_lightning.config import _without_hydra_node, config_dir, register_resolvers, validate
from xa_lightning.reporting.build import override_holds
from xa_lightning.reporting.runs import RunRecord
from xa_lightning.reporting.schema import SCALES, load_tables
from xa_lightning.reporting.sweeps import experiment_exists, jobs

TABLES = load_tables()
JOBS = [
    pytest.param(table, job, id=f"{job.option}", marks=pytest.mark.slow)
    for table in TABLES
    for scale in SCALES
    for job in jobs(table, scale)
]
NOT_YET = [
    pytest.param(table, run, scale, id=f"{table.name}/{scale}/{run.name}")
    for table in TABLES
    for run in table.runs.values()
    for scale in SCALES
    if run.at(scale) is not None and not run.needs and not experiment_exists(run.at(scale)[0])
]


@pytest.fixture(scope="module")
def compose_train():
    """Hydra's compose API in one initialised context for the whole module (the CLI's compose re-initialises)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers([f"+table={table.name}" for table in TABLES])  # as the CLI does for +table=<name>
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        yield lambda overrides: compose(config_name="train", overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()


def test_the_issue_s_tables_exist():
    names = {table.name for table in TABLES}
    assert {
        "x_adapter_table1",
        "x_adapter_ablations",
        "sun_steps",
        "sun_ablations",
        "a4a_table1",
        "a4a_curves",
        "a4a_ablations",
    } <= names


@pytest.mark.parametrize("table,job", JOBS)
def test_table_job_composes_validates_and_holds_its_overrides(compose_train, table, job):
    cfg = compose_train([f"+table_run={job.option}", "seed=10000"])
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    job_cfg = _without_hydra_node(cfg)
    validate(job_cfg)
    assert (job_cfg.table.name, job_cfg.table.scale, list(job_cfg.table.runs)) == (
        table.name,
        job.scale,
        list(job.runs),
    )
    assert job_cfg.run_name == f"{table.name}_{job.name}"
    assert OmegaConf.to_container(job_cfg.eval, resolve=False)["seed"] == "${seed}"
    record = RunRecord(path=config_dir(), config=job_cfg, choices={k: str(v) for k, v in choices.items() if v})
    assert (record.experiment, record.seed) == (job.experiment, 10000)
    for run in job.runs:
        for override in table.runs[run].at(job.scale)[1]:
            assert override_holds(record, override), f"{run}: {override} does not hold in the composed job"


def test_every_run_of_every_table_has_its_experiment():
    """A run whose experiment file is missing would silently drop out of its table's sweep."""
    missing = [f"{table.name}.{run.name}@{scale}: {run.at(scale)[0]}" for table, run, scale in NOT_YET]
    assert not missing, f"experiments the tables name but experiments/ lacks: {missing}"
