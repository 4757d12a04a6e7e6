"""Edge F1 (ControlNet condition fidelity) against a brute-force reference and on a real photo."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xa_lightning.metrics.condition import EdgeF1, canny_edges, edge_f1

from .conftest import photo


def _reference_f1(predicted: np.ndarray, target: np.ndarray, radius: float) -> float:
    """Boundary F1 by brute force: a pixel matches if the other map has a pixel within Euclidean radius."""
    p_points, t_points = np.argwhere(predicted), np.argwhere(target)
    if len(p_points) == 0 and len(t_points) == 0:
        return 1.0
    if len(p_points) == 0 or len(t_points) == 0:
        return 0.0
    distances = np.sqrt(((p_points[:, None, :] - t_points[None, :, :]) ** 2).sum(-1))
    precision = float((distances.min(1) <= radius).mean())
    recall = float((distances.min(0) <= radius).mean())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


@pytest.mark.parametrize("radius", [0, 1, 2, 3])
def test_edge_f1_equals_brute_force_reference(radius):
    rng = np.random.default_rng(radius)
    for _ in range(5):
        predicted, target = rng.random((24, 24)) < 0.08, rng.random((24, 24)) < 0.08
        assert edge_f1(predicted, target, radius) == pytest.approx(_reference_f1(predicted, target, radius))
    empty = np.zeros((8, 8), bool)
    assert edge_f1(empty, empty, radius) == 1.0
    assert edge_f1(empty, ~empty, radius) == 0.0


def _edge_map(image: np.ndarray) -> torch.Tensor:
    edges = canny_edges(image).astype(np.uint8) * 255
    return torch.from_numpy(np.stack([edges] * 3)).unsqueeze(0)


def test_generated_image_following_the_control_scores_high_and_a_shifted_one_low():
    from PIL import Image

    image = np.asarray(Image.fromarray(photo("astronaut")).resize((128, 128), Image.BICUBIC)).copy()
    control = _edge_map(image)
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).unsqueeze(0)
    metric = EdgeF1(radius=2)
    score = lambda generated, reference: float(metric.score(as_tensor(generated), references=reference)[0])
    faithful = score(image, control)
    nudged = score(np.roll(image, 1, axis=1), control)  # within tolerance
    shifted = score(np.roll(image, 12, axis=1), control)  # far off
    other = np.asarray(Image.fromarray(photo("chelsea")).resize((128, 128), Image.BICUBIC)).copy()
    unrelated = score(other, control)
    blank = float(metric.score(torch.full((1, 3, 128, 128), 128, dtype=torch.uint8), references=control)[0])
    assert faithful == pytest.approx(1.0)
    assert faithful > nudged > 0.9 > shifted > unrelated
    assert blank == 0.0
    # control maps given as float [0, 1] at another resolution are accepted (compared at theirs)
    half = torch.nn.functional.interpolate(control.float() / 255, size=(64, 64), mode="nearest")
    assert 0.0 < float(metric.score(as_tensor(image), references=half)[0]) <= 1.0
    metric.update(
        torch.cat([as_tensor(image), as_tensor(np.roll(image, 12, axis=1))]), references=torch.cat([control] * 2)
    )
    assert float(metric.compute()) == pytest.approx((1.0 + shifted) / 2)
    assert metric.last_scores["edge_f1"].tolist() == pytest.approx([1.0, shifted])


@pytest.mark.parametrize("size", [256, 512])
def test_a_faithful_image_at_a_higher_resolution_than_its_control_scores_as_at_the_same(size):
    """Control maps are 224 px while images are 512-1024 px: the comparison runs at the control's
    resolution with the same Canny on both sides (upsampling the thin control edges thickened them:
    0.92 at 256 px and 0.74 at 512 px for this faithful image)."""
    from PIL import Image

    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).unsqueeze(0)
    small = np.asarray(Image.fromarray(photo("astronaut")).resize((128, 128), Image.BICUBIC)).copy()
    large = np.asarray(Image.fromarray(photo("astronaut")).resize((size, size), Image.BICUBIC)).copy()
    control = _edge_map(small)
    assert float(EdgeF1(radius=2).score(as_tensor(large), references=control)[0]) > 0.99
    # a photo as the reference: its Canny edges at its resolution are the target
    photo_reference = EdgeF1(radius=2, references="image")
    assert float(photo_reference.score(as_tensor(large), references=as_tensor(small))[0]) > 0.99
    shifted = np.roll(large, 12 * size // 128, axis=1)
    assert float(photo_reference.score(as_tensor(shifted), references=as_tensor(small))[0]) < 0.9
