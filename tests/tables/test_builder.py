"""xa-tables --table on run directories written by hand: cells, statuses, Markdown = CSV, curves PNG."""

from __future__ import annotations

import csv
import io
import json
import statistics
import time

import pytest
import yaml
from PIL import Image

from xa_lightning import cli
from xa_lightning.reporting.build import (
    FAILED,
    MISSING,
    NOT_LOGGED,
    NOT_RUN,
    OK,
    build_curves,
    build_table,
    choose_scale,
    format_value,
    match_runs,
    render,
)
from xa_lightning.reporting.runs import find_runs, read_run
from xa_lightning.reporting.schema import load_table

from .helpers import sun_config, write_run

TOY = {
    "title": "Toy table",
    "source": "tests",
    "protocol": {"split": "demo prompts", "num_images": 4, "seeds": [0, 10, 20]},
    "runs": {
        "four": {"experiment": "demo/sun", "overrides": ["method.sampling.steps=4"], "tiny": "demo/sun"},
        "two": {"experiment": "demo/sun", "overrides": ["method.sampling.steps=2"], "tiny": "demo/sun"},
        "broken": {"experiment": "demo/sun", "overrides": ["method.sampling.steps=3"]},
        "future": {"experiment": "a4a/not_written_yet"},
    },
    "benchmarks": {"speed": {"command": "xa-bench sun --student-steps 4"}},
    "columns": {
        "fid": {"label": "FID", "better": "lower"},
        "clip": {"label": "CLIP", "better": "higher", "scale": 0.01, "note": "ours / 100"},
        "speed": {"label": "speed-up"},
    },
    "rows": {
        "four": {
            "label": "four steps",
            "run": "four",
            "paper": {"fid": 30.0, "clip": 0.25, "speed": {"text": "> 10"}},
            "cells": {"fid": "eval/sun/fid", "clip": "eval/sun/clip_score", "speed": {"bench": "speed"}},
        },
        "two": {
            "label": "two steps",
            "run": "two",
            "cells": {"fid": "eval/sun/fid", "clip": {"metric": "eval/sun/clip_score", "needs": "a CLIP model"}},
        },
        "both": {"label": "two and four pooled", "runs": ["two", "four"], "cells": {"fid": "eval/sun/fid"}},
        "broken": {"label": "broken", "run": "broken", "cells": {"fid": "eval/sun/fid"}},
        "future": {"label": "future", "run": "future", "cells": {"fid": "eval/sun/fid"}},
        "teacher": {"label": "teacher", "run": "four", "cells": {"fid": "eval/teacher/fid", "clip": "eval/x/kid"}},
    },
}


@pytest.fixture
def toy(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(TOY, sort_keys=False))
    return load_table(path)


@pytest.fixture
def runs(tmp_path):
    """Three seeds of "four", one of "two" plus a job of the table's own sweep, a failure, noise."""
    root = tmp_path / "runs"
    old = time.time() - 3600
    write_run(root / "four_0_old", config=sun_config(4, 0), metrics={"eval/sun/fid": 100.0}, mtime=old)
    for seed, fid in ((0, 10.0), (10, 12.0), (20, 14.0)):
        metrics = {"eval/sun/fid": fid, "eval/sun/clip_score": 25.0 + seed / 10, "eval/x/kid": 1.0}
        if seed == 0:
            metrics["eval/teacher/fid"] = 9.0
        write_run(root / f"four_{seed}", config=sun_config(4, seed), metrics=metrics)
    write_run(
        root / "two_0", config=sun_config(2, 0), metrics={"eval/sun/fid": 20.0, "eval/sun/clip_score_untrained": 5.0}
    )
    table_job = sun_config(2, 10, table={"name": "toy", "scale": "paper", "run": "two", "runs": ["two"]})
    write_run(root / "sweep" / "0_seed10_toy_two", experiment=None, config=table_job, metrics={"eval/sun/fid": 22.0})
    write_run(root / "broken_0", config=sun_config(3, 0), failure=ValueError("the adapter diverged (loss nan)"))
    write_run(root / "tiny_four_0", config=sun_config(4, 0, flavour="tiny"), metrics={"eval/sun/fid": 500.0})
    write_run(root / "other", experiment="demo/x_adapter", config=sun_config(4, 0), metrics={"eval/sun/fid": 1.0})
    bench = root / "bench" / "speed.json"
    bench.parent.mkdir(parents=True)
    bench.write_text(
        json.dumps({"run": 1})
        + "\n"
        + json.dumps({"benchmark": "sun", "ratio": 9.5, "backbone": "sd15:tiny", "device": "cpu"})
        + "\n"
    )
    return root


