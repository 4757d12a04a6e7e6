"""The two places the package reads from and writes to outside a run directory: the checkout and the cache."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def repo_root() -> Path:
    """The checkout holding ``conf/``, ``experiments/`` and ``evaluation/`` (``$XA_ROOT`` overrides)."""
    env = os.environ.get("XA_ROOT")
    return Path(env).expanduser().resolve() if env else PACKAGE_DIR.parent


def cache_dir() -> Path:
    """``$XA_CACHE_DIR``, else ``~/.cache/xa_lightning``: metric weights, the rebuilt CLIP vocabulary.

    ``conf/paths/default.yaml`` (``paths.cache_dir``) resolves to the same place.
    """
    env = os.environ.get("XA_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("HOME", "/tmp")) / ".cache" / "xa_lightning"
    return base.expanduser()
