"""The pretrained flavour: diffusers layout round trip, the Hugging Face cache, and fast offline failures."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from xa_lightning.backbones import Backbone, build_backbone
from xa_lightning.errors import UserError

from .conftest import latents_for, pixels_for

SUBFOLDERS = {
    "sd15": {"unet", "vae", "text_encoder", "tokenizer", "scheduler"},
    "sdxl": {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"},
    "pixart_alpha": {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"},
}


@pytest.fixture(scope="module")
def saved(tiny_backbone, tmp_path_factory) -> dict[str, Path]:
    """Each tiny backbone saved once in the diffusers layout."""
    root = tmp_path_factory.mktemp("saved")
    return {family: tiny_backbone(family).save_pretrained(root / family) for family in SUBFOLDERS}


def assert_same_outputs(original: Backbone, loaded: Backbone) -> None:
    prompts = ["a photo of a cat", "a red car"]
    cond, cond_loaded = original.encode_text(prompts), loaded.encode_text(prompts)
    for name in ("prompt_embeds", "pooled_prompt_embeds", "attention_mask"):
        a, b = getattr(cond, name), getattr(cond_loaded, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    latents, pixels = latents_for(original), pixels_for(original)
    with torch.no_grad():
        assert torch.equal(original.predict(latents, 321, cond), loaded.predict(latents, 321, cond_loaded))
        assert torch.equal(original.encode_images(pixels), loaded.encode_images(pixels))
        assert torch.equal(original.decode_latents(latents), loaded.decode_latents(latents))


def test_save_pretrained_then_load_is_bit_identical(tiny_backbone, saved, family: str):
    directory = saved[family]
    assert {p.name for p in directory.iterdir() if p.is_dir()} == SUBFOLDERS[family]
    index = json.loads((directory / "model_index.json").read_text())
    assert index["_class_name"] == type(tiny_backbone(family).pipeline()).__name__
    loaded = build_backbone(family, "pretrained", path=str(directory))
    original = tiny_backbone(family)
    assert loaded.id == f"{family}:pretrained" and loaded.source == str(directory)
    assert type(loaded.denoiser) is type(original.denoiser)
    assert all(not p.requires_grad for p in loaded.parameters())
    assert loaded.resolution == original.resolution
    assert type(loaded.inference_scheduler()) is type(original.inference_scheduler())
    assert loaded.noise_scheduler.config.beta_schedule == original.noise_scheduler.config.beta_schedule
    assert_same_outputs(original, loaded)


def test_hub_id_loads_from_the_local_hugging_face_cache(tiny_backbone, saved, tmp_path, monkeypatch):
    """A hub id that is in the cache loads with HF_HUB_OFFLINE=1 (the path real users take offline)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--xa-tests--tiny-sd15"
    shutil.copytree(saved["sd15"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = build_backbone("sd15", "pretrained", path="xa-tests/tiny-sd15")
    assert loaded.source == "xa-tests/tiny-sd15"
    assert_same_outputs(tiny_backbone("sd15"), loaded)


def test_offline_without_local_weights_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(UserError) as error:
        build_backbone("sdxl", "pretrained", path="xa-tests/no-such-model")
    assert time.monotonic() - start < 5
    assert str(error.value) == (
        "weights for xa-tests/no-such-model not found locally; set backbone.path=<local diffusers dir> "
        "or allow downloads (unset HF_HUB_OFFLINE)"
    )


def test_local_files_only_never_goes_online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(UserError, match="not found locally; set backbone.path"):
        build_backbone("pixart_alpha", "pretrained", path="xa-tests/no-such-model", local_files_only=True)


def test_unreachable_hub_fails_fast_instead_of_hanging(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(UserError, match=r"xa-tests/no-such-model not found locally and 127\.0\.0\.1 is unreachable"):
        build_backbone("sd15", "pretrained", path="xa-tests/no-such-model")
    assert time.monotonic() - start < 10


def test_bad_local_directories_are_user_errors(saved, tmp_path):
    with pytest.raises(UserError, match="backbone.path=/no/such/dir does not exist"):
        build_backbone("sd15", "pretrained", path="/no/such/dir")

    wrong_family = saved["pixart_alpha"]
    with pytest.raises(UserError, match="not a sd15 diffusers directory: missing subfolder.*unet"):
        build_backbone("sd15", "pretrained", path=str(wrong_family))

    broken = tmp_path / "broken"
    shutil.copytree(saved["sd15"], broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match=r"backbone.path=.*broken: cannot load unet"):
        build_backbone("sd15", "pretrained", path=str(broken))


def test_save_pretrained_refuses_a_non_empty_directory(tiny_backbone, tmp_path):
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an empty directory"):
        tiny_backbone("pixart_alpha").save_pretrained(target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["occupied"]  # no staging directory left behind
