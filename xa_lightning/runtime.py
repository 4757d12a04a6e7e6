"""Facts about the process the code runs in: its device and its place in a distributed job."""

from __future__ import annotations


def device_name(device: str) -> str:
    """A readable name for benchmark reports: the GPU's model, or the CPU and its torch thread count."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads)"
