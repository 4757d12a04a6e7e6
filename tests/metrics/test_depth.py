"""depth_rmse: the depth of generated images re-estimated by a transformers DPT model against the control depth
maps; equal to the formula computed by hand with the same model; skipped (one line) without weights."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xa_lightning.errors import UserError
from xa_lightning.metrics import depth
from xa_lightning.metrics.base import MetricContext


@pytest.fixture(scope="module")
def dpt_dir(tmp_path_factory):
    """A tiny random DPT depth model and its image processor, saved as a local model directory."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    folder = tmp_path_factory.mktemp("dpt")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = DPTConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=37,
            image_size=32,
            patch_size=8,
            neck_hidden_sizes=[8, 8, 8, 8],
            fusion_hidden_size=8,
            backbone_out_indices=[0, 1, 2, 3],
            is_hybrid=False,
        )
        DPTForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(folder)
    return folder


def config(**values) -> SimpleNamespace:
    return SimpleNamespace(depth=values)


def images(seed: int, count: int = 3, size: int = 48) -> torch.Tensor:
    return torch.randint(
        0, 256, (count, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


def reference_rmse(folder, generated: torch.Tensor, depth_maps: torch.Tensor) -> np.ndarray:
    """The formula by hand: the model run directly, resized to the maps, both min-max normalised, RMSE."""
    from transformers import DPTForDepthEstimation, DPTImageProcessor

    model, processor = DPTForDepthEstimation.from_pretrained(folder), DPTImageProcessor.from_pretrained(folder)
    arrays = [image.permute(1, 2, 0).numpy() for image in generated]
    with torch.no_grad():
        predicted = model(**processor(images=arrays, return_tensors="pt")).predicted_depth
    predicted = F.interpolate(predicted[:, None], size=depth_maps.shape[-2:], mode="bicubic")[:, 0].numpy()
    target = (depth_maps.float().numpy() * np.array([0.299, 0.587, 0.114])[:, None, None]).sum(axis=1) / 255
    scores = []
    for p, t in zip(predicted, target):
        p = (p - p.min()) / (p.max() - p.min())
        t = (t - t.min()) / (t.max() - t.min())
        scores.append(np.sqrt(((p - t) ** 2).mean()))
    return np.array(scores)


def test_depth_rmse_equals_the_formula_with_the_same_model(dpt_dir):
    metric = depth.DepthRMSE.from_config(config(model=str(dpt_dir)), MetricContext("x_adapter", torch.device("cpu")))
    generated, depth_maps = images(0), images(1, size=32)
    metric.update(generated, references=depth_maps)
    expected = reference_rmse(dpt_dir, generated, depth_maps)
    np.testing.assert_allclose(metric.last_scores["depth_rmse"].numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metric.compute()), expected.mean(), rtol=1e-5)
    assert metric.higher_is_better is False and depth.DepthRMSE.needs == {"references"}


def test_the_estimated_depth_of_an_image_scores_zero_against_itself(dpt_dir):
    """A control map made by the same estimator from the very image it scores: (almost) no error; another
    image's depth: a clear one. references=image estimates the target depth from photos."""
    metric = depth.DepthRMSE.from_config(config(model=str(dpt_dir)), MetricContext("x", torch.device("cpu")))
    generated = images(2)
    own = metric.estimator(generated, (48, 48))
    maps = (depth.minmax(own) * 255).round().to(torch.uint8)[:, None].expand(-1, 3, -1, -1)
    assert metric.score(generated, references=maps).max() < 0.01
    assert metric.score(generated, references=maps.roll(1, dims=0)).min() > 0.05
    photos = depth.DepthRMSE.from_config(config(model=str(dpt_dir), references="image"), MetricContext("x", "cpu"))
    assert photos.score(generated, references=generated).max() < 1e-6


def test_missing_weights_skip_the_metric_with_one_line_or_fail_when_required(tmp_path, caplog):
    missing = str(tmp_path / "no-dpt")
    with caplog.at_level(logging.WARNING, logger="xa_lightning.metrics.depth"):
        depth.DepthRMSE.prepare(config(model=missing), torch.device("cpu"))
        assert depth.DepthRMSE.from_config(config(model=missing), MetricContext("x", torch.device("cpu"))) is None
    lines = [r.getMessage() for r in caplog.records if r.name == "xa_lightning.metrics.depth"]
    assert len(lines) == 1 and "depth_rmse skipped" in lines[0] and "\n" not in lines[0]
    with pytest.raises(UserError, match=r"^depth_rmse: no weights .*eval.depth.model=") as error:
        depth.DepthRMSE.prepare(config(model=missing, require_pretrained=True), torch.device("cpu"))
    assert "\n" not in str(error.value)
    (tmp_path / "broken").mkdir()
    with pytest.raises(UserError, match="is not a transformers depth-estimation model directory"):
        depth.load_depth_estimator(str(tmp_path / "broken"))
    with pytest.raises(UserError, match="eval.depth.references"):
        depth.DepthConfig(references="normals")
