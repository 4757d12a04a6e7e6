"""FID with clean-fid's preprocessing and Inception, as torchmetrics Metrics; statistics files.

* Features: :mod:`xa_lightning.metrics.inception` (clean-fid's "clean" resize and TF-2015 Inception;
  weights offline from :mod:`xa_lightning.metrics.weights`).
* :class:`InceptionStatistics` streams one image set: the feature sum and the sum of outer products in
  float64 (reduced with ``sum`` across DDP ranks), so memory does not grow with the number of images.
  Small sets (at most ``keep_features_up_to`` images) also keep their features, which allows an exact
  low-rank evaluation of the trace term (an n x n SVD instead of 2048 x 2048 decompositions) and KID.
* :class:`FrechetInceptionDistance` is those statistics of the generated images against fixed real
  statistics (:class:`FeatureStatistics`: computed once per run, or a clean-fid ``.npz`` /
  ``xa-eval fid-stats`` file).
* The Frechet distance uses ``Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2)`` (two symmetric
  eigendecompositions) instead of scipy's general ``sqrtm``; it equals clean-fid's value (tested) and
  avoids its imaginary-part failures on rank-deficient covariances.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics.utilities.data import dim_zero_cat

from xa_lightning.errors import UserError
from xa_lightning.metrics.base import REAL_STATISTICS, MetricContext, dist_info, require
from xa_lightning.metrics.images import iterate_batches, list_image_files
from xa_lightning.metrics.inception import FEATURE_DIM, FeatureExtractor, InceptionMetric, get_inception
from xa_lightning.paths import cache_dir


@dataclass
class FeatureStatistics:
    """Mean and covariance of one image set's features (clean-fid's ``mu`` / ``sigma``).

    ``features`` is kept for small sets (exact low-rank FID, KID); ``count`` may be None for
    statistics read from a clean-fid file that does not record it.
    """

    mean: Tensor
    covariance: Tensor | None = None
    count: int | None = None
    features: Tensor | None = None

    @classmethod
    def from_features(cls, features: Tensor) -> FeatureStatistics:
        features = features.detach().float()
        if features.shape[0] < 2:
            raise ValueError("feature statistics need at least 2 images")
        return cls(mean=features.double().mean(0), covariance=None, count=int(features.shape[0]), features=features)

    @classmethod
    def from_sums(cls, total: Tensor, outer: Tensor, count: int, features: Tensor | None = None) -> FeatureStatistics:
        if count < 2:
            raise ValueError(f"feature statistics need at least 2 images, got {count}")
        mean = total.double() / count
        covariance = (outer.double() - count * torch.outer(mean, mean)) / (count - 1)
        covariance = (covariance + covariance.T) / 2
        # Features stay float32 (half the memory); the distance computations promote them to float64.
        return cls(
            mean=mean, covariance=covariance, count=count, features=None if features is None else features.float()
        )

    def cov(self) -> Tensor:
        """The covariance (computed from the kept features when only those exist)."""
        if self.covariance is None:
            assert self.features is not None
            centered = self.features.double() - self.mean
            self.covariance = centered.T @ centered / (centered.shape[0] - 1)
        return self.covariance

    def to(self, device: str | torch.device) -> FeatureStatistics:
        move = lambda t: None if t is None else t.to(device)
        return FeatureStatistics(move(self.mean), move(self.covariance), self.count, move(self.features))

    # clean-fid's custom-stats file keys are ``mu`` and ``sigma``; we add ``num_images`` and ``feats``
    # (the key clean-fid's KID statistics use) so small reference sets keep their exact features.
    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = {"mu": self.mean.cpu().numpy(), "sigma": self.cov().cpu().numpy()}
        if self.count is not None:
            arrays["num_images"] = np.array(self.count)
        if self.features is not None:
            arrays["feats"] = self.features.float().cpu().numpy()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
        os.close(fd)
        try:
            np.savez_compressed(tmp, **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, what: str = "eval.fid.reference_stats") -> FeatureStatistics:
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(
                f"{what}: {path} does not exist; create it with "
                "`xa-eval fid-stats --real DIR --name NAME` or point it at a clean-fid .npz"
            )
        try:
            with np.load(path) as data:
                mean = torch.from_numpy(np.asarray(data["mu"], dtype=np.float64))
                sigma = torch.from_numpy(np.asarray(data["sigma"], dtype=np.float64))
                count = int(data["num_images"]) if "num_images" in data else None
                feats = torch.from_numpy(np.asarray(data["feats"], dtype=np.float32)) if "feats" in data else None
        except (KeyError, ValueError, OSError) as exc:
            raise UserError(f"{what}: {path} is not an FID statistics file with 'mu' and 'sigma' ({exc})") from exc
        if count is None and feats is not None:
            count = int(feats.shape[0])
        return cls(mean=mean, covariance=sigma, count=count, features=feats)


def stats_path(name_or_path: str | os.PathLike) -> Path:
    """A statistics file: an existing path as given, else ``<cache>/fid_stats/<name>.npz``."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".npz" or path.is_file() or os.sep in str(name_or_path):
        return path
    return cache_dir() / "fid_stats" / f"{name_or_path}.npz"


