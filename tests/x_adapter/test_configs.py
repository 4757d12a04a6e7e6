"""The Hydra configs: every X-Adapter experiment composes and validates; the demo trains on the real data."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

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
        if short != "compare_lora":  # control maps: read at the size the SD1.5 plugin sees, captions beside them
            assert cfg.eval.reference_resolution == 512, "maps shrunk to 224 and blown up again lose thin edges"
            assert cfg.eval.prompts_file.endswith(".txt") and cfg.eval.references_dir
        else:  # the paper's LoRA protocol: 20 prompts x 50 seeds
            from xa_lightning.metrics.config import EvaluationConfig
            from xa_lightning.metrics.evaluate import build_evaluation_set

            evaluation = EvaluationConfig.coerce(OmegaConf.to_container(cfg.eval, resolve=True))
            built = build_evaluation_set(evaluation)
            assert len(set(built["prompts"])) == 20 and len(built["prompts"]) == 1000
            assert built["prompts"].count(built["prompts"][0]) == 50 and len(set(built["seeds"])) == 1000
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


def test_the_new_comparisons_compose_with_their_plugins_and_protocols():
    compose_one = lambda name: compose("train", [f"experiment=x_adapter/{name}"])
    t2i = compose_one("compare_t2i_adapter")
    assert (t2i.method.plugin.kind, t2i.method.plugin.path) == ("t2i_adapter", "TencentARC/t2iadapter_canny_sd15v2")
    assert "edge_f1" in t2i.eval.metrics and t2i.train is False
    remix = compose_one("remix")
    assert remix.method.plugin.kind == "lora" and remix.method.plugin.upgraded_lora.endswith(".safetensors")
    depth = compose_one("compare_controlnet_depth")
    assert "depth_rmse" in depth.eval.metrics
    sd21 = compose_one("sd21_to_sdxl")
    assert sd21.method.base_backbone.path == "stabilityai/stable-diffusion-2-1" and sd21.data.resolution == 768
    assert sd21.method.base_backbone.family == "sd15" and list(sd21.data.extra_resolutions) == [1024]
    ip = compose_one("compare_ip_adapter")
    assert (ip.method.plugin.kind, ip.data._target_.rsplit(".", 1)[-1]) == ("ip_adapter", "CelebAMaskHQDataModule")
    assert list(ip.eval.metrics) == ["ida", "clip_image_similarity"] and ip.eval.ida.missing_face == "zero"
    assert ip.eval.num_images == 400 and ip.eval.images_per_reference == 4 and ip.train is False
    # the paper's training recipe: 300k LAION high-resolution images, batch 8, 2 epochs
    paper = compose_one("sd15_to_sdxl")
    assert paper.data.epoch_samples == 300_000 and paper.data.batch_size == 8 and paper.trainer.max_steps == 75_000
    assert paper.data.filters.min_side == 1024 and paper.data.upscale_small is False
    for cfg in (t2i, remix, depth, sd21, ip, paper):
        validate(cfg)
