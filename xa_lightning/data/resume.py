"""Training loaders whose position Lightning saves in a checkpoint and restores (mid-epoch, per rank).

Lightning calls ``state_dict()`` on the training loader while it writes a checkpoint and
``load_state_dict()`` before it iterates the loader again on resume. The position saved is the one after
the batches the training loop has *taken* (``batch_progress.current.ready``), not after the ones it has
prefetched, and it includes the skip / conversion counts of exactly those batches: every batch carries
its producer's position and counter row under :data:`STATE_KEY`, which the loader removes before
Lightning sees the batch.

* Map-style data (:class:`ResumableMapLoader`): the epoch's index order of this rank and the number of
  batches taken; a resumed epoch serves the rest of the saved order.
* Streams (:class:`ResumableStreamLoader`, LAION): per (rank, worker) slot the position of its shard
  stream (see ``xa_lightning.data.laion.SlotStream``); a resumed epoch continues every slot where it was
  and rotates the workers so that batches arrive in the same round-robin order as without the stop.

Worker seeds come from a generator seeded by (seed, epoch), so creating an iterator never draws from
torch's global generator (which the checkpoint restores for the training step itself).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from xa_lightning.data.counters import SampleCounter
from xa_lightning.data.transforms import collate
from xa_lightning.runtime import gather_per_rank, own_part

STATE_KEY = "__xa_state__"  # a batch's producer position + counts; removed by the loader

log = logging.getLogger("xa_lightning.data")


def collate_with_counts(counter: SampleCounter) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """``collate`` whose batches also carry the producing process's counter row (map-style training)."""
    return _CollateWithCounts(counter)


class _CollateWithCounts:
    def __init__(self, counter: SampleCounter) -> None:
        self.counter = counter

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(samples)
        row, counts = self.counter.snapshot()
        batch[STATE_KEY] = {"row": row, "counts": counts}
        return batch


class ResumableLoader(DataLoader):
    """Base of the two training loaders: epochs, the batches taken, counts, ``state_dict`` / ``load_state_dict``.

    ``epoch_fn()``: the trainer's epoch (None without a trainer: the loader counts its own passes).
    ``taken_fn()``: batches the training loop has taken in the current epoch (None without a trainer:
    every batch yielded counts as taken).
    """

    def __init__(
        self,
        dataset: Any,
        *,
        counter: SampleCounter,
        seed: int,
        epoch_fn: Callable[[], int | None],
        taken_fn: Callable[[], int | None],
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("generator", torch.Generator())  # reseeded per epoch in __iter__
        super().__init__(dataset, **kwargs)
        self.counter = counter
        self.seed = int(seed)
        self.epoch_fn = epoch_fn
        self.taken_fn = taken_fn
        self._passes = 0
        self._epoch: int | None = None
        self._start = 0  # batches of the epoch taken before this iterator (a resume)
        self._served: list[Mapping[str, Any] | None] = []
        self._start_rows = counter.rows()
        self._resume: dict[str, Any] | None = None

    # ---------------------------------------------------------------- what subclasses provide
    def _epoch_batches(self) -> int | None:
        raise NotImplementedError

    def _begin(self, epoch: int, start: int, resume: Mapping[str, Any] | None) -> None:
        """Point sampler / dataset at ``epoch``, continuing after ``start`` batches from ``resume``."""
        raise NotImplementedError

    def _position(self, taken: list[Mapping[str, Any] | None]) -> dict[str, Any]:
        raise NotImplementedError

    # ---------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        resume, self._resume = self._resume, None
        if resume is not None:
            epoch, start = int(resume["epoch"]), int(resume["taken"])
        else:
            trainer_epoch = self.epoch_fn()
            epoch, start = (self._passes if trainer_epoch is None else trainer_epoch), 0
        total = self._epoch_batches()
        if total is not None and start >= total:  # saved at the end of an epoch: the next one, from its start
            epoch, start, resume = epoch + 1, 0, None
        self._passes = epoch + 1
        self._begin(epoch, start, resume)
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)
        self._epoch, self._start, self._served = epoch, start, []
        self._start_rows = self.counter.rows()
        return self._track(super().__iter__())

    def _track(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            info = batch.pop(STATE_KEY, None) if isinstance(batch, dict) else None
            self._served.append(info)
            yield batch

    # ---------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """This position on every rank (a collective under DDP, like the checkpoint that calls it)."""
        state: dict[str, Any] = {}
        if self._epoch is not None:
            taken_now = self.taken_fn()
            taken = self._start + len(self._served) if taken_now is None else int(taken_now)
            batches = self._served[: max(0, taken - self._start)]
            rows = self._start_rows.clone()
            for info in batches:
                if info is not None:
                    rows[int(info["row"])] = info["counts"]
            state = {"epoch": self._epoch, "taken": taken, "counts": rows.sum(dim=0), **self._position(batches)}
        return gather_per_rank(state)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        state = own_part(state_dict, "the training data position")
        if not state:
            return
        self._resume = dict(state)
        self.counter.restore(state["counts"])


class ResumableMapLoader(ResumableLoader):
    """Map-style training data through an :class:`~xa_lightning.data.base.EpochIndexSampler`."""

    def _epoch_batches(self) -> int:
        return len(self)

    def _begin(self, epoch: int, start: int, resume: Mapping[str, Any] | None) -> None:
        self.sampler.set_epoch(epoch)
        if resume is None:
            self._order, first = self.sampler.epoch_indices(), 0
        else:  # the samples taken, whatever the batch size was then
            self._order, first = [int(i) for i in resume["order"]], int(resume["samples_taken"])
        self.sampler.serve(self._order, first)

    def _position(self, taken: list[Mapping[str, Any] | None]) -> dict[str, Any]:
        samples = self.sampler.served_before + len(taken) * int(self.batch_size)
        return {"order": torch.tensor(self._order, dtype=torch.int64), "samples_taken": samples}


class ResumableStreamLoader(ResumableLoader):
    """An IterableDataset that yields whole batches, one shard stream per (rank, worker) slot (LAION)."""

    def _epoch_batches(self) -> int | None:
        return self.dataset.batches_per_rank

    def _layout(self) -> list[int]:
        """What a slot's position is relative to: the slots' batches depend on workers and batch size."""
        return [max(1, self.num_workers), int(self.dataset.batch_size)]

    def _begin(self, epoch: int, start: int, resume: Mapping[str, Any] | None) -> None:
        self.dataset.set_epoch(epoch)
        self._slots: dict[int, Any] = {}
        if resume is not None and start and list(resume["layout"]) != self._layout():
            log.warning(
                "data: the checkpoint's stream was read by %d worker(s) in batches of %d, this run uses %d and "
                "%d: epoch %d restarts from its beginning",
                *resume["layout"],
                *self._layout(),
                epoch,
            )
        elif resume is not None and start:
            self._slots = {int(slot): position for slot, position in dict(resume["slots"]).items()}
            self.dataset.continue_from(epoch, self._slots, rotation=start % self._layout()[0])
            return
        self.dataset.continue_from(epoch, {}, rotation=0)

    def _position(self, taken: list[Mapping[str, Any] | None]) -> dict[str, Any]:
        slots = dict(self._slots)
        for info in taken:
            if info is not None:
                slots[int(info["slot"])] = info["position"]
        return {"slots": slots, "layout": self._layout()}
