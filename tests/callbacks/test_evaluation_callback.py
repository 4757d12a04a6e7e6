"""EvaluationCallback in real Lightning fits: CSV, TensorBoard and offline W&B loggers, metrics.json."""

from __future__ import annotations

import csv
import json
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from xa_lightning.callbacks import EvaluationCallback
from xa_lightning.errors import UserError
from xa_lightning.reporting.wandb_offline import read_offline_run

from .tiny_method import EvalDataModule, TinyTextAdapterModule, loader

ROOT = Path(__file__).resolve().parents[2]
TINY_CLIP = {
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("clip")
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_CLIP))
    return f"local-dir:{folder}"


def _trainer(tmp_path: Path, callbacks: list, loggers, max_steps: int = 4) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=loggers,
        callbacks=callbacks,
        default_root_dir=str(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def _fit(tmp_path: Path, callbacks: list, loggers, datamodule=None, max_steps: int = 4) -> TinyTextAdapterModule:
    L.seed_everything(0, verbose=False)
    module = TinyTextAdapterModule()
    trainer = _trainer(tmp_path, callbacks, loggers, max_steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained-CLIP warnings are asserted elsewhere; Lightning chatter
        if datamodule is None:
            trainer.fit(module, train_dataloaders=loader())
        else:
            trainer.fit(module, datamodule=datamodule)
    module.trainer_ref = trainer
    return module


def test_csv_logger_metrics_json_grid_pairs_and_unchanged_training(tmp_path, clip_dir):
    from lightning.pytorch.loggers import CSVLogger
    from PIL import Image

    real_dir = tmp_path / "real"
    real_dir.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(real_dir / f"{index}.png")
    callback = EvaluationCallback(
        {
            "metrics": ["fid", "clip_score"],
            "num_images": 2,
            "batch_size": 2,
            "every_n_steps": 2,
            "log_images": 2,
            "pairs": [["method", "baseline"]],
            "prompts_file": "evaluation/prompts/demo.txt",
            "real_dir": str(real_dir),
            "clip": {"model": clip_dir},
            "progress": False,
        }
    )
    run_dir = tmp_path / "run"
    logger = CSVLogger(str(run_dir), name="csv", version="")
    module = _fit(run_dir, [callback], [logger])

    # the sampler ran in eval mode without gradients, for both samplers, in fixed seed batches
    assert module.sampler_calls and all(not c["training"] and not c["grad"] for c in module.sampler_calls)
    assert [c["seeds"] for c in module.sampler_calls[:2]] == [[1234, 1235], [1234, 1235]]
    # evaluation does not change the training run: same adapter as a fit without the callback
    plain = _fit(tmp_path / "plain", [], False)
    torch.testing.assert_close(module.adapter.weight, plain.adapter.weight, rtol=0, atol=0)

    summary = json.loads((run_dir / "metrics.json").read_text())
    keys = {
        "eval/method/fid",
        "eval/baseline/fid",
        "eval/method/clip_score_untrained",
        "eval/baseline/clip_score_untrained",
        "eval/method_vs_baseline/fid",
    }
    assert keys <= set(summary["metrics"])
    assert [h["step"] for h in summary["history"]] == [2, 4] and summary["final"] and summary["history"][-1]["final"]
    # Sample Count at each evaluation (the x-axis of A4A's curves): samples seen so far over all ranks
    per_step = module.samples_seen // 4
    assert per_step > 0 and [h["samples_seen"] for h in summary["history"]] == [2 * per_step, 4 * per_step]
    assert summary["untrained"] == ["clip_score_untrained"]
    assert summary["prompts"] == (ROOT / "evaluation/prompts/demo.txt").read_text().splitlines()[:2]
    assert len(summary["per_image"]["method"]["clip_score_untrained"]) == 2
    assert module.trainer_ref.callback_metrics["eval/method/fid"] == pytest.approx(
        summary["metrics"]["eval/method/fid"]
    )

    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("eval/method/fid")]
    assert [int(r["step"]) for r in rows] == [2, 4]
    grid = Image.open(Path(logger.log_dir) / "eval_images" / "eval_samples_step0000002.png")
    assert grid.size == (2 * 34 + 2, 2 * 34 + 2)  # 2 images per row, a row per sampler, 2 px padding


def test_offline_wandb_tensorboard_and_datamodule_sources(tmp_path, clip_dir, monkeypatch):
    import wandb
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    callback = EvaluationCallback(
        {
            "metrics": ["clip_score", "clip_image_similarity"],
            "num_images": 4,
            "images_per_reference": 2,
            "batch_size": 4,
            "log_images": 4,
            "clip": {"model": clip_dir},
            "progress": False,
        }
    )
    wandb_logger = WandbLogger(project="xa-test", save_dir=str(tmp_path), offline=True)
    tensorboard = TensorBoardLogger(str(tmp_path), name="tb", version="")
    datamodule = EvalDataModule()
    try:
        module = _fit(tmp_path, [callback], [wandb_logger, tensorboard], datamodule=datamodule, max_steps=2)
        run_dir = Path(wandb_logger.experiment.dir).parent
    finally:
        wandb.finish()

    # prompts and references came from the datamodule: 2 references, each for 2 generations
    assert datamodule.asked == {"references": 2, "prompts": 2}
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["prompts"] == ["held-out caption 0"] * 2 + ["held-out caption 1"] * 2
    assert all(c["references"] for c in module.sampler_calls)

    # offline W&B lost nothing: read the run file back (wandb-core may still be flushing it after finish())
    expected = {
        "eval/method/clip_score_untrained",
        "eval/baseline/clip_image_similarity_untrained",
        "eval/samples",
        "eval/table",
    }
    deadline = time.monotonic() + 60
    while True:
        run = read_offline_run(run_dir)
        logged = {key for row in run["history"] for key in row}
        if expected <= logged or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert expected <= logged
    table = next(row["eval/table"] for row in run["history"] if "eval/table" in row)
    assert table["_type"] == "table-file" and table["nrows"] == 4
    columns = json.loads((run_dir / "files" / table["path"]).read_text())["columns"]
    assert columns[:4] == ["index", "prompt", "seed", "reference"]
    assert {"method", "method/clip_score_untrained", "baseline/clip_image_similarity_untrained"} <= set(columns)
    image = next(row["eval/samples"] for row in run["history"] if "eval/samples" in row)
    assert (run_dir / "files" / image["filenames"][0]).is_file()
    value = next(
        row["eval/method/clip_score_untrained"] for row in run["history"] if "eval/method/clip_score_untrained" in row
    )
    assert value == pytest.approx(summary["metrics"]["eval/method/clip_score_untrained"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert "eval/samples" in events.Tags()["images"]
    assert "eval/method/clip_score_untrained" in events.Tags()["scalars"]


def test_unusable_configuration_fails_before_training(tmp_path, clip_dir):
    callback = EvaluationCallback(
        {"metrics": ["clip_score"], "prompts_file": str(tmp_path / "missing.txt"), "clip": {"model": clip_dir}}
    )
    module = TinyTextAdapterModule()
    trainer = _trainer(tmp_path, [callback], False)
    with pytest.raises(UserError, match="missing.txt"):
        trainer.fit(module, train_dataloaders=loader())
    assert module.training_steps == 0 and not (tmp_path / "metrics.json").exists()
    with pytest.raises(UserError, match="callbacks.evaluation.every_n_step"):
        EvaluationCallback({"metrics": []}, every_n_step=3)


@pytest.mark.parametrize(
    "settings, message",
    [
        # CLIP without weights while real weights are required (eval=paper): not at the first evaluation
        ({"metrics": ["clip_score"], "clip": {"require_pretrained": True}}, "eval.clip.require_pretrained=true"),
        (
            {
                "metrics": ["ida"],
                "references_dir": ".",
                "ida": {"backend": "insightface", "model_dir": "/no/antelopev2"},
            },
            "eval.ida.model_dir: /no/antelopev2 does not exist",
        ),
        ({"metrics": ["fid"], "fid": {"reference_stats": "/nonexistent/stats.npz"}}, "stats.npz does not exist"),
        ({"metrics": ["edge_f1"]}, "eval.references_dir is unset"),
    ],
)
def test_every_metric_requirement_is_checked_before_training(tmp_path, clip_dir, settings, message):
    config = {"prompts_file": "evaluation/prompts/demo.txt", "clip": {"model": clip_dir}, **settings}
    config["clip"] = {"model": clip_dir, **settings.get("clip", {})}
    module = TinyTextAdapterModule()
    trainer = _trainer(tmp_path, [EvaluationCallback(config)], False)
    with pytest.raises(UserError, match=message):
        trainer.fit(module, train_dataloaders=loader())
    assert module.training_steps == 0
