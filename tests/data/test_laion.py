"""LaionDataModule on the demo shards: views, micro-conditioning, filters, hold-out, placement, determinism."""

from __future__ import annotations

import io
import tarfile

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from xa_lightning.data import LaionDataModule
from xa_lightning.data.laion import holdout_value
from xa_lightning.errors import UserError

FILTERS = dict(min_side=64, min_aesthetic=4.5, max_pwatermark=0.8, max_punsafe=0.5)


def make(demo_root, **kwargs):
    options = dict(
        root=str(demo_root / "laion"),
        resolution=32,
        batch_size=4,
        num_workers=0,
        seed=0,
        val_fraction=0.2,
        filters=FILTERS,
        shuffle_buffer=8,
        log_counts=False,
    )
    options.update(kwargs)
    datamodule = LaionDataModule(**options)
    datamodule.setup()
    return datamodule


def tar_contents(demo_root):
    out = {}
    for shard in sorted((demo_root / "laion").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".")
                out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def parquet_rows(demo_root):
    rows = {}
    for path in sorted((demo_root / "laion").glob("*.parquet")):
        rows.update({r["key"]: r for r in pq.read_table(path).to_pylist() if r["status"] == "success"})
    return rows


def test_batch_has_same_crop_at_two_resolutions_and_micro_conditioning(demo_root):
    datamodule = make(demo_root, extra_resolutions=[64], resolution=32)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["pixels"].shape == (4, 3, 32, 32) and batch["pixels_64"].shape == (4, 3, 64, 64)
    assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1 and batch["pixels"].std() > 0.1
    # the 64 px view is the same crop: pooled to 32 px it matches the 32 px view
    assert (F.avg_pool2d(batch["pixels_64"], 2) - batch["pixels"]).abs().mean() < 0.04
    assert (batch["crop_top_left_64"] - 2 * batch["crop_top_left"]).abs().max() <= 1
    assert batch["target_size"].tolist() == [[32, 32]] * 4 and batch["target_size_64"].tolist() == [[64, 64]] * 4
    files = tar_contents(demo_root)
    for i, key in enumerate(batch["key"]):
        stored = Image.open(io.BytesIO(files[key]["jpg"]))
        assert batch["original_size"][i].tolist() == [stored.height, stored.width]
        assert batch["caption"][i] == files[key]["txt"].decode()
        # the crop lies inside the image resized so that its short side is 64
        scale = 64 / min(stored.size)
        top, left = batch["crop_top_left_64"][i].tolist()
        assert 0 <= top <= round(stored.height * scale) - 64 and 0 <= left <= round(stored.width * scale) - 64


def test_filters_holdout_and_counts(demo_root):
    datamodule = make(demo_root, epoch_samples=16)
    seen = [k for batch in datamodule.train_dataloader() for k in batch["key"]]
    rows = parquet_rows(demo_root)
    failing = {
        k
        for k, r in rows.items()
        if r["aesthetic"] < 4.5
        or r["pwatermark"] > 0.8
        or r["punsafe"] > 0.5
        or min(r["original_width"], r["original_height"]) < 64
    }
    held_out = {k for k in rows if holdout_value(k) < 0.2}
    assert len(seen) == 16 and len(set(seen)) == 16
    assert not (set(seen) & failing) and not (set(seen) & held_out)
    # one pass over the training split counts each filtered row once, under its first failing filter
    single_pass = make(demo_root)
    passed = [k for b in single_pass.iter_cache_batches("train", 4) for k in b["key"]]
    expected: dict[str, int] = {}
    for key, r in rows.items():
        if key in held_out:
            continue
        for reason, fails in (
            ("aesthetic", r["aesthetic"] < 4.5),
            ("watermark", r["pwatermark"] > 0.8),
            ("unsafe", r["punsafe"] > 0.5),
            ("min_side", min(r["original_width"], r["original_height"]) < 64),
        ):
            if fails:
                expected[f"skipped_filter_{reason}"] = expected.get(f"skipped_filter_{reason}", 0) + 1
                break
    assert single_pass.sample_counts() == expected and len(expected) == 4
    assert sorted(passed) == sorted(set(rows) - failing - held_out)
    # the epoch length defaults to the filtered training rows of the parquet files
    assert make(demo_root).epoch_length() == len(set(rows) - failing - held_out)
    val_prompts = make(demo_root).eval_prompts(len(held_out - failing))
    assert set(val_prompts) <= {rows[k]["caption"] for k in held_out - failing}


