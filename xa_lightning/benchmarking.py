"""Measuring for benchmarks: timing, peak memory, and the speed / memory levers compared on and off.

Shared by ``xa-bench`` (``xa_lightning/bench.py``) and every ``<area>/bench.py``; a foundation module, so the
method and data benchmarks do not import the command's dispatcher.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from xa_lightning.runtime import device_name

__all__ = [
    "DEFAULT_LEVERS",
    "LEVERS",
    "Lever",
    "compare_levers",
    "default_device",
    "device_name",
    "median_seconds",
    "parse_levers",
    "peak_memory_mib",
    "synchronize",
]


def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def median_seconds(work: Callable[[], Any], repeats: int, device: str, warmup: int = 1) -> float:
    """Median wall time of ``repeats`` calls of ``work`` after ``warmup`` untimed ones (allocations, kernels,
    lazy initialisation, ``torch.compile``)."""
    for _ in range(warmup):
        work()
    times = []
    for _ in range(max(repeats, 1)):
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_mib(work: Callable[[], Any], device: str) -> float:
    """MiB allocated at the peak of ``work()`` above what was allocated before it: the CUDA allocator's peak on
    a GPU; on the CPU (no allocator statistic) the running total the profiler records at every tensor
    allocation, so other processes and the allocator's caching do not enter the figure."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        work()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    allocations = []
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.tag == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.extra_fields.total_allocated, event.extra_fields.alloc_size))
    if not allocations:
        return 0.0
    allocations.sort()
    _, first_total, first_size = allocations[0]
    return (max(total for _, total, _ in allocations) - (first_total - first_size)) / 2**20


@dataclass(frozen=True)
class Lever:
    """A speed / memory switch: the setting ``key`` is ``on`` or ``off``."""

    key: str
    on: Any
    off: Any
    what: str


LEVERS: dict[str, Lever] = {
    "bf16": Lever("dtype", "bf16", "fp32", "frozen models in bf16 (backbone.dtype); the adapter and the loss fp32"),
    "sdpa": Lever(
        "attention", "sdpa", "math", "fused scaled-dot-product attention vs matmul-softmax (backbone.attention)"
    ),
    "channels_last": Lever("channels_last", True, False, "UNet / VAE convolutions in NHWC (backbone.channels_last)"),
    "gradient_checkpointing": Lever(
        "gradient_checkpointing",
        True,
        False,
        "activations recomputed in backward (method.training.gradient_checkpointing)",
    ),
    "compile": Lever("compile", True, False, "torch.compile of the frozen denoiser (backbone.compile)"),
}
DEFAULT_LEVERS = ("bf16", "sdpa", "channels_last", "gradient_checkpointing")  # compile: minutes to compile on a CPU


def parse_levers(value: str, device: str) -> list[str]:
    """``--levers``: ``default`` (all but compile on a CPU, all on a GPU), ``none`` or a comma list."""
    if value == "none":
        return []
    if value == "default":
        return list(DEFAULT_LEVERS) + ([] if device == "cpu" else ["compile"])
    names = [name for name in value.split(",") if name]
    unknown = [name for name in names if name not in LEVERS]
    if unknown:
        from xa_lightning.errors import UserError

        raise UserError(f"--levers: unknown lever {unknown[0]!r}; choose from {', '.join(LEVERS)} (or default, none)")
    return names


def compare_levers(
    measure: Callable[[dict[str, Any]], dict[str, float]], base: dict[str, Any], names: Sequence[str]
) -> dict[str, Any]:
    """``measure(settings)`` at the base settings, and for each lever with it on and with it off (everything else
    at base; a setting measured once is reused). ``effect`` = off / on for each figure: above 1 the lever
    saves that factor of time or memory."""
    measured: dict[tuple, dict[str, float]] = {}

    def run(settings: dict[str, Any]) -> dict[str, float]:
        key = tuple(sorted(settings.items()))
        if key not in measured:
            print(f"measuring {json.dumps(settings)}", file=sys.stderr, flush=True)
            measured[key] = measure(settings)
        return measured[key]

    levers = {}
    for name in names:
        lever = LEVERS[name]
        on, off = run({**base, lever.key: lever.on}), run({**base, lever.key: lever.off})
        effect = {
            key: off[key] / on[key]
            for key in on
            if isinstance(on[key], float) and on[key] > 0 and key.endswith(("_s", "_mib", "_per_image"))
        }
        levers[name] = {"what": lever.what, "on": on, "off": off, "effect": effect}
    return {"base": run(base), "levers": levers}


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
