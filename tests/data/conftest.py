"""Shared fixtures: the demo datasets, built once per session through the real builder."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A ``paths.data_dir`` holding ``demo/{laion,celebamask_hq,openimages}`` (do not modify: shared)."""
    from xa_lightning.data.demo import build_demo

    root = tmp_path_factory.mktemp("data")
    build_demo(root / "demo")
    return root


@pytest.fixture(scope="session")
def demo_root(data_dir) -> Path:
    return data_dir / "demo"


@pytest.fixture(autouse=True)
def _quiet_lightning():
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
