"""The surgery API: processors and block hooks change the forward pass and leave no trace once removed."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from xa_lightning.backbones import Backbone, surgery

from .conftest import latents_for

EXPECTED_CROSS = {"sd15": 16, "sdxl": 17, "pixart_alpha": 4}  # tiny models (real: 16, 70, 28)


def _predict(backbone: Backbone) -> torch.Tensor:
    with torch.no_grad():
        cond = backbone.encode_text(["a red fox", "a lighthouse"])
        return backbone.predict(latents_for(backbone), 500, cond)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


class _Shift:
    """A processor that adds ``value`` to what the one it replaces returns."""

    def __init__(self, original: Callable[..., torch.Tensor], value: float) -> None:
        self.original, self.value = original, value

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        return out + self.value


def test_attention_layers_are_the_cross_attention_layers_in_processor_order(backbone: Backbone, family: str):
    layers = surgery.attention_layers(backbone.denoiser, "cross")
    assert len(layers) == EXPECTED_CROSS[family]
    order = [key[: -len(".processor")] for key in backbone.denoiser.attn_processors]
    assert [layer.name for layer in layers] == [name for name in order if name in {x.name for x in layers}]
    assert all(layer.module.is_cross_attention for layer in layers)
    assert all(layer.inner_dim == layer.module.to_k.out_features for layer in layers)
    self_layers = surgery.attention_layers(backbone.denoiser, "self")
    assert self_layers and not any(layer.module.is_cross_attention for layer in self_layers)
    assert len(surgery.attention_layers(backbone.denoiser, "all")) == len(layers) + len(self_layers)
    assert [layer.name for layer in backbone.cross_attention_layers()] == [layer.name for layer in layers]


def test_installed_processors_change_the_output_and_removal_is_bit_identical(backbone: Backbone):
    before_state, before = _snapshot(backbone.denoiser), _predict(backbone)
    processors_before = dict(backbone.denoiser.attn_processors)
    with surgery.install_processors(backbone.denoiser, lambda layer: _Shift(layer.module.processor, 0.5)) as change:
        assert change.active
        changed = _predict(backbone)
        assert not torch.allclose(changed, before)
        # a factory that leaves layers alone (None) and nesting work
        with surgery.install_processors(backbone.denoiser, lambda layer: None):
            assert torch.equal(_predict(backbone), changed)
    assert not change.active
    assert torch.equal(_predict(backbone), before)
    after_state = backbone.denoiser.state_dict()
    assert list(after_state) == list(before_state)
    assert all(torch.equal(after_state[k], v) for k, v in before_state.items())
    assert all(p is processors_before[k] for k, p in backbone.denoiser.attn_processors.items())


def test_processors_by_name_on_a_chosen_subset(tiny_backbone):
    backbone = tiny_backbone("sd15")
    layers = surgery.attention_layers(backbone.denoiser)
    first = layers[0]
    change = surgery.install_processors(backbone.denoiser, {first.name: _Shift(first.module.processor, 1.0)})
    try:
        assert isinstance(first.module.processor, _Shift)
        assert not any(isinstance(layer.module.processor, _Shift) for layer in layers[1:])
    finally:
        change.remove()
        change.remove()  # twice is a no-op
    assert not isinstance(first.module.processor, _Shift)
    with pytest.raises(KeyError, match="no_such_layer"):
        surgery.install_processors(backbone.denoiser, {"no_such_layer": _Shift(first.module.processor, 1.0)})


def test_block_hooks_capture_and_add_and_are_removed_on_errors(tiny_backbone):
    backbone = tiny_backbone("sd15")
    before = _predict(backbone)
    with surgery.capture_outputs(backbone.denoiser, ["down_blocks.0", "mid_block"]) as captured:
        _predict(backbone)
    assert set(captured) == {"down_blocks.0", "mid_block"}
    assert captured["down_blocks.0"].ndim == 4  # the hidden states of a (hidden, skips) tuple
    with surgery.add_to_outputs(backbone.denoiser, {"down_blocks.0": torch.zeros_like(captured["down_blocks.0"])}):
        assert torch.equal(_predict(backbone), before)
    # a residual on a down block reaches its skip connection too: the last skip state is the new hidden tensor
    seen = {}

    def spy(module, args, output):
        seen["skip_is_hidden"] = output[1][-1] is output[0]

    with surgery.add_to_outputs(backbone.denoiser, {"down_blocks.0": torch.ones_like(captured["down_blocks.0"])}):
        with surgery.hook_blocks(backbone.denoiser, {"down_blocks.0": spy}):
            changed = _predict(backbone)
    assert not torch.allclose(changed, before)
    assert seen["skip_is_hidden"]
    with pytest.raises(RuntimeError, match="boom"):
        with surgery.hook_blocks(
            backbone.denoiser, {"mid_block": lambda m, a, o: (_ for _ in ()).throw(RuntimeError("boom"))}
        ):
            _predict(backbone)
    assert torch.equal(_predict(backbone), before)
    with pytest.raises(KeyError, match="no_such_block"):
        with surgery.capture_outputs(backbone.denoiser, ["no_such_block"]):
            pass


def test_replace_hidden_keeps_a_down_blocks_skip_state_in_step():
    hidden, other = torch.zeros(1), torch.ones(1)
    output = (hidden, (other, hidden))
    new = torch.full((1,), 2.0)
    replaced = surgery.replace_hidden(output, new)
    assert replaced[0] is new and replaced[1][-1] is new and replaced[1][0] is other
    assert surgery.replace_hidden(hidden, new) is new
