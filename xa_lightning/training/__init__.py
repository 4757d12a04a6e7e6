"""Training plumbing shared by all methods."""

from xa_lightning.training.callbacks import AdapterExport
from xa_lightning.training.checkpoint_io import AtomicCheckpointIO, atomic_torch_save, safe_torch_load
from xa_lightning.training.module import ADAPTER_META_FILE, AdapterModule, Sampler

__all__ = [
    "ADAPTER_META_FILE",
    "AdapterExport",
    "AdapterModule",
    "AtomicCheckpointIO",
    "Sampler",
    "atomic_torch_save",
    "safe_torch_load",
]
from xa_lightning.training.restore import load_method

__all__ += ["load_method"]
