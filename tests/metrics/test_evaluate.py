"""evaluate_samplers: batching, references, every metric kind, pairs, and DDP sharding over 2 processes."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch

from xa_lightning.errors import UserError
from xa_lightning.metrics.evaluate import build_evaluation_set, evaluate_samplers

from .test_clip_score import TINY_CLIP_CONFIG


def seeded_images(seeds: list[int], size: int = 32, offset: int = 0) -> torch.Tensor:
    """A deterministic image per seed (a stand-in sampler: the thing under test is the evaluation)."""
    return torch.stack(
        [
            torch.randint(
                0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(s + offset)
            )
            for s in seeds
        ]
    )


def make_clip_dir(folder: Path, with_weights: bool = False) -> str:
    """A tiny open_clip model folder; with weights every process loads the same encoder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    if with_weights:
        import warnings

        import open_clip
        from safetensors.torch import save_file

        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = open_clip.create_model(f"local-dir:{folder}")
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors")
        )
    return f"local-dir:{folder}"


def test_every_metric_kind_with_references_and_pairs(tmp_path, inception):
    calls = []

    def method(prompts, seeds, references):
        calls.append((list(prompts), list(seeds), references))
        return (references * 255).round().to(torch.uint8)  # "follows the reference" exactly

    def baseline(prompts, seeds, references):
        return seeded_images(seeds, 24)

    references = seeded_images([100, 101, 102], 24).float() / 255
    cfg = {
        "metrics": ["fid", "kid", "clip_score", "clip_image_similarity", "edge_f1", "style_similarity"],
        "batch_size": 2,
        "pairs": [["method", "baseline"], ["method", "method"]],
        "style_reference": "baseline",
        "clip": {"model": make_clip_dir(tmp_path / "clip")},
        "fid": {"kid_subsets": 2},
        "progress": False,
    }
    with pytest.warns(UserWarning, match="RANDOM-INIT"):
        result = evaluate_samplers(
            {"method": method, "baseline": baseline},
            ["a", "b", "c"],
            [0, 1, 2],
            references,
            seeded_images([7, 8, 9], 24),
            cfg,
            device="cpu",
            log_images=2,
        )
    assert [c[1] for c in calls] == [[0, 1], [2]]  # batched, seeds kept in order
    assert calls[0][2].dtype == torch.float32 and calls[0][2].shape == (2, 3, 24, 24)  # refs in [0, 1]
    metrics = result["metrics"]
    assert metrics["method/clip_image_similarity_untrained"] == pytest.approx(1.0, abs=1e-5)  # image == reference
    assert 0.0 <= metrics["method/edge_f1"] <= 1.0 and len(result["per_image"]["method"]["edge_f1"]) == 3
    assert metrics["baseline/clip_image_similarity_untrained"] < 0.9999
    assert "method/style_similarity_untrained" in metrics and "baseline/style_similarity_untrained" not in metrics
    assert metrics["method_vs_method/fid"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["method_vs_baseline/fid"] > 1.0
    for name in ("method", "baseline"):
        assert math.isfinite(metrics[f"{name}/fid"]) and math.isfinite(metrics[f"{name}/kid"])
        assert len(result["per_image"][name]["clip_score_untrained"]) == 3
    assert result["untrained"] == [
        "clip_score_untrained",
        "clip_image_similarity_untrained",
        "style_similarity_untrained",
    ]
    assert result["images"]["method"].shape == (2, 3, 24, 24) and result["references"].dtype == torch.uint8
    assert result["real_statistics"].count == 3


def test_missing_inputs_are_user_errors():
    sampler = lambda prompts, seeds, references: seeded_images(seeds)
    with pytest.raises(UserError, match="no references"):
        evaluate_samplers({"m": sampler}, ["a"], [0], None, None, {"metrics": ["edge_f1"]}, device="cpu")
    with pytest.raises(UserError, match="no real images"):
        evaluate_samplers({"m": sampler}, ["a", "b"], [0, 1], None, None, {"metrics": ["fid"]}, device="cpu")
    with pytest.raises(UserError, match="not one of the method's samplers"):
        evaluate_samplers({"m": sampler}, ["a"], [0], None, None, {"metrics": [], "pairs": [["m", "x"]]}, device="cpu")
    bad = lambda prompts, seeds, references: seeded_images(seeds).float()
    with pytest.raises(ValueError, match="uint8"):
        evaluate_samplers({"bad": bad}, ["a"], [0], None, None, {"metrics": []}, device="cpu")


def test_evaluation_set_from_config_files_with_references(tmp_path):
    from PIL import Image

    refs = tmp_path / "refs"
    refs.mkdir()
    for index in range(2):
        Image.new("RGB", (40, 30), (index * 100, 50, 50)).save(refs / f"{index}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\nfirst\n\nsecond\n")
    cfg = {
        "metrics": ["clip_image_similarity"],
        "num_images": 4,
        "images_per_reference": 2,
        "seed": 10,
        "prompts_file": str(prompts),
        "references_dir": str(refs),
        "reference_resolution": 16,
    }
    from xa_lightning.metrics.config import EvaluationConfig

    built = build_evaluation_set(EvaluationConfig.coerce(cfg))
    assert built["prompts"] == ["first", "first", "second", "second"]
    assert built["seeds"] == [10, 11, 12, 13]
    assert built["references"].shape == (4, 3, 16, 16)
    torch.testing.assert_close(built["references"][0], built["references"][1])
    assert built["real_images"] is None


class _HeldOutData:
    """The datamodule's evaluation contract (eval_prompts / eval_references / real_images), nothing else."""

    def eval_prompts(self, n):
        return [f"held-out caption {i}" for i in range(n)]

    def eval_references(self, n):
        return torch.zeros(n, 3, 16, 16)

    def real_images(self, n):
        return torch.zeros(n, 3, 16, 16, dtype=torch.uint8)


def test_config_sources_win_over_the_datamodule(tmp_path):
    """A paper table trains on LAION but evaluates on COCO captions and control maps: an eval.prompts_file /
    references_dir / real_dir that is set wins over the datamodule's held-out split (it used to be ignored)."""
    from PIL import Image

    from xa_lightning.metrics.config import EvaluationConfig
    from xa_lightning.metrics.evaluate import DEMO_PROMPTS, prepare_evaluation, read_prompts

    maps = tmp_path / "maps"
    maps.mkdir()
    for index in range(3):
        Image.new("RGB", (20, 20), (255 * (index % 2),) * 3).save(maps / f"{index}.png")
    captions = tmp_path / "captions.txt"
    captions.write_text("a cat\na dog\na bird\n")
    base = {"metrics": ["edge_f1", "fid"], "num_images": 3, "reference_resolution": 8, "progress": False}
    data = _HeldOutData()

    from_data = build_evaluation_set(EvaluationConfig.coerce(base), data)
    assert from_data["prompts"] == ["held-out caption 0", "held-out caption 1", "held-out caption 2"]
    assert from_data["references"].shape == (3, 3, 16, 16) and from_data["real_images"].shape[0] == 3

    explicit = {**base, "prompts_file": str(captions), "references_dir": str(maps), "real_dir": str(maps)}
    prepare_evaluation(EvaluationConfig.coerce({**explicit, "metrics": ["edge_f1"]}), data)
    built = build_evaluation_set(EvaluationConfig.coerce(explicit), data)
    assert built["prompts"] == ["a cat", "a dog", "a bird"]  # line k with map k
    assert built["references"].shape == (3, 3, 8, 8)
    assert built["references"][1].min() == 1.0 and built["references"][0].max() == 0.0
    assert built["real_images"] == str(maps)

    with pytest.raises(UserError, match="eval.prompts_file: .*missing.txt does not exist"):
        prepare_evaluation(EvaluationConfig.coerce({**base, "prompts_file": str(tmp_path / "missing.txt")}), data)
    # Neither a prompt file nor a datamodule (xa-eval without data=): the demo prompts.
    alone = build_evaluation_set(EvaluationConfig.coerce({"metrics": ["clip_score"], "num_images": 2}))
    assert alone["prompts"] == read_prompts(DEMO_PROMPTS)[:2]


def _tiny_extractor(images: torch.Tensor) -> torch.Tensor:
    """Cheap deterministic 2048-d features (the Inception is tested elsewhere; here: the plumbing)."""
    pooled = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 8).flatten(1)
    projection = torch.randn(pooled.shape[1], 2048, generator=torch.Generator().manual_seed(0))
    return pooled @ projection


