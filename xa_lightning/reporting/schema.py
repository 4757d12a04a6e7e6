"""The paper tables as data: ``evaluation/tables/<name>.yaml``, loaded and checked.

A table file says which runs fill it and where each number comes from::

    title, source                what is reproduced, from which paper
    protocol:                    split, num_images, seeds (one job per run and seed), notes
    tiny_seeds: [0]              seeds of the tiny version (``table.scale=tiny``)
    runs:                        the jobs of the table's sweep (times the seeds)
      <run>: {experiment, overrides, tiny, needs}
    kind: table                  (the default)
      columns: {<col>: {label, better, scale, note}}
      rows:    {<row>: {label, runs | run, x, paper: {<col>: value}, cells: {<col>: metric | {...}}}}
      benchmarks: {<name>: {command, key}}      cells with ``bench: <name>`` read ``bench/<name>.json``
      plot:    {x_label, columns}               rows with ``x`` drawn against it (e.g. sampling steps)
    kind: curves
      x: samples_seen | step, x_label, log_x
      panels:  {<panel>: {label, better}}
      series:  {<series>: {label, run, metrics: {<panel>: metric}}}
      paper_points: [{panel, label, x, y, approx}]

A run's ``tiny`` is the same run on tiny models and demo data: an experiment name (same overrides) or
``{experiment, overrides}``. ``needs`` (on a run or a cell) says what is missing before it can run; the
builder shows it as "not run". Paper values are numbers, ``{value, std}`` or ``{text}``; a value the
paper does not give is left out, never estimated.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from xa_lightning.errors import UserError
from xa_lightning.paths import repo_root

SCALES = ("paper", "tiny")
KINDS = ("table", "curves")
CURVE_X = ("samples_seen", "step")


def tables_dir() -> Path:
    return repo_root() / "evaluation" / "tables"


def table_names() -> list[str]:
    return sorted(path.stem for path in tables_dir().glob("*.yaml"))


@dataclass(frozen=True)
class RunSpec:
    """One run of a table (a job per seed): an experiment and its overrides, at paper and tiny scale."""

    name: str
    experiment: str
    overrides: tuple[str, ...] = ()
    tiny_experiment: str | None = None
    tiny_overrides: tuple[str, ...] = ()
    needs: str | None = None

    def at(self, scale: str) -> tuple[str, tuple[str, ...]] | None:
        """(experiment, overrides) at that scale; None when the run has no tiny version."""
        if scale == "paper":
            return self.experiment, self.overrides
        if self.tiny_experiment is None:
            return None
        return self.tiny_experiment, self.tiny_overrides


@dataclass(frozen=True)
class PaperValue:
    value: float | None = None
    std: float | None = None
    text: str | None = None

    def __str__(self) -> str:
        if self.text is not None:
            return self.text
        assert self.value is not None
        return f"{self.value:.4g} ± {self.std:.2g}" if self.std is not None else f"{self.value:.4g}"


@dataclass(frozen=True)
class Cell:
    """Where one number comes from: a metric of some runs (pooled over runs and seeds), or a benchmark."""

    metric: str | None = None
    runs: tuple[str, ...] = ()
    bench: str | None = None
    needs: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    better: str | None = None  # lower | higher
    scale: float = 1.0  # our value x scale = the paper's unit (clip_score is logged x100)
    note: str | None = None


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    cells: dict[str, Cell]
    paper: dict[str, PaperValue] = field(default_factory=dict)
    x: float | None = None


@dataclass(frozen=True)
class Benchmark:
    name: str
    command: str
    key: str = "ratio"


@dataclass(frozen=True)
class Protocol:
    split: str
    seeds: tuple[int, ...]
    num_images: int | None = None
    notes: str | None = None


@dataclass(frozen=True)
class Plot:
    x_label: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class Series:
    key: str
    label: str
    run: str
    metrics: dict[str, str]


@dataclass(frozen=True)
class PaperPoint:
    panel: str
    label: str
    x: float
    y: float
    approx: bool = False


@dataclass(frozen=True)
class Table:
    name: str
    path: Path
    kind: str
    title: str
    source: str
    protocol: Protocol
    tiny_seeds: tuple[int, ...]
    runs: dict[str, RunSpec]
    columns: dict[str, Column] = field(default_factory=dict)
    rows: dict[str, Row] = field(default_factory=dict)
    benchmarks: dict[str, Benchmark] = field(default_factory=dict)
    plot: Plot | None = None
    x: str = "samples_seen"
    x_label: str = "Sample Count"
    log_x: bool = False
    panels: dict[str, Column] = field(default_factory=dict)
    series: dict[str, Series] = field(default_factory=dict)
    paper_points: tuple[PaperPoint, ...] = ()

    def seeds(self, scale: str) -> tuple[int, ...]:
        return self.protocol.seeds if scale == "paper" else self.tiny_seeds


# ---------------------------------------------------------------------------------------------- loading
class _Reader:
    """Typed access to the parsed YAML; every problem is one UserError naming the file and the key."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, path: str, message: str) -> NoReturn:
        raise UserError(f"{self.file}: {path} {message}")

    def mapping(self, value: Any, path: str, allowed: Iterable[str], required: Iterable[str] = ()) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            self.fail(path, f"must be a mapping, got {type(value).__name__}")
        allowed = list(allowed)
        for key in value:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean {close[0]}?)" if close else f"; allowed: {', '.join(allowed)}"
                self.fail(f"{path}.{key}" if path else str(key), f"is not a table setting{hint}")
        for key in required:
            if value.get(key) is None:
                self.fail(f"{path}.{key}" if path else key, "is required")
        return dict(value)

    def keyed(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, Mapping) or not value:
            self.fail(path, "must be a non-empty mapping of name -> entry")
        return {str(k): v for k, v in value.items()}

    def text(self, value: Any, path: str, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(path, f"must be a non-empty string, got {value!r}")
        return value.strip()

    def number(self, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(path, f"must be a number, got {value!r}")
        return float(value)

    def strings(self, value: Any, path: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            self.fail(path, f"must be a list of strings, got {value!r}")
        return tuple(self.text(v, f"{path}[{i}]") for i, v in enumerate(value))  # type: ignore[misc]

    def seeds(self, value: Any, path: str) -> tuple[int, ...]:
        if not isinstance(value, list) or not value:
            self.fail(path, "must be a non-empty list of integer seeds")
        if any(isinstance(s, bool) or not isinstance(s, int) for s in value):
            self.fail(path, f"must be integers, got {value!r}")
        if len(set(value)) != len(value):
            self.fail(path, f"has repeated seeds: {value!r}")
        return tuple(value)

    def overrides(self, value: Any, path: str) -> tuple[str, ...]:
        """Hydra overrides as typed on the command line; plain values only (one job per run and seed)."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        items = self.strings(value, path)
        parser = OverridesParser.create()
        for index, item in enumerate(items):
            try:
                override = parser.parse_override(item)
            except Exception as exc:
                self.fail(f"{path}[{index}]", f"is not a Hydra override ({str(exc).splitlines()[0]})")
            if override.is_sweep_override() or override.is_delete():
                self.fail(f"{path}[{index}]", f"must set one value ({item!r}); the table's seeds make the sweep")
        return items

    def paper_value(self, value: Any, path: str) -> PaperValue:
        if isinstance(value, Mapping):
            data = self.mapping(value, path, ("value", "std", "text"))
            if data.get("text") is not None:
                return PaperValue(text=self.text(data["text"], f"{path}.text"))
            if data.get("value") is None:
                self.fail(path, "needs value (and optionally std) or text")
            std = data.get("std")
            return PaperValue(
                self.number(data["value"], f"{path}.value"),
                self.number(std, f"{path}.std") if std is not None else None,
            )
        return PaperValue(self.number(value, path))


def _experiment_name(reader: _Reader, value: Any, path: str) -> str:
    name = reader.text(value, path)
    assert name is not None
    if name.endswith(".yaml") or name.startswith("/"):
        reader.fail(path, f"is an experiment name as in `experiment=<name>` (e.g. sun/sd15_msc), got {name!r}")
    return name


def _run(reader: _Reader, name: str, value: Any) -> RunSpec:
    path = f"runs.{name}"
    data = reader.mapping(value, path, ("experiment", "overrides", "tiny", "needs"), required=("experiment",))
    overrides = reader.overrides(data.get("overrides"), f"{path}.overrides")
    tiny_experiment, tiny_overrides = None, ()
    tiny = data.get("tiny")
    if isinstance(tiny, Mapping):
        tiny_data = reader.mapping(tiny, f"{path}.tiny", ("experiment", "overrides"), required=("experiment",))
        tiny_experiment = _experiment_name(reader, tiny_data["experiment"], f"{path}.tiny.experiment")
        tiny_overrides = reader.overrides(tiny_data.get("overrides"), f"{path}.tiny.overrides")
    elif tiny is not None:
        tiny_experiment, tiny_overrides = _experiment_name(reader, tiny, f"{path}.tiny"), overrides
    return RunSpec(
        name=name,
        experiment=_experiment_name(reader, data["experiment"], f"{path}.experiment"),
        overrides=overrides,
        tiny_experiment=tiny_experiment,
        tiny_overrides=tiny_overrides,
        needs=reader.text(data.get("needs"), f"{path}.needs", optional=True),
    )


def _column(reader: _Reader, key: str, value: Any, path: str) -> Column:
    data = reader.mapping(value, path, ("label", "better", "scale", "note"), required=("label",))
    better = data.get("better")
    if better not in (None, "lower", "higher"):
        reader.fail(f"{path}.better", f"must be lower or higher, got {better!r}")
    scale = reader.number(data.get("scale", 1.0), f"{path}.scale")
    return Column(key, reader.text(data["label"], f"{path}.label"), better, scale, data.get("note"))  # type: ignore[arg-type]


def _cell(reader: _Reader, value: Any, path: str, row_runs: tuple[str, ...], table: dict[str, Any]) -> Cell:
    if isinstance(value, str):
        value = {"metric": value}
    data = reader.mapping(value, path, ("metric", "run", "runs", "bench", "needs", "note"))
    if (data.get("metric") is None) == (data.get("bench") is None):
        reader.fail(path, "needs exactly one of metric (a logged key, e.g. eval/sun/fid) or bench")
    if data.get("bench") is not None:
        bench = reader.text(data["bench"], f"{path}.bench")
        if bench not in table.get("benchmarks", {}):
            reader.fail(
                f"{path}.bench", f"{bench!r} is not one of benchmarks: {', '.join(table.get('benchmarks', {}))}"
            )
        return Cell(bench=bench, note=data.get("note"))
    runs = _runs_of(reader, data, path) or row_runs
    if not runs:
        reader.fail(path, "has no run: set run (or runs) on the cell or its row")
    for run in runs:
        if run not in table["runs"]:
            key = "run" if "run" in data else "runs"
            reader.fail(f"{path}.{key}", f"{run!r} is not one of runs: {', '.join(table['runs'])}")
    return Cell(
        metric=reader.text(data["metric"], f"{path}.metric"),
        runs=runs,
        needs=reader.text(data.get("needs"), f"{path}.needs", optional=True),
        note=data.get("note"),
    )


def _runs_of(reader: _Reader, data: dict[str, Any], path: str) -> tuple[str, ...]:
    if data.get("run") is not None and data.get("runs") is not None:
        reader.fail(path, "sets both run and runs; use one")
    if data.get("run") is not None:
        return (reader.text(data["run"], f"{path}.run"),)  # type: ignore[return-value]
    return reader.strings(data.get("runs"), f"{path}.runs")


def parse_table(name: str, raw: Any, path: Path) -> Table:
    """A :class:`Table` from the parsed YAML of ``path``; UserError (one line) on anything wrong."""
    reader = _Reader(_display(path))
    top = reader.mapping(
        raw,
        "",
        (
            "kind",
            "title",
            "source",
            "protocol",
            "tiny_seeds",
            "runs",
            "columns",
            "rows",
            "benchmarks",
            "plot",
            "x",
            "x_label",
            "log_x",
            "panels",
            "series",
            "paper_points",
        ),
        required=("title", "source", "protocol", "runs"),
    )
    kind = top.get("kind", "table")
    if kind not in KINDS:
        reader.fail("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    protocol_raw = reader.mapping(
        top["protocol"], "protocol", ("split", "num_images", "seeds", "notes"), required=("split", "seeds")
    )
    num_images = protocol_raw.get("num_images")
    if num_images is not None and (isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1):
        reader.fail("protocol.num_images", f"must be a positive integer, got {num_images!r}")
    seeds = reader.seeds(protocol_raw["seeds"], "protocol.seeds")
    ordered = sorted(seeds)
    if num_images and any(b - a < num_images for a, b in zip(ordered, ordered[1:])):
        reader.fail(
            "protocol.seeds",
            f"must be at least protocol.num_images ({num_images}) apart: a job evaluates seeds seed .. "
            "seed + num_images - 1, and the seeds' image sets must not overlap",
        )
    protocol = Protocol(
        split=reader.text(protocol_raw["split"], "protocol.split"),  # type: ignore[arg-type]
        seeds=seeds,
        num_images=num_images,
        notes=reader.text(protocol_raw.get("notes"), "protocol.notes", optional=True),
    )
    runs = {run: _run(reader, run, value) for run, value in reader.keyed(top["runs"], "runs").items()}
    common: dict[str, Any] = dict(
        name=name,
        path=path,
        kind=kind,
        title=reader.text(top["title"], "title"),
        source=reader.text(top["source"], "source"),
        protocol=protocol,
        tiny_seeds=reader.seeds(top.get("tiny_seeds", [0]), "tiny_seeds"),
        runs=runs,
    )
    if kind == "table":
        return _parse_grid(reader, top, common)
    return _parse_curves(reader, top, common)


def _parse_grid(reader: _Reader, top: dict[str, Any], common: dict[str, Any]) -> Table:
    for key in ("x", "x_label", "log_x", "panels", "series", "paper_points"):
        if key in top:
            reader.fail(key, "is a setting of kind: curves")
    benchmarks = {}
    for bench, value in (top.get("benchmarks") or {}).items():
        data = reader.mapping(value, f"benchmarks.{bench}", ("command", "key"), required=("command",))
        benchmarks[str(bench)] = Benchmark(
            str(bench),
            reader.text(data["command"], f"benchmarks.{bench}.command"),  # type: ignore[arg-type]
            reader.text(data.get("key", "ratio"), f"benchmarks.{bench}.key"),  # type: ignore[arg-type]
        )
    columns = {
        key: _column(reader, key, value, f"columns.{key}")
        for key, value in reader.keyed(top.get("columns"), "columns").items()
    }
    context = {"runs": common["runs"], "benchmarks": benchmarks}
    rows = {}
    for key, value in reader.keyed(top.get("rows"), "rows").items():
        path = f"rows.{key}"
        data = reader.mapping(value, path, ("label", "run", "runs", "x", "paper", "cells"), required=("label",))
        row_runs = _runs_of(reader, data, path)
        for run in row_runs:
            if run not in common["runs"]:
                key = "run" if "run" in data else "runs"
                reader.fail(f"{path}.{key}", f"{run!r} is not one of runs: {', '.join(common['runs'])}")
        cells = {}
        for column, cell in (data.get("cells") or {}).items():
            if column not in columns:
                reader.fail(f"{path}.cells.{column}", f"is not one of columns: {', '.join(columns)}")
            cells[str(column)] = _cell(reader, cell, f"{path}.cells.{column}", row_runs, context)
        paper = {}
        for column, value_raw in (data.get("paper") or {}).items():
            if column not in columns:
                reader.fail(f"{path}.paper.{column}", f"is not one of columns: {', '.join(columns)}")
            paper[str(column)] = reader.paper_value(value_raw, f"{path}.paper.{column}")
        x = data.get("x")
        rows[key] = Row(
            key,
            reader.text(data["label"], f"{path}.label"),  # type: ignore[arg-type]
            cells,
            paper,
            reader.number(x, f"{path}.x") if x is not None else None,
        )
    plot = None
    if top.get("plot") is not None:
        data = reader.mapping(top["plot"], "plot", ("x_label", "columns"), required=("x_label", "columns"))
        plot_columns = reader.strings(data["columns"], "plot.columns")
        for column in plot_columns:
            if column not in columns:
                reader.fail("plot.columns", f"{column!r} is not one of columns: {', '.join(columns)}")
        if not any(row.x is not None for row in rows.values()):
            reader.fail("plot", "needs rows with x (the value on the plot's x axis)")
        plot = Plot(reader.text(data["x_label"], "plot.x_label"), plot_columns)  # type: ignore[arg-type]
    return Table(**common, columns=columns, rows=rows, benchmarks=benchmarks, plot=plot)


def _parse_curves(reader: _Reader, top: dict[str, Any], common: dict[str, Any]) -> Table:
    for key in ("columns", "rows", "benchmarks", "plot"):
        if key in top:
            reader.fail(key, "is a setting of kind: table")
    x = top.get("x", "samples_seen")
    if x not in CURVE_X:
        reader.fail("x", f"must be one of {', '.join(CURVE_X)}, got {x!r}")
    panels = {
        key: _column(reader, key, value, f"panels.{key}")
        for key, value in reader.keyed(top.get("panels"), "panels").items()
    }
    series = {}
    for key, value in reader.keyed(top.get("series"), "series").items():
        path = f"series.{key}"
        data = reader.mapping(value, path, ("label", "run", "metrics"), required=("label", "run", "metrics"))
        run = reader.text(data["run"], f"{path}.run")
        if run not in common["runs"]:
            reader.fail(f"{path}.run", f"{run!r} is not one of runs: {', '.join(common['runs'])}")
        metrics = {}
        for panel, metric in reader.keyed(data["metrics"], f"{path}.metrics").items():
            if panel not in panels:
                reader.fail(f"{path}.metrics.{panel}", f"is not one of panels: {', '.join(panels)}")
            metrics[panel] = reader.text(metric, f"{path}.metrics.{panel}")
        series[key] = Series(key, reader.text(data["label"], f"{path}.label"), run, metrics)  # type: ignore[arg-type]
    points = []
    for index, value in enumerate(top.get("paper_points") or []):
        path = f"paper_points[{index}]"
        data = reader.mapping(
            value, path, ("panel", "label", "x", "y", "approx"), required=("panel", "label", "x", "y")
        )
        if data["panel"] not in panels:
            reader.fail(f"{path}.panel", f"{data['panel']!r} is not one of panels: {', '.join(panels)}")
        points.append(
            PaperPoint(
                data["panel"],
                reader.text(data["label"], f"{path}.label"),  # type: ignore[arg-type]
                reader.number(data["x"], f"{path}.x"),
                reader.number(data["y"], f"{path}.y"),
                bool(data.get("approx", False)),
            )
        )
    return Table(
        **common,
        x=x,
        x_label=reader.text(top.get("x_label", "Sample Count"), "x_label"),  # type: ignore[arg-type]
        log_x=bool(top.get("log_x", False)),
        panels=panels,
        series=series,
        paper_points=tuple(points),
    )


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(repo_root()))
    except ValueError:
        return str(path)


def load_table(name_or_path: str | Path) -> Table:
    """A table by name (``evaluation/tables/<name>.yaml``) or by file path."""
    import yaml

    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        path, name = candidate, candidate.stem
        if not path.is_file():
            raise UserError(f"--table {name_or_path}: no such file")
    else:
        name = str(name_or_path)
        path = tables_dir() / f"{name}.yaml"
        if not path.is_file():
            close = difflib.get_close_matches(name, table_names(), n=1)
            hint = f"did you mean {close[0]}?" if close else f"available: {', '.join(table_names()) or 'none'}"
            raise UserError(f"table {name!r} is not in {_display(tables_dir())}/; {hint}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{_display(path)}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return parse_table(name, raw, path)


def load_tables() -> list[Table]:
    return [load_table(name) for name in table_names()]
