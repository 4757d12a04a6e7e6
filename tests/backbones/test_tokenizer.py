"""The offline CLIP tokenizer is OpenAI's BPE: same ids as open_clip's reference tokenizer."""

from __future__ import annotations

import json

import pytest
from open_clip.tokenizer import SimpleTokenizer

from xa_lightning.backbones import tokenizer as tokenizer_module
from xa_lightning.backbones.tokenizer import clip_tokenizer

TEXTS = [
    "A photo of an astronaut riding a horse on Mars, 4k, trending on ArtStation!",
    "portrait of a woman, highly detailed, octane render, by Greg Rutkowski",
    "naïve café — 東京 🚀 don't stop",
]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_open_clips_reference_tokenizer(text: str):
    ours = clip_tokenizer()(text).input_ids
    reference = SimpleTokenizer().encode(text)
    assert ours == [49406, *reference, 49407]


def test_special_tokens_and_padding():
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    padded = tokenizer(["a cat"], padding="max_length", max_length=77, truncation=True)
    assert len(padded.input_ids[0]) == 77 and sum(padded.attention_mask[0]) == 4
    assert clip_tokenizer(pad_token="!").pad_token_id == 0  # SDXL's second tokenizer
    pixart = clip_tokenizer(model_max_length=120)
    long = pixart(["word " * 300], padding="max_length", max_length=120, truncation=True).input_ids[0]
    assert len(long) == 120 and long[-1] == 49407


def test_vocabulary_is_written_atomically_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XA_CACHE_DIR", str(tmp_path))
    target = tokenizer_module.tokenizer_cache_dir()
    assert target == tmp_path / "clip_tokenizer"
    tokenizer_module._write_vocabulary(target)
    vocab = json.loads((target / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407 and vocab["a</w>"] == 320
    merges = (target / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
    before = (target / "vocab.json").stat().st_mtime_ns
    tokenizer_module._write_vocabulary(target)  # a second writer (another process) loses the race harmlessly
    assert (target / "vocab.json").stat().st_mtime_ns == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip_tokenizer"]  # no staging leftovers
