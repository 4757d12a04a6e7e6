"""What every registered method must do, checked the same way for each (a new method gets it by registering).

Each method is built from its demo experiment (``experiments/demo/<name>.yaml``: tiny backbones, demo data)
and checked for the seams the framework relies on: the adapter at strength 0 is the frozen model bit for bit
and a changed adapter changes it; only adapter parameters receive gradients; checkpoints hold only adapter
state and refuse another method's; the export round-trips through ``from_pretrained``; every evaluation
sampler returns uint8 images of its model's size.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from xa_lightning.config import compose
from xa_lightning.errors import UserError
from xa_lightning.methods import METHODS
from xa_lightning.training import AdapterModule

from ..demo_methods import demo_module_and_batch

NAMES = sorted(METHODS)


def _registered_class(name: str) -> type:
    module, _, attr = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


@pytest.fixture(scope="module", params=NAMES)
def built(request: pytest.FixtureRequest) -> Iterator[tuple[str, AdapterModule, dict[str, Any], Any]]:
    """(name, module, one training batch of 2, datamodule) from the method's demo experiment."""
    name = request.param
    module, batch, datamodule = demo_module_and_batch(name)
    yield name, module, batch, datamodule


def test_every_method_has_a_demo_experiment_and_the_registry_names_its_class():
    for name in NAMES:
        cfg = compose("train", [f"experiment=demo/{name}"])
        module, _, attr = str(cfg.method._target_).rpartition(".")
        target = getattr(importlib.import_module(module), attr)
        assert target is _registered_class(name), f"method={name}: conf target {target} is not the registry's class"
        assert target.method == name


def test_the_registry_and_conf_method_name_the_same_classes():
    """xa-eval / xa-sample rebuild a method from the ``_target_`` its checkpoint's config recorded, which comes
    from conf/method/<name>.yaml: so each of those must be the registry's class, and the other way round."""
    from omegaconf import OmegaConf

    from xa_lightning.paths import repo_root

    files = {p.stem: p for p in (repo_root() / "conf" / "method").glob("*.yaml")}
    assert set(files) == set(NAMES), f"conf/method/*.yaml {sorted(files)} != registry {NAMES}"
    for name, file in files.items():
        target = str(OmegaConf.load(file)._target_)
        module, _, attr = target.rpartition(".")
        assert getattr(importlib.import_module(module), attr) is _registered_class(name), file


def test_strength_zero_is_the_frozen_model_and_a_changed_adapter_changes_it(built):
    name, module, batch, _ = built
    with torch.no_grad():
        frozen = module.frozen_prediction(batch, seed=3)
        assert torch.equal(module.adapted_prediction(batch, 0.0, seed=3), frozen), name
        assert torch.equal(module.frozen_prediction(batch, seed=3), frozen), (
            f"{name}: frozen prediction is not repeatable"
        )
        saved = {k: v.clone() for k, v in module.adapter.state_dict().items()}
        generator = torch.Generator().manual_seed(0)
        for param in module.adapter.parameters():
            if param.is_floating_point():
                param.add_(torch.randn(param.shape, generator=generator).to(param) * 0.1)
        try:
            changed = module.adapted_prediction(batch, 1.0, seed=3)
            assert torch.equal(module.adapted_prediction(batch, 0.0, seed=3), frozen), name
        finally:
            module.adapter.load_state_dict(saved)
    assert not torch.allclose(changed, frozen, atol=1e-5), f"{name}: the adapter at strength 1 changed nothing"


def test_only_adapter_parameters_receive_gradients(built):
    name, module, batch, _ = built
    module.train()
    module.zero_grad(set_to_none=True)
    loss, _ = module.compute_loss(batch)
    loss.backward()
    adapter_params = {id(p) for p in module.adapter.parameters()}
    others = [n for n, p in module.named_parameters() if id(p) not in adapter_params and p.grad is not None]
    assert not others, f"{name}: frozen parameters got gradients: {others[:3]}"
    grads = [p.grad for p in module.adapter.parameters() if p.grad is not None]
    assert grads and any(bool(g.abs().sum() > 0) for g in grads), f"{name}: the adapter got no gradient"
    assert all(not p.requires_grad for n, p in module.named_parameters() if id(p) not in adapter_params), name
    module.zero_grad(set_to_none=True)
    module.eval()


def test_checkpoints_hold_only_adapter_state_and_refuse_another_method(built):
    name, module, _, _ = built
    state = module.state_dict()
    assert state and all(key.startswith("adapter.") for key in state), name
    assert len(state) == len(module.adapter.state_dict())
    checkpoint: dict[str, Any] = {"state_dict": state}
    module.on_save_checkpoint(checkpoint)
    other = next((n for n in NAMES if n != name), "another_method")
    foreign = {**checkpoint["xa"], "method": other}
    with pytest.raises(UserError, match=other):
        module.on_load_checkpoint({"state_dict": state, "xa": foreign})
    module.on_load_checkpoint(checkpoint)  # its own checkpoint loads


def test_export_round_trips_through_from_pretrained(built, tmp_path: Path):
    name, module, _, _ = built
    module.export_adapter(tmp_path / name)
    loaded = type(module.adapter).from_pretrained(tmp_path / name)
    mine, theirs = module.adapter.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k].cpu(), theirs[k].cpu()) for k in mine), name
    module.load_adapter(tmp_path / name)


def test_every_sampler_returns_uint8_images_of_its_models_size(built):
    name, module, _, datamodule = built
    references = datamodule.eval_references(1) if hasattr(datamodule, "eval_references") else None
    sizes = {backbone.resolution for backbone in module.modules() if hasattr(backbone, "resolution")}
    with torch.no_grad():
        for sampler_name, sampler in module.evaluation_samplers().items():
            images = sampler(["a red fox"], [0], references[:1].float() if references is not None else None)
            assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[:2] == (1, 3), sampler_name
            assert images.shape[-1] == images.shape[-2] and images.shape[-1] in sizes, (sampler_name, images.shape)
