"""Condition fidelity for depth-driven runs (ControlNet / T2I-Adapter depth): ``depth_rmse``.

ControlNet's "condition reconstruction": the depth of each generated image is estimated again and compared
with the depth map that conditioned it. The estimator is a transformers depth-estimation model (DPT, e.g.
``Intel/dpt-hybrid-midas``, the MiDaS model ControlNet's depth annotator uses, or Depth Anything) from a hub
id or a local directory (``eval.depth.model``). Its relative inverse depth (near = large) is resized to the
reference's resolution (bicubic), and both maps are min-max normalised per image to [0, 1], the convention
in which the annotator writes control maps (near = white). The reference is the depth map itself
(``references="depth"``, its luminance) or a photo whose estimated depth is the target (``"image"``):

    depth_rmse = mean over images of sqrt(mean over pixels (d_generated - d_reference)^2)     (lower is better)

Without the estimator's weights (not in the local cache, the hub unreachable) the metric is skipped with one
logged line, unless ``eval.depth.require_pretrained`` makes that an error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from xa_lightning.config import coerce_options
from xa_lightning.errors import UserError
from xa_lightning.metrics.base import REFERENCES, MeanScore, MetricContext, require
from xa_lightning.metrics.images import check_uint8_images, to_numpy_nhwc, to_uint8

log = logging.getLogger(__name__)

REFERENCE_KINDS = ("depth", "image")
HUB_HOST = "huggingface.co"


@dataclass
class DepthConfig:
    """``eval.depth``: ``model`` (hub id or local dir of a transformers depth-estimation model),
    ``references`` (depth: the references are depth maps | image: photos, their depth estimated too),
    ``require_pretrained`` (an error instead of skipping the metric when the weights are absent)."""

    model: str = "Intel/dpt-hybrid-midas"
    references: str = "depth"
    require_pretrained: bool = False

    def __post_init__(self) -> None:
        if self.references not in REFERENCE_KINDS:
            raise UserError(f"eval.depth.references={self.references!r}: choose {' or '.join(REFERENCE_KINDS)}")


def depth_config(cfg: Any) -> DepthConfig:
    """The ``depth`` section of an evaluation config (defaults when it has none)."""
    return coerce_options(getattr(cfg, "depth", None), DepthConfig, "eval.depth")


class DepthEstimator:
    """A transformers depth-estimation model and its image processor, on uint8 ``(B, 3, H, W)`` images."""

    def __init__(self, model: torch.nn.Module, processor: Any, source: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.source = source

    @torch.no_grad()
    def __call__(self, images: Tensor, size: tuple[int, int]) -> Tensor:
        """Relative inverse depth ``(B, h, w)`` (float32) at ``size``."""
        device = next(self.model.parameters()).device
        inputs = self.processor(images=list(to_numpy_nhwc(images)), return_tensors="pt").to(device)
        depth = self.model(**inputs).predicted_depth.float()
        return F.interpolate(depth[:, None], size=size, mode="bicubic", align_corners=False)[:, 0]


_ESTIMATORS: dict[tuple[str, str], DepthEstimator | None] = {}
_SKIPPED: set[str] = set()


def _from_pretrained(source: str, local_files_only: bool) -> DepthEstimator:
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    model = AutoModelForDepthEstimation.from_pretrained(source, local_files_only=local_files_only)
    processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_files_only)
    return DepthEstimator(model, processor, source)


def load_depth_estimator(model: str, device: str | torch.device = "cpu") -> DepthEstimator | None:
    """The estimator from a local directory, the hub cache or (when it answers) the hub; None when absent.

    A local directory that exists but does not load is a UserError (a broken download is not "absent").
    """
    key = (str(model), str(torch.device(device)))
    if key in _ESTIMATORS:
        return _ESTIMATORS[key]
    local = Path(model).expanduser()
    estimator = None
    if local.exists():
        try:
            estimator = _from_pretrained(str(local), local_files_only=True)
        except (OSError, ValueError) as error:
            raise UserError(
                f"eval.depth.model={model} is not a transformers depth-estimation model directory "
                f"({type(error).__name__}); save one with model.save_pretrained / processor.save_pretrained"
            ) from None
    elif not str(model).startswith((".", "/", "~")):
        from xa_lightning.metrics.weights import host_reachable

        for local_files_only in (True, False):  # the hub cache first; the hub itself only when it answers
            if not local_files_only and not host_reachable(HUB_HOST):
                break
            try:
                estimator = _from_pretrained(str(model), local_files_only=local_files_only)
                break
            except (OSError, ValueError):
                continue
    if estimator is not None:
        estimator.model.to(device)
    _ESTIMATORS[key] = estimator
    return estimator


def minmax(depth: Tensor) -> Tensor:
    """Each map of ``(B, h, w)`` scaled to [0, 1] (a constant map becomes 0)."""
    low = depth.amin(dim=(1, 2), keepdim=True)
    span = depth.amax(dim=(1, 2), keepdim=True) - low
    return (depth - low) / span.clamp_min(torch.finfo(depth.dtype).tiny)


def luminance(images: Tensor) -> Tensor:
    """uint8 ``(B, 3, h, w)`` -> float ``(B, h, w)`` in [0, 1] (ITU-R 601, as PIL's ``convert("L")``)."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() * weights).sum(dim=1) / 255.0


class DepthRMSE(MeanScore):
    """Mean per-image RMSE between the generated images' estimated depth and the reference depth, both
    min-max normalised, at the references' resolution.

    ``update(images, references=depth_maps)``: uint8 ``(B, 3, H, W)`` images; references uint8 or float in
    [0, 1], any resolution (the comparison runs at theirs).
    """

    name = "depth_rmse"
    higher_is_better = False
    needs = frozenset({REFERENCES})

    def __init__(self, estimator: DepthEstimator, references: str = "depth", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if references not in REFERENCE_KINDS:
            raise UserError(f"eval.depth.references={references!r}: choose {' or '.join(REFERENCE_KINDS)}")
        self.__dict__["estimator"] = estimator  # not a submodule: its weights stay out of the metric's state
        self.references = references

    @classmethod
    def _estimator(cls, cfg: Any, device: torch.device) -> DepthEstimator | None:
        options = depth_config(cfg)
        estimator = load_depth_estimator(options.model, device)
        if estimator is None:
            message = (
                f"{cls.name} skipped: no weights for the depth estimator eval.depth.model={options.model} (not a "
                "local directory, not in the hub cache, the hub unreachable); give a local copy"
            )
            if options.require_pretrained:
                raise UserError(message.replace(" skipped:", ":", 1) + " or set eval.depth.require_pretrained=false")
            if options.model not in _SKIPPED:
                _SKIPPED.add(options.model)
                log.warning(message)
        return estimator

    @classmethod
    def prepare(cls, cfg: Any, device: torch.device) -> None:
        cls._estimator(cfg, device)  # loads it (shared with the evaluation), or says once that it is skipped

    @classmethod
    def from_config(cls, cfg: Any, context: MetricContext) -> DepthRMSE | None:
        estimator = cls._estimator(cfg, context.device)
        return None if estimator is None else cls(estimator, depth_config(cfg).references)

    def reference_depth(self, references: Tensor) -> Tensor:
        """The normalised target depth ``(B, h, w)`` of uint8 references."""
        if self.references == "depth":
            return minmax(luminance(references))
        return minmax(self.estimator(references, tuple(references.shape[-2:])).cpu())

    def score(self, images: Tensor, prompts: Sequence[str] | None = None, references: Tensor | None = None) -> Tensor:
        check_uint8_images(images)
        references = to_uint8(require(references, "references (depth maps)", self.name))
        if references.shape[0] != images.shape[0]:
            raise ValueError(f"{references.shape[0]} depth maps for {images.shape[0]} images")
        generated = minmax(self.estimator(images, tuple(references.shape[-2:])).cpu())
        target = self.reference_depth(references)
        return (generated - target).pow(2).mean(dim=(1, 2)).sqrt().double()
