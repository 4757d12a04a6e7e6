"""The converter for the official SpeedUpNet weight layout, on synthetic state dicts of that layout."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from xa_lightning.errors import UserError
from xa_lightning.methods.sun import (
    SUNAdapter,
    concat_negative,
    load_official_adapter,
    official_indices,
    official_to_sun,
    sun_to_official,
)

from .conftest import text_states


def official_state_dict(unet, add_pos: bool, param_scale: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """What the official release saves: ``nn.ModuleList(unet.attn_processors.values()).state_dict()``,
    where self-attention processors hold nothing and cross-attention ones hold SUN's weights."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for index, (key, _) in enumerate(unet.attn_processors.items()):
        if not key.endswith("attn2.processor"):
            continue
        attn = dict(unet.named_modules())[key[: -len(".processor")]]
        hidden, cross = attn.to_q.out_features, attn.to_k.in_features
        branches = ["neg", "extra_pos"] if add_pos else ["neg"]
        for branch in branches:
            state[f"{index}.to_k_{branch}.weight"] = torch.randn(hidden, cross, generator=generator)
            state[f"{index}.to_v_{branch}.weight"] = torch.randn(hidden, cross, generator=generator)
            state[f"{index}.to_k_{branch}_alpha"] = 1 + 0.1 * torch.randn(hidden, generator=generator)
            state[f"{index}.to_k_{branch}_beta"] = 0.1 * torch.randn(hidden, generator=generator)
        if param_scale:
            state[f"{index}.scale"] = torch.tensor([1.0])
    return state


def test_official_numbering_is_the_processor_position(unet):
    # tiny SD1.5 keeps the real layout: attn1, attn2 alternate, so cross-attention layers are 1, 3, ..., 31
    assert official_indices(unet) == list(range(1, 32, 2))


@pytest.mark.parametrize("add_pos", [False, True])
def test_round_trip(unet, add_pos):
    official = official_state_dict(unet, add_pos)
    indices = official_indices(unet)
    ours = official_to_sun(official, indices)
    adapter = SUNAdapter.from_unet(unet, use_positive_branch=add_pos)
    assert set(ours) == set(adapter.state_dict())
    adapter.load_state_dict(ours, strict=True)
    back = sun_to_official(adapter.state_dict(), indices)
    assert set(back) == set(official)
    for key, value in official.items():
        torch.testing.assert_close(back[key], value, rtol=0, atol=0)
    # placement: official processor 5 is our third cross-attention layer (down_blocks.1.attentions.0)
    torch.testing.assert_close(adapter.layers[2].to_v_neg.weight, official["5.to_v_neg.weight"])
    torch.testing.assert_close(adapter.layers[2].neg_beta, official["5.to_k_neg_beta"])
    assert adapter.config.layer_names[2] == "down_blocks.1.attentions.0.transformer_blocks.0.attn2"


def test_load_official_file_detects_branches_and_runs(tmp_path, backbone, unet):
    official = official_state_dict(unet, add_pos=True, param_scale=True)
    # the training script's prefix (an nn.ModuleList inside a wrapper) is accepted too
    save_file({f"adapter_modules.{k}": v for k, v in official.items()}, str(tmp_path / "sun_adapter.safetensors"))
    adapter = load_official_adapter(tmp_path / "sun_adapter.safetensors", unet)
    assert adapter.config.use_positive_branch
    torch.testing.assert_close(adapter.layers[0].to_k_pos.weight, official["1.to_k_extra_pos.weight"])
    adapter.install(unet)
    positive, negative = text_states(backbone, ["a cat"], ["blurry"])
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 8, 8), 500, encoder_hidden_states=concat_negative(positive, negative)).sample
    assert torch.isfinite(out).all()


def test_wrong_files_are_user_errors(tmp_path, unet):
    with pytest.raises(UserError, match="does not exist"):
        load_official_adapter(tmp_path / "missing.safetensors", unet)
    (tmp_path / "broken.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(UserError, match="cannot read"):
        load_official_adapter(tmp_path / "broken.safetensors", unet)
    official = official_state_dict(unet, add_pos=False)
    with pytest.raises(UserError, match="not a cross-attention layer"):
        load_official_adapter(
            {k.replace("1.", "0.", 1) if k.startswith("1.") else k: v for k, v in official.items()}, unet
        )
    with pytest.raises(UserError, match="not SpeedUpNet"):
        load_official_adapter({**official, "lora.weight": torch.zeros(1)}, unet)
    with pytest.raises(UserError, match="lacks"):
        load_official_adapter({k: v for k, v in official.items() if not k.startswith("31.")}, unet)
    wrong_shape = dict(official)
    wrong_shape["1.to_k_neg.weight"] = torch.zeros(3, 3)
    with pytest.raises(UserError, match="shape"):
        load_official_adapter(wrong_shape, unet)
