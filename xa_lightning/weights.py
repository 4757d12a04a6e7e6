"""Reading weight files safely: the one reader every converter, plugin loader and checkpoint reader uses.

``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``, which
executes no pickled code. A missing, truncated or foreign file is one :class:`UserError` line that names the
file, what it was meant to be (``what``) and how to fix it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from xa_lightning.errors import UserError

SAFETENSORS_SUFFIX = ".safetensors"


def read_object(path: str | os.PathLike[str], what: str = "weights", fix: str = "", map_location: Any = "cpu") -> Any:
    """Whatever a ``.safetensors`` / torch file holds (a state dict, a Lightning checkpoint), read safely.

    ``what`` names the file's role in errors (``"SUN weights"``, ``"checkpoint"``); ``fix`` says what to do
    when it is missing (default: pass an existing file).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; {fix or 'pass an existing file'}")
    try:
        if path.suffix == SAFETENSORS_SUFFIX:
            from safetensors.torch import load_file

            device = map_location if isinstance(map_location, str) else "cpu"
            return dict(load_file(str(path), device=device))
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch / safetensors raise many types for truncated or foreign files
        raise UserError(
            f"cannot read {what} {path} safely ({type(error).__name__}); is it complete and a weight file? "
            "re-download or re-export it"
        ) from error


def read_state_dict(path: str | os.PathLike[str], what: str = "weights", fix: str = "") -> dict[str, Any]:
    """A flat ``name -> tensor`` mapping (nested dicts such as IP-Adapter's ``{"image_proj": {...}}`` are kept)."""
    state = read_object(path, what, fix)
    if not isinstance(state, Mapping):
        raise UserError(f"{what} {path} holds a {type(state).__name__}, not a state dict; pass a weight file")
    return dict(state)
