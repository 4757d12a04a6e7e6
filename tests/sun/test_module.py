"""SUNModule (the LightningModule), its configs, checkpoints, export and evaluation samplers."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file

from xa_lightning.config import compose, validate
from xa_lightning.errors import UserError
from xa_lightning.methods import METHODS
from xa_lightning.methods.sun import SUNModule, SUNPipeline, load_sun_adapter
from xa_lightning.training import load_method

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = ["demo/sun"] + sorted(f"sun/{p.stem}" for p in (REPO / "experiments" / "sun").glob("*.yaml"))


def _compose(experiment: str, tmp_path, *overrides: str):
    cfg = compose("train", [f"experiment={experiment}", f"paths.output_dir={tmp_path}", *overrides])
    validate(cfg)
    return cfg


def test_registered():
    assert METHODS["sun"] == "xa_lightning.methods.sun.lit_module:SUNModule"


def test_every_sun_experiment_composes_and_builds_on_the_tiny_backbone(tmp_path):
    assert len(EXPERIMENTS) >= 5
    built = []
    for experiment in EXPERIMENTS:
        cfg = _compose(experiment, tmp_path, "backbone=sd15_tiny")
        method = {k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if k != "name"}
        if method in built:  # sweeps differ only in hydra.sweeper.params: one build covers them
            continue
        built.append(method)
        assert cfg.method._target_ == "xa_lightning.methods.sun.SUNModule"
        assert cfg.method.backbone.family == "sd15" and cfg.eval.pairs[0] == ["sun", "teacher"]
        if experiment == "sun/official_weights":
            with pytest.raises(Exception) as error:  # Hydra wraps constructor errors in InstantiationException
                instantiate(cfg.method)
            cause = error.value if isinstance(error.value, UserError) else error.value.__cause__
            assert isinstance(cause, UserError) and "init_weights is required" in str(cause)
            # with the official file it starts from the released weights (converted on load)
            from xa_lightning.backbones import build_backbone

            from .test_convert import official_state_dict

            official = official_state_dict(build_backbone("sd15", "tiny").denoiser, add_pos=True)
            save_file(official, str(tmp_path / "sun_adapter.safetensors"))
            cfg = _compose(
                experiment,
                tmp_path,
                "backbone=sd15_tiny",
                f"method.adapter.init_weights={tmp_path / 'sun_adapter.safetensors'}",
            )
            module = instantiate(cfg.method)
            assert module.adapter.config.use_positive_branch
            assert torch.equal(module.adapter.layers[1].to_v_neg.weight, official["3.to_v_neg.weight"])
            continue
        module = instantiate(cfg.method)
        assert isinstance(module, SUNModule) and module.adapter.is_installed(module.backbone.denoiser)
        assert module.distillation_config.objective == cfg.method.distillation.objective
        assert module.teacher.num_steps == 25 and module.sampling.steps == 4
        assert len(module.negative_prompts) >= 200
    assert _compose("sun/plugin_finetuned", tmp_path).method.sampling.plugin_unets


def _batches(n: int, batch_size: int = 2):
    generator = torch.Generator().manual_seed(0)
    captions = ["a red bicycle", "a snowy mountain", "a bowl of soup", "an old clock"]
    return [
        {
            "pixels": torch.rand(batch_size, 3, 64, 64, generator=generator) * 2 - 1,
            "caption": captions[(2 * i) % 4 : (2 * i) % 4 + batch_size],
        }
        for i in range(n)
    ]


def test_fit_checkpoint_export_and_reload(tmp_path):
    cfg = _compose("demo/sun", tmp_path)
    module = instantiate(cfg.method)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    before = {k: v.clone() for k, v in module.adapter.state_dict().items()}
    frozen_before = {k: v.clone() for k, v in module.backbone.denoiser.state_dict().items()}
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_batches(2), batch_size=None))
    after = module.adapter.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the adapter trained ...
    for key, value in module.backbone.denoiser.state_dict().items():  # ... the UNet did not
        assert torch.equal(value, frozen_before[key]), key
    assert set(module.state_dict()) == {f"adapter.{k}" for k in after}

    trainer.save_checkpoint(tmp_path / "sun.ckpt")
    restored = load_method(tmp_path / "sun.ckpt")
    for key, value in restored.adapter.state_dict().items():
        assert torch.equal(value, after[key]), key

    export = module.export_adapter(tmp_path / "export")
    adapter = load_sun_adapter(export, module.backbone.denoiser)
    for key, value in adapter.state_dict().items():
        assert torch.equal(value, after[key]), key
    pipe = SUNPipeline(module.backbone.pipeline(), adapter)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a cat", output_type="pt").images.shape == (1, 3, 64, 64)


def test_evaluation_samplers(tmp_path):
    cfg = _compose("demo/sun", tmp_path)
    module = instantiate(cfg.method)
    torch.manual_seed(1)
    other = type(module.backbone.denoiser).from_config(module.backbone.denoiser.config)
    other.save_pretrained(tmp_path / "finetune" / "unet")
    module.sampling.plugin_unets = {"finetune": str(tmp_path / "finetune")}
    samplers = module.evaluation_samplers()
    assert list(samplers) == ["sun", "teacher", "sun_finetune", "teacher_finetune"]
    prompts, seeds = ["a lighthouse", "a tiger"], [0, 1]
    unet = module.backbone.denoiser
    batches = []
    hook = unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    sun = samplers["sun"](prompts, seeds, None)
    assert batches == [2] * 4
    batches.clear()
    teacher = samplers["teacher"](prompts, seeds, None)
    assert batches == [4] * 25  # 25 DPM-Solver++ steps with CFG
    hook.remove()
    for images in (sun, teacher):
        assert images.dtype == torch.uint8 and images.shape == (2, 3, 64, 64)
    assert torch.equal(samplers["sun"](prompts, seeds, None), sun)  # seeded: reproducible
    plugged = samplers["sun_finetune"](prompts, seeds, None)
    assert plugged.shape == sun.shape and not torch.equal(plugged, sun)
    module.sampling.plugin_unets = {"broken": str(tmp_path / "nothing")}
    with pytest.raises(UserError, match="plugin_unets.broken"):
        module.evaluation_samplers()["sun_broken"](prompts, seeds, None)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"backbone": {"family": "sdxl", "flavour": "tiny"}}, "backbone.family"),
        ({"adapter": {"init_weights": "/nonexistent/sun.safetensors"}}, "init_weights"),
        ({"adapter": {"norm_scop": "sample"}}, "method.adapter.norm_scop"),
        ({"teacher": {"negative_prompts": "/nonexistent/negatives.txt"}}, "negative_prompts"),
    ],
)
def test_bad_settings_fail_before_loading_the_backbone(kwargs, match, monkeypatch):
    import xa_lightning.backbones

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was built before the settings were checked")

    monkeypatch.setattr(xa_lightning.backbones, "backbone_from_config", no_backbone)
    kwargs = {
        "backbone": {"family": "sd15", "flavour": "tiny"},
        "teacher": {"negative_prompts": str(REPO / "evaluation" / "negative_prompts.txt")},
        **kwargs,
    }
    with pytest.raises(UserError, match=match):
        SUNModule(**kwargs)
