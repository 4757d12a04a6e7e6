"""Facts about the process the code runs in: its device and its place in a distributed job."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


def device_name(device: str) -> str:
    """A readable name for benchmark reports: the GPU's model, or the CPU and its torch thread count."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads)"


def rank_and_world() -> tuple[int, int]:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_per_rank(state: Any) -> dict[str, Any]:
    """``{"world_size": W, "ranks": [state of rank 0, ..., rank W-1]}`` on every rank (a collective:
    every rank must call it, as they all do while Lightning builds a checkpoint). Per-rank state in a
    checkpoint that only rank 0 writes goes through it; :func:`own_part` gives each rank its part back."""
    import torch

    _, world = rank_and_world()
    states = [state]
    if world > 1:
        states = [None] * world
        torch.distributed.all_gather_object(states, state)
    return {"world_size": world, "ranks": states}


def own_part(gathered: Mapping[str, Any] | None, what: str) -> Any:
    """This rank's part of :func:`gather_per_rank`'s result; None (with a warning) when the checkpoint was
    written by another number of processes: that part of the state cannot be matched to this run's ranks."""
    if not gathered:
        return None
    rank, world = rank_and_world()
    saved = int(gathered.get("world_size", 1))
    if saved != world:
        if rank == 0:
            log.warning(
                "%s was saved by %d process(es), this run has %d: it restarts instead of continuing exactly",
                what,
                saved,
                world,
            )
        return None
    return gathered["ranks"][rank]
