"""LightningDataModules for LAION (WebDataset shards), CelebAMask-HQ and OpenImages; the demo builder,
captioning (BLIP-2) and the latent / text-embedding cache. See docs/data.md."""

from xa_lightning.data.base import CacheOptions, ImageTextDataModule
from xa_lightning.data.callbacks import SkippedSamplesLogger
from xa_lightning.data.celebamask_hq import CelebAMaskHQDataModule
from xa_lightning.data.counters import COUNTER_NAMES, SampleCounter, SampleSkipped
from xa_lightning.data.demo import build_demo
from xa_lightning.data.laion import LaionDataModule, LaionFilters
from xa_lightning.data.openimages import OpenImagesDataModule

__all__ = [
    "CacheOptions",
    "COUNTER_NAMES",
    "CelebAMaskHQDataModule",
    "ImageTextDataModule",
    "LaionDataModule",
    "LaionFilters",
    "OpenImagesDataModule",
    "SampleCounter",
    "SampleSkipped",
    "SkippedSamplesLogger",
    "build_demo",
]
