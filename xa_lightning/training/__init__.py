"""Training plumbing shared by all methods."""

from xa_lightning.training.callbacks import (
    AdapterCheckpoint,
    AdapterExport,
    NumericGuard,
    Preempted,
    PreemptionCheckpoint,
)
from xa_lightning.training.checkpoint_io import AtomicCheckpointIO, atomic_torch_save, safe_torch_load
from xa_lightning.training.module import ADAPTER_META_FILE, AdapterModule, Sampler
from xa_lightning.training.restore import load_checkpoint_state, load_method

__all__ = [
    "ADAPTER_META_FILE",
    "AdapterCheckpoint",
    "AdapterExport",
    "AdapterModule",
    "AtomicCheckpointIO",
    "NumericGuard",
    "Preempted",
    "PreemptionCheckpoint",
    "Sampler",
    "atomic_torch_save",
    "load_checkpoint_state",
    "load_method",
    "safe_torch_load",
]
