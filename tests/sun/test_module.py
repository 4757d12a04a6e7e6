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
        if experiment.startswith("sun/"):  # the sun_* tables' protocol, not the training data's captions
            assert cfg.eval.prompts_file.endswith("evaluation/prompts/coco_like.txt")
        if cfg.method.adapter.require_init_weights:  # evaluation experiments: given weights or a clear error
            assert cfg.train is False
            with pytest.raises(Exception) as error:  # Hydra wraps constructor errors in InstantiationException
                instantiate(cfg.method)
            cause = error.value if isinstance(error.value, UserError) else error.value.__cause__
            assert isinstance(cause, UserError) and "init_weights is required" in str(cause)
            # with the official file it starts from the released weights (converted on load)
            from xa_lightning.backbones import build_backbone

            from .test_convert import official_state_dict

            official = official_state_dict(build_backbone("sd15", "tiny").denoiser, add_pos=True)
            save_file(official, str(tmp_path / "sun_adapter.safetensors"))
            given = [f"method.adapter.init_weights={tmp_path / 'sun_adapter.safetensors'}"]
            if "finetuned" in cfg.method.sampling.plugin_unets:
                given.append(f"method.sampling.plugin_unets.finetuned={tmp_path / 'finetune'}")
            cfg = _compose(experiment, tmp_path, "backbone=sd15_tiny", *given)
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
        ({"adapter": {"norm_scope": "channel"}}, "method.adapter.norm_scope='channel': choose one of sample, token"),
        ({"adapter": {"projection_init": "copied"}}, "method.adapter.projection_init='copied'"),
        ({"adapter": {"scale_lr": 0}}, "method.adapter.scale_lr=0: must be positive"),
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


def test_by_default_the_student_starts_as_the_frozen_model(tmp_path):
    """alpha_init 0 (conf/method/sun.yaml and SUNAdapterOptions): at step 0 the UNet with SUN is the frozen
    UNet bit for bit, whatever the negative prompt."""
    cfg = _compose("demo/sun", tmp_path)
    assert cfg.method.adapter.alpha_init == 0.0
    module = instantiate(cfg.method)
    unet = module.backbone.denoiser
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = module.encode_prompts(["a red bicycle", "a snowy mountain"])
    states = torch.cat([prompts, module.encode_negatives(["blurry", "low quality, watermark"])], dim=1)
    with torch.no_grad():
        student = module.student(latents, 999, states)
        with module.adapter.disabled():
            frozen = unet(latents, 999, encoder_hidden_states=prompts).sample
    assert torch.equal(student, frozen)


def test_lcm_lora_baseline_sampler_and_plugin_free_training(tmp_path):
    from xa_lightning.plugins import tiny_lora_state_dict

    cfg = _compose("demo/sun", tmp_path)
    module = instantiate(cfg.method)
    unet = module.backbone.denoiser
    save_file(tiny_lora_state_dict(unet, seed=7), str(tmp_path / "lcm_lora.safetensors"))
    module.sampling.lcm_lora = str(tmp_path / "lcm_lora.safetensors")
    samplers = module.evaluation_samplers()
    assert list(samplers) == ["sun", "teacher", "lcm_lora"]
    prompts, seeds = ["a lighthouse", "a tiger"], [0, 1]
    sun = samplers["sun"](prompts, seeds, None)
    batch = _batches(1)[0]
    torch.manual_seed(0)
    loss = module.compute_loss(batch)[0]
    batches = []
    hook = unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    lcm = samplers["lcm_lora"](prompts, seeds, None)
    hook.remove()
    assert batches == [2] * 4 and lcm.shape == sun.shape  # 4 LCM steps, no CFG
    assert not torch.equal(lcm, sun)
    # after the baseline the LoRA is off again: SUN's images and the training loss are as before
    assert torch.equal(samplers["sun"](prompts, seeds, None), sun)
    torch.manual_seed(0)
    assert torch.equal(module.compute_loss(batch)[0], loss)
    assert not any(p.requires_grad for p in module.backbone.parameters())


