"""No bad config past the door: one line on stderr naming the key and the value (and the fix), exit code 2,
nothing written; every Hydra sweep syntax still passes, with each value of a value sweep checked."""

from __future__ import annotations

import re

import pytest

from xa_lightning import cli
from xa_lightning.cli import check_paths
from xa_lightning.config import check_option_dataclasses, compose, validate, validate_sweeps
from xa_lightning.errors import UserError

BAD_OVERRIDES = [
    (["data.resolution=abc"], r"data\.resolution='abc' has the wrong type; expected int"),
    (["data.batch_size=abc"], r"data\.batch_size='abc' has the wrong type; expected int"),  # through **kwargs
    (["method.optimizer.lr=abc"], r"method\.optimizer\.lr='abc' has the wrong type; expected float"),
    (["method.optimizer.lr=-1"], r"method\.optimizer\.lr=-1 is out of range; set it > 0"),
    (["trainer.max_steps=-5"], r"trainer\.max_steps=-5 is out of range; set it >= -1"),
    (["data.batch_size=0"], r"data\.batch_size=0 is out of range; set it >= 1"),
    (["data.crop=rnadom"], r"data\.crop='rnadom': choose random or center"),
    (["data.cache.dtype=fp8"], r"data\.cache\.dtype='fp8': choose fp32, fp16 or bf16"),
    (
        ["+callbacks.model_checkpoint.keep_last=3"],
        r"callbacks\.model_checkpoint\.keep_last is not a parameter .*keep_last_k",
    ),
    (["callbacks.numeric_guard.max_consecutive=0"], r"callbacks\.numeric_guard\.max_consecutive=0 is out of range"),
    (
        ["data.urls=/d/{0..3}.tar"],
        r"data\.urls=/d/\{0\.\.3\}\.tar: .*quote the pattern .*\"data\.urls='/d/\{0\.\.3\}\.tar'\"",
    ),
    (["data=laion", "data.urls='/nowhere/{0..3}.tar'"], r"data\.urls: /nowhere/0\.tar does not exist"),
    (["data=celebamask_hq", "data.root=/nowhere"], r"data\.root: /nowhere does not exist"),
    (["ckpt_path=/nowhere.ckpt"], r"ckpt_path=/nowhere\.ckpt does not exist"),
    (["ckpt_path=last"], r"ckpt_path=last: no checkpoints/last\.ckpt of an earlier run named 'demo_sun'"),
    (["method.adapter.init_weights=/nowhere/sun"], r"method\.adapter\.init_weights=/nowhere/sun does not exist"),
    (["-m", "data.batch_size=2,0"], r"data\.batch_size=0 is out of range; set it >= 1"),  # every sweep value
    (["-m", "data.batch_size=choice(2,abc)"], r"data\.batch_size='abc' has the wrong type"),
]


@pytest.mark.parametrize("overrides,message", BAD_OVERRIDES, ids=[" ".join(o) for o, _ in BAD_OVERRIDES])
def test_bad_override_is_one_line_exit_2_and_nothing_written(overrides, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    flags = [o for o in overrides if o.startswith("-")]
    code = cli.train_main([*flags, "experiment=demo/sun", *(o for o in overrides if o not in flags)])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("xa-train: error: ") and re.search(message, err), err
    assert not captured.out and not any(tmp_path.iterdir()), "the door must not create outputs or start anything"


def test_a_cut_checkpoint_is_refused_at_the_door(tmp_path, monkeypatch, capsys):
    from xa_lightning.training import atomic_torch_save

    monkeypatch.chdir(tmp_path)
    atomic_torch_save({"state_dict": {"adapter.w": __import__("torch").ones(4)}}, tmp_path / "x.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "x.ckpt").read_bytes()[:100])
    assert cli.train_main(["experiment=demo/sun", f"ckpt_path={tmp_path / 'cut.ckpt'}"]) == 2
    assert "is not a readable checkpoint (cut short" in capsys.readouterr().err


SWEEPS = [
    ["seed=0,1,2"],
    ["seed=range(0,3)"],
    ["data.batch_size=choice(2,4)"],
    ["method.optimizer.lr=interval(1e-5,1e-3)", "hydra/sweeper=tpe"],
    ["backbone=glob(sd15_t*)"],
    ["experiment=demo/sun,demo/x_adapter", "data.batch_size=1,2"],
]


@pytest.mark.parametrize("overrides", SWEEPS, ids=[" ".join(o) for o in SWEEPS])
def test_every_sweep_syntax_passes_the_door(overrides):
    overrides = (
        [*overrides] if any(o.startswith("experiment=") for o in overrides) else ["experiment=demo/sun", *overrides]
    )
    cfg = compose("train", overrides, multirun=True)
    validate(cfg)
    validate_sweeps(cfg, overrides)
    check_option_dataclasses(cfg)
    check_paths(cfg, "train")


def test_both_ends_of_an_interval_are_checked():
    overrides = ["experiment=demo/sun", "method.optimizer.lr=interval(0.001,-0.5)"]
    with pytest.raises(UserError, match=r"method\.optimizer\.lr=-0\.5 is out of range"):
        validate_sweeps(compose("train", overrides, multirun=True), overrides)
