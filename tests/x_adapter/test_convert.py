"""The official X_Adapter_v1.bin key layout converts to a mapper with identical outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xa_lightning.errors import UserError
from xa_lightning.methods.x_adapter.convert import convert_official_state_dict, load_official_mapper

# Scaled-down official layout: in [1280, 640, 320] -> out [1280, 1280, 640] becomes [32, 16, 8] -> [32, 32, 16];
# 3 residual blocks per stage; the last stage upsamples with a transposed conv. Same key names and structure.
IN, OUT, BLOCKS = [32, 16, 8], [32, 32, 16], 3


def synthetic_official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def conv(cout: int, cin: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(cout, cin, k, k, generator=g) * 0.1, torch.randn(cout, generator=g) * 0.1

    state: dict[str, torch.Tensor] = {}
    for stage in range(3):
        for j in range(BLOCKS):
            index = stage * BLOCKS + j
            cin = IN[stage] if j == 0 else OUT[stage]
            if stage == 2 and j == 0:  # ConvTranspose2d weight layout is (in, out, k, k)
                state[f"body.{index}.up_opt.op.weight"], state[f"body.{index}.up_opt.op.bias"] = conv(cin, cin, 3)
            if cin != OUT[stage]:
                state[f"body.{index}.in_conv.weight"], state[f"body.{index}.in_conv.bias"] = conv(OUT[stage], cin, 3)
            state[f"body.{index}.block1.weight"], state[f"body.{index}.block1.bias"] = conv(OUT[stage], OUT[stage], 3)
            state[f"body.{index}.block2.weight"], state[f"body.{index}.block2.bias"] = conv(OUT[stage], OUT[stage], 3)
        # "zero" convs of a trained release are not zero: random so the comparison means something
        state[f"zero_out.{stage}.weight"], state[f"zero_out.{stage}.bias"] = conv(OUT[stage], OUT[stage], 1)
    return state


def official_forward(state: dict[str, torch.Tensor], features: list[torch.Tensor]) -> list[torch.Tensor]:
    """The official Adapter_XL forward (sk=True, no norm, no timestep, ADD), written from its description
    with functional ops on the official keys: an independent reference for the converted model."""
    outputs = []
    for stage, x in enumerate(features):
        for j in range(BLOCKS):
            key = f"body.{stage * BLOCKS + j}"
            if f"{key}.up_opt.op.weight" in state:  # output size = 2x, as the official output_size gives
                x = F.conv_transpose2d(
                    x,
                    state[f"{key}.up_opt.op.weight"],
                    state[f"{key}.up_opt.op.bias"],
                    stride=2,
                    padding=1,
                    output_padding=1,
                )
            if f"{key}.in_conv.weight" in state:
                x = F.conv2d(x, state[f"{key}.in_conv.weight"], state[f"{key}.in_conv.bias"], padding=1)
            h = F.relu(F.conv2d(x, state[f"{key}.block1.weight"], state[f"{key}.block1.bias"], padding=1))
            x = F.conv2d(h, state[f"{key}.block2.weight"], state[f"{key}.block2.bias"], padding=1) + x
        outputs.append(F.conv2d(x, state[f"zero_out.{stage}.weight"], state[f"zero_out.{stage}.bias"]))
    return outputs


def features(batch: int = 2) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    g = torch.Generator().manual_seed(7)
    # official sizes at 512 -> 1024: 1280@32, 640@64, 320@64 -> targets 32, 64, 128 (here / 8)
    inputs = [
        torch.randn(batch, IN[0], 4, 4, generator=g),
        torch.randn(batch, IN[1], 8, 8, generator=g),
        torch.randn(batch, IN[2], 8, 8, generator=g),
    ]
    return inputs, [(4, 4), (8, 8), (16, 16)]


@pytest.mark.parametrize("container", ["bin", "safetensors", "dict"])
def test_converted_official_weights_give_identical_outputs(tmp_path, container):
    state = synthetic_official_state_dict()
    if container == "bin":
        source = tmp_path / "X_Adapter_v1.bin"
        torch.save(state, source)
    elif container == "safetensors":
        from safetensors.torch import save_file

        source = tmp_path / "X_Adapter_v1.safetensors"
        save_file(state, source)
    else:
        source = {f"module.{k}": v for k, v in state.items()}  # a DDP-wrapped save
    mapper = load_official_mapper(source)
    assert list(mapper.config.in_channels) == IN and list(mapper.config.out_channels) == OUT
    assert list(mapper.config.resample) == ["none", "none", "transpose"]
    assert list(mapper.config.base_blocks) == ["up_blocks.1", "up_blocks.2", "up_blocks.3"]
    inputs, sizes = features()
    with torch.no_grad():
        ours = mapper(inputs, sizes)
        reference = official_forward(state, inputs)
    for a, b in zip(ours, reference):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_every_official_tensor_is_used_exactly_once():
    state = synthetic_official_state_dict()
    _, converted = convert_official_state_dict(state)
    assert len(converted) == len(state)
    assert sorted(t.data_ptr() for t in converted.values()) == sorted(t.data_ptr() for t in state.values())


def test_bad_official_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_official_mapper(tmp_path / "missing.bin")
    broken = tmp_path / "broken.bin"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        load_official_mapper(broken)
    state = synthetic_official_state_dict()
    with pytest.raises(UserError, match="unexpected key"):
        load_official_mapper({**state, "lora.weight": torch.zeros(1)})
    with pytest.raises(UserError, match="timestep"):
        load_official_mapper({**state, "body.0.timestep_proj.linear.weight": torch.zeros(1)})
