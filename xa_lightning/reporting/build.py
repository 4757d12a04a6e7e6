"""Fill a paper table from run directories: each cell is the mean ± std over seeds, beside the paper's value.

Runs are matched to a table's runs by what they are, not by where they lie: a job of the table's own
sweep names its runs (``table.runs`` in its config); any other run matches a table run when it ran the
run's experiment and every override of the run holds in its config (the demo's ``xa-train
experiment=demo/sun`` is the tiny ``student_4`` run of ``sun_steps``). A cell pools the metric over its
runs and their seeds (the newest run directory per run and seed). Cells that cannot have a value say why:
``missing`` (no such run in the directories), ``not run`` (its experiment or a piece it needs does not
exist yet), ``failed`` (the job's ``failed.json``), ``not logged`` (the run did not log that metric).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xa_lightning.reporting.runs import RunRecord
from xa_lightning.reporting.schema import Cell, Column, PaperValue, Table
from xa_lightning.reporting.sweeps import not_runnable

OK, MISSING, NOT_RUN, FAILED, NOT_LOGGED = "ok", "missing", "not run", "failed", "not logged"
UNTRAINED_MARK = "†"
UNTRAINED_NOTE = "random-init CLIP encoder (weights not available offline): the metric's `_untrained` variant."
SCALE_NOTES = {
    "paper": "Scale: paper (real weights and data).",
    "tiny": (
        "Scale: **tiny — tiny models with random weights on demo data (CPU)**. These numbers show that "
        "the pipeline runs end to end; they are not comparable with the paper's."
    ),
}


# ---------------------------------------------------------------------------------------------- matching
def _same(actual: Any, wanted: Any) -> bool:
    if isinstance(wanted, bool) or isinstance(actual, bool):
        return actual is wanted or actual == wanted
    if isinstance(wanted, (int, float)) and isinstance(actual, (int, float)):
        return math.isclose(float(actual), float(wanted), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(wanted, (list, tuple)) and isinstance(actual, (list, tuple)):
        return len(actual) == len(wanted) and all(_same(a, w) for a, w in zip(actual, wanted))
    if isinstance(wanted, dict) and isinstance(actual, dict):
        return actual.keys() == wanted.keys() and all(_same(actual[k], wanted[k]) for k in wanted)
    return actual == wanted


def override_holds(record: RunRecord, override: str) -> bool:
    """Whether ``key=value`` (a group choice or a config value) is what ``record`` ran with."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from xa_lightning.config import config_dir

    parsed = OverridesParser.create().parse_override(override)
    group = parsed.key_or_group
    if "." not in group and (config_dir() / group).is_dir():
        key = f"{group}@{parsed.package}" if parsed.package else group
        return record.choices.get(key) == str(parsed.value())
    wanted = parsed.value()
    return _same(record.config_value(group, resolve=False), wanted) or _same(record.config_value(group), wanted)


def match_runs(table: Table, records: Sequence[RunRecord], scale: str) -> dict[str, list[RunRecord]]:
    """Table run -> the run directories that ran it at ``scale`` (oldest first)."""
    matched: dict[str, list[RunRecord]] = {name: [] for name in table.runs}
    for record in records:
        own = record.table
        if own and own.get("name") == table.name:
            if own.get("scale", "paper") == scale:
                for name in own.get("runs") or [own.get("run")]:
                    if name in matched:
                        matched[name].append(record)
            continue
        if record.experiment is None or (scale == "paper" and record.tiny):
            continue
        hits: dict[str, frozenset[str]] = {}
        for run in table.runs.values():
            specs = [run.at(scale)] + ([run.at("paper")] if scale == "tiny" and record.tiny else [])
            for spec in specs:
                if spec and spec[0] == record.experiment and all(override_holds(record, o) for o in spec[1]):
                    hits[run.name] = frozenset(spec[1])
                    break
        for name, overrides in hits.items():  # a run whose overrides another hit extends is the less specific
            if not any(overrides < other for other in hits.values()):
                matched[name].append(record)
    return matched


