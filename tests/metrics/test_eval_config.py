"""conf/eval/* and conf/callbacks/evaluation.yaml compose, validate and instantiate; typos are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from xa_lightning.errors import UserError
from xa_lightning.metrics.config import EvaluationConfig
from xa_lightning.metrics.evaluate import read_prompts

CONF = Path(__file__).resolve().parents[2] / "conf"
PROMPTS = Path(__file__).resolve().parents[2] / "evaluation" / "prompts"


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from xa_lightning import config as xa_config

    xa_config.register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(
                config_name=None,
                overrides=["+paths=default", "paths.output_dir=/tmp/unused", "+callbacks=evaluation", *overrides],
            )
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize("option", ["default", "demo", "paper"])
def test_eval_options_compose_validate_and_instantiate_the_callback(option):
    from hydra.utils import instantiate

    from xa_lightning import config as xa_config
    from xa_lightning.callbacks import EvaluationCallback

    cfg = _compose(f"+eval={option}")
    xa_config.validate(cfg)  # the CLI's pre-check: keys of every _target_ node match its signature
    callback = instantiate(cfg.callbacks.evaluation)
    assert isinstance(callback, EvaluationCallback)
    evaluation = callback.config
    assert isinstance(evaluation, EvaluationConfig)
    assert "fid" in evaluation.metrics and "clip_score" in evaluation.metrics
    assert evaluation.prompts_file is None  # the datamodule's held-out captions unless set
    assert evaluation.ida.missing_face == "zero"  # a lost face scores 0: what paper numbers use
    if option == "paper":
        assert (evaluation.clip.model, evaluation.clip.pretrained) == ("ViT-L-14", "openai")
        assert evaluation.clip.require_pretrained and evaluation.ida.backend == "insightface"
    if option == "demo":
        assert evaluation.every_n_steps == 0 and evaluation.num_images <= 16


def test_overrides_reach_the_callback():
    from hydra.utils import instantiate

    cfg = _compose("+eval=demo", "eval.num_images=3", "eval.pairs=[[student,teacher]]", "eval.clip.pretrained=null")
    evaluation = instantiate(cfg.callbacks.evaluation).config
    assert evaluation.num_images == 3 and evaluation.pairs == [["student", "teacher"]]
    assert evaluation.clip.pretrained is None


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"metrics": ["fid", "clipscore"]}, "did you mean clip_score"),
        ({"num_images": 0}, "eval.num_images"),
        ({"clip": {"pretrain": "openai"}}, "eval.clip.pretrain is not a setting .*did you mean eval.clip.pretrained"),
        ({"edge": {"references": "canny"}}, "eval.edge.references"),
        ({"ida": {"missing_face": "drop"}}, "eval.ida.missing_face"),
        ({"ida": {"backend": "facenet"}}, "eval.ida.backend"),
        ({"pairs": [["a"]]}, "eval.pairs"),
        ({"metrics": ["style_similarity"]}, "eval.style_reference"),
    ],
)
def test_bad_settings_are_one_line_user_errors(bad, message):
    with pytest.raises(UserError, match=message) as info:
        EvaluationConfig.coerce(bad)
    assert "\n" not in str(info.value)


def test_what_the_evaluation_needs_comes_from_the_metrics_declarations():
    from xa_lightning.metrics.base import OTHER_SAMPLER, PROMPTS, REAL_STATISTICS, REFERENCES
    from xa_lightning.metrics.registry import METRICS

    assert {"fid", "kid", "clip_score", "clip_image_similarity", "ida", "edge_f1", "style_similarity"} <= set(METRICS)
    needs = {name: set(metric.needs) for name, metric in METRICS.items()}
    assert needs["fid"] == needs["kid"] == {REAL_STATISTICS} and needs["clip_score"] == {PROMPTS}
    assert needs["clip_image_similarity"] == needs["ida"] == needs["edge_f1"] == {REFERENCES}
    assert needs["style_similarity"] == {OTHER_SAMPLER}
    cfg = EvaluationConfig.coerce({"metrics": ["kid", "clip_score", "edge_f1"]})
    assert cfg.needs_references() and cfg.needs_real_images() and cfg.metrics_needing(REFERENCES) == ["edge_f1"]
    with_stats = EvaluationConfig.coerce({"metrics": ["fid"], "fid": {"reference_stats": "coco"}})
    assert with_stats.needs_real_statistics() and not with_stats.needs_real_images()
    assert not EvaluationConfig.coerce({"metrics": ["clip_score"]}).needs_references()


def test_prompt_sets():
    demo, coco = read_prompts(PROMPTS / "demo.txt"), read_prompts(PROMPTS / "coco_like.txt")
    assert 12 <= len(demo) <= 32 and len(set(demo)) == len(demo)
    assert len(coco) >= 200 and len(set(coco)) == len(coco)
    assert read_prompts("evaluation/prompts/demo.txt") == demo  # relative to the checkout from any cwd
    with pytest.raises(UserError, match="does not exist"):
        read_prompts("evaluation/prompts/nope.txt")
