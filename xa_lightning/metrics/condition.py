"""Condition fidelity for ControlNet-driven runs: edge F1 between the control edge map and the image's edges.

The generated image's edges come from OpenCV's Canny (thresholds 100 / 200 by default, those of the
ControlNet canny preprocessor); the control map is binarised at 128. An edge pixel counts as matched
when the other map has an edge within ``radius`` pixels (Euclidean), the usual tolerance of boundary F1:

    precision = |generated edges near a control edge| / |generated edges|
    recall    = |control edges near a generated edge| / |control edges|
    F1        = 2 P R / (P + R)          (1 when both maps are empty, 0 when exactly one is)

The metric is the mean per-image F1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from xa_lightning.metrics.fid import _mark_updated
from xa_lightning.metrics.images import check_uint8_images, to_numpy_hwc, to_uint8


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


class EdgeF1(Metric):
    """Mean per-image edge F1 between control edge maps and Canny edges of the generated images.

    ``update(images, control)``: uint8 ``(B, 3, H, W)`` images and control maps (uint8 or float in
    [0, 1], 1 or 3 channels; resized with nearest neighbour to the image size when they differ).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    log_name = "edge_f1"

    def __init__(self, low_threshold: int = 100, high_threshold: int = 200, radius: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.low_threshold, self.high_threshold, self.radius = low_threshold, high_threshold, radius
        self.add_state("f1_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def score(self, images: Tensor, control: Tensor) -> Tensor:
        import cv2

        check_uint8_images(images)
        control = to_uint8(control)
        if control.shape[0] != images.shape[0]:
            raise ValueError(f"{control.shape[0]} control maps for {images.shape[0]} images")
        scores = []
        for image, control_map in zip(images, control):
            image_np = to_numpy_hwc(image)
            control_np = to_numpy_hwc(control_map).max(axis=2)
            if control_np.shape != image_np.shape[:2]:
                control_np = cv2.resize(
                    control_np, (image_np.shape[1], image_np.shape[0]), interpolation=cv2.INTER_NEAREST
                )
            predicted = canny_edges(image_np, self.low_threshold, self.high_threshold)
            scores.append(edge_f1(predicted, control_np >= 128, self.radius))
        return torch.tensor(scores, dtype=torch.float64)

    def update(self, images: Tensor, control: Tensor) -> None:
        self.accumulate(self.score(images, control))

    def accumulate(self, scores: Tensor) -> None:
        """Add the per-image F1 values of :meth:`score` to the state."""
        _mark_updated(self)
        self.f1_sum = self.f1_sum + scores.sum().to(self.device)
        self.count = self.count + scores.numel()

    def compute(self) -> Tensor:
        if int(self.count) == 0:
            raise ValueError("edge_f1: no images were scored")
        return self.f1_sum / self.count
