"""What the three DataModules share: options, loaders, DDP placement, counters, eval helpers, cache switch."""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from xa_lightning.config import to_plain
from xa_lightning.data.counters import SampleCounter, SampleSkipped, merge
from xa_lightning.data.images import DEFAULT_MAX_PIXELS
from xa_lightning.data.transforms import ImageViews, collate, pixels_to_uint8
from xa_lightning.errors import UserError

log = logging.getLogger("xa_lightning.data")


plain = to_plain  # OmegaConf containers (from Hydra) as plain Python values


@dataclass
class CacheOptions:
    """``data.cache``: read precomputed VAE latents / text embeddings instead of images.

    ``backbone``: the backbone config (family, flavour, path, seed, ...) the cache was built for; the
    data configs point it at the run's ``backbone`` node. ``dir``: where caches live (one sub-folder per
    dataset + backbone + resolution key). ``dtype``: storage dtype. ``shard_size``: samples per shard.
    """

    enabled: bool = False
    dir: str | None = None
    backbone: Mapping[str, Any] | None = None
    dtype: str = "fp16"
    shard_size: int = 256
    splits: Sequence[str] = ("train", "val")

    def __post_init__(self) -> None:
        self.backbone = plain(self.backbone)
        self.splits = tuple(plain(self.splits) or ())
        self.dir = str(self.dir) if self.dir else None
        if self.dtype not in ("fp32", "fp16", "bf16"):
            raise UserError(f"data.cache.dtype={self.dtype!r}: choose fp32, fp16 or bf16")
        unknown = [s for s in self.splits if s not in ("train", "val")]
        if unknown:
            raise UserError(f"data.cache.splits: {unknown[0]!r} is not a split; use train and/or val")
        if int(self.shard_size) < 1:
            raise UserError(f"data.cache.shard_size={self.shard_size}: must be at least 1")

    @classmethod
    def from_any(cls, value: Any) -> CacheOptions:
        value = plain(value)
        if value is None:
            return cls()
        if isinstance(value, CacheOptions):
            return value
        if not isinstance(value, Mapping):
            raise UserError(f"data.cache must be a mapping like {{enabled: false, dir: ...}}, got {value!r}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(value) - known)
        if unknown:
            raise UserError(f"data.cache.{unknown[0]} is not a cache option; known: {', '.join(sorted(known))}")
        return cls(**value)


class EpochIndexSampler(DistributedSampler):
    """A seeded DistributedSampler (one replica when not distributed) whose indices carry the epoch.

    It yields ``index + epoch * len(dataset)`` so that a dataset can derive per-sample randomness from
    (seed, epoch, index), also in persistent workers that never see ``set_epoch``. A training loader
    (:class:`~xa_lightning.data.resume.ResumableMapLoader`) hands it the epoch's order and where to start
    in it (:meth:`serve`), so a resumed epoch continues its own order.
    """

    _serving: tuple[list[int], int] | None = None
    served_before = 0  # indices of the current order skipped by a resumed iteration

    def epoch_indices(self) -> list[int]:
        """This rank's indices for the current epoch, in order."""
        offset = self.epoch * len(self.dataset)
        return [int(i) + offset for i in super().__iter__()]

    def serve(self, order: list[int], start: int) -> None:
        """The next iteration yields ``order[start:]`` (once)."""
        self._serving = (order, int(start))
        self.served_before = int(start)

    def __iter__(self) -> Iterator[int]:
        serving, self._serving = self._serving, None
        if serving is None:
            self.served_before = 0
            return iter(self.epoch_indices())
        order, start = serving
        return iter(order[start:])


class EpochLoader(DataLoader):
    """A DataLoader that tells its IterableDataset the epoch (Lightning only does so for samplers)."""

    def __init__(self, *args: Any, epoch_fn: Callable[[], int | None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch_fn = epoch_fn
        self._iterations = 0

    def __iter__(self):  # type: ignore[override]
        epoch = self.epoch_fn() if self.epoch_fn is not None else None
        epoch = self._iterations if epoch is None else epoch  # no trainer: count the passes ourselves
        self._iterations += 1
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        return super().__iter__()


def worker_init(worker_id: int) -> None:
    # Decoding threads per worker: the workers already run in parallel.
    torch.set_num_threads(1)


class ImageTextDataModule(L.LightningDataModule):
    """Base of the LAION, CelebAMask-HQ and OpenImages DataModules.

    Batches are dicts (see docs/contracts.md): ``pixels`` (B,3,R,R) in [-1,1], ``pixels_<R>`` for extra
    resolutions, ``caption``, ``key``, SDXL ``original_size`` / ``crop_top_left`` / ``target_size`` and,
    for the IP datasets, ``reference`` (B,3,r,r) in [0,1]; with ``cache.enabled`` the cached tensors
    (``latents``, ``prompt_embeds``, ...) instead of pixels.

    Skipped / converted samples are counted per reason (:meth:`sample_counts`) and logged as
    ``data/skipped_<reason>`` / ``data/converted_<reason>`` by :class:`SkippedSamplesLogger`, which
    this module adds to the trainer's callbacks itself unless ``log_counts=false``.
    """

    name: ClassVar[str] = ""
    has_references: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Subclasses take the shared options through **kwargs; publish the full signature so config
        # validation (xa_lightning.config) can name a misspelt data.<key> before anything runs.
        super().__init_subclass__(**kwargs)
        own = [
            p
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        names = {p.name for p in own}
        shared = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in inspect.signature(ImageTextDataModule.__init__).parameters.values()
            if p.name not in names and p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        cls.__signature__ = inspect.Signature([p for p in own if p.name != "self"] + shared)

    def __init__(
        self,
        *,
        resolution: int = 512,
        extra_resolutions: Sequence[int] = (),
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        seed: int = 0,
        crop: str = "random",
        random_flip: bool = False,
        upscale_small: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        cache: CacheOptions | Mapping[str, Any] | None = None,
        build_demo_if_missing: bool = False,
        log_counts: bool = True,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise UserError(f"data.batch_size={batch_size}: must be at least 1")
        if int(num_workers) < 0:
            raise UserError(f"data.num_workers={num_workers}: must be 0 or more")
        self.resolution = int(resolution)
        self.extra_resolutions = tuple(int(r) for r in (plain(extra_resolutions) or ()))
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.crop = crop
        self.random_flip = bool(random_flip)
        self.upscale_small = bool(upscale_small)
        self.max_pixels = int(max_pixels)
        self.cache = CacheOptions.from_any(cache)
        self.build_demo_if_missing = bool(build_demo_if_missing)
        self.log_counts = bool(log_counts)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.prefetch_factor = prefetch_factor
        self.train_views = ImageViews(
            self.resolution, self.extra_resolutions, crop, self.random_flip, self.upscale_small
        )
        self.eval_views = ImageViews(self.resolution, self.extra_resolutions, "center", False, True)
        self._fresh_state()

    def _fresh_state(self) -> None:
        self._owner_pid = os.getpid()
        self.index_counter = SampleCounter(1)  # counts found while indexing (identical on every rank)
        self.train_counter = SampleCounter(self.num_workers + 1)
        self.val_counter = SampleCounter(self.num_workers + 1)
        self._is_setup = False
        self._eval_items_cache: list[Any] = []
        self._eval_exhausted = False

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_eval_items_cache", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickled in another process (ddp_spawn): that rank counts for itself, with its own memory.
        self.__dict__.update(state)
        self._fresh_state()

    # ------------------------------------------------------------------ what subclasses provide
    def _check_source(self) -> Path | None:
        """Raise UserError if the data is not there; return the root to build the demo into (or None)."""
        raise NotImplementedError

    def _build_demo(self, root: Path) -> None:
        raise NotImplementedError

    def _setup_index(self) -> None:
        raise NotImplementedError

    def _train_dataset(self) -> Dataset:
        raise NotImplementedError

    def _val_dataset(self) -> Dataset:
        raise NotImplementedError

    def _eval_stream(self) -> Iterator[EvalItem]:
        """Held-out items in a fixed order (validation split)."""
        raise NotImplementedError

    def source_fingerprint(self) -> dict[str, Any]:
        """What identifies the data (paths, sizes, filters, split): part of the cache key."""
        raise NotImplementedError

    def iter_cache_batches(self, split: str, batch_size: int) -> Iterator[dict[str, Any]]:
        """Every sample of a split once, in a fixed order, as batches (what ``xa-data cache`` encodes)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ lifecycle
    def prepare_data(self) -> None:
        self._ensure_source()

    def _ensure_source(self) -> None:
        try:
            self._check_source()
        except UserError:
            root = self._demo_root()
            if not (self.build_demo_if_missing and root is not None):
                raise
            log.info("data: %s missing; writing the demo dataset there (data.build_demo_if_missing=true)", root)
            self._build_demo(root)
            self._check_source()

    def _demo_root(self) -> Path | None:
        return None

    def check_source(self) -> None:
        """Raise UserError if the data is not where the config says (the CLI asks before anything runs);
        data that will be written as the demo on first use passes."""
        try:
            self._check_source()
        except UserError:
            if not (self.build_demo_if_missing and self._demo_root() is not None):
                raise

    def setup(self, stage: str | None = None) -> None:
        if os.getpid() != self._owner_pid:
            # a forked rank (ddp_fork / ddp_notebook) shares our memory: it counts and indexes for itself
            self._fresh_state()
        if not self._is_setup:
            self._ensure_source()
            self._setup_index()
            self._is_setup = True
        trainer = getattr(self, "trainer", None)
        if trainer is not None and self.log_counts:
            from xa_lightning.data.callbacks import SkippedSamplesLogger

            if not any(isinstance(cb, SkippedSamplesLogger) for cb in trainer.callbacks):
                trainer.callbacks.append(SkippedSamplesLogger())

    # ------------------------------------------------------------------ placement
    def placement(self) -> tuple[int, int]:
        """(rank, world_size) of this process: from the trainer, else torch.distributed, else (0, 1)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def current_epoch(self) -> int | None:
        """The trainer's epoch (so a resumed run continues the data stream), None without a trainer."""
        trainer = getattr(self, "trainer", None)
        return int(trainer.current_epoch) if trainer is not None else None

    def _loader_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            worker_init_fn=worker_init if self.num_workers else None,
        )
        if self.num_workers and self.prefetch_factor:
            kwargs["prefetch_factor"] = int(self.prefetch_factor)
        return kwargs

    def batches_taken(self) -> int | None:
        """Training batches the trainer has taken from the loader this epoch (None without a trainer)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return None
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    def _resumable(self) -> dict[str, Any]:
        return dict(
            counter=self.train_counter, seed=self.seed, epoch_fn=self.current_epoch, taken_fn=self.batches_taken
        )

    def map_loader(self, dataset: Dataset, *, batch_size: int, train: bool) -> DataLoader:
        """A loader over a map-style dataset: seeded shuffle, split over ranks, equal batches per rank;
        for training, one whose position a checkpoint saves (:mod:`xa_lightning.data.resume`)."""
        from xa_lightning.data.resume import ResumableMapLoader, collate_with_counts

        rank, world = self.placement()
        n = len(dataset)  # type: ignore[arg-type]
        if n < world * batch_size:
            split = "training" if train else "validation"
            raise UserError(
                f"data: the {split} split of {self.name} has {n} samples, fewer than one batch "
                f"per rank ({world} x data.batch_size={batch_size}); lower data.batch_size"
            )
        sampler = EpochIndexSampler(
            dataset, num_replicas=world, rank=rank, shuffle=train, seed=self.seed, drop_last=train
        )
        if not train:
            return DataLoader(
                dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, **self._loader_kwargs()
            )
        return ResumableMapLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_with_counts(self.train_counter),
            drop_last=True,
            **self._resumable(),
            **self._loader_kwargs(),
        )

    def iterable_loader(self, dataset: Dataset, *, train: bool) -> DataLoader:
        """A loader over an IterableDataset that yields whole batches itself; for training, one whose
        position a checkpoint saves."""
        from xa_lightning.data.resume import ResumableStreamLoader

        if train:
            return ResumableStreamLoader(dataset, batch_size=None, **self._resumable(), **self._loader_kwargs())
        return EpochLoader(dataset, batch_size=None, epoch_fn=self.current_epoch, **self._loader_kwargs())

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        if self.cache.enabled:
            return self._cache_loader("train", self.batch_size, train=True)
        return self._make_train_loader()

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        if self.cache.enabled and "val" in self.cache.splits:
            return self._cache_loader("val", self.val_batch_size, train=False)
        return self._make_val_loader()

    def _make_train_loader(self) -> DataLoader:
        return self.map_loader(self._train_dataset(), batch_size=self.batch_size, train=True)

    def _make_val_loader(self) -> DataLoader:
        return self.map_loader(self._val_dataset(), batch_size=self.val_batch_size, train=False)

    def _cache_loader(self, split: str, batch_size: int, train: bool) -> DataLoader:
        from xa_lightning.data.cache import open_cache

        dataset = open_cache(self, split)
        return self.map_loader(dataset, batch_size=batch_size, train=train)

    # ------------------------------------------------------------------ counters
    def sample_counts(self) -> dict[str, int]:
        """Skipped / converted samples seen by this process so far, by name (``skipped_corrupt_image``...)."""
        return merge(self.index_counter.totals(), self.train_counter.totals(), self.val_counter.totals())

    def counter_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-rank stream counts to be summed over ranks, index counts identical on every rank)."""
        return self.train_counter.tensor() + self.val_counter.tensor(), self.index_counter.tensor()

    # ------------------------------------------------------------------ evaluation helpers
    def _eval_items(self, n: int) -> list[EvalItem]:
        """The first ``n`` held-out items whose image decodes (fewer if the split is smaller)."""
        self.setup("validate")
        if len(self._eval_items_cache) < n and not self._eval_exhausted:
            have = {item.key for item in self._eval_items_cache}
            for item in self._eval_stream():
                if item.key in have:
                    continue
                try:
                    item.load(self.eval_views, self.reference_size if self.has_references else None)
                except SampleSkipped as exc:
                    self.val_counter.skip(exc)
                    continue
                self._eval_items_cache.append(item)
                have.add(item.key)
                if len(self._eval_items_cache) >= n:
                    break
            else:
                self._eval_exhausted = True
        return self._eval_items_cache[:n]

    def _cycled(self, n: int, what: str) -> list[EvalItem]:
        items = self._eval_items(n)
        if not items:
            raise UserError(
                f"data: the validation split of {self.name} has no readable samples; "
                "check data.val_* settings and the skipped-sample counts"
            )
        if len(items) < n:
            log.warning(
                "data: %s asked for %d %s, the validation split has %d; repeating them", self.name, n, what, len(items)
            )
            items = [items[i % len(items)] for i in range(n)]
        return items

    def eval_prompts(self, n: int) -> list[str]:
        """Captions of the first ``n`` held-out samples (repeated in order if the split is smaller)."""
        return [item.caption for item in self._cycled(n, "prompts")]

    def eval_references(self, n: int) -> torch.Tensor | None:
        """IP reference images (n, 3, r, r) in [0, 1] aligned with :meth:`eval_prompts`; None without references."""
        if not self.has_references:
            return None
        items = self._cycled(n, "references")
        return torch.stack([item.load(self.eval_views, self.reference_size)[1] for item in items])

    def real_images(self, n: int, resolution: int | None = None) -> torch.Tensor:
        """Up to ``n`` held-out images, uint8 (m, 3, H, W), centre-cropped at ``resolution`` (default: data's).

        Never repeats an image (FID against duplicates is wrong): ``m < n`` when the split is smaller.
        """
        items = self._eval_items(n)
        if len(items) < n:
            log.warning("data: %s has %d held-out images, %d were asked for", self.name, len(items), n)
        views = (
            self.eval_views
            if resolution in (None, self.resolution)
            else ImageViews(int(resolution), (), "center", False, True)
        )
        images = [pixels_to_uint8(item.load(views, None)[0]["pixels"]) for item in items]
        size = views.resolution
        return torch.stack(images) if images else torch.zeros(0, 3, size, size, dtype=torch.uint8)

    @property
    def reference_size(self) -> int:
        return int(getattr(self, "reference_resolution", 224))

    # ------------------------------------------------------------------ misc
    def batches_per_epoch(self) -> int | None:
        """Training batches per rank and epoch, where the DataModule decides it (LAION); else None."""
        return None


class CaptionedFolderDataModule(ImageTextDataModule):
    """A dataset root holding an image folder and a captions JSONL (CelebAMask-HQ, OpenImages)."""

    root: Path | None
    images_name: str
    captions_name: str
    dataset_title = "dataset"

    def _path(self, name: str) -> Path:
        """A configured file or folder: absolute as given, else relative to data.root."""
        path = Path(name).expanduser()
        return path if path.is_absolute() else self.root / path

    def _demo_root(self) -> Path | None:
        return self.root

    def _check_root_images_captions(self, images_hint: str) -> None:
        """data.root, data.images_dir and data.captions exist; else one line naming the key and the fix."""
        if self.root is None:
            raise UserError(f"data.root is not set; set data.root=/path/to/{self.dataset_title} or run xa-data demo")
        if not self.root.is_dir():
            raise UserError(f"data.root: {self.root} does not exist; set data.root=... or run xa-data demo")
        images = self._path(self.images_name)
        if not images.is_dir():
            raise UserError(f"data.images_dir: {images} does not exist; {images_hint}")
        captions = self._path(self.captions_name)
        if not captions.is_file():
            raise UserError(
                f"data.captions: {captions} does not exist; write it with "
                f"`xa-data caption {images} --out {captions}` or set data.captions=..."
            )

    # ---------------------------------------------------------------- datasets over train/val records
    val_split_key = "data.val_size"  # the config key that sized the validation split (for the error)

    def _reference_box(self) -> Any:
        """How the reference image is cropped from a sample (None: the whole image)."""
        return None

    def _records_dataset(self, records: list, train: bool) -> Any:
        from xa_lightning.data.records import RecordDataset

        return RecordDataset(
            records,
            views=self.train_views if train else self.eval_views,
            counter=self.train_counter if train else self.val_counter,
            seed=self.seed,
            reference_size=self.reference_resolution,
            reference_box=self._reference_box(),
            max_pixels=self.max_pixels,
            train=train,
        )

    def _train_dataset(self) -> Any:
        return self._records_dataset(self.train_records, True)

    def _val_dataset(self) -> Any:
        if not self.val_records:
            raise UserError(f"{self.val_split_key}=0: there is no validation split")
        return self._records_dataset(self.val_records, False)

    def _eval_order(self, records: list) -> list:
        """Order in which held-out records serve the evaluation set."""
        return list(records)

    def _eval_stream(self) -> Iterator[EvalItem]:
        dataset = self._records_dataset(self.val_records or self.train_records, False)
        for record in self._eval_order(dataset.records):
            yield EvalItem(
                record.key,
                record.caption,
                lambda views, size, record=record: dataset.load(record, views, None, size, count=False),
            )

    def iter_cache_batches(self, split: str, batch_size: int) -> Iterator[dict[str, Any]]:
        from xa_lightning.data.records import batched

        records = self.train_records if split == "train" else self.val_records
        yield from batched(self._records_dataset(records, split == "train").iter_once(), batch_size)


class EvalItem:
    """One held-out sample: ``key``, ``caption`` and ``load(views, reference_size) -> (views, reference)``."""

    def __init__(self, key: str, caption: str, loader: Callable[[ImageViews, int | None], tuple[dict, Any]]):
        self.key = key
        self.caption = caption
        self._loader = loader

    def load(self, views: ImageViews, reference_size: int | None) -> tuple[dict[str, Any], Any]:
        return self._loader(views, reference_size)


def per_rank_batches(total_samples: int, world_size: int, batch_size: int) -> int:
    """Equal batches per rank for an epoch of ``total_samples`` (at least one)."""
    return max(1, math.floor(total_samples / (world_size * batch_size)))
