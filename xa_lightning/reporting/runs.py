"""What a run directory holds, read back for ``xa-tables``: config, final metrics, history, or why it failed.

A run directory is any folder with ``.hydra/config.yaml``, ``metrics.json`` or ``failed.json`` (single
runs, sweep jobs, ``xa-eval`` outputs). Metrics come from ``metrics.json`` (the evaluation callback's or
``xa-eval``'s), else from an offline W&B run in ``wandb/offline-run-*`` (its summary and history).
``failed.json`` is what the CLI writes when a job raises (:func:`write_failure`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from xa_lightning.errors import UserError

METRICS_FILE = "metrics.json"
FAILED_FILE = "failed.json"
UNTRAINED_SUFFIX = "_untrained"


def write_failure(run_dir: str | Path, exc: BaseException) -> Path:
    """``<run_dir>/failed.json``: the error as one line and the traceback's tail (a table's failed cell).

    The line names the innermost cause (what Lightning or the method raised, not Hydra's wrapper)."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    text = str(root).strip()
    first = text.splitlines()[0] if text else ""
    error = first if isinstance(root, UserError) else f"{type(root).__name__}: {first}".rstrip(": ")
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    path = Path(run_dir) / FAILED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{FAILED_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"error": error, "traceback": trace[-4000:]}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


@dataclass
class Evaluation:
    """One evaluation of a run: its optimizer step, the samples seen when known, the scalars."""

    step: int | None
    metrics: dict[str, float]
    samples_seen: float | None = None


@dataclass
class RunRecord:
    path: Path
    config: DictConfig | None = None
    choices: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[Evaluation] = field(default_factory=list)
    untrained: list[str] = field(default_factory=list)
    failure: str | None = None
    samples_per_step: float | None = None
    source: str | None = None  # metrics.json | wandb
    mtime: float = 0.0

    @property
    def experiment(self) -> str | None:
        """``experiment=`` of the run, or the experiment its table job included."""
        table = self.table or {}
        return self.choices.get("experiment") or table.get("experiment")

    @property
    def table(self) -> dict[str, Any] | None:
        value = self.config_value("table")
        return value if isinstance(value, dict) else None

    @property
    def seed(self) -> int | None:
        value = self.config_value("seed")
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @property
    def tiny(self) -> bool:
        """Built on tiny backbones (random weights): its numbers only show that the pipeline runs."""
        return self.config is not None and _has_tiny_backbone(OmegaConf.to_container(self.config, resolve=False))

    @property
    def label(self) -> str:
        name = None
        if self.config is not None and "run_name" in self.config:
            if OmegaConf.is_interpolation(self.config, "run_name"):  # the default: named after the experiment
                from xa_lightning.config import experiment_run_name

                name = experiment_run_name(self.experiment, self.path.name)
            else:
                name = self.config_value("run_name")
        name = name or self.path.name
        return f"{name} (seed {self.seed})" if self.seed is not None else str(name)

    def config_value(self, key: str, resolve: bool = True) -> Any:
        """A config value as plain Python (resolved where the reader can; None when unset).

        ``resolve=False``: as written, interpolations included (``${paths.data_dir}/openimages``).
        """
        if self.config is None:
            return None
        if not resolve:
            node: Any = OmegaConf.to_container(self.config, resolve=False)
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    return None
                node = node[part]
            return node
        try:
            value = OmegaConf.select(self.config, key, default=None, throw_on_resolution_failure=False)
        except Exception:  # a resolver of the writing process that this one lacks
            value = None
        if isinstance(value, (DictConfig, list)) or OmegaConf.is_config(value):
            try:
                return OmegaConf.to_container(value, resolve=True)
            except Exception:
                return OmegaConf.to_container(value, resolve=False)
        return value

    def value(self, metric: str) -> tuple[float | None, bool]:
        """(value, flagged): the metric, else its ``_untrained`` variant (random-init CLIP) flagged."""
        for key, flagged in ((metric, False), (metric + UNTRAINED_SUFFIX, True)):
            value = self.metrics.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                return float(value), flagged
        return None, False

    def samples_at(self, evaluation: Evaluation) -> float | None:
        if evaluation.samples_seen is not None:
            return evaluation.samples_seen
        if evaluation.step is not None and self.samples_per_step:
            return evaluation.step * self.samples_per_step
        return None


def _has_tiny_backbone(node: Any) -> bool:
    if isinstance(node, dict):
        if node.get("flavour") == "tiny":
            return True
        return any(_has_tiny_backbone(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_tiny_backbone(v) for v in node)
    return False


def _scalars(metrics: Any) -> dict[str, float]:
    if not isinstance(metrics, dict):
        return {}
    return {str(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _global_batch(config: DictConfig | None) -> float | None:
    """Samples per optimizer step from the config (batch x devices x nodes x accumulation), when plain."""
    if config is None:
        return None
    try:
        batch = OmegaConf.select(config, "data.batch_size", default=None, throw_on_resolution_failure=False)
        devices = OmegaConf.select(config, "trainer.devices", default=1, throw_on_resolution_failure=False)
        nodes = OmegaConf.select(config, "trainer.num_nodes", default=1, throw_on_resolution_failure=False)
        accumulate = OmegaConf.select(
            config, "trainer.accumulate_grad_batches", default=1, throw_on_resolution_failure=False
        )
    except Exception:
        return None
    numbers = [batch, devices, nodes, accumulate]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in numbers):
        return None
    return float(batch * devices * nodes * accumulate)


def _rate_from_rows(rows: Iterable[dict[str, Any]], step_key: str) -> float | None:
    """Samples per step from logged (step, train/samples_seen) pairs (the last pair wins)."""
    rate = None
    for row in rows:
        step, seen = row.get(step_key), row.get("train/samples_seen")
        try:
            step, seen = float(step), float(seen)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if seen > 0:
            rate = seen / (step + 1)
    return rate


def _csv_rate(run_dir: Path) -> float | None:
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as handle:
        return _rate_from_rows(csv.DictReader(handle), "step")


def _wandb_run(run_dir: Path) -> dict[str, Any] | None:
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    if not runs:
        return None
    from xa_lightning.reporting.wandb_offline import read_offline_run

    try:
        return read_offline_run(runs[-1])
    except (OSError, ValueError):
        return None


def read_run(run_dir: str | Path) -> RunRecord:
    path = Path(run_dir)
    record = RunRecord(path=path)
    config_file = path / ".hydra" / "config.yaml"
    if config_file.is_file():
        record.config = OmegaConf.load(config_file)  # type: ignore[assignment]
        record.mtime = config_file.stat().st_mtime
    hydra_file = path / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        choices = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.choices", default=None)
        if choices is not None:
            record.choices = {str(k): str(v) for k, v in OmegaConf.to_container(choices).items() if v is not None}
    metrics_file = path / METRICS_FILE
    failed_file = path / FAILED_FILE
    failed = _read_json(failed_file) if failed_file.is_file() else None
    if isinstance(failed, dict):
        later_success = metrics_file.is_file() and metrics_file.stat().st_mtime > failed_file.stat().st_mtime
        record.failure = None if later_success else str(failed.get("error") or "failed (no message)")
    content = _read_json(metrics_file) if metrics_file.is_file() else None
    wandb_run = None
    if isinstance(content, dict):
        record.source = METRICS_FILE
        record.mtime = metrics_file.stat().st_mtime
        record.metrics = _scalars(content.get("metrics"))
        record.untrained = [str(u) for u in content.get("untrained") or []]
        for entry in content.get("history") or []:
            if isinstance(entry, dict):
                seen = entry.get("samples_seen")
                samples = float(seen) if isinstance(seen, (int, float)) else None
                record.history.append(Evaluation(entry.get("step"), _scalars(entry.get("metrics")), samples))
        if not record.history and record.metrics:
            seen = content.get("samples_seen")
            record.history.append(
                Evaluation(content.get("step"), record.metrics, float(seen) if isinstance(seen, (int, float)) else None)
            )
    else:
        wandb_run = _wandb_run(path)
        if wandb_run is not None:
            record.source = "wandb"
            record.metrics = {k: v for k, v in _scalars(wandb_run["summary"]).items() if k.startswith("eval/")}
            for row in wandb_run["history"]:
                evals = {k: v for k, v in _scalars(row).items() if k.startswith("eval/")}
                if evals:
                    step = row.get("trainer/global_step")
                    record.history.append(Evaluation(int(step) if isinstance(step, (int, float)) else None, evals))
    if record.history or record.metrics:
        if wandb_run is None and (path / "wandb").is_dir():
            wandb_run = _wandb_run(path)
        rate = _rate_from_rows(wandb_run["history"], "trainer/global_step") if wandb_run else None
        record.samples_per_step = rate or _csv_rate(path) or _global_batch(record.config)
    return record


def find_runs(dirs: Sequence[str | Path]) -> list[RunRecord]:
    """Every run directory under ``dirs`` (recursively), oldest first."""
    found: set[Path] = set()
    for directory in dirs:
        root = Path(directory)
        if not root.exists():
            raise UserError(f"{root} does not exist; pass run or sweep directories (outputs/..., multirun/...)")
        found.update(p.parent.parent for p in root.glob("**/.hydra/config.yaml"))
        found.update(p.parent for p in root.glob(f"**/{METRICS_FILE}"))
        found.update(p.parent for p in root.glob(f"**/{FAILED_FILE}"))
    records = [read_run(path) for path in sorted(found)]
    return sorted(records, key=lambda r: (r.mtime, str(r.path)))
