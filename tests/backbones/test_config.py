"""The backbone Hydra group and its dataclass schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from xa_lightning.backbones import BackboneConfig, backbone_from_config
from xa_lightning.errors import UserError

CONF = Path(__file__).resolve().parents[2] / "conf"
OPTIONS = [
    f"{family}{suffix}" for family in ("sd15", "sdxl", "pixart_alpha") for suffix in ("", "_tiny", "_full_shape")
]
KEYS = {"family", "flavour", "path", "seed", "dtype", "vae_dtype", "variant", "revision"}
KEYS |= {"attention", "channels_last", "compile"}  # speed levers


def compose_backbone(option: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(overrides=[f"+backbone={option}", *overrides]).backbone


@pytest.mark.parametrize("option", OPTIONS)
def test_every_backbone_option_validates_against_the_schema(option: str):
    node = compose_backbone(option)
    assert set(node) == KEYS
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BackboneConfig), node))
    assert isinstance(config, BackboneConfig)
    expected_flavour = "tiny" if "_tiny" in option else "full_shape" if "_full_shape" in option else "pretrained"
    assert config.family == option.removesuffix("_tiny").removesuffix("_full_shape")
    assert config.flavour == expected_flavour
    assert config.dtype == "fp32" and config.path is None
    if config.family == "sdxl" and config.flavour != "tiny":
        assert config.vae_dtype == "fp32"  # the SDXL VAE overflows in fp16


def test_backbone_from_config_builds_what_the_yaml_says(tiny_backbone):
    node = compose_backbone("pixart_alpha_tiny", "backbone.seed=1")
    backbone = backbone_from_config(node)
    assert backbone.id == "pixart_alpha:tiny"
    reference = tiny_backbone("pixart_alpha", 1).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in backbone.state_dict().items())
    assert backbone_from_config(BackboneConfig(family="pixart_alpha", seed=1)).state_dict().keys() == reference.keys()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"family": "sd15", "flavor": "tiny"}, r"backbone\.flavor is not a backbone setting"),
        ({"family": "sd2"}, r"backbone\.family='sd2' is unknown; use one of sd15, sdxl, pixart_alpha"),
        ({"flavour": "huge"}, r"backbone\.flavour='huge' is unknown"),
        ({"dtype": "float16"}, r"backbone\.dtype='float16' is not a dtype; use one of fp32, fp16, bf16"),
        ({"vae_dtype": "half"}, r"backbone\.vae_dtype='half'"),
        ({"seed": "zero"}, r"backbone\.seed='zero' must be an integer"),
        (
            {"flavour": "tiny", "path": "/weights/sd15"},
            r"backbone\.path is only used with backbone\.flavour=pretrained",
        ),
    ],
)
def test_bad_values_are_one_line_user_errors(values: dict, message: str):
    with pytest.raises(UserError, match=message) as error:
        backbone_from_config(values)
    assert "\n" not in str(error.value)


def test_schema_rejects_unknown_keys_and_wrong_types_when_merged():
    schema = OmegaConf.structured(BackboneConfig)
    with pytest.raises(Exception, match="flavor"):
        OmegaConf.merge(schema, {"flavor": "tiny"})
    with pytest.raises(Exception, match="seed"):
        OmegaConf.merge(schema, {"seed": "abc"})
