"""Suite-wide settings.

Tiny models are dominated by per-op overhead: one intra-op thread per test process is faster than two
(measured 10-30x on the 2-core machines when another process is busy). ``XA_TEST_THREADS`` changes it.
"""

import os

import pytest
import torch

THREADS = int(os.environ.get("XA_TEST_THREADS", "1"))
torch.set_num_threads(THREADS)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _test_threads():
    """Before every test: a test (or a library) that changed torch's thread count does not slow the next ones."""
    torch.set_num_threads(THREADS)
