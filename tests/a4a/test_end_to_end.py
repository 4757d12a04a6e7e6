"""xa-train experiment=demo/a4a (SDXL-tiny) and demo/a4a_pixart (PixArt-tiny) through the real CLI entry,
in-process, on the CelebAMask-HQ demo tree: metrics.json holds IDA, the face-detection rate and CLIP image
similarity for A4A and every baseline; xa-eval rebuilds the method from its checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from xa_lightning import cli

METRICS = ("ida", "face_detection_rate", "clip_image_similarity")


def _metric(metrics: dict, sampler: str, name: str) -> float:
    # offline CLIP is random-init: logged as clip_image_similarity_untrained rather than passing for the real one
    for key in (f"eval/{sampler}/{name}", f"eval/{sampler}/{name}_untrained"):
        if key in metrics:
            return metrics[key]
    raise AssertionError(f"eval/{sampler}/{name} missing from {sorted(metrics)}")


@pytest.fixture(scope="module")
def a4a_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("a4a") / "run"
    code = cli.train_main(
        [
            "experiment=demo/a4a",
            "trainer.max_steps=2",
            "trainer.log_every_n_steps=1",
            "method.sampling.steps=2",
            "eval.num_images=4",
            "eval.batch_size=4",
            "logger=csv",
            f"hydra.run.dir={run}",
        ]
    )
    assert code == 0
    return run


def test_demo_writes_ida_face_rate_and_clip_similarity_for_a4a_and_its_baselines(a4a_run):
    written = json.loads((a4a_run / "metrics.json").read_text())
    assert written["samplers"] == ["a4a", "upgraded", "pta_um", "pta_base"]
    metrics = written["metrics"]
    for sampler in written["samplers"]:
        for name in METRICS:
            value = _metric(metrics, sampler, name)
            assert value is not None and 0.0 <= value <= 1.0, (sampler, name, value)
    assert written["config"]["ida"]["missing_face"] == "zero" and written["num_images"] == 4

    csv_text = (a4a_run / "csv" / "metrics.csv").read_text()
    assert "lr-AdamW/projection_alignment" in csv_text and "lr-AdamW/mapping" in csv_text
    assert "train/samples_seen" in csv_text

    ckpt = torch.load(a4a_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["xa"]["method"] == "a4a" and all(k.startswith("adapter.") for k in ckpt["state_dict"])
    assert not any(k.startswith("adapter.pta.") for k in ckpt["state_dict"])  # the frozen PTA is not saved
    assert (a4a_run / "adapter" / "diffusion_pytorch_model.safetensors").is_file()


def test_xa_eval_rebuilds_a4a_from_its_checkpoint(a4a_run, tmp_path, capsys):
    code = cli.eval_main(
        [
            f"ckpt_path={a4a_run / 'checkpoints' / 'last.ckpt'}",
            "data=celebamask_hq_demo",
            "eval.metrics=[clip_image_similarity]",
            "eval.num_images=2",
            "eval.batch_size=2",
            "eval.samplers=[a4a]",
            f"hydra.run.dir={tmp_path / 'eval'}",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == "a4a" and result["samples_seen"] == 8
    assert _metric(result["metrics"], "a4a", "clip_image_similarity") is not None


def test_pixart_demo(tmp_path):
    run = tmp_path / "pixart"
    code = cli.train_main(
        [
            "experiment=demo/a4a_pixart",
            "trainer.max_steps=1",
            "method.sampling.steps=2",
            "eval.num_images=2",
            "eval.batch_size=2",
            "eval.images_per_reference=1",
            "logger=none",
            "callbacks.lr_monitor=null",
            f"hydra.run.dir={run}",
        ]
    )
    assert code == 0
    written = json.loads((run / "metrics.json").read_text())
    assert written["samplers"] == ["a4a", "upgraded", "pta_base"]
    for sampler in written["samplers"]:
        for name in METRICS:
            assert _metric(written["metrics"], sampler, name) is not None
