"""A real CLIP BPE tokenizer that needs no model hub.

open_clip ships OpenAI's CLIP byte-pair vocabulary (``bpe_simple_vocab_16e6.txt.gz``). We rebuild the Hugging
Face ``vocab.json`` / ``merges.txt`` pair from it (same token ids as ``openai/clip-vit-large-patch14``: 49408
tokens, ``<|startoftext|>`` = 49406, ``<|endoftext|>`` = 49407), write it once to a cache directory and load a
``transformers.CLIPTokenizer`` from there. Tiny and full-shape backbones use it; pretrained backbones load the
tokenizer stored with their weights instead.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

from xa_lightning.paths import cache_dir

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
# open_clip / OpenAI keep the first 49152 - 256 - 2 merges (256 byte tokens + their "</w>" twins + 2 specials).
_NUM_MERGES = 49152 - 256 - 2


def tokenizer_cache_dir() -> Path:
    """Where the rebuilt vocabulary lives: ``<cache_dir>/clip_tokenizer`` (``$XA_CACHE_DIR`` moves it)."""
    return cache_dir() / "clip_tokenizer"


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable unicode map (the 256 base tokens of byte-level BPE)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _open_clip_bpe_path() -> Path:
    import open_clip.tokenizer

    return Path(open_clip.tokenizer.default_bpe())


def _write_vocabulary(target: Path) -> None:
    """Write vocab.json + merges.txt into ``target`` atomically (a finished directory or nothing)."""
    with gzip.open(_open_clip_bpe_path()) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]  # line 0 is a version header
    base = list(_bytes_to_unicode().values())
    tokens = base + [token + "</w>" for token in base] + ["".join(merge.split()) for merge in merges] + [_BOS, _EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"rebuilt CLIP vocabulary has {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".clip_tokenizer-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        (staging / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (staging / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        try:
            os.rename(staging, target)  # atomic; fails if another process finished first, which is fine
        except OSError:
            if not (target / "merges.txt").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@lru_cache(maxsize=1)
def clip_vocabulary_dir() -> Path:
    """The directory holding ``vocab.json`` and ``merges.txt``, created on first use."""
    target = tokenizer_cache_dir()
    if not ((target / "vocab.json").is_file() and (target / "merges.txt").is_file()):
        _write_vocabulary(target)
    return target


def clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH, pad_token: str = _EOS) -> CLIPTokenizer:
    """A real ``CLIPTokenizer`` built offline from open_clip's bundled BPE vocabulary.

    ``pad_token``: SD1.5's tokenizer pads with ``<|endoftext|>``; SDXL's second tokenizer (OpenCLIP bigG) pads
    with ``"!"`` (id 0). ``model_max_length``: 77 for CLIP; PixArt uses 120.
    """
    return CLIPTokenizer.from_pretrained(
        str(clip_vocabulary_dir()), model_max_length=model_max_length, pad_token=pad_token
    )
