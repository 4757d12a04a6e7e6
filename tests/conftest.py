"""Suite-wide settings.

Tiny models are dominated by per-op overhead: one intra-op thread per test process is faster than two
(measured 10-30x on the 2-core machines when another process is busy), and `make test` runs two
processes (pytest-xdist) to use both cores.
"""

import os

import torch

torch.set_num_threads(int(os.environ.get("XA_TEST_THREADS", "1")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