def test_steps_sweep_and_transfer_experiments(tmp_path):
    text = (REPO / "experiments" / "sun" / "steps.yaml").read_text()
    assert "method.sampling.steps: 1,2,4,8" in text
    cfg = _compose("sun/steps", tmp_path)
    assert cfg.train is False and cfg.method.adapter.require_init_weights
    assert cfg.method.teacher.num_steps == 25 and cfg.eval.pairs == [["sun", "teacher"]]
    transfer = _compose("sun/transfer_finetuned", tmp_path, "backbone=sd15_tiny")
    assert transfer.train is False and "finetuned" in transfer.method.sampling.plugin_unets
    with pytest.raises(UserError, match="plugin_unets.finetuned is not set"):
        from xa_lightning.methods.sun import SamplingOptions

        SamplingOptions(plugin_unets={"finetuned": None})


def test_a_single_file_finetune_is_a_user_error(tmp_path):
    cfg = _compose("demo/sun", tmp_path)
    module = instantiate(cfg.method)
    (tmp_path / "dreamshaper.safetensors").write_bytes(b"")
    module.sampling.plugin_unets = {"dreamshaper": str(tmp_path / "dreamshaper.safetensors")}
    with pytest.raises(UserError, match="single-file checkpoint; convert it to the diffusers layout"):
        module.plugin_unet("dreamshaper")


@pytest.mark.parametrize("experiment", ["demo/sun", "demo/x_adapter"])
def test_each_ddp_rank_draws_its_own_training_randomness_reproducibly(tmp_path, monkeypatch, experiment):
    """train.build seeds seed + global rank after building: identical models on every rank, different noise /
    timesteps / negative prompts per rank, and the same draws again for the same rank."""
    from xa_lightning.train import build

    def build_as(rank: int):
        for key, value in {"LOCAL_RANK": rank, "NODE_RANK": 0, "WORLD_SIZE": 2}.items():
            monkeypatch.setenv(key, str(value))
        cfg = _compose(
            experiment,
            tmp_path,
            f"paths.data_dir={tmp_path / 'data'}",
            "callbacks=none",
            "logger=none",
            "trainer.devices=2",
            "+trainer.strategy=ddp",
        )
        trainer, model, _ = build(cfg)
        assert trainer.global_rank == rank
        draws = {"noise": torch.randn(8)}
        if hasattr(model, "negative_prompts"):
            draws["negatives"] = model.negative_prompts.sample(8)
        return {k: v.clone() for k, v in model.adapter.state_dict().items()}, draws

    weights0, draws0 = build_as(0)
    weights1, draws1 = build_as(1)
    _, again0 = build_as(0)
    assert weights0.keys() == weights1.keys() and all(torch.equal(weights0[k], weights1[k]) for k in weights0)
    assert not torch.equal(draws0["noise"], draws1["noise"]) and torch.equal(draws0["noise"], again0["noise"])
    if "negatives" in draws0:
        assert draws0["negatives"] != draws1["negatives"] and draws0["negatives"] == again0["negatives"]


def test_scale_lr_gives_alpha_and_beta_their_own_learning_rate(tmp_path):
    """method.adapter.scale_lr: a second AdamW group for the Attention Normalization scales. AdamW's first
    step moves every parameter by about its group's lr, so the scales move 100x farther than the projections."""
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    cfg = _compose("demo/sun", tmp_path, "method.adapter.scale_lr=1e-3", "method.optimizer.lr=1e-5")
    module = instantiate(cfg.method)
    before = {k: v.clone() for k, v in module.adapter.named_parameters()}
    trainer = L.Trainer(
        max_steps=1,
        logger=CSVLogger(tmp_path),
        callbacks=[LearningRateMonitor("step")],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_batches(1), batch_size=None))
    groups = {group["name"]: group for group in trainer.optimizers[0].param_groups}
    assert set(groups) == {"projections", "scales"}
    assert (groups["projections"]["lr"], groups["scales"]["lr"]) == (1e-5, 1e-3)
    step = {k: (v - before[k]).abs().max().item() for k, v in module.adapter.named_parameters()}
    scales = max(v for k, v in step.items() if k.endswith(("alpha", "beta")))
    projections = max(v for k, v in step.items() if not k.endswith(("alpha", "beta")))
    assert 5e-4 < scales < 2e-3 and projections < 2e-5
    metrics = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "lr-AdamW/projections" in metrics and "lr-AdamW/scales" in metrics
