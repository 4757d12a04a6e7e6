"""xa-train -> metrics.json / loggers / checkpoint / export, then xa-eval and xa-sample on the checkpoint.

In-process, through the same entry points a user types, on the demo experiment with a few steps.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from xa_lightning import cli


@pytest.fixture(scope="module")
def sun_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("e2e") / "run"
    code = cli.train_main(
        [
            "experiment=demo/sun",
            "trainer.max_steps=2",
            "trainer.log_every_n_steps=1",
            "eval.num_images=2",
            "eval.batch_size=2",
            "logger=many",
            f"hydra.run.dir={run}",
        ]
    )
    assert code == 0
    return run


def test_training_run_writes_metrics_logs_checkpoint_and_adapter(sun_run):
    metrics = json.loads((sun_run / "metrics.json").read_text())["metrics"]
    for key in ("eval/sun/fid", "eval/teacher/fid", "eval/sun_vs_teacher/fid", "eval/sun/kid"):
        assert key in metrics and metrics[key] >= 0
    # offline CLIP is random-init: the name says so rather than passing for the real metric
    assert "eval/sun/clip_score_untrained" in metrics and "eval/sun/clip_score" not in metrics

    csv_text = (sun_run / "csv" / "metrics.csv").read_text()
    assert "eval/sun/fid" in csv_text and "train/loss" in csv_text

    ckpt = torch.load(sun_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"] and all(k.startswith("adapter.") for k in ckpt["state_dict"])
    assert ckpt["xa"]["method"] == "sun" and ckpt["xa"]["config"]["run_name"] == "demo_sun"
    assert (sun_run / "adapter" / "diffusion_pytorch_model.safetensors").is_file()

    from xa_lightning.reporting.wandb_offline import read_offline_run

    offline = sorted((sun_run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    deadline = time.time() + 60  # wandb's writer process may still be flushing
    while True:
        data = read_offline_run(offline[0])
        keys = {k for row in data["history"] for k in row}
        if "eval/sun/fid" in keys or time.time() > deadline:
            break
        time.sleep(2)
    assert {"train/loss", "eval/sun/fid"} <= keys
    assert data["config"].get("run_name") in ("demo_sun", {"value": "demo_sun"})


def test_xa_eval_and_xa_sample_rebuild_the_method_from_the_checkpoint(sun_run, tmp_path, capsys):
    ckpt = sun_run / "checkpoints" / "last.ckpt"
    assert (
        cli.eval_main(
            [
                f"ckpt_path={ckpt}",
                "data=laion_demo",
                "eval.num_images=2",
                "eval.batch_size=2",
                f"hydra.run.dir={tmp_path / 'eval'}",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == "sun" and "eval/sun/fid" in result["metrics"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"] == result["metrics"]

    assert (
        cli.sample_main(
            [f"ckpt_path={ckpt}", "num_images=2", "sampler=teacher", f"hydra.run.dir={tmp_path / 'sample'}"]
        )
        == 0
    )
    index = json.loads((tmp_path / "sample" / "samples" / "samples.json").read_text())
    assert [e["file"].split("_")[0] for e in index] == ["teacher", "teacher"]


def test_wrong_method_checkpoint_is_one_line(sun_run, tmp_path, capsys):
    ckpt = sun_run / "checkpoints" / "last.ckpt"
    code = cli.train_main(
        [
            "experiment=demo/x_adapter",
            f"ckpt_path={ckpt}",
            "trainer.max_steps=1",
            "callbacks=none",
            "logger=none",
            f"hydra.run.dir={tmp_path / 'x'}",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("xa-train: error:") and "is for method 'sun'" in err[-1]


def test_train_false_evaluates_given_weights_without_training(sun_run, tmp_path, capsys):
    """The evaluation-only experiments (official weights, X-Adapter comparisons) run with train=false."""
    out = tmp_path / "official"
    code = cli.train_main(
        [
            "experiment=sun/official_weights",
            f"method.adapter.init_weights={sun_run / 'adapter'}",
            "backbone=sd15_tiny",
            "data=laion_demo",
            "trainer=cpu",
            "eval=demo",
            "eval.num_images=2",
            "eval.batch_size=2",
            "logger=none",
            f"hydra.run.dir={out}",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert {"eval/sun/fid", "eval/teacher/fid", "eval/sun_vs_teacher/fid"} <= set(metrics)
    assert not (out / "checkpoints").exists(), "train=false must not train or checkpoint"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["metrics"] == metrics
