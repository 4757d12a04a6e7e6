"""The demo datasets for the reliability tests, built once per session through the real builder."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """``demo/{laion,celebamask_hq,openimages}`` (do not modify: shared)."""
    from xa_lightning.data.demo import build_demo

    root = tmp_path_factory.mktemp("data") / "demo"
    build_demo(root)
    return root
