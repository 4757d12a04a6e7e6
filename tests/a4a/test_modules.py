"""The A4A modules: shapes follow d_scm and R (odd widths too), the ablations, save / load."""

from __future__ import annotations

import pytest
import torch

from xa_lightning.errors import UserError
from xa_lightning.methods.a4a import A4AAdapter, coupling_dim
from xa_lightning.plugins.ip_adapter import IPAdapterModel

PTA_DIMS = [6, 10, 15, 10]  # odd tiny widths: lcm 30
UPGRADED_DIMS = [7, 9, 11]
TOKENS = 3


def _pta_states(batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    keys = [torch.randn(batch, TOKENS, d, generator=generator) for d in PTA_DIMS]
    values = [torch.randn(batch, TOKENS, d, generator=generator) for d in PTA_DIMS]
    tokens = torch.randn(batch, TOKENS, 5, generator=generator)
    return keys, values, tokens


def _adapter(**kwargs) -> A4AAdapter:
    torch.manual_seed(0)
    options = dict(pta_dims=PTA_DIMS, upgraded_dims=UPGRADED_DIMS, num_tokens=TOKENS, token_dim=5, heads=3, repeats=3)
    return A4AAdapter(**{**options, **kwargs})


def test_shapes_follow_the_coupling_width_and_the_repeats():
    adapter = _adapter()
    assert adapter.coupling_width == coupling_dim(PTA_DIMS) == 30
    assert [p.in_features for p in adapter.projection_k] == PTA_DIMS
    assert {p.out_features for p in adapter.projection_k} == {30}
    for mapping in (adapter.mapping_k, adapter.mapping_v):
        assert len(mapping.blocks) == 3  # R
        assert mapping.queries.shape == (1, len(UPGRADED_DIMS) * TOKENS, 30)  # N tokens per upgraded layer
        assert mapping.blocks[0].attention.heads == 3
    assert [a.in_features for a in adapter.alignment_k] == [30] * 3
    keys, values = adapter(*_pta_states())
    assert [tuple(k.shape) for k in keys] == [(2, TOKENS, d) for d in UPGRADED_DIMS]
    assert [tuple(v.shape) for v in values] == [(2, TOKENS, d) for d in UPGRADED_DIMS]

    wider = _adapter(scm_dim=45, heads=5, repeats=1)
    assert wider.coupling_width == 45 and len(wider.mapping_k.blocks) == 1
    assert [tuple(k.shape) for k in wider(*_pta_states())[0]] == [(2, TOKENS, d) for d in UPGRADED_DIMS]


def test_keys_and_values_have_their_own_modules_and_every_group_gets_gradients():
    adapter = _adapter()
    keys, values = adapter(*_pta_states())
    (sum(k.square().mean() for k in keys) + sum(v.square().mean() for v in values)).backward()
    groups = adapter.parameter_groups()
    assert set(groups) == {"projection_alignment", "mapping"}
    listed = [id(p) for params in groups.values() for p in params]
    assert sorted(listed) == sorted(id(p) for p in adapter.parameters())  # a partition of the adapter
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert adapter.mapping_k.queries is not adapter.mapping_v.queries


def test_heads_must_divide_the_coupling_width():
    with pytest.raises(UserError, match="method.adapter.heads=4"):
        _adapter(heads=4)


def test_ablation_without_projection_reads_the_image_tokens():
    adapter = _adapter(use_projection=False)
    assert [p.in_features for p in adapter.projection_k] == [5]
    keys, values, tokens = _pta_states()
    out = adapter(keys, values, tokens)[0]
    other_pta = _pta_states(seed=1)
    assert all(torch.equal(a, b) for a, b in zip(out, adapter(other_pta[0], other_pta[1], tokens)[0]))
    assert [tuple(k.shape) for k in out] == [(2, TOKENS, d) for d in UPGRADED_DIMS]


def test_ablation_without_mapping_pairs_layers_by_relative_depth():
    adapter = _adapter(use_mapping=False)
    assert adapter.mapping_k is None and "mapping" not in adapter.parameter_groups()
    keys, values, tokens = _pta_states()
    before = adapter(keys, values, tokens)[0]
    changed = [k.clone() for k in keys]
    changed[-1] += 1.0  # the deepest PTA layer: read by the deepest upgraded layer only
    after = adapter(changed, values, tokens)[0]
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert not torch.equal(before[2], after[2])


def test_save_pretrained_round_trip_with_and_without_a_finetuned_pta(tmp_path):
    pta = IPAdapterModel(kind="plain", image_embed_dim=8, cross_attention_dim=5, layer_dims=PTA_DIMS)
    for name, extra in (("frozen", {}), ("finetuned", {"pta_config": pta.public_config()})):
        adapter = _adapter(**extra)
        adapter.save_pretrained(tmp_path / name)
        loaded = A4AAdapter.from_pretrained(tmp_path / name)
        assert (loaded.pta is None) == (name == "frozen")
        assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == {
            k: v for k, v in adapter.config.items() if not k.startswith("_")
        }
        for a, b in zip(adapter(*_pta_states())[0], loaded(*_pta_states())[0]):
            assert torch.equal(a, b)
    assert set(loaded.parameter_groups()) == {"projection_alignment", "mapping", "pta"}