def trace_sqrt_product(sigma1: Tensor, sigma2: Tensor) -> Tensor:
    """``Tr sqrt(sigma1 @ sigma2)`` for symmetric PSD matrices, via ``sqrt(s1) s2 sqrt(s1)`` (symmetric)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(sigma1.double())
    root = (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T
    inner = root @ sigma2.double() @ root
    inner_eigenvalues = torch.linalg.eigvalsh((inner + inner.T) / 2)
    return inner_eigenvalues.clamp(min=0).sqrt().sum()


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics, low_rank_max_images: int = 1024) -> float:
    """``||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr sqrt(S_a S_b)`` (clean-fid's FID formula).

    With both sets' features available and small, ``Tr sqrt(S_a S_b)`` is the nuclear norm of
    ``A B^T`` (``A``, ``B``: centred features / sqrt(n - 1)); exact, and an n x n problem.
    """
    device = a.mean.device
    b = b.to(device)
    diff = a.mean.double() - b.mean.double()
    small = (
        a.features is not None
        and b.features is not None
        and a.count is not None
        and b.count is not None
        and max(a.count, b.count) <= low_rank_max_images
    )
    if small:
        centered_a = (a.features.double() - a.mean) / max(a.count - 1, 1) ** 0.5
        centered_b = (b.features.double() - b.mean) / max(b.count - 1, 1) ** 0.5
        trace_a = centered_a.square().sum()
        trace_b = centered_b.square().sum()
        trace_cross = torch.linalg.svdvals(centered_a @ centered_b.T).sum()
    else:
        sigma_a, sigma_b = a.cov().double(), b.cov().double()
        trace_a, trace_b = torch.trace(sigma_a), torch.trace(sigma_b)
        trace_cross = trace_sqrt_product(sigma_a, sigma_b)
    return float(diff.dot(diff) + trace_a + trace_b - 2 * trace_cross)


def resolve_reference(reference: FeatureStatistics | str | os.PathLike) -> FeatureStatistics:
    """Statistics as given, or loaded from a ``.npz`` path / a name cached by ``xa-eval fid-stats``."""
    if isinstance(reference, FeatureStatistics):
        return reference
    return FeatureStatistics.load(stats_path(reference))


# ---------------------------------------------------------------------------------------------- metrics
class InceptionStatistics(InceptionMetric):
    """Streaming mean and covariance of one image set's Inception features (:meth:`statistics`).

    ``update(images)`` takes uint8 ``(B, 3, H, W)``; ``update_features`` takes features directly. Sets of
    at most ``keep_features_up_to`` images also keep their features (exact low-rank FID, KID).
    """

    name = "inception_statistics"

    def __init__(
        self,
        feature_extractor: FeatureExtractor | None = None,
        weights_dir: str | os.PathLike | None = None,
        feature_dim: int = FEATURE_DIM,
        keep_features_up_to: int = 1024,
        **kwargs: Any,
    ) -> None:
        super().__init__(feature_extractor, weights_dir, feature_dim, **kwargs)
        self.keep_features_up_to = keep_features_up_to
        self.add_state("feature_sum", torch.zeros(feature_dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("outer_sum", torch.zeros(feature_dim, feature_dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("overflow", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("kept_features", [], dist_reduce_fx="cat")

    @classmethod
    def from_config(cls, cfg: Any, context: MetricContext) -> InceptionStatistics:
        return cls(weights_dir=cfg.fid.weights_dir, keep_features_up_to=cfg.fid.low_rank_max_images)

    def _add_features(self, features: Tensor) -> None:
        as_double = features.double()
        self.feature_sum = self.feature_sum + as_double.sum(0)
        self.outer_sum = self.outer_sum + as_double.T @ as_double
        self.count = self.count + features.shape[0]
        if int(self.overflow) == 0:
            if int(self.count) <= self.keep_features_up_to:
                self.kept_features.append(features)
            else:  # too many to keep: drop the buffer, the sums carry on alone
                self.overflow = torch.tensor(1, dtype=torch.long, device=self.device)
                self.kept_features = [torch.zeros(0, self.feature_dim, device=self.device)]

    def _statistics(self) -> FeatureStatistics:
        count = int(self.count)
        if count < 2:
            raise ValueError(f"{self.name} needs at least 2 images, got {count}")
        kept = self.kept_features
        kept = dim_zero_cat(kept) if isinstance(kept, list) and kept else kept
        usable = int(self.overflow) == 0 and isinstance(kept, Tensor) and kept.ndim == 2 and kept.shape[0] == count
        return FeatureStatistics.from_sums(self.feature_sum, self.outer_sum, count, features=kept if usable else None)

    def statistics(self) -> FeatureStatistics:
        """The statistics over all ranks (pairwise FID, real statistics, cached reference statistics)."""
        with self.sync_context(should_sync=self._to_sync, should_unsync=True):
            return self._statistics()

    def compute(self) -> FeatureStatistics:
        return self._statistics()


class FrechetInceptionDistance(InceptionStatistics):
    """FID (clean-fid compatible) of the generated images against fixed real statistics.

    ``reference``: a :class:`FeatureStatistics`, a ``.npz`` path or a name cached by ``xa-eval fid-stats``.
    """

    name = "fid"
    higher_is_better = False
    needs = frozenset({REAL_STATISTICS})

    def __init__(
        self,
        feature_extractor: FeatureExtractor | None = None,
        *,
        reference: FeatureStatistics | str | os.PathLike,
        weights_dir: str | os.PathLike | None = None,
        feature_dim: int = FEATURE_DIM,
        low_rank_max_images: int = 1024,
        **kwargs: Any,
    ) -> None:
        super().__init__(feature_extractor, weights_dir, feature_dim, keep_features_up_to=low_rank_max_images, **kwargs)
        self.reference = resolve_reference(reference)

    @classmethod
    def from_config(cls, cfg: Any, context: MetricContext) -> FrechetInceptionDistance:
        return cls(
            reference=require(context.real_statistics, "real statistics", cls.name),
            weights_dir=cfg.fid.weights_dir,
            low_rank_max_images=cfg.fid.low_rank_max_images,
        )

    def compute(self) -> Tensor:
        value = frechet_distance(self._statistics(), self.reference.to(self.device), self.keep_features_up_to)
        return torch.tensor(value, dtype=torch.float64)


def compute_statistics(
    images: Any,
    feature_extractor: FeatureExtractor | None = None,
    batch_size: int = 32,
    weights_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    keep_features_up_to: int = 10_000,
    limit: int | None = None,
    progress: bool = False,
) -> FeatureStatistics:
    """Feature statistics of the first ``limit`` images of a folder, a uint8 tensor or a list of images.

    Folders are decoded and resized on the worker pool one batch ahead of the network (they need
    clean-fid's extractor, :func:`~xa_lightning.metrics.inception.get_inception`). Under an initialised
    process group each rank takes every world-th image and the statistics are reduced over the ranks.
    """
    from tqdm.auto import tqdm

    rank, world = dist_info()
    metric = InceptionStatistics(feature_extractor, weights_dir, keep_features_up_to=keep_features_up_to).to(device)
    if isinstance(images, (str, os.PathLike)):
        files = list_image_files(images, "real image folder")[:limit][rank::world]
        extractor = feature_extractor or get_inception(weights_dir, device)
        features: Iterator[Tensor] = extractor.folder_features(files, batch_size)
        total = len(files)
    else:
        if isinstance(images, Tensor):
            mine: Sequence[Tensor] = (images if images.ndim == 4 else images.unsqueeze(0))[:limit][rank::world]
        else:
            flat = [image for item in images for image in (item if item.ndim == 4 else item.unsqueeze(0))]
            mine = flat[:limit][rank::world]
        features = (metric.extract(batch.to(device)) for batch in iterate_batches(mine, batch_size))
        total = len(mine)
    bar = tqdm(total=total, desc="FID statistics", unit="img", leave=False, disable=not progress or rank != 0)
    for batch in features:
        metric.update_features(batch)
        bar.update(batch.shape[0])
    bar.close()
    return metric.statistics()
