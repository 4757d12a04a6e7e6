"""SUN's attention processor and adapter model against the frozen UNet's own attention."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from xa_lightning.errors import UserError
from xa_lightning.methods.sun import (
    PositiveOnlyAttnProcessor,
    SUNAdapter,
    SUNAttnProcessor,
    attention_normalization,
    concat_negative,
    shield_from_negative_tokens,
)

from .conftest import random_adapter, text_states


def _inputs(backbone, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=generator)
    prompts = ["a red apple on a table", "a lighthouse at night", "a dog", "a city"][:batch]
    negatives = ["blurry, low quality", "watermark, text", "ugly", "cropped"][:batch]
    positive, negative = text_states(backbone, prompts, negatives)
    return latents, positive, negative


def _run(unet, latents, states, t=500):
    with torch.no_grad():
        return unet(latents, t, encoder_hidden_states=states).sample


def test_installs_on_cross_attention_only(unet):
    adapter = SUNAdapter.from_unet(unet)
    adapter.install(unet)
    processors = unet.attn_processors
    cross = [k for k in processors if k.endswith("attn2.processor")]
    assert len(cross) == 16 == len(adapter.layers)
    assert all(isinstance(processors[k], SUNAttnProcessor) for k in cross)
    assert all(isinstance(p, AttnProcessor2_0) for k, p in processors.items() if k not in cross)
    # processors are not modules: the UNet's state dict stays the base model's
    assert not any("neg" in key for key in unet.state_dict())
    adapter.uninstall(unet)
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())


def test_install_then_uninstall_leaves_the_unet_bit_identical_also_with_a_second_unet(backbone, unet, other_unet):
    latents, positive, negative = _inputs(backbone)
    processors = dict(unet.attn_processors)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    reference = _run(unet, latents, positive)
    plugin = copy.deepcopy(other_unet)  # a fine-tune the same adapter runs in at the same time
    plugin_reference = _run(plugin, latents, positive)
    adapter = random_adapter(unet)
    adapter.install(unet)
    adapter.install(plugin)
    adapter.install(unet)  # again: replaces itself, never wraps itself
    assert adapter.is_installed(unet) and adapter.is_installed(plugin)
    installed = unet.attn_processors
    for key, processor in processors.items():
        if key.endswith("attn2.processor"):
            assert isinstance(installed[key], SUNAttnProcessor) and installed[key].original is processor
        else:
            assert installed[key] is processor
    states = concat_negative(positive, negative)
    assert (_run(unet, latents, states) - reference).abs().max() > 1e-3

    adapter.uninstall(unet)
    assert not adapter.is_installed(unet)
    assert all(unet.attn_processors[key] is processor for key, processor in processors.items())  # the same objects
    assert unet.state_dict().keys() == state.keys()
    assert all(torch.equal(value, state[key]) for key, value in unet.state_dict().items())
    assert torch.equal(_run(unet, latents, positive), reference)
    adapter.uninstall(unet)  # a second uninstall changes nothing
    assert all(unet.attn_processors[key] is processor for key, processor in processors.items())

    assert adapter.is_installed(plugin)  # the other UNet keeps SUN until its own uninstall
    assert (_run(plugin, latents, states) - plugin_reference).abs().max() > 1e-3
    adapter.uninstall(plugin)
    assert torch.equal(_run(plugin, latents, positive), plugin_reference)

    shield = shield_from_negative_tokens(unet, 77)
    assert all(
        isinstance(p, PositiveOnlyAttnProcessor) == k.endswith("attn2.processor")
        for k, p in unet.attn_processors.items()
    )
    torch.testing.assert_close(_run(unet, latents, states), reference, rtol=0, atol=0)  # negative tokens dropped
    shield.remove()
    assert all(unet.attn_processors[key] is processor for key, processor in processors.items())


@pytest.mark.parametrize("zeroing", ["alpha_beta", "value_projection", "scale"])
def test_zeroed_negative_branch_equals_original_attention(backbone, unet, zeroing):
    latents, positive, negative = _inputs(backbone)
    reference = _run(unet, latents, positive)
    adapter = random_adapter(unet)
    with torch.no_grad():
        for layer in adapter.layers:
            if zeroing == "alpha_beta":
                layer.neg_alpha.zero_()
                layer.neg_beta.zero_()
            elif zeroing == "value_projection":
                layer.to_v_neg.weight.zero_()
                layer.neg_beta.zero_()
    if zeroing == "scale":
        adapter.set_scale(0.0)
    adapter.install(unet)
    out = _run(unet, latents, concat_negative(positive, negative))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    # ... and the adapter is not a no-op once the branch is live again
    adapter.set_scale(1.0)
    with torch.no_grad():
        for layer in adapter.layers:
            layer.neg_alpha.fill_(1.0)
            layer.to_v_neg.weight.normal_()
    assert (_run(unet, latents, concat_negative(positive, negative)) - reference).abs().max() > 1e-3


def test_disabled_adapter_is_exactly_the_frozen_model(backbone, unet):
    latents, positive, negative = _inputs(backbone)
    reference = _run(unet, latents, positive)
    adapter = random_adapter(unet)
    adapter.install(unet)
    with adapter.disabled():
        torch.testing.assert_close(_run(unet, latents, positive), reference, rtol=0, atol=0)
    assert adapter.enabled


def test_attention_normalization_formula_and_per_sample_norms():
    torch.manual_seed(0)
    branch, reference = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    alpha, beta = torch.rand(4) + 0.5, torch.randn(4)
    out = attention_normalization(branch, reference, alpha, beta)
    for i in range(3):
        expected = alpha * (reference[i].norm() / branch[i].norm()) * branch[i] + beta
        torch.testing.assert_close(out[i], expected)
    per_token = attention_normalization(branch, reference, alpha, beta, scope="token")
    expected = alpha * (reference[1, 2].norm() / branch[1, 2].norm()) * branch[1, 2] + beta
    torch.testing.assert_close(per_token[1, 2], expected)
    # an all-zero branch maps to beta instead of NaN
    torch.testing.assert_close(
        attention_normalization(torch.zeros(1, 2, 4), reference[:1, :2], alpha, beta), beta.expand(1, 2, 4)
    )


@pytest.mark.parametrize("scope", ["sample", "token"])
def test_normalisation_does_not_couple_samples_of_a_batch(backbone, unet, scope):
    latents, positive, negative = _inputs(backbone, batch=3)
    adapter = random_adapter(unet, norm_scope=scope)
    adapter.install(unet)
    out = _run(unet, latents, concat_negative(positive, negative))
    # change every input of sample 2 (latent, prompt and negative prompt) by a lot
    latents_changed = latents.clone()
    latents_changed[2] *= 10
    positive_changed, negative_changed = positive.clone(), negative.clone()
    positive_changed[2] = positive[0] * 3
    negative_changed[2] = negative[1] * 5
    changed = _run(unet, latents_changed, concat_negative(positive_changed, negative_changed))
    torch.testing.assert_close(changed[:2], out[:2], rtol=1e-5, atol=1e-5)
    assert (changed[2] - out[2]).abs().max() > 1e-3
    # each sample alone gives the same result as in the batch
    alone = _run(unet, latents[1:2], concat_negative(positive[1:2], negative[1:2]))
    torch.testing.assert_close(alone, out[1:2], rtol=1e-5, atol=1e-5)


def test_negative_prompt_reaches_every_layer_in_one_pass(backbone, unet):
    latents, positive, negative = _inputs(backbone)
    adapter = random_adapter(unet)
    adapter.install(unet)
    seen = []
    hooks = [
        layer.to_k_neg.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
        for layer in adapter.layers
    ]
    calls = []
    hooks.append(unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0])))
    a = _run(unet, latents, concat_negative(positive, negative))
    b = _run(unet, latents, concat_negative(positive, negative.flip(0)))
    for hook in hooks:
        hook.remove()
    assert calls == [2, 2]  # batch B, no CFG doubling
    assert len(seen) == 2 * 16 and all(shape == (2, 77, 32) for shape in seen)
    assert (a - b).abs().max() > 1e-4  # the negative prompt changes the prediction


def test_states_without_negative_tokens_are_refused(backbone, unet):
    latents, positive, _ = _inputs(backbone)
    SUNAdapter.from_unet(unet).install(unet)
    with pytest.raises(ValueError, match="concatenated along the token axis"):
        _run(unet, latents, positive)


def test_adapter_for_another_architecture_is_refused(backbone, unet):
    from diffusers import UNet2DConditionModel

    small = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        sample_size=8,
        norm_num_groups=8,
        attention_head_dim=2,
    )
    adapter = SUNAdapter.from_unet(small)
    with pytest.raises(UserError, match="cross-attention layers"):
        adapter.install(unet)


def test_gradients_reach_only_the_adapter(backbone, unet):
    latents, positive, negative = _inputs(backbone)
    adapter = SUNAdapter.from_unet(unet, use_positive_branch=True, alpha_init=1.0)  # the paper's start
    adapter.install(unet)
    out = unet(latents, 500, encoder_hidden_states=concat_negative(positive, negative)).sample
    out.pow(2).mean().backward()
    assert all(p.grad is None for p in backbone.parameters())
    grads = {name: p.grad for name, p in adapter.named_parameters()}
    assert all(g is not None for g in grads.values())
    for kind in ("to_k_neg", "to_v_neg", "neg_alpha", "neg_beta", "to_k_pos", "to_v_pos", "pos_alpha", "pos_beta"):
        assert any(g.abs().sum() > 0 for n, g in grads.items() if kind in n), kind


def test_save_and_load_pretrained(tmp_path, backbone, unet):
    latents, positive, negative = _inputs(backbone)
    adapter = random_adapter(unet, use_positive_branch=True)
    adapter.install(unet)
    expected = _run(unet, latents, concat_negative(positive, negative))
    adapter.save_pretrained(tmp_path / "sun")
    loaded = SUNAdapter.from_pretrained(tmp_path / "sun")
    assert loaded.config.use_positive_branch and list(loaded.config.layer_names) == list(adapter.config.layer_names)
    loaded.install(unet)
    torch.testing.assert_close(_run(unet, latents, concat_negative(positive, negative)), expected)


def test_the_default_start_is_the_frozen_model_and_training_can_leave_it(backbone, unet):
    """alpha_init 0 (the default): every layer outputs Zp exactly, so the student starts as the frozen model;
    alpha and beta receive gradients, so the first step moves it (the projections follow once alpha != 0)."""
    latents, positive, negative = _inputs(backbone)
    frozen = _run(unet, latents, positive)
    adapter = SUNAdapter.from_unet(unet, use_positive_branch=True)
    adapter.install(unet)
    states = concat_negative(positive, negative)
    assert torch.equal(_run(unet, latents, states), frozen)
    unet(latents, 500, encoder_hidden_states=states).sample.pow(2).mean().backward()
    for kind in ("neg_alpha", "neg_beta", "pos_alpha", "pos_beta"):
        assert any(p.grad.abs().sum() > 0 for n, p in adapter.named_parameters() if kind in n), kind


def test_an_installed_adapter_survives_pickling_and_still_uninstalls(backbone, unet):
    """ddp_spawn pickles the module; deepcopy too. The copy's UNet runs the copied adapter, and uninstalling
    gives that UNet back its original processors (found in the SUN processors, which keep them)."""
    import pickle

    latents, positive, negative = _inputs(backbone)
    reference = _run(unet, latents, positive)
    adapter = random_adapter(unet)
    adapter.install(unet)
    states = concat_negative(positive, negative)
    with_sun = _run(unet, latents, states)
    unet_copy, adapter_copy = pickle.loads(pickle.dumps((unet, adapter)))
    assert adapter_copy.is_installed(unet_copy) and not adapter_copy.is_installed(unet)
    assert torch.equal(_run(unet_copy, latents, states), with_sun)
    adapter_copy.uninstall(unet_copy)
    assert not adapter_copy.is_installed(unet_copy)
    assert not any(isinstance(p, SUNAttnProcessor) for p in unet_copy.attn_processors.values())
    assert torch.equal(_run(unet_copy, latents, positive), reference)
    assert adapter.is_installed(unet)  # the original is untouched
    adapter.uninstall(unet)
