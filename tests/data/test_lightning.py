"""The demo data configs through Hydra and Lightning: fast_dev_run, demo built on first use, counters logged."""

from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tests.data.helpers import Consumer, quiet_trainer
from xa_lightning.config import config_dir, register_resolvers
from xa_lightning.data import SkippedSamplesLogger
from xa_lightning.errors import UserError


def data_config(name: str, data_dir, *overrides: str):
    register_resolvers()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose(
            overrides=[
                f"+data={name}",
                "+paths=default",
                "+backbone=sd15_tiny",
                f"paths.data_dir={data_dir}",
                *overrides,
            ]
        ).data


@pytest.mark.parametrize(
    "name,keys",
    [
        ("laion_demo", {"pixels", "pixels_128", "caption", "key", "original_size", "crop_top_left", "target_size"}),
        ("celebamask_hq_demo", {"pixels", "reference", "caption", "key", "original_size"}),
        ("openimages_demo", {"pixels", "reference", "caption", "key", "target_size"}),
    ],
)
def test_demo_configs_fast_dev_run(name, keys, data_dir):
    overrides = ["data.extra_resolutions=[128]"] if name == "laion_demo" else []
    datamodule = instantiate(data_config(name, data_dir, *overrides))
    model = Consumer()
    trainer = quiet_trainer(fast_dev_run=True)
    trainer.fit(model, datamodule=datamodule)
    assert model.batches == 1 and keys <= model.batch_keys
    assert any(isinstance(cb, SkippedSamplesLogger) for cb in trainer.callbacks)
    logged = {k[len("data/") :]: int(v) for k, v in trainer.callback_metrics.items() if k.startswith("data/")}
    assert logged == datamodule.sample_counts()
    if name == "laion_demo":  # the demo filters drop rows as they are read
        assert any(k.startswith("skipped_filter_") for k in logged)
    assert len(datamodule.eval_prompts(3)) == 3 and datamodule.real_images(2).shape[1:] == (3, 64, 64)


def test_demo_is_written_on_first_use_only_when_asked(tmp_path):
    with pytest.raises(UserError, match=rf"data\.root: {tmp_path}/demo/laion does not exist"):
        instantiate(data_config("laion_demo", tmp_path, "data.build_demo_if_missing=false")).prepare_data()
    assert not (tmp_path / "demo").exists()
    datamodule = instantiate(data_config("laion_demo", tmp_path))
    datamodule.prepare_data()  # what Lightning calls on local rank 0
    assert sorted(p.name for p in (tmp_path / "demo" / "laion").glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert not list((tmp_path / "demo").glob(".laion.tmp-*"))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "demo" / "laion").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    datamodule.setup("fit")
    assert datamodule.batches_per_epoch() >= 4


def test_data_configs_validate_required_keys_and_typos():
    from xa_lightning.config import compose, validate
    from xa_lightning.methods import METHODS

    if not METHODS:
        pytest.skip("no method registered yet: the train config cannot be composed")
    method = f"method={sorted(METHODS)[0]}"
    for name in ("laion_demo", "celebamask_hq_demo", "openimages_demo"):
        validate(compose("train", [method, f"data={name}"]))
    for name, key in (("laion", "data.urls"), ("celebamask_hq", "data.root"), ("openimages", "data.root")):
        with pytest.raises(UserError, match=rf"config key {key} is required"):
            validate(compose("train", [method, f"data={name}"]))
    validate(compose("train", [method, "data=openimages", "data.root=/datasets/openimages"]))
    with pytest.raises(UserError, match=r"data\.batch_sizee is not a parameter .*did you mean data\.batch_size"):
        validate(compose("train", [method, "data=laion_demo", "+data.batch_sizee=3"]))
    with pytest.raises(UserError, match=r"data\.filters\.min_aesthtic is not a parameter"):
        validate(compose("train", [method, "data=laion_demo", "+data.filters.min_aesthtic=6"]))
