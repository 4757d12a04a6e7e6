"""Every random number generator training draws from, as checkpoint-safe values (tensors, lists, numbers).

Methods draw noise, timesteps and negative prompts from torch's global generator (CPU and the rank's
CUDA device); libraries may use numpy's and python's; a method may own generators of its own
(:meth:`AdapterModule.rng_generators`). A resumed run restores all of them, whatever seeded them.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def capture_rng(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    keys, position, has_gauss, cached_gaussian = np.random.get_state()[1:]
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": [version, list(internal), gauss_next],
        "generators": {name: generator.get_state() for name, generator in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the rank's own device
    return state


def restore_rng(state: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    saved = dict(state.get("generators") or {})
    for name, generator in generators.items():
        if name in saved:
            generator.set_state(saved[name])
