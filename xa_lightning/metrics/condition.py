"""Condition fidelity for ControlNet-driven runs: edge F1 between the control edges and the image's edges.

Both edge maps are compared at one resolution, the control's: the generated image is resized to it
(bicubic, antialiased, like the evaluation references) and its edges come from OpenCV's Canny with the
thresholds of the ControlNet canny preprocessor (100 / 200), i.e. the detector that made the control
map. Upsampling the (thin) control edges to the image instead would thicken them. The reference is
either the control edge map itself (``references="edges"``, binarised at 128) or a photo whose Canny
edges at that resolution are the target (``"image"``). An edge pixel counts as matched when the other
map has an edge within ``radius`` pixels (Euclidean), the usual tolerance of boundary F1:

    precision = |generated edges near a control edge| / |generated edges|
    recall    = |control edges near a generated edge| / |control edges|
    F1        = 2 P R / (P + R)          (1 when both maps are empty, 0 when exactly one is)

The metric is the mean per-image F1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from xa_lightning.errors import UserError
from xa_lightning.metrics.base import REFERENCES, MeanScore, MetricContext, require
from xa_lightning.metrics.images import check_uint8_images, resize, to_numpy_nhwc, to_uint8

REFERENCE_KINDS = ("edges", "image")


def canny_edges(image: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Boolean edge map of an RGB uint8 ``(H, W, 3)`` image (OpenCV Canny on the grayscale image)."""
    import cv2

    gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    return cv2.Canny(gray, low, high) > 0


def disk_kernel(radius: int) -> np.ndarray:
    """uint8 Euclidean disk ``x^2 + y^2 <= r^2`` (OpenCV's MORPH_ELLIPSE is not exactly a disk)."""
    offsets = np.arange(-radius, radius + 1)
    return (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2).astype(np.uint8)


def edge_f1(predicted: np.ndarray, target: np.ndarray, radius: int = 2) -> float:
    """Boundary F1 of two boolean edge maps with a tolerance disk of ``radius`` pixels."""
    import cv2

    if predicted.shape != target.shape:
        raise ValueError(f"edge maps differ in shape: {predicted.shape} vs {target.shape}")
    n_predicted, n_target = int(predicted.sum()), int(target.sum())
    if n_predicted == 0 and n_target == 0:
        return 1.0
    if n_predicted == 0 or n_target == 0:
        return 0.0
    if radius > 0:
        disk = disk_kernel(radius)
        near_target = cv2.dilate(target.astype(np.uint8), disk) > 0
        near_predicted = cv2.dilate(predicted.astype(np.uint8), disk) > 0
    else:
        near_target, near_predicted = target, predicted
    precision = float((predicted & near_target).sum()) / n_predicted
    recall = float((target & near_predicted).sum()) / n_target
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


class EdgeF1(MeanScore):
    """Mean per-image edge F1 between the references' edges and Canny edges of the generated images.

    ``update(images, references=control)``: uint8 ``(B, 3, H, W)`` images and references (uint8 or float
    in [0, 1], 1 or 3 channels, any resolution: the comparison runs at the references' resolution).
    """

    name = "edge_f1"
    higher_is_better = True
    needs = frozenset({REFERENCES})

    def __init__(
        self,
        low_threshold: int = 100,
        high_threshold: int = 200,
        radius: int = 2,
        references: str = "edges",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if references not in REFERENCE_KINDS:
            raise UserError(f"eval.edge.references={references!r}: choose {' or '.join(REFERENCE_KINDS)}")
        self.low_threshold, self.high_threshold, self.radius = low_threshold, high_threshold, radius
        self.references = references

    @classmethod
    def from_config(cls, cfg: Any, context: MetricContext) -> EdgeF1:
        edge = cfg.edge
        return cls(edge.low_threshold, edge.high_threshold, edge.radius, edge.references)

    def target_edges(self, reference: np.ndarray) -> np.ndarray:
        """The boolean edge map a reference ``(h, w, 3)`` stands for."""
        if self.references == "edges":
            return reference.max(axis=2) >= 128
        return canny_edges(reference, self.low_threshold, self.high_threshold)

    def score(self, images: Tensor, prompts: Sequence[str] | None = None, references: Tensor | None = None) -> Tensor:
        check_uint8_images(images)
        references = to_uint8(require(references, "references (control maps)", self.name))
        if references.shape[0] != images.shape[0]:
            raise ValueError(f"{references.shape[0]} control maps for {images.shape[0]} images")
        images = resize(images, *references.shape[-2:])
        scores = [
            edge_f1(
                canny_edges(image, self.low_threshold, self.high_threshold), self.target_edges(reference), self.radius
            )
            for image, reference in zip(to_numpy_nhwc(images), to_numpy_nhwc(references))
        ]
        return torch.tensor(scores, dtype=torch.float64)
