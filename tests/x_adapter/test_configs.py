"""The Hydra configs: every X-Adapter experiment composes and validates; the demo trains on the real data."""

from __future__ import annotations

from pathlib import Path

import torch

from xa_lightning.config import compose, config_dir, validate

EXPERIMENTS = sorted(
    p.relative_to(config_dir() / "experiment").with_suffix("").as_posix()
    for p in (config_dir() / "experiment" / "x_adapter").glob("*.yaml")
)


def test_paper_experiments_compose_with_the_official_settings():
    """Every experiment composes (the foundation tests check that for all); here: the paper's settings."""
    assert len(EXPERIMENTS) >= 9
    expected = {
        "compare_controlnet_canny": ("controlnet", 1.0, 1.0),
        "compare_controlnet_depth": ("controlnet", 0.8, 1.0),
        "compare_controlnet_tile": ("controlnet", 0.7, 1.2),
        "compare_lora": ("lora", 0.95, 1.5),
    }
    for short, (plugin, alpha, scale) in expected.items():
        cfg = compose("train", [f"experiment=x_adapter/{short}"])
        validate(cfg)
        method = cfg.method
        assert method._target_.endswith("XAdapterModule")
        assert (method.base_backbone.family, method.upgraded_backbone.family) == ("sd15", "sdxl")
        assert list(cfg.data.extra_resolutions) == [1024] and cfg.data.resolution == 512
        assert (
            method.plugin.kind,
            method.sampling.adapter_guidance_start,
            method.sampling.adapter_condition_scale,
        ) == (plugin, alpha, scale)
        # evaluates a trained mapper as given: required weights, no training
        assert method.mapper.require_init_weights and cfg.train is False
    # the sweeps live in each file's hydra node (not part of a composed job config)
    text = {n: (config_dir() / "experiment" / f"{n}.yaml").read_text() for n in EXPERIMENTS}
    assert "method.mapper.fusion_type: add,spade" in text["x_adapter/ablation_fusion"]
    assert "method.mapper.insertion: decoder,encoder,both" in text["x_adapter/ablation_insertion"]
    assert "method.training.null_text: true,false" in text["x_adapter/ablation_null_text"]
    assert "method.sampling.adapter_guidance_start: 0.5,0.6,0.7,0.8,0.9,1.0" in text["x_adapter/ablation_alpha"]


def test_demo_experiment_trains_a_step_on_the_demo_data(tmp_path, monkeypatch):
    from xa_lightning.train import build

    cfg = compose(
        "train",
        [
            "experiment=demo/x_adapter",
            f"paths.data_dir={tmp_path / 'data'}",
            f"paths.output_dir={tmp_path / 'run'}",
            "callbacks=none",
            "logger=none",
            "+trainer.fast_dev_run=1",
            "+trainer.enable_progress_bar=false",
        ],
    )
    validate(cfg)
    trainer, model, datamodule = build(cfg)
    seen = {}
    original = model.compute_loss

    def spy(batch):
        seen.update({k: tuple(v.shape) for k, v in batch.items() if isinstance(v, torch.Tensor)})
        return original(batch)

    monkeypatch.setattr(model, "compute_loss", spy)
    before = {k: v.clone() for k, v in model.adapter.state_dict().items()}
    trainer.fit(model, datamodule=datamodule)
    assert seen["pixels"][1:] == (3, 64, 64) and seen["pixels_128"][1:] == (3, 128, 128)
    assert any(not torch.equal(before[k], v) for k, v in model.adapter.state_dict().items())
    assert Path(tmp_path / "data" / "demo" / "laion").is_dir()
