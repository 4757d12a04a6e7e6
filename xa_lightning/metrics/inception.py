"""clean-fid's Inception features for FID and KID: clean-fid's "clean" resize, then the TF-2015 network.

* :class:`InceptionFeatureExtractor`: uint8 ``(B, 3, H, W)`` -> ``(B, 2048)``. The resize is clean-fid's
  own function (``cleanfid.resize.build_resizer("clean")``: PIL bicubic per float channel to 299 x 299),
  applied to the images of a batch in parallel on the worker pool (PIL releases the GIL), so the
  numbers are clean-fid's and the resize is off the main thread. Folders are decoded and resized one
  batch ahead of the network (:meth:`~InceptionFeatureExtractor.folder_features`), as clean-fid's
  DataLoader workers do.
* :func:`get_inception`: one shared extractor per (weights folder, device); FID, KID and the pairwise
  statistics of a sampler get the same batch, so the extractor keeps the last batch's features.
* :class:`InceptionMetric`: the base of the FID / KID / statistics metrics (an injectable extractor).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from xa_lightning.metrics.base import EvaluationMetric, mark_updated
from xa_lightning.metrics.images import check_uint8_images, map_ahead, parallel_map, read_image, to_numpy_nhwc
from xa_lightning.metrics.weights import ensure_inception_weights

FEATURE_DIM = 2048
FeatureExtractor = Callable[[Tensor], Tensor]


class InceptionFeatureExtractor(torch.nn.Module):
    """uint8 ``(B, 3, H, W)`` -> clean-fid "clean" resize -> clean-fid's Inception -> ``(B, 2048)`` float32."""

    def __init__(self, weights_dir: str | os.PathLike | None = None) -> None:
        super().__init__()
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        weights = ensure_inception_weights(weights_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.inception = InceptionV3W(str(weights.parent), download=False, resize_inside=False).eval()
        self.inception.requires_grad_(False)
        self.resize_image = build_resizer("clean")  # uint8 (H, W, 3) -> float32 (299, 299, 3), clean-fid's own
        self._last: tuple[Tensor, int, Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.inception.parameters()).device

    def preprocess(self, images: Tensor) -> Tensor:
        """clean-fid's resize of each image to 299 x 299, float32 ``(B, 3, 299, 299)`` in [0, 255], on CPU."""
        resized = parallel_map(self.resize_image, list(to_numpy_nhwc(images)))
        return self._stack(resized)

    @staticmethod
    def _stack(resized: Sequence[np.ndarray]) -> Tensor:
        return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def features(self, preprocessed: Tensor) -> Tensor:
        """Inception features of already resized images (:meth:`preprocess`)."""
        return self.inception(preprocessed.to(self.device)).float()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        check_uint8_images(images)
        last = self._last
        # FID, KID and the pairwise statistics of one sampler are updated with the same batch tensor.
        if last is not None and last[0] is images and last[1] == images._version:
            return last[2]
        features = self.features(self.preprocess(images))
        self._last = (images, images._version, features)
        return features

    def _read_resized(self, path: Path) -> np.ndarray:
        return self.resize_image(read_image(path))

    def folder_features(self, files: Sequence[Path], batch_size: int) -> Iterator[Tensor]:
        """Features of image files in batches; files are decoded and resized on the pool one batch ahead."""
        for resized in map_ahead(self._read_resized, files, batch_size):
            yield self.features(self._stack(resized))


_EXTRACTORS: dict[tuple[str, str], InceptionFeatureExtractor] = {}


def get_inception(
    weights_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> InceptionFeatureExtractor:
    """A process-wide shared extractor per (weights dir, device): loading costs seconds and 90 MB."""
    key = (str(weights_dir or ""), str(torch.device(device)))
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = InceptionFeatureExtractor(weights_dir).to(device)
    return _EXTRACTORS[key]


class InceptionMetric(EvaluationMetric):
    """A metric on Inception features; the (shared, 90 MB) extractor is injectable and kept outside the module tree.

    Without an injected extractor the shared one for the metric's device is used (:func:`get_inception`).
    """

    def __init__(
        self,
        feature_extractor: FeatureExtractor | None = None,
        weights_dir: str | os.PathLike | None = None,
        feature_dim: int = FEATURE_DIM,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.feature_dim = feature_dim
        # In __dict__: neither a submodule nor part of state_dict.
        self.__dict__["_feature_extractor"] = feature_extractor
        self.__dict__["_weights_dir"] = weights_dir

    @classmethod
    def prepare(cls, cfg: Any, device: torch.device) -> None:
        ensure_inception_weights(cfg.fid.weights_dir)

    def extract(self, images: Tensor) -> Tensor:
        check_uint8_images(images)
        extractor = self.__dict__["_feature_extractor"]
        if extractor is None:
            extractor = get_inception(self.__dict__["_weights_dir"], self.device)
            self.__dict__["_feature_extractor"] = extractor
        return extractor(images).to(self.device, torch.float32)

    def update(self, images: Tensor, prompts: Sequence[str] | None = None, references: Tensor | None = None) -> None:
        self._add_features(self.extract(images))

    def update_features(self, features: Tensor) -> None:
        """Update with features computed elsewhere ``(B, feature_dim)`` instead of images."""
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features must be (B, {self.feature_dim}), got {tuple(features.shape)}")
        mark_updated(self)
        self._add_features(features.to(self.device, torch.float32))

    def _add_features(self, features: Tensor) -> None:
        raise NotImplementedError

    def _sync_dist(self, dist_sync_fn: Any = None, process_group: Any = None) -> None:
        # A rank that kept no features must still contribute a (0, D) tensor, not a 1-D empty one.
        for attr in self._reductions:
            value = getattr(self, attr)
            if isinstance(value, list) and not value:
                setattr(self, attr, [torch.zeros(0, self.feature_dim, device=self.device)])
        if dist_sync_fn is None:
            super()._sync_dist(process_group=process_group)
        else:
            super()._sync_dist(dist_sync_fn, process_group)
