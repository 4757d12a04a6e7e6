"""Table files: they load, their paper numbers are the published ones, a bad file is one line naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from xa_lightning.errors import UserError
from xa_lightning.paths import repo_root
from xa_lightning.reporting import sweeps
from xa_lightning.reporting.schema import load_table, load_tables, parse_table

PAPER_NUMBERS = repo_root() / "evaluation" / "paper_numbers.md"

VALID = {
    "title": "Toy",
    "source": "tests",
    "protocol": {"split": "demo prompts", "num_images": 4, "seeds": [0, 10]},
    "runs": {"four": {"experiment": "demo/sun", "overrides": ["method.sampling.steps=4"], "tiny": "demo/sun"}},
    "columns": {"fid": {"label": "FID", "better": "lower"}},
    "rows": {"four": {"label": "four steps", "run": "four", "paper": {"fid": 30.0}, "cells": {"fid": "eval/sun/fid"}}},
}


def _numbers(text: str) -> set[float]:
    """Every number of a text, with ``64M`` read as 64e6."""
    found = set()
    for value, millions in re.findall(r"(\d+(?:\.\d+)?)(M?)", text):
        found.add(round(float(value) * (1e6 if millions else 1), 6))
    return found


def test_every_table_loads_and_names_its_protocol():
    tables = load_tables()
    assert len(tables) >= 7
    for table in tables:
        assert table.protocol.seeds and table.protocol.split
        assert table.rows or table.series


def test_paper_values_are_only_numbers_from_paper_numbers_md():
    published = _numbers(PAPER_NUMBERS.read_text())
    given = []
    for table in load_tables():
        for row in table.rows.values():
            for column, paper in row.paper.items():
                for number in (paper.value, paper.std):
                    if number is not None:
                        given.append((f"{table.name}.{row.key}.{column}", number))
        for point in table.paper_points:
            given += [(f"{table.name}.{point.label}.x", point.x), (f"{table.name}.{point.label}.y", point.y)]
    assert given, "no paper values at all"
    unpublished = [(where, n) for where, n in given if round(n, 6) not in published]
    assert not unpublished, f"paper values not in evaluation/paper_numbers.md: {unpublished}"


def test_tables_without_published_numbers_leave_the_paper_cells_empty():
    for name in ("x_adapter_ablations", "sun_ablations", "a4a_ablations"):
        assert not any(row.paper for row in load_table(name).rows.values()), name
    sun_steps = load_table("sun_steps")
    assert [(row.key, list(row.paper)) for row in sun_steps.rows.values() if row.paper] == [("sun_4", ["speedup"])]


def _mutated(path: list[str], value: object) -> dict:
    data = yaml.safe_load(yaml.safe_dump(VALID))
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


@pytest.mark.parametrize(
    "path,value,expected",
    [
        (["colums"], {}, "colums is not a table setting (did you mean columns?)"),
        (["rows", "four", "run"], "nope", "rows.four.run 'nope' is not one of runs: four"),
        (["runs", "four", "overrides"], ["seed=0,1"], "runs.four.overrides[0] must set one value"),
        (["protocol", "seeds"], [0, 2], "protocol.seeds must be at least protocol.num_images (4) apart"),
        (["protocol", "split"], KeyError, "protocol.split is required"),
        (["rows", "four", "paper", "fid"], "about 30", "rows.four.paper.fid must be a number"),
        (["rows", "four", "cells", "clip"], "eval/sun/clip_score", "rows.four.cells.clip is not one of columns: fid"),
        (["columns", "fid", "better"], "smaller", "columns.fid.better must be lower or higher"),
        (["runs", "four", "experiment"], "experiments/demo/sun.yaml", "runs.four.experiment is an experiment name"),
    ],
)
def test_a_bad_table_is_one_line_naming_the_file_and_the_key(tmp_path, path, value, expected):
    file = tmp_path / "toy.yaml"
    file.write_text(yaml.safe_dump(_mutated(path, value)))
    with pytest.raises(UserError) as info:
        load_table(file)
    message = str(info.value)
    assert "\n" not in message and str(file) in message
    assert expected in message


def test_unparsable_yaml_and_unknown_names_are_one_line(tmp_path):
    file = tmp_path / "broken.yaml"
    file.write_text("title: [unclosed\n")
    with pytest.raises(UserError, match=r"broken.yaml: line \d+ is not valid YAML"):
        load_table(file)
    with pytest.raises(UserError, match="table 'sun_step' is not in evaluation/tables/; did you mean sun_steps?"):
        load_table("sun_step")
    assert parse_table("toy", VALID, Path("toy.yaml")).runs["four"].at("tiny") == (
        "demo/sun",
        ("method.sampling.steps=4",),
    )


def test_a_table_with_nothing_runnable_yet_stops_the_sweep_with_the_reasons(monkeypatch):
    data = yaml.safe_load(yaml.safe_dump(VALID))
    data["runs"] = {
        "later": {"experiment": "a4a/not_written_yet"},
        "soon": {"experiment": "demo/sun", "needs": "a sampler"},
    }
    data["rows"]["four"]["run"] = "later"
    table = parse_table("toy", data, Path("toy.yaml"))
    monkeypatch.setattr(sweeps, "load_table", lambda name: table)
    with pytest.raises(UserError) as info:
        sweeps.sweep_runs("toy", "paper")
    assert str(info.value) == (
        "table toy has no run that can start at scale paper (later: experiment a4a/not_written_yet does not "
        "exist yet; soon: needs a sampler)"
    )
    with pytest.raises(UserError, match="table.scale=big is not a scale"):
        sweeps.sweep_runs("toy", "big")