def test_cells_are_mean_std_over_seeds_with_the_paper_value_and_the_difference(toy, runs):
    result = build_table(toy, find_runs([runs]), [runs], "paper")
    fid = result.cells["four", "fid"]
    assert fid.status == OK and sorted(fid.values) == [10.0, 12.0, 14.0]  # the older seed-0 directory lost
    assert (fid.mean, fid.std, fid.n) == (12.0, statistics.stdev([10.0, 12.0, 14.0]), 3)
    assert fid.difference == pytest.approx(12.0 - 30.0)
    clip = result.cells["four", "clip"]
    assert clip.mean == pytest.approx(0.26) and clip.difference == pytest.approx(0.01)  # column scale 0.01
    assert result.cells["four", "speed"].values == [9.5] and result.cells["four", "speed"].difference is None
    assert result.cells["teacher", "fid"].values == [9.0]
    # a job of the table's own sweep matches through its config's table.runs; tiny and unrelated runs do not
    assert sorted(result.cells["two", "fid"].values) == [20.0, 22.0]
    assert sorted(result.cells["both", "fid"].values) == [10.0, 12.0, 14.0, 20.0, 22.0]
    flagged = result.cells["two", "clip"]
    assert flagged.status == OK and flagged.untrained and flagged.values == [pytest.approx(0.05)]


def test_cells_without_a_value_say_why(toy, runs):
    cells = build_table(toy, find_runs([runs]), [runs], "paper").cells
    assert cells["broken", "fid"].status == FAILED
    assert "ValueError: the adapter diverged (loss nan)" in cells["broken", "fid"].detail
    assert cells["future", "fid"].status == NOT_RUN
    assert cells["future", "fid"].detail == "future: experiment a4a/not_written_yet does not exist yet"
    empty = build_table(toy, [], [runs], "paper").cells
    assert empty["four", "fid"].status == MISSING
    assert empty["four", "fid"].detail == "no run of `experiment=demo/sun method.sampling.steps=4`"
    assert empty["two", "clip"].status == NOT_RUN and empty["two", "clip"].detail == "needs a CLIP model"
    assert cells["teacher", "clip"].status == OK  # logged by every seed of "four"
    kid_missing = build_table(toy, [read_run(runs / "two_0")], [runs], "paper").cells
    assert kid_missing["two", "fid"].status == OK and kid_missing["four", "fid"].status == MISSING
    no_teacher = build_table(toy, [read_run(runs / "four_10")], [runs], "paper").cells["teacher", "fid"]
    assert no_teacher.status == NOT_LOGGED and "eval/teacher/fid is not among the metrics" in no_teacher.detail


def test_scale_auto_prefers_paper_runs_and_falls_back_to_tiny(toy, runs):
    records = find_runs([runs])
    assert choose_scale(toy, records) == "paper"
    tiny = [r for r in records if r.tiny]
    assert choose_scale(toy, tiny) == "tiny"
    matched = match_runs(toy, tiny, "tiny")
    assert [r.path.name for r in matched["four"]] == ["tiny_four_0"] and not matched["two"]
    assert build_table(toy, tiny, [runs], "tiny").cells["four", "fid"].values == [500.0]


def _markdown_cells(markdown: str, columns: int) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| **"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert len(cells) == 1 + 3 * columns
            rows[cells[0].strip("*")] = cells[1:]
    return rows


