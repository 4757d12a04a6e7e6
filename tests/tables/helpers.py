"""Run directories as xa-train writes them (``.hydra/``, ``metrics.json``, ``failed.json``), built by hand."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from xa_lightning.reporting.runs import write_failure


def write_run(
    path: Path,
    *,
    experiment: str | None = "demo/sun",
    config: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    history: list[dict[str, Any]] | None = None,
    failure: BaseException | None = None,
    mtime: float | None = None,
) -> Path:
    """A run directory; ``config`` is the job config (``backbone.flavour`` tiny marks a tiny run)."""
    (path / ".hydra").mkdir(parents=True, exist_ok=True)
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config or {}))
    choices = {"experiment": experiment} if experiment else {}
    (path / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    if metrics is not None:
        content = {"metrics": metrics, "final": True}
        if history is not None:
            content["history"] = history
        (path / "metrics.json").write_text(json.dumps(content))
    if failure is not None:
        try:
            raise RuntimeError("wrapped by Hydra") from failure
        except RuntimeError as exc:
            write_failure(path, exc)
    if mtime is not None:
        for file in path.rglob("*"):
            os.utime(file, (mtime, mtime))
    return path


def sun_config(steps: int, seed: int, flavour: str = "pretrained", **extra: Any) -> dict[str, Any]:
    return {
        "seed": seed,
        "run_name": "sun_run",
        "backbone": {"family": "sd15", "flavour": flavour},
        "method": {"sampling": {"steps": steps}},
        "data": {"batch_size": 4},
        "trainer": {"devices": 1, "num_nodes": 1, "accumulate_grad_batches": 1},
        **extra,
    }
