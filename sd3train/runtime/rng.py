"""Named random streams whose seed is a pure function of (seed, step, rank, stream).

Drawing every training random number from these means a resumed run continues the exact
stream of an uninterrupted one, with nothing to save.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts; stable across processes and Python versions (unlike hash())."""
    digest = hashlib.sha256("/".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def step_generator(seed: int, step: int, rank: int, stream: str, device: torch.device | str = "cpu") -> torch.Generator:
    """Generator for one named stream at one optimizer step on one rank, on `device`: the training
    device's own generator draws there without a host copy (seeding it reads nothing back)."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, step, rank, stream))
