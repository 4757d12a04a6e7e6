"""Decoding images and captions from untrusted bytes: guards, conversions, clear skip reasons."""

from __future__ import annotations

import io
import math
import re
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from xa_lightning.data.counters import SampleSkipped

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # 8k x 8k; real training images are far below, bombs far above

_WHITESPACE = re.compile(r"\s+")


def _is_16bit(image: Image.Image) -> bool:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return True
    # Pillow reads 48/64-bit RGB(A) PNGs as 8-bit modes; the raw mode of the tile still says 16.
    for tile in getattr(image, "tile", None) or ():
        args = getattr(tile, "args", None) if not isinstance(tile, tuple) else tile[3]
        rawmode = args[0] if isinstance(args, tuple) and args else args
        if isinstance(rawmode, str) and ";16" in rawmode:
            return True
    return False


def _to_rgb(image: Image.Image, conversions: list[str]) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image)
        if mode == "F":
            top = float(array.max()) if array.size else 1.0
            array = array / (top if top > 1.0 else 1.0) * 255.0
        else:
            # 16-bit data: keep the high byte (what every 16->8 bit converter does).
            array = array.astype(np.int64) >> 8 if array.max(initial=0) > 255 else array
        gray = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")
        conversions.append("grayscale")
        return gray.convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    elif mode == "P":
        conversions.append("palette")
        return image.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        conversions.append("alpha")
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("L", "1"):
        conversions.append("grayscale")
        return image.convert("RGB")
    if mode == "CMYK":
        conversions.append("cmyk")
        return image.convert("RGB")
    conversions.append("cmyk")  # YCbCr, LAB, HSV, ...: other colour spaces, same treatment
    return image.convert("RGB")


def decode_image(
    data: bytes | Path | str, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side_hint: int | None = None
) -> tuple[Image.Image, tuple[int, int], list[str]]:
    """Decode image bytes (or a file) to an RGB PIL image.

    Returns ``(image, (original_height, original_width), conversions)``. ``min_side_hint``: the smallest
    side the caller needs; JPEGs are then decoded at a reduced scale that still covers it (much faster
    for large photos). Raises :class:`SampleSkipped` (``corrupt_image``, ``too_large``).
    """
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    conversions: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
            width, height = image.size
            if width <= 0 or height <= 0:
                raise SampleSkipped("corrupt_image", f"size {width}x{height}")
            if width * height > max_pixels:
                raise SampleSkipped("too_large", f"{width}x{height} > data.max_pixels={max_pixels}")
            sixteen_bit = _is_16bit(image)
            if min_side_hint and image.format == "JPEG" and image.mode in ("RGB", "L"):
                scale = min_side_hint / min(width, height)
                if scale < 0.5:
                    image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))
            image.load()
    except SampleSkipped:
        raise
    except Image.DecompressionBombError as exc:
        raise SampleSkipped("too_large", str(exc).splitlines()[0]) from exc
    except (
        OSError,
        SyntaxError,
        ValueError,
        TypeError,
        EOFError,
        Image.UnidentifiedImageError,
        MemoryError,
        struct.error,
    ) as exc:
        raise SampleSkipped("corrupt_image", f"{type(exc).__name__}: {exc}") from exc
    try:
        transposed = ImageOps.exif_transpose(image)
    except Exception:  # broken EXIF: keep the pixels as stored
        transposed = image
    if transposed is not None and transposed.size != image.size and transposed.size == image.size[::-1]:
        width, height = height, width  # rotated by its EXIF orientation: report the upright size
    image = transposed if transposed is not None else image
    if sixteen_bit:
        conversions.append("16bit")
    try:
        rgb = _to_rgb(image, conversions)
    except (OSError, ValueError) as exc:
        raise SampleSkipped("corrupt_image", f"cannot convert mode {image.mode}: {exc}") from exc
    return rgb, (height, width), conversions


def decode_caption(raw: bytes | str | None) -> tuple[str | None, list[str]]:
    """Caption bytes to text: UTF-8 (BOM allowed), else cp1252, else latin-1; whitespace collapsed.

    Returns ``(caption or None, conversions)``; ``None`` means there was no caption at all.
    """
    conversions: list[str] = []
    if raw is None:
        return None, conversions
    if isinstance(raw, (bytes, bytearray)):
        try:
            text = bytes(raw).decode("utf-8-sig")
        except UnicodeDecodeError:
            conversions.append("caption_encoding")
            try:
                text = bytes(raw).decode("cp1252")
            except UnicodeDecodeError:
                text = bytes(raw).decode("latin-1")
    else:
        text = str(raw)
    text = _WHITESPACE.sub(" ", text.replace("\x00", " ")).strip()
    return text, conversions


def require_caption(raw: bytes | str | None) -> tuple[str, list[str]]:
    """Like :func:`decode_caption` but raises ``missing_caption`` / ``empty_caption``."""
    text, conversions = decode_caption(raw)
    if text is None:
        raise SampleSkipped("missing_caption")
    if not text:
        raise SampleSkipped("empty_caption")
    return text, conversions
