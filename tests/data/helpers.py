"""Builders for the data tests: image bytes of every kind, tar shards, a consumer LightningModule."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image


def smooth_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A deterministic RGB image with structure (gradients + blobs), ``size`` = (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    channels = [np.sin(xx * rng.uniform(2, 9) + yy * rng.uniform(2, 9) + rng.uniform(0, 6)) for _ in range(3)]
    array = ((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8)
    return Image.fromarray(array, "RGB")


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG header that claims a gigantic image (never decoded: the guard must stop it first)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def sixteen_bit_png(value: int = 0x8000, size: tuple[int, int] = (48, 40)) -> bytes:
    array = np.full((size[1], size[0]), value, dtype=np.uint16)
    return encode(Image.fromarray(array), "PNG")


def write_shard(path: Path, samples: Iterable[dict[str, Any]]) -> Path:
    """An img2dataset-style tar; each sample: ``key`` plus extension -> bytes/str/dict."""
    from webdataset import TarWriter

    with TarWriter(str(path), encoder=False, mtime=1_700_000_000) as writer:
        for sample in samples:
            record = {"__key__": sample["key"]}
            for ext, value in sample.items():
                if ext == "key":
                    continue
                if isinstance(value, dict):
                    value = json.dumps(value).encode()
                elif isinstance(value, str):
                    value = value.encode()
                record[ext] = value
            writer.write(record)
    return path


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


class Consumer(L.LightningModule):
    """Trains a scale on whatever image tensor the batch carries; records what it saw."""

    def __init__(self, record_dir: Path | None = None) -> None:
        super().__init__()
        self.record_dir = record_dir  # each rank writes what it saw to rank<N>.json (DDP tests)
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.keys: list[str] = []
        self.batches = 0
        self.batch_keys: set[str] = set()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = batch["latents"] if "latents" in batch else batch["pixels"]
        assert x.dim() == 4 and x.shape[0] == len(batch["caption"]) == len(batch["key"])
        self.keys.extend(batch["key"])
        self.batch_keys.update(batch)
        self.batches += 1
        return (self.scale * x.float().mean() - 0.5) ** 2

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log(
            "val/mean",
            batch["pixels"].mean() if "pixels" in batch else batch["latents"].mean(),
            batch_size=len(batch["caption"]),
        )

    def on_train_end(self) -> None:
        if self.record_dir is not None:
            trainer = self.trainer
            record = {
                "keys": self.keys,
                "batches": self.batches,
                "world_size": trainer.world_size,
                "counts": trainer.datamodule.sample_counts(),
                "logged": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("data/")},
            }
            Path(self.record_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def save_tiny_blip2(directory: Path) -> Path:
    """A random tiny BLIP-2 (vision, Q-Former, OPT) + processor with a small word-level tokenizer, saved with
    ``save_pretrained`` so the captioner loads it exactly like a downloaded model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        PreTrainedTokenizerFast,
    )

    words = ["<pad>", "</s>", "<s>", "<unk>", "<image>"] + [
        "a",
        "an",
        "the",
        "photo",
        "picture",
        "of",
        "cat",
        "dog",
        "man",
        "woman",
        "face",
        "smiling",
        "red",
        "blue",
        "green",
        "sky",
        "tree",
        "house",
        "car",
        "on",
        "in",
        "with",
        "and",
        "standing",
        "sitting",
        "small",
        "large",
        "old",
        "young",
        "street",
        "field",
        "table",
        "flower",
        "close",
        "up",
        "view",
    ]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    config = Blip2Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        qformer_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            encoder_hidden_size=32,
            vocab_size=len(tokenizer),
        ),
        text_config=dict(
            model_type="opt",
            vocab_size=len(tokenizer),
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer, num_query_tokens=4
    )
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


DEMO_LAION_FILTERS = dict(min_side=64, min_aesthetic=4.5, max_pwatermark=0.8, max_punsafe=0.5)


def demo_laion(demo_root: Path, **kwargs: Any) -> Any:
    """A small LaionDataModule over the demo shards (32 px, batches of 2, no workers); ``kwargs`` override."""
    from xa_lightning.data import LaionDataModule

    options: dict[str, Any] = dict(
        root=str(demo_root / "laion"),
        resolution=32,
        batch_size=2,
        num_workers=0,
        val_fraction=0.2,
        epoch_samples=16,
        shuffle_buffer=8,
        filters=DEMO_LAION_FILTERS,
    )
    return LaionDataModule(**{**options, **kwargs})


def demo_faces(demo_root: Path, **kwargs: Any) -> Any:
    """A small CelebAMaskHQDataModule over the demo faces (32 px, 16 px references, batches of 4)."""
    from xa_lightning.data import CelebAMaskHQDataModule

    options: dict[str, Any] = dict(
        root=str(demo_root / "celebamask_hq"),
        identity_file="identity_CelebA.txt",
        val_identities=4,
        resolution=32,
        reference_resolution=16,
        batch_size=4,
        num_workers=0,
    )
    return CelebAMaskHQDataModule(**{**options, **kwargs})
