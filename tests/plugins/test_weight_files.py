"""Every loader of a weight file reads through ``xa_lightning.weights``: a truncated .safetensors or .bin and a
missing file give the same one-line UserError wording everywhere, naming the file and what it was for."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.foundation.toy_method import ResidualEpsModule
from xa_lightning.errors import UserError
from xa_lightning.methods.sun import load_official_adapter
from xa_lightning.methods.x_adapter import load_official_mapper
from xa_lightning.plugins import read_lora
from xa_lightning.training import ADAPTER_META_FILE, safe_torch_load


def _load_adapter(path: Path) -> None:
    """``AdapterModule.load_adapter`` on an export directory whose only weight file is ``path``."""
    module = ResidualEpsModule()
    meta = {k: v for k, v in module.checkpoint_metadata().items() if k != "config"}
    (path.parent / ADAPTER_META_FILE).write_text(json.dumps(meta))
    module.load_adapter(path.parent)


# loader name -> (what the error calls the file, call(path), weight suffixes it reads)
LOADERS = {
    "sun": ("SUN weights", lambda path, unet: load_official_adapter(path, unet), (".safetensors", ".bin")),
    "x_adapter": ("X-Adapter weights", lambda path, unet: load_official_mapper(path), (".safetensors", ".bin")),
    "lora": ("LoRA file", lambda path, unet: read_lora(path), (".safetensors", ".bin")),
    "checkpoint": ("checkpoint", lambda path, unet: safe_torch_load(path), (".safetensors", ".ckpt")),
    "adapter_export": ("adapter weights", lambda path, unet: _load_adapter(path), (".safetensors",)),
}
CASES = [(name, suffix) for name, (_, _, suffixes) in LOADERS.items() for suffix in suffixes]


def _truncated(path: Path) -> Path:
    tensors = {"layer.weight": torch.randn(64, 64)}
    if path.suffix == ".safetensors":
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # an interrupted download
    return path


@pytest.mark.parametrize("loader,suffix", CASES, ids=[f"{n}{s}" for n, s in CASES])
def test_truncated_file_is_the_same_one_line_error_in_every_loader(tmp_path, base_backbone, loader, suffix):
    what, load, _ = LOADERS[loader]
    (tmp_path / "dir").mkdir()
    path = _truncated(tmp_path / "dir" / f"weights{suffix}")
    with pytest.raises(UserError) as error:
        load(path, base_backbone.denoiser)
    message = str(error.value)
    assert "\n" not in message
    assert re.fullmatch(
        rf"cannot read {re.escape(what)} {re.escape(str(path))} safely \(\w+\); is it complete and a weight "
        r"file\? re-download or re-export it",
        message,
    ), message


@pytest.mark.parametrize("loader", [n for n in LOADERS if n != "adapter_export"])
def test_missing_file_names_the_file_and_the_fix(tmp_path, base_backbone, loader):
    what, load, suffixes = LOADERS[loader]
    path = tmp_path / f"missing{suffixes[0]}"
    with pytest.raises(UserError, match=rf"^{re.escape(what)} {re.escape(str(path))} does not exist; \S"):
        load(path, base_backbone.denoiser)
