"""Test-wide environment: nothing may reach a hub or the W&B servers; one thread per process.

Tiny models run no faster on two threads, and two test processes (or a test and its
subprocess) fighting over two cores made tiny backward passes tens of times slower.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