def test_same_seed_same_stream_new_epoch_new_order(demo_root):
    def epoch(datamodule, loader):
        return [(k, b["pixels"][i].sum().item()) for b in loader for i, k in enumerate(b["key"])]

    first, second = make(demo_root, epoch_samples=16), make(demo_root, epoch_samples=16)
    loader = first.train_dataloader()
    epoch0 = epoch(first, loader)
    assert epoch0 == epoch(second, second.train_dataloader())
    epoch1 = epoch(first, loader)  # the loader moves on to epoch 1 by itself without a trainer
    assert [k for k, _ in epoch1] != [k for k, _ in epoch0]
    other_seed = epoch(
        make(demo_root, epoch_samples=16, seed=1), make(demo_root, epoch_samples=16, seed=1).train_dataloader()
    )
    assert [k for k, _ in other_seed] != [k for k, _ in epoch0]


def test_ranks_and_workers_get_disjoint_samples_and_equal_batches(demo_root):
    per_rank = {}
    for rank in (0, 1):
        datamodule = make(demo_root, epoch_samples=16, batch_size=2)
        datamodule.placement = lambda rank=rank: (rank, 2)  # what a 2-process trainer reports
        batches = list(datamodule.train_dataloader())
        per_rank[rank] = [k for b in batches for k in b["key"]]
        assert len(batches) == 4  # 16 samples / (2 ranks x batch 2)
    assert not set(per_rank[0]) & set(per_rank[1])
    # two worker processes on one rank: still exactly the epoch's batches, no sample twice
    datamodule = make(demo_root, epoch_samples=16, batch_size=2, num_workers=2)
    keys = [k for b in datamodule.train_dataloader() for k in b["key"]]
    assert len(keys) == 16 and len(set(keys)) == 16


def test_url_forms_and_missing_data(demo_root, tmp_path):
    root = demo_root / "laion"
    brace = make(demo_root, root=None, urls=f"{root}/{{00000..00001}}.tar", epoch_samples=8)
    listed = make(demo_root, root=None, urls=[str(root / "00000.tar"), str(root / "00001.tar")], epoch_samples=8)
    assert [b["key"] for b in brace.train_dataloader()] == [b["key"] for b in listed.train_dataloader()]
    with pytest.raises(UserError, match=r"data\.urls: .*nowhere/00000\.tar does not exist"):
        LaionDataModule(urls=f"{tmp_path}/nowhere/{{00000..00003}}.tar").setup()
    with pytest.raises(UserError, match=r"data\.root: .*missing does not exist; set data\.root=\.\.\. or run xa-data"):
        LaionDataModule(root=str(tmp_path / "missing")).prepare_data()
    remote = LaionDataModule(urls="http://example.invalid/{00000..00001}.tar")
    remote.setup()  # remote shards cannot be checked or counted up front
    with pytest.raises(UserError, match=r"data\.epoch_samples is not set"):
        remote.epoch_length()


def test_eval_helpers(demo_root):
    datamodule = make(demo_root)
    available = len(datamodule._eval_items(100))
    prompts = datamodule.eval_prompts(available + 3)
    assert len(prompts) == available + 3 and prompts[available:] == prompts[:3]
    images = datamodule.real_images(available + 3, resolution=48)
    assert images.dtype == torch.uint8 and images.shape == (available, 3, 48, 48)
    assert datamodule.eval_references(2) is None
