"""Map-style datasets over indexed image files (CelebAMask-HQ, OpenImages) and the captions JSONL format.

Captions JSONL: one object per line, ``{"file": "<path relative to the image folder>", "caption": "..."}``
(what ``xa-data caption`` writes). Reading is tolerant: bad lines, missing captions and files that do not
exist are counted and left out; lines that are not UTF-8 are decoded as cp1252 / latin-1 and counted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from xa_lightning.data.counters import SampleCounter, SampleSkipped
from xa_lightning.data.images import DEFAULT_MAX_PIXELS, decode_caption, decode_image
from xa_lightning.data.transforms import Box, ImageViews, reference_tensor, sample_rng
from xa_lightning.errors import UserError


@dataclass
class CaptionLine:
    file: str
    caption: str | None
    converted: list[str] = field(default_factory=list)


def iter_captions_jsonl(path: Path, counter: SampleCounter | None = None) -> Iterator[CaptionLine]:
    """Entries of a captions JSONL file; unparsable lines are counted as ``bad_metadata`` and skipped."""
    with open(path, "rb") as handle:
        for number, raw_line in enumerate(handle, start=1):
            if not raw_line.strip():
                continue
            text, conversions = decode_caption_line(raw_line)
            try:
                entry = json.loads(text)
                file = entry["file"]
                if not isinstance(file, str) or not file:
                    raise KeyError("file")
            except (ValueError, KeyError, TypeError) as exc:
                if counter is not None:
                    counter.add("skipped_bad_metadata", detail=f"{path}:{number}: {type(exc).__name__}: {exc}")
                continue
            caption = entry.get("caption")
            yield CaptionLine(file=file, caption=None if caption is None else str(caption), converted=conversions)


def decode_caption_line(raw_line: bytes) -> tuple[str, list[str]]:
    try:
        return raw_line.decode("utf-8-sig"), []
    except UnicodeDecodeError:
        try:
            return raw_line.decode("cp1252"), ["caption_encoding"]
        except UnicodeDecodeError:
            return raw_line.decode("latin-1"), ["caption_encoding"]


def read_captions(path: Path, image_dir: Path, counter: SampleCounter, key: str) -> dict[str, tuple[Path, str]]:
    """file -> (image path, caption) for entries whose image exists and whose caption is not empty."""
    if not path.is_file():
        raise UserError(
            f"{key}: {path} does not exist; write it with `xa-data caption {image_dir} --out {path}` or set {key}=..."
        )
    out: dict[str, tuple[Path, str]] = {}
    for line in iter_captions_jsonl(path, counter):
        caption, _ = decode_caption(line.caption)
        if caption is None:
            counter.add("skipped_missing_caption", detail=line.file)
            continue
        if not caption:
            counter.add("skipped_empty_caption", detail=line.file)
            continue
        image_path = image_dir / line.file
        if not image_path.is_file():
            counter.add("skipped_missing_file", detail=f"{path} names {image_path}")
            continue
        counter.convert(line.converted, detail=line.file)
        out[line.file] = (image_path, caption)
    return out


@dataclass
class Record:
    """One indexed sample."""

    key: str
    path: Path
    caption: str
    group: str = ""  # identity (faces) / image id: the unit of the split
    boxes: list[tuple[str, Box]] = field(default_factory=list)  # (label, normalised l, t, r, b)


# (record, image, rng or None for eval) -> reference box in pixels, or None for the centre square.
ReferenceBox = Callable[[Record, Any, Any | None], tuple[Box | None, list[str]]]


class RecordDataset(Dataset):
    """Samples from records; a sample that cannot be read is replaced by the next readable one (counted),
    so batches keep their size and every rank keeps the same number of batches."""

    max_attempts = 32

    def __init__(
        self,
        records: list[Record],
        *,
        views: ImageViews,
        counter: SampleCounter,
        seed: int,
        reference_size: int | None,
        reference_box: ReferenceBox | None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        train: bool = True,
    ) -> None:
        self.records = records
        self.views = views
        self.counter = counter
        self.seed = int(seed)
        self.reference_size = reference_size
        self.reference_box = reference_box
        self.max_pixels = int(max_pixels)
        self.train = train

    def __len__(self) -> int:
        return len(self.records)

    def load(
        self, record: Record, views: ImageViews, rng: Any, reference_size: int | None, count: bool = True
    ) -> tuple[dict[str, Any], torch.Tensor | None]:
        image, original_size, conversions = decode_image(
            record.path, max_pixels=self.max_pixels, min_side_hint=views.largest
        )
        sample, view_conversions = views(image, original_size, rng if rng is not None else sample_rng(self.seed))
        reference = None
        if reference_size:
            box, box_conversions = self.reference_box(record, image, rng) if self.reference_box else (None, [])
            reference = reference_tensor(image, reference_size, box)
            conversions = conversions + box_conversions
        if count:
            self.counter.convert(conversions + view_conversions, detail=record.key)
        return sample, reference

    def _finish(self, record: Record, sample: dict[str, Any], reference: torch.Tensor | None) -> dict[str, Any]:
        sample["caption"] = record.caption
        sample["key"] = record.key
        if reference is not None:
            sample["reference"] = reference
        return sample

    def iter_once(self) -> Iterator[dict[str, Any]]:
        """Every readable record once, in order (unreadable ones counted and left out)."""
        for position, record in enumerate(self.records):
            rng = sample_rng(self.seed, 0, position) if self.train else None
            try:
                sample, reference = self.load(record, self.views, rng, self.reference_size)
            except SampleSkipped as exc:
                self.counter.skip(exc)
                continue
            yield self._finish(record, sample, reference)

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, position = divmod(int(index), len(self.records))
        for attempt in range(self.max_attempts):
            record = self.records[(position + attempt) % len(self.records)]
            rng = sample_rng(self.seed, epoch, (position + attempt) % len(self.records)) if self.train else None
            try:
                sample, reference = self.load(record, self.views, rng, self.reference_size)
            except SampleSkipped as exc:
                self.counter.skip(exc)
                continue
            return self._finish(record, sample, reference)
        raise UserError(
            f"data: {self.max_attempts} samples in a row from {self.records[position].path.parent} "
            "could not be read; see the data/skipped_* counts and check the dataset"
        )


def batched(samples: Iterator[dict[str, Any]], batch_size: int) -> Iterator[dict[str, Any]]:
    """Collated batches of ``batch_size`` (the last one may be smaller)."""
    from xa_lightning.data.transforms import collate

    batch: list[dict[str, Any]] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch:
        yield collate(batch)
