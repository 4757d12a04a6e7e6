"""Where metric weights are cached, and a fast "is the hub reachable" check.

A download attempted without network must fail at once with an explanation, never retry for half a
minute (huggingface_hub retries a HEAD request five times): :func:`host_reachable` answers in
milliseconds when DNS fails and within ``timeout`` seconds otherwise.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

ENV_OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "XA_OFFLINE")


def cache_dir() -> Path:
    """``$XA_CACHE_DIR`` or ``~/.cache/xa_lightning`` (the same default as ``paths.cache_dir``)."""
    env = os.environ.get("XA_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("HOME", "/tmp")) / ".cache" / "xa_lightning"
    return base.expanduser()


def offline_requested() -> bool:
    """True when the environment asks for offline mode (HF_HUB_OFFLINE=1 and friends)."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in ENV_OFFLINE)


@functools.lru_cache(maxsize=16)
def host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host:port`` opens (cached for the process)."""
    if offline_requested():
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