def _distinct(matched: dict[str, list[RunRecord]]) -> int:
    return len({record.path for records in matched.values() for record in records})


def choose_scale(table: Table, records: Sequence[RunRecord], scale: str = "auto") -> str:
    """``auto``: paper when any run of the table at paper scale is there, else tiny."""
    if scale != "auto":
        return scale
    return "paper" if any(match_runs(table, records, "paper").values()) else "tiny"


# ---------------------------------------------------------------------------------------------- cells
def format_value(mean: float | None, std: float | None, n: int) -> str:
    if mean is None or n == 0:
        return ""
    text = f"{mean:.4g}"
    if std is not None:
        text += f" ± {std:.2g}"
    return f"{text} (n={n})"


@dataclass
class CellResult:
    row: str
    column: str
    status: str
    values: list[float] = field(default_factory=list)
    paper: PaperValue | None = None
    metric: str | None = None
    runs: tuple[str, ...] = ()
    detail: str | None = None  # why there is no value, or a caveat beside one
    untrained: bool = False
    sources: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def difference(self) -> float | None:
        if self.mean is None or self.paper is None or self.paper.value is None:
            return None
        return self.mean - self.paper.value

    @property
    def text(self) -> str:
        return format_value(self.mean, self.std, self.n)


def _newest_per_seed(records: Sequence[RunRecord]) -> list[RunRecord]:
    by_seed: dict[Any, RunRecord] = {}
    for record in records:  # oldest first: the newest directory of a seed wins
        by_seed[record.seed] = record
    return list(by_seed.values())


def _describe(table: Table, run_name: str, scale: str) -> str:
    spec = table.runs[run_name].at(scale)
    if spec is None:
        return run_name
    experiment, overrides = spec
    return " ".join([f"experiment={experiment}", *overrides])


def metric_cell(
    table: Table,
    row: str,
    column: Column,
    cell: Cell,
    matched: dict[str, list[RunRecord]],
    scale: str,
    paper: PaperValue | None,
) -> CellResult:
    assert cell.metric is not None
    result = CellResult(row, column.key, OK, paper=paper, metric=cell.metric, runs=cell.runs)
    failures: list[str] = []
    unlogged: list[RunRecord] = []
    seen: set[Path] = set()
    for run in cell.runs:
        for record in _newest_per_seed(matched.get(run, [])):
            if record.path in seen:  # one directory can stand for several runs (their tiny versions agree)
                continue
            seen.add(record.path)
            if record.failure:
                failures.append(f"{run}, seed {record.seed}: {record.failure} ({record.path})")
                continue
            value, untrained = record.value(cell.metric)
            if value is None:
                unlogged.append(record)
                continue
            result.values.append(value * column.scale)
            result.untrained |= untrained
            result.sources.append(str(record.path))
    if result.values:
        if failures:
            result.detail = f"{len(failures)} more job(s) failed, e.g. {failures[0]}"
        return result
    if failures:
        result.status = FAILED
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        result.detail = failures[0] + more
        return result
    reasons = [f"needs {cell.needs}"] if cell.needs else []
    reasons += [f"{run}: {why}" for run in cell.runs if (why := not_runnable(table.runs[run], scale))]
    if reasons:
        result.status, result.detail = NOT_RUN, "; ".join(dict.fromkeys(reasons))
    elif unlogged:
        result.status = NOT_LOGGED
        pending = [r for r in unlogged if not r.metrics]
        where = pending[0] if pending else unlogged[0]
        result.detail = (
            f"{where.path} has no metrics yet (still running, or stopped)"
            if pending
            else f"{cell.metric} is not among the metrics of {where.path}"
        )
    else:
        result.status = MISSING
        result.detail = "no run of " + " or ".join(f"`{_describe(table, run, scale)}`" for run in cell.runs)
    return result


