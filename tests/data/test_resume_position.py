"""The training loaders' position (``state_dict`` / ``load_state_dict``) without a trainer: a loader built
afresh and given the state of one that stopped after k batches yields exactly the rest of that epoch, and
then the same next epoch, for the LAION stream (with and without workers) and the map-style datasets."""

from __future__ import annotations

import itertools
import logging

import pytest

from tests.data.helpers import demo_faces, demo_laion
from xa_lightning.data import CelebAMaskHQDataModule, LaionDataModule


def laion(demo_root, **kwargs) -> LaionDataModule:
    datamodule = demo_laion(demo_root, **{"log_counts": False, **kwargs})
    datamodule.setup()
    return datamodule


def faces(demo_root, **kwargs) -> CelebAMaskHQDataModule:
    datamodule = demo_faces(demo_root, **{"log_counts": False, **kwargs})
    datamodule.setup()
    return datamodule


def keys(batches) -> list[list[str]]:
    return [list(batch["key"]) for batch in batches]


@pytest.mark.parametrize(
    "make,kwargs",
    [(laion, {}), (laion, {"num_workers": 2}), (faces, {})],
    ids=["laion", "laion-2-workers", "map-style"],
)
def test_a_fresh_loader_given_the_state_continues_the_epoch(demo_root, make, kwargs):
    reference = make(demo_root, **kwargs).train_dataloader()
    epoch0, epoch1 = keys(reference), keys(reference)
    assert len(epoch0) >= 6 and epoch0 != epoch1

    stopped = make(demo_root, **kwargs).train_dataloader()
    assert keys(itertools.islice(iter(stopped), 3)) == epoch0[:3]
    state = stopped.state_dict()

    resumed = make(demo_root, **kwargs)
    loader = resumed.train_dataloader()
    loader.load_state_dict(state)
    assert keys(loader) == epoch0[3:]
    assert keys(loader) == epoch1


def test_a_stream_read_by_other_workers_restarts_its_epoch_with_a_warning(demo_root, caplog):
    stopped = laion(demo_root).train_dataloader()
    epoch0 = keys(laion(demo_root).train_dataloader())
    next(iter(stopped))
    state = stopped.state_dict()

    loader = laion(demo_root, num_workers=2).train_dataloader()
    loader.load_state_dict(state)
    with caplog.at_level(logging.WARNING, logger="xa_lightning.data"):
        resumed = keys(loader)
    assert "restarts from its beginning" in caplog.text
    assert len(resumed) == len(epoch0)
