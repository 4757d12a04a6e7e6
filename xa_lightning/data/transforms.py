"""Crops, resizes and tensors: the same crop at several resolutions, SDXL micro-conditioning, references."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from xa_lightning.data.counters import SampleSkipped
from xa_lightning.errors import UserError

RESAMPLE = Image.Resampling.BICUBIC
Box = tuple[float, float, float, float]  # left, top, right, bottom in pixels


def to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float (3, H, W) in [-1, 1]."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return array.float().div_(127.5).sub_(1.0)


def to_unit(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float (3, H, W) in [0, 1]."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return array.float().div_(255.0)


def pixels_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 (same shape)."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@dataclass
class ImageViews:
    """One square crop of an image, resized to ``resolution`` and to every extra resolution.

    The crop is chosen once, in the coordinates of the image resized so that its short side equals the
    largest resolution, and cut from the decoded image for each resolution (so ``pixels`` and
    ``pixels_1024`` show exactly the same content). Emits SDXL micro-conditioning for ``resolution``
    (``original_size``, ``crop_top_left``, ``target_size``) and, for each extra resolution R,
    ``crop_top_left_<R>`` / ``target_size_<R>``.
    """

    resolution: int
    extra_resolutions: Sequence[int] = ()
    crop: str = "random"  # random | center
    random_flip: bool = False
    upscale_small: bool = True
    _all: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.crop not in ("random", "center"):
            raise UserError(f"data.crop={self.crop!r}: choose random or center")
        resolutions = [int(self.resolution), *[int(r) for r in self.extra_resolutions]]
        if any(r <= 0 for r in resolutions):
            raise UserError(f"data.resolution / data.extra_resolutions must be positive, got {resolutions}")
        self._all = tuple(resolutions)

    @property
    def largest(self) -> int:
        return max(self._all)

    def __call__(
        self, image: Image.Image, original_size: tuple[int, int], rng: np.random.Generator
    ) -> tuple[dict[str, Any], list[str]]:
        """``original_size``: (h, w) of the image as stored (before any reduced-scale decode)."""
        conversions: list[str] = []
        width, height = image.size
        target = self.largest
        if min(original_size) < target:
            if not self.upscale_small:
                raise SampleSkipped(
                    "too_small", f"{original_size[1]}x{original_size[0]} < {target} (data.upscale_small=false)"
                )
            conversions.append("upscaled")
        # Crop coordinates live in the original image resized to short side = target (SDXL's convention);
        # the decoded image may be smaller (reduced-scale JPEG decode), so map the box onto it.
        orig_h, orig_w = original_size
        scale = target / min(orig_w, orig_h)
        resized_w, resized_h = max(target, round(orig_w * scale)), max(target, round(orig_h * scale))
        if self.crop == "random":
            top = int(rng.integers(0, resized_h - target + 1))
            left = int(rng.integers(0, resized_w - target + 1))
        else:
            top, left = (resized_h - target) // 2, (resized_w - target) // 2
        flip = bool(self.random_flip and rng.random() < 0.5)
        to_decoded_x, to_decoded_y = width / (orig_w * scale), height / (orig_h * scale)
        box: Box = (
            max(0.0, left * to_decoded_x),
            max(0.0, top * to_decoded_y),
            min(float(width), (left + target) * to_decoded_x),
            min(float(height), (top + target) * to_decoded_y),
        )
        out: dict[str, Any] = {"original_size": torch.tensor(original_size, dtype=torch.long)}
        for i, res in enumerate(self._all):
            view = image.resize((res, res), resample=RESAMPLE, box=box, reducing_gap=3.0)
            if flip:
                view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            ratio = res / target
            crop_left = (resized_w - target - left) if flip else left
            crop = torch.tensor([round(top * ratio), round(crop_left * ratio)], dtype=torch.long)
            size = torch.tensor([res, res], dtype=torch.long)
            suffix = "" if i == 0 else f"_{res}"
            out[f"pixels{suffix}"] = to_pixels(view)
            out[f"crop_top_left{suffix}"], out[f"target_size{suffix}"] = crop, size
        return out, conversions


def square_around(box: Box, image_size: tuple[int, int], margin: float = 0.1) -> Box:
    """A square around ``box`` (grown by ``margin`` of its longer side), moved inside the image if possible."""
    width, height = image_size
    left, top, right, bottom = box
    side = max(right - left, bottom - top) * (1.0 + 2 * margin)
    side = min(side, float(max(width, height)))
    cx, cy = (left + right) / 2, (top + bottom) / 2
    x0, y0 = cx - side / 2, cy - side / 2
    # shift inside the image where the square fits; pad (outside pixels) otherwise
    if side <= width:
        x0 = min(max(x0, 0.0), width - side)
    if side <= height:
        y0 = min(max(y0, 0.0), height - side)
    return (x0, y0, x0 + side, y0 + side)


def center_square(image_size: tuple[int, int]) -> Box:
    width, height = image_size
    side = min(width, height)
    return ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)


def reference_tensor(image: Image.Image, size: int, box: Box | None = None) -> torch.Tensor:
    """The IP reference: ``box`` (default: the centre square) resized to ``size`` x ``size``, in [0, 1].

    Parts of the box outside the image are filled with mid grey.
    """
    box = box or center_square(image.size)
    left, top, right, bottom = box
    if left < 0 or top < 0 or right > image.width or bottom > image.height:
        canvas = Image.new("RGB", (round(right - left), round(bottom - top)), (128, 128, 128))
        canvas.paste(image, (round(-left), round(-top)))
        image, box = canvas, (0.0, 0.0, float(canvas.width), float(canvas.height))
    view = image.resize((size, size), resample=RESAMPLE, box=box, reducing_gap=3.0)
    return to_unit(view)


def sample_rng(seed: int, *parts: int) -> np.random.Generator:
    """A generator that depends only on the seed and the given integers (epoch, index, ...)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *[int(p) & 0xFFFFFFFF for p in parts]])


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep strings (and other values) as lists."""
    if not samples:
        raise ValueError("collate: empty batch")
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch
