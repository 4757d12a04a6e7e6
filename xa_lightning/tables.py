"""xa-tables: collect the metrics of finished runs into one table (Markdown + JSON).

Each run directory written by xa-train holds ``metrics.json`` (the evaluation callback's final scores)
and ``.hydra/config.yaml``. Rows are (run, sampler); columns are metrics.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xa_lightning.errors import UserError


def run_label(run_dir: Path) -> str:
    config = run_dir / ".hydra" / "config.yaml"
    if config.is_file():
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(config)
        name = cfg.get("run_name") or run_dir.name
        return f"{name} (seed {cfg.get('seed')})" if cfg.get("seed") is not None else str(name)
    return run_dir.name


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
    rows = []
    for directory in dirs:
        root = Path(directory)
        if not root.exists():
            raise UserError(f"{root} does not exist; pass run or sweep directories (outputs/..., multirun/...)")
        for metrics_file in sorted(root.glob("**/metrics.json")):
            content = json.loads(metrics_file.read_text())
            label = run_label(metrics_file.parent)
            for sampler, values in rows_from_metrics(content.get("metrics", {})).items():
                rows.append({"run": label, "sampler": sampler, **values})
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
    parser.add_argument("dirs", nargs="*", default=["outputs", "multirun"], help="run / sweep directories")
    parser.add_argument("--out", default=None, help="also write the Markdown table to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv or []))
    rows = collect([d for d in args.dirs if Path(d).exists()] if args.dirs == ["outputs", "multirun"] else args.dirs)
    table = markdown(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    print(json.dumps({"rows": rows}))
    return 0
