"""Figures for people: curves with seed bands and the paper's points, labelled image grids, loss curves.

matplotlib's object API (``Figure`` on the Agg canvas): no pyplot state, no display needed.
"""

from __future__ import annotations

import csv
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

    from xa_lightning.reporting.build import CurvesResult, TableResult

TINY_SUFFIX = " (tiny models, random weights)"


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(figure: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def _band(axis: Any, xs: list[float], means: list[float], stds: list[float | None], color: Any) -> None:
    if any(s is not None for s in stds):
        low = [m - (s or 0.0) for m, s in zip(means, stds)]
        high = [m + (s or 0.0) for m, s in zip(means, stds)]
        axis.fill_between(xs, low, high, color=color, alpha=0.2, linewidth=0)


def _label_axis(axis: Any, x_label: str, y_label: str) -> None:
    axis.set_xlabel(x_label)
    axis.set_ylabel(y_label)
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=7)


def _finish(figure: Any, result: CurvesResult | TableResult, drawn: bool, path: str | Path) -> bool:
    """Title and save a figure that shows something; False (nothing written) when nothing was drawn."""
    if not drawn:
        return False
    figure.suptitle(result.table.title + (TINY_SUFFIX if result.scale == "tiny" else ""), fontsize=10)
    _save(figure, path)
    return True


def plot_curves(result: CurvesResult, path: str | Path) -> bool:
    """One panel per metric: each series' mean over seeds against Sample Count (or steps), ± std band,
    and the paper's points (hollow where the paper gives them only approximately). False: nothing to draw."""
    table = result.table
    panels = list(table.panels.values())
    figure = _figure(5.2 * len(panels), 4.0)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    drawn = False
    for axis, panel in zip(axes, panels):
        steps_only = False
        for series in table.series.values():
            found = result.series.get((series.key, panel.key))
            if found is None or not found.points:
                continue
            steps_only |= found.x_is_step
            xs = [p.x for p in found.points]
            means = [p.mean for p in found.points]
            (line,) = axis.plot(
                xs, means, marker="o", markersize=3, label=series.label + (" †" if found.untrained else "")
            )
            _band(axis, xs, means, [p.std for p in found.points], line.get_color())
            drawn = True
        for point in table.paper_points:
            if point.panel != panel.key:
                continue
            axis.scatter(
                [point.x],
                [point.y],
                marker="*",
                s=140,
                facecolors="none" if point.approx else "black",
                edgecolors="black",
                zorder=5,
                label=f"paper: {point.label}",
            )
            drawn = True
        if table.log_x and not steps_only:
            axis.set_xscale("log")
        _label_axis(axis, "optimizer step" if steps_only else table.x_label, panel.label)
    return _finish(figure, result, drawn, path)


def plot_table(result: TableResult, path: str | Path) -> bool:
    """A table whose rows carry ``x`` (e.g. sampling steps): each plotted column against x, ± std, the
    paper's values as stars, rows without x (a reference such as the teacher) as dashed lines."""
    table = result.table
    assert table.plot is not None
    columns = [table.columns[key] for key in table.plot.columns]
    figure = _figure(4.6 * len(columns), 3.8)
    axes = figure.subplots(1, len(columns), squeeze=False)[0]
    drawn = False
    for axis, column in zip(axes, columns):
        points = []
        for row in table.rows.values():
            cell = result.cells.get((row.key, column.key))
            if cell is None or cell.mean is None:
                continue
            if row.x is None:
                axis.axhline(cell.mean, linestyle="--", color="grey", label=row.label)
                drawn = True
            else:
                points.append((row.x, cell.mean, cell.std))
        if points:
            points.sort()
            xs, means, stds = [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]
            (line,) = axis.plot(xs, means, marker="o", label="ours")
            _band(axis, xs, means, stds, line.get_color())
            drawn = True
        paper = [
            (row.x, row.paper[column.key].value)
            for row in table.rows.values()
            if row.x is not None and column.key in row.paper and row.paper[column.key].value is not None
        ]
        if paper:
            axis.scatter([p[0] for p in paper], [p[1] for p in paper], marker="*", s=140, color="black", label="paper")
            drawn = True
        if not axis.has_data():
            axis.text(0.5, 0.5, "no values yet", ha="center", va="center", transform=axis.transAxes, color="grey")
        ticks = sorted({row.x for row in table.rows.values() if row.x is not None})
        pad = 0.05 * (ticks[-1] - ticks[0]) or 0.5
        axis.set_xticks(ticks)
        axis.set_xlim(ticks[0] - pad, ticks[-1] + pad)
        _label_axis(axis, table.plot.x_label, column.label)
    return _finish(figure, result, drawn, path)


def labelled_grid(
    images: Mapping[str, Tensor], prompts: Sequence[str], path: str | Path, title: str = "", seeds: Sequence[int] = ()
) -> Path:
    """Rows = samplers (named on the left), columns = prompts (and seeds) on top; uint8 ``(N, 3, H, W)``."""
    rows = list(images)
    columns = max(images[name].shape[0] for name in rows)
    cell = 1.9
    figure = _figure(cell * columns + 1.2, cell * len(rows) + 1.0)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for r, name in enumerate(rows):
        for c in range(columns):
            axis = axes[r][c]
            axis.set_xticks([])
            axis.set_yticks([])
            for spine in axis.spines.values():
                spine.set_visible(False)
            if c < images[name].shape[0]:
                axis.imshow(images[name][c].permute(1, 2, 0).cpu().numpy())
            if c == 0:
                axis.set_ylabel(name, fontsize=9, fontweight="bold")
            if r == 0 and c < len(prompts):
                label = "\n".join(textwrap.wrap(prompts[c], 22)[:3])
                if c < len(seeds):
                    label += f"\nseed {seeds[c]}"
                axis.set_title(label, fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def loss_curve(metrics_csv: str | Path, path: str | Path, title: str = "", key: str = "train/loss") -> bool:
    """``train/loss`` against the optimizer step from a CSV logger's ``metrics.csv``; False without it."""
    metrics_csv = Path(metrics_csv)
    if not metrics_csv.is_file():
        return False
    points = []
    with metrics_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                step, value = int(float(row["step"])), float(row[key])
            except (KeyError, TypeError, ValueError):
                continue
            if math.isfinite(value):
                points.append((step, value))
    if not points:
        return False
    figure = _figure(5.0, 3.2)
    axis = figure.subplots()
    axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel(key)
    axis.grid(alpha=0.3)
    if title:
        axis.set_title(title, fontsize=10)
    _save(figure, path)
    return True