def test_num_real_images_null_means_as_many_as_generated_for_every_source(tmp_path, monkeypatch, inception):
    """eval.fid.num_real_images: null = as many real images as generated ones, whatever the source."""
    from PIL import Image

    import xa_lightning.metrics.inception as inception_module

    sampler = {"m": lambda prompts, seeds, references: seeded_images(seeds)}
    cfg = {"metrics": ["fid"], "progress": False}
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    for index, image in enumerate(seeded_images(list(range(30, 35)), 40)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(real_dir / f"{index}.png")

    def real_count(source, settings=cfg) -> int:
        result = evaluate_samplers(sampler, ["a", "b"], [0, 1], None, source, settings, device="cpu")
        return result["real_statistics"].count

    assert real_count(str(real_dir)) == 2  # 5 files, 2 generated images
    monkeypatch.setattr(inception_module, "get_inception", lambda *args, **kwargs: _tiny_extractor)
    reals = seeded_images(list(range(20, 25)))
    assert real_count(reals) == real_count(list(reals)) == 2
    assert real_count(reals, {**cfg, "fid": {"num_real_images": 4}}) == 4


def test_a_registered_metric_is_configured_checked_and_scored(monkeypatch):
    """Adding a metric = its class + one registry line: config names, input checks and scoring follow."""
    from xa_lightning.metrics.base import REFERENCES, MeanScore
    from xa_lightning.metrics.registry import METRICS

    class BrightnessGap(MeanScore):
        name = "brightness_gap"
        needs = frozenset({REFERENCES})
        higher_is_better = False

        @classmethod
        def from_config(cls, cfg, context):
            return cls()

        def score(self, images, prompts=None, references=None):
            return (images.double().mean((1, 2, 3)) - references.double().mean((1, 2, 3))).abs().cpu()

    with pytest.raises(UserError, match="unknown metric 'brightness_gap'"):
        evaluate_samplers(
            {"m": lambda p, s, r: seeded_images(s)}, ["a"], [0], None, None, {"metrics": ["brightness_gap"]}
        )
    monkeypatch.setitem(METRICS, "brightness_gap", BrightnessGap)
    sampler = {"m": lambda prompts, seeds, references: (references * 255).round().to(torch.uint8)}
    with pytest.raises(UserError, match="brightness_gap but there are no references"):
        evaluate_samplers(sampler, ["a"], [0], None, None, {"metrics": ["brightness_gap"]}, device="cpu")
    references = seeded_images([1, 2, 3]).float() / 255
    result = evaluate_samplers(
        sampler, ["a", "b", "c"], [0, 1, 2], references, None, {"metrics": ["brightness_gap"], "batch_size": 2}
    )
    assert result["metrics"] == {"m/brightness_gap": 0.0} and result["per_image"]["m"]["brightness_gap"] == [0.0] * 3


# ---------------------------------------------------------------------------------------------- DDP


def _run(clip_model: str, out_file: str, world_size: int, rank: int) -> None:
    if world_size > 1:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    cfg = {
        "metrics": ["fid", "clip_score", "edge_f1"],
        "batch_size": 2,
        "pairs": [["a", "b"]],
        "clip": {"model": clip_model},
        "progress": False,
    }
    samplers = {"a": lambda p, s, r: seeded_images(s), "b": lambda p, s, r: seeded_images(s, offset=1000)}
    prompts = [f"prompt {i}" for i in range(7)]
    references = seeded_images(list(range(50, 57))).float() / 255
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = evaluate_samplers(
            samplers,
            prompts,
            list(range(7)),
            references,
            seeded_images(list(range(20, 26))),
            cfg,
            device="cpu",
            log_images=5,
        )
    if rank == 0:
        torch.save(
            {"metrics": result["metrics"], "per_image": result["per_image"], "images": result["images"]}, out_file
        )
    if world_size > 1:
        torch.distributed.destroy_process_group()


def _spawned(rank: int, clip_model: str, out_file: str, port: int) -> None:
    import xa_lightning.metrics.inception as inception_module

    inception_module.get_inception = lambda *args, **kwargs: _tiny_extractor  # a fresh process of its own
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _run(clip_model, out_file, 2, rank)


@pytest.mark.slow
def test_two_ranks_give_the_single_process_result(tmp_path, monkeypatch):
    """Slow: two spawned processes each import torch + torchmetrics (10-60 s on the shared 2-core box)."""
    import torch.multiprocessing as mp

    import xa_lightning.metrics.inception as inception_module

    monkeypatch.setattr(inception_module, "get_inception", lambda *args, **kwargs: _tiny_extractor)
    clip_model = make_clip_dir(tmp_path / "clip", with_weights=True)
    single, double = tmp_path / "single.pt", tmp_path / "double.pt"
    _run(clip_model, str(single), 1, 0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_spawned, args=(clip_model, str(double), port), nprocs=2, join=True)
    one, two = torch.load(single), torch.load(double)
    assert one["metrics"].keys() == two["metrics"].keys()
    for key, value in one["metrics"].items():
        assert two["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-8), key
    for name, table in one["per_image"].items():
        for key, values in table.items():
            assert two["per_image"][name][key] == pytest.approx(values, rel=1e-5, abs=1e-6), (name, key)
    for name, images in one["images"].items():
        assert torch.equal(images, two["images"][name])
