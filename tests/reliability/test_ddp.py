"""Two real ranks (gloo on CPU, forked): a rank whose shards are unreadable borrows the others' and the epoch
ends for both; a mid-epoch resume continues every rank's own data stream and random generators."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from tests.data.helpers import quiet_trainer
from xa_lightning.data import LaionDataModule
from xa_lightning.training import AdapterModule, AtomicCheckpointIO

FILTERS = dict(min_side=64, min_aesthetic=4.5, max_pwatermark=0.8, max_punsafe=0.5)


class NoisyConsumer(AdapterModule):
    """Draws noise from torch's global generator each step (as the methods do) and records, per rank, the
    batch keys and the noise it saw."""

    method = "noisy_consumer_test"

    def __init__(self, record_dir: Path) -> None:
        super().__init__(optimizer=functools.partial(torch.optim.SGD, lr=0.1))
        self.adapter = nn.Linear(1, 1)
        self.record_dir = record_dir
        self.seen: list[tuple[list[str], float]] = []

    def setup(self, stage: str) -> None:
        torch.manual_seed(100 + self.global_rank)  # every rank its own stream, as train.build seeds them

    def compute_loss(self, batch):
        noise = torch.rand(())
        self.seen.append((list(batch["key"]), float(noise)))
        x = (batch["pixels"].mean() + noise).view(1, 1)
        return (self.adapter(x) ** 2).mean(), {}

    def evaluation_samplers(self):
        return {}

    def on_train_end(self) -> None:
        (self.record_dir / f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))


def laion(urls, **kwargs) -> LaionDataModule:
    options = dict(urls=urls, resolution=32, batch_size=2, num_workers=0, seed=0, val_fraction=0.2, shuffle_buffer=4)
    return LaionDataModule(filters=FILTERS, log_counts=False, **{**options, **kwargs})


def test_a_rank_with_unreadable_shards_borrows_and_the_epoch_ends_for_both(demo_root, tmp_path):
    good = tmp_path / "00000.tar"
    shutil.copy(demo_root / "laion" / "00000.tar", good)
    shutil.copy(demo_root / "laion" / "00000.parquet", tmp_path / "00000.parquet")
    bad = tmp_path / "00001.tar"
    bad.write_bytes(b"not a tar file" * 100)
    datamodule = laion([str(good), str(bad)], epoch_samples=8)  # 2 batches per rank and epoch

    ranks = fit(lambda: datamodule, tmp_path / "seen", max_steps=4)

    assert [len(seen) for seen in ranks] == [4, 4]  # two whole epochs on both ranks


def fit(datamodule_factory, record_dir: Path, max_steps: int, save_every=None, ckpt_path=None) -> list[list]:
    record_dir.mkdir()
    callbacks = []
    if save_every:
        callbacks = [
            ModelCheckpoint(dirpath=record_dir / "checkpoints", every_n_train_steps=save_every, save_last=True)
        ]
    trainer = quiet_trainer(
        devices=2,
        strategy="ddp_fork",
        max_steps=max_steps,
        limit_val_batches=0,
        plugins=[AtomicCheckpointIO()],
        callbacks=callbacks,
        enable_checkpointing=bool(save_every),
    )
    trainer.fit(NoisyConsumer(record_dir), datamodule=datamodule_factory(), ckpt_path=ckpt_path)
    return [json.loads((record_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def test_mid_epoch_resume_continues_each_ranks_data_and_generators(demo_root, tmp_path):
    factory = lambda: laion(str(demo_root / "laion" / "{00000..00001}.tar"), epoch_samples=12)  # 3 batches/rank
    straight = fit(factory, tmp_path / "straight", max_steps=5)
    first = fit(factory, tmp_path / "first", max_steps=2, save_every=2)
    resumed = fit(
        factory, tmp_path / "resumed", max_steps=5, ckpt_path=tmp_path / "first" / "checkpoints" / "last.ckpt"
    )

    assert straight[0] != straight[1], "the ranks must see different data and noise"
    for rank in (0, 1):
        assert first[rank] + resumed[rank] == straight[rank], f"rank {rank}"
