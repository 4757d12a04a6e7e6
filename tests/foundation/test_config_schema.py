"""One source of truth for defaults: every YAML node whose ``_target_`` is an options dataclass lists exactly
that dataclass's fields with exactly its defaults (the YAML is the documented copy; the dataclass validates).
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from xa_lightning.paths import repo_root

CONF = repo_root() / "conf"


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _dataclass_nodes(node: Any, where: str) -> list[tuple[str, DictConfig, type]]:
    found = []
    if isinstance(node, DictConfig):
        target = (
            node.get("_target_") if "_target_" in node and not OmegaConf.is_interpolation(node, "_target_") else None
        )
        if target:
            cls = _import(str(target))
            if dataclasses.is_dataclass(cls):
                found.append((where, node, cls))
        for key in node:
            if not OmegaConf.is_interpolation(node, key):
                found += _dataclass_nodes(node._get_node(key), f"{where}.{key}")
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            found += _dataclass_nodes(node._get_node(i), f"{where}[{i}]")
    return found


def _nodes() -> list[tuple[str, DictConfig, type]]:
    nodes = []
    for file in sorted(CONF.glob("**/*.yaml")):
        if "local" in file.relative_to(CONF).parts:
            continue
        nodes += _dataclass_nodes(OmegaConf.load(file), str(file.relative_to(repo_root())))
    return nodes


NODES = _nodes()


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return "???"


def test_every_method_config_has_dataclass_nodes():
    files = {where.split(":")[0].split(".yaml")[0] for where, _, _ in NODES}
    for method in (CONF / "method").glob("*.yaml"):
        assert any(str(method.relative_to(repo_root()))[:-5] in f for f in files), method


@pytest.mark.parametrize("where,node,cls", NODES, ids=[where for where, _, _ in NODES])
def test_yaml_node_lists_the_dataclass_fields_with_their_defaults(where: str, node: DictConfig, cls: type):
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    keys = {str(k) for k in node if not (str(k).startswith("_") and str(k).endswith("_"))}
    assert keys == set(fields), (
        f"{where} ({cls.__name__}): missing {sorted(set(fields) - keys)}, unknown {sorted(keys - set(fields))}"
    )
    for key in sorted(keys):
        if OmegaConf.is_interpolation(node, key):
            continue  # e.g. ${paths.evaluation_dir}/...: resolved at run time
        value = node[key]
        if isinstance(value, DictConfig) and "_target_" in value:
            continue  # a nested options dataclass: checked as a node of its own

        value = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
        default = _default(fields[key])
        default = list(default) if isinstance(default, tuple) else default
        assert value == default, f"{where}.{key}: YAML {value!r} != {cls.__name__} default {default!r}"


def test_the_check_finds_drift(tmp_path: Path):
    @dataclasses.dataclass
    class Options:
        steps: int = 4

    node = OmegaConf.create({"_target_": "x.Options", "steps": 8})
    with pytest.raises(AssertionError, match="steps"):
        test_yaml_node_lists_the_dataclass_fields_with_their_defaults("demo", node, Options)