def _bench_cell(row: str, column: Column, cell: Cell, table: Table, dirs: Sequence[Path], paper: Any) -> CellResult:
    assert cell.bench is not None
    bench = table.benchmarks[cell.bench]
    result = CellResult(row, column.key, MISSING, paper=paper, metric=f"bench:{cell.bench}.{bench.key}")
    files = sorted(
        (f for d in dirs for f in Path(d).glob(f"**/bench/{cell.bench}.json")), key=lambda p: p.stat().st_mtime
    )
    if not files:
        result.detail = f"no benchmark result: `{bench.command} > DIR/bench/{cell.bench}.json`"
        return result
    lines = [line for line in files[-1].read_text().splitlines() if line.strip().startswith("{")]
    try:
        data = json.loads(lines[-1])
        value = float(data[bench.key])
    except (IndexError, KeyError, TypeError, ValueError, json.JSONDecodeError):
        result.status, result.detail = NOT_LOGGED, f"{files[-1]} has no JSON line with {bench.key!r}"
        return result
    result.status, result.values = OK, [value * column.scale]
    result.sources.append(str(files[-1]))
    result.detail = f"{data.get('backbone', '?')} on {data.get('device', '?')}"
    return result


@dataclass
class TableResult:
    table: Table
    scale: str
    cells: dict[tuple[str, str], CellResult]
    runs_found: int


def build_table(table: Table, records: Sequence[RunRecord], dirs: Sequence[str | Path], scale: str) -> TableResult:
    assert table.kind == "table"
    matched = match_runs(table, records, scale)
    cells: dict[tuple[str, str], CellResult] = {}
    for row in table.rows.values():
        for column in table.columns.values():
            cell = row.cells.get(column.key)
            if cell is None:
                continue
            paper = row.paper.get(column.key)
            if cell.bench is not None:
                cells[row.key, column.key] = _bench_cell(row.key, column, cell, table, [Path(d) for d in dirs], paper)
            else:
                cells[row.key, column.key] = metric_cell(table, row.key, column, cell, matched, scale, paper)
    return TableResult(table, scale, cells, _distinct(matched))


# ---------------------------------------------------------------------------------------------- curves
@dataclass
class CurvePoint:
    step: int | None
    x: float
    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None


@dataclass
class SeriesResult:
    series: str
    panel: str
    status: str
    points: list[CurvePoint] = field(default_factory=list)
    detail: str | None = None
    untrained: bool = False
    x_is_step: bool = False


@dataclass
class CurvesResult:
    table: Table
    scale: str
    series: dict[tuple[str, str], SeriesResult]
    runs_found: int


def build_curves(table: Table, records: Sequence[RunRecord], scale: str) -> CurvesResult:
    assert table.kind == "curves"
    matched = match_runs(table, records, scale)
    results: dict[tuple[str, str], SeriesResult] = {}
    for series in table.series.values():
        runs = _newest_per_seed(matched[series.run])
        for panel, metric in series.metrics.items():
            column = table.panels[panel]
            result = SeriesResult(series.key, panel, OK)
            by_step: dict[Any, list[tuple[float | None, float]]] = {}
            failures = [f"{series.run}, seed {r.seed}: {r.failure} ({r.path})" for r in runs if r.failure]
            for record in runs:
                if record.failure:
                    continue
                for evaluation in record.history:
                    value = evaluation.metrics.get(metric)
                    flagged = False
                    if value is None:
                        value = evaluation.metrics.get(metric + "_untrained")
                        flagged = value is not None
                    if value is None or not math.isfinite(value):
                        continue
                    result.untrained |= flagged
                    x = record.samples_at(evaluation) if table.x == "samples_seen" else evaluation.step
                    by_step.setdefault(evaluation.step, []).append((x, value * column.scale))
            for step in sorted(by_step, key=lambda s: -1 if s is None else s):
                pairs = by_step[step]
                xs = [x for x, _ in pairs if x is not None]
                if not xs:
                    result.x_is_step = True
                x = statistics.fmean(xs) if xs else float(step or 0)
                result.points.append(CurvePoint(step, x, [v for _, v in pairs]))
            if not result.points:
                if failures:
                    result.status, result.detail = FAILED, failures[0]
                else:
                    why = not_runnable(table.runs[series.run], scale)
                    if why:
                        result.status, result.detail = NOT_RUN, why
                    elif runs:
                        result.status, result.detail = NOT_LOGGED, f"{metric} is not in the history of {runs[0].path}"
                    else:
                        result.status = MISSING
                        result.detail = f"no run of `{_describe(table, series.run, scale)}`"
            elif failures:
                result.detail = f"{len(failures)} job(s) failed, e.g. {failures[0]}"
            results[series.key, panel] = result
    return CurvesResult(table, scale, results, _distinct(matched))


