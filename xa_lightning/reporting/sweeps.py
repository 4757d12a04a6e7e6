"""``xa-train -m +table=<name>``: one Hydra job per run of a paper table and seed.

``conf/table/<name>.yaml`` sweeps ``+table_run`` over the table's runs and ``seed`` over its seeds; both
lists come from ``evaluation/tables/<name>.yaml`` through two resolvers, so the table file stays the one
place that says what runs. Every run of a table the command names is a config option
``table_run/<table>/<scale>/<run>`` in Hydra's ConfigStore: the run's experiment, its overrides,
``eval.seed: ${seed}`` (each seed scores its own images) and ``table: {name, scale, run, runs, experiment}``
(what ``xa-tables`` and the W&B tags read). Runs with the same experiment and overrides share one job.
Runs that cannot start yet (their experiment does not exist, they declare ``needs``, or they have no tiny
version) are left out of the sweep; the builder shows them as "not run" with that reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from xa_lightning.errors import UserError
from xa_lightning.paths import repo_root
from xa_lightning.reporting.schema import SCALES, RunSpec, Table, load_table

GROUP = "table_run"
RUNS_RESOLVER = "xa.table_runs"
SEEDS_RESOLVER = "xa.table_seeds"


@dataclass(frozen=True)
class Job:
    table: str
    scale: str
    name: str
    experiment: str
    overrides: tuple[str, ...]
    runs: tuple[str, ...]

    @property
    def option(self) -> str:
        """The ``+table_run=`` value that composes this job."""
        return f"{self.table}/{self.scale}/{self.name}"


def experiment_exists(name: str) -> bool:
    return (repo_root() / "experiments" / f"{name}.yaml").is_file()


def not_runnable(run: RunSpec, scale: str) -> str | None:
    """Why ``run`` cannot be launched at ``scale`` yet, or None."""
    spec = run.at(scale)
    if spec is None:
        return "no tiny version of this run"
    if run.needs:
        return f"needs {run.needs}"
    if not experiment_exists(spec[0]):
        return f"experiment {spec[0]} does not exist yet"
    return None


def jobs(table: Table, scale: str) -> list[Job]:
    """The jobs of one seed of the table's sweep at ``scale`` (runs with equal specs share one)."""
    grouped: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for run in table.runs.values():
        if not_runnable(run, scale) is None:
            experiment, overrides = run.at(scale)  # type: ignore[misc]
            grouped.setdefault((experiment, tuple(sorted(overrides))), []).append(run.name)
    result = []
    for (experiment, _), names in grouped.items():
        overrides = table.runs[names[0]].at(scale)[1]  # type: ignore[index]
        result.append(Job(table.name, scale, names[0], experiment, overrides, tuple(names)))
    return result


def experiment_sweep_keys(experiment: str) -> list[str]:
    """Keys an experiment, or an experiment it extends, sweeps in its own ``hydra.sweeper.params``."""
    import yaml

    keys: list[str] = []
    pending, seen = [experiment], set()
    while pending:
        name = pending.pop()
        path = repo_root() / "experiments" / f"{name}.yaml"
        if name in seen or not path.is_file():
            continue
        seen.add(name)
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        params = ((data.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
        keys += [str(key) for key in params if str(key) not in keys]
        for entry in data.get("defaults") or []:
            if isinstance(entry, str) and entry.startswith("/experiment/"):
                pending.append(entry.removeprefix("/experiment/"))
    return keys


def job_node(job: Job) -> dict[str, Any]:
    """The ConfigStore node of a job: experiment + overrides (groups in the defaults list, values merged).

    The experiment's own grid (its ``hydra.sweeper.params``) is pinned to the job's values, so
    ``-m +table=<name> +table_run=<one run>`` runs that run once per seed, not the experiment's grid."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from xa_lightning.config import config_dir

    conf = config_dir()
    defaults: list[Any] = [f"/experiment/{job.experiment}"]
    values = OmegaConf.create({})
    for override in OverridesParser.create().parse_overrides(list(job.overrides)):
        group = override.key_or_group
        if "." not in group and (conf / group).is_dir():  # a config group choice, e.g. eval=demo
            target = f"/{group}@{override.package}" if override.package else f"/{group}"
            defaults.append({target if override.is_add() else f"override {target}": override.value()})
        else:
            OmegaConf.update(values, group, override.value(), force_add=True)
    node = OmegaConf.to_container(values)
    assert isinstance(node, dict)
    node["eval"] = {**node.get("eval", {}), "seed": "${seed}"}
    node["table"] = {
        "name": job.table,
        "scale": job.scale,
        "run": job.name,
        "runs": list(job.runs),
        "experiment": job.experiment,
    }
    node["run_name"] = f"{job.table}_{job.name}"
    pinned = {key: "${" + key.lstrip("+~") + "}" for key in experiment_sweep_keys(job.experiment)}
    if pinned:
        node["hydra"] = {"sweeper": {"params": pinned}}
    return {"defaults": [*defaults, "_self_"], **node}


def sweep_runs(name: str, scale: str) -> str:
    """``+table_run`` values of the table's sweep, comma-separated (Hydra's sweep syntax)."""
    table = load_table(name)
    if scale not in SCALES:
        raise UserError(f"table.scale={scale} is not a scale; choose {' or '.join(SCALES)}")
    options = [job.option for job in jobs(table, scale)]
    if not options:
        reasons = "; ".join(f"{run.name}: {not_runnable(run, scale)}" for run in table.runs.values())
        raise UserError(f"table {name} has no run that can start at scale {scale} ({reasons})")
    return ",".join(options)


def sweep_seeds(name: str, scale: str) -> str:
    return ",".join(str(seed) for seed in load_table(name).seeds(scale))


_registered_tables: set[str] = set()


def tables_named(overrides: Iterable[str]) -> set[str]:
    """The tables a command line names: ``+table=<name>`` (or a comma list), ``+table_run=<name>/...``."""
    names: set[str] = set()
    for override in overrides:
        key, _, value = str(override).partition("=")
        key = key.lstrip("+~")
        if key in ("table", GROUP) and value:
            names.update(part.strip().split("/")[0] for part in value.split(",") if part.strip())
    return names


def register(tables: Iterable[str] = ()) -> None:
    """Register the sweep resolvers, and the jobs of ``tables`` as config options (each table once).

    Only the tables a command names: Hydra deep-copies every ConfigStore node each time it composes, so
    all seven tables' nodes made every compose ~0.1 s slower and ``xa-train --help`` take half a minute.
    A broken table file is skipped here (so it never breaks unrelated commands); ``+table=<name>`` then
    reports its error through the resolvers.
    """
    from hydra.core.config_store import ConfigStore

    if not OmegaConf.has_resolver(RUNS_RESOLVER):
        OmegaConf.register_new_resolver(RUNS_RESOLVER, sweep_runs)
    if not OmegaConf.has_resolver(SEEDS_RESOLVER):
        OmegaConf.register_new_resolver(SEEDS_RESOLVER, sweep_seeds)
    store = ConfigStore.instance()
    for name in sorted(set(tables) - _registered_tables):
        try:
            table = load_table(name)
        except UserError:
            continue
        for scale in SCALES:
            for job in jobs(table, scale):
                store.store(group=f"{GROUP}/{name}/{scale}", name=job.name, node=job_node(job), package="_global_")
        _registered_tables.add(name)
