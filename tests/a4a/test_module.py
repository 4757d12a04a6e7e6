"""A4AModule: asynchronous learning rates, frozen vs fine-tuned PTA, gradients, the loss, condition dropout,
the base model never called, checkpoints and bad settings."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

from xa_lightning.config import compose, validate
from xa_lightning.errors import UserError
from xa_lightning.methods import METHODS
from xa_lightning.methods.a4a import A4AAdapter, A4AModule
from xa_lightning.plugins.ip_adapter import IPAdapterModel
from xa_lightning.training import AtomicCheckpointIO, load_method

from .conftest import NO_DROPOUT, make_module, tiny_batch

RATES = {"projection_alignment": 3e-5, "mapping": 7e-4, "pta": 2e-6}


def _trainer(tmp_path, max_steps: int, **kwargs) -> L.Trainer:
    kwargs.setdefault("logger", False)
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        plugins=[AtomicCheckpointIO()],
        **kwargs,
    )


def _loader(upgraded, n: int = 2):
    return torch.utils.data.DataLoader([tiny_batch(upgraded, seed=i) for i in range(n)], batch_size=None)


def test_registered():
    assert METHODS["a4a"] == "xa_lightning.methods.a4a.lit_module:A4AModule"


def test_three_parameter_groups_carry_the_configured_rates_and_are_logged(sdxl, tmp_path):
    module = make_module(sdxl, training={**NO_DROPOUT, "finetune_pta": True}, learning_rates=RATES)
    trainer = _trainer(
        tmp_path, 2, logger=CSVLogger(tmp_path), callbacks=[LearningRateMonitor("step")], log_every_n_steps=1
    )
    trainer.fit(module, train_dataloaders=_loader(sdxl))
    groups = trainer.optimizers[0].param_groups
    assert {g["name"]: g["lr"] for g in groups} == RATES
    listed = sorted(id(p) for g in groups for p in g["params"])
    assert listed == sorted(id(p) for p in module.adapter.parameters())  # exactly the adapter, each once
    assert {id(p) for p in next(g for g in groups if g["name"] == "pta")["params"]} == {
        id(p) for p in module.adapter.pta.parameters()
    }
    for name, rate in RATES.items():
        assert trainer.callback_metrics[f"lr-AdamW/{name}"].item() == pytest.approx(rate)
    assert trainer.callback_metrics["train/samples_seen"].item() == 4 == module.samples_seen


@pytest.mark.parametrize("finetune", [False, True])
def test_pta_is_frozen_unless_finetuned_and_only_the_adapter_trains(sdxl, tmp_path, finetune):
    module = make_module(sdxl, training={**NO_DROPOUT, "finetune_pta": finetune}, learning_rates=RATES)
    pta = module.adapter.pta if finetune else module.frozen_pta
    assert isinstance(pta, IPAdapterModel) and (module.frozen_pta is None) == finetune
    pta_before = {k: v.clone() for k, v in pta.state_dict().items()}
    encoder_before = {k: v.clone() for k, v in module.pta_encoder.state_dict().items()}
    unet_before = {k: v.clone() for k, v in sdxl.denoiser.state_dict().items()}
    trainable = {id(p) for p in module.adapter.parameters()}
    assert {id(p) for p in module.parameters() if p.requires_grad} == trainable

    loss, _ = module.compute_loss(tiny_batch(sdxl))
    loss.backward()
    with_grad = {id(p) for p in module.parameters() if p.grad is not None}
    assert with_grad and with_grad <= trainable
    assert (id(next(pta.parameters())) in with_grad) == finetune
    module.zero_grad(set_to_none=True)

    _trainer(tmp_path, 2).fit(module, train_dataloaders=_loader(sdxl))
    changed = any(not torch.equal(v, pta_before[k]) for k, v in pta.state_dict().items())
    assert changed == finetune
    assert all(torch.equal(v, encoder_before[k]) for k, v in module.pta_encoder.state_dict().items())
    assert all(torch.equal(v, unet_before[k]) for k, v in sdxl.denoiser.state_dict().items())
    # checkpoints and exports hold the PTA only when it trains
    assert any(k.startswith("adapter.pta.") for k in module.state_dict()) == finetune


def _v_prediction(backbone):
    return type(backbone)(
        denoiser=backbone.denoiser,
        vae=backbone.vae,
        text_encoders=list(backbone.text_encoders),
        tokenizers=backbone.tokenizers,
        scheduler_config={**backbone.scheduler_config, "prediction_type": "v_prediction"},
        flavour=backbone.flavour,
        source=backbone.source,
    )


@pytest.mark.parametrize(
    "family, target, variant",
    [
        ("sdxl", "epsilon", "a4a"),
        ("sdxl", "v_prediction", "a4a"),
        ("pixart", "epsilon", "a4a"),
        ("pixart", "epsilon", "from_scratch"),
    ],
)
def test_loss_falls_on_a_fixed_batch(request, family, target, variant):
    backbone = request.getfixturevalue(family)
    if target == "v_prediction":
        backbone = _v_prediction(backbone)
    assert backbone.prediction_type == target
    rates = {"projection_alignment": 3e-3, "mapping": 3e-3, "from_scratch": 3e-3}
    module = make_module(backbone, variant=variant, learning_rates=rates)
    optimizer = module.configure_optimizers()
    batch = tiny_batch(backbone)
    losses = []
    for _ in range(15):
        torch.manual_seed(0)  # the same noise and timesteps every step: only the adapter moves
        loss, _ = module.compute_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_condition_dropout(sdxl):
    module = make_module(sdxl, training={"image_dropout": 0.2, "text_dropout": 0.3, "both_dropout": 0.1})
    torch.manual_seed(0)
    drop_image, drop_text = module._dropout(40000)
    assert drop_image.float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert drop_text.float().mean().item() == pytest.approx(0.4, abs=0.01)
    assert (drop_image & drop_text).float().mean().item() == pytest.approx(0.1, abs=0.01)

    batch, other = tiny_batch(sdxl), tiny_batch(sdxl, seed=5)
    losses = {}
    for name, training in (("image", {"image_dropout": 1.0}), ("text", {"text_dropout": 1.0})):
        module = make_module(sdxl, training={**NO_DROPOUT, **training})
        changed = (
            {**batch, "reference": other["reference"]} if name == "image" else {**batch, "caption": other["caption"]}
        )
        for key, source in (("same", batch), ("changed", changed)):
            torch.manual_seed(0)
            with torch.no_grad():
                losses[name, key] = module.compute_loss(source)[0]
    # a dropped image / caption is ignored: the loss does not see what it was
    assert torch.equal(losses["image", "same"], losses["image", "changed"])
    assert torch.equal(losses["text", "same"], losses["text", "changed"])


def test_the_base_model_is_never_called_in_training_or_inference(sdxl, sd15):
    module = make_module(sdxl, base_backbone=sd15, sampling={"steps": 2})
    calls = []
    hooks = [
        part.register_forward_pre_hook(lambda m, args: calls.append(type(m).__name__))
        for part in (sd15.denoiser, sd15.vae, *sd15.text_encoders)
    ]
    try:
        loss, _ = module.compute_loss(tiny_batch(sdxl))
        loss.backward()
        samplers = module.evaluation_samplers()
        assert list(samplers) == ["a4a", "upgraded", "pta_base"]
        images = samplers["a4a"](["a face"], [0], torch.rand(1, 3, 40, 40))
        assert images.shape == (1, 3, sdxl.resolution, sdxl.resolution) and images.dtype == torch.uint8
        assert calls == []
        samplers["pta_base"](["a face"], [0], torch.rand(1, 3, 40, 40))  # the hook does see the base model
        assert "UNet2DConditionModel" in calls
    finally:
        for hook in hooks:
            hook.remove()


def _composed_module(tmp_path, *overrides: str) -> A4AModule:
    overrides = ("method.base_backbone=null", *overrides)  # the SD1.5 baseline plays no part here
    cfg = compose("train", ["experiment=demo/a4a", f"paths.output_dir={tmp_path}", *overrides])
    validate(cfg)
    module = instantiate(cfg.method)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    return module


def test_checkpoint_resume_refusals_and_reload(tmp_path):
    module = _composed_module(tmp_path, "method.training.image_dropout=0")
    upgraded = module.upgraded
    trainer = _trainer(tmp_path, 2)
    trainer.fit(module, train_dataloaders=_loader(upgraded))
    ckpt = tmp_path / "a4a.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["xa"]["method"] == "a4a" and saved["xa"]["samples_seen"] == 4
    assert set(saved["state_dict"]) == {f"adapter.{k}" for k in module.adapter.state_dict()}
    assert saved["xa"]["backbones"] == {"upgraded": "sdxl:tiny", "pta_encoder": "clip_vision:tiny"}

    restored = load_method(ckpt)  # the method rebuilt from the checkpoint alone (xa-eval, xa-sample)
    assert isinstance(restored, A4AModule) and restored.samples_seen == 4
    for key, value in restored.adapter.state_dict().items():
        assert torch.equal(value, module.adapter.state_dict()[key]), key

    resumed = _composed_module(tmp_path, "method.training.image_dropout=0")
    trainer = _trainer(tmp_path, 3)
    trainer.fit(resumed, train_dataloaders=_loader(upgraded), ckpt_path=str(ckpt))
    assert trainer.global_step == 3 and resumed.samples_seen == 6

    foreign = dict(saved, xa={**saved["xa"], "method": "x_adapter"})
    torch.save(foreign, tmp_path / "foreign.ckpt")
    with pytest.raises(UserError, match="is for method 'x_adapter'") as error:
        _trainer(tmp_path, 3).fit(
            _composed_module(tmp_path), train_dataloaders=_loader(upgraded), ckpt_path=str(tmp_path / "foreign.ckpt")
        )
    assert "\n" not in str(error.value)
    finetuned = _composed_module(tmp_path, "method.training.finetune_pta=true")
    with pytest.raises(UserError, match="pta_config") as error:
        finetuned.check_compatible(saved["xa"], source=str(ckpt))
    assert "\n" not in str(error.value)


def test_export_and_init_weights_round_trip(sdxl, tmp_path):
    module = make_module(sdxl, adapter={"repeats": 1})
    with torch.no_grad():
        for parameter in module.adapter.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    export = module.export_adapter(tmp_path / "adapter")
    loaded = A4AAdapter.from_pretrained(export)
    for key, value in module.adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    again = make_module(sdxl, adapter={"repeats": 1, "init_weights": str(export)})
    for key, value in module.adapter.state_dict().items():
        assert torch.equal(again.adapter.state_dict()[key], value), key
    with pytest.raises(UserError, match="repeats"):
        make_module(sdxl, adapter={"repeats": 2, "init_weights": str(export)})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"upgraded_backbone": {"family": "sd15", "flavour": "tiny"}}, "method.upgraded_backbone.family"),
        ({"upgraded_backbone": {"family": "sdxl", "flavour": "pretrained"}}, "method.pta.weights is required"),
        (
            {"upgraded_backbone": {"family": "sdxl", "flavour": "pretrained"}, "sampling": {"pta_um": True}},
            "method.sampling.pta_um_weights is required",
        ),
        ({"upgraded_backbone": {"family": "pixart_alpha"}, "sampling": {"pta_um": True}}, "method.sampling.pta_um"),
        ({"base_backbone": {"family": "sdxl"}}, "method.base_backbone.family"),
        ({"pta": {"weights": "/nonexistent/ip-adapter_sd15.bin"}}, "method.pta.weights=/nonexistent"),
        ({"adapter": {"repeat": 3}}, "did you mean method.adapter.repeats"),
        ({"variant": "scratch"}, "method.variant"),
        ({"training": {"image_dropout": 0.6, "text_dropout": 0.6}}, "method.training"),
        ({"learning_rates": {"mapping": -1}}, "method.learning_rates.mapping"),
    ],
)
def test_bad_settings_fail_before_loading_a_backbone(kwargs, match, monkeypatch):
    import xa_lightning.backbones

    def no_backbone(*args, **kwargs):
        raise AssertionError("a backbone was built before the settings were checked")

    monkeypatch.setattr(xa_lightning.backbones, "backbone_from_config", no_backbone)
    kwargs = {"upgraded_backbone": {"family": "sdxl", "flavour": "tiny"}, **kwargs}
    with pytest.raises(UserError, match=match) as error:
        A4AModule(**kwargs)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "experiment, key",
    [("a4a/sdxl_celebamask", "method.pta.weights"), ("a4a/pta_um_sdxl", "method.sampling.pta_um_weights")],
)
def test_real_weight_experiments_name_the_missing_key(experiment, key, monkeypatch, tmp_path):
    import xa_lightning.backbones

    monkeypatch.setattr(xa_lightning.backbones, "backbone_from_config", lambda *a, **k: pytest.fail("built a backbone"))
    for variable in ("IP_ADAPTER_SD15", "IP_ADAPTER_IMAGE_ENCODER", "IP_ADAPTER_SDXL", "IP_ADAPTER_SDXL_IMAGE_ENCODER"):
        monkeypatch.delenv(variable, raising=False)
    cfg = compose("train", [f"experiment={experiment}", f"paths.output_dir={tmp_path}", "data.root=/datasets/x"])
    from xa_lightning.config import instantiate as xa_instantiate

    with pytest.raises(UserError, match=key) as error:
        xa_instantiate(cfg.method)
    assert "\n" not in str(error.value) and "path" in str(error.value)


def test_xa_sample_prompts_an_a4a_checkpoint_with_reference_images(tmp_path, capsys):
    """xa-sample references_dir=...: image i is prompted with file i % n; without references the A4A
    sampler refuses (it used to sample the plain upgraded model without a word)."""
    import json

    import numpy as np
    from PIL import Image

    from xa_lightning import cli

    module = _composed_module(tmp_path, "method.training.image_dropout=0")
    trainer = _trainer(tmp_path, 1)
    trainer.fit(module, train_dataloaders=_loader(module.upgraded))
    ckpt = tmp_path / "a4a.ckpt"
    trainer.save_checkpoint(ckpt)
    faces = tmp_path / "faces"
    faces.mkdir()
    for index, colour in enumerate([(250, 30, 30), (30, 30, 250)]):
        Image.new("RGB", (48, 48), colour).save(faces / f"{index}.png")

    def sample(name: str, *overrides: str) -> tuple[int, list[np.ndarray]]:
        out = tmp_path / name
        argv = [f"ckpt_path={ckpt}", "prompts=[a face]", "num_images=3", f"hydra.run.dir={out}", *overrides]
        code = cli.sample_main(argv)
        index = out / "samples" / "samples.json"
        files = json.loads(index.read_text()) if index.is_file() else []
        return code, [np.asarray(Image.open(out / "samples" / entry["file"])) for entry in files]

    code, prompted = sample("prompted", f"references_dir={faces}")
    assert code == 0 and len(prompted) == 3
    code, plain = sample("plain", f"references_dir={faces}", "sampler=upgraded")
    assert code == 0 and not np.array_equal(prompted[0], plain[0]), "the reference image changed nothing"

    # Image 2 is seed 2 with file 0 again: the same as sampling that file alone for seed 2.
    (tmp_path / "first").mkdir()
    Image.open(faces / "0.png").save(tmp_path / "first" / "0.png")
    code, alone = sample("alone", f"references_dir={tmp_path / 'first'}")
    assert code == 0 and np.array_equal(alone[2], prompted[2]) and not np.array_equal(alone[1], prompted[1])

    capsys.readouterr()
    assert sample("no_references")[0] != 0
    assert "references_dir=<folder>" in capsys.readouterr().err
    assert sample("missing", f"references_dir={tmp_path / 'nope'}")[0] != 0
    err = capsys.readouterr().err
    assert "references_dir: " in err and "nope does not exist" in err and not (tmp_path / "missing").exists()
