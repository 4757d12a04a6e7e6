"""Per-reason counts of skipped and converted samples, shared by DataLoader worker processes.

Real crawls contain broken files. A broken sample is skipped (or converted, e.g. CMYK -> RGB), counted
under a fixed reason name and logged once per reason, and training goes on. The counts live in a
shared-memory tensor with one row per process slot (row 0: the process that owns the DataLoader, row
``1 + worker_id``: a worker), so workers never write the same cell and no lock is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch

log = logging.getLogger("xa_lightning.data")

# Fixed order: the index of a name is its column in the shared tensor.
SKIP_REASONS: tuple[str, ...] = (
    "corrupt_image",  # not decodable / truncated image bytes
    "too_large",  # more pixels than data.max_pixels (decompression-bomb guard)
    "too_small",  # smaller than the training size and data.upscale_small=false
    "missing_image",  # a sample (tar group / index row) without image bytes
    "missing_caption",  # no caption at all
    "empty_caption",  # caption is empty or whitespace
    "missing_file",  # a captions / index file names an image that does not exist
    "truncated_shard",  # a tar shard ends in the middle of a member
    "unreadable_shard",  # a shard that cannot be opened or is not a tar file
    "bad_metadata",  # unparsable json / parquet row
    "filter_min_side",  # metadata filters (LAION)
    "filter_aesthetic",
    "filter_watermark",
    "filter_unsafe",
)
CONVERT_REASONS: tuple[str, ...] = (
    "grayscale",  # L / 1 / LA images -> RGB
    "cmyk",  # CMYK / YCbCr / LAB / HSV -> RGB
    "alpha",  # RGBA / LA / transparent palette: composited on white
    "palette",  # P -> RGB
    "16bit",  # 16-bit (or 32-bit int / float) samples scaled to 8 bit
    "upscaled",  # smaller than the training size, upscaled (data.upscale_small=true)
    "caption_encoding",  # caption bytes were not UTF-8 (decoded as cp1252 / latin-1)
    "no_object_box",  # object reference requested but the image has no usable box: whole image
    "no_face_mask",  # face-crop reference requested but no mask: centre crop
)
COUNTER_NAMES: tuple[str, ...] = tuple(f"skipped_{r}" for r in SKIP_REASONS) + tuple(
    f"converted_{r}" for r in CONVERT_REASONS
)
_INDEX = {name: i for i, name in enumerate(COUNTER_NAMES)}


class SampleSkipped(Exception):
    """Raised inside the data pipeline for a sample that must be skipped; ``reason`` is a SKIP_REASONS name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _current_slot() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else 1 + info.id


class SampleCounter:
    """Counts skipped / converted samples per reason across DataLoader worker processes.

    Create it in the process that builds the DataLoader with ``slots >= num_workers + 1``; the tensor is
    in shared memory, so increments made in (forked or spawned) workers are visible to its creator.
    """

    def __init__(self, slots: int = 1) -> None:
        self.slots = max(1, int(slots))
        self._counts = torch.zeros(self.slots, len(COUNTER_NAMES), dtype=torch.int64).share_memory_()
        self._warned: set[str] = set()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_warned"] = set()  # each process warns once per reason itself
        return state

    def add(self, name: str, n: int = 1, detail: str = "") -> None:
        """Count ``n`` events of ``name`` (e.g. ``skipped_corrupt_image``); the first one per process is logged."""
        column = _INDEX[name]
        self._counts[_current_slot() % self.slots, column] += n
        if name not in self._warned:
            self._warned.add(name)
            log.warning(
                "data: %s%s (further ones are only counted; see data/%s)",
                name.replace("_", " ", 1),
                f" ({detail})" if detail else "",
                name,
            )
        elif detail:
            log.debug("data: %s (%s)", name, detail)

    def skip(self, exc: SampleSkipped) -> None:
        self.add(f"skipped_{exc.reason}", detail=exc.detail)

    def convert(self, reasons: Iterable[str], detail: str = "") -> None:
        for reason in reasons:
            self.add(f"converted_{reason}", detail=detail)

    def tensor(self) -> torch.Tensor:
        """Totals over all slots, one entry per COUNTER_NAMES name."""
        return self._counts.sum(dim=0)

    def totals(self) -> dict[str, int]:
        """Non-zero totals by name."""
        return {name: int(v) for name, v in zip(COUNTER_NAMES, self.tensor().tolist()) if v}

    def reset(self) -> None:
        self._counts.zero_()

    def snapshot(self) -> tuple[int, torch.Tensor]:
        """(row, that row's counts) of the calling process: what a batch carries so that the counts of
        the batches training has consumed are known in the main process (resume)."""
        row = _current_slot() % self.slots
        return row, self._counts[row].clone()

    def rows(self) -> torch.Tensor:
        """A copy of every process row."""
        return self._counts.clone()

    def restore(self, totals: torch.Tensor) -> None:
        """Continue from ``totals`` (a checkpoint's counts): they go into the owner's row, the others restart."""
        self._counts.zero_()
        self._counts[0] = torch.as_tensor(totals, dtype=torch.int64)


def as_dict(counts: torch.Tensor) -> dict[str, int]:
    """A totals tensor (as from :meth:`SampleCounter.tensor`) as ``{name: count}`` without zeros."""
    return {name: int(v) for name, v in zip(COUNTER_NAMES, counts.tolist()) if v}


def merge(*mappings: Mapping[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for mapping in mappings:
        for key, value in mapping.items():
            out[key] = out.get(key, 0) + int(value)
    return {k: v for k, v in out.items() if v}
