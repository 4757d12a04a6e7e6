"""LAION subsets as img2dataset writes them: WebDataset tar shards (KEY.jpg, KEY.txt, KEY.json) + parquet.

Reading goes through webdataset's own tar iteration (``gopen``, ``tar_file_iterator``,
``group_by_keys``), so local paths, ``file:``, ``pipe:`` and ``http(s)://`` shard URLs work.

DDP / worker placement. Every (rank, worker) pair is one *slot*. Each epoch the shard list is permuted
with a generator seeded by (seed, epoch) — the same permutation on every rank — and slot ``s`` reads
shards ``s, s + n_slots, ...`` of it, re-reading its own shards (in a new order) if it needs more
samples before the epoch ends. So within an epoch ranks never read the same shard, every rank yields
exactly the same number of full batches (``epoch_samples / (world_size * batch_size)``), and the stream
is a function of the seed (and of world size and worker count). With fewer shards than slots, every
slot reads all shards and keeps every ``n_slots``-th sample. A slot whose own shards give no usable
sample in a pass reads every shard of the epoch instead (:class:`SlotStream`), so one unreadable shard
never stops a rank while the others wait for it.

Resume. A slot's stream position is small — pass, shard and sample reached, the shuffle buffer's
(shard, sample) addresses and generator state — and a checkpoint holds it for every slot
(``xa_lightning.data.resume``): a resumed epoch re-reads the buffered samples and continues.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import logging
import os
import random
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from xa_lightning.data.base import EvalItem, ImageTextDataModule, per_rank_batches, plain
from xa_lightning.data.counters import SampleCounter, SampleSkipped
from xa_lightning.data.images import DEFAULT_MAX_PIXELS, decode_image, require_caption
from xa_lightning.data.resume import STATE_KEY
from xa_lightning.data.transforms import ImageViews, collate, sample_rng
from xa_lightning.errors import UserError

log = logging.getLogger("xa_lightning.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
REMOTE_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://", "ais://", "hf://")

# Column names used by LAION / img2dataset metadata for each filter (first match wins).
METADATA_ALIASES: dict[str, tuple[str, ...]] = {
    "aesthetic": ("aesthetic", "AESTHETIC_SCORE", "aesthetic_score"),
    "pwatermark": ("pwatermark", "PWATERMARK", "watermark_probability"),
    "punsafe": ("punsafe", "PUNSAFE", "nsfw_probability"),
    "width": ("original_width", "WIDTH", "width"),
    "height": ("original_height", "HEIGHT", "height"),
}
PARQUET_COLUMNS = ("key", "status", "caption") + tuple(itertools.chain(*METADATA_ALIASES.values()))


def _first(meta: Mapping[str, Any], field_name: str) -> Any:
    for alias in METADATA_ALIASES[field_name]:
        value = meta.get(alias)
        if value is not None:
            return value
    return None


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if number != number else number  # NaN -> None


@dataclass
class LaionFilters:
    """Metadata filters. LAION-Aesthetics 6+ is ``min_aesthetic: 6``; a sample missing a field that a
    filter needs fails that filter (it cannot be shown to pass)."""

    min_side: int | None = None  # original min(width, height) >= min_side
    min_aesthetic: float | None = None  # aesthetic score >= min_aesthetic
    max_pwatermark: float | None = None  # watermark probability <= max_pwatermark
    max_punsafe: float | None = None  # NSFW probability <= max_punsafe

    @classmethod
    def from_any(cls, value: Any) -> LaionFilters:
        value = plain(value) or {}
        if isinstance(value, LaionFilters):
            return value
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise UserError(
                f"data.filters.{unknown[0]} is not a LAION filter; known: {', '.join(cls.__dataclass_fields__)}"
            )
        return cls(**value)

    def check(self, meta: Mapping[str, Any]) -> bool:
        """Raise SampleSkipped(filter_*) if the metadata fails a filter. Returns whether the metadata had
        the original size (if not, ``check_decoded`` applies ``min_side`` to the stored image)."""
        if self.min_aesthetic is not None:
            score = _number(_first(meta, "aesthetic"))
            if score is None or score < self.min_aesthetic:
                raise SampleSkipped("filter_aesthetic", f"aesthetic={score}")
        if self.max_pwatermark is not None:
            p = _number(_first(meta, "pwatermark"))
            if p is None or p > self.max_pwatermark:
                raise SampleSkipped("filter_watermark", f"pwatermark={p}")
        if self.max_punsafe is not None:
            p = _number(_first(meta, "punsafe"))
            if p is None or p > self.max_punsafe:
                raise SampleSkipped("filter_unsafe", f"punsafe={p}")
        width, height = _number(_first(meta, "width")), _number(_first(meta, "height"))
        if width is None or height is None:
            return False
        if self.min_side is not None and min(width, height) < self.min_side:
            raise SampleSkipped("filter_min_side", f"{int(width)}x{int(height)}")
        return True

    def check_decoded(self, original_size: tuple[int, int]) -> None:
        if self.min_side is not None and min(original_size) < self.min_side:
            raise SampleSkipped("filter_min_side", f"{original_size[1]}x{original_size[0]}")


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


def expand_urls(urls: Any, key: str = "data.urls") -> list[str]:
    """A brace pattern (``/d/{00000..00099}.tar``), a glob, a ``::``-separated string or a list of those."""
    import braceexpand

    value = plain(urls)
    items = [value] if isinstance(value, str) else list(value or [])
    out: list[str] = []
    for item in items:
        for part in str(item).split("::"):
            for expanded in braceexpand.braceexpand(part.strip()):
                if not expanded:
                    continue
                if not is_remote(expanded) and any(c in expanded for c in "*?["):
                    matches = sorted(glob.glob(os.path.expanduser(expanded)))
                    if not matches:
                        raise UserError(f"{key}: no file matches {expanded!r}; fix the pattern")
                    out.extend(matches)
                else:
                    out.append(expanded if is_remote(expanded) else os.path.expanduser(expanded))
    return out


def parquet_beside(url: str) -> Path | None:
    if is_remote(url):
        return None
    path = Path(url[5:] if url.startswith("file:") else url)
    candidate = path.with_suffix(".parquet")
    return candidate if candidate.is_file() else None


def read_parquet_metadata(path: Path) -> dict[str, dict[str, Any]]:
    """key -> row (the metadata columns we use), successful downloads only."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    columns = [c for c in PARQUET_COLUMNS if c in schema.names]
    if "key" not in columns:
        return {}
    table = pq.read_table(path, columns=columns)
    rows = table.to_pylist()
    return {str(r["key"]): r for r in rows if r.get("status", "success") in (None, "success")}


