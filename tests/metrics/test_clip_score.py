"""CLIP score / image similarity on a tiny open_clip model; untrained encoders are flagged, never silent."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from xa_lightning.errors import UserError
from xa_lightning.metrics.clip_score import (
    ClipImageSimilarity,
    ClipScore,
    StyleSimilarity,
    UntrainedEncoderWarning,
    load_clip,
)

TINY_CLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
}


@pytest.fixture(scope="module")
def tiny_clip_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(folder with config only, folder with config + saved weights) in open_clip's local-dir layout."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny_clip")
    untrained, trained = root / "untrained", root / "trained"
    for folder in (untrained, trained):
        folder.mkdir()
        (folder / "open_clip_config.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(f"local-dir:{untrained}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(trained / "open_clip_model.safetensors"))
    return untrained, trained


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_dirs):
    return load_clip(f"local-dir:{tiny_clip_dirs[1]}")


def _images(seed: int, count: int = 3, size: int = 40) -> torch.Tensor:
    return torch.randint(
        0, 256, (count, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


def test_random_init_encoder_is_flagged_in_name_and_warning(tiny_clip_dirs):
    with pytest.warns(UntrainedEncoderWarning, match="RANDOM-INIT"):
        clip = load_clip(f"local-dir:{tiny_clip_dirs[0]}")
    assert not clip.trained
    assert ClipScore(clip).log_name == "clip_score_untrained"
    assert ClipImageSimilarity(clip).log_name == "clip_image_similarity_untrained"
    assert StyleSimilarity(clip).log_name == "style_similarity_untrained"


def test_saved_weights_load_and_the_name_is_plain(tiny_clip_dirs, tiny_clip):
    from safetensors.torch import load_file

    assert tiny_clip.trained
    assert ClipScore(tiny_clip).log_name == "clip_score"
    saved = load_file(str(tiny_clip_dirs[1] / "open_clip_model.safetensors"))
    for key, value in tiny_clip.model.state_dict().items():
        torch.testing.assert_close(value, saved[key])


def test_clip_score_equals_the_reference_formula(tiny_clip):
    """Mean over images of max(100 * cos(image, text), 0) (the clamp per image, docs/evaluation.md), with
    open_clip's own per-image PIL preprocessing as the reference for our batched one."""
    from PIL import Image

    images, prompts = _images(0, 4), ["a cat", "a red car", "a photo of the sea", "two dogs"]
    model, preprocess, tokenizer = tiny_clip.model, tiny_clip.preprocess, tiny_clip.tokenizer
    with torch.no_grad():
        pixel = torch.stack([preprocess(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images])
        image_features = model.encode_image(pixel)
        text_features = model.encode_text(tokenizer(prompts))
    cosine = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
    expected = (100 * cosine).clamp(min=0)
    metric = ClipScore(tiny_clip)
    torch.testing.assert_close(metric.score(images, prompts), expected, rtol=1e-5, atol=1e-4)
    metric.update(images[:2], prompts[:2])
    metric.update(images[2:], prompts[2:])
    assert float(metric.compute()) == pytest.approx(float(expected.mean()), rel=1e-5, abs=1e-4)
    assert (metric.score(images, prompts) >= 0).all()


def test_clip_image_similarity_is_one_for_identical_images(tiny_clip):
    images, others = _images(1), _images(2)
    metric = ClipImageSimilarity(tiny_clip)
    torch.testing.assert_close(metric.score(images, references=images), torch.ones(3), rtol=0, atol=1e-5)
    different = metric.score(images, references=others)
    assert (different < 0.9999).all()
    features = tiny_clip.encode_images(images), tiny_clip.encode_images(others)
    torch.testing.assert_close(different, (features[0] * features[1]).sum(-1), rtol=1e-6, atol=1e-6)


def test_paper_model_without_cached_weights_offline_is_an_error_when_required(monkeypatch, tmp_path):
    from xa_lightning.metrics import weights

    monkeypatch.setattr(weights, "host_reachable", lambda host: False)  # air-gapped: no slow retries
    with pytest.raises(UserError, match="require_pretrained"):
        load_clip("ViT-L-14", "openai", require_pretrained=True, cache_dir=str(tmp_path))
    with pytest.raises(UserError, match="neither a pretrained tag"):
        load_clip("ViT-L-14", "no-such-tag")
    with pytest.raises(UserError, match="not an open_clip model"):
        load_clip("ViT-XXL-99", "openai")


def test_each_reference_is_encoded_once(tiny_clip):
    """A4A: 4 generations per reference; the reference embeddings are computed once each, across batches."""
    encoded = []
    hook = tiny_clip.model.visual.register_forward_hook(lambda module, args, output: encoded.append(args[0].shape[0]))
    try:
        references = _images(5, count=2).repeat_interleave(4, dim=0)  # r0 x4, r1 x4
        images = _images(6, count=8)
        metric = ClipImageSimilarity(tiny_clip)
        for batch in (slice(0, 3), slice(3, 6), slice(6, 8)):
            metric.update(images[batch], references=references[batch])
        # 8 generated images + the 2 distinct references
        assert sum(encoded) == 8 + 2
        fresh = ClipImageSimilarity(tiny_clip)
        torch.testing.assert_close(
            metric.last_scores["clip_image_similarity"], fresh.score(images[6:8], references=references[6:8])
        )
    finally:
        hook.remove()


# ---------------------------------------------------------------------------------------------- cached tags
TINY_TAG_MODEL = "xa-tiny-clip"


@pytest.fixture
def cached_tiny_tag(monkeypatch, tmp_path, tiny_clip_dirs, request):
    """A built-in-style open_clip model name with an "openai" tag whose weights sit in a local cache, in
    the Hugging Face cache layout ("hf") or open_clip's URL cache ("url"); the network is never asked."""
    import open_clip
    from safetensors.torch import load_file

    from xa_lightning.metrics import weights

    layout = request.param
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_TAG_MODEL, TINY_CLIP_CONFIG["model_cfg"])
    tag = {
        "url": "",
        "hf_hub": "",
        "mean": (0.1, 0.2, 0.3),
        "std": (0.5, 0.6, 0.7),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        "quick_gelu": True,
    }
    state = load_file(str(tiny_clip_dirs[1] / "open_clip_model.safetensors"))
    cache = tmp_path / "cache"
    if layout == "hf":
        from safetensors.torch import save_file

        tag["hf_hub"] = "xa-test/tiny-clip/"
        repo = cache / "models--xa-test--tiny-clip"
        revision = "0123456789abcdef0123456789abcdef01234567"
        (repo / "snapshots" / revision).mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision)
        save_file(state, str(repo / "snapshots" / revision / "open_clip_model.safetensors"))
    else:
        tag["url"] = "https://example.invalid/clip/xa-tiny-clip.pt"
        cache.mkdir()
        torch.save(state, cache / "xa-tiny-clip.pt")
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY_TAG_MODEL, {"openai": tag})
    monkeypatch.setattr(weights, "host_reachable", lambda host: pytest.fail(f"asked the network ({host})"))
    return str(cache), state, tag


@pytest.mark.parametrize("cached_tiny_tag", ["hf", "url"], indirect=True)
def test_cached_tag_weights_load_with_the_tags_preprocessing(cached_tiny_tag):
    """The run after the first download: weights from the cache, the tag's preprocessing, no network."""
    cache, state, tag = cached_tiny_tag
    clip = load_clip(TINY_TAG_MODEL, "openai", cache_dir=cache, require_pretrained=True)
    assert clip.trained and clip.source.startswith(cache)
    for key, value in clip.model.state_dict().items():
        torch.testing.assert_close(value, state[key])
    normalize = clip.preprocess.transforms[-1]
    assert tuple(normalize.mean) == tag["mean"] and tuple(normalize.std) == tag["std"]
    assert ClipScore(clip).log_name == "clip_score"
