"""Image plumbing shared by the metrics: validation, conversion, folder loading, a worker pool.

Every metric takes uint8 images ``(B, 3, H, W)`` (docs/contracts.md). Folders are read the way
clean-fid reads them (PIL, ``convert("RGB")``, the same file extensions, recursive, sorted), so a
metric on a folder sees exactly the pixels clean-fid would.

Per-image CPU work (clean-fid's PIL resize, open_clip's PIL preprocessing, decoding files) runs on one
process-wide thread pool: PIL releases the GIL while it decodes and resamples, so the images of a batch
are processed in parallel, off the main thread, with PIL's exact numerics.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from xa_lightning.errors import UserError

# clean-fid's EXTENSIONS (cleanfid/utils.py), minus .npy which is not an image file.
IMAGE_EXTENSIONS = frozenset({"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"})

ImageBatches = torch.Tensor | Sequence[torch.Tensor] | Iterable[torch.Tensor]
Item = TypeVar("Item")
Result = TypeVar("Result")

_POOL: tuple[int, ThreadPoolExecutor] | None = None
_POOL_LOCK = threading.Lock()


def worker_count() -> int:
    """Threads of the worker pool: one per core this process may use, at most 16."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 16))


def worker_pool() -> ThreadPoolExecutor:
    """The process-wide pool for per-image CPU work (:func:`worker_count` threads)."""
    global _POOL
    with _POOL_LOCK:
        # A forked child inherits the object but not its threads: it gets its own pool.
        if _POOL is None or _POOL[0] != os.getpid():
            _POOL = (os.getpid(), ThreadPoolExecutor(worker_count(), thread_name_prefix="xa-metrics"))
        return _POOL[1]


def parallel_map(function: Callable[[Item], Result], items: Sequence[Item]) -> list[Result]:
    """``[function(item) for item in items]`` on the worker pool, in order."""
    if len(items) <= 1:
        return [function(item) for item in items]
    return list(worker_pool().map(function, items))


def map_ahead(function: Callable[[Item], Result], items: Sequence[Item], chunk: int) -> Iterator[list[Result]]:
    """``function`` over ``items`` on the worker pool, yielded ``chunk`` results at a time.

    The next chunk is already being computed while the caller works on the current one (decoding and
    resizing overlap the network), and at most two chunks are in memory.
    """
    pool = worker_pool()
    submit: Callable[[int], list[Future[Result]]] = lambda start: [
        pool.submit(function, item) for item in items[start : start + chunk]
    ]
    pending = submit(0)
    for start in range(chunk, len(items) + chunk, chunk):
        following = submit(start) if start < len(items) else []
        yield [future.result() for future in pending]
        pending = following


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


def to_numpy_nhwc(images: torch.Tensor) -> np.ndarray:
    """A uint8 ``(B, 3, H, W)`` tensor as a contiguous uint8 ``(B, H, W, 3)`` array (each image contiguous too)."""
    return images.detach().permute(0, 2, 3, 1).contiguous().cpu().numpy()


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


def read_image(path: str | os.PathLike) -> np.ndarray:
    """One image file as a uint8 ``(H, W, 3)`` RGB array; UserError naming the file when it does not decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UserError(
            f"{path} is not a readable image ({exc.__class__.__name__}: {exc}); remove or replace the file"
        ) from exc


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """One image file as uint8 ``(3, H, W)`` RGB; UserError naming the file when it does not decode."""
    return torch.from_numpy(read_image(path)).permute(2, 0, 1).contiguous()


def load_image_folder(folder: str | os.PathLike, what: str = "folder", limit: int | None = None) -> list[torch.Tensor]:
    """All images of a folder as uint8 ``(3, H, W)`` tensors (sizes may differ), sorted by path."""
    files = list_image_files(folder, what)
    if limit is not None:
        files = files[:limit]
    return [load_image(f) for f in files]


def resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize uint8 images (bicubic, antialiased; rounded) to ``height`` x ``width``."""
    if tuple(images.shape[-2:]) == (height, width):
        return images
    resized = torch.nn.functional.interpolate(
        images.float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False
    )
    return resized.round().clamp(0, 255).to(torch.uint8)


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """Centre-crop to square and resize (bicubic, antialiased) uint8 images to ``size``."""
    _, _, height, width = images.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return resize(images[:, :, top : top + side, left : left + side].contiguous(), size, size)


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
