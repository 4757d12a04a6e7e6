"""An offline W&B run as a dashboard, read back from its file: tags, group, Sample Count axis, captions, table.

A real Lightning fit of the callbacks' tiny method with the real evaluation callback and our WandbLogger
(the class conf/logger/wandb.yaml instantiates); then xa-tables reads the run's metrics from W&B alone.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import lightning as L
import pytest

from tests.callbacks.tiny_method import EvalDataModule, TinyTextAdapterModule
from xa_lightning.callbacks import EvaluationCallback
from xa_lightning.callbacks.loggers import SAMPLES_SEEN, WandbLogger, table_tags
from xa_lightning.reporting.runs import read_run
from xa_lightning.reporting.wandb_offline import read_offline_run

TABLE = {"name": "toy", "scale": "tiny", "run": "four", "runs": ["four", "pooled"], "experiment": "demo/sun"}
EXPECTED_KEYS = {"eval/method/edge_f1", "eval/images/method", "eval/images/baseline", "eval/table", "eval/samples"}


def test_table_tags():
    assert table_tags(TABLE) == ["table:toy", "run:four", "run:pooled", "tiny"]
    assert table_tags(None) == []


@pytest.fixture(scope="module")
def dashboard_run(tmp_path_factory):
    import wandb

    root = tmp_path_factory.mktemp("wandb_run")
    # mode="offline" as conf/logger/wandb.yaml passes it (Lightning's offline=True rewrites WANDB_MODE process-wide)
    logger = WandbLogger(
        project="xa-test",
        save_dir=str(root),
        mode="offline",
        group="sweep_1",
        tags=["demo"],
        table=TABLE,
        name="toy_four",
    )
    callback = EvaluationCallback(
        {"metrics": ["edge_f1"], "num_images": 2, "batch_size": 2, "log_images": 2, "progress": False}
    )
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=[logger],
        callbacks=[callback],
        default_root_dir=str(root),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    L.seed_everything(0, verbose=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(TinyTextAdapterModule(), datamodule=EvalDataModule())
        run_dir = Path(logger.experiment.dir).parent  # .../wandb/offline-run-*/files
    finally:
        wandb.finish()
    deadline = time.monotonic() + 60  # wandb-core may still be flushing after finish()
    while True:
        data = read_offline_run(run_dir)
        if {k for row in data["history"] for k in row} >= EXPECTED_KEYS or time.monotonic() > deadline:
            return root, run_dir, data
        time.sleep(0.5)


def test_run_is_tagged_grouped_and_plots_evaluations_against_sample_count(dashboard_run):
    _, _, data = dashboard_run
    assert data["name"] == "toy_four" and data["group"] == "sweep_1"
    assert data["tags"] == ["demo", "table:toy", "run:four", "run:pooled", "tiny"]
    assert data["step_metrics"]["eval/*"] == SAMPLES_SEEN


def test_every_logged_image_is_captioned_with_sampler_prompt_and_seed(dashboard_run):
    _, run_dir, data = dashboard_run
    history = data["history"]
    assert {k for row in history for k in row} >= EXPECTED_KEYS
    images = next(row["eval/images/baseline"] for row in history if "eval/images/baseline" in row)
    assert images["captions"] == [
        "baseline | held-out caption 0 | seed 1234",
        "baseline | held-out caption 1 | seed 1235",
    ]
    assert all((run_dir / "files" / name).is_file() for name in images["filenames"])
    table = next(row["eval/table"] for row in history if "eval/table" in row)
    content = json.loads((run_dir / "files" / table["path"]).read_text())
    assert content["columns"][:4] == ["index", "prompt", "seed", "reference"]
    assert {"method", "baseline", "method/edge_f1", "baseline/edge_f1"} <= set(content["columns"])
    assert [row[1] for row in content["data"]] == ["held-out caption 0", "held-out caption 1"]
    assert all(isinstance(row[content["columns"].index("method/edge_f1")], float) for row in content["data"])


def test_xa_tables_reads_the_metrics_back_from_the_offline_run(dashboard_run):
    root, _, _ = dashboard_run
    written = json.loads((root / "metrics.json").read_text())["metrics"]
    (root / "metrics.json").rename(root / "metrics.json.bak")
    try:
        record = read_run(root)
    finally:
        (root / "metrics.json.bak").rename(root / "metrics.json")
    assert record.source == "wandb"
    assert record.metrics["eval/method/edge_f1"] == pytest.approx(written["eval/method/edge_f1"])
    assert [e.step for e in record.history] == [2]
