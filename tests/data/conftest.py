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
def _quiet_single_threaded():
    """One intra-op thread: the tiny models gain nothing from more, and on a shared 2-core machine
    oversubscribed torch threads make them 10x slower. Restored after each test."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    yield
    torch.set_num_threads(threads)
