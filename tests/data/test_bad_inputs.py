"""Every kind of broken input a real crawl holds: skipped or converted, counted per reason, training goes on,
nothing the user owns is modified."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.data.helpers import (
    Consumer,
    bomb_png,
    encode,
    file_hashes,
    quiet_trainer,
    sixteen_bit_png,
    smooth_image,
    write_shard,
)
from xa_lightning.data import CelebAMaskHQDataModule, LaionDataModule, OpenImagesDataModule
from xa_lightning.errors import UserError

GOOD = 6


def bad_laion(root: Path) -> list[str]:
    """Three shards with every bad case, a truncated shard, a non-tar file and a path that does not exist."""
    root.mkdir(parents=True)
    good_jpeg = lambda i: encode(smooth_image(i), "JPEG", quality=90)
    rgba = Image.new("RGBA", (48, 40), (255, 0, 0, 0))  # fully transparent -> white after compositing
    samples = [{"key": f"good{i}", "jpg": good_jpeg(i), "txt": f"a good picture number {i}"} for i in range(GOOD)]
    samples += [
        {
            "key": "corrupt",
            "jpg": b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(0).integers(0, 255, 900, dtype=np.uint8)),
            "txt": "random bytes",
        },
        {"key": "truncjpg", "jpg": good_jpeg(50)[:400], "txt": "a truncated jpeg"},
        {"key": "truncpng", "png": encode(smooth_image(51), "PNG")[:300], "txt": "a truncated png"},
        {"key": "nocaption", "jpg": good_jpeg(52), "json": {"key": "nocaption", "status": "success"}},
        {"key": "emptycaption", "jpg": good_jpeg(53), "txt": "   \n "},
        {"key": "noimage", "txt": "a caption without an image"},
        {"key": "gray", "jpg": encode(smooth_image(54).convert("L"), "JPEG"), "txt": "a grayscale photo"},
        {
            "key": "cmyk",
            "jpg": encode(Image.new("CMYK", (48, 40), (255, 0, 0, 0)), "JPEG", quality=95),
            "txt": "a cyan cmyk jpeg",
        },
        {"key": "rgba", "png": encode(rgba, "PNG"), "txt": "a transparent png"},
        {"key": "sixteen", "png": sixteen_bit_png(0x8000), "txt": "a 16-bit png"},
        {"key": "small", "jpg": encode(smooth_image(55, (16, 12)), "JPEG"), "txt": "a tiny image"},
        {"key": "bomb", "png": bomb_png(), "txt": "a decompression bomb"},
        {"key": "latin", "jpg": good_jpeg(56), "txt": "caf\xe9 cr\xe8me".encode("cp1252")},
        {"key": "badjson", "jpg": good_jpeg(57), "txt": "broken metadata", "json": b"{not json"},
    ]
    write_shard(root / "00000.tar", samples)
    # a shard cut in the middle of its third sample's image
    whole = write_shard(
        root / "full.tar",
        [{"key": f"tr{i}", "jpg": good_jpeg(60 + i), "txt": f"truncated shard {i}"} for i in range(4)],
    ).read_bytes()
    (root / "full.tar").unlink()
    cut = whole.index(b"tr2.jpg") + 512 + 300  # header of tr2.jpg + 300 bytes of its data
    (root / "00001.tar").write_bytes(whole[:cut])
    (root / "00002.tar").write_bytes(b"this is not a tar file at all" * 40)
    return [str(root / "00000.tar"), str(root / "00001.tar"), str(root / "00002.tar"), str(root / "00003.tar")]


def laion(urls, **kwargs):
    options = dict(
        urls=urls,
        resolution=32,
        batch_size=2,
        num_workers=0,
        val_fraction=0.0,
        filters={},
        shuffle_buffer=1,
        log_counts=False,
    )
    options.update(kwargs)
    datamodule = LaionDataModule(**options)
    datamodule.setup()
    return datamodule


def test_laion_bad_inputs_are_skipped_or_converted_and_counted(tmp_path):
    urls = bad_laion(tmp_path / "crawl")
    datamodule = laion(urls)
    samples = {k: (b, i) for b in datamodule.iter_cache_batches("train", 1) for i, k in enumerate(b["key"])}
    counts = datamodule.sample_counts()
    assert counts == {
        "skipped_corrupt_image": 3,
        "skipped_missing_caption": 1,
        "skipped_empty_caption": 1,
        "skipped_missing_image": 1,
        "skipped_too_large": 1,
        "skipped_bad_metadata": 1,
        "skipped_truncated_shard": 1,
        "skipped_unreadable_shard": 2,
        "converted_grayscale": 2,
        "converted_cmyk": 1,
        "converted_alpha": 1,
        "converted_16bit": 1,
        "converted_upscaled": 1,
        "converted_caption_encoding": 1,
    }, counts
    good = {f"good{i}" for i in range(GOOD)} | {"gray", "cmyk", "rgba", "sixteen", "small", "latin", "tr0", "tr1"}
    assert set(samples) == good
    pixel = lambda key: samples[key][0]["pixels"][samples[key][1]]
    assert all(pixel(k).shape == (3, 32, 32) for k in good)
    assert pixel("rgba").min() > 0.99  # transparent -> white
    cyan = pixel("cmyk").mean(dim=(1, 2))
    assert cyan[0] < -0.8 and cyan[1] > 0.8 and cyan[2] > 0.8  # CMYK (255,0,0,0) is cyan
    assert pixel("sixteen").abs().max() < 0.02  # 0x8000 of 0xffff -> mid grey
    gray = pixel("gray")
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    latin = samples["latin"][0]["caption"][samples["latin"][1]]
    assert latin == "café crème"


def test_guards_are_configurable(tmp_path):
    urls = bad_laion(tmp_path / "crawl")[:1]
    strict = laion(urls, upscale_small=False)
    keys = [k for b in strict.iter_cache_batches("train", 4) for k in b["key"]]
    assert "small" not in keys and strict.sample_counts()["skipped_too_small"] == 1
    tight = laion(urls, max_pixels=1000)  # every 48x40 image is now "too large"
    keys = [k for b in tight.iter_cache_batches("train", 4) for k in b["key"]]
    assert keys == ["small"] and tight.sample_counts()["skipped_too_large"] == GOOD + 7


def test_training_goes_on_logs_counts_and_modifies_nothing(tmp_path):
    urls = bad_laion(tmp_path / "crawl")
    before = file_hashes(tmp_path / "crawl")
    datamodule = LaionDataModule(
        urls=urls,
        resolution=32,
        batch_size=2,
        num_workers=0,
        val_fraction=0.0,
        filters={},
        shuffle_buffer=4,
        epoch_samples=12,
    )
    model = Consumer()
    trainer = quiet_trainer(max_epochs=2, log_every_n_steps=1, limit_val_batches=0)
    trainer.fit(model, datamodule=datamodule)
    assert model.batches == 12 and trainer.global_step == 12
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("data/")}
    assert logged["data/skipped_corrupt_image"] >= 3 and logged["data/skipped_unreadable_shard"] >= 2
    assert logged["data/converted_alpha"] >= 1
    assert file_hashes(tmp_path / "crawl") == before


def test_map_style_bad_inputs(tmp_path):
    root = tmp_path / "celeba"
    images = root / "CelebA-HQ-img"
    images.mkdir(parents=True)
    for i in range(6):
        smooth_image(i, (64, 64)).save(images / f"{i}.jpg")
    (images / "6.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")  # corrupt
    Image.new("CMYK", (64, 64), (0, 0, 0, 0)).save(images / "7.jpg")  # converted
    lines = [json.dumps({"file": f"{i}.jpg", "caption": f"a face {i}"}).encode() for i in range(6)]
    lines += [
        json.dumps({"file": "6.jpg", "caption": "broken"}).encode(),
        '{"file": "7.jpg", "caption": "caf\xe9"}'.encode("cp1252"),  # not UTF-8
        json.dumps({"file": "99.jpg", "caption": "names a missing image"}).encode(),
        json.dumps({"file": "8.jpg", "caption": ""}).encode(),
        json.dumps({"file": "9.jpg"}).encode(),
        b"{this is not json",
    ]
    (root / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    before = file_hashes(root)
    datamodule = CelebAMaskHQDataModule(
        root=str(root),
        val_identities=1,
        resolution=32,
        reference_resolution=16,
        batch_size=3,
        val_batch_size=1,
        num_workers=0,
        log_counts=False,
        seed=1,
    )
    datamodule.setup()
    assert "6.jpg" in {r.key for r in datamodule.train_records}  # seed 1 keeps the broken image in training
    assert datamodule.sample_counts() == {
        "skipped_missing_file": 1,
        "skipped_empty_caption": 1,
        "skipped_missing_caption": 1,
        "skipped_bad_metadata": 1,
        "converted_caption_encoding": 1,
    }
    batches = [b for _ in range(2) for b in datamodule.train_dataloader()]
    assert all(len(b["key"]) == 3 for b in batches)  # a broken image is replaced
    assert "6.jpg" not in {k for b in batches for k in b["key"]}
    counts = datamodule.sample_counts()
    assert counts["skipped_corrupt_image"] >= 1 and counts["converted_cmyk"] >= 1
    captions = {r.key: r.caption for r in datamodule.train_records + datamodule.val_records}
    assert captions["7.jpg"] == "café"
    # a validation split whose only image is broken cannot be filled: one clear error, no endless retry
    only_broken = CelebAMaskHQDataModule(
        root=str(root),
        val_identities=1,
        resolution=32,
        reference_resolution=16,
        batch_size=3,
        val_batch_size=1,
        num_workers=0,
        log_counts=False,
        seed=0,
    )
    only_broken.setup()
    assert [r.key for r in only_broken.val_records] == ["6.jpg"]
    with pytest.raises(UserError, match="could not be read"):
        list(only_broken.val_dataloader())
    assert file_hashes(root) == before


def test_missing_roots_name_the_key_and_path(tmp_path):
    missing = tmp_path / "not-here"
    for cls in (LaionDataModule, CelebAMaskHQDataModule, OpenImagesDataModule):
        with pytest.raises(UserError) as info:
            cls(root=str(missing)).setup()
        message = str(info.value)
        assert message.startswith(f"data.root: {missing} does not exist") and "\n" not in message
        assert not missing.exists()