# ---------------------------------------------------------------------------------------------- Markdown / CSV
class _Notes:
    """Numbered notes under a table; equal texts share a number."""

    def __init__(self) -> None:
        self.texts: dict[str, int] = {}

    def mark(self, text: str) -> str:
        number = self.texts.setdefault(text, len(self.texts) + 1)
        return f"[{number}]"

    def lines(self) -> list[str]:
        return [f"{number}. {text}" for text, number in self.texts.items()]


def _header(table: Table, scale: str) -> list[str]:
    protocol = table.protocol
    seeds = ", ".join(str(s) for s in table.seeds(scale))
    size = f"{protocol.num_images} images per sampler and seed; " if protocol.num_images and scale == "paper" else ""
    lines = [
        f"# {table.title}",
        "",
        f"Source: {table.source}",
        "",
        SCALE_NOTES[scale],
        "",
        f"Protocol: {protocol.split}. {size}seeds {seeds}; ours = mean ± std over runs and seeds (n values).",
    ]
    if protocol.notes:
        lines += ["", protocol.notes]
    return lines


def _cell_text(cell: CellResult, notes: _Notes) -> str:
    if cell.status == OK:
        text = cell.text + (f" {UNTRAINED_MARK}" if cell.untrained else "")
        return text + (f" {notes.mark(cell.detail)}" if cell.detail else "")
    return f"{cell.status} {notes.mark(f'{cell.status}: {cell.detail}')}"


