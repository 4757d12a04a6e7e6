"""LoRA in diffusers / peft / kohya layouts loads to the same weights; scale 0 is a no-op."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from xa_lightning.errors import UserError
from xa_lightning.plugins import detect_lora_format, load_lora, read_lora, set_lora_scales

TARGETS = ["attn2.to_k", "attn2.to_v"]  # few layers: LoRA injection is the slow part


@pytest.fixture(scope="module")
def donor_and_lora(base_backbone):
    """A UNet with a random peft LoRA (rank 4, alpha 8: scaling 2) and that LoRA's peft state dict."""
    torch.manual_seed(0)
    donor = copy.deepcopy(base_backbone.denoiser)
    donor.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    return donor, {k: v.detach().clone() for k, v in get_peft_model_state_dict(donor).items()}


def to_kohya(peft_state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in peft_state.items():
        module, kind = key.split(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def unet_output(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return unet(torch.randn(1, 4, 8, 8, generator=g), 300, torch.randn(1, 77, 32, generator=g)).sample


@pytest.mark.parametrize("layout", ["peft_dir", "peft_dict", "diffusers", "kohya"])
def test_every_lora_layout_reproduces_the_peft_model(tmp_path, fresh_base, donor_and_lora, layout):
    donor, peft_state = donor_and_lora
    if layout == "peft_dir":  # what peft's save_pretrained writes: weights + adapter_config.json (alpha)
        from safetensors.torch import save_file

        (tmp_path / "lora").mkdir()
        save_file(
            {f"base_model.model.{k}": v for k, v in peft_state.items()}, tmp_path / "lora" / "adapter_model.safetensors"
        )
        (tmp_path / "lora" / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
        source, expected_format = tmp_path / "lora", "peft"
    elif layout == "peft_dict":  # no config: alpha folded by hand for this case
        source = {k: (v * 2 if ".lora_B." in k else v) for k, v in peft_state.items()}
        expected_format = "peft"
    elif layout == "diffusers":
        source = {f"unet.{k}": (v * 2 if ".lora_B." in k else v) for k, v in peft_state.items()}
        expected_format = "diffusers"
    else:
        source, expected_format = to_kohya(peft_state, alpha=8), "kohya"
    if isinstance(source, dict):
        assert detect_lora_format(source) == expected_format
    pipe = fresh_base.pipeline()
    before = unet_output(fresh_base.denoiser)
    load_lora(pipe, source, "style", scale=1.0)
    torch.testing.assert_close(unet_output(fresh_base.denoiser), unet_output(donor), rtol=1e-5, atol=1e-5)
    set_lora_scales(pipe, {"style": 0.0})
    assert torch.equal(unet_output(fresh_base.denoiser), before)


def test_lora_errors_name_the_file(tmp_path, fresh_base):
    with pytest.raises(UserError, match=r"LoRA file .*nope.safetensors does not exist"):
        read_lora(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no adapter_model"):
        read_lora(tmp_path / "empty")
    with pytest.raises(UserError, match="layout"):
        detect_lora_format({"some.weight": torch.zeros(1)})
    bad = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 7),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 4),
    }
    with pytest.raises(UserError, match="does not fit"):
        load_lora(fresh_base.pipeline(), bad, "bad")
