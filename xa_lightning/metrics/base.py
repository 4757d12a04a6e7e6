"""The one evaluation-metric protocol: ``update(images, prompts, references)``, needs declared up front.

Every metric of ``eval.metrics`` is a torchmetrics ``Metric`` subclass of :class:`EvaluationMetric`:

* ``update(images, prompts=None, references=None)`` with the generated uint8 ``(B, 3, H, W)`` images,
  their prompts and their references (uint8 ``(B, 3, h, w)``: the evaluation references, or another
  sampler's images for the same prompts and seeds when the metric needs :data:`OTHER_SAMPLER`);
  afterwards ``last_scores`` holds this batch's per-image values by logged name (may be empty);
* ``results()``: the logged scalars, ``{log_name: value, ...}`` (synchronised across DDP ranks);
* ``needs``: what the evaluation must supply (:data:`PROMPTS`, :data:`REFERENCES`,
  :data:`REAL_STATISTICS`, :data:`OTHER_SAMPLER`); the config checks and ``evaluate_samplers`` read it;
* ``prepare(cfg, device)``: fetch / check what it needs (weights, model folders) before anything is
  generated (the evaluation callback calls it in ``setup``); ``from_config(cfg, context)``: the metric
  for one sampler, or None when it does not apply to that sampler.

``xa_lightning/metrics/registry.py`` maps each config name to its class.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric

if TYPE_CHECKING:
    from xa_lightning.metrics.config import EvaluationConfig
    from xa_lightning.metrics.fid import FeatureStatistics

PROMPTS = "prompts"
REFERENCES = "references"
REAL_STATISTICS = "real statistics"
OTHER_SAMPLER = "another sampler"  # references = the images of eval.style_reference's sampler


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def mark_updated(metric: Metric) -> None:
    """State changed outside ``update`` (``update_features``): drop torchmetrics' cached ``compute`` value
    and count the update, as torchmetrics' wrapped ``update`` does."""
    metric._computed = None
    metric._update_count += 1


@dataclass
class MetricContext:
    """What building a metric for one sampler may use beyond the config."""

    sampler: str
    device: torch.device
    real_statistics: FeatureStatistics | None = None


class EvaluationMetric(Metric):
    """Base of every evaluation metric (see the module docstring for the protocol)."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.last_scores: dict[str, Tensor] = {}

    @classmethod
    def prepare(cls, cfg: EvaluationConfig, device: torch.device) -> None:
        """Fetch or check what this metric needs (weights, model folders); one-line UserError when missing."""

    @classmethod
    def from_config(cls, cfg: EvaluationConfig, context: MetricContext) -> EvaluationMetric | None:
        raise NotImplementedError

    @property
    def log_name(self) -> str:
        return self.name

    @property
    def trained(self) -> bool:
        """False when the metric's network has no real weights (its numbers then mean nothing)."""
        return True

    def results(self) -> dict[str, float]:
        return {self.log_name: float(self.compute())}

    def update(self, images: Tensor, prompts: Sequence[str] | None = None, references: Tensor | None = None) -> None:
        raise NotImplementedError

    def compute(self) -> Any:
        raise NotImplementedError


def require(value: Any, what: str, metric: str) -> Any:
    if value is None:
        raise ValueError(f"{metric} needs {what}")
    return value


class MeanScore(EvaluationMetric):
    """A metric that is the mean of a per-image score (:meth:`score`), accumulated as a float64 sum and a count."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def score(self, images: Tensor, prompts: Sequence[str] | None = None, references: Tensor | None = None) -> Tensor:
        """Per-image scores ``(B,)``, without changing the state."""
        raise NotImplementedError

    def update(self, images: Tensor, prompts: Sequence[str] | None = None, references: Tensor | None = None) -> None:
        scores = self.score(images, prompts, references)
        self.score_sum = self.score_sum + scores.double().sum().to(self.device)
        self.count = self.count + scores.numel()
        self.last_scores = {self.log_name: scores}

    def compute(self) -> Tensor:
        if int(self.count) == 0:
            raise ValueError(f"{self.log_name}: no images were scored")
        return self.score_sum / self.count


def image_key(image: Tensor) -> bytes:
    """A content key of one image (its bytes' digest and its shape)."""
    array = image.detach().cpu().contiguous().numpy()
    return hashlib.blake2b(array.tobytes(), digest_size=16).digest() + bytes(str(array.shape), "ascii")


class ReferenceCache:
    """Results per reference image, by content: a reference that serves several generations (A4A: 4 per
    reference) is processed once. ``compute`` takes a ``(K, 3, h, w)`` batch of distinct references and
    returns one result each; least recently used entries beyond ``size`` are dropped."""

    def __init__(self, compute: Callable[[Tensor], Sequence[Any]], size: int = 4096) -> None:
        self._compute = compute
        self._size = size
        self._entries: OrderedDict[bytes, Any] = OrderedDict()

    def __call__(self, references: Tensor) -> list[Any]:
        keys = [image_key(reference) for reference in references]
        found: dict[bytes, Any] = {}
        missing: dict[bytes, int] = {}
        for index, key in enumerate(keys):
            if key in self._entries:
                self._entries.move_to_end(key)
                found[key] = self._entries[key]
            elif key not in missing:
                missing[key] = index
        if missing:
            computed = self._compute(references[list(missing.values())])
            found.update(zip(missing, computed))
            self._entries.update(zip(missing, computed))
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return [found[key] for key in keys]
