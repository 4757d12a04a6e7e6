"""xa-tables: finished runs as one flat listing, or as the papers' tables with their numbers beside ours.

``xa-tables [DIR ...]`` lists every run's final metrics (a row per run and sampler). ``xa-tables --table
NAME DIR ...`` fills the paper table ``evaluation/tables/NAME.yaml`` from the runs under DIR (a table
sweep's directory, the demo's, any runs): Markdown and CSV (and a PNG for curves and plotted tables) in
``--out`` (default ``<first DIR>/tables``), the Markdown also on stdout. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_DIRS = ["outputs", "multirun"]


def rows_from_metrics(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{"eval/<sampler>/<metric>": v}`` (metrics.json's ``metrics``) -> ``{sampler: {metric: v}}``."""
    per_sampler: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if parts and parts[0] == "eval":
            parts = parts[1:]
        if len(parts) < 2 or not isinstance(value, (int, float)):
            continue
        per_sampler.setdefault(parts[0], {})["/".join(parts[1:])] = float(value)
    return per_sampler


def collect(dirs: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (run, sampler) with that sampler's final metrics."""
    from xa_lightning.reporting.runs import find_runs

    rows = []
    for record in sorted(find_runs(dirs), key=lambda r: str(r.path)):
        for sampler, values in rows_from_metrics(record.metrics).items():
            rows.append({"run": record.label, "sampler": sampler, **values})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no runs with metrics.json found)"
    columns = ["run", "sampler"] + sorted({k for row in rows for k in row} - {"run", "sampler"})
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for col in columns:
            value = row.get(col, "")
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xa-tables", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="*", default=DEFAULT_DIRS, help="run / sweep directories")
    parser.add_argument(
        "--table",
        action="append",
        default=None,
        help="a paper table of evaluation/tables/ (repeatable; 'all' for every table)",
    )
    parser.add_argument(
        "--scale",
        choices=("auto", "paper", "tiny"),
        default="auto",
        help="which runs fill the table: paper (real weights), tiny (tiny models), auto (paper when present)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="without --table: also write the listing to this file; with --table: the output directory",
    )
    return parser


def build_tables(
    names: Sequence[str], dirs: Sequence[str | Path], out_dir: str | Path, scale: str = "auto"
) -> list[dict[str, Any]]:
    """Render each named table from the runs under ``dirs`` into ``out_dir``; one summary per table."""
    from xa_lightning.reporting.build import render
    from xa_lightning.reporting.runs import find_runs
    from xa_lightning.reporting.schema import load_table, table_names

    tables = [load_table(name) for name in (table_names() if "all" in names else names)]
    records = find_runs(dirs)
    return [render(table, records, dirs, out_dir, scale) for table in tables]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv or []))
    dirs = [d for d in args.dirs if Path(d).exists()] if args.dirs == DEFAULT_DIRS else args.dirs
    if args.table:
        out = args.out or str(Path(dirs[0] if dirs else ".") / "tables")
        summaries = build_tables(args.table, dirs, out, args.scale)
        for summary in summaries:
            print(summary.pop("text"))
        print(json.dumps({"tables": summaries}))
        return 0
    rows = collect(dirs)
    table = markdown(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    print(json.dumps({"rows": rows}))
    return 0