def markdown_table(result: TableResult) -> str:
    table = result.table
    notes = _Notes()
    header = ["", *[f"{c.label} | paper | Δ" for c in table.columns.values()]]
    lines = [*_header(table, result.scale), ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---" + "|---:|---:|---:" * len(table.columns) + "|")
    for row in table.rows.values():
        cells = [f"**{row.label}**"]
        for column in table.columns.values():
            cell = result.cells.get((row.key, column.key))
            paper = row.paper.get(column.key)
            if cell is None:
                cells += ["", str(paper) if paper else "", ""]
                continue
            difference = cell.difference
            cells += [
                _cell_text(cell, notes),
                str(paper) if paper else "",
                f"{difference:+.3g}" if difference is not None else "",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    if any(c.untrained for c in result.cells.values()):
        lines += [
            "",
            f"{UNTRAINED_MARK} {UNTRAINED_NOTE}",
        ]
    column_notes = [f"*{c.label}*: {c.note}" for c in table.columns.values() if c.note]
    if column_notes:
        lines += ["", *column_notes]
    if notes.texts:
        lines += ["", *notes.lines()]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = (
    "table",
    "scale",
    "row",
    "row_label",
    "column",
    "column_label",
    "status",
    "mean",
    "std",
    "n",
    "paper",
    "difference",
    "metric",
    "runs",
    "detail",
)


def _number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def csv_table(result: TableResult) -> str:
    """One line per cell: the numbers behind the Markdown (same mean, std, n and paper value)."""
    table = result.table
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in table.rows.values():
        for column in table.columns.values():
            cell = result.cells.get((row.key, column.key))
            if cell is None:
                continue
            writer.writerow(
                [
                    table.name,
                    result.scale,
                    row.key,
                    row.label,
                    column.key,
                    column.label,
                    cell.status,
                    _number(cell.mean),
                    _number(cell.std),
                    cell.n,
                    str(cell.paper) if cell.paper else "",
                    _number(cell.difference),
                    cell.metric or "",
                    " ".join(cell.runs),
                    cell.detail or "",
                ]
            )
    return buffer.getvalue()


def markdown_curves(result: CurvesResult, plot_name: str | None) -> str:
    table = result.table
    notes = _Notes()
    lines = [*_header(table, result.scale), ""]
    if plot_name:
        lines += [f"![{table.title}]({plot_name})", ""]
    x_name = table.x_label
    lines.append("| series | " + " | ".join(f"{p.label} (last) | at {x_name}" for p in table.panels.values()) + " |")
    lines.append("|---" + "|---:|---:" * len(table.panels) + "|")
    for series in table.series.values():
        cells = [f"**{series.label}**"]
        for panel in table.panels:
            found = result.series.get((series.key, panel))
            if found is None:
                cells += ["", ""]
            elif found.status != OK:
                cells += [f"{found.status} {notes.mark(f'{found.status}: {found.detail}')}", ""]
            else:
                last = found.points[-1]
                mark = f" {UNTRAINED_MARK}" if found.untrained else ""
                where = f"step {last.step}" if found.x_is_step else f"{last.x:.4g}"
                cells += [format_value(last.mean, last.std, len(last.values)) + mark, where]
        lines.append("| " + " | ".join(cells) + " |")
    if table.paper_points:
        lines += ["", "The paper's points:", "", f"| panel | point | {x_name} | value |", "|---|---|---:|---:|"]
        for point in table.paper_points:
            approx = "~" if point.approx else ""
            label = table.panels[point.panel].label
            lines.append(f"| {label} | {point.label} | {approx}{point.x:.4g} | {point.y:.4g} |")
    if any(s.untrained for s in result.series.values()):
        lines += ["", f"{UNTRAINED_MARK} {UNTRAINED_NOTE}"]
    if notes.texts:
        lines += ["", *notes.lines()]
    return "\n".join(lines) + "\n"


def csv_curves(result: CurvesResult) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("table", "scale", "series", "panel", "status", "step", "x", "mean", "std", "n", "detail"))
    for (series, panel), found in result.series.items():
        if not found.points:
            writer.writerow(
                (result.table.name, result.scale, series, panel, found.status, "", "", "", "", 0, found.detail or "")
            )
        for point in found.points:
            writer.writerow(
                (
                    result.table.name,
                    result.scale,
                    series,
                    panel,
                    found.status,
                    "" if point.step is None else point.step,
                    _number(point.x),
                    _number(point.mean),
                    _number(point.std),
                    len(point.values),
                    found.detail or "",
                )
            )
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- files
def render(
    table: Table, records: Sequence[RunRecord], dirs: Sequence[str | Path], out_dir: str | Path, scale: str = "auto"
) -> dict[str, Any]:
    """Write ``<out_dir>/<name>.md``, ``.csv`` and (curves, plotted tables) ``.png``; returns a summary."""
    from xa_lightning.reporting import plots

    scale = choose_scale(table, records, scale)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    plot_path = out / f"{table.name}.png"
    if table.kind == "table":
        grid = build_table(table, records, dirs, scale)
        markdown, text_csv, runs_found = markdown_table(grid), csv_table(grid), grid.runs_found
        if table.plot is not None and plots.plot_table(grid, plot_path):
            files["plot"] = str(plot_path)
            markdown += f"\n![{table.title}]({plot_path.name})\n"
        statuses = [c.status for c in grid.cells.values()]
    else:
        curves = build_curves(table, records, scale)
        drawn = plots.plot_curves(curves, plot_path)
        if drawn:
            files["plot"] = str(plot_path)
        markdown = markdown_curves(curves, plot_path.name if drawn else None)
        text_csv, runs_found = csv_curves(curves), curves.runs_found
        statuses = [s.status for s in curves.series.values()]
    files["markdown"], files["csv"] = str(out / f"{table.name}.md"), str(out / f"{table.name}.csv")
    Path(files["markdown"]).write_text(markdown, encoding="utf-8")
    Path(files["csv"]).write_text(text_csv, encoding="utf-8")
    return {
        "table": table.name,
        "scale": scale,
        "runs_found": runs_found,
        "cells": {status: statuses.count(status) for status in dict.fromkeys(statuses)},
        "files": files,
        "text": markdown,
    }