def test_csv_holds_the_numbers_the_markdown_shows(toy, runs, tmp_path, capsys):
    assert cli.tables_main(["--table", str(toy.path), str(runs), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tables"][0]
    assert summary["scale"] == "paper" and summary["cells"]["ok"] == 8
    markdown = (tmp_path / "out" / "toy.md").read_text()
    lines = list(csv.DictReader(io.StringIO((tmp_path / "out" / "toy.csv").read_text())))
    shown = _markdown_cells(markdown, len(toy.columns))
    assert len(lines) == sum(len(row.cells) for row in toy.rows.values())
    columns = list(toy.columns)
    for line in lines:
        ours, paper, delta = shown[line["row_label"]][
            3 * columns.index(line["column"]) : 3 * columns.index(line["column"]) + 3
        ]
        if line["status"] == OK:
            std = float(line["std"]) if line["std"] else None
            assert ours.startswith(format_value(float(line["mean"]), std, int(line["n"])))
        else:
            assert ours.startswith(line["status"] + " [")
        assert paper == line["paper"]
        assert delta == (f"{float(line['difference']):+.3g}" if line["difference"] else "")
    assert "12 ± 2 (n=3) | 30 | -18" in markdown
    assert "failed: broken, seed 0: ValueError: the adapter diverged (loss nan)" in markdown
    assert "*CLIP*: ours / 100" in markdown and "Scale: paper" in markdown


def _history(values: list[float]) -> list[dict]:
    return [{"step": step, "metrics": {"eval/a4a/ida": v}} for step, v in zip((10, 20, 30), values)]


def test_curves_are_plotted_against_sample_count_with_seed_bands_and_the_paper_points(tmp_path):
    table_file = tmp_path / "curve.yaml"
    table_file.write_text(
        yaml.safe_dump(
            {
                "kind": "curves",
                "title": "Toy curves",
                "source": "tests",
                "protocol": {"split": "faces", "seeds": [0, 10]},
                "x": "samples_seen",
                "log_x": True,
                "runs": {"sdxl": {"experiment": "demo/a4a"}, "pixart": {"experiment": "demo/a4a_pixart"}},
                "panels": {"ida": {"label": "IDA", "better": "higher"}},
                "series": {
                    "sdxl": {"label": "A4A (SDXL)", "run": "sdxl", "metrics": {"ida": "eval/a4a/ida"}},
                    "pixart": {"label": "A4A (PixArt)", "run": "pixart", "metrics": {"ida": "eval/a4a/ida"}},
                },
                "paper_points": [{"panel": "ida", "label": "PTA-UM", "x": 64000000, "y": 0.4531}],
            },
            sort_keys=False,
        )
    )
    table = load_table(table_file)
    for seed, values in ((0, [0.1, 0.2, 0.3]), (10, [0.2, 0.3, 0.5])):
        run = write_run(
            tmp_path / "runs" / f"sdxl_{seed}",
            experiment="demo/a4a",
            config={"seed": seed, "data": {"batch_size": 8}},
            metrics=_history(values)[-1]["metrics"],
            history=_history(values),
        )
        (run / "csv").mkdir()
        (run / "csv" / "metrics.csv").write_text("step,train/loss,train/samples_seen\n9,0.5,40\n19,0.4,80\n")
    result = build_curves(table, find_runs([tmp_path / "runs"]), "paper")
    sdxl = result.series["sdxl", "ida"]
    assert sdxl.status == OK and [p.x for p in sdxl.points] == [40.0, 80.0, 120.0]  # 4 samples a step (CSV)
    assert [p.mean for p in sdxl.points] == pytest.approx([0.15, 0.25, 0.4])
    assert sdxl.points[-1].std == pytest.approx(statistics.stdev([0.3, 0.5]))
    assert result.series["pixart", "ida"].status == MISSING
    summary = render(table, find_runs([tmp_path / "runs"]), [tmp_path / "runs"], tmp_path / "out")
    with Image.open(summary["files"]["plot"]) as image:
        assert image.format == "PNG" and image.size[0] > 300
    text = (tmp_path / "out" / "curve.md").read_text()
    assert (
        "0.4 ± 0.14 (n=2)" in text
        and "| IDA | PTA-UM | 6.4e+07 | 0.4531 |" in text
        and "![Toy curves](curve.png)" in text
    )


def test_without_table_the_flat_listing_stays(runs, capsys):
    assert cli.tables_main([str(runs)]) == 0
    out = capsys.readouterr().out
    assert "| sun_run (seed 10) | sun | 26 |  | 12 |  |" in out
