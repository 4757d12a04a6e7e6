"""Latent / text-embedding cache: equals the encoders' output, training reads it, stale caches are refused,
an interrupted build resumes."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import xa_lightning.data.cache as cache_module
from tests.data.helpers import Consumer, quiet_trainer
from xa_lightning.backbones import build_backbone
from xa_lightning.config import config_dir, register_resolvers
from xa_lightning.data.cache import CachedDataset, build_cache, find_cache
from xa_lightning.data.cli import main
from xa_lightning.errors import UserError


def data_cfg(data_dir, *overrides):
    register_resolvers()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose(
            overrides=[
                "+data=laion_demo",
                "+paths=default",
                "+backbone=sd15_tiny",
                f"paths.data_dir={data_dir}",
                *overrides,
            ]
        )


@pytest.fixture(scope="module")
def built(data_dir):
    code = main(
        [
            "cache",
            "data=laion_demo",
            "backbone=sd15_tiny",
            f"paths.data_dir={data_dir}",
            "--batch-size",
            "8",
            "--no-progress",
        ]
    )
    assert code == 0
    return data_dir


def test_cache_holds_the_encoders_output_and_training_reads_it(built, capsys):
    cfg = data_cfg(built, "data.cache.enabled=true")
    cached = instantiate(cfg.data)
    cached.setup()
    folder = find_cache(cached, cfg.backbone)
    manifest = json.loads((folder / "manifest.json").read_text())
    plain = instantiate(data_cfg(built).data)
    plain.setup()
    assert manifest["splits"]["train"]["count"] == plain.epoch_length() and manifest["splits"]["val"]["count"] > 0
    assert folder.name.startswith("laion-sd15-tiny-64px-")

    batch = next(iter(cached.train_dataloader()))
    assert "pixels" not in batch and batch["latents"].shape == (4, 4, 8, 8)
    assert batch["prompt_embeds"].shape == (4, 77, 32) and batch["latents"].dtype == torch.float32
    assert batch["original_size"].shape == (4, 2) and len(batch["caption"]) == 4

    # the cached tensors are what the frozen encoders give for the same samples
    backbone = build_backbone("sd15", "tiny")
    reference = next(plain.iter_cache_batches("train", 4))
    dataset = CachedDataset(folder, "train")
    by_key = {dataset[i]["key"]: dataset[i] for i in range(len(dataset))}
    rows = [by_key[k] for k in reference["key"]]
    with torch.no_grad():
        latents = backbone.encode_images(reference["pixels"])
        embeds = backbone.encode_text(reference["caption"]).prompt_embeds
    assert torch.allclose(torch.stack([r["latents"] for r in rows]), latents, atol=1e-5)
    assert torch.allclose(torch.stack([r["prompt_embeds"] for r in rows]), embeds, atol=1e-5)
    assert [r["caption"] for r in rows] == reference["caption"]

    model = Consumer()
    quiet_trainer(fast_dev_run=2).fit(model, datamodule=cached)
    assert model.batches == 2 and "latents" in model.batch_keys and "pixels" not in model.batch_keys


def test_stale_or_missing_cache_is_refused(built, tmp_path):
    for override, differs in (
        ("data.resolution=32", "views.resolution"),
        ("backbone.seed=1", "backbone.seed"),
        ("data.filters.min_aesthetic=6.0", "data.filters.min_aesthetic"),
    ):
        cfg = data_cfg(built, "data.cache.enabled=true", override)
        datamodule = instantiate(cfg.data)
        with pytest.raises(UserError, match=r"no cache for this data \+ backbone") as info:
            datamodule.train_dataloader()
        assert differs in str(info.value) and "xa-data cache" in str(info.value)
    cfg = data_cfg(built, "data.cache.enabled=true", f"data.cache.dir={tmp_path}/empty")
    with pytest.raises(UserError, match="data.cache.enabled=true but there is no cache"):
        instantiate(cfg.data).train_dataloader()
    # speed levers compute the same latents and embeddings: the cache stays valid across them
    cfg = data_cfg(built, "data.cache.enabled=true", "backbone.attention=math", "backbone.channels_last=true")
    assert len(instantiate(cfg.data).train_dataloader()) > 0


def test_interrupted_build_resumes_without_rewriting_shards(data_dir, tmp_path, monkeypatch):
    cfg = data_cfg(data_dir, f"data.cache.dir={tmp_path}", "data.cache.shard_size=2")
    datamodule = instantiate(cfg.data)
    backbone = build_backbone("sd15", "tiny")
    real_encode = cache_module._encode_batch
    calls = {"n": 0}

    def dies_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(cache_module, "_encode_batch", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        build_cache(datamodule, cfg.backbone, backbone, batch_size=2, progress=False, splits=("val",))
    partial = next(tmp_path.glob("*.partial"))
    first = partial / "val-00000.safetensors"
    stamp = first.stat().st_mtime_ns
    assert not list(tmp_path.glob("*/manifest.json"))  # nothing half-written is visible as a cache
    monkeypatch.setattr(cache_module, "_encode_batch", real_encode)
    folder = build_cache(instantiate(cfg.data), cfg.backbone, backbone, batch_size=2, progress=False, splits=("val",))
    assert (folder / "val-00000.safetensors").stat().st_mtime_ns == stamp
    dataset = CachedDataset(folder, "val")
    keys = [dataset[i]["key"] for i in range(len(dataset))]
    expected = [k for b in datamodule.iter_cache_batches("val", 4) for k in b["key"]]
    assert keys == expected and len(set(keys)) == len(keys) > 4