def holdout_value(key: str) -> float:
    """A stable number in [0, 1) per sample key (same on every machine, rank and run)."""
    return zlib.crc32(key.encode("utf-8")) / 2**32


@dataclass
class ShardReader:
    """Raw samples (dicts of bytes per extension, ``__key__``, ``__url__``) from shard URLs, counting
    unreadable and truncated shards instead of stopping."""

    counter: SampleCounter
    use_parquet: bool = True
    parquet_cache: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def parquet_rows(self, url: str) -> dict[str, dict[str, Any]]:
        if url not in self.parquet_cache:
            rows: dict[str, dict[str, Any]] = {}
            path = parquet_beside(url)
            if path is not None:
                try:
                    rows = read_parquet_metadata(path)
                except Exception as exc:  # a damaged parquet: the json inside the tar still counts
                    self.counter.add("skipped_bad_metadata", detail=f"{path}: {exc}")
            if len(self.parquet_cache) > 64:
                self.parquet_cache.clear()
            self.parquet_cache[url] = rows
        return self.parquet_cache[url]

    def files(self, url: str) -> Iterator[dict[str, Any]]:
        from webdataset.gopen import gopen
        from webdataset.handlers import reraise_exception
        from webdataset.tariterators import tar_file_iterator

        try:
            stream = gopen(url)
        except Exception as exc:  # missing file, permission, bad URL scheme
            self.counter.add("skipped_unreadable_shard", detail=f"{url}: {type(exc).__name__}: {exc}")
            return
        produced = 0
        try:
            for item in tar_file_iterator(stream, handler=reraise_exception):
                item["__url__"] = url
                produced += 1
                yield item
        except Exception as exc:  # tarfile.ReadError, EOFError, OSError, zlib errors from .tar.gz ...
            reason = "skipped_truncated_shard" if produced else "skipped_unreadable_shard"
            self.counter.add(reason, detail=f"{url} after {produced} files: {type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(Exception):
                stream.close()
        yield {}  # end-of-shard marker: group_by_keys never joins files of two shards

    def samples(self, urls: Sequence[str]) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import group_by_keys

        def handler(exc: Exception) -> bool:
            self.counter.add("skipped_bad_metadata", detail=f"{type(exc).__name__}: {exc}")
            return True

        for url in urls:
            parquet_rows = self.parquet_rows(url) if self.use_parquet else {}
            for sample in group_by_keys(self.files(url), handler=handler):
                if parquet_rows:
                    sample["__parquet__"] = parquet_rows.get(sample["__key__"].rsplit("/", 1)[-1])
                yield sample


def sample_key(raw: Mapping[str, Any]) -> str:
    return str(raw["__key__"]).rsplit("/", 1)[-1]


def sample_metadata(raw: Mapping[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = dict(raw.get("__parquet__") or {})
    if "json" in raw:
        try:
            loaded = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError) as exc:
            raise SampleSkipped("bad_metadata", f"{sample_key(raw)}.json: {exc}") from exc
        if not isinstance(loaded, dict):
            raise SampleSkipped("bad_metadata", f"{sample_key(raw)}.json is not an object")
        meta.update({k: v for k, v in loaded.items() if v is not None})
    return meta


def raw_image_bytes(raw: Mapping[str, Any]) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in raw:
            return raw[ext]
    raise SampleSkipped("missing_image", sample_key(raw))


def raw_caption(raw: Mapping[str, Any], meta: Mapping[str, Any]) -> Any:
    if "txt" in raw:
        return raw["txt"]
    return meta.get("caption")


class ShuffleBuffer:
    """Shuffles raw samples through a buffer of ``size``; each entry keeps its (shard, sample) address,
    so the buffer's state is a list of addresses plus the generator's state (a resume re-reads them)."""

    def __init__(self, size: int, rng: random.Random | None) -> None:
        self.size = size if rng is not None else 1
        self.rng = rng
        self.items: list[tuple[tuple[int, int], dict[str, Any]]] = []

    def push(self, item: tuple[tuple[int, int], dict[str, Any]]) -> tuple[tuple[int, int], dict[str, Any]] | None:
        """Add one entry; once the buffer is full, take a random one out."""
        if self.size <= 1:
            return item
        self.items.append(item)
        return self.pop() if len(self.items) >= self.size else None

    def pop(self) -> tuple[tuple[int, int], dict[str, Any]]:
        index = self.rng.randrange(len(self.items))
        self.items[index], self.items[-1] = self.items[-1], self.items[index]
        return self.items.pop()


def _rng_state(rng: random.Random) -> list[Any]:
    version, internal, gauss_next = rng.getstate()
    return [version, list(internal), gauss_next]


class SlotStream:
    """One slot's samples for one epoch: passes over its shards, decoded, until the consumer stops.

    :meth:`position` after any sample is a small dict (pass, shard and sample reached, the shuffle buffer's
    addresses and generator state, samples produced) from which a new stream continues exactly there.
    A pass in which the slot's own shards give no usable sample is followed by passes over every shard of
    the epoch (``borrowed``): one unreadable shard never leaves a rank without data. Only when no shard of
    the epoch has a usable sample does the stream raise, and then it does so on every slot alike.
    """

    def __init__(self, shards: LaionShards, epoch: int, slot: int, slots: int, start: Mapping[str, Any] | None = None):
        self.shards, self.epoch, self.slot, self.slots = shards, epoch, slot, slots
        start = dict(start or {})
        self.cycle = int(start.get("cycle", 0))
        self.borrowed = bool(start.get("borrowed", False))
        self.shard = int(start.get("shard", 0))
        self.sample = int(start.get("sample", 0))
        self.index = int(start.get("index", 0))
        self.produced = int(start.get("produced", 0))
        self._buffered = [(int(s), int(j)) for s, j in start.get("buffer", [])]
        self._rng_state = start.get("rng")
        self.buffer = ShuffleBuffer(1, None)

    def position(self) -> dict[str, Any]:
        return {
            "cycle": self.cycle,
            "borrowed": self.borrowed,
            "shard": self.shard,
            "sample": self.sample,
            "index": self.index,
            "produced": self.produced,
            "buffer": [list(address) for address, _ in self.buffer.items],
            "rng": _rng_state(self.buffer.rng) if self.buffer.rng is not None else None,
        }

    def pass_urls(self) -> tuple[list[str], bool]:
        """This pass's shards, and whether the slot keeps only every n-th sample of them."""
        shards = self.shards
        order = list(shards.urls)
        if shards.shuffle:
            random.Random(f"{shards.seed}:{self.epoch}").shuffle(order)  # the same permutation on every rank
        if self.borrowed:
            first = self.slot % len(order)
            mine, by_sample = order[first:] + order[:first], False
        else:
            by_sample = len(order) < self.slots
            mine = order if by_sample else order[self.slot :: self.slots]
        if self.cycle and shards.shuffle:
            # later passes of an epoch re-read this slot's own shards (new order), never another rank's
            random.Random(f"{shards.seed}:{self.epoch}:{self.slot}:{self.cycle}").shuffle(mine)
        return mine, by_sample

    def raw_pass(self) -> Iterator[dict[str, Any]]:
        """One pass over this slot's raw samples of the split (buffer-shuffled when ``shuffle``), from the
        current position. The buffer holds raw bytes (decoding happens after it) and drains at the end of
        the pass, so a sample never meets its own repeat from the next pass in the buffer."""
        shards = self.shards
        urls, by_sample = self.pass_urls()
        rng = None
        if shards.shuffle and shards.shuffle_buffer > 1:
            rng = random.Random(f"{shards.seed}:{self.epoch}:{self.slot}:{self.cycle}:buffer")
            if self._rng_state is not None:
                version, internal, gauss_next = self._rng_state
                rng.setstate((version, tuple(internal), gauss_next))
        self.buffer = ShuffleBuffer(shards.shuffle_buffer, rng)
        if self._buffered:
            self.buffer.items = shards.reread(urls, self._buffered)
        self._buffered, self._rng_state = [], None

        reader = ShardReader(shards.counter, shards.use_parquet, shards._parquet_cache)
        for shard in range(self.shard, len(urls)):
            self.shard, skip = shard, self.sample
            # the part of the shard read before the stop was counted then: re-read it without counting
            reader.counter = SampleCounter(1) if skip else shards.counter
            for sample_index, raw in enumerate(reader.samples([urls[shard]])):
                if sample_index < skip:
                    continue
                reader.counter = shards.counter
                self.sample = sample_index + 1
                self.index += 1
                if by_sample and (self.index - 1) % self.slots != self.slot:
                    continue
                if not shards.in_split(sample_key(raw)):
                    continue
                out = self.buffer.push(((shard, sample_index), raw))
                if out is not None:
                    yield out[1]
            self.shard, self.sample = shard + 1, 0
        while self.buffer.items:
            yield self.buffer.pop()[1]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shards = self.shards
        while True:
            for raw in self.raw_pass():
                try:
                    sample = shards.decode(raw, self.epoch)
                except SampleSkipped as exc:
                    shards.counter.skip(exc)
                    continue
                self.produced += 1
                yield sample
            if not shards.cycle:
                return
            if self.produced:
                self.cycle += 1
            elif not self.borrowed:
                log.warning(
                    "data: the %s shards of slot %d hold no usable sample this epoch; it reads every shard instead",
                    shards.split,
                    self.slot,
                )
                self.borrowed = True
            else:
                counts = ", ".join(f"{k}={v}" for k, v in sorted(shards.counter.totals().items())) or "none"
                raise UserError(
                    f"data.urls: none of the {len(shards.urls)} {shards.split} shards (e.g. {shards.urls[0]}) "
                    f"holds a usable sample (counts: {counts}); check the shards, data.filters and data.val_fraction"
                )
            self.shard = self.sample = self.index = self.produced = 0


class LaionShards(IterableDataset):
    """Batches (or single samples) from img2dataset shards; see the module docstring for placement.

    With ``resumable`` every batch carries its slot's stream position (``STATE_KEY``), which the training
    loader keeps; :meth:`continue_from` makes the next iteration of an epoch continue those positions.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        views: ImageViews,
        counter: SampleCounter,
        filters: LaionFilters,
        seed: int,
        batch_size: int,
        batches_per_rank: int | None,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
        val_fraction: float = 0.0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        cycle: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        use_parquet: bool = True,
        partial: bool = False,
        resumable: bool = False,
    ) -> None:
        super().__init__()
        if not urls:
            raise UserError("data.urls: no shards to read")
        self.urls = list(urls)
        self.views = views
        self.counter = counter
        self.filters = filters
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.batches_per_rank = batches_per_rank
        self.rank, self.world_size = int(rank), int(world_size)
        self.split = split
        self.val_fraction = float(val_fraction)
        self.shuffle = shuffle
        self.shuffle_buffer = int(shuffle_buffer)
        self.cycle = cycle
        self.max_pixels = int(max_pixels)
        self.use_parquet = use_parquet
        self.partial = partial
        self.resumable = resumable
        self._epoch_base = 0
        self._iterations = 0
        self._continue: dict[str, Any] = {}
        self._parquet_cache: dict[str, dict[str, dict[str, Any]]] = {}

    def set_epoch(self, epoch: int) -> None:
        # Called in the loader's process before workers start; workers add their own iteration count
        # (persistent workers keep their copy of this object across epochs).
        self._epoch_base = int(epoch)
        self._iterations = 0

    def continue_from(self, epoch: int, positions: Mapping[int, Mapping[str, Any]], rotation: int) -> None:
        """In ``epoch``, slot s continues from ``positions[s]`` (others from the epoch's start) and worker w
        plays the slot of worker ``(w + rotation) % workers`` (the round-robin order a resume must keep)."""
        self._continue = {"epoch": int(epoch), "positions": dict(positions), "rotation": int(rotation)}

    # ---------------------------------------------------------------- placement
    def _slot(self, rotation: int) -> tuple[int, int, int, int]:
        """(slot, slots, this worker's place among the rank's workers, workers)."""
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        place = (worker + rotation) % workers
        return self.rank * workers + place, self.world_size * workers, place, workers

    def _my_batches(self, place: int, workers: int) -> int | None:
        if self.batches_per_rank is None:
            return None
        base, extra = divmod(self.batches_per_rank, workers)
        return base + (1 if place < extra else 0)

    def in_split(self, key: str) -> bool:
        if self.val_fraction <= 0:
            return True
        held_out = holdout_value(key) < self.val_fraction
        return held_out if self.split == "val" else not held_out

    # ---------------------------------------------------------------- stream
    def reread(self, urls: Sequence[str], addresses: Sequence[tuple[int, int]]) -> list[tuple[tuple[int, int], dict]]:
        """The raw samples at (shard, sample) ``addresses`` of ``urls``, in that order (a resumed shuffle
        buffer); reading them again counts nothing. Samples that cannot be read any more are left out."""
        wanted = set(addresses)
        found: dict[tuple[int, int], dict[str, Any]] = {}
        reader = ShardReader(SampleCounter(1), self.use_parquet, self._parquet_cache)
        for shard in sorted({s for s, _ in wanted}):
            last = max(j for s, j in wanted if s == shard)
            for sample_index, raw in enumerate(reader.samples([urls[shard]])):
                if (shard, sample_index) in wanted:
                    found[(shard, sample_index)] = raw
                if sample_index >= last:
                    break
        return [(address, found[address]) for address in addresses if address in found]

    def raw_stream(self, epoch: int, slot: int, slots: int) -> Iterator[dict[str, Any]]:
        """One pass over a slot's raw samples of the split (the evaluation set reads them in order)."""
        return SlotStream(self, epoch, slot, slots).raw_pass()

    def decode(self, raw: Mapping[str, Any], epoch: int) -> dict[str, Any]:
        """One training sample from a raw tar group; raises SampleSkipped."""
        key = sample_key(raw)
        meta = sample_metadata(raw)
        size_known = self.filters.check(meta)
        caption, caption_conv = require_caption(raw_caption(raw, meta))
        image, original_size, conversions = decode_image(
            raw_image_bytes(raw), max_pixels=self.max_pixels, min_side_hint=self.views.largest
        )
        if not size_known:  # img2dataset may have resized: the metadata's original size wins when present
            self.filters.check_decoded(original_size)
        rng = sample_rng(self.seed, epoch, zlib.crc32(key.encode("utf-8")))
        sample, view_conv = self.views(image, original_size, rng)
        self.counter.convert(caption_conv + conversions + view_conv, detail=key)
        sample["caption"] = caption
        sample["key"] = key
        return sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self._epoch_base + self._iterations
        self._iterations += 1
        resume = self._continue if self._continue.get("epoch") == epoch else {}
        slot, slots, place, workers = self._slot(resume.get("rotation", 0))
        start = resume.get("positions", {}).get(slot)
        stream = SlotStream(self, epoch, slot, slots, start)
        wanted = self._my_batches(place, workers)
        produced = int(start["batches"]) if start else 0
        if wanted is not None and produced >= wanted:  # more workers than batches, or a finished slot
            return
        batch: list[dict[str, Any]] = []
        for sample in stream:
            batch.append(sample)
            if len(batch) < self.batch_size:
                continue
            out = collate(batch)
            batch = []
            produced += 1
            if self.resumable:
                row, counts = self.counter.snapshot()
                out[STATE_KEY] = {
                    "slot": slot,
                    "position": {**stream.position(), "batches": produced},
                    "row": row,
                    "counts": counts,
                }
            yield out
            if wanted is not None and produced >= wanted:
                return
        if batch and self.partial:
            yield collate(batch)


class LaionDataModule(ImageTextDataModule):
    """LAION subsets in img2dataset's WebDataset layout (X-Adapter: LAION high-resolution; SUN:
    LAION-Aesthetics 6+, i.e. ``filters.min_aesthetic: 6``).

    ``urls``: brace pattern, glob or list of shard paths / URLs; or ``root``: a folder of ``*.tar``.
    Validation: ``val_urls`` if given, else the samples whose key hashes below ``val_fraction``
    (excluded from training). ``epoch_samples`` (global, all ranks) fixes the epoch length; by default
    it is counted from the ``.parquet`` files beside the shards (after filters and hold-out).
    """

    name = "laion"

    def __init__(
        self,
        urls: Any = None,
        root: str | None = None,
        val_urls: Any = None,
        val_fraction: float = 0.02,
        val_samples: int | None = 256,
        epoch_samples: int | None = None,
        filters: LaionFilters | Mapping[str, Any] | None = None,
        shuffle_buffer: int = 1000,
        use_parquet: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.urls_spec = plain(urls)
        self.root = str(root) if root else None
        self.val_urls_spec = plain(val_urls)
        self.val_fraction = float(val_fraction) if not val_urls else 0.0
        self.val_samples = int(val_samples) if val_samples else None
        self.epoch_samples = int(epoch_samples) if epoch_samples else None
        self.filters = LaionFilters.from_any(filters)
        self.shuffle_buffer = int(shuffle_buffer)
        self.use_parquet = bool(use_parquet)
        self.train_urls: list[str] = []
        self.val_urls: list[str] = []
        self._counted: dict[str, int] = {}

    # ---------------------------------------------------------------- source
    def _demo_root(self) -> Path | None:
        return Path(self.root) if self.root else None

    def _build_demo(self, root: Path) -> None:
        from xa_lightning.data.demo import build_laion_demo

        build_laion_demo(root)

    def _resolve_urls(self) -> tuple[list[str], list[str]]:
        if self.urls_spec:
            urls = expand_urls(self.urls_spec, "data.urls")
        elif self.root:
            root = Path(self.root).expanduser()
            if not root.is_dir():
                raise UserError(f"data.root: {root} does not exist; set data.root=... or run xa-data demo")
            urls = sorted(str(p) for p in root.glob("*.tar"))
            if not urls:
                raise UserError(f"data.root: {root} holds no .tar shards; point data.root at img2dataset output")
        else:
            raise UserError("data.urls is not set; set data.urls=/path/{00000..00099}.tar (or data.root=DIR)")
        local = [u for u in urls if not is_remote(u)]
        missing = [u for u in local if not Path(u[5:] if u.startswith("file:") else u).exists()]
        if local and len(missing) == len(local) and len(local) == len(urls):
            raise UserError(
                f"data.urls: {missing[0]} does not exist (none of the {len(urls)} shards do); "
                "fix data.urls or run xa-data demo"
            )
        val = expand_urls(self.val_urls_spec, "data.val_urls") if self.val_urls_spec else []
        return urls, val

    def _check_source(self) -> Path | None:
        self._resolve_urls()
        return None

    def _setup_index(self) -> None:
        self.train_urls, self.val_urls = self._resolve_urls()
        if not self.val_urls and self.val_fraction <= 0:
            log.warning(
                "data: no validation split (data.val_urls unset, data.val_fraction=0); "
                "evaluation reads training samples"
            )

    # ---------------------------------------------------------------- counting
    def _count(self, split: str) -> int | None:
        """Samples of a split from the parquet files (after filters and hold-out); None if not countable."""
        if split in self._counted:
            return self._counted[split]
        urls = self.val_urls if (split == "val" and self.val_urls) else self.train_urls
        total = 0
        for url in urls:
            path = parquet_beside(url)
            if path is None or not Path(url).exists():
                return None
            for key, row in read_parquet_metadata(path).items():
                try:
                    self.filters.check(row)
                except SampleSkipped:
                    continue
                if (
                    self.val_urls
                    or self.val_fraction <= 0
                    or (holdout_value(key) < self.val_fraction) == (split == "val")
                ):
                    total += 1
        self._counted[split] = total
        return total

    def epoch_length(self) -> int:
        """Samples per epoch over all ranks."""
        if self.epoch_samples:
            return self.epoch_samples
        counted = self._count("train")
        if counted is None:
            raise UserError(
                "data.epoch_samples is not set and the shards have no local .parquet to count "
                "samples from; set data.epoch_samples=N (samples per epoch, all ranks)"
            )
        if counted == 0:
            raise UserError(f"data: no training sample passes the filters ({self.filters}) in data.urls")
        return counted

    def batches_per_epoch(self) -> int:
        _, world = self.placement()
        return per_rank_batches(self.epoch_length(), world, self.batch_size)

    # ---------------------------------------------------------------- datasets
    def _dataset(
        self,
        split: str,
        *,
        counter: SampleCounter,
        views: ImageViews,
        batch_size: int,
        batches_per_rank: int | None,
        shuffle: bool,
        cycle: bool,
        rank: int,
        world: int,
        partial: bool = False,
        resumable: bool = False,
    ) -> LaionShards:
        urls = self.val_urls if (split == "val" and self.val_urls) else self.train_urls
        return LaionShards(
            urls,
            views=views,
            counter=counter,
            filters=self.filters,
            seed=self.seed,
            batch_size=batch_size,
            batches_per_rank=batches_per_rank,
            rank=rank,
            world_size=world,
            split=split,
            val_fraction=0.0 if self.val_urls else self.val_fraction,
            shuffle=shuffle,
            shuffle_buffer=self.shuffle_buffer,
            cycle=cycle,
            max_pixels=self.max_pixels,
            use_parquet=self.use_parquet,
            partial=partial,
            resumable=resumable,
        )

    def _train_dataset(self) -> LaionShards:
        rank, world = self.placement()
        return self._dataset(
            "train",
            counter=self.train_counter,
            views=self.train_views,
            batch_size=self.batch_size,
            batches_per_rank=self.batches_per_epoch(),
            shuffle=True,
            cycle=True,
            rank=rank,
            world=world,
            resumable=True,
        )

    def _val_dataset(self) -> LaionShards:
        rank, world = self.placement()
        available = self._count("val")
        if available is None:
            total = self.val_samples
        else:
            total = min(available, self.val_samples) if self.val_samples else available
        if not total:
            raise UserError(
                "data: no validation samples (data.val_urls / data.val_fraction / data.val_samples); "
                "set data.val_samples=N or give data.val_urls"
            )
        return self._dataset(
            "val",
            counter=self.val_counter,
            views=self.eval_views,
            batch_size=self.val_batch_size,
            batches_per_rank=per_rank_batches(total, world, self.val_batch_size),
            shuffle=False,
            cycle=True,
            rank=rank,
            world=world,
        )

    def _make_train_loader(self):
        return self.iterable_loader(self._train_dataset(), train=True)

    def _make_val_loader(self):
        return self.iterable_loader(self._val_dataset(), train=False)

    # ---------------------------------------------------------------- eval / cache
    def _eval_stream(self) -> Iterator[EvalItem]:
        dataset = self._dataset(
            "val",
            counter=self.val_counter,
            views=self.eval_views,
            batch_size=1,
            batches_per_rank=None,
            shuffle=False,
            cycle=False,
            rank=0,
            world=1,
        )
        for raw in dataset.raw_stream(0, 0, 1):
            try:
                meta = sample_metadata(raw)
                dataset.filters.check(meta)
                caption, _ = require_caption(raw_caption(raw, meta))
                image_bytes = raw_image_bytes(raw)
            except SampleSkipped as exc:
                self.val_counter.skip(exc)
                continue
            yield EvalItem(sample_key(raw), caption, _LaionEvalLoader(image_bytes, self.max_pixels))

    def iter_cache_batches(self, split: str, batch_size: int) -> Iterator[dict[str, Any]]:
        counter = self.train_counter if split == "train" else self.val_counter
        views = self.train_views if split == "train" else self.eval_views
        dataset = self._dataset(
            split,
            counter=counter,
            views=views,
            batch_size=batch_size,
            batches_per_rank=None,
            shuffle=False,
            cycle=False,
            rank=0,
            world=1,
            partial=True,
        )
        yield from dataset

    def source_fingerprint(self) -> dict[str, Any]:
        self.setup()

        def stamp(url: str) -> list[Any]:
            if is_remote(url) or not Path(url).exists():
                return [url]
            st = Path(url).stat()
            return [os.path.abspath(url), st.st_size, int(st.st_mtime)]

        return {
            "dataset": self.name,
            "train": [stamp(u) for u in self.train_urls],
            "val": [stamp(u) for u in self.val_urls],
            "val_fraction": self.val_fraction,
            "filters": self.filters.__dict__,
            "max_pixels": self.max_pixels,
        }


class _LaionEvalLoader:
    def __init__(self, image_bytes: bytes, max_pixels: int) -> None:
        self.image_bytes = image_bytes
        self.max_pixels = max_pixels

    def __call__(self, views: ImageViews, reference_size: int | None) -> tuple[dict[str, Any], None]:
        image, original_size, _ = decode_image(
            self.image_bytes, max_pixels=self.max_pixels, min_side_hint=views.largest
        )
        sample, _ = views(image, original_size, sample_rng(0))
        return sample, None
