"""Image plumbing shared by the metrics: validation, conversion, folder loading.

Every metric takes uint8 images ``(B, 3, H, W)`` (docs/contracts.md). Folders are read the way
clean-fid reads them (PIL, ``convert("RGB")``, the same file extensions, recursive, sorted), so a
metric on a folder sees exactly the pixels clean-fid would.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from xa_lightning.errors import UserError

# clean-fid's EXTENSIONS (cleanfid/utils.py), minus .npy which is not an image file.
IMAGE_EXTENSIONS = frozenset({"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"})

ImageBatches = torch.Tensor | Sequence[torch.Tensor] | Iterable[torch.Tensor]


def check_uint8_images(images: torch.Tensor, what: str = "images") -> torch.Tensor:
    """Return ``images`` if it is a uint8 ``(B, 3, H, W)`` tensor, else raise a ValueError saying why."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(
            f"{what} must be uint8 (B, 3, H, W) in [0, 255], got dtype {images.dtype}; "
            "convert with xa_lightning.metrics.images.to_uint8"
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{what} must have shape (B, 3, H, W), got {tuple(images.shape)}")
    return images


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` from uint8, or from float in [0, 1] (the data contract's ``reference``).

    Grayscale ``(B, 1, H, W)`` is repeated to three channels. Floats are rounded, not truncated.
    """
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, 1|3, H, W), got {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.dtype == torch.uint8:
        return images.contiguous()
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """float ``(B, 3, H, W)`` in [0, 1] from uint8 or float images (what samplers receive as references)."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float().clamp(0, 1)


def to_numpy_hwc(image: torch.Tensor) -> np.ndarray:
    """One uint8 ``(3, H, W)`` tensor as a contiguous uint8 ``(H, W, 3)`` array (RGB)."""
    return np.ascontiguousarray(image.detach().cpu().permute(1, 2, 0).numpy())


def iterate_batches(images: ImageBatches, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 batches from a ``(N, 3, H, W)`` tensor, or from a sequence of ``(3, H, W)`` / ``(B, 3, H, W)``.

    Images of different sizes (a folder) come one per batch-slot group of equal size.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images.unsqueeze(0)
        for start in range(0, images.shape[0], batch_size):
            yield to_uint8(images[start : start + batch_size])
        return
    pending: list[torch.Tensor] = []
    for item in images:
        item = to_uint8(item)
        for image in item:
            if pending and image.shape != pending[0].shape:
                yield torch.stack(pending)
                pending = []
            pending.append(image)
            if len(pending) == batch_size:
                yield torch.stack(pending)
                pending = []
    if pending:
        yield torch.stack(pending)


def list_image_files(folder: str | os.PathLike, what: str = "folder") -> list[Path]:
    """Image files under ``folder`` (recursive, sorted like clean-fid); UserError if none or missing."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UserError(f"{what} {path} is not a directory; pass an existing folder of images")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"{what} {path} has no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """One image file as uint8 ``(3, H, W)`` RGB; UserError naming the file when it does not decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.array(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UserError(
            f"{path} is not a readable image ({exc.__class__.__name__}: {exc}); remove or replace the file"
        ) from exc
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_image_folder(folder: str | os.PathLike, what: str = "folder", limit: int | None = None) -> list[torch.Tensor]:
    """All images of a folder as uint8 ``(3, H, W)`` tensors (sizes may differ), sorted by path."""
    files = list_image_files(folder, what)
    if limit is not None:
        files = files[:limit]
    return [load_image(f) for f in files]


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """Centre-crop to square and resize (bicubic, antialiased) uint8 images to ``size``."""
    _, _, height, width = images.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    cropped = images[:, :, top : top + side, left : left + side]
    if side == size:
        return cropped.contiguous()
    resized = torch.nn.functional.interpolate(
        cropped.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False
    )
    return resized.round().clamp(0, 255).to(torch.uint8)


def save_png(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a uint8 ``(3, H, W)`` image as PNG atomically (temporary file, then rename)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(to_numpy_hwc(to_uint8(image)[0])).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def make_grid(images: torch.Tensor, columns: int | None = None, padding: int = 2) -> torch.Tensor:
    """uint8 ``(3, H', W')`` grid of uint8 ``(B, 3, H, W)`` images (row-major, white padding)."""
    images = to_uint8(images)
    count, _, height, width = images.shape
    columns = columns or min(count, 8)
    rows = (count + columns - 1) // columns
    grid = torch.full(
        (3, rows * (height + padding) + padding, columns * (width + padding) + padding), 255, dtype=torch.uint8
    )
    for index in range(count):
        row, col = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + col * (width + padding)
        grid[:, top : top + height, left : left + width] = images[index].cpu()
    return grid
